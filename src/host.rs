//! Host files: positioned I/O with bounds checks and errors that name the file.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One open image file (a layer, an extent, a data file). Shared by every view that uses it.
#[derive(Debug)]
pub struct HostFile {
    path: PathBuf,
    file: File,
    id: u64,
    len: AtomicU64,
    writable: bool,
    dev_ino: (u64, u64),
}

impl HostFile {
    /// Opens read-only unless `writable`. Lower layers are always opened read-only.
    pub fn open(path: &Path, writable: bool) -> Result<Arc<HostFile>> {
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
        Ok(Arc::new(HostFile {
            path: path.to_path_buf(),
            file,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            len: AtomicU64::new(meta.len()),
            writable,
            dev_ino: (meta.dev(), meta.ino()),
        }))
    }

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

    /// (st_dev, st_ino): identifies the file for loop detection.
    pub fn dev_ino(&self) -> (u64, u64) {
        self.dev_ino
    }

    pub fn std_file(&self) -> &File {
        &self.file
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
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| Error::io(&self.path, &format!("read {field} at {off:#x}"), e))
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
        let mut done = 0;
        while done < head.len() {
            match self.file.read_at(&mut head[done..], off + done as u64) {
                Ok(0) => break, // the file shrank under us: zero-fill
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, &format!("read data at {off:#x}"), e)),
            }
        }
        head[done..].fill(0);
        tail.fill(0);
        Ok(())
    }

    pub fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io(&self.path, &format!("write at {off:#x}"), e))?;
        let end = off + buf.len() as u64;
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    pub fn sync_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "fdatasync", e))
    }

    /// Re-reads the size from the host (after another component grew the file).
    pub fn refresh_len(&self) -> Result<u64> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?;
        self.len.store(meta.len(), Ordering::Release);
        Ok(meta.len())
    }
}

/// Big- and little-endian field readers over a byte slice. Out-of-range reads yield 0 rather
/// than panic; callers validate lengths before decoding.
pub mod endian {
    fn get<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = off.checked_add(N).and_then(|end| b.get(off..end)) {
            a.copy_from_slice(s);
        }
        a
    }
    pub fn be16(b: &[u8], off: usize) -> u16 {
        u16::from_be_bytes(get(b, off))
    }
    pub fn be32(b: &[u8], off: usize) -> u32 {
        u32::from_be_bytes(get(b, off))
    }
    pub fn be64(b: &[u8], off: usize) -> u64 {
        u64::from_be_bytes(get(b, off))
    }
    pub fn le16(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(get(b, off))
    }
    pub fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(get(b, off))
    }
    pub fn le64(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(get(b, off))
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

    #[test]
    fn endian_helpers_never_panic() {
        assert_eq!(endian::be32(&[0, 0, 1, 0], 0), 256);
        assert_eq!(endian::le32(&[0, 1], 0), 0);
        assert_eq!(endian::be64(&[], usize::MAX), 0);
    }
}
