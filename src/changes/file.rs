//! `changes/<VIEW>.raw`: a sparse file the size of the live disk holding the live bytes
//! where they may differ from VIEW and holes elsewhere, so SEEK_DATA/SEEK_HOLE enumerate the
//! changed extents and `cp --sparse=always` makes an incremental backup. Every answer is
//! computed from the metadata at the moment it is asked, so writes to the live disk show up
//! at once.

use super::Changes;
use crate::error::Result;
use crate::expose::ExposedFile;
use crate::view::View;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a count of changed bytes (st_blocks) of a changing disk is reused.
const COUNT_TTL: Duration = Duration::from_secs(5);

pub struct ChangesFile {
    live: Arc<View>,
    changes: Changes,
    mtime: SystemTime,
    counted: Mutex<Option<(u64, Instant)>>,
}

impl ChangesFile {
    /// The changes of `live` described by `changes` (whose new view is `live`).
    pub fn new(live: Arc<View>, changes: Changes, mtime: SystemTime) -> ChangesFile {
        ChangesFile {
            live,
            changes,
            mtime,
            counted: Mutex::new(None),
        }
    }
}

impl ExposedFile for ChangesFile {
    fn size(&self) -> u64 {
        self.live.size()
    }

    fn mutable(&self) -> bool {
        self.live.is_writable()
    }

    fn direct_io(&self) -> bool {
        self.mutable()
    }

    fn mtime(&self) -> SystemTime {
        self.mtime
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.size();
        if off >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - off) as usize;
        let buf = &mut buf[..n];
        buf.fill(0);
        for r in self.changes.ranges(off, off + n as u64)? {
            let from = (r.start - off) as usize;
            let to = (r.end - off) as usize;
            let got = self.live.read(r.start, &mut buf[from..to])?;
            buf[from + got..to].fill(0);
        }
        Ok(n)
    }

    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        self.changes.next_changed(off)
    }

    fn next_hole(&self, off: u64) -> Result<u64> {
        self.changes.next_unchanged(off)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        let mut counted = self.counted.lock();
        if let Some((bytes, at)) = *counted
            && (!self.mutable() || at.elapsed() < COUNT_TTL)
        {
            return Ok(bytes);
        }
        let bytes = self.changes.changed_bytes()?;
        *counted = Some((bytes, Instant::now()));
        Ok(bytes)
    }
}
