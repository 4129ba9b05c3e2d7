//! Replays every input the fuzz targets (fuzz/) ever crashed or hung on, through the same
//! harness, on stable: tests/fuzz_regressions/<target>/*. Each must now open or fail cleanly.

mod fuzz_support;

use fuzz_support::*;
use std::path::Path;

fn replay(target: &Target) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target.name);
    replay_dir(target, &dir);
}

#[test]
fn probe() {
    replay(&PROBE);
}

#[test]
fn qcow2() {
    replay(&QCOW2);
}

#[test]
fn vmdk() {
    replay(&VMDK);
}

#[test]
fn vhd() {
    replay(&VHD);
}

#[test]
fn vhdx() {
    replay(&VHDX);
}

#[test]
fn vdi() {
    replay(&VDI);
}

#[test]
fn partition() {
    replay(&Target {
        name: "partition",
        files: &["disk"],
        format: None,
    });
}

/// The harness itself: splitting and joining round-trip, so seeds carry their parents.
#[test]
fn split_join_round_trip() {
    let files: [&[u8]; 3] = [b"top", b"", b"third"];
    assert_eq!(split(&join(&files), 3), files.to_vec());
    assert_eq!(split(b"only", 3), vec![&b"only"[..]]);
}
