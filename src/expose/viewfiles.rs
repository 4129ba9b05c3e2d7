//! The files of one view's directory: `disk.raw` and everything derived from it (partitions,
//! hypervisor wrappers, saved VM state). What a directory holds is decided here, once, for the
//! mount and for `--list` alike.

use super::{DiskFile, ExposedFile, RangeFile};
use crate::partition::{self, Partition, Table};
use crate::wrap::{self, Wrappers};
use parking_lot::Mutex;
use std::sync::Arc;

pub const DISK_FILE_NAME: &str = "disk.raw";

/// Which optional files a view's directory gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// `-o vmdk`, `-o vhd`: hypervisor wrappers beside `disk.raw`.
    pub wrappers: Wrappers,
}

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
    /// Where the disk is in the mount, for log lines (`snapshots/base/disk.raw`).
    label: String,
    /// The logical sector size the image declares, if it does.
    sector_size: Option<u32>,
    /// Files that never change while mounted: disk.raw first.
    fixed: Vec<Shown>,
    /// Why optional files asked for are missing (a disk no VHD can hold), for `--list`.
    notes: Vec<String>,
    /// The last partition scan and the files made for it (kept while unchanged, so that
    /// their identity says they did not change).
    last: Mutex<Option<(Table, Vec<Shown>)>>,
}

impl ViewFiles {
    /// The files of a view whose disk is `disk`; `extras` are shown as they are.
    pub fn new(
        disk: Arc<DiskFile>,
        label: String,
        options: &FileOptions,
        extras: Vec<(String, Arc<dyn ExposedFile>)>,
    ) -> ViewFiles {
        let sector_size = disk
            .view()
            .layers()
            .iter()
            .find_map(|l| l.logical_sector_size());
        let mut fixed = vec![Shown {
            name: DISK_FILE_NAME.to_string(),
            file: disk.clone(),
            disk_offset: Some(0),
        }];
        let (wrapped, notes) = wrap::wrappers(
            &(disk.clone() as Arc<dyn ExposedFile>),
            DISK_FILE_NAME,
            &wrap_identity(&disk, &label),
            options.wrappers,
            disk.mtime(),
        );
        for note in &notes {
            log::info!("{label}: {note}");
        }
        fixed.extend(wrapped.into_iter().map(|w| Shown {
            name: w.name.to_string(),
            file: w.file,
            disk_offset: w.shows_disk.then_some(0),
        }));
        fixed.extend(extras.into_iter().map(|(name, file)| Shown {
            name,
            file,
            disk_offset: None,
        }));
        ViewFiles {
            disk,
            label,
            sector_size,
            fixed,
            notes,
            last: Mutex::new(None),
        }
    }

    /// Why optional files asked for are missing.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn disk(&self) -> &Arc<DiskFile> {
        &self.disk
    }

    /// The directory's files as of now: the partition table is read again when the disk was
    /// written where the last read looked (and on the first call). Files that did not change
    /// are the same `Arc`s as in the previous answer, so a caller can tell what changed.
    pub fn current(&self) -> Vec<Shown> {
        let mut last = self.last.lock();
        let stale = last.is_none() || self.disk.take_touched();
        if stale {
            let previous = last.take().map(|(_, files)| files).unwrap_or_default();
            let table = self.scan();
            let files = self.partition_files(&table.partitions, &previous);
            *last = Some((table, files));
        }
        let mut out = self.fixed.clone();
        if let Some((_, parts)) = &*last {
            out.extend(parts.iter().cloned());
        }
        out
    }

    /// The partition table as last read (reading it if it never was).
    pub fn table(&self) -> Table {
        if self.last.lock().is_none() {
            self.current();
        }
        match &*self.last.lock() {
            Some((t, _)) => t.clone(),
            None => self.scan(),
        }
    }

    fn scan(&self) -> Table {
        let disk = &self.disk;
        let size = disk.size();
        // Until the scan says what it read, any write marks the table stale: a write racing
        // with the scan is then never missed.
        disk.watch(std::iter::once(0..u64::MAX).collect());
        let read = |off: u64, buf: &mut [u8]| -> crate::error::Result<()> {
            let n = disk.read(off, buf)?;
            if n < buf.len() {
                return Err(crate::error::Error::invalid(format!(
                    "short read at {off:#x}"
                )));
            }
            Ok(())
        };
        let table = partition::scan(&read, size, self.sector_size);
        disk.watch(table.watched.clone());
        for note in &table.notes {
            log::warn!("{}: partition table: {note}", self.label);
        }
        table
    }

    fn partition_files(&self, parts: &[Partition], previous: &[Shown]) -> Vec<Shown> {
        let inner: Arc<dyn ExposedFile> = self.disk.clone();
        parts
            .iter()
            .map(|p| {
                let name = p.file_name();
                let same = previous.iter().find(|s| {
                    s.name == name && s.disk_offset == Some(p.start) && s.file.size() == p.size
                });
                match same {
                    Some(s) => s.clone(),
                    None => Shown {
                        name,
                        file: Arc::new(RangeFile::new(inner.clone(), p.start, p.size, true)),
                        disk_offset: Some(p.start),
                    },
                }
            })
            .collect()
    }
}

/// What names a view's disk across mounts: the top image's path (canonical when it exists,
/// so that `./a.qcow2` and `/img/a.qcow2` agree) and where the disk is in the mount.
fn wrap_identity(disk: &DiskFile, label: &str) -> String {
    let top = disk
        .view()
        .layers()
        .first()
        .map(|l| {
            let p = l.path();
            p.canonicalize()
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        })
        .unwrap_or_default();
    format!("{top}\0{label}")
}
