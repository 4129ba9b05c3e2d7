//! The inode layout of a mount, fixed at mount time:
//!
//!   1  /                      4+2i  /snapshots/<name i>/
//!   2  /disk.raw              5+2i  /snapshots/<name i>/disk.raw
//!   3  /snapshots/
//!
//! Nothing here changes after mount, so lookups need no lock.

use std::collections::BTreeMap;

pub const ROOT: u64 = 1;
pub const LIVE_FILE: u64 = 2;
pub const SNAPSHOTS_DIR: u64 = 3;
pub const DISK_FILE_NAME: &str = "disk.raw";
pub const SNAPSHOTS_DIR_NAME: &str = "snapshots";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// Children by name (sorted, so readdir offsets are stable).
    Dir(BTreeMap<String, u64>),
    /// A disk file showing view `view` (0 = live, 1 + i = snapshot i).
    File { view: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub parent: u64,
    pub kind: NodeKind,
}

#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// The tree for a live view and one snapshot directory per name (names are unique and
    /// safe path components: `tree::plan` guarantees both).
    pub fn build(snapshot_names: &[String]) -> Tree {
        let dir = |parent, entries: &[(&str, u64)]| Node {
            parent,
            kind: NodeKind::Dir(entries.iter().map(|(n, i)| (n.to_string(), *i)).collect()),
        };
        let mut snaps = BTreeMap::new();
        let mut nodes = vec![
            dir(
                ROOT,
                &[
                    (DISK_FILE_NAME, LIVE_FILE),
                    (SNAPSHOTS_DIR_NAME, SNAPSHOTS_DIR),
                ],
            ),
            Node {
                parent: ROOT,
                kind: NodeKind::File { view: 0 },
            },
            dir(ROOT, &[]),
        ];
        for (i, name) in snapshot_names.iter().enumerate() {
            let dir_ino = snapshot_dir_ino(i);
            snaps.insert(name.clone(), dir_ino);
            nodes.push(dir(SNAPSHOTS_DIR, &[(DISK_FILE_NAME, dir_ino + 1)]));
            nodes.push(Node {
                parent: dir_ino,
                kind: NodeKind::File { view: i + 1 },
            });
        }
        nodes[(SNAPSHOTS_DIR - 1) as usize].kind = NodeKind::Dir(snaps);
        Tree { nodes }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        let idx = ino.checked_sub(1)?;
        self.nodes.get(usize::try_from(idx).ok()?)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        match &self.get(parent)?.kind {
            NodeKind::Dir(children) => children.get(name).copied(),
            NodeKind::File { .. } => None,
        }
    }

    /// Number of subdirectories of `ino` (for a directory's link count).
    pub fn subdirs(&self, ino: u64) -> usize {
        match self.get(ino).map(|n| &n.kind) {
            Some(NodeKind::Dir(children)) => children
                .values()
                .filter(|c| matches!(self.get(**c).map(|n| &n.kind), Some(NodeKind::Dir(_))))
                .count(),
            _ => 0,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

fn snapshot_dir_ino(index: usize) -> u64 {
    4 + 2 * index as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_without_snapshots() {
        let t = Tree::build(&[]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(ROOT, "disk.raw"), Some(LIVE_FILE));
        assert_eq!(t.lookup(ROOT, "snapshots"), Some(SNAPSHOTS_DIR));
        assert_eq!(t.lookup(ROOT, "nope"), None);
        assert_eq!(t.lookup(LIVE_FILE, "x"), None);
        assert_eq!(t.get(LIVE_FILE).unwrap().kind, NodeKind::File { view: 0 });
        assert_eq!(t.subdirs(ROOT), 1);
        assert_eq!(t.subdirs(SNAPSHOTS_DIR), 0);
        assert!(t.get(0).is_none() && t.get(4).is_none() && t.get(u64::MAX).is_none());
    }

    #[test]
    fn snapshots_get_static_inodes() {
        let t = Tree::build(&["base".into(), "s1".into()]);
        assert_eq!(t.lookup(SNAPSHOTS_DIR, "base"), Some(4));
        assert_eq!(t.lookup(SNAPSHOTS_DIR, "s1"), Some(6));
        assert_eq!(t.lookup(6, "disk.raw"), Some(7));
        assert_eq!(t.get(7).unwrap().kind, NodeKind::File { view: 2 });
        assert_eq!(t.get(7).unwrap().parent, 6);
        assert_eq!(t.get(6).unwrap().parent, SNAPSHOTS_DIR);
        assert_eq!(t.subdirs(SNAPSHOTS_DIR), 2);
    }
}
