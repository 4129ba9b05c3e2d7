//! Files shown one after the other as one file: a fixed VHD is the disk followed by its
//! footer. Writes go to the part they land in and must stay inside one writable part.

use super::{ExposedFile, check_range};
use crate::error::{Error, Kind, Result};
use std::sync::Arc;
use std::time::SystemTime;

pub struct ConcatFile {
    parts: Vec<Arc<dyn ExposedFile>>,
    /// Start offset of each part, then the total size.
    starts: Vec<u64>,
}

impl ConcatFile {
    /// Fails when the sizes add up past u64.
    pub fn new(parts: Vec<Arc<dyn ExposedFile>>) -> Result<ConcatFile> {
        let mut starts = vec![0u64];
        for p in &parts {
            let last = *starts.last().unwrap_or(&0);
            let next = last
                .checked_add(p.size())
                .ok_or_else(|| Error::invalid("concatenated file sizes overflow"))?;
            starts.push(next);
        }
        Ok(ConcatFile { parts, starts })
    }

    /// The part holding `off` and the offset inside it.
    fn locate(&self, off: u64) -> Option<(usize, u64)> {
        let i = self.starts.partition_point(|s| *s <= off).checked_sub(1)?;
        (i < self.parts.len()).then(|| (i, off - self.starts[i]))
    }

    /// Runs `op` on the one part [off, off+len) falls in; a range across parts is refused.
    fn in_one_part(
        &self,
        off: u64,
        len: u64,
        op: impl FnOnce(&dyn ExposedFile, u64) -> Result<()>,
    ) -> Result<()> {
        check_range(off, len, self.size())?;
        let Some((i, inner)) = self.locate(off) else {
            return if len == 0 {
                Ok(())
            } else {
                Err(Error::invalid("range outside the file"))
            };
        };
        let part = &self.parts[i];
        if inner + len > part.size() || !part.writable() {
            return Err(Error::new(
                Kind::ReadOnly,
                format!("bytes {off:#x}+{len} are not all inside a writable part of this file"),
            ));
        }
        op(&**part, inner)
    }
}

impl ExposedFile for ConcatFile {
    fn size(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    /// Writable when a part is: writes then must land inside a writable part.
    fn writable(&self) -> bool {
        self.parts.iter().any(|p| p.writable())
    }

    fn mutable(&self) -> bool {
        self.parts.iter().any(|p| p.mutable())
    }

    fn mtime(&self) -> SystemTime {
        self.parts
            .iter()
            .map(|p| p.mtime())
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let Some((i, inner)) = self.locate(off + done as u64) else {
                break;
            };
            let n = self.parts[i].read(inner, &mut buf[done..])?;
            if n == 0 {
                // A part shorter than it said: stop rather than loop.
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.in_one_part(off, data.len() as u64, |p, inner| p.write(inner, data))
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.in_one_part(off, len, |p, inner| p.discard(inner, len))
    }

    fn flush(&self) -> Result<()> {
        self.parts.iter().try_for_each(|p| p.flush())
    }

    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        let Some((first, mut inner)) = self.locate(off) else {
            return Ok(None);
        };
        for i in first..self.parts.len() {
            if let Some(p) = self.parts[i].next_data(inner)? {
                return Ok(Some(self.starts[i] + p));
            }
            inner = 0;
        }
        Ok(None)
    }

    fn next_hole(&self, off: u64) -> Result<u64> {
        let Some((first, mut inner)) = self.locate(off) else {
            return Ok(self.size().max(off.min(self.size())));
        };
        for i in first..self.parts.len() {
            let h = self.parts[i].next_hole(inner)?;
            if h < self.parts[i].size() {
                return Ok(self.starts[i] + h);
            }
            inner = 0;
        }
        Ok(self.size())
    }

    fn allocated_bytes(&self) -> Result<u64> {
        self.parts
            .iter()
            .try_fold(0u64, |acc, p| Ok(acc.saturating_add(p.allocated_bytes()?)))
    }
}
