//! Hostile and damaged VMDK images: every one must fail with a clear error naming the file
//! and the field (never a panic, never wrong bytes), or, for the redundant tables, read right.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vmfs_mount::error::{Error, Kind};

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 * 1024;

fn open_err(img: &Path) -> Error {
    match open_view(img) {
        Ok(_) => panic!("{} opened but should not", img.display()),
        Err(e) => e,
    }
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

fn le32_at(path: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u32::from_le_bytes(b)
}

fn le64_at(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_le_bytes(b)
}

fn assert_msg(e: &Error, parts: &[&str]) {
    for p in parts {
        assert!(e.to_string().contains(p), "expected {p:?} in: {e}");
    }
}

/// A qemu-made monolithicSparse image with data in its first grains; returns the oracle.
fn sparse_with_data(img: &Path, seed: u64) -> Vec<u8> {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        img.to_str().unwrap(),
        &(4 * MIB).to_string(),
    ]);
    write_random("vmdk", img, &mut Rng::new(seed), 0, 3 * GRAIN as usize + 10);
    qemu_raw(img, None, &[])
}

/// Reading the whole view must fail with an error containing `parts`.
fn read_fails(img: &Path, parts: &[&str]) {
    let view = open_view(img).unwrap();
    let mut buf = vec![0u8; view.size() as usize];
    let e = view.read(0, &mut buf).unwrap_err();
    assert_msg(&e, parts);
}

#[test]
fn bad_descriptors_are_refused() {
    let s = Scratch::new("vmdk-baddesc");
    std::fs::write(s.path("x.bin"), vec![0u8; 4096]).unwrap();
    let cases: &[(&str, &str, Kind, &[&str])] = &[
        (
            "type",
            "RW 8 WEIRD \"x.bin\"",
            Kind::Corrupt,
            &["unknown extent type", "WEIRD"],
        ),
        (
            "missing",
            "RW 8 FLAT \"nope.bin\" 0",
            Kind::NotFound,
            &["line 5", "nope.bin", "not found", "tried"],
        ),
        (
            "huge",
            "RW 99999999999999999999 FLAT \"x.bin\" 0",
            Kind::Corrupt,
            &["sector count"],
        ),
        (
            "overflow",
            "RW 9007199254740992 FLAT \"x.bin\" 0\nRW 9007199254740992 FLAT \"x.bin\" 0",
            Kind::Corrupt,
            &["overflows"],
        ),
        (
            "start",
            "RW 8 FLAT \"x.bin\" 36028797018963967",
            Kind::Corrupt,
            &["start sector"],
        ),
        (
            "empty",
            "RW 8 FLAT \"\" 0",
            Kind::Corrupt,
            &["empty file name"],
        ),
        (
            "noaccess",
            "NOACCESS 8 FLAT \"x.bin\" 0",
            Kind::Unsupported,
            &["NOACCESS"],
        ),
        (
            "device",
            "RW 8 VMFSRDM \"x.bin\"",
            Kind::Unsupported,
            &["device"],
        ),
        ("none", "", Kind::Corrupt, &["no extents"]),
        (
            "notsparse",
            "RW 8 SPARSE \"x.bin\"",
            Kind::Corrupt,
            &["x.bin", "magic"],
        ),
    ];
    for (name, extents, kind, parts) in cases {
        let img = s.path(&format!("{name}.vmdk"));
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=1\ncreateType=\"monolithicFlat\"\n{extents}\n"
        );
        std::fs::write(&img, text).unwrap();
        let e = open_err(&img);
        assert_eq!(e.kind(), *kind, "{name}: {e}");
        assert_msg(&e, parts);
        assert!(
            e.to_string().contains(&format!("{name}.vmdk")),
            "{name}: {e}"
        );
    }
}

#[test]
fn hostile_sparse_headers_are_refused() {
    let s = Scratch::new("vmdk-badhdr");
    let img = s.path("h.vmdk");
    // (header offset, value, expected words)
    let cases: &[(u64, u64, &[&str])] = &[
        (20, 1 << 40, &["grainSize"]),
        (20, 0, &["grainSize"]),
        (12, 1 << 60, &["capacity"]),
        (56, 1 << 40, &["grain directory"]),
        (64, 1 << 30, &["overHead", "truncated"]),
    ];
    for (off, value, parts) in cases {
        sparse_with_data(&img, 31);
        patch(&img, 8, &0u32.to_le_bytes()); // no redundant GD to fall back on
        patch(&img, *off, &value.to_le_bytes());
        let e = open_err(&img);
        assert_eq!(e.kind(), Kind::Corrupt, "{e}");
        assert_msg(&e, parts);
        assert_msg(&e, &["h.vmdk"]);
    }
    // A GD so large that QEMU says "L1 size too big" (afl9.vmdk).
    sparse_with_data(&img, 31);
    patch(&img, 12, &(1u64 << 50).to_le_bytes());
    patch(&img, 20, &1u64.to_le_bytes());
    patch(&img, 44, &1u32.to_le_bytes());
    assert_msg(&open_err(&img), &["grain directory", "too big"]);
    // Version 4 is not implemented.
    sparse_with_data(&img, 31);
    patch(&img, 4, &4u32.to_le_bytes());
    assert_eq!(open_err(&img).kind(), Kind::Unsupported);
}

#[test]
fn redundant_tables_stand_in_for_broken_primary_ones() {
    let s = Scratch::new("vmdk-rgd");
    let img = s.path("r.vmdk");
    let want = sparse_with_data(&img, 32);
    let gd = le64_at(&img, 56) * 512;
    let rgd = le64_at(&img, 48) * 512;
    assert_ne!(gd, rgd);
    // Primary GT 0 points past the end of the file: the redundant GT 0 is used.
    patch(&img, gd, &0x7fff_0000u32.to_le_bytes());
    assert_same("redundant GT", &read_all(&open_view(&img).unwrap()), &want);
    // Primary GD past the end of the file: the redundant GD is used.
    patch(&img, 56, &(1u64 << 40).to_le_bytes());
    assert_same("redundant GD", &read_all(&open_view(&img).unwrap()), &want);
    // Both copies broken: a clear error.
    patch(&img, rgd, &0x7fff_0000u32.to_le_bytes());
    read_fails(&img, &["grain table", "r.vmdk"]);
}

#[test]
fn grain_entries_past_the_end_are_refused() {
    let s = Scratch::new("vmdk-gte");
    let img = s.path("g.vmdk");
    sparse_with_data(&img, 33);
    let gt = le32_at(&img, le64_at(&img, 56) * 512) as u64 * 512;
    let rgt = le32_at(&img, le64_at(&img, 48) * 512) as u64 * 512;
    for t in [gt, rgt] {
        patch(&img, t + 4, &0x7fff_0000u32.to_le_bytes());
    }
    read_fails(&img, &["grain table entry", "past the end", "g.vmdk"]);
}

#[test]
fn absurd_compressed_grain_sizes_are_refused() {
    let s = Scratch::new("vmdk-zgrain");
    let raw = s.path("src.raw");
    let img = s.path("z.vmdk");
    std::fs::write(&raw, Rng::new(34).bytes(MIB as usize)).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let gt = le32_at(&img, le64_at(&img, 56) * 512) as u64 * 512;
    let grain = le32_at(&img, gt) as u64 * 512;
    patch(&img, grain + 8, &u32::MAX.to_le_bytes());
    read_fails(&img, &["grain marker size", "z.vmdk"]);
    patch(&img, grain + 8, &0u32.to_le_bytes());
    read_fails(&img, &["grain marker size"]);
    // A size that fits but a stream that is garbage.
    patch(&img, grain + 8, &100u32.to_le_bytes());
    patch(&img, grain + 12, &[0x55; 100]);
    read_fails(&img, &["compressed", "z.vmdk"]);
}

#[test]
fn parent_loops_and_bad_parents_are_refused() {
    let s = Scratch::new("vmdk-loop");
    std::fs::write(s.path("d.bin"), vec![0u8; 4096]).unwrap();
    let desc = |cid: u32, pcid: u32, hint: &str| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID={pcid:08x}\nparentFileNameHint=\"{hint}\"\n\
             createType=\"monolithicFlat\"\nRW 8 FLAT \"d.bin\" 0\n"
        )
    };
    std::fs::write(s.path("a.vmdk"), desc(1, 2, "b.vmdk")).unwrap();
    std::fs::write(s.path("b.vmdk"), desc(2, 1, "a.vmdk")).unwrap();
    let e = open_err(&s.path("a.vmdk"));
    assert_msg(&e, &["loop"]);
    // A parent that is not a VMDK cannot carry the CID.
    std::fs::write(s.path("c.vmdk"), desc(3, 7, "d.bin")).unwrap();
    assert_eq!(open_err(&s.path("c.vmdk")).kind(), Kind::Corrupt);
    // A self-referencing descriptor.
    std::fs::write(s.path("e.vmdk"), desc(5, 5, "e.vmdk")).unwrap();
    assert_msg(&open_err(&s.path("e.vmdk")), &["loop"]);
}

#[test]
fn real_malformed_layouts_do_not_panic() {
    // Truncated sparse files of every length: each opens with an error or reads without panic.
    let s = Scratch::new("vmdk-trunc");
    let img = s.path("t.vmdk");
    let full = {
        sparse_with_data(&img, 35);
        std::fs::read(&img).unwrap()
    };
    for cut in [
        0usize,
        3,
        4,
        100,
        511,
        512,
        4096,
        65536,
        66000,
        full.len() - 1,
    ] {
        std::fs::write(&img, &full[..cut]).unwrap();
        if let Ok(view) = open_view(&img) {
            let mut buf = vec![0u8; view.size() as usize];
            let _ = view.read(0, &mut buf);
        }
    }
}
