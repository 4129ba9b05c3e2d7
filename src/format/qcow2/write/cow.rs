//! Guest writes: in place into clusters (subclusters) this image owns alone (shared lock, no
//! metadata), otherwise copy-on-write: the target cluster is allocated under the exclusive
//! lock, its data (with the untouched part copied from what the view showed) is written
//! without it (the guest cluster is claimed), then the L2 entry is changed under the lock
//! again and the reference it dropped is released. The metadata cache writes the refcount
//! and the data's sync before the entry, and the release only after it (see `meta/`).

use super::Qcow2Writer;
use super::entry::{self, ALL_ALLOC, COPIED, Kind as EntryKind, OFFSET_MASK};
use super::refcount::Refcounts;
use crate::error::{Error, Result};
use crate::format::compress;
use crate::write::BelowReader;
use std::cell::RefCell;

/// The largest stored compressed cluster we accept (cluster size plus slack).
const MAX_COMPRESSED_SLACK: u64 = 4096;

thread_local! {
    /// The cluster buffer of copy-on-write, one per thread.
    static COW_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Qcow2Writer {
    pub(super) fn write_range(&self, off: u64, data: &[u8], below: BelowReader<'_>) -> Result<()> {
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "write {off:#x}+{} is past the end of the disk",
                    data.len()
                ))
            })?;
        let cs = self.cs();
        let mut pos = off;
        while pos < end {
            let done = self.write_in_place(pos, &data[(pos - off) as usize..])?;
            pos += done;
            if pos < end {
                let cend = ((pos / cs + 1) * cs).min(end);
                self.write_cluster(
                    pos,
                    &data[(pos - off) as usize..(cend - off) as usize],
                    below,
                )?;
                pos = cend;
            }
        }
        Ok(())
    }

    /// Writes the longest prefix of `data` whose clusters (subclusters) are allocated and
    /// owned by this image alone, merging host-contiguous clusters into one pwrite.
    /// Returns the bytes written (0: the first cluster needs copy-on-write).
    fn write_in_place(&self, off: u64, data: &[u8]) -> Result<u64> {
        let guard = self.meta.read();
        let rc = &*guard;
        let cs = self.cs();
        let end = off + data.len() as u64;
        let mut pos = off;
        // (host offset, guest offset) of the pending run; its length is pos - guest.
        let mut run: Option<(u64, u64)> = None;
        while pos < end {
            let cend = ((pos / cs + 1) * cs).min(end);
            let Some(host) = self.owned_host(rc, pos, cend)? else {
                break;
            };
            if let Some((h0, g0)) = run
                && h0 + (pos - g0) != host + pos % cs
            {
                self.write_data(h0, &data[(g0 - off) as usize..(pos - off) as usize])?;
                run = None;
            }
            run.get_or_insert((host + pos % cs, pos));
            pos = cend;
        }
        if let Some((h0, g0)) = run {
            self.write_data(h0, &data[(g0 - off) as usize..(pos - off) as usize])?;
        }
        Ok(pos - off)
    }

    /// The host cluster of [pos, cend) if it can be written in place.
    fn owned_host(&self, rc: &Refcounts, pos: u64, cend: u64) -> Result<Option<u64>> {
        let cs = self.cs();
        let l1e = self
            .l1
            .read()
            .get((pos / self.l2_span()) as usize)
            .copied()
            .unwrap_or(0);
        if l1e & OFFSET_MASK == 0 || l1e & COPIED == 0 {
            return Ok(None);
        }
        if rc.snapshot_l2.contains(&((l1e & OFFSET_MASK) / cs)) {
            return Ok(None);
        }
        let l2 = self.l2_table(l1e & OFFSET_MASK)?;
        let (desc, bitmap) = self.l2_entry(&l2, (pos / cs) % self.l2_entries());
        let EntryKind::Normal { host, copied } = self.decode(desc) else {
            return Ok(None);
        };
        if !(copied || self.has_data_file()) || host % cs != 0 {
            return Ok(None);
        }
        if self.has_data_file() && host != pos / cs * cs {
            return Ok(None); // the slow path reports it
        }
        if !self.has_data_file() && rc.metadata.contains(&(host / cs)) {
            return Ok(None); // the slow path reports it
        }
        if self.ext() {
            let mask = self.sub_mask(pos % cs, (cend - 1) % cs + 1);
            if bitmap & mask != mask || (bitmap >> 32) & mask != 0 {
                return Ok(None);
            }
        }
        Ok(Some(host))
    }

    /// Subcluster bits touched by cluster-relative bytes [a, b).
    pub(super) fn sub_mask(&self, a: u64, b: u64) -> u64 {
        let us = self.unit_size();
        let (first, last) = (a / us, (b - 1) / us);
        (ALL_ALLOC >> (31 - (last - first))) << first
    }

    /// Writes guest data at a host offset of the data file (clipped to the disk size there,
    /// so a raw data file keeps the guest's size).
    pub(super) fn write_data(&self, host: u64, buf: &[u8]) -> Result<()> {
        let f = self.data_host();
        let n = if self.has_data_file() {
            (buf.len() as u64).min(self.size().saturating_sub(host)) as usize
        } else {
            buf.len()
        };
        f.write_all_at(&buf[..n], host)
    }

    pub(super) fn alloc(&self, rc: &mut Refcounts) -> Result<u64> {
        Ok(rc.alloc(self.file())? * self.cs())
    }

    /// Drops the references an L2 entry held, once the entry no longer holding them is
    /// durable (the flush applies them and gives freed space back to the host).
    pub(super) fn drop_refs(&self, rc: &mut Refcounts, kind: EntryKind) -> Result<()> {
        if self.has_data_file() {
            return Ok(());
        }
        let cs = self.cs();
        let clusters = match kind {
            EntryKind::Normal { host, .. } | EntryKind::Zero { host } if host != 0 => {
                host / cs..=host / cs
            }
            EntryKind::Compressed { off, len } => entry::compressed_clusters(off, len, cs),
            _ => return Ok(()),
        };
        for c in clusters {
            rc.release(c);
        }
        Ok(())
    }

    /// The L2 table covering `pos`, owned by this image alone: allocated when missing,
    /// copied when shared with a snapshot. Returns its offset.
    pub(super) fn writable_l2(&self, rc: &mut Refcounts, pos: u64) -> Result<u64> {
        let cs = self.cs();
        let l1i = pos / self.l2_span();
        let at = self.img.header.l1_table_offset + l1i * 8;
        let e = self.l1.read().get(l1i as usize).copied().ok_or_else(|| {
            Error::corrupt(
                &self.img.path,
                "L1 table",
                at,
                "too small for the disk size",
            )
        })?;
        let old = e & OFFSET_MASK;
        if old != 0 && e & COPIED != 0 && !rc.snapshot_l2.contains(&(old / cs)) {
            return Ok(old);
        }
        let table = if old == 0 {
            vec![0u8; cs as usize]
        } else {
            self.l2_table(old)?.to_bytes()
        };
        let new = self.alloc(rc)?;
        self.write_new_l2(rc, new, table)?;
        rc.metadata.insert(new / cs);
        self.set_l1(rc, l1i as usize, new | COPIED);
        if old != 0 {
            rc.release(old / cs);
        }
        Ok(new)
    }

    /// Fills `buf` with the current contents of the cluster at guest `g` as `kind` says.
    fn read_cluster(
        &self,
        kind: EntryKind,
        g: u64,
        buf: &mut [u8],
        below: BelowReader<'_>,
    ) -> Result<()> {
        match kind {
            EntryKind::Unallocated => below(g, buf),
            EntryKind::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            EntryKind::Normal { host, .. } => self.data_host().read_data_at(buf, host),
            EntryKind::Compressed { off, len } => {
                let path = &self.img.path;
                if len > self.cs() + MAX_COMPRESSED_SLACK {
                    return Err(Error::corrupt(
                        path,
                        "compressed cluster",
                        off,
                        format!("absurd stored size {len}"),
                    ));
                }
                let mut raw = vec![0u8; len as usize];
                self.file().read_data_at(&mut raw, off)?;
                let c = compress::decompress(self.codec(), &raw, buf.len(), path, off)?;
                buf.copy_from_slice(&c);
                Ok(())
            }
        }
    }

    /// Writes `data` at guest `pos`, all inside one cluster, allocating or copying as needed.
    /// The guest cluster is claimed for the whole call; the metadata lock is held only to
    /// allocate and, after the data I/O, to publish the entry.
    fn write_cluster(&self, pos: u64, data: &[u8], below: BelowReader<'_>) -> Result<()> {
        let cs = self.cs();
        let g = pos / cs * cs;
        let a = pos - g;
        let _claim = self.inflight.claim(g);
        let step = {
            let mut guard = self.meta.write();
            let rc = &mut *guard;
            let l2_off = self.writable_l2(rc, pos)?;
            let l2 = self.l2_table(l2_off)?;
            let idx = (pos / cs) % self.l2_entries();
            let (desc, bitmap) = self.l2_entry(&l2, idx);
            self.validate(desc, bitmap, pos, l2_off + idx * self.entry_size())?;
            let kind = self.decode(desc);
            if let EntryKind::Normal { host, .. } = kind
                && !self.has_data_file()
                && rc.metadata.contains(&(host / cs))
            {
                return Err(Error::corrupt(
                    &self.img.path,
                    "L2 entry",
                    l2_off + idx * self.entry_size(),
                    format!("data cluster {host:#x} overlaps metadata"),
                ));
            }
            if self.ext() && !matches!(kind, EntryKind::Compressed { .. }) {
                let (target, old) = match kind {
                    EntryKind::Normal { host, copied } if copied || self.has_data_file() => {
                        (host, Some(host))
                    }
                    EntryKind::Normal { host, .. } => (self.alloc(rc)?, Some(host)),
                    _ if self.has_data_file() => (g, None),
                    _ => (self.alloc(rc)?, None),
                };
                Step::Subclusters(Sub {
                    desc,
                    bitmap,
                    target,
                    old,
                })
            } else {
                let owned =
                    matches!(kind, EntryKind::Normal { copied: true, .. }) || self.has_data_file();
                let target = match kind {
                    EntryKind::Normal { host, .. } if owned => host,
                    _ if self.has_data_file() => g,
                    _ => self.alloc(rc)?,
                };
                Step::Cluster(
                    kind,
                    desc,
                    target,
                    owned && matches!(kind, EntryKind::Normal { .. }),
                )
            }
        };
        let (kind, desc, target, in_place) = match step {
            Step::Subclusters(sub) => return self.write_subclusters(pos, data, sub, below),
            Step::Cluster(kind, desc, target, in_place) => (kind, desc, target, in_place),
        };
        if in_place {
            // Owned already (e.g. another writer of this cluster published it while we
            // waited for the claim): the claim keeps the entry as it is.
            return self.write_data(target + a, data);
        }
        self.fill_cluster(kind, g, target, a, data, below)?;
        let mut guard = self.meta.write();
        let rc = &mut *guard;
        let l2_off = self.writable_l2(rc, pos)?;
        let l2 = self.l2_table(l2_off)?;
        let idx = (pos / cs) % self.l2_entries();
        if self.l2_entry(&l2, idx).0 != desc {
            return Err(Error::invalid(
                "internal: an L2 entry changed while its cluster was claimed",
            ));
        }
        let mut e = (target | COPIED).to_be_bytes().to_vec();
        if self.ext() {
            e.extend_from_slice(&ALL_ALLOC.to_be_bytes());
        }
        self.write_l2(rc, l2_off, &l2, idx * self.entry_size(), &e)?;
        self.drop_refs(rc, kind)
    }

    /// Writes the new cluster `target`: `data` at `a`, the rest as `kind` shows guest `g`.
    /// Runs without the metadata lock: `target` is referenced by nothing yet.
    fn fill_cluster(
        &self,
        kind: EntryKind,
        g: u64,
        target: u64,
        a: u64,
        data: &[u8],
        below: BelowReader<'_>,
    ) -> Result<()> {
        let cs = self.cs();
        // Space past the end of the file reads as zeros: a fresh cluster over zeros needs
        // only the new bytes.
        let zeros_below = matches!(kind, EntryKind::Zero { .. })
            || (kind == EntryKind::Unallocated && !self.has_backing());
        if zeros_below && target >= self.data_host().len() {
            return self.write_data(target + a, data);
        }
        if data.len() as u64 == cs {
            return self.write_data(target, data);
        }
        COW_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            // Reused per thread: every byte is overwritten below, so no zeroing per write.
            buf.resize(cs as usize, 0);
            self.read_cluster(kind, g, &mut buf, below)?;
            buf[a as usize..a as usize + data.len()].copy_from_slice(data);
            self.write_data(target, &buf)
        })
    }

    /// Extended L2: writes only the touched subclusters; the others keep their state (and
    /// their data, copied when the cluster moves). The data I/O runs without the metadata
    /// lock, like `fill_cluster` (the guest cluster is claimed).
    fn write_subclusters(
        &self,
        pos: u64,
        data: &[u8],
        sub: Sub,
        below: BelowReader<'_>,
    ) -> Result<()> {
        let Sub {
            desc,
            bitmap,
            target,
            old,
        } = sub;
        let cs = self.cs();
        let us = self.unit_size();
        let g = pos / cs * cs;
        let (a, b) = (pos - g, pos - g + data.len() as u64);
        let kind = self.decode(desc);
        let (first, last) = (a / us, (b - 1) / us);
        let span_start = first * us;
        let mut buf = vec![0u8; ((last + 1 - first) * us) as usize];
        for sc in first..=last {
            let (s0, s1) = (sc * us, (sc + 1) * us);
            if a <= s0 && s1 <= b {
                continue;
            }
            let dst = &mut buf[(s0 - span_start) as usize..(s1 - span_start) as usize];
            if bitmap >> (32 + sc) & 1 != 0 {
                dst.fill(0);
            } else if bitmap >> sc & 1 != 0 {
                let host = old
                    .ok_or_else(|| Error::invalid("internal: allocated subcluster without host"))?;
                self.data_host().read_data_at(dst, host + s0)?;
            } else {
                below(g + s0, dst)?;
            }
        }
        buf[(a - span_start) as usize..(b - span_start) as usize].copy_from_slice(data);
        self.write_data(target + span_start, &buf)?;
        let touched = self.sub_mask(a, b);
        if let Some(host) = old
            && host != target
        {
            // Copy the untouched allocated subclusters, run by run.
            let keep = bitmap & ALL_ALLOC & !touched;
            let mut sc = 0;
            while sc < 32 {
                if keep >> sc & 1 == 0 {
                    sc += 1;
                    continue;
                }
                let start = sc;
                while sc < 32 && keep >> sc & 1 != 0 {
                    sc += 1;
                }
                let mut tmp = vec![0u8; ((sc - start) * us) as usize];
                self.data_host().read_data_at(&mut tmp, host + start * us)?;
                self.write_data(target + start * us, &tmp)?;
            }
        }
        let new_bitmap = (bitmap | touched) & !(touched << 32);
        if target == old.unwrap_or(u64::MAX) && new_bitmap == bitmap && desc & COPIED != 0 {
            return Ok(());
        }
        let mut guard = self.meta.write();
        let rc = &mut *guard;
        let l2_off = self.writable_l2(rc, pos)?;
        let l2 = self.l2_table(l2_off)?;
        let idx = (pos / cs) % self.l2_entries();
        if self.l2_entry(&l2, idx) != (desc, bitmap) {
            return Err(Error::invalid(
                "internal: an L2 entry changed while its cluster was claimed",
            ));
        }
        let mut e = (target | COPIED).to_be_bytes().to_vec();
        e.extend_from_slice(&new_bitmap.to_be_bytes());
        self.write_l2(rc, l2_off, &l2, idx * 16, &e)?;
        if old.is_some_and(|h| h != target) {
            self.drop_refs(rc, kind)?;
        }
        Ok(())
    }
}

/// What `write_cluster` decided under the metadata lock.
enum Step {
    /// (entry kind, descriptor, target host cluster, whether it is written in place)
    Cluster(EntryKind, u64, u64, bool),
    Subclusters(Sub),
}

/// An extended-L2 write: the entry as it was, where the data goes, the host it had.
struct Sub {
    desc: u64,
    bitmap: u64,
    target: u64,
    old: Option<u64>,
}
