//! `clones/` (with `--clones DIR`): one directory per clone, holding the files of its view
//! (`disk.raw`, writable, like the live disk of a writable mount). `mkdir clones/NAME` makes
//! `DIR/NAME.qcow2` and shows it; `rmdir clones/NAME` deletes it (EBUSY while one of its
//! files is open). The file work is `CloneSet`'s; this handler only keeps the tree in step.

use super::SharedTree;
use super::handler::DirHandler;
use super::tree::{Ino, ROOT, Tree};
use super::viewdir::ViewDir;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;
use vmfs_mount::clones::{CloneSet, OpenClone};
use vmfs_mount::error::{Error, Kind, Result};
use vmfs_mount::expose::{DISK_FILE_NAME, DiskFile, FileOptions, ViewFiles};

pub const CLONES_DIR_NAME: &str = "clones";

pub struct ClonesDir {
    set: Arc<CloneSet>,
    options: FileOptions,
    /// The clones shown, by name. Its lock also serializes mkdir and rmdir.
    open: Mutex<BTreeMap<String, OpenClone>>,
}

impl ClonesDir {
    /// Adds `clones/` to `tree` with the clones found at mount.
    pub fn attach(
        tree: &mut Tree,
        set: Arc<CloneSet>,
        found: Vec<OpenClone>,
        options: &FileOptions,
        now: SystemTime,
    ) {
        let handler = Arc::new(ClonesDir {
            set,
            options: options.clone(),
            open: Mutex::new(BTreeMap::new()),
        });
        let dir = match tree.add_dir(ROOT, CLONES_DIR_NAME, Some(handler.clone()), now) {
            Ok(d) => d,
            Err(e) => {
                log::error!("cannot make {CLONES_DIR_NAME}/: {e}");
                return;
            }
        };
        let mut open = handler.open.lock();
        for clone in found {
            match handler.show(tree, dir, &clone, now) {
                Ok(_) => {
                    open.insert(clone.name.clone(), clone);
                }
                Err(e) => log::error!("cannot show clone {}: {e}", clone.name),
            }
        }
    }

    /// Adds the directory of `clone` with its files.
    fn show(&self, tree: &mut Tree, dir: Ino, clone: &OpenClone, now: SystemTime) -> Result<Ino> {
        let disk = Arc::new(DiskFile::new(clone.view.clone(), true, clone.mtime));
        let label = format!("{CLONES_DIR_NAME}/{}/{DISK_FILE_NAME}", clone.name);
        let files = ViewDir::new(ViewFiles::new(disk, label, &self.options, Vec::new()));
        let ino = tree.add_dir(dir, &clone.name, Some(files.clone()), now)?;
        files.populate(tree, ino, now);
        Ok(ino)
    }
}

impl DirHandler for ClonesDir {
    fn writable(&self) -> bool {
        true
    }

    fn mkdir(&self, tree: &SharedTree, dir: Ino, name: &str) -> Result<Ino> {
        let mut open = self.open.lock();
        if open.contains_key(name) || tree.read(|t| t.lookup(dir, name)).is_some() {
            return Err(Error::new(Kind::Exists, format!("clone {name} exists")));
        }
        let clone = self.set.create(name)?;
        let shown = tree.change(|t| self.show(t, dir, &clone, SystemTime::now()));
        match shown {
            Ok(ino) => {
                open.insert(name.to_string(), clone);
                Ok(ino)
            }
            Err(e) => {
                if let Err(d) = self.set.delete(clone) {
                    log::error!("clone {name}: cannot remove it again: {d}");
                }
                Err(e)
            }
        }
    }

    fn rmdir(&self, tree: &SharedTree, dir: Ino, name: &str) -> Result<()> {
        let mut open = self.open.lock();
        if !open.contains_key(name) {
            return Err(Error::new(Kind::NotFound, format!("no clone {name}")));
        }
        // Checked and unlinked under one tree lock. An open that found the file just before
        // keeps a view of the deleted clone until it closes, as with any unlinked file.
        tree.change(|t| {
            let ino = t
                .lookup(dir, name)
                .ok_or_else(|| Error::new(Kind::NotFound, format!("no clone {name}")))?;
            let busy = t
                .children(ino)
                .is_some_and(|c| c.values().any(|f| t.is_open(*f)));
            if busy {
                return Err(Error::new(
                    Kind::Busy,
                    format!("clone {name} has an open file"),
                ));
            }
            t.remove_all(dir, name, SystemTime::now())
        })?;
        let clone = open
            .remove(name)
            .ok_or_else(|| Error::invalid("clone vanished"))?;
        self.set.delete(clone)
    }
}
