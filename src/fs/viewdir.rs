//! View directories: the root (the live view) and `snapshots/<name>/`, each holding the files
//! `ViewFiles` decides on. A view directory's handler keeps the tree in step with them: when a
//! watched part of the disk (its partition table) was written, the next lookup or listing in
//! the directory, or a flush of one of its files, re-reads them and swaps the entries that
//! changed. It also keeps the kernel's page cache honest: a write through one file drops the
//! cached pages of the other open files that show the same disk bytes.

use super::SharedTree;
use super::handler::DirHandler;
use super::snapshotdir::SnapshotsDir;
use super::tree::{Ino, ROOT, SNAPSHOTS_DIR_NAME, Stale, Tree};
use crate::mount::{Exposed, Opened};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::SystemTime;
use vmfs_mount::expose::{ExposedFile, FileOptions, Shown, ViewFiles};
use vmfs_mount::plan::Origin;

pub struct ViewDir {
    files: ViewFiles,
    /// What the directory shows now (only entries this handler made).
    shown: Mutex<Vec<Shown>>,
}

impl ViewDir {
    pub fn new(files: ViewFiles) -> Arc<ViewDir> {
        Arc::new(ViewDir {
            files,
            shown: Mutex::new(Vec::new()),
        })
    }

    /// The handler for the directory of `exposed`, shown at `dir_path` ("" for the root).
    pub fn for_view(exposed: &Exposed, options: &FileOptions, dir_path: &str) -> Arc<ViewDir> {
        ViewDir::new(exposed.files(options, dir_path))
    }

    /// Adds the directory's current files to `dir` (at mount, or when a view directory is
    /// made while mounted).
    pub fn populate(&self, tree: &mut Tree, dir: Ino, now: SystemTime) {
        let want = self.files.current();
        self.apply(tree, dir, want, now);
    }

    /// Makes `dir` show `want`: entries whose file changed (by identity) are replaced by new
    /// nodes, so an open file keeps showing what it showed.
    fn apply(&self, tree: &mut Tree, dir: Ino, want: Vec<Shown>, now: SystemTime) {
        let mut shown = self.shown.lock();
        let same = |a: &Shown, b: &Shown| a.name == b.name && Arc::ptr_eq(&a.file, &b.file);
        for old in shown.iter() {
            if !want.iter().any(|w| same(w, old))
                && let Err(e) = tree.remove(dir, &old.name, now)
            {
                log::warn!("{}: cannot remove {}: {e}", tree.path(dir), old.name);
            }
        }
        let mut now_shown = Vec::new();
        for w in want {
            if !shown.iter().any(|old| same(old, &w))
                && let Err(e) = tree.add_file(dir, &w.name, w.file.clone(), now)
            {
                log::warn!("{}: cannot show {}: {e}", tree.path(dir), w.name);
                continue;
            }
            now_shown.push(w);
        }
        *shown = now_shown;
    }
}

impl DirHandler for ViewDir {
    fn changes(&self) -> bool {
        self.files.disk().writable()
    }

    fn refresh(&self, tree: &SharedTree, dir: Ino) {
        if !self.files.disk().touched() {
            return;
        }
        // Reading what the files are made from is I/O: done before the tree lock is taken.
        let want = self.files.current();
        tree.change(|t| self.apply(t, dir, want, SystemTime::now()));
    }

    fn written(&self, tree: &SharedTree, dir: Ino, file: Ino, off: u64, len: u64) {
        let shown = self.shown.lock().clone();
        let stale = tree.read(|t| {
            let Some(name) = t.get(file).map(|n| n.name.as_str()) else {
                return Vec::new();
            };
            let Some((start, _)) = shown
                .iter()
                .find(|s| s.name == name)
                .and_then(Shown::disk_range)
            else {
                return Vec::new();
            };
            let (w_start, w_end) = (
                start.saturating_add(off),
                start.saturating_add(off).saturating_add(len),
            );
            let mut out = Vec::new();
            for other in shown.iter().filter(|s| s.name != name) {
                let Some((o_start, o_end)) = other.disk_range() else {
                    continue;
                };
                let (from, to) = (w_start.max(o_start), w_end.min(o_end));
                if from >= to {
                    continue;
                }
                if let Some(ino) = t.lookup(dir, &other.name)
                    && t.is_open(ino)
                {
                    out.push(Stale::Data(ino, from - o_start, to - from));
                }
            }
            out
        });
        tree.invalidate_now(stale);
    }
}

/// The tree of a mount: the live view's files at the root, `snapshots/<name>/` per snapshot.
pub fn build(opened: &Opened, options: &FileOptions) -> Tree {
    let now = SystemTime::now();
    let live = ViewDir::for_view(&opened.live, options, "");
    let mut tree = Tree::new(now, Some(live.clone()));
    live.populate(&mut tree, ROOT, now);
    let infos = opened.layers[0].snapshots();
    let own = opened
        .snapshots
        .iter()
        .filter_map(|s| match s.spec.origin {
            Origin::Snapshot {
                layer: 0,
                info_index,
            } => infos
                .iter()
                .find(|i| i.index == info_index)
                .map(|i| (s.spec.name.clone(), i.id.clone())),
            _ => None,
        })
        .collect();
    let handler = SnapshotsDir::new(opened.live_snapshots.clone(), options, own);
    let snaps = match tree.add_dir(ROOT, SNAPSHOTS_DIR_NAME, Some(handler), now) {
        Ok(ino) => ino,
        Err(e) => {
            log::error!("cannot make {SNAPSHOTS_DIR_NAME}/: {e}");
            return tree;
        }
    };
    for s in &opened.snapshots {
        let handler =
            ViewDir::for_view(s, options, &format!("{SNAPSHOTS_DIR_NAME}/{}", s.spec.name));
        match tree.add_dir(snaps, &s.spec.name, Some(handler.clone()), now) {
            Ok(dir) => handler.populate(&mut tree, dir, now),
            Err(e) => log::error!("cannot show snapshot {}: {e}", s.spec.name),
        }
    }
    tree
}
