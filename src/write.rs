//! The contract between a view and a top layer that can be written in place.

use crate::error::Result;

/// Reads what the chain below the writable layer shows at a guest range (zeros past its end).
/// A writer uses it to fill the untouched part of a cluster it copies up.
pub type BelowReader<'a> = &'a (dyn Fn(u64, &mut [u8]) -> Result<()> + Sync);

pub trait LayerWriter: Send + Sync {
    /// Writes `data` at guest offset `off` (inside the virtual size), copy-on-write.
    fn write(&self, off: u64, data: &[u8], below: BelowReader<'_>) -> Result<()>;
    /// Makes [off, off+len) read as zeros, freeing what it can.
    fn discard(&self, off: u64, len: u64, below: BelowReader<'_>) -> Result<()>;
    /// Makes every acknowledged write durable (metadata in dependency order, then fdatasync).
    fn flush(&self) -> Result<()>;
    /// A clean unmount, after the last write: flushes and marks state that is kept
    /// consistent only when closed cleanly (QEMU dirty bitmaps) as consistent again. A
    /// later write starts over (marks it in use again).
    fn close(&self) -> Result<()> {
        self.flush()
    }
}
