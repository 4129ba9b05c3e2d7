//! `snapshots/`: on a writable qcow2 top, `mkdir snapshots/NAME` takes an internal snapshot,
//! `rmdir` deletes one (EBUSY while one of its files is open), `mv` renames one. Backing
//! layers and snapshots of lower layers are shown here too, but they are not the top's
//! snapshots: EPERM for them, and for everything on a read-only mount. The image work is
//! `SnapshotSet`'s; this handler only keeps the tree in step.

use super::SharedTree;
use super::changesdir::{self, CHANGES_DIR_NAME, RAW_SUFFIX};
use super::handler::DirHandler;
use super::tree::{Ino, ROOT, SNAPSHOTS_DIR_NAME, Tree};
use super::viewdir::ViewDir;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;
use vmfs_mount::error::{Error, Kind, Result};
use vmfs_mount::expose::{DISK_FILE_NAME, DiskFile, FileOptions, ViewFiles};
use vmfs_mount::manage::snapshots::{SnapshotSet, TakenSnapshot};

pub struct SnapshotsDir {
    set: Option<Arc<SnapshotSet>>,
    options: FileOptions,
    /// The top image's snapshots shown here: directory name -> snapshot id. Its lock also
    /// serializes mkdir, rmdir and rename.
    own: Mutex<BTreeMap<String, String>>,
}

impl SnapshotsDir {
    /// `own`: (directory name, id) of the top's snapshots shown at mount.
    pub fn new(
        set: Option<Arc<SnapshotSet>>,
        options: &FileOptions,
        own: Vec<(String, String)>,
    ) -> Arc<SnapshotsDir> {
        Arc::new(SnapshotsDir {
            set,
            options: options.clone(),
            own: Mutex::new(own.into_iter().collect()),
        })
    }

    fn set(&self) -> Result<&Arc<SnapshotSet>> {
        self.set.as_ref().ok_or_else(|| {
            Error::new(
                Kind::NotPermitted,
                "snapshots can be changed only on a writable qcow2 mount",
            )
        })
    }

    /// The id of the top's snapshot shown as `name`; EPERM for other entries.
    fn id_of(
        &self,
        tree: &SharedTree,
        dir: Ino,
        own: &BTreeMap<String, String>,
        name: &str,
    ) -> Result<String> {
        if let Some(id) = own.get(name) {
            return Ok(id.clone());
        }
        if tree.read(|t| t.lookup(dir, name)).is_some() {
            return Err(Error::new(
                Kind::NotPermitted,
                format!(
                    "{name} is a backing layer or a lower layer's snapshot, not a snapshot of the top image"
                ),
            ));
        }
        Err(Error::new(Kind::NotFound, format!("no snapshot {name}")))
    }

    fn show(&self, tree: &mut Tree, dir: Ino, s: &TakenSnapshot) -> Result<Ino> {
        let disk = Arc::new(DiskFile::new(s.view.clone(), false, s.mtime));
        let label = format!("{SNAPSHOTS_DIR_NAME}/{}/{DISK_FILE_NAME}", s.name);
        let files = ViewDir::new(ViewFiles::new(disk, label, &self.options, Vec::new()));
        let now = SystemTime::now();
        let ino = tree.add_dir(dir, &s.name, Some(files.clone()), now)?;
        files.populate(tree, ino, now);
        // Only a name clash (with a bitmap's file) can refuse it: the snapshot stands.
        if let Err(e) = changesdir::add(tree, &s.name, s.changes.clone(), now) {
            log::warn!(
                "{CHANGES_DIR_NAME}/{}{RAW_SUFFIX} is not shown: {e}",
                s.name
            );
        }
        Ok(ino)
    }
}

/// (changes/ directory, changes/<name>.raw) when shown.
fn changes_file(t: &Tree, name: &str) -> Option<(Ino, Ino)> {
    let cdir = t.lookup(ROOT, CHANGES_DIR_NAME)?;
    Some((cdir, t.lookup(cdir, &format!("{name}{RAW_SUFFIX}"))?))
}

impl DirHandler for SnapshotsDir {
    fn writable(&self) -> bool {
        self.set.is_some()
    }

    fn mkdir(&self, tree: &SharedTree, dir: Ino, name: &str) -> Result<Ino> {
        let set = self.set()?;
        let mut own = self.own.lock();
        if tree.read(|t| t.lookup(dir, name)).is_some() {
            return Err(Error::new(Kind::Exists, format!("{name} exists")));
        }
        let taken = set.create(name)?;
        match tree.change_in_locked(&[dir], |t| self.show(t, dir, &taken)) {
            Ok(ino) => {
                own.insert(name.to_string(), taken.id);
                Ok(ino)
            }
            Err(e) => {
                if let Err(d) = set.delete(&taken.id) {
                    log::error!("snapshot {name}: cannot delete it again: {d}");
                }
                Err(e)
            }
        }
    }

    fn rmdir(&self, tree: &SharedTree, dir: Ino, name: &str) -> Result<()> {
        let set = self.set()?;
        let mut own = self.own.lock();
        let id = self.id_of(tree, dir, &own, name)?;
        // Checked and unlinked under one tree lock, before its clusters are freed; its
        // changes/<name>.raw reads its tables too, so it goes with it.
        let victim = tree.read(|t| t.lookup(dir, name));
        let locked: Vec<Ino> = std::iter::once(dir).chain(victim).collect();
        tree.change_in_locked(&locked, |t| {
            let ino = t
                .lookup(dir, name)
                .ok_or_else(|| Error::new(Kind::NotFound, format!("no snapshot {name}")))?;
            let changes = changes_file(t, name);
            let busy = t
                .children(ino)
                .is_some_and(|c| c.values().any(|f| t.is_open(*f)))
                || changes.is_some_and(|(_, f)| t.is_open(f));
            if busy {
                return Err(Error::new(
                    Kind::Busy,
                    format!("snapshot {name} has an open file"),
                ));
            }
            if let Some((cdir, _)) = changes {
                t.remove(cdir, &format!("{name}{RAW_SUFFIX}"), SystemTime::now())?;
            }
            t.remove_all(dir, name, SystemTime::now())
        })?;
        own.remove(name);
        set.delete(&id)
    }

    fn rename(
        &self,
        tree: &SharedTree,
        dir: Ino,
        name: &str,
        new_dir: Ino,
        new_name: &str,
    ) -> Result<()> {
        let set = self.set()?;
        let mut own = self.own.lock();
        let id = self.id_of(tree, dir, &own, name)?;
        if new_dir != dir {
            return Err(Error::new(
                Kind::NotPermitted,
                format!("snapshot {name} can only be renamed within {SNAPSHOTS_DIR_NAME}/"),
            ));
        }
        if name == new_name {
            return Ok(());
        }
        if tree.read(|t| t.lookup(dir, new_name)).is_some() {
            return Err(Error::new(Kind::Exists, format!("{new_name} exists")));
        }
        set.rename(&id, new_name)?;
        tree.change_in_locked(&[dir], |t| {
            if let Some((cdir, _)) = changes_file(t, name) {
                let (from, to) = (
                    format!("{name}{RAW_SUFFIX}"),
                    format!("{new_name}{RAW_SUFFIX}"),
                );
                if let Err(e) = t.rename(cdir, &from, cdir, &to, SystemTime::now()) {
                    log::warn!("{CHANGES_DIR_NAME}/{from} keeps its name: {e}");
                }
            }
            t.rename(dir, name, dir, new_name, SystemTime::now())
        })?;
        own.remove(name);
        own.insert(new_name.to_string(), id);
        Ok(())
    }
}
