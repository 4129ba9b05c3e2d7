//! A disk file: one `View` (live, a layer, a snapshot, a clone) with its mtime and a watch on
//! the byte ranges a reader of the disk's contents (the partition scanner) cares about.

use super::{ExposedFile, read_only};
use crate::error::Result;
use crate::format::Mapping;
use crate::storage::HostFile;
use crate::view::View;
use parking_lot::RwLock;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct DiskFile {
    view: Arc<View>,
    writable: bool,
    /// Nanoseconds since the epoch: the layer's mtime or snapshot date, then the last write.
    mtime_ns: AtomicU64,
    /// Byte ranges whose change makes `touched` true (the partition table's sectors).
    watched: RwLock<Vec<Range<u64>>>,
    touched: AtomicBool,
}

impl DiskFile {
    /// Writes reach the view only when `writable` (and the view can write).
    pub fn new(view: Arc<View>, writable: bool, mtime: SystemTime) -> DiskFile {
        DiskFile {
            writable: writable && view.is_writable(),
            view,
            mtime_ns: AtomicU64::new(nanos(mtime)),
            watched: RwLock::new(Vec::new()),
            touched: AtomicBool::new(false),
        }
    }

    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// From now on, a write or discard overlapping one of `ranges` sets the touched flag.
    pub fn watch(&self, ranges: Vec<Range<u64>>) {
        *self.watched.write() = ranges;
    }

    /// Whether a watched range was written since the last call (and clears the flag).
    pub fn take_touched(&self) -> bool {
        self.touched.swap(false, Ordering::AcqRel)
    }

    /// Whether a watched range was written since the flag was last taken.
    pub fn touched(&self) -> bool {
        self.touched.load(Ordering::Acquire)
    }

    fn wrote(&self, off: u64, len: u64) {
        self.mtime_ns
            .store(nanos(SystemTime::now()), Ordering::Relaxed);
        let end = off.saturating_add(len);
        if self
            .watched
            .read()
            .iter()
            .any(|r| r.start < end && off < r.end)
        {
            self.touched.store(true, Ordering::Release);
        }
    }
}

impl ExposedFile for DiskFile {
    fn size(&self) -> u64 {
        self.view.size()
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn mtime(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.mtime_ns.load(Ordering::Relaxed))
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.view.read(off, buf)
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(read_only());
        }
        // Marked even when the write fails: part of it may have landed.
        let r = self.view.write(off, data);
        self.wrote(off, data.len() as u64);
        r
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(read_only());
        }
        let r = self.view.discard(off, len);
        self.wrote(off, len);
        r
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.view.flush()
        } else {
            Ok(())
        }
    }

    fn close(&self) -> Result<()> {
        if self.writable {
            self.view.close()
        } else {
            Ok(())
        }
    }

    fn next_data(&self, off: u64) -> Result<Option<u64>> {
        self.view.next_data(off)
    }

    fn next_hole(&self, off: u64) -> Result<u64> {
        self.view.next_hole(off)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        self.view.allocated_bytes()
    }

    /// Only read-only disks qualify: the top layer maps the whole disk to offset 0 of one file
    /// of exactly the disk's size (a longer file, such as a fixed VHD with its footer, would
    /// let reads past the end see the footer).
    fn identity_file(&self) -> Option<Arc<HostFile>> {
        if self.writable {
            return None;
        }
        let top = self.view.layers().first()?;
        let size = self.view.size();
        if size == 0 || top.virtual_size() != size {
            return None;
        }
        let extent = top.map(0, size).ok()?;
        match extent.map {
            // Only a local file has a descriptor the kernel can read from.
            Mapping::Data { file, host_off: 0 }
                if extent.len == size && file.len() == size && file.as_local_file().is_some() =>
            {
                Some(file)
            }
            _ => None,
        }
    }
}

pub(crate) fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
