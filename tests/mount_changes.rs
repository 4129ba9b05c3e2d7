//! `changes/` on real mounts: each `<VIEW>.raw` holds the live bytes wherever they differ
//! from VIEW (checked against QEMU's bytes of VIEW and a model of the live disk), holes
//! elsewhere, follows writes made while it is open, and makes an incremental backup with
//! SEEK_DATA/SEEK_HOLE and `cp --sparse=always`; `bitmap-NAME.raw` follows QEMU's bitmap.

mod bitmap_support;
mod common;
mod mount_support;
mod qcow2_support;

use bitmap_support::qemu_dirty_ranges;
use common::*;
use mount_support::*;
use qcow2_support::*;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const SIZE: u64 = 16 * MIB;

/// The data extents of an open file, by SEEK_DATA/SEEK_HOLE.
fn data_extents(f: &File, size: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let Ok(start) = seek(f, off, libc::SEEK_DATA) else {
            break;
        };
        let end = seek(f, start, libc::SEEK_HOLE).unwrap();
        assert!(end > start, "empty data extent at {start:#x}");
        out.push(start..end);
        off = end;
    }
    out
}

/// Checks `changes` (a changes/ file) against `old` (the view's bytes) and `live`: data
/// extents hold the live bytes, holes read as zeros, and every differing byte is in data.
/// Returns the extents.
fn check_changes_file(what: &str, changes: &Path, old: &[u8], live: &[u8]) -> Vec<Range<u64>> {
    let f = File::open(changes).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        live.len() as u64,
        "{what}: size"
    );
    let extents = data_extents(&f, live.len() as u64);
    let bytes = std::fs::read(changes).unwrap();
    let mut pos = 0usize;
    for r in extents.iter().map(|r| r.start as usize..r.end as usize) {
        assert!(
            bytes[pos..r.start].iter().all(|&b| b == 0),
            "{what}: hole before {r:x?} not zero"
        );
        assert_unchanged(what, old, live, pos..r.start);
        assert!(
            bytes[r.clone()] == live[r.clone()],
            "{what}: data extent {r:x?} is not the live bytes"
        );
        pos = r.end;
    }
    assert_unchanged(what, old, live, pos..live.len());
    extents
}

/// Bytes in a hole of a changes file must be the same in the old view and the live disk.
fn assert_unchanged(what: &str, old: &[u8], live: &[u8], hole: Range<usize>) {
    if old.get(hole.clone()) != Some(&live[hole.clone()]) {
        let at = hole
            .clone()
            .find(|&i| old.get(i) != Some(&live[i]))
            .unwrap_or(hole.start);
        panic!("{what}: byte {at:#x} differs but lies in a hole");
    }
}

/// An incremental backup: the old view's bytes with the changes file's data extents laid
/// over them (copied with `cp --sparse=always` first) must be the live disk.
fn restore_from_backup(d: &Scratch, changes: &Path, old: &[u8], live: &[u8]) {
    let backup = d.path("backup.raw");
    run(
        "cp",
        &[
            "--sparse=always",
            changes.to_str().unwrap(),
            backup.to_str().unwrap(),
        ],
    );
    let b = File::open(&backup).unwrap();
    let mut restored = old.to_vec();
    restored.resize(live.len(), 0);
    for r in data_extents(&File::open(changes).unwrap(), live.len() as u64) {
        let n = read_fully_at(&b, &mut restored[r.start as usize..r.end as usize], r.start);
        assert_eq!(n as u64, r.end - r.start);
    }
    same("restored from the incremental backup", &restored, live);
    std::fs::remove_file(&backup).unwrap();
}

#[test]
fn changes_files_track_a_writable_mount() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("mchanges");
    let mut rng = Rng::new(51);
    let base = d.path("base.qcow2");
    create(&base, "", SIZE);
    apply_random(&base, &mut rng, SIZE, 30, 300 * KIB);
    let top = d.path("top.qcow2");
    overlay(&top, "base.qcow2", "qcow2", None, "");
    apply_random(&top, &mut rng, SIZE, 20, 100 * KIB);
    qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
    apply_random(&top, &mut rng, SIZE, 20, 100 * KIB);
    let views = [
        ("base", qemu_raw(&base, None, &[])),
        ("s1", mount_support::snapshot_oracle(&top, "qcow2", "s1")),
    ];
    let mut live = qemu_raw(&top, None, &[]);
    let (_guard, mnt) = mount(&top, &d.0, &[]);
    assert_eq!(names_in(&mnt.join("changes")), ["base.raw", "s1.raw"]);
    for (name, old) in &views {
        let path = mnt.join(format!("changes/{name}.raw"));
        let extents = check_changes_file(name, &path, old, &live);
        let changed: u64 = extents.iter().map(|r| r.end - r.start).sum();
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert_eq!(
            blocks, changed,
            "{name}: st_blocks counts the changed bytes"
        );
    }
    let s1_changes = mnt.join("changes/s1.raw");
    // Opened before the writes: what it shows must follow them.
    let held = File::open(&s1_changes).unwrap();
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap();
    for i in 0..40 {
        let len = 1 + rng.below(120 * KIB) as usize;
        let off = rng.below(SIZE - len as u64) as usize;
        if i % 8 == 7 {
            let (off, len) = (off / 4096 * 4096, len.div_ceil(4096) * 4096);
            // SAFETY: disk is open; fallocate touches no memory.
            let r = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&disk),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                )
            };
            assert_eq!(r, 0);
            live[off..off + len].fill(0);
        } else {
            let data = rng.bytes(len);
            disk.write_all_at(&data, off as u64).unwrap();
            live[off..off + len].copy_from_slice(&data);
        }
    }
    disk.sync_all().unwrap();
    for (name, old) in &views {
        let path = mnt.join(format!("changes/{name}.raw"));
        let extents = check_changes_file(name, &path, old, &live);
        // Changes are whole clusters: never a byte-level diff, never the whole disk.
        let changed: u64 = extents.iter().map(|r| r.end - r.start).sum();
        assert!(changed > 0 && changed < SIZE, "{name}: {changed} bytes");
        restore_from_backup(&d, &path, old, &live);
    }
    let extents = data_extents(&held, SIZE);
    assert!(!extents.is_empty());
    let mut buf = vec![0u8; (extents[0].end - extents[0].start) as usize];
    read_fully_at(&held, &mut buf, extents[0].start);
    let r = extents[0].start as usize..extents[0].end as usize;
    assert!(
        buf == live[r],
        "the file opened before the writes shows them"
    );
    // Read-only files.
    assert_refuses_writes(&s1_changes, &std::fs::read(&s1_changes).unwrap());
}

#[test]
fn bitmap_files_show_what_qemu_recorded() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("mchanges-bitmap");
    let img = d.path("disk.qcow2");
    create(&img, "", SIZE);
    let mut rng = Rng::new(52);
    apply_random(&img, &mut rng, SIZE, 10, 200 * KIB);
    let p = img.to_str().unwrap();
    qemu_img(&["bitmap", "--add", "-g", "65536", p, "nightly"]);
    qemu_img(&["bitmap", "--add", "-g", "4096", p, "fine"]);
    apply_random(&img, &mut rng, SIZE, 20, 200 * KIB);
    let live = qemu_raw(&img, None, &[]);
    let dirty: Vec<_> = ["nightly", "fine"]
        .iter()
        .map(|n| (n.to_string(), qemu_dirty_ranges(&img, n)))
        .collect();
    let (_guard, mnt) = mount(&img, &d.0, &["-r"]);
    assert_eq!(
        names_in(&mnt.join("changes")),
        ["bitmap-fine.raw", "bitmap-nightly.raw"]
    );
    for (name, want) in dirty {
        let path = mnt.join(format!("changes/bitmap-{name}.raw"));
        let f = File::open(&path).unwrap();
        assert_eq!(data_extents(&f, SIZE), want, "bitmap {name}");
        let bytes = std::fs::read(&path).unwrap();
        let mut pos = 0;
        for r in &want {
            assert!(bytes[pos..r.start as usize].iter().all(|&b| b == 0));
            let r = r.start as usize..r.end as usize;
            assert!(bytes[r.clone()] == live[r.clone()], "bitmap {name}: {r:x?}");
            pos = r.end;
        }
    }
}

/// Polls `cond` (the kernel drops dentries of renamed or removed files asynchronously).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        std::thread::yield_now();
    }
}

/// Guest writes and discards to `disk` (and the model `live`); returns the clusters touched.
fn write_and_discard(
    disk: &File,
    rng: &mut Rng,
    live: &mut [u8],
    count: usize,
    cluster: u64,
) -> std::collections::BTreeSet<u64> {
    let mut touched = std::collections::BTreeSet::new();
    for i in 0..count {
        let mut len = 1 + rng.below(150 * KIB) as usize;
        let mut off = rng.below(live.len() as u64 - len as u64) as usize;
        if i % 7 == 6 {
            (off, len) = (off / 4096 * 4096, len.div_ceil(4096) * 4096);
            // SAFETY: disk is open; fallocate touches no memory.
            let r = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(disk),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                )
            };
            assert_eq!(r, 0);
            live[off..off + len].fill(0);
        } else {
            let data = rng.bytes(len);
            disk.write_all_at(&data, off as u64).unwrap();
            live[off..off + len].copy_from_slice(&data);
        }
        touched.extend(off as u64 / cluster..((off + len) as u64).div_ceil(cluster));
    }
    disk.sync_all().unwrap();
    touched
}

/// Asserts every reported extent is made of whole clusters the guest touched since the view
/// was taken: extra bytes only at cluster granularity.
fn assert_only_touched(
    what: &str,
    extents: &[Range<u64>],
    touched: &std::collections::BTreeSet<u64>,
    cluster: u64,
) {
    for r in extents {
        assert!(
            r.start % cluster == 0 && r.end % cluster == 0,
            "{what}: extent {r:x?} is not whole clusters"
        );
        for c in r.start / cluster..r.end / cluster {
            assert!(
                touched.contains(&c),
                "{what}: cluster {c} is reported but was not written since"
            );
        }
    }
}

#[test]
fn changes_files_of_snapshots_taken_while_mounted() {
    if !is_root() {
        return;
    }
    const CLUSTER: u64 = 64 * KIB;
    let d = Scratch::new("mchanges-live");
    let mut rng = Rng::new(53);
    // No backing file and no snapshot: changes/ appears with the first mkdir.
    let img = d.path("vm.qcow2");
    create(&img, "", SIZE);
    apply_random(&img, &mut rng, SIZE, 20, 300 * KIB);
    let mut live = qemu_raw(&img, None, &[]);
    let (guard, mnt) = mount(&img, &d.0, &[]);
    assert!(!mnt.join("changes").exists());
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap();
    write_and_discard(&disk, &mut rng, &mut live, 10, CLUSTER);

    std::fs::create_dir(mnt.join("snapshots/a")).unwrap();
    let at_a = live.clone();
    let a_changes = mnt.join("changes/a.raw");
    assert_eq!(names_in(&mnt.join("changes")), ["a.raw"]);
    let extents = check_changes_file("a at once", &a_changes, &at_a, &live);
    assert!(extents.is_empty(), "nothing changed yet: {extents:x?}");
    // Held open across the writes: what it shows must follow them.
    let held = File::open(&a_changes).unwrap();
    let after_a = write_and_discard(&disk, &mut rng, &mut live, 30, CLUSTER);

    std::fs::create_dir(mnt.join("snapshots/b")).unwrap();
    let at_b = live.clone();
    let after_b = write_and_discard(&disk, &mut rng, &mut live, 30, CLUSTER);
    let since_a: std::collections::BTreeSet<u64> = after_a.union(&after_b).copied().collect();

    assert_eq!(names_in(&mnt.join("changes")), ["a.raw", "b.raw"]);
    for (name, old, touched) in [("a", &at_a, &since_a), ("b", &at_b, &after_b)] {
        let path = mnt.join(format!("changes/{name}.raw"));
        let extents = check_changes_file(name, &path, old, &live);
        assert!(!extents.is_empty(), "{name}: writes since it are shown");
        assert_only_touched(name, &extents, touched, CLUSTER);
        if name == "b" {
            // First asked now (a's count was taken at mkdir and is reused for a while).
            let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
            let changed: u64 = extents.iter().map(|r| r.end - r.start).sum();
            assert_eq!(
                blocks, changed,
                "{name}: st_blocks counts the changed bytes"
            );
        }
        restore_from_backup(&d, &path, old, &live);
        assert_same(
            &format!("snapshots/{name}/disk.raw"),
            &std::fs::read(mnt.join(format!("snapshots/{name}/disk.raw"))).unwrap(),
            old,
        );
    }
    assert_eq!(
        data_extents(&held, SIZE),
        data_extents(&File::open(&a_changes).unwrap(), SIZE)
    );
    drop(held);
    assert_refuses_writes(&a_changes, &std::fs::read(&a_changes).unwrap());

    // The file follows the snapshot through mv and rmdir.
    std::fs::rename(mnt.join("snapshots/a"), mnt.join("snapshots/c")).unwrap();
    eventually("changes/a.raw renamed to c.raw", || {
        !mnt.join("changes/a.raw").exists() && mnt.join("changes/c.raw").exists()
    });
    check_changes_file("c", &mnt.join("changes/c.raw"), &at_a, &live);
    std::fs::remove_dir(mnt.join("snapshots/b")).unwrap();
    eventually("changes/b.raw removed", || {
        !mnt.join("changes/b.raw").exists()
    });
    assert_eq!(names_in(&mnt.join("changes")), ["c.raw"]);
    drop(disk);
    drop(guard);

    // After unmount: QEMU agrees, and the snapshot taken while mounted is back with its file.
    let listed = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    let tags: Vec<&str> = listed
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(tags, ["c"], "{listed}");
    same("live (qemu)", &qemu_raw(&img, None, &[]), &live);
    same(
        "c (qemu)",
        &mount_support::snapshot_oracle(&img, "qcow2", "c"),
        &at_a,
    );
    let (_guard, mnt) = mount(&img, &d.0, &["-r"]);
    check_changes_file("c after remount", &mnt.join("changes/c.raw"), &at_a, &live);
}
