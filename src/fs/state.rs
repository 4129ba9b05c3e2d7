//! The state behind the FUSE handlers: the shared tree with its lock and the thread that
//! tells the kernel what went stale, and the lookups the handlers share (attributes,
//! directory entries, errno mapping).

use super::attr::{self, Owner};
use super::handler::DirHandler;
use super::tree::{Ino, NodeKind, Stale, Tree};
use super::viewdir;
use crate::mount::Opened;
use fuser::{BackingId, Errno, FileType, INodeNo, Notifier};
use parking_lot::{Mutex, RwLock};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, SystemTime};
use vmfs_mount::error::Error;
use vmfs_mount::expose::{ExposedFile, FileOptions};

/// Attributes of read-only files and of directories: they change only with invalidation.
pub(super) const STATIC_TTL: Duration = Duration::from_secs(3600);
/// A writable file's allocation and mtime change with writes.
pub(super) const WRITABLE_TTL: Duration = Duration::from_secs(1);
/// Largest read we serve in one request (the kernel asks for at most max_pages).
pub(super) const MAX_READ: usize = 16 << 20;
/// File handle of an open for writing (flush/fsync then reach the disk).
pub(super) const FH_WRITE: u64 = 1;
/// Longest a write waits for the kernel to drop pages it made stale in other files.
const INVALIDATION_WAIT: Duration = Duration::from_millis(200);

/// One batch for the invalidation thread, and whom to tell when it was sent.
type Batch = (Vec<Stale>, Option<Sender<()>>);

/// The tree behind its lock. The lock is held only while the tree is read or changed, never
/// across I/O: callers take what they need (an `Arc` of a file) and let go.
pub struct SharedTree {
    tree: RwLock<Tree>,
    inval: Invalidator,
}

impl SharedTree {
    pub fn new(tree: Tree) -> SharedTree {
        SharedTree {
            tree: RwLock::new(tree),
            inval: Invalidator::default(),
        }
    }

    /// Runs `f` on the tree under the read lock.
    pub fn read<R>(&self, f: impl FnOnce(&Tree) -> R) -> R {
        f(&self.tree.read())
    }

    /// Runs `f` on the tree under the write lock, then has the kernel drop what it changed.
    pub fn change<R>(&self, f: impl FnOnce(&mut Tree) -> R) -> R {
        let (r, stale) = {
            let mut t = self.tree.write();
            let r = f(&mut t);
            (r, t.take_stale())
        };
        self.inval.send(stale);
        r
    }

    /// Like `change`, for handlers the kernel calls with the directories `locked` held (the
    /// directory of a mkdir, rmdir or rename, and an rmdir's victim): what the change made
    /// stale elsewhere (say `changes/<name>.raw` beside `snapshots/<name>`) is dropped before
    /// this returns, so the caller's next lookup sees it; entries inside `locked` cannot be
    /// dropped until the handler replies (the kernel drops its own dentry anyway) and follow.
    pub fn change_in_locked<R>(&self, locked: &[Ino], f: impl FnOnce(&mut Tree) -> R) -> R {
        let (r, stale) = {
            let mut t = self.tree.write();
            let r = f(&mut t);
            (r, t.take_stale())
        };
        let (later, now): (Vec<Stale>, Vec<Stale>) = stale.into_iter().partition(|s| match s {
            Stale::Entry(parent, _) => locked.contains(parent),
            Stale::Inode(ino) => locked.contains(ino),
            Stale::Data(..) => false,
        });
        self.invalidate_now(now);
        self.inval.send(later);
        r
    }

    /// Has the kernel drop cached pages, attributes or entries, and
    /// waits (a bounded time) until it has: a write
    /// through one file is then visible through the others when the write returns. The bound
    /// breaks the one cycle this could form: two writes through files showing the same bytes,
    /// each waiting for the other's pages.
    pub fn invalidate_now(&self, stale: Vec<Stale>) {
        if stale.is_empty() {
            return;
        }
        let (done_tx, done_rx) = channel();
        if self.inval.send_with(stale, Some(done_tx)) {
            let _ = done_rx.recv_timeout(INVALIDATION_WAIT);
        }
    }

    /// From now on, changes reach the kernel through `notifier` (before this they are
    /// dropped: nothing can be cached before the mount).
    pub fn attach(&self, notifier: Notifier) {
        self.inval.attach(notifier);
    }

    /// The file at `ino`, if it is one.
    pub fn file(&self, ino: Ino) -> Result<Arc<dyn ExposedFile>, Errno> {
        self.read(|t| match t.get(ino).map(|n| &n.kind) {
            Some(NodeKind::File(f)) => Ok(f.clone()),
            Some(NodeKind::Dir { .. }) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        })
    }

    /// The handler of directory `dir`, if it has one.
    pub fn handler(&self, dir: Ino) -> Option<Arc<dyn DirHandler>> {
        self.read(|t| t.get(dir).and_then(|n| n.handler().cloned()))
    }

    /// Every writable file (flushing at unmount or on a signal).
    pub fn writable_files(&self) -> Vec<Arc<dyn ExposedFile>> {
        self.read(|t| {
            let mut out = Vec::new();
            let mut todo = vec![super::tree::ROOT];
            while let Some(dir) = todo.pop() {
                for ino in t.children(dir).into_iter().flat_map(|c| c.values()) {
                    match t.get(*ino).map(|n| &n.kind) {
                        Some(NodeKind::Dir { .. }) => todo.push(*ino),
                        Some(NodeKind::File(f)) if f.writable() => out.push(f.clone()),
                        _ => {}
                    }
                }
            }
            out
        })
    }

    /// Closes every writable file cleanly (the session has ended: no request comes any
    /// more); failures are logged.
    pub fn close_all(&self) {
        for f in self.writable_files() {
            if let Err(e) = f.close() {
                log::error!("closing: {e}");
            }
        }
    }

    /// Flushes every writable file; false if one failed (each failure is logged).
    pub fn flush_all(&self) -> bool {
        let mut ok = true;
        for f in self.writable_files() {
            if let Err(e) = f.flush() {
                log::error!("flush failed: {e}");
                ok = false;
            }
        }
        ok
    }
}

/// Sends kernel cache invalidations from a thread of its own: a handler may change the tree
/// while the kernel holds the very directory lock an invalidation needs, so sending from the
/// handler's thread could deadlock.
#[derive(Default)]
struct Invalidator {
    tx: Mutex<Option<Sender<Batch>>>,
}

impl Invalidator {
    fn attach(&self, notifier: Notifier) {
        let (tx, rx) = channel::<Batch>();
        let spawned = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for (batch, done) in rx {
                    for s in batch {
                        let r = match &s {
                            Stale::Entry(parent, name) => {
                                notifier.inval_entry(INodeNo(*parent), OsStr::new(name))
                            }
                            Stale::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                            Stale::Data(ino, off, len) => notifier.inval_inode(
                                INodeNo(*ino),
                                i64::try_from(*off).unwrap_or(i64::MAX),
                                i64::try_from(*len).unwrap_or(i64::MAX),
                            ),
                        };
                        if let Err(e) = r {
                            log::debug!("kernel cache invalidation {s:?}: {e}");
                        }
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            });
        match spawned {
            Ok(_) => *self.tx.lock() = Some(tx),
            Err(e) => log::error!("cannot start the invalidation thread: {e}"),
        }
    }

    fn send(&self, stale: Vec<Stale>) {
        if !stale.is_empty() {
            self.send_with(stale, None);
        }
    }

    /// Queues a batch; false when there is no kernel to tell (not mounted yet).
    fn send_with(&self, stale: Vec<Stale>, done: Option<Sender<()>>) -> bool {
        match &*self.tx.lock() {
            Some(tx) => tx.send((stale, done)).is_ok(),
            None => false,
        }
    }
}

pub struct DiskFs {
    pub(super) tree: Arc<SharedTree>,
    pub(super) owner: Owner,
    /// Passthrough ids of read-only files, made on their first open.
    pub(super) backing: Mutex<HashMap<Ino, Option<Arc<BackingId>>>>,
    /// Passthrough allowed by the user (`-o nopassthrough` turns it off).
    pub(super) allow_passthrough: bool,
    /// Passthrough negotiated with the kernel at init.
    pub(super) passthrough: bool,
}

thread_local! {
    pub(super) static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DiskFs {
    /// The tree for an opened chain: the live view at the root, one directory per snapshot,
    /// each with the files `options` asks for.
    pub fn new(opened: &Opened, options: &FileOptions) -> DiskFs {
        let mut tree = viewdir::build(opened, options);
        let now = SystemTime::now();
        super::changesdir::attach(&mut tree, opened, now);
        if let Some(c) = &opened.clones {
            let found = std::mem::take(&mut *c.found.lock());
            super::clonedir::ClonesDir::attach(&mut tree, c.set.clone(), found, options, now);
        }
        DiskFs {
            tree: Arc::new(SharedTree::new(tree)),
            owner: Owner::current(),
            backing: Mutex::new(HashMap::new()),
            allow_passthrough: true,
            passthrough: false,
        }
    }

    /// Never hands files to the kernel for passthrough (every read comes through us).
    pub fn without_passthrough(mut self) -> DiskFs {
        self.allow_passthrough = false;
        self
    }

    /// The tree, for attaching the kernel notifier and for flushing from outside the session.
    pub fn shared(&self) -> Arc<SharedTree> {
        self.tree.clone()
    }

    /// Attributes of `ino`: the tree is read under its lock, the file's size and allocation
    /// (which may need I/O) after it is released.
    pub(super) fn attr(&self, ino: Ino) -> Option<(fuser::FileAttr, Duration)> {
        enum Found {
            Dir(SystemTime, usize, bool),
            File(Arc<dyn ExposedFile>),
        }
        let found = self.tree.read(|t| {
            let node = t.get(ino)?;
            Some(match &node.kind {
                NodeKind::Dir { handler, .. } => Found::Dir(
                    node.changed,
                    t.subdirs(ino),
                    handler.as_ref().is_some_and(|h| h.writable()),
                ),
                NodeKind::File(f) => Found::File(f.clone()),
            })
        })?;
        Some(match found {
            Found::Dir(changed, subdirs, writable) => (
                attr::dir(ino, changed, subdirs, writable, self.owner),
                STATIC_TTL,
            ),
            Found::File(f) => {
                let allocated = f.allocated_bytes().unwrap_or_else(|e| {
                    log::warn!("{}: cannot count allocated blocks: {e}", self.path(ino));
                    0
                });
                let writable = f.writable();
                let a = attr::file(ino, f.size(), allocated, f.mtime(), writable, self.owner);
                (
                    a,
                    if f.mutable() {
                        WRITABLE_TTL
                    } else {
                        STATIC_TTL
                    },
                )
            }
        })
    }

    /// Where `ino` is in the mount, for log lines.
    pub(super) fn path(&self, ino: Ino) -> String {
        self.tree.read(|t| t.path(ino))
    }

    /// Brings directory `dir` up to date through its handler, if it has one.
    pub(super) fn refresh(&self, dir: Ino) {
        if let Some(h) = self.tree.handler(dir) {
            h.refresh(&self.tree, dir);
        }
    }

    /// The directory holding file `ino`.
    pub(super) fn parent_of(&self, ino: Ino) -> Option<Ino> {
        self.tree.read(|t| t.get(ino).map(|n| n.parent))
    }

    /// Tells the handler of `file`'s directory that bytes of it were written.
    pub(super) fn written(&self, file: Ino, off: u64, len: u64) {
        if let Some(dir) = self.parent_of(file)
            && let Some(h) = self.tree.handler(dir)
        {
            h.written(&self.tree, dir, file, off, len);
        }
    }

    /// Directory entries of `ino` including "." and "..", in a stable order.
    pub(super) fn entries(&self, ino: Ino) -> Result<Vec<(Ino, FileType, String)>, Errno> {
        self.tree.read(|t| {
            let node = t.get(ino).ok_or(Errno::ENOENT)?;
            let children = t.children(ino).ok_or(Errno::ENOTDIR)?;
            let mut out = vec![
                (ino, FileType::Directory, ".".into()),
                (node.parent, FileType::Directory, "..".into()),
            ];
            for (name, child) in children {
                let kind = if t.get(*child).is_some_and(|n| n.is_dir()) {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                out.push((*child, kind, name.clone()));
            }
            Ok(out)
        })
    }

    /// The errno for a library error at `ino`, with the log line this boundary owes.
    pub(super) fn fail(&self, ino: Ino, op: &str, e: &Error) -> Errno {
        log::error!("{}: {op}: {e}", self.path(ino));
        Errno::from_i32(e.errno())
    }
}
