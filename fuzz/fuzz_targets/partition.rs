//! Scans the input as a disk for MBR/GPT partition tables.
#![no_main]

#[path = "../../tests/fuzz_support/mod.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::run_partition(data);
});
