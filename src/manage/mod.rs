//! Managing what a mount shows while it runs (the work behind mkdir/rmdir/rename in the
//! tree; the FUSE side only keeps the tree in step and maps errors).

pub mod snapshots;
