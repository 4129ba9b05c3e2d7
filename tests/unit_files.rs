//! The systemd units shipped in mount-scripts/ must pass `systemd-analyze verify` (skipped,
//! with a note, where systemd-analyze is not installed). The service is verified as an
//! instance, with its `vmfs-mount` replaced by the built binary (systemd checks that the
//! command exists, and the binary is not installed here).

mod common;

use common::*;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vmfs-mount");
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/mount-scripts");

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: not verifying the unit files");
        return;
    }
    let s = Scratch::new("unit-files");
    let service = std::fs::read_to_string(format!("{SCRIPTS}/vmfs-mount@.service")).unwrap();
    assert!(service.contains("\nType=notify\n"), "{service}");
    let exec = "\nExecStart=vmfs-mount -f ";
    assert!(service.contains(exec), "{service}");
    let service = service.replace(exec, &format!("\nExecStart={BIN} -f "));
    // The instance of an image path as `systemd-escape --path` gives it.
    let instance = s.path("vmfs-mount@srv-images-web\\x2d01.qcow2.service");
    std::fs::write(&instance, service).unwrap();
    let mount = s.path("mnt-web01.mount");
    std::fs::copy(format!("{SCRIPTS}/mnt-web01.mount"), &mount).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .arg(&mount)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
