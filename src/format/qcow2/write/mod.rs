//! In-place writing of a qcow2 top layer, as QEMU writes it (v2 and v3, any refcount width,
//! extended L2, external data files), safe against a power cut: metadata changes stay in
//! memory (the write-back cache of `meta/`) and are written back in dependency order with
//! syncs between (`flush.rs`), so whatever a crash leaves is a valid image (leaks allowed,
//! never a reference to a cluster whose refcount is 0, never an entry over stale data).
//! Guest data goes to the file at once; a new cluster is pointed to only after a sync.
//!
//! Locking: `meta` is a read-write lock. Data writes into clusters this image owns alone
//! (COPIED) take it shared, so they run in parallel; anything that allocates or changes
//! metadata takes it exclusively, but copy-on-write drops it for its data I/O: the guest
//! cluster is claimed in `inflight` instead, so no one else changes its entry meanwhile.
//! Reads go through the read driver (`map.rs`) with the writer's current L1; the L2 tables
//! both use are in `tables.rs`.

mod bitmaps;
mod cow;
pub mod create;
mod discard;
pub mod entry;
mod flush;
mod inflight;
pub mod meta;
mod refcount;
mod snapshot_ops;

pub use flush::start_background_flush;
pub use snapshot_ops::MadeSnapshot;

use super::Qcow2Image;
use super::header::{AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, Compression};
use super::tables::{L2Ref, TAG_L2, l2_table};
use crate::cache::Key;
use crate::endian::be64;
use crate::ensure_corrupt;
use crate::error::{Error, Kind, Result};
use crate::format::{Codec, ParentRef};
use crate::storage::HostFile;
use crate::write::{BelowReader, LayerWriter};
use entry::{Kind as EntryKind, OFFSET_MASK};
use inflight::InFlight;
use parking_lot::RwLock;
use refcount::Refcounts;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Qcow2Writer {
    img: Arc<Qcow2Image>,
    /// The active L1 table; replaced as a whole when an entry changes (rare: new L2 tables).
    l1: RwLock<Arc<[u64]>>,
    /// Refcounts and allocation.
    meta: RwLock<Refcounts>,
    /// Guest clusters whose entry a writer is changing (copy-on-write data I/O runs unlocked).
    inflight: InFlight,
    failed: AtomicBool,
    /// Held shared by every write and discard for its whole request, exclusively by snapshot
    /// changes: a request is then wholly before or wholly after a snapshot.
    gate: RwLock<()>,
    /// The snapshot table as it is in the file now (snapshot_ops.rs changes it).
    snaps: parking_lot::Mutex<snapshot_ops::SnapTable>,
    /// Wakes the background flusher.
    kick: Arc<flush::Kick>,
    /// QEMU dirty bitmaps kept up to date (bitmaps.rs); None when the image has none or
    /// they cannot be kept (the autoclear bit is then cleared).
    bitmaps: Option<bitmaps::Tracker>,
}

impl fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("path", &self.img.path)
            .finish()
    }
}

impl Qcow2Writer {
    /// Prepares `img` for in-place writes. None (with a warning saying why) when the image
    /// must stay read-only: opened read-only (marked corrupt), dirty (lazy refcounts: the
    /// refcounts cannot be trusted until repaired), or an unreadable snapshot table.
    pub fn new(img: &Arc<Qcow2Image>) -> Result<Option<Qcow2Writer>> {
        let h = &img.header;
        let path = &img.path;
        let why = if !img.file.writable() {
            Some("it is opened read-only (marked corrupt?)".to_string())
        } else if h.dirty() {
            Some("it is dirty (lazy refcounts); repair it with qemu-img check -r all".to_string())
        } else {
            img.snapshot_error
                .as_ref()
                .map(|e| format!("its snapshot table is unreadable ({e})"))
        };
        if let Some(why) = why {
            log::warn!("{}: not writable: {why}", path.display());
            return Ok(None);
        }
        let file = &img.file;
        let mut rc = Refcounts::new(
            file,
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
        )?;
        let cs = h.cluster_size();
        // Metadata clusters: never handed out, never written as data (QEMU's overlap check).
        let mut table =
            |off: u64, bytes: u64| rc.metadata.extend((off / cs)..(off + bytes).div_ceil(cs));
        table(h.l1_table_offset, u64::from(h.l1_size) * 8);
        let snap_table_len = super::snapshot::table_len(&img.snapshots, h.snapshots_offset);
        table(h.snapshots_offset, snap_table_len);
        for s in &img.snapshots {
            table(s.l1_table_offset, u64::from(s.l1_size) * 8);
        }
        rc.snapshot_l2 = snapshot_l2_tables(img)?;
        rc.metadata.extend(rc.snapshot_l2.iter().copied());
        for (i, &e) in img.l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            ensure_corrupt!(
                off.is_multiple_of(cs),
                path,
                "L1 entry",
                h.l1_table_offset + i as u64 * 8,
                "L2 offset {off:#x} is not cluster-aligned"
            );
            if off != 0 {
                rc.metadata.insert(off / cs);
            }
        }
        let bitmaps = match bitmaps::Tracker::load(img, &mut rc) {
            Ok(t) => t,
            Err(e) => {
                log::warn!(
                    "{e}; the image's dirty bitmaps cannot be kept up to date: writing clears \
                     the bitmaps autoclear bit, so QEMU drops them"
                );
                None
            }
        };
        let w = Qcow2Writer {
            bitmaps,
            img: img.clone(),
            l1: RwLock::new(img.l1.clone()),
            meta: RwLock::new(rc),
            inflight: InFlight::default(),
            failed: AtomicBool::new(false),
            gate: RwLock::new(()),
            snaps: parking_lot::Mutex::new(snapshot_ops::SnapTable {
                entries: img.snapshots.clone(),
                offset: h.snapshots_offset,
                len: snap_table_len,
            }),
            kick: Arc::default(),
        };
        w.clear_unknown_autoclear()?;
        Ok(Some(w))
    }

    /// The current active L1 table (for the read path).
    pub fn l1(&self) -> Arc<[u64]> {
        self.l1.read().clone()
    }

    fn file(&self) -> &Arc<HostFile> {
        &self.img.file
    }

    fn cs(&self) -> u64 {
        self.img.geometry.cluster_size()
    }

    fn ext(&self) -> bool {
        self.img.geometry.extended_l2
    }

    fn version(&self) -> u32 {
        self.img.header.version
    }

    fn size(&self) -> u64 {
        self.img.size
    }

    /// Bytes one unit covers (subcluster or cluster).
    fn unit_size(&self) -> u64 {
        if self.ext() {
            self.cs() / entry::SUBCLUSTERS
        } else {
            self.cs()
        }
    }

    fn entry_size(&self) -> u64 {
        self.img.geometry.entry_len()
    }

    fn l2_entries(&self) -> u64 {
        1 << self.img.geometry.l2_bits()
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        1 << self.img.geometry.l1_span_bits()
    }

    fn codec(&self) -> Codec {
        match self.img.header.compression {
            Compression::Zlib => Codec::Deflate,
            Compression::Zstd => Codec::Zstd,
        }
    }

    fn has_data_file(&self) -> bool {
        self.img.data_file.is_some()
    }

    fn data_host(&self) -> &Arc<HostFile> {
        self.img.data_file()
    }

    /// With `data_file_raw` the data file must read as the guest disk on its own.
    fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.img.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    fn has_backing(&self) -> bool {
        !matches!(self.img.parent, ParentRef::None)
    }

    /// Autoclear bits we do not maintain must be cleared before we write (the bitmaps bit
    /// stays when bitmaps.rs keeps them).
    fn clear_unknown_autoclear(&self) -> Result<()> {
        let h = &self.img.header;
        let kept = if self.bitmaps.is_some() {
            AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS
        } else {
            AUTOCLEAR_DATA_FILE_RAW
        };
        let keep = h.autoclear_features & kept;
        if h.version == 3 && h.autoclear_features != keep {
            self.file().write_all_at(&keep.to_be_bytes(), 88)?;
        }
        Ok(())
    }

    fn l2_key(&self, off: u64) -> Key {
        Key::new(self.file().id(), off, TAG_L2)
    }

    /// The L2 table at `off`: live, or through the shared table cache.
    fn l2_table(&self, off: u64) -> Result<L2Ref> {
        let cs = self.cs();
        ensure_corrupt!(
            off.is_multiple_of(cs),
            &self.img.path,
            "L1 entry",
            off,
            "L2 table offset is not cluster-aligned"
        );
        l2_table(&self.img, off)
    }

    /// Stores `bytes` at `at` inside the L2 table at `l2_off` (whose contents are `current`)
    /// where readers see it; the flush writes it to the file.
    fn write_l2(
        &self,
        rc: &mut Refcounts,
        l2_off: u64,
        current: &L2Ref,
        at: u64,
        bytes: &[u8],
    ) -> Result<()> {
        self.img
            .l2_sync
            .update(&self.img.tables, self.l2_key(l2_off), current, at, bytes);
        if rc.dirty.l2(l2_off, at, bytes.len() as u64) {
            self.img.l2_sync.pin(l2_off);
        }
        Ok(())
    }

    /// Publishes a whole new L2 table (nothing points to it yet); the flush writes it.
    fn write_new_l2(&self, rc: &mut Refcounts, l2_off: u64, table: Vec<u8>) -> Result<()> {
        self.img
            .l2_sync
            .replace(&self.img.tables, self.l2_key(l2_off), &table);
        rc.dirty.new_l2(l2_off);
        self.img.l2_sync.pin(l2_off);
        Ok(())
    }

    /// (descriptor, bitmap) of entry `idx` of an L2 table.
    fn l2_entry(&self, l2: &L2Ref, idx: u64) -> (u64, u64) {
        let at = (idx * self.entry_size()) as usize;
        let bitmap = if self.ext() { l2.word(at + 8) } else { 0 };
        (l2.word(at), bitmap)
    }

    fn decode(&self, desc: u64) -> EntryKind {
        entry::decode(
            desc,
            self.img.geometry.cluster_bits,
            self.ext(),
            self.has_data_file(),
        )
    }

    /// Validates the entry of the cluster holding guest `pos` as the read driver does.
    fn validate(&self, desc: u64, bitmap: u64, pos: u64, entry_off: u64) -> Result<()> {
        let g = &self.img.geometry;
        let cs = self.cs();
        let sub = ((pos % cs) / self.unit_size()) as u32;
        super::entry::decode(g, desc, bitmap, sub, pos / cs * cs)
            .map(|_| ())
            .map_err(|w| Error::corrupt(&self.img.path, "L2 entry", entry_off, w))
    }

    /// The L2 table offset covering guest `pos` (0: none).
    fn l2_offset_of(&self, pos: u64) -> u64 {
        let l1i = (pos / self.l2_span()) as usize;
        self.l1.read().get(l1i).copied().unwrap_or(0) & OFFSET_MASK
    }

    /// Replaces L1 entry `i` in memory; the flush writes it.
    fn set_l1(&self, rc: &mut Refcounts, i: usize, e: u64) {
        let mut l1 = self.l1.write();
        let mut v = l1.to_vec();
        v[i] = e;
        *l1 = v.into();
        rc.dirty.l1(self.img.header.l1_table_offset, i as u64);
    }

    fn failed_error(&self) -> Error {
        Error::new(
            Kind::Failed,
            format!(
                "{}: an earlier write failed; {}",
                self.img.path.display(),
                crate::error::LATCHED_HINT
            ),
        )
    }

    fn check_writable(&self) -> Result<()> {
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
            log::error!(
                "{}: write failed, the image now refuses writes: {e}; {}",
                self.img.path.display(),
                crate::error::LATCHED_HINT
            );
            self.failed.store(true, Ordering::Release);
        }
        r
    }
}

/// The L2 tables the snapshots' L1 tables point to (cluster indices). The L1 tables are read
/// once at open, within a budget; a crafted image beyond it is refused for writing.
fn snapshot_l2_tables(img: &Qcow2Image) -> Result<HashSet<u64>> {
    const BUDGET: u64 = 64 << 20;
    let cs = img.geometry.cluster_size();
    let mut seen = HashSet::new();
    let mut set = HashSet::new();
    let mut bytes = 0u64;
    for s in &img.snapshots {
        if !seen.insert((s.l1_table_offset, s.l1_size)) {
            continue;
        }
        let len = u64::from(s.l1_size) * 8;
        bytes += len;
        if bytes > BUDGET {
            return Err(Error::unsupported(
                &img.path,
                format!("writing with snapshot L1 tables over {BUDGET} bytes in total"),
            ));
        }
        let field = format!("snapshot {:?} L1 table", s.name);
        let raw = img
            .file
            .read_table(s.l1_table_offset, len, super::MAX_L1_BYTES, &field)?;
        for e in raw.chunks_exact(8).map(|c| be64(c, 0) & OFFSET_MASK) {
            if e != 0 {
                set.insert(e / cs);
            }
        }
    }
    Ok(set)
}

impl LayerWriter for Qcow2Writer {
    fn write(&self, off: u64, data: &[u8], below: BelowReader<'_>) -> Result<()> {
        self.check_writable()?;
        let _gate = self.gate.read();
        let r = self
            .bitmaps_record(off, data.len() as u64)
            .and_then(|_| self.write_range(off, data, below));
        self.kick_if_over_limit();
        self.latch(r)
    }

    fn discard(&self, off: u64, len: u64, below: BelowReader<'_>) -> Result<()> {
        self.check_writable()?;
        let _gate = self.gate.read();
        let r = self
            .bitmaps_record(off, len)
            .and_then(|_| self.discard_range(off, len, below));
        self.kick_if_over_limit();
        self.latch(r)
    }

    fn flush(&self) -> Result<()> {
        self.check_writable()?;
        let r = self.flush_with_bitmaps();
        self.latch(r)
    }

    fn close(&self) -> Result<()> {
        self.check_writable()?;
        // No write in flight, none starting: the bitmaps written back are complete.
        let _gate = self.gate.write();
        let r = self
            .flush_with_bitmaps()
            .and_then(|_| self.sync_files())
            .and_then(|_| self.bitmaps_mark_clean());
        self.latch(r)
    }
}

impl Qcow2Writer {
    /// A flush, with the dirty bitmaps' changed clusters written back around its sync.
    fn flush_with_bitmaps(&self) -> Result<()> {
        let _serial = self.bitmaps_write_back_lock();
        let staged = self.bitmaps_stage()?;
        // The metadata cache written back (its syncs cover the staged clusters too).
        self.flush_all()?;
        self.bitmaps_link(staged)
    }

    /// Makes what was written durable (the metadata cache is written back already).
    fn sync_files(&self) -> Result<()> {
        self.file()
            .sync_data()
            .and_then(|_| match &self.img.data_file {
                Some(d) => d.sync_data(),
                None => Ok(()),
            })
    }
}
