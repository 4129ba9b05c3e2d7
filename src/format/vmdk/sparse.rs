//! Translation through a grain directory and grain tables (hosted sparse KDMV, including
//! streamOptimized, and COWD redo logs).

use super::header::{self, SECTOR, SparseHeader};
use crate::cache::{ByteCache, Key};
use crate::endian::le32;
use crate::error::{Error, Result};
use crate::format::{Codec, Extent, Mapping};
use crate::storage::HostFile;
use std::sync::Arc;

/// Cache tag of VMDK grain tables.
const GT_TAG: u8 = 0x76;
/// QEMU reads at most two grains of compressed data.
const MAX_STORED_GRAINS: u64 = 2;
/// GTE value of a zeroed grain (with FLAG_ZERO_GRAIN).
const GTE_ZEROED: u32 = 1;

pub struct SparseExtent {
    file: Arc<HostFile>,
    header: SparseHeader,
    /// Length of this extent in the guest, bytes (descriptor size or header capacity).
    len: u64,
    gd: Arc<[u32]>,
    /// The redundant GD, used for grain tables the primary cannot give.
    rgd: Option<Arc<[u32]>>,
    tables: Arc<ByteCache>,
}

/// What one grain table entry says about its grain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grain {
    Unallocated,
    Zero,
    Data(u64),
    Compressed(u64),
}

impl std::fmt::Debug for SparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseExtent")
            .field("file", &self.file.path())
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl SparseExtent {
    /// Opens the sparse extent in `file`; `len` is its guest length in bytes.
    pub fn open(
        file: Arc<HostFile>,
        header: SparseHeader,
        len: u64,
        tables: Arc<ByteCache>,
    ) -> Result<SparseExtent> {
        let primary = load_gd(&file, &header, header.gd_offset, "grain directory");
        let rgd = header
            .redundant_gd()
            .and_then(|off| load_gd(&file, &header, off, "redundant grain directory").ok());
        let gd = match (primary, &rgd) {
            (Ok(gd), _) => gd,
            (Err(e), Some(r)) => {
                log::warn!(
                    "{}: primary grain directory unreadable ({e}); using the redundant one",
                    file.path().display()
                );
                r.clone()
            }
            (Err(e), None) => return Err(e),
        };
        Ok(SparseExtent {
            file,
            header,
            len,
            gd,
            rgd,
            tables,
        })
    }

    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// Maps [off, off+len) of this extent (extent-relative offsets).
    pub fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let mut e = self.map_in_table(off, len)?;
        // A run of holes that reaches the end of its grain table may go on in the next ones
        // (QEMU preallocates every table, so an empty disk is all empty tables): join them,
        // as many as MAX_ENTRIES_PER_MAP entries allow per call. An error there is reported by the call that starts there.
        let span = self.header.gtes_per_gt * self.header.grain_bytes();
        let end = off + len;
        let max_tables = u64::from(crate::format::MAX_ENTRIES_PER_MAP) / self.header.gtes_per_gt;
        let mut tables = 0;
        while matches!(e.map, Mapping::Unallocated | Mapping::Zero) && tables < max_tables {
            let next = off + e.len;
            if next >= end || !next.is_multiple_of(span) {
                break;
            }
            match self.map_in_table(next, end - next) {
                Ok(n) if e.map.continues(e.len, &n.map) => e.len += n.len,
                _ => break,
            }
            tables += 1;
        }
        Ok(e)
    }

    /// `map`, inside the grain table of `off` (or a run of directory entries without one).
    fn map_in_table(&self, off: u64, len: u64) -> Result<Extent> {
        let gb = self.header.grain_bytes();
        let gtes = self.header.gtes_per_gt;
        let grain = off / gb;
        let gd_idx = grain / gtes;
        let end = off + len;
        let Some(&gt_sector) = self.gd.get(gd_idx as usize) else {
            return Err(Error::corrupt(
                self.file.path(),
                "grain directory",
                self.header.gd_offset.saturating_mul(SECTOR),
                format!(
                    "offset {off:#x} needs entry {gd_idx}, the directory has {}",
                    self.gd.len()
                ),
            ));
        };
        // Guest end of this grain table's span (saturating: capped by `end` anyway).
        let gt_end = (gd_idx + 1)
            .saturating_mul(gtes)
            .saturating_mul(gb)
            .min(end);
        if gt_sector == 0 {
            // The following directory entries without a table are one run with this one.
            let last = (end - 1) / gb / gtes;
            let tables = self.gd[gd_idx as usize + 1..]
                .iter()
                .take((last - gd_idx) as usize)
                .take_while(|&&s| s == 0)
                .count() as u64;
            let run_end = (gd_idx + 1 + tables)
                .saturating_mul(gtes)
                .saturating_mul(gb)
                .min(end);
            return Ok(Extent {
                len: run_end - off,
                map: Mapping::Unallocated,
            });
        }
        let (gt, gt_off) = self.grain_table(gd_idx, gt_sector)?;
        let entry = |g: u64| {
            let i = (g % gtes) as usize;
            (le32(&gt, i * 4), gt_off + i as u64 * 4)
        };
        let (e0, e0_off) = entry(grain);
        let first = self.classify(e0, e0_off)?;
        let grain_end = |g: u64| ((g + 1) * gb).min(gt_end);
        let in_grain = off - grain * gb;
        let map = match first {
            Grain::Unallocated => Mapping::Unallocated,
            Grain::Zero => Mapping::Zero,
            Grain::Data(host) => Mapping::Data {
                file: self.file.clone(),
                host_off: host + in_grain,
            },
            Grain::Compressed(host) => {
                return self.compressed(host, grain, in_grain, grain_end(grain) - off);
            }
        };
        // Extend over the following grains of this table while they continue the run.
        let mut g = grain;
        while grain_end(g) < gt_end {
            let (e, e_off) = entry(g + 1);
            let next = self.classify(e, e_off)?;
            let continues = match (first, next) {
                (Grain::Data(a), Grain::Data(b)) => b == a + (g + 1 - grain) * gb,
                (a, b) => a == b && !matches!(a, Grain::Data(_) | Grain::Compressed(_)),
            };
            if !continues {
                break;
            }
            g += 1;
        }
        let run = grain_end(g) - off;
        Ok(Extent { len: run, map })
    }

    fn classify(&self, e: u32, at: u64) -> Result<Grain> {
        if e == 0 {
            return Ok(Grain::Unallocated);
        }
        if e == GTE_ZEROED && self.header.zero_grain() {
            return Ok(Grain::Zero);
        }
        let host = e as u64 * SECTOR;
        if host >= self.file.len() {
            return Err(Error::corrupt(
                self.file.path(),
                "grain table entry",
                at,
                format!(
                    "grain at {host:#x} is past the end of the file ({} bytes)",
                    self.file.len()
                ),
            ));
        }
        Ok(if self.header.compressed {
            Grain::Compressed(host)
        } else {
            Grain::Data(host)
        })
    }

    /// One compressed grain (never merged: each is its own zlib stream).
    fn compressed(&self, host: u64, grain: u64, in_grain: u64, len: u64) -> Result<Extent> {
        let gb = self.header.grain_bytes();
        let max = MAX_STORED_GRAINS * gb;
        let (data_off, stored_len) = if self.header.markers {
            let mut m = [0u8; 12];
            self.file.read_data_at(&mut m, host)?;
            let size = le32(&m, 8) as u64;
            if size == 0 || size > max {
                return Err(Error::corrupt(
                    self.file.path(),
                    "grain marker size",
                    host + 8,
                    format!("{size} bytes is not in 1..={max}"),
                ));
            }
            (host + 12, size)
        } else {
            (host, max.min(self.file.len() - host))
        };
        let grain_start = grain * gb;
        // The last grain of an extent may be short: QEMU compresses only what is inside.
        let cluster_len = gb.min(self.len - grain_start);
        Ok(Extent {
            len,
            map: Mapping::Compressed {
                file: self.file.clone(),
                host_off: data_off,
                stored_len,
                codec: Codec::Zlib,
                cluster_len,
                skip: in_grain,
            },
        })
    }

    /// The grain table `gd_idx`, from the cache or the file; falls back to the redundant copy
    /// when the primary cannot be read.
    fn grain_table(&self, gd_idx: u64, gt_sector: u32) -> Result<(Arc<[u8]>, u64)> {
        let off = gt_sector as u64 * SECTOR;
        let primary = self.load_gt(off, "grain table");
        let e = match primary {
            Ok(t) => return Ok((t, off)),
            Err(e) => e,
        };
        let Some(&r) = self.rgd.as_ref().and_then(|r| r.get(gd_idx as usize)) else {
            return Err(e);
        };
        let roff = r as u64 * SECTOR;
        if r == 0 || roff == off {
            return Err(e);
        }
        match self.load_gt(roff, "redundant grain table") {
            Ok(t) => {
                log::warn!(
                    "{}: grain table {gd_idx} unreadable ({e}); using the redundant copy at {roff:#x}",
                    self.file.path().display()
                );
                Ok((t, roff))
            }
            Err(_) => Err(e),
        }
    }

    fn load_gt(&self, off: u64, field: &str) -> Result<Arc<[u8]>> {
        let bytes = self.header.gtes_per_gt * 4;
        self.tables
            .get_or_load(Key::new(self.file.id(), off, GT_TAG), || {
                self.file.read_table(off, bytes, bytes, field)
            })
    }
}

fn load_gd(file: &HostFile, h: &SparseHeader, sector: u64, field: &str) -> Result<Arc<[u32]>> {
    let off = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::corrupt(file.path(), field, sector, "offset overflows"))?;
    let bytes = h.gd_entries * 4;
    let raw = file.read_table(off, bytes, header::MAX_GD_ENTRIES * 4, field)?;
    Ok(raw.chunks_exact(4).map(|c| le32(c, 0)).collect())
}
