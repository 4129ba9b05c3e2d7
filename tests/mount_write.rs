//! Copy-on-write writes through a real mount: qcow2 in place, `--overlay` over another format,
//! hole punching, refused resizes and QEMU lock interop. Every case ends with `qemu-img check`
//! and a byte comparison of `qemu-img convert` against a model of what was written.

mod common;
mod mount_support;

use common::*;
use mount_support::*;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

/// Applies seeded writes and hole punches to `disk` (and to `model`), then fsyncs.
fn scribble(disk: &Path, model: &mut [u8], seed: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    let mut writes: Vec<(u64, usize)> = vec![
        (0, 4096),
        (size - 1, 1),
        (65536 - 100, 300),
        (3 * 65536 + 7, 200_000),
    ];
    for _ in 0..40 {
        let len = 1 + rng.below(150_000) as usize;
        writes.push((rng.below(size - len as u64), len));
    }
    for (off, len) in writes {
        let data = rng.bytes(len);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    for (off, len) in [
        (5 * 65536u64, 3 * 65536u64),
        (100_000, 5000),
        (size - 70_000, 70_000),
    ] {
        // SAFETY: fallocate on an open fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
        model[off as usize..(off + len) as usize].fill(0);
    }
    f.sync_all().unwrap();
    let mut back = vec![0u8; model.len()];
    assert_eq!(read_fully_at(&f, &mut back, 0), model.len());
    assert_same("read back through the mount", &back, model);
}

fn assert_check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", image.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors"),
        "qemu-img check: {text}"
    );
    assert!(
        !text.contains("leaked"),
        "qemu-img check after a clean unmount: {text}"
    );
}

#[test]
fn qcow2_writes_land_copy_on_write_and_leave_snapshots_and_backing_alone() {
    let s = Scratch::new("mw-qcow2");
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    let mut rng = Rng::new(31);
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    write_random("qcow2", &base, &mut rng, 0, 4 << 20);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    write_random("qcow2", &top, &mut rng, 65536 + 512, 300_000);
    qemu_img(&["snapshot", "-c", "before", top.to_str().unwrap()]);
    let snap_before = snapshot_oracle(&top, "qcow2", "before");
    let base_before = std::fs::read(&base).unwrap();
    let mut model = qemu_raw(&top, Some("qcow2"), &[]);
    {
        let (_guard, mnt) = mount(&top, &s.0, &[]);
        scribble(&mnt.join("disk.raw"), &mut model, 5);
        assert_file(
            &mnt.join("snapshots/before/disk.raw"),
            &snap_before,
            Some(0o444),
        );
        // While mounted for writing, QEMU may not write the image or its backing file.
        for (fmt, img) in [("qcow2", &top), ("qcow2", &base)] {
            let out = Command::new("qemu-io")
                .args(["-f", fmt, "-c", "write 0 512", img.to_str().unwrap()])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("lock"),
                "qemu-io wrote {} under the mount: {err}",
                img.display()
            );
        }
        // The size never changes.
        let f = OpenOptions::new()
            .write(true)
            .open(mnt.join("disk.raw"))
            .unwrap();
        assert!(f.set_len(1 << 20).is_err());
        assert_eq!(
            std::fs::metadata(mnt.join("disk.raw")).unwrap().len(),
            model.len() as u64
        );
    }
    assert_check_clean(&top);
    assert_same(
        "qemu-img convert after unmount",
        &qemu_raw(&top, Some("qcow2"), &[]),
        &model,
    );
    assert_same(
        "snapshot after writes",
        &snapshot_oracle(&top, "qcow2", "before"),
        &snap_before,
    );
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the backing file changed"
    );
}

#[test]
fn overlay_makes_any_format_writable_and_is_reused() {
    let s = Scratch::new("mw-overlay");
    let image = s.path("disk.vmdk");
    let overlay = s.path("changes.qcow2");
    let mut rng = Rng::new(77);
    qemu_img(&["create", "-q", "-f", "vmdk", image.to_str().unwrap(), "3M"]);
    write_random("vmdk", &image, &mut rng, 4096, 2 << 20);
    let image_before = std::fs::read(&image).unwrap();
    let mut model = qemu_raw(&image, Some("vmdk"), &[]);
    let base_view = model.clone();
    for session in 0..2 {
        let opt = format!("overlay={}", overlay.display());
        let (_guard, mnt) = mount(&image, &s.0, &["-o", &opt]);
        assert_file(
            &mnt.join("snapshots/disk/disk.raw"),
            &base_view,
            Some(0o444),
        );
        scribble(&mnt.join("disk.raw"), &mut model, 100 + session);
    }
    assert_check_clean(&overlay);
    let info = qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]);
    assert!(
        info.contains("\"backing-filename\": \"disk.vmdk\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"vmdk\""),
        "{info}"
    );
    assert_same(
        "overlay converted",
        &qemu_raw(&overlay, Some("qcow2"), &[]),
        &model,
    );
    assert!(
        std::fs::read(&image).unwrap() == image_before,
        "the image under the overlay changed"
    );
}

#[test]
fn a_format_without_in_place_writes_mounts_read_only_and_says_so() {
    let s = Scratch::new("mw-vdi");
    let image = s.path("disk.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", image.to_str().unwrap(), "2M"]);
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmfs-mount"))
        .arg(&image)
        .arg(&mnt)
        .output()
        .unwrap();
    let _guard = MountGuard(mnt.canonicalize().unwrap());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overlay"));
    let err = OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap_err();
    assert!(
        matches!(errno_of(&err), libc::EROFS | libc::EACCES),
        "{err}"
    );
}
