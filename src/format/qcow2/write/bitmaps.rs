//! QEMU persistent dirty bitmaps kept up to date while the image is written, as QEMU keeps
//! them: every enabled (auto) bitmap gets the bits of each written or discarded guest range.
//!
//! Crash safety rests on the IN_USE flag, as in QEMU: before the first guest write reaches
//! the file, every enabled bitmap is marked in use in its directory entry (a 4-byte write
//! in place, then fdatasync), so a crash leaves the bitmaps flagged inconsistent, never
//! silently incomplete. While the flag is set nobody trusts the bitmap's data, so a flush
//! writes the changed bitmap clusters in place (a cluster that read as zeros gets a new
//! cluster from the refcount allocator first). A clean close writes everything back, syncs,
//! and only then clears IN_USE (another in-place write and sync). Disabled bitmaps and
//! bitmaps already in use at mount are left exactly as they are.
//!
//! The bitmaps' clusters (directory, tables, data) join the writer's metadata set, so no
//! guest write can land on them; at load each must be distinct from every other metadata
//! cluster and, where it will be written, have refcount 1. A bitmap that fails any check
//! makes the whole extension unsupported: the caller then clears the autoclear bit and
//! QEMU drops the bitmaps, as before this module existed.

use super::Qcow2Writer;
use super::refcount::Refcounts;
use crate::error::{Error, Result};
use crate::format::qcow2::Qcow2Image;
use crate::format::qcow2::bitmap::{
    BitmapEntry, Bits, FLAG_IN_USE, TABLE_ALL_ONES, TABLE_OFFSET_MASK,
};
use parking_lot::{Mutex, MutexGuard};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Memory all tracked bitmaps and their tables may take (bits plus table entries).
const MEMORY_BUDGET: u64 = 256 << 20;

/// New bitmap clusters written but not yet in their tables: (bitmap, table index, host).
#[derive(Default)]
pub(super) struct Staged {
    links: Vec<(usize, u64, u64)>,
}

/// The bitmaps of an image being written.
pub(super) struct Tracker {
    tracked: Vec<Tracked>,
    /// Every consistent bitmap, for `changes/` (the tracked ones follow writes).
    shown: Vec<(String, Arc<Bits>)>,
    /// IN_USE is set, durably, on every tracked bitmap.
    in_use: AtomicBool,
    /// The tables as they are in the file; held while marking in use or clean.
    tables: Mutex<Vec<Vec<u64>>>,
    /// Held for a whole write-back (stage, sync, link): two at once would both fill a
    /// cluster that reads as zeros, and one of the two new clusters would leak.
    write_back: Mutex<()>,
}

/// One enabled bitmap.
struct Tracked {
    entry: BitmapEntry,
    bits: Arc<Bits>,
    /// Bits of the bitmap (its disk size over its granularity).
    count: u64,
    /// One bit per cluster of the serialized bitmap: changed since the last write-back.
    dirty: Box<[AtomicU64]>,
}

impl Tracked {
    /// Marks the serialized clusters holding the bits of guest [off, off+len) changed.
    fn mark_dirty(&self, off: u64, len: u64, cs: u64) {
        if len == 0 || self.count == 0 {
            return;
        }
        let g = self.entry.granularity_bits;
        let first = off >> g;
        if first >= self.count {
            return;
        }
        let last = ((off.saturating_add(len) - 1) >> g).min(self.count - 1);
        let bits_per_cluster = cs * 8;
        for c in first / bits_per_cluster..=last / bits_per_cluster {
            if let Some(w) = self.dirty.get((c / 64) as usize) {
                w.fetch_or(1 << (c % 64), Ordering::AcqRel);
            }
        }
    }

    /// The clusters changed since the last call (they count as clean from now on).
    fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.dirty.iter().enumerate() {
            let mut v = w.swap(0, Ordering::AcqRel);
            while v != 0 {
                out.push(i as u64 * 64 + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        }
        out
    }
}

impl Tracker {
    /// Loads the bitmaps of `img` and claims their clusters in `rc.metadata`. None when the
    /// image has no (valid-by-autoclear) bitmaps extension; an error when one cannot be kept
    /// up to date safely.
    pub(super) fn load(img: &Qcow2Image, rc: &mut Refcounts) -> Result<Option<Tracker>> {
        let Some(found) = img.bitmaps()? else {
            return Ok(None);
        };
        let cs = img.geometry.cluster_size();
        let claim = |rc: &mut Refcounts, off: u64, bytes: u64, what: &str, owned: bool| {
            claim_clusters(img, rc, off, bytes, what, owned)
        };
        claim(
            rc,
            found.ext.directory_offset,
            found.ext.directory_size,
            "bitmap directory",
            true,
        )?;
        let mut budget = 0u64;
        let mut tracked = Vec::new();
        let mut shown = Vec::new();
        let mut tables = Vec::new();
        for e in found.entries {
            if e.in_use() {
                log::info!(
                    "{}: bitmap {:?} is in use (not saved consistently); left as it is",
                    crate::storage::show_path(&img.path),
                    e.name
                );
                continue;
            }
            let table_bytes = u64::from(e.table_size) * 8;
            budget = budget
                .checked_add(table_bytes)
                .and_then(|b| b.checked_add(e.serialized_len(img.size)))
                .filter(|&b| b <= MEMORY_BUDGET)
                .ok_or_else(|| {
                    Error::unsupported(
                        &img.path,
                        format!(
                            "keeping dirty bitmaps up to date past {MEMORY_BUDGET} bytes of memory \
                             (bitmap {:?})",
                            e.name
                        ),
                    )
                })?;
            let table = img.bitmap_table(&e)?;
            let bits = Arc::new(img.bitmap_bits(&e, &table)?);
            let field = format!("bitmap {:?} table", e.name);
            claim(rc, e.table_offset, table_bytes, &field, e.auto())?;
            for (i, &t) in table.iter().enumerate() {
                let host = t & TABLE_OFFSET_MASK;
                if host != 0 {
                    let what = format!("bitmap {:?} data cluster {i}", e.name);
                    claim(rc, host, cs, &what, e.auto())?;
                }
            }
            shown.push((e.name.clone(), bits.clone()));
            if e.auto() {
                let clusters = table.len() as u64;
                tracked.push(Tracked {
                    count: img.size.div_ceil(e.granularity()),
                    dirty: (0..clusters.div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect(),
                    entry: e,
                    bits,
                });
                tables.push(table);
            }
        }
        Ok(Some(Tracker {
            tracked,
            shown,
            in_use: AtomicBool::new(false),
            tables: Mutex::new(tables),
            write_back: Mutex::new(()),
        }))
    }

    /// The consistent bitmaps by name; the enabled ones follow every write.
    pub(super) fn shown(&self) -> Vec<(String, Arc<Bits>)> {
        self.shown.clone()
    }
}

/// Adds the clusters of [off, off+bytes) to the metadata set: each must be in use, none may
/// be other metadata, and one we will write (`owned`) must have refcount exactly 1.
fn claim_clusters(
    img: &Qcow2Image,
    rc: &mut Refcounts,
    off: u64,
    bytes: u64,
    what: &str,
    owned: bool,
) -> Result<()> {
    let cs = img.geometry.cluster_size();
    let end = off
        .checked_add(bytes)
        .ok_or_else(|| Error::corrupt(&img.path, what, off, "its end overflows"))?;
    for c in off / cs..end.div_ceil(cs) {
        let at = c * cs;
        if rc.metadata.contains(&c) {
            return Err(Error::corrupt(
                &img.path,
                what,
                at,
                "the cluster is also other metadata",
            ));
        }
        let refs = rc.get(&img.file, c)?;
        if refs == 0 || (owned && refs != 1) {
            return Err(Error::corrupt(
                &img.path,
                what,
                at,
                format!("the cluster has refcount {refs}, a bitmap cluster has 1"),
            ));
        }
        rc.metadata.insert(c);
    }
    Ok(())
}

impl Qcow2Writer {
    /// The image's consistent dirty bitmaps by name (live: enabled ones follow writes).
    pub fn dirty_bitmaps(&self) -> Vec<(String, Arc<Bits>)> {
        self.bitmaps.as_ref().map_or_else(Vec::new, |t| t.shown())
    }

    /// The hook of every guest write and discard, before any of it reaches the file: marks
    /// the enabled bitmaps in use (once) and sets the bits of [off, off+len).
    pub(super) fn bitmaps_record(&self, off: u64, len: u64) -> Result<()> {
        let Some(t) = &self.bitmaps else {
            return Ok(());
        };
        if t.tracked.is_empty() {
            return Ok(());
        }
        if !t.in_use.load(Ordering::Acquire) {
            let _tables = t.tables.lock();
            if !t.in_use.load(Ordering::Acquire) {
                self.write_in_use_flags(t, true)?;
                t.in_use.store(true, Ordering::Release);
            }
        }
        let cs = self.cs();
        for b in &t.tracked {
            // Bits first, then the dirty mark: a write-back that takes the mark reads them.
            b.bits.mark(off, len);
            b.mark_dirty(off, len, cs);
        }
        Ok(())
    }

    /// Serializes write-backs (see `Tracker::write_back`); None without bitmaps.
    pub(super) fn bitmaps_write_back_lock(&self) -> Option<MutexGuard<'_, ()>> {
        self.bitmaps.as_ref().map(|t| t.write_back.lock())
    }

    /// First half of a flush's write-back (IN_USE stays set): writes every changed bitmap
    /// cluster in place, and those that read as zeros in the file into new clusters. The
    /// tables may point to the new clusters only once their refcounts are durable: the
    /// caller syncs, then calls `bitmaps_link`.
    pub(super) fn bitmaps_stage(&self) -> Result<Staged> {
        let Some(t) = &self.bitmaps else {
            return Ok(Staged::default());
        };
        if !t.in_use.load(Ordering::Acquire) {
            return Ok(Staged::default());
        }
        let tables = t.tables.lock();
        let cs = self.cs();
        let file = self.file();
        // Clusters that read as zeros in the file and now hold bits: (bitmap, index, bytes).
        let mut fresh = Vec::new();
        for (bi, b) in t.tracked.iter().enumerate() {
            for ci in b.take_dirty() {
                let Some(&entry) = tables[bi].get(ci as usize) else {
                    continue;
                };
                let host = entry & TABLE_OFFSET_MASK;
                if host == 0 && entry & TABLE_ALL_ONES != 0 {
                    continue; // all ones already: setting bits changes nothing
                }
                let bytes = b.bits.cluster_bytes(ci, cs);
                if host != 0 {
                    file.write_all_at(&bytes, host)?;
                } else if bytes.iter().any(|&x| x != 0) {
                    fresh.push((bi, ci, bytes));
                }
            }
        }
        drop(tables);
        let mut links = Vec::with_capacity(fresh.len());
        for (bi, ci, bytes) in fresh {
            let h = {
                let mut rc = self.meta.write();
                let h = self.alloc(&mut rc)?;
                rc.metadata.insert(h / cs);
                h
            };
            file.write_all_at(&bytes, h)?;
            links.push((bi, ci, h));
        }
        Ok(Staged { links })
    }

    /// Second half: points the tables to the clusters `bitmaps_stage` filled (after a sync).
    pub(super) fn bitmaps_link(&self, staged: Staged) -> Result<()> {
        let Some(t) = &self.bitmaps else {
            return Ok(());
        };
        let mut tables = t.tables.lock();
        for (bi, ci, h) in staged.links {
            let at = t.tracked[bi].entry.table_offset + ci * 8;
            self.file().write_all_at(&h.to_be_bytes(), at)?;
            tables[bi][ci as usize] = h;
        }
        Ok(())
    }

    /// After a last write-back and sync (the caller's): clears IN_USE, so QEMU trusts the
    /// bitmaps again. Only at a clean close, with no write in flight.
    pub(super) fn bitmaps_mark_clean(&self) -> Result<()> {
        let Some(t) = &self.bitmaps else {
            return Ok(());
        };
        let _tables = t.tables.lock();
        if !t.in_use.load(Ordering::Acquire) {
            return Ok(());
        }
        self.write_in_use_flags(t, false)?;
        t.in_use.store(false, Ordering::Release);
        Ok(())
    }

    /// Sets or clears IN_USE in the directory entry of every tracked bitmap, then syncs.
    fn write_in_use_flags(&self, t: &Tracker, in_use: bool) -> Result<()> {
        for b in &t.tracked {
            let flags = if in_use {
                b.entry.flags | FLAG_IN_USE
            } else {
                b.entry.flags & !FLAG_IN_USE
            };
            self.file()
                .write_all_at(&flags.to_be_bytes(), b.entry.flags_offset())?;
        }
        self.file().sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(disk: u64, gran: u8, cs: u64) -> Tracked {
        let count = disk.div_ceil(1 << gran);
        let clusters = count.div_ceil(8).div_ceil(cs);
        Tracked {
            entry: BitmapEntry {
                entry_offset: 0,
                table_offset: 0,
                table_size: clusters as u32,
                flags: 2,
                granularity_bits: gran,
                name: "t".into(),
            },
            bits: Arc::new(Bits::new(disk, gran)),
            count,
            dirty: (0..clusters.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    #[test]
    fn dirty_clusters_follow_the_bits_they_hold() {
        // 512-byte clusters hold 4096 bits: at 512-byte granularity, 2 MiB of disk each.
        let t = tracked(300 << 20, 9, 512);
        t.mark_dirty(0, 1, 512);
        t.mark_dirty((2 << 20) - 1, 2, 512); // straddles clusters 0 and 1
        t.mark_dirty(200 << 20, 5 << 20, 512); // clusters 100..=102
        t.mark_dirty(1 << 40, 1 << 20, 512); // past the disk: nothing
        t.mark_dirty(7 << 20, 0, 512); // empty: nothing
        assert_eq!(t.take_dirty(), vec![0, 1, 100, 101, 102]);
        assert!(t.take_dirty().is_empty());
        // The last bit of the disk.
        t.mark_dirty((300 << 20) - 1, 1 << 30, 512);
        assert_eq!(t.take_dirty(), vec![149]);
    }
}
