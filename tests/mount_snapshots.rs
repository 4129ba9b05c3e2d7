//! Live snapshots on real mounts: `mkdir snapshots/NAME` while an O_DIRECT writer runs takes
//! exactly the writes acknowledged before it (and each in-flight write wholly or not at all),
//! `rmdir` (EBUSY while open, EPERM for a backing layer), `mv`, and after unmount QEMU lists
//! the snapshots, reads them as the model says and finds the image clean.

mod common;
mod mount_support;
mod qcow2_support;

use common::*;
use mount_support::*;
use qcow2_support::{create, overlay};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const BLOCK: u64 = 4096;

fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let skip = storage.as_ptr().align_offset(4096);
    &mut storage[skip..skip + len]
}

fn check_clean(image: &std::path::Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "qemu-img check: {text}"
    );
}

type Log = Arc<parking_lot::Mutex<Vec<(u64, Vec<u8>)>>>;

#[test]
fn mkdir_during_direct_writes_rmdir_and_rename() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("msnaps");
    let mut rng = Rng::new(81);
    let base = d.path("base.qcow2");
    create(&base, "", SIZE);
    write_random("qcow2", &base, &mut rng, 0, SIZE as usize / 2);
    let img = d.path("top.qcow2");
    overlay(&img, "base.qcow2", "qcow2", None, "");
    write_random("qcow2", &img, &mut rng, 3 * MIB, 2 * MIB as usize);
    let initial = qemu_raw(&img, None, &[]);
    let (guard, mnt) = mount(&img, &d.0, &[]);
    let snaps = mnt.join("snapshots");
    let disk = mnt.join("disk.raw");

    // The writer: one O_DIRECT write at a time, each logged before it starts.
    let log: Log = Default::default();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, acked, stop, disk) = (log.clone(), acked.clone(), stop.clone(), disk.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&disk)
                .unwrap();
            let mut rng = Rng::new(82);
            let mut storage = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) || i < 40 {
                let blocks = 1 + rng.below(64);
                let off = rng.below(SIZE / BLOCK - blocks) * BLOCK;
                let data = rng.bytes((blocks * BLOCK) as usize);
                log.lock().push((off, data.clone()));
                let buf = aligned(&mut storage, data.len());
                buf.copy_from_slice(&data);
                f.write_all_at(buf, off).unwrap();
                i += 1;
                acked.store(i, Ordering::Release);
            }
        })
    };
    while acked.load(Ordering::Acquire) < 20 {
        std::thread::yield_now();
    }
    let a = acked.load(Ordering::Acquire);
    std::fs::create_dir(snaps.join("during")).unwrap();
    let s = log.lock().len();
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    let log = log.lock().clone();
    let snap = std::fs::read(snaps.join("during/disk.raw")).unwrap();
    // The snapshot is the disk after exactly k writes, a <= k <= s.
    let mut state = initial.clone();
    for (off, data) in &log[..a] {
        state[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let mut k = a;
    while state != snap {
        assert!(
            k < s,
            "the snapshot is no state between write {a} and {s} (acked / started)"
        );
        let (off, data) = &log[k];
        state[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        k += 1;
    }
    let during = state;
    let mut live = initial;
    for (off, data) in &log {
        live[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    assert_same("live", &std::fs::read(&disk).unwrap(), &live);

    // Names: EEXIST for a used one, EPERM for the backing layer.
    let e = std::fs::create_dir(snaps.join("during")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EEXIST);
    let e = std::fs::create_dir(snaps.join("base")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EEXIST);
    let e = std::fs::remove_dir(snaps.join("base")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EPERM);

    // A second snapshot, written over, then removed while open (EBUSY) and after close.
    std::fs::create_dir(snaps.join("gone")).unwrap();
    {
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        let data = rng.bytes(3 * MIB as usize);
        f.write_all_at(&data, MIB).unwrap();
        live[MIB as usize..4 * MIB as usize].copy_from_slice(&data);
        f.sync_all().unwrap();
    }
    {
        let _open = std::fs::File::open(snaps.join("gone/disk.raw")).unwrap();
        let e = std::fs::remove_dir(snaps.join("gone")).unwrap_err();
        assert_eq!(errno_of(&e), libc::EBUSY);
    }
    std::fs::remove_dir(snaps.join("gone")).unwrap();
    assert!(!snaps.join("gone").exists());
    std::fs::rename(snaps.join("during"), snaps.join("before-upgrade")).unwrap();
    assert_same(
        "renamed",
        &std::fs::read(snaps.join("before-upgrade/disk.raw")).unwrap(),
        &during,
    );
    drop(guard);

    let listed = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    assert!(listed.contains("before-upgrade"), "{listed}");
    assert!(
        !listed.contains("gone") && !listed.contains("during"),
        "{listed}"
    );
    check_clean(&img);
    assert_same("live (qemu)", &qemu_raw(&img, None, &[]), &live);
    assert_same(
        "snapshot (qemu)",
        &qemu_raw(&img, None, &["-l", "snapshot.name=before-upgrade"]),
        &during,
    );

    // It comes back at the next mount, and a read-only mount refuses changes.
    let (guard, mnt) = mount(&img, &d.0, &["-o", "ro"]);
    let snaps = mnt.join("snapshots");
    assert_same(
        "remounted",
        &std::fs::read(snaps.join("before-upgrade/disk.raw")).unwrap(),
        &during,
    );
    // The kernel answers for a read-only mount (EROFS) before we are asked (EPERM).
    let e = std::fs::remove_dir(snaps.join("before-upgrade")).unwrap_err();
    assert!([libc::EPERM, libc::EROFS].contains(&errno_of(&e)), "{e}");
    assert!(std::fs::create_dir(snaps.join("new")).is_err());
    drop(guard);

    // A snapshot found at mount: renamed and removed with its changes/ file.
    let (guard, mnt) = mount(&img, &d.0, &[]);
    let (snaps, changes) = (mnt.join("snapshots"), mnt.join("changes"));
    assert!(changes.join("before-upgrade.raw").exists());
    std::fs::rename(snaps.join("before-upgrade"), snaps.join("x")).unwrap();
    assert!(changes.join("x.raw").exists() && !changes.join("before-upgrade.raw").exists());
    {
        let _open = std::fs::File::open(changes.join("x.raw")).unwrap();
        let e = std::fs::remove_dir(snaps.join("x")).unwrap_err();
        assert_eq!(errno_of(&e), libc::EBUSY);
    }
    std::fs::remove_dir(snaps.join("x")).unwrap();
    assert!(!changes.join("x.raw").exists() && !snaps.join("x").exists());
    drop(guard);
    assert!(!qemu_img(&["snapshot", "-l", img.to_str().unwrap()]).contains("before-upgrade"));
    check_clean(&img);
    assert_same("live at the end", &qemu_raw(&img, None, &[]), &live);
}
