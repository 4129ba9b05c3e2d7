//! `changes/`: for every snapshot or layer view, `<VIEW>.raw`, the live disk's bytes where
//! they may differ from that view and holes elsewhere; for every QEMU dirty bitmap of the
//! image, `bitmap-<NAME>.raw`, the live bytes where the bitmap has bits set.

use super::tree::{Ino, ROOT, Tree};
use crate::mount::Opened;
use std::sync::Arc;
use std::time::SystemTime;
use vmfs_mount::changes::Changes;
use vmfs_mount::changes::file::ChangesFile;
use vmfs_mount::error::Result;
use vmfs_mount::expose::ExposedFile;

pub const CHANGES_DIR_NAME: &str = "changes";
pub const RAW_SUFFIX: &str = ".raw";
pub const BITMAP_PREFIX: &str = "bitmap-";

/// Adds `changes/` to `tree` when the mount has anything to compare the live disk with.
pub fn attach(tree: &mut Tree, opened: &Opened, now: SystemTime) {
    if opened.snapshots.is_empty() && opened.bitmaps.is_empty() {
        return;
    }
    let dir = match tree.add_dir(ROOT, CHANGES_DIR_NAME, None, now) {
        Ok(d) => d,
        Err(e) => {
            log::error!("cannot make {CHANGES_DIR_NAME}/: {e}");
            return;
        }
    };
    let live = &opened.live;
    let mut files: Vec<(String, Arc<dyn ExposedFile>)> = Vec::new();
    for s in &opened.snapshots {
        let changes = Changes::between(
            &s.spec.layers,
            s.spec.size,
            &live.spec.layers,
            live.spec.size,
        );
        let file = ChangesFile::new(live.view.clone(), changes, s.spec.mtime);
        files.push((format!("{}{RAW_SUFFIX}", s.spec.name), Arc::new(file)));
    }
    for (name, bits) in &opened.bitmaps {
        let changes = Changes::from_bitmap(bits.clone(), live.spec.size);
        let file = ChangesFile::new(live.view.clone(), changes, live.spec.mtime);
        let name = vmfs_mount::plan::sanitize(name);
        files.push((format!("{BITMAP_PREFIX}{name}{RAW_SUFFIX}"), Arc::new(file)));
    }
    for (name, file) in files {
        if let Err(e) = tree.add_file(dir, &name, file, now) {
            log::warn!("{CHANGES_DIR_NAME}/{name} is not shown: {e}");
        }
    }
}

/// Shows `changes/<view>.raw` for a view made after mount (a live snapshot), making
/// `changes/` first when the mount had nothing to compare with.
pub fn add(
    tree: &mut Tree,
    view: &str,
    file: Arc<dyn ExposedFile>,
    now: SystemTime,
) -> Result<Ino> {
    let dir = match tree.lookup(ROOT, CHANGES_DIR_NAME) {
        Some(d) => d,
        None => tree.add_dir(ROOT, CHANGES_DIR_NAME, None, now)?,
    };
    tree.add_file(dir, &format!("{view}{RAW_SUFFIX}"), file, now)
}
