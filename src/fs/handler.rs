//! Directory handlers: what happens inside a directory beyond looking names up.
//!
//! A directory node may carry a `DirHandler`. The FUSE layer calls it, with no lock held,
//! before lookups and listings in that directory (`refresh`: a view directory re-reads a
//! partition table that was written), after writes to its files (`written`: cached pages of
//! files that show the same bytes go stale), and for mkdir/rmdir/rename in it (snapshot and
//! clone management). A handler does its I/O first and then changes the tree through
//! `SharedTree::change`, which takes the tree lock only for the change itself and queues the
//! kernel cache invalidations the change calls for. Handlers that must not run concurrently
//! with themselves (two mkdirs of one name) serialize on a lock of their own.
//!
//! Errors are library errors; the FUSE layer turns them into errno and logs them.

use super::SharedTree;
use super::tree::Ino;
use vmfs_mount::error::{Error, Kind, Result};

pub trait DirHandler: Send + Sync {
    /// Whether this directory's entries can change while mounted (the kernel then does not
    /// cache its listing).
    fn changes(&self) -> bool {
        true
    }

    /// Whether users may make, remove or rename entries here (the directory's mode and
    /// access(W_OK) say so).
    fn writable(&self) -> bool {
        false
    }

    /// Brings the entries of directory `dir` up to date. Cheap when nothing changed.
    fn refresh(&self, _tree: &SharedTree, _dir: Ino) {}

    /// `len` bytes at `off` of file `file` in `dir` were written or discarded.
    fn written(&self, _tree: &SharedTree, _dir: Ino, _file: Ino, _off: u64, _len: u64) {}

    /// mkdir `name` in `dir`: returns the new directory's inode.
    fn mkdir(&self, _tree: &SharedTree, _dir: Ino, name: &str) -> Result<Ino> {
        Err(not_here("create", name))
    }

    /// rmdir `name` in `dir`.
    fn rmdir(&self, _tree: &SharedTree, _dir: Ino, name: &str) -> Result<()> {
        Err(not_here("remove", name))
    }

    /// rename `name` in `dir` (this handler's directory) to `new_name` in `new_dir`.
    fn rename(
        &self,
        _tree: &SharedTree,
        _dir: Ino,
        name: &str,
        _new_dir: Ino,
        _new_name: &str,
    ) -> Result<()> {
        Err(not_here("rename", name))
    }
}

fn not_here(op: &str, name: &str) -> Error {
    Error::new(Kind::NotPermitted, format!("cannot {op} {name} here"))
}
