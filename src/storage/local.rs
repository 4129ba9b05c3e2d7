//! The local backend: a file on this host, read and written with positioned syscalls.

use super::{Backend, FileKey};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

#[derive(Debug)]
pub struct LocalFile {
    file: File,
    key: FileKey,
}

impl LocalFile {
    /// Opens `path` (read-only unless `writable`); returns the file and its size.
    pub fn open(path: &Path, writable: bool) -> Result<(LocalFile, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        if meta.is_dir() {
            return Err(Error::invalid(format!(
                "{}: is a directory, not a disk image",
                path.display()
            )));
        }
        let key = FileKey::Local {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok((LocalFile { file, key }, meta.len()))
    }
}

impl Backend for LocalFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn current_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on an fd owned by `self.file`.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not supported here (tmpfs of old kernels, some FUSE file systems).
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
            _ => Err(e),
        }
    }

    fn key(&self) -> FileKey {
        self.key.clone()
    }

    fn as_local_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}
