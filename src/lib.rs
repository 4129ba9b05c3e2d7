//! vmfs-mount: mount a virtual-machine disk image chain as a tree of raw files.

pub mod cache;
pub mod chain;
pub mod changes;
pub mod error;
pub mod format;
pub mod host;
pub mod lock;
pub mod overlay;
pub mod paths;
pub mod plan;
pub mod view;
pub mod write;
