//! Crash states of a recorded daemon run (tests/crash_states.rs): the workload and guest model,
//! the tests' own qcow2 metadata map, and the construction and checking of crash states.
#![allow(dead_code)]

pub mod check;
pub mod guest;
pub mod layout;
pub mod snapshots;
pub mod states;
pub mod workload;
