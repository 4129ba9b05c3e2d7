//! A small read-only file whose bytes are generated once (a VMDK descriptor, a VHD footer).

use super::ExposedFile;
use crate::error::Result;
use std::time::SystemTime;

pub struct BytesFile {
    bytes: Vec<u8>,
    mtime: SystemTime,
}

impl BytesFile {
    pub fn new(bytes: Vec<u8>, mtime: SystemTime) -> BytesFile {
        BytesFile { bytes, mtime }
    }
}

impl ExposedFile for BytesFile {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn mtime(&self) -> SystemTime {
        self.mtime
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let Ok(start) = usize::try_from(off) else {
            return Ok(0);
        };
        let Some(src) = self.bytes.get(start..) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
}
