//! The files of one view's directory: `disk.raw` and everything derived from it. What a
//! directory holds is decided here, once, for the mount and for `--list` alike.

use super::{DiskFile, ExposedFile};
use std::sync::Arc;

pub const DISK_FILE_NAME: &str = "disk.raw";

/// Which optional files a view's directory gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {}

/// One file of a view's directory.
#[derive(Clone)]
pub struct Shown {
    pub name: String,
    pub file: Arc<dyn ExposedFile>,
    /// Where byte 0 of the file is on the disk, if the file shows the disk's bytes from there
    /// on (disk.raw at 0, a partition at its start). Writes to one such file change the
    /// others where they overlap.
    pub disk_offset: Option<u64>,
}

impl Shown {
    /// The disk bytes [start, end) this file shows, if it shows any.
    pub fn disk_range(&self) -> Option<(u64, u64)> {
        let start = self.disk_offset?;
        Some((start, start.saturating_add(self.file.size())))
    }
}

pub struct ViewFiles {
    disk: Arc<DiskFile>,
    /// Files that never change while mounted: disk.raw first.
    fixed: Vec<Shown>,
}

impl ViewFiles {
    /// The files of a view whose disk is `disk`; `extras` are shown as they are.
    pub fn new(
        disk: Arc<DiskFile>,
        _options: &FileOptions,
        extras: Vec<(String, Arc<dyn ExposedFile>)>,
    ) -> ViewFiles {
        let mut fixed = vec![Shown {
            name: DISK_FILE_NAME.to_string(),
            file: disk.clone(),
            disk_offset: Some(0),
        }];
        fixed.extend(extras.into_iter().map(|(name, file)| Shown {
            name,
            file,
            disk_offset: None,
        }));
        ViewFiles { disk, fixed }
    }

    pub fn disk(&self) -> &Arc<DiskFile> {
        &self.disk
    }

    /// The directory's files as of now. Files that did not change are the same `Arc`s as in
    /// the previous answer, so a caller can tell what changed by identity.
    pub fn current(&self) -> Vec<Shown> {
        self.fixed.clone()
    }
}
