//! qcow2. The read driver lives beside `write/` (branch qcow2).

pub mod write;
