//! Where image bytes live. A `HostFile` is one open image file (a layer, an extent, a data
//! file) behind one interface: positioned reads with bounds checks and errors that name the
//! file, whatever the backend. The format drivers see only this type, never where the bytes
//! come from.
//!
//! Backends: `local` (a file on this host) and `remote` (an object on an HTTP(S) server or in
//! an S3 bucket, named by its URL, read lazily through the persistent `chunk_cache`).
//! Capabilities only a local file has (a real file descriptor, for QEMU-compatible locks and
//! kernel passthrough) are explicit: `as_local_file()` answers `None` for any other backend.
//! Remote objects are read-only.

pub mod chunk_cache;
pub mod config;
pub mod http;
mod local;
pub mod location;
pub mod registry;
pub mod remote;
pub mod url;

use crate::error::{Error, Kind, Result};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use local::LocalFile;
pub use remote::{RemoteObject, RemoteStats};
pub use url::{RemoteUrl, is_remote, show_path};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What makes two opened files the same file (loop detection in chains).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileKey {
    /// st_dev, st_ino.
    Local { dev: u64, ino: u64 },
    /// The object's URL as shown.
    Remote(String),
}

/// One storage backend's raw I/O. `HostFile` adds bounds checks and file-naming errors.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `off`; fewer (or 0) only at the end of the object.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
    /// The current size, asked of the host.
    fn current_len(&self) -> io::Result<u64>;
    /// Frees [off, off+len) so it reads as zeros; `Ok(false)` when the backend cannot.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<bool>;
    fn key(&self) -> FileKey;
    /// The open file behind this backend, if it is a local file.
    fn as_local_file(&self) -> Option<&File> {
        None
    }
    /// The remote object behind this backend, if it is one.
    fn remote(&self) -> Option<&RemoteObject> {
        None
    }
}

/// One open image file (a layer, an extent, a data file). Shared by every view that uses it.
#[derive(Debug)]
pub struct HostFile {
    path: PathBuf,
    backend: Box<dyn Backend>,
    id: u64,
    len: AtomicU64,
    writable: bool,
}

impl HostFile {
    /// Opens read-only unless `writable`. Lower layers are always opened read-only. A URL
    /// (`s3://`, `http://`, `https://`) opens the remote object, which is never writable.
    pub fn open(path: &Path, writable: bool) -> Result<Arc<HostFile>> {
        if let Some(url) = RemoteUrl::from_path(path)? {
            if writable {
                return Err(Error::new(
                    Kind::ReadOnly,
                    format!("{url}: remote images are read-only"),
                ));
            }
            let obj = registry::open(&url)?;
            let len = obj.size();
            return Ok(Self::with_backend(path, Box::new(obj), len, false));
        }
        let (file, len) = LocalFile::open(path, writable)?;
        Ok(Self::with_backend(path, Box::new(file), len, writable))
    }

    fn with_backend(
        path: &Path,
        backend: Box<dyn Backend>,
        len: u64,
        writable: bool,
    ) -> Arc<HostFile> {
        Arc::new(HostFile {
            path: path.to_path_buf(),
            backend,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            len: AtomicU64::new(len),
            writable,
        })
    }

    /// The name the user (or the image that refers to this file) gave it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A process-unique id, used in cache keys.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Identifies the file for loop detection.
    pub fn key(&self) -> FileKey {
        self.backend.key()
    }

    /// The local file behind this one, for what needs a real descriptor (locks, kernel
    /// passthrough); `None` for files that do not live on this host.
    pub fn as_local_file(&self) -> Option<&File> {
        self.backend.as_local_file()
    }

    /// The remote object behind this file, if it is one.
    pub fn remote(&self) -> Option<&RemoteObject> {
        self.backend.remote()
    }

    /// Fails with Corrupt unless [off, off+len) lies inside the file.
    pub fn check_range(&self, field: &str, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::corrupt(
                &self.path,
                field,
                off,
                format!(
                    "{len} bytes reach past the end of the file ({} bytes)",
                    self.len()
                ),
            )),
        }
    }

    /// Reads exactly `buf.len()` bytes; the range must lie inside the file.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64, field: &str) -> Result<()> {
        self.check_range(field, off, buf.len() as u64)?;
        let done = self
            .read_fully(buf, off)
            .map_err(|e| Error::io(&self.path, &format!("read {field} at {off:#x}"), e))?;
        if done < buf.len() {
            return Err(Error::io(
                &self.path,
                &format!("read {field} at {off:#x}"),
                io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        Ok(())
    }

    /// Reads a whole table of `len` bytes, bounded by `limit` so a hostile header cannot make
    /// us allocate gigabytes.
    pub fn read_table(&self, off: u64, len: u64, limit: u64, field: &str) -> Result<Vec<u8>> {
        if len > limit {
            return Err(Error::corrupt(
                &self.path,
                field,
                off,
                format!("size {len} bytes exceeds the limit of {limit} bytes"),
            ));
        }
        self.check_range(field, off, len)?;
        let mut buf = vec![0u8; len as usize];
        self.read_exact_at(&mut buf, off, field)?;
        Ok(buf)
    }

    /// Reads guest data that starts inside the file; bytes past the end of the file read as
    /// zeros (as QEMU's file driver does for a short final cluster). A start past the end is
    /// an error: the table that pointed there is corrupt.
    pub fn read_data_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let len = self.len();
        if off >= len && !buf.is_empty() {
            return Err(Error::corrupt(
                &self.path,
                "data",
                off,
                format!("points past the end of the file ({len} bytes)"),
            ));
        }
        let avail = ((len - off).min(buf.len() as u64)) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        // A file that shrank under us reads as zeros past its new end.
        let done = self
            .read_fully(head, off)
            .map_err(|e| Error::io(&self.path, &format!("read data at {off:#x}"), e))?;
        head[done..].fill(0);
        tail.fill(0);
        Ok(())
    }

    /// Reads until `buf` is full or the backend reports the end; returns the bytes read.
    fn read_fully(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.backend.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    pub fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.backend
            .write_all_at(buf, off)
            .map_err(|e| Error::io(&self.path, &format!("write at {off:#x}"), e))?;
        let end = off + buf.len() as u64;
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    pub fn sync_data(&self) -> Result<()> {
        self.backend
            .sync_data()
            .map_err(|e| Error::io(&self.path, "fdatasync", e))
    }

    /// Frees [off, off+len) so it reads as zeros. `Ok(false)` when this file (its file
    /// system or its backend) cannot; the bytes are then untouched.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<bool> {
        self.backend
            .punch_hole(off, len)
            .map_err(|e| Error::io(&self.path, &format!("punch hole at {off:#x}"), e))
    }

    /// Re-reads the size from the host (after another component grew the file).
    pub fn refresh_len(&self) -> Result<u64> {
        let len = self
            .backend
            .current_len()
            .map_err(|e| Error::io(&self.path, "stat", e))?;
        self.len.store(len, Ordering::Release);
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn data_reads_zero_fill_past_eof_but_reject_a_start_past_eof() {
        let dir = std::env::temp_dir().join(format!("vmfs-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&[7u8; 10])
            .unwrap();
        let f = HostFile::open(&p, false).unwrap();
        let mut buf = [1u8; 8];
        f.read_data_at(&mut buf, 6).unwrap();
        assert_eq!(buf, [7, 7, 7, 7, 0, 0, 0, 0]);
        assert!(f.read_data_at(&mut buf, 10).is_err());
        assert!(f.read_exact_at(&mut buf, 6, "x").is_err());
        assert!(f.read_table(0, 8, 4, "t").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
