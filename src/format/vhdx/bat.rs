//! The block allocation table: geometry, entry decoding, and paged lookups of BAT entries
//! and sector-bitmap slices through the shared table cache.

use super::header::MIB;
use super::metadata::Metadata;
use super::overlay::Replayed;
use crate::cache::{ByteCache, Key};
use crate::endian::le64;
use crate::error::{Error, Result};
use std::sync::Arc;

/// Cache tags (unique to this driver's table kinds).
const TAG_BAT_PAGE: u8 = b'X';
const TAG_BITMAP: u8 = b'x';
/// BAT entries are paged in 64 KiB pieces (8192 entries).
const BAT_PAGE: u64 = 64 * 1024;
/// Each sector-bitmap block holds 2^23 bits.
const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// Payload block states (MS-VHDX 2.5.1.1); 5 is UNMAPPED in the v0.95 draft.
pub const NOT_PRESENT: u8 = 0;
pub const UNDEFINED: u8 = 1;
pub const ZERO: u8 = 2;
pub const UNMAPPED: u8 = 3;
pub const UNMAPPED_V095: u8 = 5;
pub const FULLY_PRESENT: u8 = 6;
pub const PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block state.
pub const SB_PRESENT: u8 = 6;

pub fn state(entry: u64) -> u8 {
    (entry & 7) as u8
}

pub fn file_offset(entry: u64) -> u64 {
    entry & !(MIB - 1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    /// Payload blocks per sector-bitmap block.
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    /// BAT entries the disk needs.
    pub entries: u64,
}

impl Geometry {
    pub fn new(m: &Metadata) -> Geometry {
        // Block size <= 2^28 and the chunk covers >= 2^32 bytes, so this divides exactly.
        let chunk_ratio = SECTORS_PER_BITMAP * m.logical_sector / m.block_size;
        let data_blocks = m.virtual_size.div_ceil(m.block_size);
        let entries = if m.has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
        };
        Geometry {
            block_size: m.block_size,
            logical_sector: m.logical_sector,
            chunk_ratio,
            data_blocks,
            entries,
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector-bitmap block for the chunk holding payload block `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Byte offset, inside its sector-bitmap block, of the bits for payload block `block`,
    /// and their length in bytes.
    pub fn bitmap_slice(&self, block: u64) -> (u64, u64) {
        let bits = self.block_size / self.logical_sector;
        ((block % self.chunk_ratio) * bits / 8, bits / 8)
    }
}

/// A BAT whose pages are read on demand (through the log overlay) and cached.
#[derive(Debug)]
pub struct Bat {
    pub geometry: Geometry,
    offset: u64,
}

impl Bat {
    /// Checks that the BAT region holds every entry the disk needs and lies inside the file.
    pub fn new(
        src: &Replayed,
        geometry: Geometry,
        region_offset: u64,
        region_length: u64,
    ) -> Result<Bat> {
        let path = src.file().path();
        let bytes = geometry.entries.saturating_mul(8);
        if bytes > region_length {
            return Err(Error::corrupt(
                path,
                "BAT region",
                region_offset,
                format!(
                    "{} entries ({bytes} bytes) do not fit in the {region_length}-byte region",
                    geometry.entries
                ),
            ));
        }
        if region_offset
            .checked_add(bytes)
            .is_none_or(|end| end > src.size())
        {
            return Err(Error::corrupt(
                path,
                "BAT region",
                region_offset,
                format!(
                    "{bytes} bytes of BAT reach past the end of the file ({} bytes)",
                    src.size()
                ),
            ));
        }
        Ok(Bat {
            geometry,
            offset: region_offset,
        })
    }

    /// The raw BAT entry `idx`.
    pub fn entry(&self, src: &Replayed, tables: &ByteCache, idx: u64) -> Result<u64> {
        if idx >= self.geometry.entries {
            return Err(Error::corrupt(
                src.file().path(),
                "BAT",
                self.offset,
                format!("entry {idx} is past its {} entries", self.geometry.entries),
            ));
        }
        let byte = idx * 8;
        let page_start = byte / BAT_PAGE * BAT_PAGE;
        let page_len = BAT_PAGE.min(self.geometry.entries * 8 - page_start);
        let at = self.offset + page_start;
        let page = tables.get_or_load(Key::new(src.file().id(), at, TAG_BAT_PAGE), || {
            src.read_vec(at, page_len, BAT_PAGE, "BAT")
        })?;
        Ok(le64(&page, (byte - page_start) as usize))
    }

    /// The sector-bitmap bits of payload block `block` (bit i = logical sector i of the block,
    /// LSB first). The chunk's bitmap block must be present.
    pub fn bitmap(&self, src: &Replayed, tables: &ByteCache, block: u64) -> Result<Arc<[u8]>> {
        let idx = self.geometry.bitmap_index(block);
        let entry = self.entry(src, tables, idx)?;
        let path = src.file().path();
        let field = format!("sector bitmap BAT entry {idx}");
        let at = self.offset + idx * 8;
        if state(entry) != SB_PRESENT {
            return Err(Error::corrupt(
                path,
                &field,
                at,
                format!(
                    "state {} but a block of its chunk is partially present",
                    state(entry)
                ),
            ));
        }
        let base = file_offset(entry);
        if base < MIB || base.checked_add(MIB).is_none_or(|e| e > src.size()) {
            return Err(Error::corrupt(
                path,
                &field,
                at,
                format!("bitmap block at {base:#x} lies outside the file"),
            ));
        }
        let (off, len) = self.geometry.bitmap_slice(block);
        let slice_at = base + off;
        tables.get_or_load(Key::new(src.file().id(), slice_at, TAG_BITMAP), || {
            src.read_vec(slice_at, len, MIB, "sector bitmap")
        })
    }

    /// File offset of BAT entry `idx` (for error messages).
    pub fn entry_offset(&self, idx: u64) -> u64 {
        self.offset + idx * 8
    }
}

/// Length, in sectors, of the run of equal bits starting at `first` (at most `max` sectors).
pub fn bit_run(bits: &[u8], first: u64, max: u64) -> (bool, u64) {
    let bit = |i: u64| {
        bits.get((i / 8) as usize)
            .is_some_and(|b| b >> (i % 8) & 1 == 1)
    };
    let value = bit(first);
    let fill = if value { 0xFF } else { 0x00 };
    let total = bits.len() as u64 * 8;
    let limit = first.saturating_add(max).min(total);
    let mut i = first + 1;
    while i < limit {
        if i.is_multiple_of(8) && i + 8 <= limit && bits[(i / 8) as usize] == fill {
            i += 8;
        } else if bit(i) == value {
            i += 1;
        } else {
            break;
        }
    }
    (value, i.min(limit).max(first + 1) - first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64, block: u64, lss: u64, parent: bool) -> Metadata {
        Metadata {
            block_size: block,
            leave_blocks_allocated: false,
            has_parent: parent,
            virtual_size: size,
            disk_id: None,
            logical_sector: lss,
            physical_sector: lss,
            parent_locator: None,
        }
    }

    #[test]
    fn geometry_follows_the_spec_formulas() {
        let g = Geometry::new(&meta(10 << 30, 32 * MIB, 512, false));
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 320);
        assert_eq!(g.entries, 320 + 319 / 128);
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(130), 129 + 128);
        let d = Geometry::new(&meta(10 << 30, 32 * MIB, 512, true));
        assert_eq!(d.entries, 3 * 129);
        let g4k = Geometry::new(&meta(1 << 30, MIB, 4096, false));
        assert_eq!(g4k.chunk_ratio, 32768);
        assert_eq!(g4k.bitmap_slice(3), (3 * 256 / 8, 32));
        assert_eq!(Geometry::new(&meta(0, MIB, 512, false)).entries, 0);
    }

    #[test]
    fn bit_runs_are_lsb_first() {
        let bits = [0b0000_0110u8, 0xFF, 0xFF, 0x00];
        assert_eq!(bit_run(&bits, 0, 100), (false, 1));
        assert_eq!(bit_run(&bits, 1, 100), (true, 2));
        assert_eq!(bit_run(&bits, 3, 100), (false, 5));
        assert_eq!(bit_run(&bits, 8, 100), (true, 16));
        assert_eq!(bit_run(&bits, 8, 3), (true, 3));
        assert_eq!(bit_run(&bits, 24, 100), (false, 8));
    }

    #[test]
    fn entry_fields() {
        let e = (5 * MIB) | 0x1F_0000 | 6;
        assert_eq!(state(e), FULLY_PRESENT);
        assert_eq!(file_offset(e), 5 * MIB);
    }
}
