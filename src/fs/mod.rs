//! The FUSE file system: an immutable tree of directories and disk files, each file a `View`.
//!
//! Handlers take no lock of their own (the tree is fixed at mount); library errors become
//! errno here and nowhere else, with a log line.

pub mod attr;
mod passthrough;
mod state;
#[cfg(test)]
mod tests;
pub mod tree;

pub use state::DiskFs;
use state::{FH_WRITE, MAX_READ, READ_BUF, fail, nanos};

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tree::NodeKind;

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for flag in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
        ] {
            if config.add_capabilities(flag).is_err() {
                log::debug!("kernel lacks {flag:?}");
            }
        }
        // Depth 1: the image files may live on a plain file system, and this mount may still
        // sit under one stacking file system (overlayfs).
        self.passthrough = self.allow_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        log::debug!("kernel passthrough: {}", self.passthrough);
        Ok(())
    }

    fn destroy(&mut self) {
        // Reached on every unmount, clean or not: make acknowledged writes durable.
        DiskFs::flush_all(&self.writable_views());
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name
            .to_str()
            .and_then(|n| self.tree.lookup(parent.0, n))
            .and_then(|ino| self.attr(ino));
        match found {
            Some((a, ttl)) => reply.entry(&ttl, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some((a, ttl)) => reply.attr(&ttl, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some((a, ttl)) = self.attr(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(new_size) = size.filter(|s| *s != a.size) {
            let path = self.disk(ino).map(|d| d.path.as_str()).unwrap_or("?");
            log::warn!(
                "{path}: refused to change the size to {new_size} bytes: a disk's size never changes"
            );
            return reply.error(Errno::EPERM);
        }
        // Modes, owners and times are fixed; answering with the attributes keeps tools like
        // `cp -p` and `touch` quiet.
        reply.attr(&ttl, &a);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let d = match self.disk(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let wants_write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if wants_write && !d.writable {
            return reply.error(Errno::EROFS);
        }
        if !wants_write && !d.writable && self.passthrough {
            let backing = d.backing.get_or_init(|| {
                let file = passthrough::identity_file(&d.view)?;
                reply
                    .open_backing(file.as_local_file()?)
                    .map_err(|e| log::info!("{}: no kernel passthrough: {e}", d.path))
                    .ok()
            });
            if let Some(id) = backing {
                return reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), id);
            }
        }
        // Only this mount changes a view, so the page cache stays valid across opens.
        let fh = if wants_write { FH_WRITE } else { 0 };
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let d = match self.disk(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let len = (size as usize).min(MAX_READ);
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match d.view.read(offset, &mut buf[..len]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(fail(
                    &d.path,
                    &format!("read {len} bytes at {offset:#x}"),
                    &e,
                )),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let d = match self.disk(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        if !d.writable {
            return reply.error(Errno::EROFS);
        }
        match d.view.write(offset, data) {
            Ok(()) => {
                d.mtime_ns
                    .store(nanos(SystemTime::now()), Ordering::Relaxed);
                reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
            }
            Err(e) => reply.error(fail(
                &d.path,
                &format!("write {} bytes at {offset:#x}", data.len()),
                &e,
            )),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.disk(ino) {
            Ok(d) if d.writable && fh.0 == FH_WRITE => match d.view.flush() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail(&d.path, "flush", &e)),
            },
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.disk(ino) {
            Ok(d) if d.writable => match d.view.flush() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail(&d.path, "fsync", &e)),
            },
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let d = match self.disk(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero_range = mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE;
        if mode != PUNCH && !zero_range {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        if !d.writable {
            return reply.error(Errno::EROFS);
        }
        match d.view.discard(offset, length) {
            Ok(()) => {
                d.mtime_ns
                    .store(nanos(SystemTime::now()), Ordering::Relaxed);
                reply.ok()
            }
            Err(e) => reply.error(fail(
                &d.path,
                &format!("discard {length} bytes at {offset:#x}"),
                &e,
            )),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let d = match self.disk(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        if off >= d.view.size() && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE) {
            return reply.error(Errno::ENXIO);
        }
        let found = match whence {
            libc::SEEK_DATA => d.view.next_data(off).map(|o| o.ok_or(Errno::ENXIO)),
            libc::SEEK_HOLE => d.view.next_hole(off).map(Ok),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(Ok(pos)) => reply.offset(i64::try_from(pos).unwrap_or(i64::MAX)),
            Ok(Err(e)) => reply.error(e),
            Err(e) => reply.error(fail(&d.path, &format!("seek from {off:#x}"), &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.get(ino.0).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Some(NodeKind::File { .. }) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (child, _kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            let Some((a, ttl)) = self.attr(*child) else {
                continue;
            };
            if reply.add(
                INodeNo(*child),
                (i + 1) as u64,
                name,
                &ttl,
                &a,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self
            .disks
            .iter()
            .map(|d| d.view.size())
            .fold(0, u64::saturating_add);
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            self.tree.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let Some(node) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let writable = match node.kind {
            NodeKind::File { view } => self.disks.get(view).is_some_and(|d| d.writable),
            NodeKind::Dir(_) => false,
        };
        if mask.contains(AccessFlags::W_OK) && !writable {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn setxattr(
        &self,
        _r: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::ENOTSUP));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::ENOTSUP));
    }

    // The tree is fixed: nothing can be created, removed or renamed.
    fn mknod(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EACCES);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EACCES);
    }

    fn create(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EACCES);
    }

    fn symlink(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _t: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EACCES);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _p: INodeNo, _n: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EACCES);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }
}
