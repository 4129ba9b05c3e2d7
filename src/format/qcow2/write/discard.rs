//! Discard: make a guest range read as zeros, freeing what it can. Whole clusters get the
//! zero flag (v3) or the zero bits of every subcluster (extended L2); the host cluster they
//! held is released only after the L2 entry stopped pointing at it. Version 2 has no zero
//! flag: a cluster over a backing file gets zeros written (allocating), one without a
//! backing file is simply unallocated. Partial (sub)clusters are written with zeros.

use super::Qcow2Writer;
use super::entry::{ALL_ALLOC, ALL_ZERO, Kind as EntryKind, ZERO};
use crate::error::{Error, Result};
use crate::write::BelowReader;

const ZERO_CHUNK: usize = 1 << 20;

impl Qcow2Writer {
    pub(super) fn discard_range(&self, off: u64, len: u64, below: BelowReader<'_>) -> Result<()> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "discard {off:#x}+{len} is past the end of the disk"
                ))
            })?;
        let cs = self.cs();
        let us = self.unit_size();
        let mut pos = off;
        while pos < end {
            let g = pos / cs * cs;
            let cend = (g + cs).min(end);
            // Bytes past the disk size are invisible: a cut there counts as the cluster end.
            let to_end = if cend == self.size() { g + cs } else { cend };
            if pos == g && to_end == g + cs {
                self.discard_cluster(g, below)?;
            } else if self.ext() {
                let s0 = (pos - g).div_ceil(us);
                let s1 = (to_end - g) / us;
                if s0 < s1 {
                    self.write_zeros(pos, g + s0 * us, below)?;
                    self.discard_subclusters(g, s0, s1, below)?;
                    self.write_zeros(g + s1 * us, cend, below)?;
                } else {
                    self.write_zeros(pos, cend, below)?;
                }
            } else {
                self.write_zeros(pos, cend, below)?;
            }
            pos = cend;
        }
        Ok(())
    }

    fn write_zeros(&self, from: u64, to: u64, below: BelowReader<'_>) -> Result<()> {
        let zeros = vec![0u8; ((to.saturating_sub(from)) as usize).min(ZERO_CHUNK)];
        let mut pos = from;
        while pos < to {
            let n = ((to - pos) as usize).min(ZERO_CHUNK);
            self.write_range(pos, &zeros[..n], below)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// With a raw external data file, the data file itself must read zeros too.
    fn zero_raw_data_file(&self, g: u64, a: u64, b: u64) -> Result<()> {
        if self.data_file_raw() && a < b {
            self.write_data(g + a, &vec![0u8; (b - a) as usize])?;
        }
        Ok(())
    }

    fn discard_cluster(&self, g: u64, below: BelowReader<'_>) -> Result<()> {
        let cs = self.cs();
        let claim = self.inflight.claim(g);
        let mut guard = self.meta.write();
        let rc = &mut *guard;
        let cur = self.l2_offset_of(g);
        let (desc, bitmap) = if cur == 0 {
            (0, 0)
        } else {
            let (d, b) = self.l2_entry(&self.l2_table(cur)?, (g / cs) % self.l2_entries());
            self.validate(
                d,
                b,
                g,
                cur + ((g / cs) % self.l2_entries()) * self.entry_size(),
            )?;
            (d, b)
        };
        let kind = self.decode(desc);
        let unallocated = matches!(kind, EntryKind::Unallocated);
        let zero_already = if self.ext() {
            unallocated && (bitmap >> 32 == ALL_ALLOC || !self.has_backing())
        } else {
            matches!(kind, EntryKind::Zero { host: 0 }) || (unallocated && !self.has_backing())
        };
        if zero_already {
            return Ok(());
        }
        if self.version() == 2 && self.has_backing() {
            drop(guard);
            drop(claim); // writing claims the cluster itself
            return self.write_zeros(g, (g + cs).min(self.size()), below);
        }
        let l2_off = self.writable_l2(rc, g)?;
        let l2 = self.l2_table(l2_off)?;
        let idx = (g / cs) % self.l2_entries();
        self.zero_raw_data_file(g, 0, cs)?;
        let mut e = if self.version() == 2 || self.ext() {
            0u64
        } else {
            ZERO
        }
        .to_be_bytes()
        .to_vec();
        if self.ext() {
            e.extend_from_slice(&ALL_ZERO.to_be_bytes());
        }
        self.write_l2(rc, l2_off, &l2, idx * self.entry_size(), &e)?;
        self.drop_refs(rc, kind)
    }

    /// Extended L2: subclusters [s0, s1) of the cluster at `g` become zero.
    fn discard_subclusters(&self, g: u64, s0: u64, s1: u64, below: BelowReader<'_>) -> Result<()> {
        let cs = self.cs();
        let us = self.unit_size();
        let claim = self.inflight.claim(g);
        let mut guard = self.meta.write();
        let rc = &mut *guard;
        let l2_off = self.writable_l2(rc, g)?;
        let l2 = self.l2_table(l2_off)?;
        let idx = (g / cs) % self.l2_entries();
        let (desc, bitmap) = self.l2_entry(&l2, idx);
        self.validate(desc, bitmap, g, l2_off + idx * 16)?;
        let kind = self.decode(desc);
        if matches!(kind, EntryKind::Compressed { .. }) {
            drop(guard);
            drop(claim); // writing claims the cluster itself
            return self.write_zeros(g + s0 * us, g + s1 * us, below);
        }
        let mask = self.sub_mask(s0 * us, s1 * us);
        let new_bitmap = (bitmap & !mask) | (mask << 32);
        let release = matches!(kind, EntryKind::Normal { .. })
            && !self.has_data_file()
            && new_bitmap & ALL_ALLOC == 0;
        let new_desc = if release { 0 } else { desc };
        if new_bitmap == bitmap && new_desc == desc {
            return Ok(());
        }
        self.zero_raw_data_file(g, s0 * us, s1 * us)?;
        let mut e = new_desc.to_be_bytes().to_vec();
        e.extend_from_slice(&new_bitmap.to_be_bytes());
        self.write_l2(rc, l2_off, &l2, idx * 16, &e)?;
        if release {
            self.drop_refs(rc, kind)?;
        }
        Ok(())
    }
}
