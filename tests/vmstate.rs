//! `snapshots/<tag>/vmstate`: the VM state QEMU's `savevm` stored in a qcow2 snapshot, made by
//! qemu-system-x86_64 itself (TCG). The file starts with QEMU's migration stream magic, has the
//! size the snapshot table records (`qemu-img info`), exists only for snapshots that saved a
//! state; and a VM started with the same configuration that takes its state from
//! `exec:cat .../vmstate` (QEMU's `-incoming`) resumes where the guest was saved: its counter
//! goes on from the saved value.

mod common;
mod guest;
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

/// Saves the state of a firmware-only VM (no guest needed) on `img` as snapshot `tag`.
fn savevm(s: &Scratch, img: &Path, tag: &str) {
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
    let out = q.hmp(&format!("savevm {tag}"));
    assert!(!out.to_lowercase().contains("error"), "savevm: {out}");
    q.quit();
    assert!(qemu.wait().unwrap().success());
}

#[test]
fn savevm_state_is_a_read_only_file_of_the_recorded_size() {
    let s = Scratch::new("vmstate-bare");
    let img = s.path("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    savevm(&s, &img, "with-state");
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

/// A snapshot table that places the state where QEMU could not have written it (past the
/// snapshot's L1 table, or overflowing) gives no vmstate file and a log line, and the mount and
/// the snapshot's disk still work.
#[test]
fn a_state_past_the_snapshot_l1_gets_no_file() {
    let s = Scratch::new("vmstate-hostile");
    for (i, size) in [1u64 << 40, u64::MAX].into_iter().enumerate() {
        let img = s.path(&format!("vm{i}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
        savevm(&s, &img, "bad");
        let disk = snapshot_oracle(&img, "qcow2", "bad");
        // The first snapshot entry: vm_state_size_large is the first field of its extra data.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 64).unwrap();
        let entry = u64::from_be_bytes(b);
        let mut extra_len = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut extra_len, entry + 36).unwrap();
        assert!(
            u32::from_be_bytes(extra_len) >= 8,
            "a v3 entry has vm_state_size_large"
        );
        std::os::unix::fs::FileExt::write_all_at(&f, &size.to_be_bytes(), entry + 40).unwrap();
        drop(f);

        let out = Command::new(BIN).arg("--list").arg(&img).output().unwrap();
        assert!(out.status.success());
        let (list, log) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(!list.contains("bad/vmstate"), "{list}");
        assert!(
            log.contains("snapshots/bad: no vmstate file"),
            "{size}: {log}"
        );
        let dir = s.path(&format!("m{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (_guard, mnt) = mount(&img, &dir, &["-o", "ro"]);
        assert_eq!(names_in(&mnt.join("snapshots/bad")), ["disk.raw"]);
        assert_same(
            "snapshot disk",
            &std::fs::read(mnt.join("snapshots/bad/disk.raw")).unwrap(),
            &disk,
        );
    }
}

/// The guest: a random token on its disk, then a counter on the console every 0.2 s.
const COUNTER: &str = r#"
tok=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf "MARK-%s\n" "$tok" | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
i=0
while true; do echo "TICK $tok $i"; i=$((i+1)); usleep 200000; done
"#;

/// The counter values printed with `tok`, across the output of the saved VM and of the
/// resumed one. The save may have stopped the guest in the middle of a line: the resumed VM
/// then prints the rest of it first, which belongs to the saved VM's last line.
fn ticks(tok: &str, saved: &[String], resumed: &[String]) -> (Vec<u64>, usize) {
    let mut saved = saved.to_vec();
    let mut resumed = resumed.to_vec();
    if let Some(first) = resumed.first()
        && !first.starts_with("TICK ")
        && let Some(last) = saved.last_mut()
    {
        last.push_str(first);
        resumed.remove(0);
    }
    let parse = |l: &String| {
        l.strip_prefix(&format!("TICK {tok} ")).map(|n| {
            n.parse::<u64>()
                .unwrap_or_else(|_| panic!("bad line {l:?}"))
        })
    };
    let before: Vec<u64> = saved.iter().filter_map(parse).collect();
    let after: Vec<u64> = resumed.iter().filter_map(parse).collect();
    let n = before.len();
    (before.into_iter().chain(after).collect(), n)
}

#[test]
fn a_vm_resumes_from_the_mounted_vmstate() {
    let s = Scratch::new("vmstate-guest");
    let img = s.path("guest.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    let (saved_dir, resumed_dir) = (s.path("saved"), s.path("resumed"));
    std::fs::create_dir_all(&saved_dir).unwrap();
    std::fs::create_dir_all(&resumed_dir).unwrap();

    // Boot, let the counter run, stop the VM, savevm, quit.
    let qmp = QmpListener::bind(&s.path("qmp1.sock"));
    let args = qmp.qemu_args();
    let mut vm = guest::Boot::new(&saved_dir, COUNTER)
        .drive(&format!("file={},format=qcow2,if=virtio", img.display()))
        .qemu_args(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .memory_mib(128)
        .timeout(std::time::Duration::from_secs(240))
        .spawn();
    let mut q = qmp.accept();
    let first = vm.wait_for("TICK ");
    let tok = first.split(' ').nth(1).unwrap().to_string();
    vm.wait_for(&format!("TICK {tok} 3"));
    q.execute("stop", json!({}));
    let out = q.hmp("savevm running");
    assert!(!out.to_lowercase().contains("error"), "savevm: {out}");
    q.quit();
    let saved = vm.finish();

    let size = vm_state_sizes(&img)
        .into_iter()
        .find(|(n, _)| n == "running")
        .expect("savevm made no snapshot")
        .1;
    let (_guard, mnt) = mount(&img, &s.0, &["-o", "ro"]);
    assert_vm_state(&mnt, "running", size);
    let disk = mnt.join("snapshots/running/disk.raw");
    let head = std::fs::read(&disk).unwrap();
    assert!(
        head.starts_with(format!("MARK-{tok}\n").as_bytes()),
        "the snapshot's disk lacks the guest's mark"
    );

    // The same machine, its disk from the snapshot (writes to a throw-away overlay), its
    // state from the mounted file.
    let qmp = QmpListener::bind(&s.path("qmp2.sock"));
    let mut args = qmp.qemu_args();
    let state = mnt.join("snapshots/running/vmstate");
    args.extend(["-incoming".to_string(), "defer".to_string()]);
    let mut vm = guest::Boot::new(&resumed_dir, COUNTER)
        .drive(&format!(
            "file={},format=raw,if=virtio,snapshot=on",
            disk.display()
        ))
        .qemu_args(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .memory_mib(128)
        .timeout(std::time::Duration::from_secs(120))
        .spawn();
    let mut q = qmp.accept();
    // `-incoming defer` then `migrate-incoming` is `-incoming URI` with migration events on,
    // so the test can wait for the load to finish.
    let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
    q.execute("migrate-set-capabilities", caps);
    let uri = format!("exec:cat {}", state.display());
    q.execute("migrate-incoming", json!({ "uri": uri }));
    let done = q.wait_event("MIGRATION", |e| {
        matches!(
            e["data"]["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
    });
    assert_eq!(done["data"]["status"], "completed", "{done}");
    // The VM was stopped when saved: it is loaded paused, as it was, and runs on `cont`.
    let status = q.execute("query-status", json!({}));
    assert_eq!(status["status"], "paused", "{status}");
    q.execute("cont", json!({}));
    for _ in 0..3 {
        vm.wait_for(&format!("TICK {tok} "));
    }
    let status = q.execute("query-status", json!({}));
    assert_eq!(status["status"], "running", "{status}");
    q.quit();
    let resumed = vm.finish();
    let (all, before) = ticks(&tok, &saved.lines, &resumed.lines);
    let want: Vec<u64> = (0..all.len() as u64).collect();
    assert_eq!(
        all,
        want,
        "the counter does not go on where it was saved\nsaved:\n{}\nresumed:\n{}",
        saved.describe(),
        resumed.describe()
    );
    assert!(all.len() - before >= 3, "the resumed VM printed too little");
}
