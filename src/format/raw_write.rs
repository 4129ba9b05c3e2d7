//! In-place writes to a raw top image: guest offset = host offset.

use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use crate::write::{BelowReader, LayerWriter};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct RawWriter {
    file: Arc<HostFile>,
    /// Set by the first failed host write: later writes fail instead of half-applying.
    failed: AtomicBool,
}

impl RawWriter {
    pub fn new(file: Arc<HostFile>) -> RawWriter {
        RawWriter {
            file,
            failed: AtomicBool::new(false),
        }
    }

    fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::new(
                Kind::Failed,
                format!(
                    "{}: an earlier write failed; {}",
                    self.file.path().display(),
                    crate::error::LATCHED_HINT
                ),
            ));
        }
        Ok(())
    }

    fn latch<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            log::error!(
                "{}: write failed, the image now refuses writes: {e}; {}",
                self.file.path().display(),
                crate::error::LATCHED_HINT
            );
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// Writes zeros over [off, off+len) in bounded pieces.
    fn write_zeros(&self, off: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl LayerWriter for RawWriter {
    fn write(&self, off: u64, data: &[u8], _below: BelowReader<'_>) -> Result<()> {
        self.check()?;
        let r = self.file.write_all_at(data, off);
        self.latch(r)
    }

    fn discard(&self, off: u64, len: u64, _below: BelowReader<'_>) -> Result<()> {
        self.check()?;
        if len == 0 {
            return Ok(());
        }
        if let Ok(true) = self.file.punch_hole(off, len) {
            return Ok(());
        }
        // Not supported here (tmpfs of old kernels, some FUSE file systems): write zeros.
        let r = self.write_zeros(off, len);
        self.latch(r)
    }

    fn flush(&self) -> Result<()> {
        self.check()?;
        let r = self.file.sync_data();
        self.latch(r)
    }
}
