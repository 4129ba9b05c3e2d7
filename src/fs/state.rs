//! The state behind the FUSE handlers: the fixed tree, one `Disk` per exposed file, and the
//! lookups the handlers share (attributes, directory entries, errno mapping).

use super::attr::{self, Owner};
use super::tree::{self, NodeKind, Tree};
use crate::mount::{Exposed, Opened};
use fuser::{Errno, FileType, INodeNo};
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vmfs_mount::error::Error;
use vmfs_mount::view::View;

/// Nodes, names and read-only attributes never change while mounted.
pub(super) const STATIC_TTL: Duration = Duration::from_secs(3600);
/// A writable disk's allocation and mtime change with writes.
pub(super) const WRITABLE_TTL: Duration = Duration::from_secs(1);
/// Largest read we serve in one request (the kernel asks for at most max_pages).
pub(super) const MAX_READ: usize = 16 << 20;
/// File handle of an open for writing (flush/fsync then reach the disk).
pub(super) const FH_WRITE: u64 = 1;

/// One disk file of the mount.
pub(super) struct Disk {
    pub(super) view: Arc<View>,
    pub(super) writable: bool,
    /// Nanoseconds since the epoch: the layer's mtime or snapshot date, then the last write.
    pub(super) mtime_ns: AtomicU64,
    /// For log lines: where in the mount this file is.
    pub(super) path: String,
}

pub struct DiskFs {
    pub(super) tree: Tree,
    pub(super) disks: Vec<Disk>,
    pub(super) owner: Owner,
    pub(super) mounted_at: SystemTime,
}

thread_local! {
    pub(super) static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DiskFs {
    pub fn new(opened: &Opened) -> DiskFs {
        let disk = |e: &Exposed, path: String| Disk {
            view: e.view.clone(),
            writable: e.writable,
            mtime_ns: AtomicU64::new(nanos(e.spec.mtime)),
            path,
        };
        let mut disks = vec![disk(&opened.live, tree::DISK_FILE_NAME.to_string())];
        for s in &opened.snapshots {
            disks.push(disk(
                s,
                format!("snapshots/{}/{}", s.spec.name, tree::DISK_FILE_NAME),
            ));
        }
        let names: Vec<String> = opened
            .snapshots
            .iter()
            .map(|s| s.spec.name.clone())
            .collect();
        DiskFs {
            tree: Tree::build(&names),
            disks,
            owner: Owner::current(),
            mounted_at: SystemTime::now(),
        }
    }

    /// Flushes every writable view; returns false if one failed (each failure is logged).
    pub fn flush_all(disks: &[Arc<View>]) -> bool {
        let mut ok = true;
        for v in disks {
            if let Err(e) = v.flush() {
                log::error!("flush failed: {e}");
                ok = false;
            }
        }
        ok
    }

    /// The views whose data a flush may have to make durable.
    pub fn writable_views(&self) -> Vec<Arc<View>> {
        self.disks
            .iter()
            .filter(|d| d.writable)
            .map(|d| d.view.clone())
            .collect()
    }

    pub(super) fn attr(&self, ino: u64) -> Option<(fuser::FileAttr, Duration)> {
        let node = self.tree.get(ino)?;
        Some(match &node.kind {
            NodeKind::Dir(_) => (
                attr::dir(ino, self.mounted_at, self.tree.subdirs(ino), self.owner),
                STATIC_TTL,
            ),
            NodeKind::File { view } => {
                let d = self.disks.get(*view)?;
                let allocated = d.view.allocated_bytes().unwrap_or_else(|e| {
                    log::warn!("{}: cannot count allocated blocks: {e}", d.path);
                    0
                });
                let mtime = UNIX_EPOCH + Duration::from_nanos(d.mtime_ns.load(Ordering::Relaxed));
                let a =
                    attr::disk_file(ino, d.view.size(), allocated, mtime, d.writable, self.owner);
                (a, if d.writable { WRITABLE_TTL } else { STATIC_TTL })
            }
        })
    }

    pub(super) fn disk(&self, ino: INodeNo) -> Result<&Disk, Errno> {
        match self.tree.get(ino.0).map(|n| &n.kind) {
            Some(NodeKind::File { view }) => self.disks.get(*view).ok_or(Errno::ENOENT),
            Some(NodeKind::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Directory entries of `ino` including "." and "..", in a stable order.
    pub(super) fn entries(&self, ino: u64) -> Result<Vec<(u64, FileType, String)>, Errno> {
        let node = self.tree.get(ino).ok_or(Errno::ENOENT)?;
        let NodeKind::Dir(children) = &node.kind else {
            return Err(Errno::ENOTDIR);
        };
        let mut out = vec![
            (ino, FileType::Directory, ".".into()),
            (node.parent, FileType::Directory, "..".into()),
        ];
        for (name, child) in children {
            let kind = match self.tree.get(*child).map(|n| &n.kind) {
                Some(NodeKind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            out.push((*child, kind, name.clone()));
        }
        Ok(out)
    }
}

pub(super) fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The errno for a library error, with the log line this boundary owes.
pub(super) fn fail(path: &str, op: &str, e: &Error) -> Errno {
    log::error!("{path}: {op}: {e}");
    Errno::from_i32(e.errno())
}
