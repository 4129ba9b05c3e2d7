//! QEMU persistent dirty bitmaps on writable mounts: every enabled bitmap records what is
//! written or discarded through disk.raw, is in use while mounted, and after a clean
//! unmount is consistent for QEMU (`qemu-img info` flags, `qemu-img check` clean, and
//! qemu-nbd's dirty-bitmap context covering exactly the written bytes at the bitmap's
//! granularity). A crash leaves the in-use flag set.

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
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vmfs_mount::changes::ranges;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const SIZE: u64 = 24 * MIB;

/// name -> flags, as `qemu-img info --output=json` lists the image's bitmaps.
fn qemu_bitmap_flags(image: &Path) -> Vec<(String, Vec<String>)> {
    let out = qemu_img(&["info", "-U", "--output=json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<String>)> = list
        .iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (b["name"].as_str().unwrap().to_string(), flags)
        })
        .collect();
    out.sort();
    out
}

/// `qemu-img check --output=json`: (corruptions, leaks), asserting the command succeeded.
fn qemu_check(image: &Path) -> (u64, u64) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", image.to_str().unwrap()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    (
        v["corruptions"].as_u64().unwrap_or(0),
        v["leaks"].as_u64().unwrap_or(0),
    )
}

/// [r.start, r.end) widened to whole granules of `g` bytes, clipped to the disk.
fn widen(rs: &[Range<u64>], g: u64, size: u64) -> Vec<Range<u64>> {
    ranges::union(
        rs.iter()
            .map(|r| r.start / g * g..r.end.next_multiple_of(g).min(size))
            .collect(),
    )
}

/// The data extents of an open file, by SEEK_DATA/SEEK_HOLE.
fn data_extents(f: &File, size: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let Ok(start) = seek(f, off, libc::SEEK_DATA) else {
            break;
        };
        let end = seek(f, start, libc::SEEK_HOLE).unwrap();
        out.push(start..end);
        off = end;
    }
    out
}

fn punch(f: &File, off: u64, len: u64) {
    // SAFETY: fallocate on an open fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    assert_eq!(
        r,
        0,
        "punch {off:#x}+{len}: {}",
        std::io::Error::last_os_error()
    );
}

/// Writes and discards seeded random ranges through `disk` and the byte model `model`;
/// returns the ranges touched.
fn random_changes(disk: &File, model: &mut [u8], rng: &mut Rng, n: usize) -> Vec<Range<u64>> {
    let mut touched = Vec::new();
    for i in 0..n {
        let len = 1 + rng.below(200 * KIB);
        let off = rng.below(SIZE - len);
        if i % 5 == 4 {
            punch(disk, off, len);
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = rng.bytes(len as usize);
            disk.write_all_at(&data, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        touched.push(off..off + len);
    }
    ranges::union(touched)
}

/// An image with data, bitmaps "coarse" (64 KiB), "fine" (4 KiB, with QEMU-recorded bits
/// already) and "off" (disabled, 512 bytes).
fn image_with_bitmaps(d: &Scratch, rng: &mut Rng) -> std::path::PathBuf {
    let img = d.path("disk.qcow2");
    create(&img, "", SIZE);
    apply_random(&img, rng, SIZE, 8, 300 * KIB);
    let p = img.to_str().unwrap();
    qemu_img(&["bitmap", "--add", "-g", "4096", p, "fine"]);
    apply_random(&img, rng, SIZE, 6, 100 * KIB);
    qemu_img(&["bitmap", "--add", "-g", "65536", p, "coarse"]);
    qemu_img(&["bitmap", "--add", "-g", "512", "--disable", p, "off"]);
    img
}

const NAMES: [(&str, u64); 3] = [("coarse", 64 * KIB), ("fine", 4 * KIB), ("off", 512)];

/// What bitmap `NAMES[i]` must hold: what it held before, plus every touched byte widened
/// to its granularity (the disabled one records nothing).
fn expected(i: usize, before: &[Vec<Range<u64>>], touched: &[Range<u64>]) -> Vec<Range<u64>> {
    let (name, g) = NAMES[i];
    if name == "off" {
        return before[i].clone();
    }
    ranges::union([before[i].clone(), widen(touched, g, SIZE)].concat())
}

fn has_in_use(flags: &[String]) -> bool {
    flags.iter().any(|f| f == "in-use")
}

#[test]
fn writes_through_a_mount_land_in_the_bitmaps_qemu_reads() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("mbitmaps-round-trip");
    let mut rng = Rng::new(0xb17);
    let img = image_with_bitmaps(&d, &mut rng);
    let before: Vec<Vec<Range<u64>>> = NAMES
        .iter()
        .map(|(n, _)| qemu_dirty_ranges(&img, n))
        .collect();
    assert!(!before[1].is_empty() && before[0].is_empty() && before[2].is_empty());
    let mut model = qemu_raw(&img, None, &[]);
    let mut touched = Vec::new();
    // Two mounts: the second starts from what the first stored.
    for round in 0..2 {
        let (guard, mnt) = mount(&img, &d.0, &[]);
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join("disk.raw"))
            .unwrap();
        // Nothing written yet: the bitmaps are untouched.
        let flags = qemu_bitmap_flags(&img);
        assert!(flags.iter().all(|(_, f)| !has_in_use(f)), "{flags:?}");
        touched.extend(random_changes(&disk, &mut model, &mut rng, 30));
        for (name, f) in &qemu_bitmap_flags(&img) {
            assert_eq!(has_in_use(f), name != "off", "{name} while mounted: {f:?}");
        }
        // A guest fsync writes the bitmaps back (still in use), then more changes follow.
        disk.sync_all().unwrap();
        touched.extend(random_changes(&disk, &mut model, &mut rng, 30));
        touched = ranges::union(touched);
        // changes/bitmap-NAME.raw follows the writes: its extents are the bitmap's.
        for (i, (name, _)) in NAMES.iter().enumerate() {
            let f = File::open(mnt.join(format!("changes/bitmap-{name}.raw"))).unwrap();
            assert_eq!(
                data_extents(&f, SIZE),
                expected(i, &before, &touched),
                "round {round}: changes/bitmap-{name}.raw"
            );
        }
        drop(disk);
        unmount(&mnt);
        drop(guard);

        assert_eq!(
            qemu_bitmap_flags(&img),
            vec![
                ("coarse".to_string(), vec!["auto".to_string()]),
                ("fine".to_string(), vec!["auto".to_string()]),
                ("off".to_string(), vec![]),
            ],
            "round {round}"
        );
        assert_eq!(qemu_check(&img), (0, 0), "round {round}: qemu-img check");
        same("disk after unmount", &qemu_raw(&img, None, &[]), &model);
        for (i, (name, _)) in NAMES.iter().enumerate() {
            let got = qemu_dirty_ranges(&img, name);
            assert_eq!(got, expected(i, &before, &touched), "round {round}: {name}");
        }
    }
    // qemu-img bitmap --merge takes it into another image as it is.
    let copy = d.path("merged.qcow2");
    create(&copy, "", SIZE);
    let c = copy.to_str().unwrap();
    qemu_img(&["bitmap", "--add", "-g", "4096", c, "m"]);
    let src = img.to_str().unwrap();
    qemu_img(&[
        "bitmap", "--merge", "fine", "-b", src, "-F", "qcow2", c, "m",
    ]);
    assert_eq!(
        qemu_dirty_ranges(&copy, "m"),
        expected(1, &before, &touched)
    );
    // QEMU keeps recording into them afterwards, as into any bitmap it stored itself.
    qemu_io("qcow2", &img, &["write -P 7 0 1".to_string()]);
    assert!(
        qemu_dirty_ranges(&img, "coarse")
            .first()
            .is_some_and(|r| r.start == 0)
    );
    assert_eq!(qemu_check(&img), (0, 0), "qemu-img check after QEMU wrote");
}

#[test]
fn a_crash_leaves_the_bitmaps_in_use() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("mbitmaps-crash");
    let mut rng = Rng::new(0xdead);
    let img = image_with_bitmaps(&d, &mut rng);
    let mut model = qemu_raw(&img, None, &[]);
    let mut daemon = mount_foreground(&img, &d.0, &[]);
    let disk = OpenOptions::new()
        .write(true)
        .open(daemon.mnt.join("disk.raw"))
        .unwrap();
    random_changes(&disk, &mut model, &mut rng, 10);
    disk.sync_all().unwrap();
    drop(disk);
    daemon.kill();
    daemon.unmount();
    let flags = qemu_bitmap_flags(&img);
    for (name, f) in &flags {
        assert_eq!(has_in_use(f), name != "off", "{name} after a crash: {f:?}");
    }
    // The data is there and nothing is corrupt (the in-use bitmaps are only inconsistent).
    same("disk after the crash", &qemu_raw(&img, None, &[]), &model);
    assert_eq!(qemu_check(&img).0, 0, "qemu-img check corruptions");
}

#[test]
fn unmanageable_bitmaps_fall_back_to_clearing_the_autoclear_bit() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("mbitmaps-fallback");
    let mut rng = Rng::new(0xfa11);
    let img = image_with_bitmaps(&d, &mut rng);
    // Point the first data cluster of "fine" at the L1 table: metadata it must never write.
    let (ext_at, _) = find_ext(&img, 0x2385_2875).unwrap();
    let bytes = std::fs::read(&img).unwrap();
    let dir = be64_at(&bytes, ext_at as usize + 24);
    let fine_table = be64_at(&bytes, dir as usize);
    let l1 = be64_at(&bytes, 40);
    patch(&img, fine_table, &l1.to_be_bytes());
    let mut daemon = mount_foreground(&img, &d.0, &[]);
    let disk = OpenOptions::new()
        .write(true)
        .open(daemon.mnt.join("disk.raw"))
        .unwrap();
    disk.write_all_at(b"x", 0).unwrap();
    drop(disk);
    assert_eq!(daemon.unmount(), Some(0));
    assert!(
        daemon.log().contains("bitmaps cannot be kept up to date"),
        "{}",
        daemon.log()
    );
    // As before: QEMU no longer sees any bitmap.
    assert!(
        qemu_bitmap_flags(&img).is_empty(),
        "{:?}",
        qemu_bitmap_flags(&img)
    );
}
