//! ESXi seSparse extents ("space-efficient sparse", `-sesparse.vmdk`): 4 KiB grains, grain
//! tables of 4096 u64 entries, checked as strictly as QEMU checks them.

use super::header::{MAX_GD_ENTRIES, SECTOR};
use crate::cache::{ByteCache, Key};
use crate::endian::le64;
use crate::ensure_corrupt;
use crate::error::{Error, Result};
use crate::format::{Extent, Mapping};
use crate::storage::HostFile;
use std::sync::Arc;

const MAGIC: u64 = 0xcafe_babe;
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VERSION: u64 = 0x0000_0002_0000_0001;
const GRAIN_SECTORS: u64 = 8;
const GT_SECTORS: u64 = 64;
const GT_ENTRIES: u64 = GT_SECTORS * SECTOR / 8;
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
const GT_TAG: u8 = 0x73;

pub struct SeSparseExtent {
    file: Arc<HostFile>,
    pub capacity: u64,
    gd: Arc<[u64]>,
    gd_off: u64,
    tables_off: u64,
    grains_off: u64,
    tables: Arc<ByteCache>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Grain {
    Unallocated,
    Zero,
    Data(u64),
}

impl std::fmt::Debug for SeSparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeSparseExtent")
            .field("file", &self.file.path())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl SeSparseExtent {
    pub fn open(file: Arc<HostFile>, tables: Arc<ByteCache>) -> Result<SeSparseExtent> {
        let path = file.path();
        let mut h = [0u8; 512];
        file.read_exact_at(&mut h, 0, "seSparse header")?;
        let f = |i: usize| le64(&h, i * 8);
        ensure_corrupt!(
            f(0) == MAGIC,
            path,
            "seSparse magic",
            0,
            "{:#x} is not {MAGIC:#x}",
            f(0)
        );
        if f(1) != VERSION {
            return Err(Error::unsupported(
                path,
                format!("seSparse version {:#x}", f(1)),
            ));
        }
        ensure_corrupt!(
            f(3) == GRAIN_SECTORS,
            path,
            "seSparse grain_size",
            24,
            "{} sectors, expected 8",
            f(3)
        );
        ensure_corrupt!(
            f(4) == GT_SECTORS,
            path,
            "seSparse grain_table_size",
            32,
            "{} sectors, expected 64",
            f(4)
        );
        if f(5) != 0 {
            return Err(Error::unsupported(
                path,
                format!("seSparse flags {:#x}", f(5)),
            ));
        }
        let capacity = f(2);
        ensure_corrupt!(
            capacity
                .checked_mul(SECTOR)
                .is_some_and(|b| b <= i64::MAX as u64),
            path,
            "seSparse capacity",
            16,
            "{capacity} sectors is absurd"
        );
        let sectors = |i: usize, field: &str| {
            f(i).checked_mul(SECTOR).ok_or_else(|| {
                Error::corrupt(
                    path,
                    field,
                    i as u64 * 8,
                    format!("{} sectors overflows", f(i)),
                )
            })
        };
        let volatile_off = sectors(10, "seSparse volatile_header_offset")?;
        let gd_off = sectors(16, "seSparse grain_dir_offset")?;
        let gd_bytes = sectors(17, "seSparse grain_dir_size")?;
        let tables_off = sectors(18, "seSparse grain_tables_offset")?;
        let grains_off = sectors(24, "seSparse grains_offset")?;

        let mut v = [0u8; 32];
        file.read_exact_at(&mut v, volatile_off, "seSparse volatile header")?;
        ensure_corrupt!(
            le64(&v, 0) == VOLATILE_MAGIC,
            path,
            "seSparse volatile header magic",
            volatile_off,
            "{:#x}",
            le64(&v, 0)
        );
        if le64(&v, 24) != 0 {
            return Err(Error::unsupported(
                path,
                "seSparse journal needs replay (replay_journal is set)",
            ));
        }

        let needed = (capacity / GRAIN_SECTORS).div_ceil(GT_ENTRIES);
        let entries = gd_bytes / 8;
        ensure_corrupt!(
            entries >= needed,
            path,
            "seSparse grain directory",
            gd_off,
            "{entries} entries cannot cover {needed} grain tables"
        );
        let raw = file.read_table(
            gd_off,
            needed * 8,
            MAX_GD_ENTRIES * 8,
            "seSparse grain directory",
        )?;
        let gd = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        Ok(SeSparseExtent {
            file,
            capacity,
            gd,
            gd_off,
            tables_off,
            grains_off,
            tables,
        })
    }

    pub fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let path = self.file.path();
        let grain = off / GRAIN;
        let gd_idx = grain / GT_ENTRIES;
        let end = off + len;
        let gt_end = ((gd_idx + 1) * GT_ENTRIES * GRAIN).min(end);
        let gde_off = self.gd_off + gd_idx * 8;
        let Some(&gde) = self.gd.get(gd_idx as usize) else {
            return Err(Error::corrupt(
                path,
                "seSparse grain directory",
                gde_off,
                "offset outside the directory",
            ));
        };
        if gde == 0 {
            // The following directory entries without a table are one run with this one.
            let last = (end - 1) / GRAIN / GT_ENTRIES;
            let tables = self.gd[gd_idx as usize + 1..]
                .iter()
                .take((last - gd_idx) as usize)
                .take_while(|&&e| e == 0)
                .count() as u64;
            let run_end = (gd_idx + 1 + tables)
                .saturating_mul(GT_ENTRIES * GRAIN)
                .min(end);
            return Ok(Extent {
                len: run_end - off,
                map: Mapping::Unallocated,
            });
        }
        ensure_corrupt!(
            gde >> 32 == 0x1000_0000,
            path,
            "seSparse grain directory entry",
            gde_off,
            "{gde:#x} is invalid"
        );
        let gt_off = (gde & 0xffff_ffff)
            .checked_mul(GT_SECTORS * SECTOR)
            .and_then(|o| o.checked_add(self.tables_off))
            .ok_or_else(|| {
                Error::corrupt(path, "seSparse grain directory entry", gde_off, "overflows")
            })?;
        let bytes = GT_ENTRIES * 8;
        let gt = self
            .tables
            .get_or_load(Key::new(self.file.id(), gt_off, GT_TAG), || {
                self.file
                    .read_table(gt_off, bytes, bytes, "seSparse grain table")
            })?;
        let entry = |g: u64| {
            let i = g % GT_ENTRIES;
            self.classify(le64(&gt, i as usize * 8), gt_off + i * 8)
        };
        let first = entry(grain)?;
        let grain_end = |g: u64| ((g + 1) * GRAIN).min(gt_end);
        let mut g = grain;
        while grain_end(g) < gt_end {
            let next = entry(g + 1)?;
            let continues = match (first, next) {
                (Grain::Data(a), Grain::Data(b)) => b == a + (g + 1 - grain) * GRAIN,
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            g += 1;
        }
        let map = match first {
            Grain::Unallocated => Mapping::Unallocated,
            Grain::Zero => Mapping::Zero,
            Grain::Data(host) => Mapping::Data {
                file: self.file.clone(),
                host_off: host + off % GRAIN,
            },
        };
        Ok(Extent {
            len: grain_end(g) - off,
            map,
        })
    }

    fn classify(&self, e: u64, at: u64) -> Result<Grain> {
        let path = self.file.path();
        match e >> 60 {
            0 if e == 0 => Ok(Grain::Unallocated),
            1 | 2 => Ok(Grain::Zero), // SCSI-unmapped or zeroed grain
            3 => {
                let idx = grain_index(e);
                let host = idx
                    .checked_mul(GRAIN)
                    .and_then(|o| o.checked_add(self.grains_off))
                    .filter(|&h| h < self.file.len())
                    .ok_or_else(|| {
                        Error::corrupt(
                            path,
                            "seSparse grain table entry",
                            at,
                            format!("grain {idx} is past the end of the file"),
                        )
                    })?;
                Ok(Grain::Data(host))
            }
            _ => Err(Error::corrupt(
                path,
                "seSparse grain table entry",
                at,
                format!("{e:#x} is invalid"),
            )),
        }
    }
}

/// The grain number of an allocated entry: its low 12 bits are stored in bits 48..60, the
/// rest in bits 0..48.
fn grain_index(e: u64) -> u64 {
    ((e & 0x0fff_0000_0000_0000) >> 48) | ((e & 0x0000_ffff_ffff_ffff) << 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_entries_decode_their_grain_number() {
        for idx in [0u64, 1, 0xfff, 0x1000, 0x1234_5678, (1 << 60) - 1] {
            let e = 0x3000_0000_0000_0000 | ((idx & 0xfff) << 48) | (idx >> 12);
            assert_eq!(grain_index(e), idx);
        }
        assert_eq!(grain_index(0x3001_0000_0000_0002), 0x2001);
    }
}
