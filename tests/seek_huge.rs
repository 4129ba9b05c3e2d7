//! SEEK_DATA/SEEK_HOLE and st_blocks over huge, nearly empty disks: each format at (close
//! to) its largest size with one written range near the end, alone and under a chain, in
//! the library and through a real mount. The answers are asserted, not the time; a scan
//! that walked the virtual size step by step would not finish.

mod common;
mod mount_support;

use common::*;
use mount_support::{lseek, mount};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
/// Aligned to every format's allocation unit, so a write there starts one.
const ALIGN: u64 = 32 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A written offset near the end of a `size`-byte disk, aligned to `ALIGN`.
fn near_end(size: u64) -> u64 {
    (size / ALIGN - 1) * ALIGN
}

fn write_pattern(fmt: &str, image: &Path, off: u64) {
    qemu_io(fmt, image, &[format!("write -P 0x5c {off} 64k")]);
}

/// Creates an empty `fmt` image of `size` bytes (qemu-img may round it) and returns its size.
/// VHDX blocks are 32 MiB (QEMU picks by size otherwise).
fn create(fmt: &str, image: &Path, size: u64) -> u64 {
    let mut args = vec!["create", "-q", "-f", fmt];
    if fmt == "vhdx" {
        args.extend(["-o", "block_size=32M"]);
    }
    let size_arg = size.to_string();
    args.extend([s(image), &size_arg]);
    qemu_img(&args);
    open_view(image).unwrap().size()
}

#[test]
fn each_format_seeks_straight_to_the_one_written_range_of_a_huge_empty_disk() {
    let d = Scratch::new("seek-huge-formats");
    // (format, size, unit QEMU allocates for a 64 KiB write: cluster, grain or block).
    // QEMU preallocates every VMDK grain table: an empty disk of empty tables.
    let cases: [(&str, u64, u64); 5] = [
        ("qcow2", 64 * TIB, 64 << 10),
        ("vmdk", 2 * TIB, 64 << 10),
        ("vpc", 2040 << 30, 2 * MIB),
        ("vhdx", 64 * TIB, 32 * MIB),
        ("vdi", TIB, MIB),
    ];
    for (fmt, size, unit) in cases {
        let img = d.path(&format!("huge.{fmt}"));
        let size = create(fmt, &img, size);
        let w = near_end(size);
        write_pattern(fmt, &img, w);
        let v = open_view(&img).unwrap();
        assert_eq!(v.next_data(0).unwrap(), Some(w), "{fmt}: SEEK_DATA 0");
        assert_eq!(v.next_hole(0).unwrap(), 0, "{fmt}: SEEK_HOLE 0");
        assert_eq!(
            v.next_hole(w).unwrap(),
            w + unit,
            "{fmt}: SEEK_HOLE in the data"
        );
        assert_eq!(
            v.next_data(w + unit).unwrap(),
            None,
            "{fmt}: SEEK_DATA past it"
        );
        assert_eq!(v.allocated_bytes().unwrap(), unit, "{fmt}: allocated bytes");
        let mut buf = vec![0u8; 4096];
        v.read(w, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5c), "{fmt}: the written bytes");
    }
}

#[test]
fn the_largest_qcow2_seeks_to_its_last_cluster() {
    // 2 PiB: the most a 32 MiB L1 (QEMU's limit) covers with 64 KiB clusters.
    let d = Scratch::new("seek-huge-max");
    let img = d.path("max.qcow2");
    let size = create("qcow2", &img, 2 << 50);
    let last = size - (64 << 10);
    write_pattern("qcow2", &img, last);
    let v = open_view(&img).unwrap();
    assert_eq!(v.next_data(0).unwrap(), Some(last));
    assert_eq!(v.next_data(1 << 50).unwrap(), Some(last));
    assert_eq!(v.next_hole(last).unwrap(), size);
    assert_eq!(v.allocated_bytes().unwrap(), 64 << 10);
}

/// A 64 TiB qcow2 over a 64 TiB `base_fmt` base: one range written in the top (the middle),
/// one in the base (near the end). Returns (top, middle, near end).
fn chain(d: &Scratch, base_fmt: &str) -> (std::path::PathBuf, u64, u64) {
    let base = d.path(&format!("base.{base_fmt}"));
    let top = d.path("top.qcow2");
    let size = create(base_fmt, &base, 64 * TIB);
    let (mid, end) = (32 * TIB, near_end(size));
    write_pattern(base_fmt, &base, end);
    let size_arg = size.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        base_fmt,
        s(&top),
        &size_arg,
    ]);
    write_pattern("qcow2", &top, mid);
    (top, mid, end)
}

#[test]
fn a_chain_of_huge_empty_images_seeks_through_both_layers() {
    for (base_fmt, base_unit) in [("qcow2", 64 << 10), ("vhdx", 32 * MIB)] {
        let d = Scratch::new(&format!("seek-huge-chain-{base_fmt}"));
        let (top, mid, end) = chain(&d, base_fmt);
        let v = open_view(&top).unwrap();
        let k = 64 << 10;
        assert_eq!(v.next_data(0).unwrap(), Some(mid), "{base_fmt}");
        assert_eq!(v.next_hole(mid).unwrap(), mid + k, "{base_fmt}");
        assert_eq!(v.next_data(mid + k).unwrap(), Some(end), "{base_fmt}");
        assert_eq!(v.next_hole(end).unwrap(), end + base_unit, "{base_fmt}");
        assert_eq!(v.next_data(end + base_unit).unwrap(), None, "{base_fmt}");
        assert_eq!(v.allocated_bytes().unwrap(), k + base_unit, "{base_fmt}");
    }
}

#[test]
fn a_mounted_huge_chain_answers_lseek_and_stat() {
    let d = Scratch::new("seek-huge-mount");
    let (top, mid, end) = chain(&d, "qcow2");
    let (_guard, mnt) = mount(&top, &d.0, &["-r"]);
    let k = 64i64 << 10;
    for (path, data) in [
        ("disk.raw", vec![mid as i64, end as i64]),
        ("snapshots/base/disk.raw", vec![end as i64]),
    ] {
        let file = mnt.join(path);
        let f = File::open(&file).unwrap();
        let seek = |off: i64, whence: i32| lseek(&f, off, whence);
        let mut pos = 0;
        for &at in &data {
            assert_eq!(
                seek(pos, libc::SEEK_DATA),
                Ok(at),
                "{path}: SEEK_DATA {pos}"
            );
            assert_eq!(
                seek(at, libc::SEEK_HOLE),
                Ok(at + k),
                "{path}: SEEK_HOLE {at}"
            );
            pos = at + k;
        }
        assert_eq!(seek(pos, libc::SEEK_DATA), Err(libc::ENXIO), "{path}");
        let blocks = std::fs::metadata(&file).unwrap().blocks();
        assert_eq!(
            blocks * 512,
            data.len() as u64 * k as u64,
            "{path}: st_blocks"
        );
    }
}
