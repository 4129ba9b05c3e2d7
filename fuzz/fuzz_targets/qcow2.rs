//! Opens the input as a qcow2 image (with the parents and sidecars it carries) and reads it.
#![no_main]

#[path = "../../tests/fuzz_support/mod.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static SCRATCH: OnceLock<harness::Scratch> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let scratch = SCRATCH.get_or_init(|| harness::Scratch::new("qcow2"));
    harness::run(&harness::QCOW2, scratch, data);
});
