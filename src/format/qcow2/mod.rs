//! qcow2 (QEMU copy-on-write, versions 2 and 3): open, validation, and the `Layer` for the
//! live image and for each internal snapshot.
//!
//! The parsed image (`Qcow2Image`) is shared through an `Arc` by every layer made from it:
//! the live layer and each snapshot layer differ only in their L1 table and size.

pub mod bitmap;
pub mod diff;
pub mod entry;
pub mod header;
pub mod map;
mod open;
pub mod snapshot;
pub mod tables;
pub mod vmstate;
pub mod write;

use self::entry::Geometry;
use self::header::{Extensions, Header};
use self::open::{
    backing_ref, check_l1_placement, check_tables, load_l1, open_data_file, read_snapshots,
};
use self::snapshot::Snapshot;
use super::{Extent, Format, Layer, OpenCtx, ParentRef, SnapshotInfo};
use crate::cache::ByteCache;
use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use parking_lot::Mutex;
use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// QEMU's limits on the L1 table and the refcount table.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u64 = 1023;
/// Total bytes of distinct snapshot L1 tables one image may load: a crafted table of
/// 65536 snapshots with large, distinct L1 tables must not exhaust memory.
const SNAPSHOT_L1_BUDGET: u64 = 512 << 20;

/// Everything parsed from one qcow2 file at open.
pub struct Qcow2Image {
    pub path: PathBuf,
    pub file: Arc<HostFile>,
    /// The external data file (incompatible bit 2), if any.
    pub data_file: Option<Arc<HostFile>>,
    pub header: Header,
    pub extensions: Extensions,
    pub geometry: Geometry,
    /// The virtual size QEMU exposes: the header's size rounded down to 512 bytes.
    pub size: u64,
    /// The active L1 table as loaded at open.
    pub l1: Arc<[u64]>,
    pub snapshots: Vec<Snapshot>,
    /// Why the snapshot table could not be read, if it could not: the live image still
    /// opens (QEMU opens it too), but no snapshot is exposed.
    pub snapshot_error: Option<String>,
    pub parent: ParentRef,
    pub tables: Arc<ByteCache>,
    /// Keeps cached L2 tables coherent with the writer's updates.
    pub l2_sync: tables::L2Sync,
    snapshot_l1s: Mutex<SnapshotL1s>,
}

#[derive(Default)]
struct SnapshotL1s {
    /// Snapshots often share an L1 (same offset and size in crafted files): load it once.
    loaded: HashMap<(u64, u32), Weak<[u64]>>,
    bytes: u64,
}

impl fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("header", &self.header)
            .field(
                "data_file",
                &self.data_file.as_ref().map(|d| d.path().to_path_buf()),
            )
            .field("snapshots", &self.snapshots.len())
            .finish()
    }
}

/// The live image or one internal snapshot of it.
#[derive(Debug)]
pub struct Qcow2Layer {
    pub image: Arc<Qcow2Image>,
    pub l1: Arc<[u64]>,
    pub l1_offset: u64,
    pub size: u64,
    /// Index into the snapshot table, for snapshot layers.
    pub snapshot: Option<usize>,
    /// In-place writing (live layer of a writable image only); it owns the current L1.
    pub writer: Option<Arc<write::Qcow2Writer>>,
}

impl Qcow2Layer {
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
        let image = Arc::new(Qcow2Image::open(path, ctx)?);
        let writer = if ctx.writable {
            write::Qcow2Writer::new(&image)?.map(|w| {
                let w = Arc::new(w);
                write::start_background_flush(&w);
                w
            })
        } else {
            None
        };
        Ok(Arc::new(Qcow2Layer {
            l1: image.l1.clone(),
            l1_offset: image.header.l1_table_offset,
            size: image.size,
            snapshot: None,
            writer,
            image,
        }))
    }
}

impl Qcow2Image {
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Qcow2Image> {
        let mut file = HostFile::open(path, ctx.writable)?;
        let mut head = vec![0u8; file.len().min(header::V3_MIN_LEN as u64 + 8) as usize];
        file.read_exact_at(&mut head, 0, "qcow2 header")?;
        let header = Header::parse(&head, path)?;

        // Cluster 0 up to the backing file name holds the extensions; QEMU reads past the
        // end of a short file as zeros.
        let ext_end = header.extensions_end();
        let mut cluster0 = vec![0u8; ext_end as usize];
        let have = ext_end.min(file.len()) as usize;
        file.read_exact_at(&mut cluster0[..have], 0, "header extensions")?;
        let extensions =
            Extensions::parse(&cluster0, u64::from(header.header_length), ext_end, path);
        header.check_features(extensions.as_ref().unwrap_or(&Extensions::default()), path)?;
        let extensions = extensions?;

        if header.corrupt() {
            log::warn!(
                "{}: the image is marked corrupt; opening it read-only",
                path.display()
            );
            if file.writable() {
                file = HostFile::open(path, false)?;
            }
        }
        let geometry = Geometry {
            cluster_bits: header.cluster_bits,
            version: header.version,
            extended_l2: header.extended_l2(),
            has_data_file: header.has_data_file(),
        };
        check_tables(&header, &geometry, &file)?;
        let data_file = open_data_file(&header, &extensions, &file, ctx)?;
        let parent = backing_ref(&header, &extensions, &file)?;
        let (snapshots, snapshot_error) = match read_snapshots(&header, &file) {
            Ok(s) => (s, None),
            Err(e) => {
                log::warn!("{e}; no internal snapshot of this image is shown");
                (Vec::new(), Some(e.to_string()))
            }
        };
        let l1 = load_l1(&file, header.l1_table_offset, header.l1_size, "L1 table")?;
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            size: header.size & !511,
            file,
            data_file,
            header,
            extensions,
            geometry,
            l1,
            snapshots,
            snapshot_error,
            parent,
            tables: ctx.tables.clone(),
            l2_sync: tables::L2Sync::default(),
            snapshot_l1s: Mutex::new(SnapshotL1s::default()),
        })
    }

    /// The file guest data clusters live in.
    pub fn data_file(&self) -> &Arc<HostFile> {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// A read-only layer showing snapshot `index` over the image's backing file.
    pub fn open_snapshot(self: &Arc<Self>, index: usize) -> Result<Arc<dyn Layer>> {
        let sn = self
            .snapshots
            .get(index)
            .ok_or_else(|| match &self.snapshot_error {
                Some(e) => Error::new(Kind::Corrupt, e.clone()),
                None => Error::invalid(format!(
                    "{}: no snapshot with index {index}",
                    self.path.display()
                )),
            })?;
        let field = format!("snapshot {index} ({:?}) L1 table", sn.name);
        check_l1_placement(
            &self.file,
            &self.geometry,
            sn.l1_table_offset,
            sn.l1_size,
            &field,
        )?;
        let l1 = self.snapshot_l1(sn, &field)?;
        let size = sn.disk_size.unwrap_or(self.size) & !511;
        Ok(Arc::new(Qcow2Layer {
            image: self.clone(),
            l1,
            l1_offset: sn.l1_table_offset,
            size,
            snapshot: Some(index),
            writer: None,
        }))
    }

    fn snapshot_l1(&self, sn: &Snapshot, field: &str) -> Result<Arc<[u64]>> {
        let key = (sn.l1_table_offset, sn.l1_size);
        let bytes = u64::from(sn.l1_size) * 8;
        {
            let mut s = self.snapshot_l1s.lock();
            if let Some(l1) = s.loaded.get(&key).and_then(Weak::upgrade) {
                return Ok(l1);
            }
            if s.bytes + bytes > SNAPSHOT_L1_BUDGET {
                return Err(Error::new(
                    Kind::Unsupported,
                    format!(
                        "{}: {field}: the snapshot L1 tables exceed {SNAPSHOT_L1_BUDGET} bytes in total",
                        self.path.display()
                    ),
                ));
            }
            s.bytes += bytes;
        }
        // Loaded outside the lock; two racing loads of one table are harmless.
        let l1 = load_l1(&self.file, sn.l1_table_offset, sn.l1_size, field)?;
        self.snapshot_l1s
            .lock()
            .loaded
            .insert(key, Arc::downgrade(&l1));
        Ok(l1)
    }
}

impl Qcow2Layer {
    /// A read-only layer over a snapshot the writer took while mounted (not in the table
    /// read at open, so `snapshot` holds no index).
    pub fn made_snapshot(image: &Arc<Qcow2Image>, made: &write::MadeSnapshot) -> Arc<dyn Layer> {
        Arc::new(Qcow2Layer {
            image: image.clone(),
            l1: made.l1.clone(),
            l1_offset: made.l1_offset,
            size: made.size,
            snapshot: None,
            writer: None,
        })
    }

    /// The L1 table this layer maps through now (the writer's, for the live layer).
    pub fn current_l1(&self) -> Arc<[u64]> {
        match &self.writer {
            Some(w) => w.l1(),
            None => self.l1.clone(),
        }
    }
}

impl Layer for Qcow2Layer {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn path(&self) -> &Path {
        &self.image.path
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        match &self.writer {
            Some(w) => map::map(&self.image, &w.l1(), self.l1_offset, off, len),
            None => map::map(&self.image, &self.l1, self.l1_offset, off, len),
        }
    }
    fn changed_since(
        &self,
        older: &dyn Layer,
        off: u64,
        end: u64,
    ) -> Option<Result<Vec<Range<u64>>>> {
        let older = (older as &dyn Any).downcast_ref::<Qcow2Layer>()?;
        if !Arc::ptr_eq(&older.image, &self.image) {
            return None;
        }
        let (old, new) = (older.current_l1(), self.current_l1());
        Some(diff::changed_between(&self.image, &old, &new, off, end))
    }
    fn writer(&self) -> Option<&dyn crate::write::LayerWriter> {
        self.writer.as_deref().map(|w| w as _)
    }
    fn parent(&self) -> ParentRef {
        self.image.parent.clone()
    }
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        if self.snapshot.is_some() {
            return Vec::new();
        }
        let img = &self.image;
        img.snapshots
            .iter()
            .enumerate()
            .map(|(index, s)| SnapshotInfo {
                index,
                id: s.id.clone(),
                name: s.name.clone(),
                virtual_size: s.disk_size.unwrap_or(img.size) & !511,
                date: (u64::from(s.date_sec), s.date_nsec.min(999_999_999)),
            })
            .collect()
    }
    fn open_snapshot(&self, index: usize) -> Result<Arc<dyn Layer>> {
        self.image.open_snapshot(index)
    }
    fn vm_state(&self) -> Option<Result<Arc<dyn Layer>>> {
        let index = self.snapshot?;
        let sn = self.image.snapshots.get(index)?;
        let field = format!("snapshot {index} ({:?}) vm_state_size", sn.name);
        let layer = vmstate::VmStateLayer::new(&self.image, sn, self.l1.clone(), &field)?;
        Some(layer.map(|l| Arc::new(l) as Arc<dyn Layer>))
    }
    fn files(&self) -> Vec<Arc<HostFile>> {
        let mut v = vec![self.image.file.clone()];
        v.extend(self.image.data_file.clone());
        v
    }
    fn details(&self) -> Vec<(String, String)> {
        let img = &self.image;
        let h = &img.header;
        let mut d = vec![
            (
                "version".into(),
                format!(
                    "{} (compat {})",
                    h.version,
                    if h.version == 2 { "0.10" } else { "1.1" }
                ),
            ),
            ("cluster size".into(), h.cluster_size().to_string()),
            ("compression".into(), h.compression.name().into()),
            (
                "extended L2".into(),
                if h.extended_l2() { "yes" } else { "no" }.into(),
            ),
            (
                "refcount bits".into(),
                (1u32 << h.refcount_order).to_string(),
            ),
        ];
        if let Some(name) = &img.extensions.data_file
            && h.has_data_file()
        {
            let raw = if h.data_file_raw() { " (raw)" } else { "" };
            d.push(("data file".into(), format!("{name}{raw}")));
        }
        if let ParentRef::Path { raw, format, .. } = &img.parent {
            let f = format.map(|f| f.name()).unwrap_or("probed");
            d.push(("backing file".into(), format!("{raw} ({f})")));
        }
        let state = match (h.dirty(), h.corrupt()) {
            (_, true) => "corrupt (read-only)",
            (true, false) => "dirty",
            _ => "clean",
        };
        d.push(("state".into(), state.into()));
        let snaps = match &img.snapshot_error {
            Some(e) => format!("unreadable: {e}"),
            None => img.snapshots.len().to_string(),
        };
        d.push(("snapshots".into(), snaps));
        if let Some(i) = self.snapshot {
            d.push((
                "snapshot".into(),
                format!("{i}: {:?}", img.snapshots[i].name),
            ));
        }
        d
    }
}
