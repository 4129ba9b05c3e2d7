//! The FUSE file system: a tree of directories and exposed files that may change while
//! mounted.
//!
//! - `tree.rs`: the nodes (inodes allocated as nodes appear, never reused; removed nodes stay
//!   resolvable until the kernel forgets them), plain data behind one lock.
//! - `state.rs`: `SharedTree` (the lock, held only to read or change the tree, never across
//!   I/O; changes queue kernel cache invalidations sent by a thread of their own) and the
//!   attribute and entry lookups the handlers share.
//! - `handler.rs`: `DirHandler`, what a directory does beyond name lookups (refresh its
//!   entries, mkdir/rmdir/rename); `viewdir.rs`: the handler of a view's directory.
//! - the files themselves are `vmfs_mount::expose::ExposedFile`s: handlers read, write, seek
//!   and count blocks through that trait and never ask what kind of file they serve.
//!
//! Library errors become errno here and nowhere else, with a log line.

pub mod attr;
pub mod changesdir;
pub mod clonedir;
pub mod handler;
pub mod snapshotdir;
mod state;
#[cfg(test)]
mod tests;
pub mod tree;
pub mod viewdir;

pub use state::{DiskFs, SharedTree};
use state::{FH_WRITE, MAX_READ, READ_BUF};

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::SystemTime;
use tree::Ino;

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
        self.tree.flush_all();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        self.refresh(parent.0);
        let found = self
            .tree
            .read(|t| t.lookup(parent.0, name))
            .and_then(|ino| Some((ino, self.attr(ino)?)));
        match found {
            Some((ino, (a, ttl))) => self.reply_entry(ino, &a, ttl, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.tree.change(|t| t.forget(ino.0, nlookup));
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
            log::warn!(
                "{}: refused to change the size to {new_size} bytes: a disk's size never changes",
                self.path(ino.0)
            );
            return reply.error(Errno::EPERM);
        }
        // Modes, owners and times are fixed; answering with the attributes keeps tools like
        // `cp -p` and `touch` quiet.
        reply.attr(&ttl, &a);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let f = match self.tree.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let wants_write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if wants_write && !f.writable() {
            return reply.error(Errno::EROFS);
        }
        if !wants_write
            && !f.mutable()
            && self.passthrough
            && let Some(id) = self.backing_id(ino.0, &*f, &reply)
        {
            self.tree.read(|t| t.opened(ino.0));
            return reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &id);
        }
        let fh = if wants_write { FH_WRITE } else { 0 };
        self.tree.read(|t| t.opened(ino.0));
        // A file whose bytes never change keeps its page cache across opens. Others drop it
        // at open; while open, writes through another file showing the same bytes
        // invalidate the pages they change.
        let keep = if f.direct_io() {
            FopenFlags::FOPEN_DIRECT_IO
        } else if f.mutable() {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(fh), keep);
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
        let f = match self.tree.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let len = (size as usize).min(MAX_READ);
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match f.read(offset, &mut buf[..len]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    reply.error(self.fail(ino.0, &format!("read {len} bytes at {offset:#x}"), &e))
                }
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
        let f = match self.tree.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if !f.writable() {
            return reply.error(Errno::EROFS);
        }
        let result = f.write(offset, data);
        self.written(ino.0, offset, data.len() as u64);
        match result {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(self.fail(
                ino.0,
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
        match self.tree.file(ino.0) {
            Ok(f) if f.writable() && fh.0 == FH_WRITE => self.sync(ino.0, &*f, "flush", reply),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.tree.read(|t| t.released(ino.0));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.tree.file(ino.0) {
            Ok(f) if f.writable() => self.sync(ino.0, &*f, "fsync", reply),
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
        let f = match self.tree.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero_range = mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE;
        if mode != PUNCH && !zero_range {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        if !f.writable() {
            return reply.error(Errno::EROFS);
        }
        let result = f.discard(offset, length);
        self.written(ino.0, offset, length);
        match result {
            Ok(()) => reply.ok(),
            Err(e) => {
                reply.error(self.fail(ino.0, &format!("discard {length} bytes at {offset:#x}"), &e))
            }
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
        let f = match self.tree.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        if off >= f.size() && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE) {
            return reply.error(Errno::ENXIO);
        }
        let found = match whence {
            libc::SEEK_DATA => f.next_data(off).map(|o| o.ok_or(Errno::ENXIO)),
            libc::SEEK_HOLE => f.next_hole(off).map(Ok),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(Ok(pos)) => reply.offset(i64::try_from(pos).unwrap_or(i64::MAX)),
            Ok(Err(e)) => reply.error(e),
            Err(e) => reply.error(self.fail(ino.0, &format!("seek from {off:#x}"), &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.refresh(ino.0);
        let found = self.tree.read(|t| {
            t.get(ino.0)
                .map(|n| (n.is_dir(), n.handler().is_some_and(|h| h.changes())))
        });
        match found {
            // A listing that cannot change may stay in the kernel's cache.
            Some((true, false)) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Some((true, true)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some((false, _)) => reply.error(Errno::ENOTDIR),
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
            // The kernel counts a lookup for every entry but "." and "..".
            if i >= 2 {
                self.tree.read(|t| t.remember(*child));
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (bytes, nodes) = self.tree.read(|t| (t.shown_bytes(), t.len() as u64));
        reply.statfs(bytes.div_ceil(4096), 0, 0, nodes, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let writable = self.tree.read(|t| {
            t.get(ino.0).map(|n| match n.file() {
                Some(f) => f.writable(),
                None => n.handler().is_some_and(|h| h.writable()),
            })
        });
        match writable {
            None => reply.error(Errno::ENOENT),
            Some(false) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Some(_) => reply.ok(),
        }
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

    // Directories are made, removed and renamed by their handlers; files are never created.
    fn mkdir(
        &self,
        _r: &Request,
        parent: INodeNo,
        name: &OsStr,
        _m: u32,
        _u: u32,
        reply: ReplyEntry,
    ) {
        let Some(h) = self.tree.handler(parent.0) else {
            return reply.error(Errno::EACCES);
        };
        let Some(name) = name.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        match h.mkdir(&self.tree, parent.0, name) {
            Ok(ino) => match self.attr(ino) {
                Some((a, ttl)) => self.reply_entry(ino, &a, ttl, reply),
                None => reply.error(Errno::ENOENT),
            },
            Err(e) => reply.error(self.fail(parent.0, &format!("mkdir {name}"), &e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(h) = self.tree.handler(parent.0) else {
            return reply.error(Errno::EPERM);
        };
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match h.rmdir(&self.tree, parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(parent.0, &format!("rmdir {name}"), &e)),
        }
    }

    fn rename(
        &self,
        _r: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.tree.handler(parent.0) else {
            return reply.error(Errno::EPERM);
        };
        if flags.contains(fuser::RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let (Some(name), Some(new_name)) = (name.to_str(), new_name.to_str()) else {
            return reply.error(Errno::EINVAL);
        };
        match h.rename(&self.tree, parent.0, name, new_parent.0, new_name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(parent.0, &format!("rename {name} to {new_name}"), &e)),
        }
    }

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
}

impl DiskFs {
    /// Replies with an entry and counts the lookup the kernel now holds.
    fn reply_entry(
        &self,
        ino: Ino,
        a: &fuser::FileAttr,
        ttl: std::time::Duration,
        reply: ReplyEntry,
    ) {
        self.tree.read(|t| t.remember(ino));
        reply.entry(&ttl, a, Generation(0));
    }

    /// Flushes a file, then lets its directory catch up with what the writes changed (a
    /// partitioning tool fsyncs and closes the disk when done).
    fn sync(&self, ino: Ino, f: &dyn vmfs_mount::expose::ExposedFile, op: &str, reply: ReplyEmpty) {
        let result = f.flush();
        if let Some(dir) = self.parent_of(ino) {
            self.refresh(dir);
        }
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(ino, op, &e)),
        }
    }

    /// The kernel passthrough id of read-only file `ino`, made on its first open, if the file
    /// is byte for byte one host file.
    fn backing_id(
        &self,
        ino: Ino,
        f: &dyn vmfs_mount::expose::ExposedFile,
        reply: &ReplyOpen,
    ) -> Option<Arc<fuser::BackingId>> {
        if let Some(known) = self.backing.lock().get(&ino) {
            return known.clone();
        }
        let id = f.identity_file().and_then(|file| {
            reply
                .open_backing(file.as_local_file()?)
                .map_err(|e| log::info!("{}: no kernel passthrough: {e}", self.path(ino)))
                .ok()
                .map(Arc::new)
        });
        self.backing.lock().entry(ino).or_insert(id).clone()
    }
}
