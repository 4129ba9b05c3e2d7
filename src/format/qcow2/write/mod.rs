//! A qcow2 top layer written in place, as QEMU writes it (v2 and v3, any refcount width,
//! extended L2, external data files), crash-consistent without fsync: every metadata
//! update is written through, in an order that keeps the image valid at every instant
//! (leaks allowed, never a reference to a cluster whose refcount is 0).
//!
//! Locking: `meta` is a read-write lock. Data writes into clusters this image owns alone
//! (COPIED) take it shared, so they run in parallel; anything that allocates or changes
//! metadata takes it exclusively. Reads (`map`) take only the short L1 lock: L2 tables are
//! immutable blobs in `ctx.tables`, replaced after each update (see `l2_table`).

mod cow;
pub mod create;
mod discard;
pub mod entry;
pub mod header;
mod refcount;

use crate::cache::{Blob, ByteCache, Key};
use crate::chain::resolve_relative;
use crate::ensure_corrupt;
use crate::error::{Error, Kind, Result};
use crate::format::{Codec, Extent, Format, Layer, Mapping, OpenCtx, ParentRef};
use crate::host::HostFile;
use crate::host::endian::{be32, be64};
use crate::write::{BelowReader, LayerWriter};
use entry::{Kind as EntryKind, OFFSET_MASK};
use header::Header;
use parking_lot::{Mutex, RwLock};
use refcount::Refcounts;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Cache tag of L2 tables (the read driver's tag, so both share entries).
pub const TAG_L2: u8 = 0x32;

pub struct Qcow2Image {
    file: Arc<HostFile>,
    /// The external data file, if any (guest data lives there at host = guest offset).
    data_file: Option<Arc<HostFile>>,
    h: Header,
    size: u64,
    codec: Codec,
    tables: Arc<ByteCache>,
    l1: RwLock<Vec<u64>>,
    /// Refcounts and allocation; None when read-only.
    meta: RwLock<Option<Refcounts>>,
    /// Bumped after every L2 table write so a racing load does not cache a stale table.
    l2_seq: AtomicU64,
    l2_insert: Mutex<()>,
    failed: AtomicBool,
    parent: ParentRef,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image").field("path", &self.file.path()).field("header", &self.h).finish()
    }
}

/// How one unit (a subcluster with extended L2, else a cluster) reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Data(u64),
    Zero,
    Unallocated,
    Compressed { off: u64, len: u64 },
}

/// Opens `path` as a qcow2 layer (writable when `ctx.writable`).
pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
    Ok(Arc::new(Qcow2Image::open(path, ctx)?))
}

impl Qcow2Image {
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Qcow2Image> {
        let file = HostFile::open(path, ctx.writable)?;
        let mut head = vec![0u8; 24.min(file.len()) as usize];
        file.read_exact_at(&mut head, 0, "header")?;
        let cb = be32(&head, 20).clamp(9, 21);
        let mut buf = vec![0u8; (1u64 << cb).min(file.len()) as usize];
        file.read_exact_at(&mut buf, 0, "header cluster")?;
        let h = header::parse(&buf, path, file.len())?;
        if ctx.writable {
            if h.incompat & header::INCOMPAT_CORRUPT != 0 {
                return Err(Error::unsupported(path, "the image is marked corrupt; repair it with qemu-img check -r all"));
            }
            if h.incompat & header::INCOMPAT_DIRTY != 0 {
                return Err(Error::unsupported(path, "the image is dirty (lazy refcounts); run qemu-img check -r all first"));
            }
        }
        let codec = if h.compression_type == 1 { Codec::Zstd } else { Codec::Deflate };
        let l1_raw = file.read_table(h.l1_offset, u64::from(h.l1_size) * 8, header::MAX_L1_BYTES, "L1 table")?;
        let l1: Vec<u64> = l1_raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let data_file = match &h.data_file {
            Some(name) if h.incompat & header::INCOMPAT_DATA_FILE != 0 => {
                check_path_name(path, "data file name", name)?;
                Some(HostFile::open(&resolve_relative(path, name), ctx.writable)?)
            }
            _ if h.incompat & header::INCOMPAT_DATA_FILE != 0 => {
                return Err(Error::corrupt(path, "data file extension", 0, "external data file bit set but no name"));
            }
            _ => None,
        };
        let parent = match &h.backing {
            Some(raw) => {
                check_path_name(path, "backing file name", raw)?;
                let format = h.backing_format.as_deref().map(Format::parse).transpose()?;
                ParentRef::Path { raw: raw.clone(), path: resolve_relative(path, raw), format }
            }
            None => ParentRef::None,
        };
        let meta = if ctx.writable {
            let mut rc = Refcounts::new(&file, h.cluster_bits, h.refcount_order, h.reftable_offset, u64::from(h.reftable_clusters))?;
            let cs = h.cluster_size();
            let l1_clusters = (u64::from(h.l1_size) * 8).div_ceil(cs);
            rc.metadata.extend((0..l1_clusters).map(|i| h.l1_offset / cs + i));
            for (i, &e) in l1.iter().enumerate() {
                let off = e & OFFSET_MASK;
                ensure_corrupt!(off % cs == 0, path, "L1 entry", h.l1_offset + i as u64 * 8, "L2 offset {off:#x} is not cluster-aligned");
                if off != 0 {
                    rc.metadata.insert(off / cs);
                }
            }
            if h.nb_snapshots > 0 {
                let snap_clusters = (u64::from(h.nb_snapshots) * 40).div_ceil(cs);
                rc.metadata.extend((0..snap_clusters).map(|i| h.snapshots_offset / cs + i));
            }
            Some(rc)
        } else {
            None
        };
        let img = Qcow2Image {
            file,
            data_file,
            codec,
            size: h.size & !511,
            tables: ctx.tables.clone(),
            l1: RwLock::new(l1),
            meta: RwLock::new(meta),
            l2_seq: AtomicU64::new(0),
            l2_insert: Mutex::new(()),
            failed: AtomicBool::new(false),
            parent,
            h,
        };
        if ctx.writable {
            img.clear_unknown_autoclear()?;
        }
        Ok(img)
    }

    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    fn ext(&self) -> bool {
        self.h.extended_l2()
    }

    /// Bytes one unit covers (subcluster or cluster).
    fn unit_size(&self) -> u64 {
        if self.ext() { self.cs() / entry::SUBCLUSTERS } else { self.cs() }
    }

    fn entry_size(&self) -> u64 {
        if self.ext() { 16 } else { 8 }
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        self.cs() * self.h.l2_entries()
    }

    fn data_host(&self) -> &Arc<HostFile> {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// With `data_file_raw` the data file must read as the guest disk on its own.
    fn data_file_raw(&self) -> bool {
        self.data_file.is_some() && self.h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Autoclear bits we do not maintain (bitmaps) must be cleared before we write.
    fn clear_unknown_autoclear(&self) -> Result<()> {
        let keep = self.h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW;
        if self.h.version == 3 && self.h.autoclear != keep {
            self.file.write_all_at(&keep.to_be_bytes(), 88)?;
        }
        Ok(())
    }

    fn l2_key(&self, off: u64) -> Key {
        Key::new(self.file.id(), off, TAG_L2)
    }

    /// The L2 table at `off`, through the shared table cache. A load that raced with an L2
    /// write is returned but not cached, so the cache never keeps a stale table.
    fn l2_table(&self, off: u64) -> Result<Blob> {
        let cs = self.cs();
        ensure_corrupt!(off % cs == 0, self.file.path(), "L1 entry", off, "L2 table offset is not cluster-aligned");
        let key = self.l2_key(off);
        if let Some(b) = self.tables.get(&key) {
            return Ok(b);
        }
        let seq = self.l2_seq.load(Ordering::Acquire);
        let blob: Blob = self.file.read_table(off, cs, cs, "L2 table")?.into();
        let _g = self.l2_insert.lock();
        if self.l2_seq.load(Ordering::Acquire) == seq {
            self.tables.insert(key, blob.clone());
        }
        Ok(blob)
    }

    /// Writes `bytes` at `at` inside the L2 table at `l2_off` and publishes the new table.
    fn write_l2(&self, l2_off: u64, old: &[u8], at: u64, bytes: &[u8]) -> Result<Blob> {
        self.file.write_all_at(bytes, l2_off + at)?;
        let mut t = old.to_vec();
        t[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        let blob: Blob = t.into();
        let _g = self.l2_insert.lock();
        self.l2_seq.fetch_add(1, Ordering::AcqRel);
        self.tables.insert(self.l2_key(l2_off), blob.clone());
        Ok(blob)
    }

    /// Writes a whole new L2 table (before anything points to it) and caches it.
    fn write_new_l2(&self, l2_off: u64, table: Vec<u8>) -> Result<()> {
        self.file.write_all_at(&table, l2_off)?;
        let _g = self.l2_insert.lock();
        self.l2_seq.fetch_add(1, Ordering::AcqRel);
        self.tables.insert(self.l2_key(l2_off), table.into());
        Ok(())
    }

    /// (descriptor, bitmap) of entry `idx` of an L2 table.
    fn l2_entry(&self, l2: &[u8], idx: u64) -> (u64, u64) {
        let at = (idx * self.entry_size()) as usize;
        let bitmap = if self.ext() { be64(l2, at + 8) } else { 0 };
        (be64(l2, at), bitmap)
    }

    fn decode(&self, desc: u64) -> EntryKind {
        entry::decode(desc, self.h.cluster_bits, self.ext(), self.data_file.is_some())
    }

    /// Validates an entry (as the read path does) and says where guest `pos` lives.
    fn unit_at(&self, desc: u64, bitmap: u64, pos: u64) -> Result<Unit> {
        let path = self.file.path();
        let cs = self.cs();
        let kind = self.decode(desc);
        if let EntryKind::Compressed { off, len } = kind {
            ensure_corrupt!(self.data_file.is_none(), path, "L2 entry", pos, "compressed cluster with an external data file");
            return Ok(Unit::Compressed { off, len });
        }
        if let EntryKind::Normal { host, .. } | EntryKind::Zero { host } = kind {
            ensure_corrupt!(host % cs == 0, path, "L2 entry", pos, "host offset {host:#x} is not cluster-aligned");
            if self.data_file.is_some() && host != 0 {
                ensure_corrupt!(host == pos / cs * cs, path, "L2 entry", pos, "data file offset {host:#x} differs from the guest offset");
            }
        }
        if self.h.version == 2 && !self.ext() && desc & entry::ZERO != 0 {
            return Err(Error::corrupt(path, "L2 entry", pos, "zero flag in a version 2 image"));
        }
        if !self.ext() {
            return Ok(match kind {
                EntryKind::Normal { host, .. } => Unit::Data(host),
                EntryKind::Zero { .. } => Unit::Zero,
                _ => Unit::Unallocated,
            });
        }
        let sc = (pos % cs) / self.unit_size();
        let alloc = bitmap >> sc & 1 != 0;
        let zero = bitmap >> (32 + sc) & 1 != 0;
        let normal = matches!(kind, EntryKind::Normal { .. });
        ensure_corrupt!(!(normal && bitmap & (bitmap >> 32) != 0), path, "L2 bitmap", pos, "subclusters both allocated and zero");
        ensure_corrupt!(normal || bitmap & entry::ALL_ALLOC == 0, path, "L2 bitmap", pos, "allocated subclusters without a host cluster");
        Ok(match (kind, alloc, zero) {
            (_, _, true) => Unit::Zero,
            (EntryKind::Normal { host, .. }, true, _) => Unit::Data(host + sc * self.unit_size()),
            _ => Unit::Unallocated,
        })
    }

    /// The L2 table offset covering guest `pos` (0: none).
    fn l2_offset_of(&self, pos: u64) -> u64 {
        let l1i = (pos / self.l2_span()) as usize;
        self.l1.read().get(l1i).copied().unwrap_or(0) & OFFSET_MASK
    }

    fn failed_error(&self) -> Error {
        Error::new(Kind::Failed, format!("{}: an earlier write failed; refusing further writes", self.file.path().display()))
    }

    fn check_writable(&self) -> Result<()> {
        if self.meta.read().is_none() {
            return Err(Error::new(Kind::ReadOnly, format!("{}: opened read-only", self.file.path().display())));
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(self.failed_error());
        }
        Ok(())
    }

    /// Latches the failure state on a host or format error so later writes fail instead of
    /// half-applying. Caller mistakes (a bad range) do not latch.
    fn latch<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && !matches!(e.kind(), Kind::InvalidInput | Kind::ReadOnly)
        {
            log::error!("{}: write failed, the image now refuses writes: {e}", self.file.path().display());
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    fn has_backing(&self) -> bool {
        !matches!(self.parent, ParentRef::None)
    }
}

/// Refuses protocol and json: pseudo-paths (QEMU would open them; we never do).
fn check_path_name(image: &Path, field: &str, name: &str) -> Result<()> {
    let protocol = name.find([':', '/']).is_some_and(|i| name.as_bytes()[i] == b':');
    if protocol || name.contains('\0') {
        return Err(Error::unsupported(image, format!("{field} {name:?} is not a plain file path")));
    }
    Ok(())
}

impl Layer for Qcow2Image {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn path(&self) -> &Path {
        self.file.path()
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let span = self.l2_span();
        let limit = off.saturating_add(len).min((off / span + 1).saturating_mul(span));
        let l2_off = self.l2_offset_of(off);
        if l2_off == 0 {
            return Ok(Extent { len: limit - off, map: Mapping::Unallocated });
        }
        let l2 = self.l2_table(l2_off)?;
        let cs = self.cs();
        let us = self.unit_size();
        let unit = |pos: u64| -> Result<Unit> {
            let (d, b) = self.l2_entry(&l2, (pos / cs) % self.h.l2_entries());
            self.unit_at(d, b, pos)
        };
        let first = unit(off)?;
        let unit_end = |pos: u64| ((pos / us + 1) * us).min(limit);
        if let Unit::Compressed { off: host_off, len: stored_len } = first {
            let end = ((off / cs + 1) * cs).min(limit);
            let map = Mapping::Compressed {
                file: self.file.clone(),
                host_off,
                stored_len,
                codec: self.codec,
                cluster_len: cs,
                skip: off % cs,
            };
            return Ok(Extent { len: end - off, map });
        }
        let mut pos = unit_end(off);
        while pos < limit {
            let Ok(next) = unit(pos) else { break };
            let continues = match (first, next) {
                (Unit::Data(a), Unit::Data(b)) => b == a + (pos - off / us * us),
                (Unit::Zero, Unit::Zero) | (Unit::Unallocated, Unit::Unallocated) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            pos = unit_end(pos);
        }
        let map = match first {
            Unit::Data(h) => Mapping::Data { file: self.data_host().clone(), host_off: h + off % us },
            Unit::Zero => Mapping::Zero,
            _ => Mapping::Unallocated,
        };
        Ok(Extent { len: pos - off, map })
    }

    fn parent(&self) -> ParentRef {
        self.parent.clone()
    }

    fn files(&self) -> Vec<Arc<HostFile>> {
        let mut v = vec![self.file.clone()];
        v.extend(self.data_file.clone());
        v
    }

    fn details(&self) -> Vec<(String, String)> {
        vec![
            ("version".into(), self.h.version.to_string()),
            ("cluster size".into(), self.cs().to_string()),
            ("refcount bits".into(), (1u32 << self.h.refcount_order).to_string()),
            ("extended L2".into(), self.ext().to_string()),
        ]
    }

    fn writer(&self) -> Option<&dyn LayerWriter> {
        if self.meta.read().is_some() { Some(self as &dyn LayerWriter) } else { None }
    }
}

impl LayerWriter for Qcow2Image {
    fn write(&self, off: u64, data: &[u8], below: BelowReader<'_>) -> Result<()> {
        self.check_writable()?;
        let r = self.write_range(off, data, below);
        self.latch(r)
    }

    fn discard(&self, off: u64, len: u64, below: BelowReader<'_>) -> Result<()> {
        self.check_writable()?;
        let r = self.discard_range(off, len, below);
        self.latch(r)
    }

    fn flush(&self) -> Result<()> {
        self.check_writable()?;
        // Metadata is written through in dependency order; only durability is left.
        let r = self.file.sync_data().and_then(|_| match &self.data_file {
            Some(d) => d.sync_data(),
            None => Ok(()),
        });
        self.latch(r)
    }
}
