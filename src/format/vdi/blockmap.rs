//! The VDI block map: one u32 per block. Translation of guest offsets into runs of blocks
//! that share one state and, for data, continue each other in the host file.

use crate::endian::le32;
use crate::error::{Error, Result};
use std::path::Path;

/// Never written: "any data" in a base image (read as zeros), the parent's data in a
/// differencing image.
pub const FREE: u32 = 0xffff_ffff;
/// Discarded: reads as zeros and hides the parent.
pub const ZERO: u32 = 0xffff_fffe;

/// What one run of guest bytes is in this layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    Data { host_off: u64 },
    Zero,
    Unallocated,
}

/// Everything translation needs, decoded from the header.
#[derive(Clone, Debug)]
pub struct BlockMap {
    pub entries: Box<[u32]>,
    pub block_size: u64,
    pub block_extra: u64,
    pub offset_data: u64,
    pub offset_blocks: u64,
    /// Free blocks fall through to the parent instead of reading as zeros.
    pub has_parent: bool,
}

impl BlockMap {
    pub fn decode(raw: &[u8]) -> Box<[u32]> {
        (0..raw.len() / 4).map(|i| le32(raw, i * 4)).collect()
    }

    /// Where block `index` (block map entry `entry`) starts in the host file, if the
    /// arithmetic does not overflow.
    fn block_start(&self, entry: u32) -> Option<u64> {
        (entry as u64)
            .checked_mul(self.block_size.checked_add(self.block_extra)?)?
            .checked_add(self.offset_data)?
            .checked_add(self.block_extra)
    }

    fn entry(&self, block: u64, path: &Path) -> Result<u32> {
        self.next_entry(block).ok_or_else(|| {
            Error::corrupt(
                path,
                "block map",
                self.offset_blocks,
                format!("no entry for block {block}"),
            )
        })
    }

    /// Entries looked at while extending a run: a missing one just ends the run.
    fn next_entry(&self, block: u64) -> Option<u32> {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.entries.get(i).copied())
    }

    fn unmapped(&self, entry: u32) -> Run {
        if entry == FREE && self.has_parent {
            Run::Unallocated
        } else {
            Run::Zero
        }
    }

    /// The run that starts at guest `off`, at most `len` bytes long: blocks with the same
    /// state, and for data blocks, ones that follow each other in the file. `file_len` is
    /// the host file size: a block that starts past it is corrupt; the tail of a block cut
    /// short by the end of the file reads as zeros (as in QEMU).
    pub fn run(&self, off: u64, len: u64, file_len: u64, path: &Path) -> Result<(u64, Run)> {
        let bs = self.block_size;
        let first = off / bs;
        let end = off.saturating_add(len);
        let block_end = |b: u64| b.saturating_add(1).saturating_mul(bs);
        let mut run_end = end.min(block_end(first));
        let entry = self.entry(first, path)?;
        if entry == FREE || entry == ZERO {
            let state = self.unmapped(entry);
            let mut b = first + 1;
            while run_end < end {
                let Some(e) = self.next_entry(b) else { break };
                if !(e == FREE || e == ZERO) || self.unmapped(e) != state {
                    break;
                }
                run_end = end.min(block_end(b));
                b += 1;
            }
            return Ok((run_end - off, state));
        }
        let start = self.checked_start(first, entry, file_len, path)?;
        let host_off = start + off % bs;
        if host_off >= file_len {
            // Inside a block the file holds only the beginning of.
            return Ok((run_end - off, Run::Zero));
        }
        let mut next_host = start + bs;
        let mut b = first + 1;
        while run_end < end && next_host < file_len {
            let Some(e) = self.next_entry(b) else { break };
            if e == FREE || e == ZERO || self.block_start(e) != Some(next_host) {
                break;
            }
            run_end = end.min(block_end(b));
            next_host += bs;
            b += 1;
        }
        Ok((run_end - off, Run::Data { host_off }))
    }

    fn checked_start(&self, block: u64, entry: u32, file_len: u64, path: &Path) -> Result<u64> {
        match self.block_start(entry) {
            Some(s) if s < file_len => Ok(s),
            _ => Err(Error::corrupt(
                path,
                "block map entry",
                self.offset_blocks + block * 4,
                format!(
                    "block {block} points to data block {entry}, past the end of the file ({file_len} bytes)"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn map(entries: &[u32], has_parent: bool) -> BlockMap {
        BlockMap {
            entries: entries.into(),
            block_size: MB,
            block_extra: 0,
            offset_data: 0x1000,
            offset_blocks: 0x200,
            has_parent,
        }
    }

    fn run(m: &BlockMap, off: u64, len: u64) -> (u64, Run) {
        m.run(off, len, 1 << 40, Path::new("t.vdi")).unwrap()
    }

    #[test]
    fn decodes_little_endian_entries() {
        assert_eq!(
            &*BlockMap::decode(&[1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 9]),
            &[1, ZERO]
        );
    }

    #[test]
    fn merges_blocks_contiguous_in_the_file() {
        let m = map(&[0, 1, 2, 5, 6, FREE], false);
        assert_eq!(
            run(&m, 10, 10 * MB),
            (
                3 * MB - 10,
                Run::Data {
                    host_off: 0x1000 + 10
                }
            )
        );
        assert_eq!(
            run(&m, 2 * MB + 7, 10 * MB),
            (
                MB - 7,
                Run::Data {
                    host_off: 0x1000 + 2 * MB + 7
                }
            )
        );
        assert_eq!(
            run(&m, 3 * MB, 10 * MB),
            (
                2 * MB,
                Run::Data {
                    host_off: 0x1000 + 5 * MB
                }
            )
        );
        assert_eq!(
            run(&m, 3 * MB, 100),
            (
                100,
                Run::Data {
                    host_off: 0x1000 + 5 * MB
                }
            )
        );
    }

    #[test]
    fn block_extra_separates_blocks() {
        let mut m = map(&[0, 1], false);
        m.block_extra = 512;
        assert_eq!(
            run(&m, 0, 2 * MB),
            (
                MB,
                Run::Data {
                    host_off: 0x1000 + 512
                }
            )
        );
        assert_eq!(
            run(&m, MB + 1, MB),
            (
                MB - 1,
                Run::Data {
                    host_off: 0x1000 + (MB + 512) + 512 + 1
                }
            )
        );
    }

    #[test]
    fn free_and_zero_blocks_depend_on_the_image_type() {
        let base = map(&[FREE, ZERO, FREE, 0], false);
        assert_eq!(run(&base, 5, 10 * MB), (3 * MB - 5, Run::Zero));
        let diff = map(&[FREE, ZERO, ZERO, FREE, FREE, 0], true);
        assert_eq!(run(&diff, 5, 10 * MB), (MB - 5, Run::Unallocated));
        assert_eq!(run(&diff, MB, 10 * MB), (2 * MB, Run::Zero));
        assert_eq!(run(&diff, 3 * MB, 10 * MB), (2 * MB, Run::Unallocated));
    }

    #[test]
    fn blocks_past_the_end_of_the_file_are_corrupt_and_short_ones_zero_filled() {
        let m = map(&[0, 1, 2], false);
        let file_len = 0x1000 + MB + 100;
        let p = Path::new("t.vdi");
        assert_eq!(
            m.run(0, 3 * MB, file_len, p).unwrap(),
            (2 * MB, Run::Data { host_off: 0x1000 })
        );
        assert_eq!(m.run(MB + 200, 10, file_len, p).unwrap(), (10, Run::Zero));
        let e = m.run(2 * MB, 10, file_len, p).unwrap_err().to_string();
        assert!(
            e.contains("block map entry at offset 0x208") && e.contains("past the end"),
            "{e}"
        );
        let huge = map(&[u32::MAX - 2], false);
        assert!(huge.run(0, 1, u64::MAX, p).is_ok());
        let mut overflow = map(&[u32::MAX - 2], false);
        overflow.offset_data = u64::MAX - 10;
        assert!(overflow.run(0, 1, u64::MAX, p).is_err());
        assert!(map(&[], false).run(0, 1, 1 << 40, p).is_err());
    }
}
