//! A small file held in memory whose bytes may be rewritten in place for the life of the
//! mount: the VMDK descriptor of a writable disk, which hypervisors rewrite (QEMU sets a new
//! CID on the first write to the disk). Nothing below it is ever written; the size is fixed.

use super::{ExposedFile, check_range};
use crate::error::Result;
use parking_lot::Mutex;
use std::time::SystemTime;

pub struct MemoryFile {
    bytes: Mutex<Vec<u8>>,
    mtime: Mutex<SystemTime>,
}

impl MemoryFile {
    pub fn new(bytes: Vec<u8>, mtime: SystemTime) -> MemoryFile {
        MemoryFile {
            bytes: Mutex::new(bytes),
            mtime: Mutex::new(mtime),
        }
    }
}

impl ExposedFile for MemoryFile {
    fn size(&self) -> u64 {
        self.bytes.lock().len() as u64
    }

    fn writable(&self) -> bool {
        true
    }

    fn mtime(&self) -> SystemTime {
        *self.mtime.lock()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let bytes = self.bytes.lock();
        let Some(src) = usize::try_from(off).ok().and_then(|s| bytes.get(s..)) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        let mut bytes = self.bytes.lock();
        check_range(off, data.len() as u64, bytes.len() as u64)?;
        // In range of an in-memory Vec, so both fit in usize.
        let start = off as usize;
        bytes[start..start + data.len()].copy_from_slice(data);
        *self.mtime.lock() = SystemTime::now();
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        let mut bytes = self.bytes.lock();
        check_range(off, len, bytes.len() as u64)?;
        let start = off as usize;
        bytes[start..start + len as usize].fill(0);
        *self.mtime.lock() = SystemTime::now();
        Ok(())
    }
}
