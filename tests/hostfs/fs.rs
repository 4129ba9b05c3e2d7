//! The passthrough itself: inode numbers for backing paths, open handles, the recording log and
//! the fault rules, and the FUSE handlers.

use super::{Event, Fault, Kind, Op};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attributes are never cached: another process may change the backing files.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

pub(super) struct State {
    backing: PathBuf,
    nodes: Mutex<Nodes>,
    handles: Mutex<HashMap<u64, std::sync::Arc<Handle>>>,
    next_fh: AtomicU64,
    pub(super) seq: AtomicU64,
    pub(super) log: Mutex<Log>,
    /// Injected rules in order; `None` never (kept as Option so ids stay stable).
    pub(super) faults: Mutex<Vec<Option<Rule>>>,
}

#[derive(Default)]
pub(super) struct Log {
    pub(super) events: Option<Vec<Event>>,
}

pub(super) struct Rule {
    fault: Fault,
    pub(super) matched: u64,
    pub(super) failed: u64,
    pub(super) removed: bool,
}

impl Rule {
    pub(super) fn new(fault: Fault) -> Rule {
        Rule {
            fault,
            matched: 0,
            failed: 0,
            removed: false,
        }
    }

    fn matches(&self, kind: Kind, file: &str, range: Option<(u64, u64)>, grows: bool) -> bool {
        let f = &self.fault;
        let name_ok = f.file.as_deref().is_none_or(|want| {
            file == want || Path::new(file).file_name() == Some(OsStr::new(want))
        });
        let range_ok = match (&f.offsets, range) {
            (Some(r), Some((off, len))) => off < r.end && off.saturating_add(len) > r.start,
            _ => true,
        };
        !self.removed && f.kinds.contains(&kind) && name_ok && range_ok && (!f.growing || grows)
    }
}

/// A backing path for every inode number handed to the kernel (never reused).
struct Nodes {
    by_ino: HashMap<u64, PathBuf>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

struct Handle {
    file: File,
    /// Relative path when opened, as events name it.
    name: String,
}

impl State {
    pub(super) fn new(backing: PathBuf) -> State {
        let mut nodes = Nodes {
            by_ino: HashMap::new(),
            by_path: HashMap::new(),
            next: ROOT + 1,
        };
        nodes.by_ino.insert(ROOT, PathBuf::new());
        nodes.by_path.insert(PathBuf::new(), ROOT);
        State {
            backing,
            nodes: Mutex::new(nodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            seq: AtomicU64::new(0),
            log: Mutex::new(Log::default()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// The relative path of `ino`.
    fn rel(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        let nodes = self.nodes.lock().unwrap();
        nodes.by_ino.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    /// The inode number of a relative path, allocating one the first time.
    fn ino_of(&self, rel: &Path) -> u64 {
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(&ino) = nodes.by_path.get(rel) {
            return ino;
        }
        let ino = nodes.next;
        nodes.next += 1;
        nodes.by_ino.insert(ino, rel.to_path_buf());
        nodes.by_path.insert(rel.to_path_buf(), ino);
        ino
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.rel(parent)?.join(name))
    }

    fn forget_path(&self, rel: &Path) {
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(ino) = nodes.by_path.remove(rel) {
            nodes.by_ino.remove(&ino);
        }
    }

    /// Moves `from` and everything below it to `to`.
    fn rename_paths(&self, from: &Path, to: &Path) {
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(ino) = nodes.by_path.remove(to) {
            nodes.by_ino.remove(&ino);
        }
        let moved: Vec<(PathBuf, u64)> = nodes
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        for (old, ino) in moved {
            let new = to.join(old.strip_prefix(from).unwrap_or(Path::new("")));
            nodes.by_path.remove(&old);
            nodes.by_path.insert(new.clone(), ino);
            nodes.by_ino.insert(ino, new);
        }
    }

    fn attr_of(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.full(rel)).map_err(Errno::from)?;
        Ok(attr(self.ino_of(rel), &meta))
    }

    fn handle(&self, fh: FileHandle) -> Result<std::sync::Arc<Handle>, Errno> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_handle(&self, file: File, rel: &Path) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let name = rel.to_string_lossy().into_owned();
        let h = std::sync::Arc::new(Handle { file, name });
        self.handles.lock().unwrap().insert(fh, h);
        FileHandle(fh)
    }

    /// The errno of the first rule that fires for this operation, if any.
    fn fault(&self, kind: Kind, file: &str, range: Option<(u64, u64)>, grows: bool) -> Option<i32> {
        let mut rules = self.faults.lock().unwrap();
        for r in rules.iter_mut().flatten() {
            if !r.matches(kind, file, range, grows) {
                continue;
            }
            r.matched += 1;
            let n = r.matched - 1;
            let fires = n >= r.fault.after && r.fault.times.is_none_or(|t| n - r.fault.after < t);
            if fires {
                r.failed += 1;
                return Some(r.fault.errno);
            }
        }
        None
    }

    /// Runs `io` on `h` unless a rule fails it, and records it when `op` is given.
    fn run(
        &self,
        h: &Handle,
        kind: Kind,
        range: Option<(u64, u64)>,
        grows: bool,
        op: Option<Op>,
        io: impl FnOnce(&File) -> io::Result<()>,
    ) -> Result<(), i32> {
        let started = self.seq.fetch_add(1, Ordering::SeqCst);
        let result = match self.fault(kind, &h.name, range, grows) {
            Some(errno) => Err(errno),
            None => io(&h.file).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
        };
        if let Some(op) = op {
            let mut log = self.log.lock().unwrap();
            if let Some(events) = log.events.as_mut() {
                let completed = self.seq.fetch_add(1, Ordering::SeqCst);
                events.push(Event {
                    file: h.name.clone(),
                    op,
                    started,
                    completed,
                    result,
                });
            }
        }
        result
    }

    fn recording(&self) -> bool {
        self.log.lock().unwrap().events.is_some()
    }
}

fn attr(ino: u64, m: &Metadata) -> FileAttr {
    let kind = match m.mode() & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    };
    let time = |s: i64, ns: i64| {
        UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32)
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

pub(super) fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an open descriptor touches no memory of ours.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cpath(p: &Path) -> Result<CString, Errno> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn errno_last() -> Errno {
    Errno::from(io::Error::last_os_error())
}

/// Open flags the backing file takes from the caller's (O_DIRECT would need aligned buffers;
/// creation flags are handled by create/the kernel).
fn backing_flags(flags: i32) -> i32 {
    flags & !(libc::O_DIRECT | libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_ACCMODE)
}

fn open_backing(path: &Path, flags: i32, mode: Option<u32>) -> io::Result<File> {
    let acc = flags & libc::O_ACCMODE;
    let mut o = OpenOptions::new();
    o.read(acc != libc::O_WRONLY)
        .write(acc != libc::O_RDONLY)
        .custom_flags(backing_flags(flags) & !libc::O_APPEND);
    if let Some(m) = mode {
        o.create_new(true).mode(m);
    }
    o.open(path)
}

pub(super) struct PassFs(pub(super) std::sync::Arc<State>);

impl Filesystem for PassFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.child(parent, name).and_then(|p| self.0.attr_of(&p)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let by_handle = fh.and_then(|fh| self.0.handle(fh).ok()).map(|h| {
            h.file
                .metadata()
                .map(|m| attr(ino.0, &m))
                .map_err(Errno::from)
        });
        let r = by_handle.unwrap_or_else(|| self.0.rel(ino).and_then(|p| self.0.attr_of(&p)));
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let rel = self.0.rel(ino)?;
            let full = self.0.full(&rel);
            if let Some(m) = mode {
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(m))
                    .map_err(Errno::from)?;
            }
            if let Some(len) = size {
                let h = match fh.map(|fh| self.0.handle(fh)) {
                    Some(h) => h?,
                    None => {
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&full)
                            .map_err(Errno::from)?;
                        std::sync::Arc::new(Handle {
                            file: f,
                            name: rel.to_string_lossy().into_owned(),
                        })
                    }
                };
                let grows = h.file.metadata().map(|m| len > m.len()).unwrap_or(false);
                self.0
                    .run(&h, Kind::SetLen, None, grows, Some(Op::SetLen(len)), |f| {
                        f.set_len(len)
                    })
                    .map_err(Errno::from_i32)?;
            }
            if let Some(t) = mtime {
                let t = match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let f = File::open(&full).map_err(Errno::from)?;
                f.set_modified(t).map_err(Errno::from)?;
            }
            self.0.attr_of(&rel)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .0
            .rel(ino)
            .and_then(|p| std::fs::read_link(self.0.full(&p)).map_err(Errno::from))
        {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.0.child(parent, name).and_then(|rel| {
            let c = cpath(&self.0.full(&rel))?;
            // SAFETY: c is a valid NUL-terminated path.
            if unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) } != 0 {
                return Err(errno_last());
            }
            self.0.attr_of(&rel)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.0.child(parent, name).and_then(|rel| {
            std::fs::remove_file(self.0.full(&rel)).map_err(Errno::from)?;
            self.0.forget_path(&rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.0.child(parent, name).and_then(|rel| {
            std::fs::remove_dir(self.0.full(&rel)).map_err(Errno::from)?;
            self.0.forget_path(&rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.0.child(parent, link_name).and_then(|rel| {
            std::os::unix::fs::symlink(target, self.0.full(&rel)).map_err(Errno::from)?;
            self.0.attr_of(&rel)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.bits() != 0 {
            return reply.error(Errno::EINVAL);
        }
        let r = (|| {
            let from = self.0.child(parent, name)?;
            let to = self.0.child(newparent, newname)?;
            std::fs::rename(self.0.full(&from), self.0.full(&to)).map_err(Errno::from)?;
            self.0.rename_paths(&from, &to);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.0.rel(ino).and_then(|rel| {
            let f = open_backing(&self.0.full(&rel), flags.0, None).map_err(Errno::from)?;
            Ok(self.0.add_handle(f, &rel))
        });
        match r {
            Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.0.child(parent, name).and_then(|rel| {
            let full = self.0.full(&rel);
            let f = match open_backing(&full, flags, Some(mode & !umask & 0o7777)) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                    open_backing(&full, flags, None)
                }
                r => r,
            }
            .map_err(Errno::from)?;
            let a = self.0.attr_of(&rel)?;
            Ok((a, self.0.add_handle(f, &rel)))
        });
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let h = match self.0.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        if let Some(errno) = self
            .0
            .fault(Kind::Read, &h.name, Some((offset, size.into())), false)
        {
            return reply.error(Errno::from_i32(errno));
        }
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match h.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(Errno::from(e)),
            }
        }
        reply.data(&buf[..done]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let h = match self.0.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let end = offset.saturating_add(data.len() as u64);
        let grows = h.file.metadata().map(|m| end > m.len()).unwrap_or(false);
        let op = self.0.recording().then(|| Op::Write {
            off: offset,
            data: data.to_vec(),
        });
        let range = Some((offset, data.len() as u64));
        match self.0.run(&h, Kind::Write, range, grows, op, |f| {
            f.write_all_at(data, offset)
        }) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let h = match self.0.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let op = Some(Op::Fsync { datasync });
        let r = self.0.run(&h, Kind::Fsync, None, false, op, |f| {
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let rel = match self.0.rel(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let entries = match std::fs::read_dir(self.0.full(&rel)) {
            Ok(d) => d,
            Err(e) => return reply.error(Errno::from(e)),
        };
        let mut list: Vec<(u64, FileType, std::ffi::OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        for e in entries.flatten() {
            let child = rel.join(e.file_name());
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                Ok(t) if t.is_symlink() => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            list.push((self.0.ino_of(&child), kind, e.file_name()));
        }
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let Ok(c) = cpath(&self.0.backing) else {
            return reply.error(Errno::EINVAL);
        };
        // SAFETY: statvfs writes into a zeroed struct we own; c is a valid path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return reply.error(errno_last());
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let h = match self.0.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let end = offset.saturating_add(length);
        let grows = mode & libc::FALLOC_FL_KEEP_SIZE == 0
            && h.file.metadata().map(|m| end > m.len()).unwrap_or(false);
        let op = Some(Op::Fallocate {
            mode,
            off: offset,
            len: length,
        });
        let range = Some((offset, length));
        match self.0.run(&h, Kind::Fallocate, range, grows, op, |f| {
            fallocate(f, mode, offset, length)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let h = match self.0.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        // SAFETY: lseek on our own descriptor; handles are never shared with a reader of the
        // file position (all I/O here is positioned).
        let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
        if r < 0 {
            reply.error(errno_last());
        } else {
            reply.offset(r);
        }
    }
}
