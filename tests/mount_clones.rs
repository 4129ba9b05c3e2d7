//! `--clones DIR` on real mounts: mkdir/rmdir under clones/, writes through a clone's
//! disk.raw against a byte model, QEMU reading the clone files, clones surviving remount,
//! and the image staying untouched.

mod common;
mod mount_support;
mod qcow2_support;

use common::*;
use mount_support::*;
use qcow2_support::*;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const SIZE: u64 = 16 * MIB;

fn golden(d: &Scratch, rng: &mut Rng) -> std::path::PathBuf {
    let base = d.path("base.qcow2");
    create(&base, "", SIZE);
    apply_random(&base, rng, SIZE, 30, 300 * KIB);
    let img = d.path("golden.qcow2");
    overlay(&img, "base.qcow2", "qcow2", None, "");
    apply_random(&img, rng, SIZE, 30, 100 * KIB);
    img
}

/// Random writes, some fsyncs and hole punches through `disk`, applied to `model` as well.
fn workload(disk: &Path, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    for i in 0..ops {
        let len = 1 + rng.below(150 * KIB) as usize;
        let off = rng.below(SIZE - len as u64) as usize;
        if i % 9 == 8 {
            let (off, len) = (off / 4096 * 4096, len.div_ceil(4096) * 4096);
            let len = len.min(model.len() - off);
            // SAFETY: f is open; fallocate touches no memory.
            let r = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                )
            };
            assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
            model[off..off + len].fill(0);
        } else {
            let data = rng.bytes(len);
            f.write_all_at(&data, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
        if i % 10 == 0 {
            f.sync_all().unwrap();
        }
    }
    f.sync_all().unwrap();
}

#[test]
fn clones_are_made_written_removed_and_survive_remount() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("mclones");
    let mut rng = Rng::new(41);
    let img = golden(&d, &mut rng);
    let golden_bytes = qemu_raw(&img, None, &[]);
    let untouched = capture_files(&[&img, &d.path("base.qcow2")]);
    let dir = d.path("clones");
    let (guard, mnt) = mount(&img, &d.0, &["--clones", dir.to_str().unwrap()]);
    let clones = mnt.join("clones");
    assert_eq!(
        names_in(&mnt),
        ["changes", "clones", "disk.raw", "snapshots"]
    );
    assert_refuses_writes(&mnt.join("disk.raw"), &golden_bytes);
    assert!(names_in(&clones).is_empty());

    let mut models = BTreeMap::new();
    for name in ["web-1", "web 2", "db"] {
        std::fs::create_dir(clones.join(name)).unwrap();
        assert_eq!(names_in(&clones.join(name)), ["disk.raw"]);
        assert!(dir.join(format!("{name}.qcow2")).exists());
        models.insert(name.to_string(), golden_bytes.clone());
    }
    let e = std::fs::create_dir(clones.join("db")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EEXIST, "{e}");
    let e = std::fs::create_dir(clones.join("x".repeat(252))).unwrap_err();
    assert!(
        matches!(errno_of(&e), libc::EINVAL | libc::ENAMETOOLONG),
        "{e}"
    );
    for (name, model) in models.iter_mut() {
        workload(&clones.join(name).join("disk.raw"), model, &mut rng, 40);
    }
    for (name, model) in &models {
        assert_file(&clones.join(name).join("disk.raw"), model, Some(0o644));
    }
    // QEMU cannot write a clone while it is mounted (image locks).
    let busy = std::process::Command::new("qemu-io")
        .args(["-c", "write 0 512"])
        .arg(dir.join("db.qcow2"))
        .output()
        .unwrap();
    assert!(!busy.status.success(), "QEMU wrote a mounted clone");
    // rmdir: EBUSY while a file of the clone is open, then gone with its file.
    let open = std::fs::File::open(clones.join("db/disk.raw")).unwrap();
    let e = std::fs::remove_dir(clones.join("db")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EBUSY, "{e}");
    drop(open);
    std::fs::remove_dir(clones.join("db")).unwrap();
    models.remove("db");
    assert!(!dir.join("db.qcow2").exists());
    assert_eq!(names_in(&clones), ["web 2", "web-1"]);
    drop(guard);
    unmount(&mnt);

    // Each clone is a qcow2 file QEMU reads as the mount showed it.
    for (name, model) in &models {
        let file = dir.join(format!("{name}.qcow2"));
        let check = qemu_img(&["check", file.to_str().unwrap()]);
        assert!(check.contains("No errors"), "{name}: {check}");
        same(name, &qemu_raw(&file, None, &[]), model);
    }
    assert_files_unchanged(&untouched);

    // --list shows the tree a mount would: the clones and the changes files.
    let listed: serde_json::Value = serde_json::from_str(&run(
        BIN,
        &[
            "--list",
            "--json",
            "--clones",
            dir.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let paths: Vec<&str> = listed["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "disk.raw",
            "snapshots/base/disk.raw",
            "changes/base.raw",
            "clones/web 2/disk.raw",
            "clones/web-1/disk.raw"
        ]
    );

    // A remount finds them again; a stranger in DIR is left out.
    let other = d.path("other.qcow2");
    create(&other, "", SIZE);
    overlay(
        &dir.join("stranger.qcow2"),
        "../other.qcow2",
        "qcow2",
        None,
        "",
    );
    let (_guard, mnt) = mount(&img, &d.0, &["-o", &format!("clones={}", dir.display())]);
    let clones = mnt.join("clones");
    assert_eq!(names_in(&clones), ["web 2", "web-1"]);
    for (name, model) in models.iter_mut() {
        assert_file(&clones.join(name).join("disk.raw"), model, Some(0o644));
        workload(&clones.join(name).join("disk.raw"), model, &mut rng, 10);
    }
    unmount(&mnt);
    for (name, model) in &models {
        same(
            name,
            &qemu_raw(&dir.join(format!("{name}.qcow2")), None, &[]),
            model,
        );
    }
    assert_files_unchanged(&untouched);
}
