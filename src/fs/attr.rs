//! File attributes of the mount's nodes. Pure functions, so modes and sizes are unit tested.

use fuser::{FileAttr, FileType, INodeNo};
use std::time::SystemTime;

/// Reported block size: large, so that cp and dd pick big requests.
pub const BLKSIZE: u32 = 128 * 1024;

/// The user who mounted: every node belongs to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub fn current() -> Owner {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        unsafe {
            Owner {
                uid: libc::getuid(),
                gid: libc::getgid(),
            }
        }
    }
}

/// A directory: read and search only (changes come through mkdir/rmdir/rename handlers, which
/// do not need the write bit), `subdirs` for the link count.
pub fn dir(ino: u64, mtime: SystemTime, subdirs: usize, writable: bool, owner: Owner) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: FileType::Directory,
        perm: if writable { 0o755 } else { 0o555 },
        nlink: 2 + u32::try_from(subdirs).unwrap_or(u32::MAX - 2),
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// A regular file of `size` bytes of which `allocated` hold data.
pub fn file(
    ino: u64,
    size: u64,
    allocated: u64,
    mtime: SystemTime,
    writable: bool,
    owner: Owner,
) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: allocated.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: FileType::RegularFile,
        perm: if writable { 0o644 } else { 0o444 },
        nlink: 1,
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const ME: Owner = Owner {
        uid: 1000,
        gid: 100,
    };

    #[test]
    fn read_only_files_are_0444_and_writable_0644() {
        let a = file(2, 10 << 20, 1000, UNIX_EPOCH, false, ME);
        assert_eq!(
            (a.perm, a.kind, a.size, a.blocks),
            (0o444, FileType::RegularFile, 10 << 20, 2)
        );
        assert_eq!((a.uid, a.gid, a.nlink), (1000, 100, 1));
        assert_eq!(file(2, 1, 0, UNIX_EPOCH, true, ME).perm, 0o644);
    }

    #[test]
    fn dirs_are_0555_with_links_for_subdirs() {
        let a = dir(3, UNIX_EPOCH, 5, false, ME);
        assert_eq!((a.perm, a.kind, a.nlink), (0o555, FileType::Directory, 7));
        assert_eq!(dir(1, UNIX_EPOCH, usize::MAX, false, ME).nlink, u32::MAX);
        assert_eq!(dir(1, UNIX_EPOCH, 0, true, ME).perm, 0o755);
    }
}
