//! The mount's tree of directories and exposed files, changeable while mounted.
//!
//! Inode numbers are allocated as nodes appear and never reused (generation 0 is then always
//! right). A removed node leaves its directory at once but stays resolvable by inode until the
//! kernel forgets its last lookup, so an open file keeps working after its name is gone (as
//! on any POSIX file system). Every change records what the kernel may have cached: the
//! `SharedTree` wrapper (state.rs) hands those records to the invalidation thread.
//!
//! The tree is plain data behind one lock; nothing in here does I/O, so the lock is never held
//! across a read or write of a file.

use super::handler::DirHandler;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use vmfs_mount::error::{Error, Kind, Result};
use vmfs_mount::expose::ExposedFile;

pub type Ino = u64;
pub const ROOT: Ino = 1;
pub const SNAPSHOTS_DIR_NAME: &str = "snapshots";
/// Deepest directory nesting accepted (rename loop and path walks are bounded by it).
const MAX_DEPTH: usize = 64;

pub enum NodeKind {
    /// Children by name (sorted, so listings are stable); an optional handler for what
    /// happens inside (refreshing entries, mkdir, rmdir, rename).
    Dir {
        children: BTreeMap<String, Ino>,
        handler: Option<Arc<dyn DirHandler>>,
    },
    File(Arc<dyn ExposedFile>),
}

pub struct Node {
    pub parent: Ino,
    pub name: String,
    pub kind: NodeKind,
    /// Directories: when their entries last changed (mtime and ctime). Files report their own.
    pub changed: SystemTime,
    /// Lookups the kernel holds on this node (replies with an entry minus forgets).
    lookups: AtomicU64,
    /// Open file handles (opens minus releases).
    opens: AtomicU64,
    /// Still reachable by name.
    linked: bool,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }

    pub fn file(&self) -> Option<&Arc<dyn ExposedFile>> {
        match &self.kind {
            NodeKind::File(f) => Some(f),
            NodeKind::Dir { .. } => None,
        }
    }

    pub fn handler(&self) -> Option<&Arc<dyn DirHandler>> {
        match &self.kind {
            NodeKind::Dir { handler, .. } => handler.as_ref(),
            NodeKind::File(_) => None,
        }
    }
}

/// What the kernel may hold stale after a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    /// The dentry `name` in directory `parent`.
    Entry(Ino, String),
    /// The attributes (and listing) of an inode.
    Inode(Ino),
    /// Cached pages of a file: `len` bytes at `off` (and its attributes).
    Data(Ino, u64, u64),
}

pub struct Tree {
    nodes: HashMap<Ino, Node>,
    next: Ino,
    stale: Vec<Stale>,
}

impl Tree {
    /// A tree holding only the root directory.
    pub fn new(root_changed: SystemTime, root_handler: Option<Arc<dyn DirHandler>>) -> Tree {
        let root = Node {
            parent: ROOT,
            name: String::new(),
            kind: NodeKind::Dir {
                children: BTreeMap::new(),
                handler: root_handler,
            },
            changed: root_changed,
            lookups: AtomicU64::new(0),
            opens: AtomicU64::new(0),
            linked: true,
        };
        Tree {
            nodes: HashMap::from([(ROOT, root)]),
            next: ROOT + 1,
            stale: Vec::new(),
        }
    }

    pub fn get(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Option<Ino> {
        match &self.get(parent)?.kind {
            NodeKind::Dir { children, .. } => children.get(name).copied(),
            NodeKind::File(_) => None,
        }
    }

    /// The children of directory `ino` (None if it is not one).
    pub fn children(&self, ino: Ino) -> Option<&BTreeMap<String, Ino>> {
        match &self.get(ino)?.kind {
            NodeKind::Dir { children, .. } => Some(children),
            NodeKind::File(_) => None,
        }
    }

    /// Adds a directory `name` in `parent`.
    pub fn add_dir(
        &mut self,
        parent: Ino,
        name: &str,
        handler: Option<Arc<dyn DirHandler>>,
        now: SystemTime,
    ) -> Result<Ino> {
        let kind = NodeKind::Dir {
            children: BTreeMap::new(),
            handler,
        };
        self.add(parent, name, kind, now)
    }

    /// Adds a file `name` in `parent`.
    pub fn add_file(
        &mut self,
        parent: Ino,
        name: &str,
        file: Arc<dyn ExposedFile>,
        now: SystemTime,
    ) -> Result<Ino> {
        self.add(parent, name, NodeKind::File(file), now)
    }

    fn add(&mut self, parent: Ino, name: &str, kind: NodeKind, now: SystemTime) -> Result<Ino> {
        check_name(name)?;
        if self.depth(parent) >= MAX_DEPTH {
            return Err(Error::invalid(format!(
                "{}: too deeply nested",
                self.path(parent)
            )));
        }
        let ino = self.next;
        let children = self.children_mut(parent)?;
        if children.contains_key(name) {
            return Err(Error::new(Kind::Exists, format!("{name} exists")));
        }
        children.insert(name.to_string(), ino);
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_string(),
                kind,
                changed: now,
                lookups: AtomicU64::new(0),
                opens: AtomicU64::new(0),
                linked: true,
            },
        );
        self.touch_dir(parent, now);
        Ok(ino)
    }

    /// Removes `name` from `parent`; a directory must be empty. Returns its inode.
    pub fn remove(&mut self, parent: Ino, name: &str, now: SystemTime) -> Result<Ino> {
        let ino = self
            .lookup(parent, name)
            .ok_or_else(|| not_found(&self.path(parent), name))?;
        if self.children(ino).is_some_and(|c| !c.is_empty()) {
            return Err(Error::new(
                Kind::NotEmpty,
                format!("{}: not empty", self.path(ino)),
            ));
        }
        self.unlink(parent, name, ino, now);
        Ok(ino)
    }

    /// Removes `name` from `parent` with everything below it. Returns its inode.
    #[allow(dead_code)] // for directory handlers (snapshot and clone management)
    pub fn remove_all(&mut self, parent: Ino, name: &str, now: SystemTime) -> Result<Ino> {
        let ino = self
            .lookup(parent, name)
            .ok_or_else(|| not_found(&self.path(parent), name))?;
        let below: Vec<(String, Ino)> = self
            .children(ino)
            .map(|c| c.iter().map(|(n, i)| (n.clone(), *i)).collect())
            .unwrap_or_default();
        for (child_name, _) in below {
            self.remove_all(ino, &child_name, now)?;
        }
        self.unlink(parent, name, ino, now);
        Ok(ino)
    }

    fn unlink(&mut self, parent: Ino, name: &str, ino: Ino, now: SystemTime) {
        if let Ok(children) = self.children_mut(parent) {
            children.remove(name);
        }
        self.touch_dir(parent, now);
        self.stale.push(Stale::Entry(parent, name.to_string()));
        let free = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.linked = false;
                node.lookups.load(Ordering::Acquire) == 0
            }
            None => false,
        };
        if free {
            self.nodes.remove(&ino);
        }
    }

    /// Moves `name` in `parent` to `new_name` in `new_parent`; the target must not exist and
    /// a directory cannot move below itself.
    #[allow(dead_code)] // for directory handlers (snapshot and clone management)
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        now: SystemTime,
    ) -> Result<()> {
        check_name(new_name)?;
        let ino = self
            .lookup(parent, name)
            .ok_or_else(|| not_found(&self.path(parent), name))?;
        if parent == new_parent && name == new_name {
            return Ok(());
        }
        if self.lookup(new_parent, new_name).is_some() {
            return Err(Error::new(
                Kind::Exists,
                format!("{}/{new_name} exists", self.path(new_parent)),
            ));
        }
        if self.ancestors(new_parent).contains(&ino) {
            return Err(Error::invalid(format!(
                "cannot move {} below itself",
                self.path(ino)
            )));
        }
        self.children_mut(new_parent)?;
        if let Ok(c) = self.children_mut(parent) {
            c.remove(name);
        }
        if let Ok(c) = self.children_mut(new_parent) {
            c.insert(new_name.to_string(), ino);
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.parent = new_parent;
            node.name = new_name.to_string();
        }
        self.stale.push(Stale::Entry(parent, name.to_string()));
        self.stale
            .push(Stale::Entry(new_parent, new_name.to_string()));
        self.touch_dir(parent, now);
        self.touch_dir(new_parent, now);
        Ok(())
    }

    /// The kernel got an entry for `ino` (lookup, readdirplus, mkdir).
    pub fn remember(&self, ino: Ino) {
        if let Some(n) = self.nodes.get(&ino) {
            n.lookups.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The kernel dropped `n` lookups of `ino`; an unlinked node goes when none remain.
    pub fn forget(&mut self, ino: Ino, n: u64) {
        let Some(node) = self.nodes.get(&ino) else {
            return;
        };
        let left = node
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some(l.saturating_sub(n))
            })
            .map(|l| l.saturating_sub(n))
            .unwrap_or(0);
        if left == 0 && !node.linked && ino != ROOT {
            self.nodes.remove(&ino);
        }
    }

    /// A file handle of `ino` was opened.
    pub fn opened(&self, ino: Ino) {
        if let Some(n) = self.nodes.get(&ino) {
            n.opens.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A file handle of `ino` was released.
    pub fn released(&self, ino: Ino) {
        if let Some(n) = self.nodes.get(&ino) {
            let _ = n
                .opens
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(1));
        }
    }

    /// Whether `ino` has open file handles (only those can hold cached pages that a write
    /// through another file makes stale: files that can change drop their cache at open).
    pub fn is_open(&self, ino: Ino) -> bool {
        self.nodes
            .get(&ino)
            .is_some_and(|n| n.opens.load(Ordering::Acquire) > 0)
    }

    /// Takes what changed since the last call, for kernel cache invalidation.
    pub fn take_stale(&mut self) -> Vec<Stale> {
        std::mem::take(&mut self.stale)
    }

    /// Number of subdirectories of `ino` (for a directory's link count).
    pub fn subdirs(&self, ino: Ino) -> usize {
        self.children(ino).map_or(0, |c| {
            c.values()
                .filter(|i| self.get(**i).is_some_and(Node::is_dir))
                .count()
        })
    }

    /// Bytes of every file reachable by name (for statfs).
    pub fn shown_bytes(&self) -> u64 {
        self.nodes
            .values()
            .filter(|n| n.linked)
            .filter_map(|n| n.file())
            .fold(0, |acc, f| acc.saturating_add(f.size()))
    }

    /// Nodes in the tree (for statfs), including removed ones still open.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// `snapshots/base/disk.raw`-style path of `ino` relative to the mount (for log lines).
    pub fn path(&self, ino: Ino) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT && parts.len() < MAX_DEPTH {
            let Some(n) = self.get(cur) else { break };
            parts.push(n.name.as_str());
            cur = n.parent;
        }
        if parts.is_empty() {
            return "/".into();
        }
        parts.reverse();
        parts.join("/")
    }

    fn ancestors(&self, ino: Ino) -> Vec<Ino> {
        let mut out = vec![ino];
        let mut cur = ino;
        while cur != ROOT && out.len() <= MAX_DEPTH {
            let Some(n) = self.get(cur) else { break };
            cur = n.parent;
            out.push(cur);
        }
        out
    }

    fn depth(&self, ino: Ino) -> usize {
        self.ancestors(ino).len() - 1
    }

    fn children_mut(&mut self, ino: Ino) -> Result<&mut BTreeMap<String, Ino>> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(NodeKind::Dir { children, .. }) => Ok(children),
            Some(NodeKind::File(_)) => Err(Error::invalid(format!("inode {ino} is a file"))),
            None => Err(Error::new(Kind::NotFound, format!("no inode {ino}"))),
        }
    }

    fn touch_dir(&mut self, ino: Ino, now: SystemTime) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.changed = now;
        }
        self.stale.push(Stale::Inode(ino));
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(Error::invalid(format!("{name:?} is not a valid file name")));
    }
    if name.len() > 255 {
        return Err(Error::invalid(format!(
            "a file name has at most 255 bytes ({name:.40}... has {})",
            name.len()
        )));
    }
    Ok(())
}

fn not_found(dir: &str, name: &str) -> Error {
    Error::new(Kind::NotFound, format!("{dir}: no entry {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfs_mount::expose::{BytesFile, DISK_FILE_NAME};

    fn file() -> Arc<dyn ExposedFile> {
        Arc::new(BytesFile::new(b"x".to_vec(), SystemTime::UNIX_EPOCH))
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    #[test]
    fn nodes_get_fresh_inodes_and_dirs_track_changes() {
        let mut t = Tree::new(t0(), None);
        let disk = t.add_file(ROOT, DISK_FILE_NAME, file(), at(1)).unwrap();
        let snaps = t.add_dir(ROOT, SNAPSHOTS_DIR_NAME, None, at(2)).unwrap();
        let base = t.add_dir(snaps, "base", None, at(3)).unwrap();
        let f = t.add_file(base, "disk.raw", file(), at(4)).unwrap();
        assert_eq!((disk, snaps, base, f), (2, 3, 4, 5));
        assert_eq!(t.lookup(ROOT, "disk.raw"), Some(disk));
        assert_eq!(t.lookup(disk, "x"), None);
        assert_eq!(t.lookup(ROOT, "nope"), None);
        assert_eq!(t.get(ROOT).unwrap().changed, at(2));
        assert_eq!(t.get(snaps).unwrap().changed, at(3));
        assert_eq!(
            (t.subdirs(ROOT), t.subdirs(snaps), t.subdirs(base)),
            (1, 1, 0)
        );
        assert_eq!(t.path(f), "snapshots/base/disk.raw");
        assert_eq!(t.path(ROOT), "/");
        let e = t.add_file(ROOT, DISK_FILE_NAME, file(), at(5)).unwrap_err();
        assert_eq!(e.kind(), Kind::Exists);
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert!(t.add_dir(ROOT, bad, None, at(5)).is_err(), "{bad:?}");
        }
        assert!(t.add_dir(disk, "under-a-file", None, at(5)).is_err());
        assert!(t.get(0).is_none() && t.get(u64::MAX).is_none());
    }

    #[test]
    fn removed_nodes_live_until_forgotten_and_inodes_are_not_reused() {
        let mut t = Tree::new(t0(), None);
        let dir = t.add_dir(ROOT, "d", None, t0()).unwrap();
        let kept = t.add_file(dir, "open", file(), t0()).unwrap();
        let gone = t.add_file(dir, "unseen", file(), t0()).unwrap();
        t.take_stale();
        t.remember(kept);
        t.remember(kept);
        assert_eq!(
            t.remove(ROOT, "d", at(9)).unwrap_err().kind(),
            Kind::NotEmpty
        );
        assert_eq!(t.remove_all(ROOT, "d", at(9)).unwrap(), dir);
        assert_eq!(t.lookup(ROOT, "d"), None);
        assert!(t.get(kept).is_some(), "still looked up by the kernel");
        assert!(t.get(gone).is_none() && t.get(dir).is_none());
        let stale = t.take_stale();
        assert!(stale.contains(&Stale::Entry(ROOT, "d".into())));
        assert!(stale.contains(&Stale::Entry(dir, "open".into())));
        assert!(stale.contains(&Stale::Inode(ROOT)));
        t.forget(kept, 1);
        assert!(t.get(kept).is_some());
        t.forget(kept, 1);
        assert!(t.get(kept).is_none());
        let again = t.add_dir(ROOT, "d", None, t0()).unwrap();
        assert!(again > gone, "inodes are never reused");
        // Forgetting a linked node keeps it.
        t.remember(again);
        t.forget(again, 5);
        assert!(t.get(again).is_some());
        assert_eq!(
            t.remove(ROOT, "missing", t0()).unwrap_err().kind(),
            Kind::NotFound
        );
    }

    #[test]
    fn rename_moves_refuses_clashes_and_loops() {
        let mut t = Tree::new(t0(), None);
        let a = t.add_dir(ROOT, "a", None, t0()).unwrap();
        let b = t.add_dir(ROOT, "b", None, t0()).unwrap();
        let inner = t.add_dir(a, "inner", None, t0()).unwrap();
        t.take_stale();
        t.rename(ROOT, "a", b, "a2", at(7)).unwrap();
        assert_eq!(t.lookup(ROOT, "a"), None);
        assert_eq!(t.lookup(b, "a2"), Some(a));
        assert_eq!(t.path(inner), "b/a2/inner");
        assert_eq!(
            (t.get(ROOT).unwrap().changed, t.get(b).unwrap().changed),
            (at(7), at(7))
        );
        let stale = t.take_stale();
        assert!(stale.contains(&Stale::Entry(ROOT, "a".into())));
        assert!(stale.contains(&Stale::Entry(b, "a2".into())));
        assert_eq!(
            t.rename(b, "a2", inner, "x", t0()).unwrap_err().kind(),
            Kind::InvalidInput
        );
        t.add_dir(ROOT, "c", None, t0()).unwrap();
        assert_eq!(
            t.rename(ROOT, "c", ROOT, "b", t0()).unwrap_err().kind(),
            Kind::Exists
        );
        t.rename(ROOT, "c", ROOT, "c", t0()).unwrap();
        assert_eq!(
            t.rename(ROOT, "zz", ROOT, "y", t0()).unwrap_err().kind(),
            Kind::NotFound
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let mut t = Tree::new(t0(), None);
        let mut dir = ROOT;
        for i in 0..MAX_DEPTH {
            dir = t.add_dir(dir, &format!("d{i}"), None, t0()).unwrap();
        }
        assert!(t.add_dir(dir, "deeper", None, t0()).is_err());
        assert_eq!(t.path(dir).split('/').count(), MAX_DEPTH);
    }
}
