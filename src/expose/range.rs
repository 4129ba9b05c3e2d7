//! A byte range of another exposed file, shown as a file of its own: a partition of a disk.
//! Reads, writes, discards, holes and allocation are those of the range; writes go to the
//! file below (so they count as writes to the disk).

use super::{ExposedFile, check_range};
use crate::error::Result;
use std::sync::Arc;
use std::time::SystemTime;

pub struct RangeFile {
    inner: Arc<dyn ExposedFile>,
    start: u64,
    len: u64,
    writable: bool,
}

impl RangeFile {
    /// The range [start, start+len) of `inner`, clipped to `inner`'s size. Writable exactly
    /// when `inner` is and `writable` is asked for.
    pub fn new(inner: Arc<dyn ExposedFile>, start: u64, len: u64, writable: bool) -> RangeFile {
        let size = inner.size();
        let start = start.min(size);
        let len = len.min(size - start);
        RangeFile {
            writable: writable && inner.writable(),
            inner,
            start,
            len,
        }
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this is the same range of the same file as `other`.
    pub fn same_as(&self, inner: &Arc<dyn ExposedFile>, start: u64, len: u64) -> bool {
        Arc::ptr_eq(&self.inner, inner) && self.start == start && self.len == len
    }
}

impl ExposedFile for RangeFile {
    fn size(&self) -> u64 {
        self.len
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn mutable(&self) -> bool {
        self.inner.mutable()
    }

    fn mtime(&self) -> SystemTime {
        self.inner.mtime()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        if off >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - off) as usize;
        self.inner.read(self.start + off, &mut buf[..n])
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(super::read_only());
        }
        check_range(off, data.len() as u64, self.len)?;
        self.inner.write(self.start + off, data)
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(super::read_only());
        }
        check_range(off, len, self.len)?;
        self.inner.discard(self.start + off, len)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        if off >= self.len {
            return Ok(None);
        }
        Ok(self
            .inner
            .next_data(self.start + off)?
            .map(|p| p.saturating_sub(self.start))
            .filter(|p| *p < self.len))
    }

    fn next_hole(&self, off: u64) -> Result<u64> {
        if off >= self.len {
            return Ok(self.len);
        }
        let hole = self
            .inner
            .next_hole(self.start + off)?
            .saturating_sub(self.start);
        Ok(hole.min(self.len))
    }

    /// Walks the range's data runs by seeking, so a mostly empty partition costs little.
    fn allocated_bytes(&self) -> Result<u64> {
        let mut total = 0;
        let mut pos = 0;
        while let Some(data) = self.next_data(pos)? {
            let hole = self.next_hole(data)?.max(data + 1).min(self.len);
            total += hole - data;
            pos = hole;
            if pos >= self.len {
                break;
            }
        }
        Ok(total)
    }
}
