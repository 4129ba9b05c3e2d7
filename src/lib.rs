//! vmfs-mount: mount a virtual-machine disk image chain as a tree of raw files.

pub mod backing_policy;
pub mod cache;
pub mod chain;
pub mod changes;
pub mod clones;
pub mod endian;
pub mod error;
pub mod expose;
pub mod format;
pub mod lock;
pub mod manage;
pub mod overlay;
pub mod partition;
pub mod paths;
pub mod plan;
pub mod storage;
pub mod view;
pub mod wrap;
pub mod write;

/// The old name of `storage`, kept so branches started before the move keep compiling.
pub mod host {
    pub use crate::endian;
    pub use crate::storage::HostFile;
}
