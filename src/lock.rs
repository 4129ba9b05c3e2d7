//! Image locking that QEMU understands.
//!
//! QEMU's file-posix driver advertises, on every image file it opens, the block permissions it
//! holds and the ones it refuses to share, as shared OFD locks on single bytes: byte 100+N for a
//! permission N it holds, byte 200+N for a permission N it does not share. Before taking a
//! permission it tests (as an exclusive lock would) byte 200+N ("does anyone refuse to share
//! N?"), and for each permission it refuses to share, byte 100+N ("does anyone hold N?").
//! We take and test exactly the same bytes, so QEMU and vmfs-mount exclude each other as two
//! QEMU processes would. Observed with QEMU 10 (permission bits: 0 consistent-read, 1 write,
//! 2 write-unchanged, 3 resize): a writer locks 100, 101, 103, 201, 203; a reader (and every
//! backing file) locks 100, 201, 203.

use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

const PERM_BASE: u64 = 100;
const SHARED_BASE: u64 = 200;

pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
pub const PERM_WRITE: u32 = 1 << 1;
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
pub const PERM_RESIZE: u32 = 1 << 3;
/// QEMU before 7.0 had a fifth permission (graph-mod); no one takes its bytes any more.
const PERM_ALL: u32 = 0x0f;

/// What one open file holds and refuses to share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    pub held: u32,
    pub shared: u32,
}

impl Perms {
    /// A writable image, as QEMU's qcow2/raw format node over it asks.
    pub const WRITER: Perms = Perms {
        held: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// A read-only image or a backing file: nobody may change it under us.
    pub const READER: Perms = Perms {
        held: PERM_CONSISTENT_READ,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// `-U` / force-share: read whatever others do to the file.
    pub const FORCE_SHARE: Perms = Perms {
        held: PERM_CONSISTENT_READ,
        shared: PERM_ALL,
    };

    /// The bytes this open file must lock (shared).
    pub fn lock_bytes(self) -> Vec<u64> {
        let mut v: Vec<u64> = bits(self.held).map(|i| PERM_BASE + i).collect();
        v.extend(bits(!self.shared & PERM_ALL).map(|i| SHARED_BASE + i));
        v
    }

    /// The bytes that must be free of other owners' locks, with the permission each protects
    /// and whether the conflict is on "shared" (someone refuses to share what we want).
    pub fn test_bytes(self) -> Vec<(u64, u32, bool)> {
        let mut v: Vec<(u64, u32, bool)> = bits(self.held)
            .map(|i| (SHARED_BASE + i, 1 << i, false))
            .collect();
        v.extend(bits(!self.shared & PERM_ALL).map(|i| (PERM_BASE + i, 1 << i, true)));
        v
    }
}

fn bits(mask: u32) -> impl Iterator<Item = u64> {
    (0..4u64).filter(move |i| mask & (1 << i) != 0)
}

fn perm_name(p: u32) -> &'static str {
    match p {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "unknown",
    }
}

/// Holds the locks until dropped (closing the files would drop them too).
pub struct LockGuard {
    held: Vec<(Arc<HostFile>, Vec<u64>)>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        for (file, bytes) in &self.held {
            let Some(fd) = file.as_local_file() else {
                continue;
            };
            for &b in bytes {
                let _ = ofd_lock(fd, b, libc::F_UNLCK as libc::c_short);
            }
        }
    }
}

/// Locks the files of a mount: `files_rw` as a writer, `files_ro` as a reader. With
/// `force_share` (read-only mounts only) nothing is refused to others.
pub fn lock_for_mount(files_rw: &[Arc<HostFile>], files_ro: &[Arc<HostFile>]) -> Result<LockGuard> {
    lock_with(files_rw, files_ro, false)
}

/// Like `lock_for_mount`, with QEMU's force-share for a read-only mount.
pub fn lock_for_mount_shared(files_ro: &[Arc<HostFile>]) -> Result<LockGuard> {
    lock_with(&[], files_ro, true)
}

fn lock_with(
    files_rw: &[Arc<HostFile>],
    files_ro: &[Arc<HostFile>],
    force_share: bool,
) -> Result<LockGuard> {
    let ro_perms = if force_share {
        Perms::FORCE_SHARE
    } else {
        Perms::READER
    };
    let mut guard = LockGuard { held: Vec::new() };
    let mut seen = std::collections::HashSet::new();
    let rw = files_rw.iter().map(|f| (f, Perms::WRITER));
    let ro = files_ro.iter().map(|f| (f, ro_perms));
    for (file, perms) in rw.chain(ro) {
        // One file can appear twice (an image listed as its own data file): lock it once.
        if !seen.insert(file.id()) {
            continue;
        }
        // Only local files take locks: nobody can lock a remote object (and remote layers
        // are never written).
        let Some(fd) = file.as_local_file() else {
            continue;
        };
        let mut taken = Vec::new();
        for b in perms.lock_bytes() {
            if let Err(e) = ofd_lock(fd, b, libc::F_RDLCK as libc::c_short) {
                guard.held.push((file.clone(), taken));
                return Err(Error::io(file.path(), &format!("lock byte {b}"), e));
            }
            taken.push(b);
        }
        guard.held.push((file.clone(), taken));
        for (b, perm, shared) in perms.test_bytes() {
            let busy = ofd_test(fd, b)
                .map_err(|e| Error::io(file.path(), &format!("test lock byte {b}"), e))?;
            if busy {
                let what = if shared { "shared " } else { "" };
                return Err(Error::new(
                    Kind::Busy,
                    format!(
                        "{}: failed to get {what}\"{}\" lock: is another process (QEMU?) using the image?",
                        file.path().display(),
                        perm_name(perm)
                    ),
                ));
            }
        }
    }
    Ok(guard)
}

fn flock_for(byte: u64, kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn ofd_lock(file: &File, byte: u64, kind: libc::c_short) -> std::io::Result<()> {
    let mut fl = flock_for(byte, kind);
    // SAFETY: the fd is open for the lifetime of `file`; fl is a valid flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// True if another open file description holds a lock that an exclusive lock would hit.
fn ofd_test(file: &File, byte: u64) -> std::io::Result<bool> {
    let mut fl = flock_for(byte, libc::F_WRLCK as libc::c_short);
    // SAFETY: as in ofd_lock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_match_what_qemu_takes() {
        assert_eq!(Perms::WRITER.lock_bytes(), vec![100, 101, 103, 201, 203]);
        assert_eq!(Perms::READER.lock_bytes(), vec![100, 201, 203]);
        assert_eq!(Perms::FORCE_SHARE.lock_bytes(), vec![100]);
        let t: Vec<u64> = Perms::WRITER.test_bytes().iter().map(|t| t.0).collect();
        assert_eq!(t, vec![200, 201, 203, 101, 103]);
    }

    #[test]
    fn two_writers_exclude_each_other_and_readers_coexist() {
        let dir = std::env::temp_dir().join(format!("vmfs-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let a = HostFile::open(&p, true).unwrap();
        let b = HostFile::open(&p, true).unwrap();
        let c = HostFile::open(&p, false).unwrap();
        let g = lock_for_mount(&[a], &[]).unwrap();
        let e = lock_for_mount(std::slice::from_ref(&b), &[]).err().unwrap();
        assert_eq!(e.kind(), Kind::Busy, "{e}");
        assert_eq!(
            lock_for_mount(&[], std::slice::from_ref(&c))
                .err()
                .unwrap()
                .kind(),
            Kind::Busy
        );
        let shared = lock_for_mount_shared(std::slice::from_ref(&c)).unwrap();
        drop(shared);
        drop(g);
        let g2 = lock_for_mount(&[], std::slice::from_ref(&c)).unwrap();
        assert_eq!(
            lock_for_mount(std::slice::from_ref(&b), &[])
                .err()
                .unwrap()
                .kind(),
            Kind::Busy
        );
        drop(g2);
        lock_for_mount(&[b], &[]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
