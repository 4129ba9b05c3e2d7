//! `snapshots/<tag>/vmstate`: the VM state QEMU's `savevm` stored in a qcow2 snapshot, made by
//! qemu-system-x86_64 itself (TCG). The file starts with QEMU's migration stream magic, has the
//! size the snapshot table records (`qemu-img info`) and exists only for snapshots that saved a
//! state.

mod common;
mod mount_support;
mod qmp_support;

use common::*;
use mount_support::*;
use qmp_support::QmpListener;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};

/// QEMU_VM_FILE_MAGIC ("QEVM") and QEMU_VM_FILE_VERSION, the first 8 bytes of the stream.
const STREAM_HEAD: [u8; 8] = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];

/// `vm-state-size` of each snapshot, as qemu-img reads the table.
fn vm_state_sizes(image: &Path) -> Vec<(String, u64)> {
    let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&info).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let size = s["vm-state-size"].as_u64().unwrap();
                    (s["name"].as_str().unwrap().to_string(), size)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn assert_vm_state(mnt: &Path, tag: &str, want_size: u64) -> Vec<u8> {
    let path = mnt.join("snapshots").join(tag).join("vmstate");
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(meta.len(), want_size, "{}: size", path.display());
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        bytes.len() as u64,
        want_size,
        "{}: bytes read",
        path.display()
    );
    assert_eq!(bytes[..8], STREAM_HEAD, "{}: stream header", path.display());
    assert_refuses_writes(&path, &bytes);
    bytes
}

#[test]
fn savevm_state_is_a_read_only_file_of_the_recorded_size() {
    let s = Scratch::new("vmstate-bare");
    let img = s.path("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    // A firmware-only VM (no guest needed) saves RAM and devices into the image's snapshot.
    let qmp = QmpListener::bind(&s.path("qmp.sock"));
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-m", "32", "-drive"])
        .arg(format!("file={},format=qcow2,if=none,id=d0", img.display()))
        .args(qmp.qemu_args())
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64; run .ci/guest-deps.sh");
    let mut q = qmp.accept();
    q.execute("stop", json!({}));
    let out = q.hmp("savevm with-state");
    assert!(!out.to_lowercase().contains("error"), "savevm: {out}");
    q.quit();
    assert!(qemu.wait().unwrap().success());
    // A snapshot qemu-img makes has no VM state, and gets no vmstate file.
    qemu_img(&["snapshot", "-c", "disk-only", img.to_str().unwrap()]);
    let sizes = vm_state_sizes(&img);
    let with = sizes.iter().find(|(n, _)| n == "with-state").unwrap().1;
    assert!(with > 8, "{sizes:?}");
    assert_eq!(sizes.iter().find(|(n, _)| n == "disk-only").unwrap().1, 0);

    let list = run(BIN, &["--list", img.to_str().unwrap()]);
    let line = list
        .lines()
        .find(|l| l.trim_start().starts_with("snapshots/with-state/vmstate"))
        .unwrap_or_else(|| panic!("--list shows no vmstate:\n{list}"));
    assert!(line.contains("KiB") || line.contains("MiB"), "{line}");
    assert!(!list.contains("disk-only/vmstate"), "{list}");
    let json = run(BIN, &["--list", "--json", img.to_str().unwrap()]);
    let want = json!({"path": "snapshots/with-state/vmstate", "size": with});
    let v: Value = serde_json::from_str(&json).unwrap();
    let files: Vec<&Value> = v["views"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|view| view["files"].as_array().unwrap())
        .collect();
    assert!(files.contains(&&want), "{json}");

    let (_guard, mnt) = mount(&img, &s.0, &["-o", "ro"]);
    assert_vm_state(&mnt, "with-state", with);
    assert!(!mnt.join("snapshots/disk-only/vmstate").exists());
    assert!(!mnt.join("vmstate").exists());
    assert_eq!(
        names_in(&mnt.join("snapshots/with-state")),
        ["disk.raw", "vmstate"]
    );
}
