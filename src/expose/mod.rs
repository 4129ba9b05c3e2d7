//! Exposed files: what a mount shows as regular files, independent of FUSE.
//!
//! Every file of a mount is a small `ExposedFile`: a disk (`DiskFile`, a `View` with an mtime
//! and a write watch), a byte range of another file (`RangeFile`: partitions), fixed bytes
//! (`BytesFile`: a VMDK descriptor, a VHD footer), bytes in memory that may be rewritten
//! (`MemoryFile`: the VMDK descriptor of a writable disk), a concatenation (`ConcatFile`: a fixed VHD
//! is the disk followed by its footer), and whatever comes later. The FUSE layer knows only
//! this trait: it never asks what kind of file it serves. Errors are library errors; they
//! become errno at the FUSE boundary.

mod bytes;
mod concat;
mod disk;
mod memory;
mod range;
mod viewfiles;

pub use bytes::BytesFile;
pub use concat::ConcatFile;
pub use disk::DiskFile;
pub use memory::MemoryFile;
pub use range::RangeFile;
pub use viewfiles::{DISK_FILE_NAME, FileOptions, Shown, ViewFiles};

use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use std::sync::Arc;
use std::time::SystemTime;

/// A regular file of the mount. Implementations hold no lock across I/O that another file
/// could wait for, and never change their size.
pub trait ExposedFile: Send + Sync {
    fn size(&self) -> u64;

    /// Whether writes may reach this file (fixed for the life of the file).
    fn writable(&self) -> bool {
        false
    }

    /// Whether its bytes can change while mounted, through it or through another file showing
    /// the same bytes (a partition of a writable disk opened read-only). Fixed files may be
    /// cached by the kernel across opens.
    fn mutable(&self) -> bool {
        self.writable()
    }

    /// Whether reads must bypass the kernel's page cache: the bytes change with writes to
    /// other files that no invalidation follows (changed blocks of a writable disk).
    fn direct_io(&self) -> bool {
        false
    }

    /// The mtime shown for the file: a layer's mtime, a snapshot's date, the last write.
    fn mtime(&self) -> SystemTime;

    /// Reads into `buf` from `off`; the count is short only at the end of the file.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize>;

    /// Writes all of `data` at `off` (the range must lie inside the file).
    fn write(&self, _off: u64, _data: &[u8]) -> Result<()> {
        Err(read_only())
    }

    /// Makes [off, off+len) read as zeros and frees what it can.
    fn discard(&self, _off: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// A clean unmount: flushes and marks what the layer keeps only for clean closes (QEMU
    /// dirty bitmaps) consistent.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// The first offset >= `off` holding data, if any (SEEK_DATA). Default: all data.
    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        Ok((off < self.size()).then_some(off))
    }

    /// The first offset >= `off` in a hole, the end counting as one (SEEK_HOLE).
    fn next_hole(&self, off: u64) -> Result<u64> {
        Ok(self.size().max(off.min(self.size())))
    }

    /// Bytes that hold data (for st_blocks). Default: the whole file.
    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.size())
    }

    /// The host file this file is byte for byte, offset for offset, if any: the kernel may
    /// then serve reads from it directly (passthrough).
    fn identity_file(&self) -> Option<Arc<HostFile>> {
        None
    }
}

fn read_only() -> Error {
    Error::new(Kind::ReadOnly, "this file is read-only")
}

/// Fails unless [off, off+len) lies inside a file of `size` bytes.
pub(crate) fn check_range(off: u64, len: u64, size: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(
            Kind::InvalidInput,
            format!(
                "range {off:#x}+{len} is past the end of the file ({size} bytes); the size never changes"
            ),
        )),
    }
}

#[cfg(test)]
mod tests;
