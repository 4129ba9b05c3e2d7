//! FreeBSD's mkimg writes monolithicSparse VMDKs whose embedded descriptor names the extent
//! `""`: QEMU reads them (the extent of a sparse file is the file itself), and so must we, and
//! `--list` must say the name was empty. Anywhere else an empty name stays a clear error.
//! Needs qemu-img, qemu-io and /dev/fuse.

mod common;
mod mount_support;

use common::*;
use mount_support::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use vmfs_mount::error::Kind;

const MIB: u64 = 1 << 20;

/// Turns the embedded descriptor's text into the one to test.
type DescriptorEdit = fn(&str) -> String;

fn le64_at(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_le_bytes(b)
}

/// A qemu-made monolithicSparse image with seeded data at a few places.
fn sparse_image(img: &Path, seed: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        img.to_str().unwrap(),
        &(8 * MIB).to_string(),
    ]);
    let mut rng = Rng::new(seed);
    for off in [0, 3 * MIB + 4096, 8 * MIB - 70_000] {
        write_random("vmdk", img, &mut rng, off, 70_000);
    }
}

/// The embedded descriptor area (offset, length in bytes) from the sparse header.
fn descriptor_area(img: &Path) -> (u64, usize) {
    (le64_at(img, 28) * 512, (le64_at(img, 36) * 512) as usize)
}

/// Replaces the embedded descriptor text by `edit(old text)`, NUL-padded to the area's size.
fn rewrite_descriptor(img: &Path, edit: impl FnOnce(&str) -> String) {
    let (off, len) = descriptor_area(img);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut area = vec![0u8; len];
    f.read_exact_at(&mut area, off).unwrap();
    let end = area.iter().position(|&b| b == 0).unwrap_or(len);
    let mut new = edit(std::str::from_utf8(&area[..end]).unwrap()).into_bytes();
    assert!(new.len() < len, "the new descriptor does not fit");
    new.resize(len, 0);
    f.write_all_at(&new, off).unwrap();
}

/// Sets the quoted file name of the (single) extent line to "".
fn empty_the_extent_name(text: &str) -> String {
    let mut out = String::new();
    let mut patched = 0;
    for line in text.split_inclusive('\n') {
        match line.find('"') {
            Some(q) if line.starts_with("RW ") => {
                out.push_str(&line[..q]);
                out.push_str("\"\"\n");
                patched += 1;
            }
            _ => out.push_str(line),
        }
    }
    assert_eq!(patched, 1, "one extent line expected in: {text}");
    out
}

/// The descriptor FreeBSD's mkimg (usr.bin/mkimg/vmdk.c) writes: CID 0 and an empty name.
fn mkimg_descriptor(sectors: u64) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=00000000\nparentCID=ffffffff\n\
         createType=\"monolithicSparse\"\n# Extent description\nRW {sectors} SPARSE \"\"\n\
         # The Disk Data Base\n#DDB\nddb.adapterType = \"ide\"\n\
         ddb.geometry.cylinders = \"16\"\nddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n"
    )
}

const SECTOR: usize = 512;
const GTES: usize = 512;

/// A monolithicSparse file laid out as mkimg lays it out: header, descriptor from sector 1,
/// GD, every GT, redundant GD, a second copy of every GT, zeros up to the first grain
/// boundary, then the grains that hold data, in disk order.
fn mkimg_sparse(disk: &[u8], grain_sectors: usize) -> Vec<u8> {
    let grain = grain_sectors * SECTOR;
    assert_eq!(disk.len() % grain, 0);
    let capacity = disk.len() / SECTOR;
    let ngrains = disk.len() / grain;
    let ngts = ngrains.div_ceil(GTES);
    let round = |n: usize| n.div_ceil(SECTOR) * SECTOR;
    let mut desc = mkimg_descriptor(capacity as u64).into_bytes();
    desc.resize(round(desc.len()), 0);
    let gd_size = round(ngts * 4);
    let gt_sectors = GTES * 4 / SECTOR;
    let mut sec = 1 + desc.len() / SECTOR;
    let gd_offset = sec;
    sec += gd_size / SECTOR;
    let gd: Vec<usize> = (0..ngts).map(|n| sec + n * gt_sectors).collect();
    sec += ngts * gt_sectors;
    let rgd_offset = sec;
    sec += gd_size / SECTOR;
    let rgd: Vec<usize> = (0..ngts).map(|n| sec + n * gt_sectors).collect();
    sec += ngts * gt_sectors;
    let overhead = sec.div_ceil(grain_sectors) * grain_sectors;

    let mut gt = vec![0u32; ngts * GTES];
    let mut grains = Vec::new();
    let mut next = overhead;
    for (n, g) in disk.chunks(grain).enumerate() {
        if g.iter().any(|&b| b != 0) {
            gt[n] = next as u32;
            next += grain_sectors;
            grains.extend_from_slice(g);
        }
    }
    let mut h = vec![0u8; SECTOR];
    let mut put = |off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
    put(0, b"KDMV");
    put(4, &1u32.to_le_bytes());
    put(8, &3u32.to_le_bytes()); // newline test, redundant grain tables
    put(12, &(capacity as u64).to_le_bytes());
    put(20, &(grain_sectors as u64).to_le_bytes());
    put(28, &1u64.to_le_bytes());
    put(36, &((desc.len() / SECTOR) as u64).to_le_bytes());
    put(44, &(GTES as u32).to_le_bytes());
    put(48, &(rgd_offset as u64).to_le_bytes());
    put(56, &(gd_offset as u64).to_le_bytes());
    put(64, &(overhead as u64).to_le_bytes());
    put(73, b"\n \r\n");
    let le = |v: &[usize]| -> Vec<u8> {
        let mut b: Vec<u8> = v.iter().flat_map(|&x| (x as u32).to_le_bytes()).collect();
        b.resize(gd_size, 0);
        b
    };
    let gt_bytes: Vec<u8> = gt.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = h;
    out.extend_from_slice(&desc);
    out.extend_from_slice(&le(&gd));
    out.extend_from_slice(&gt_bytes);
    out.extend_from_slice(&le(&rgd));
    out.extend_from_slice(&gt_bytes);
    out.resize(overhead * SECTOR, 0);
    out.extend_from_slice(&grains);
    out
}

fn list(img: &Path, json: bool) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("--list");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "--list {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn an_empty_extent_name_in_the_embedded_descriptor_reads_as_qemu_reads_it() {
    let s = Scratch::new("vmdk-empty-name");
    let cases: [(&str, DescriptorEdit); 2] = [
        ("patched", empty_the_extent_name),
        ("mkimg", |_| mkimg_descriptor(8 * MIB / 512)),
    ];
    for (i, (name, edit)) in cases.into_iter().enumerate() {
        let dir = s.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join(format!("{name}.vmdk"));
        sparse_image(&img, 40 + i as u64);
        let before = qemu_raw(&img, Some("vmdk"), &[]);
        rewrite_descriptor(&img, edit);
        let want = qemu_raw(&img, Some("vmdk"), &[]);
        assert_same(&format!("{name}: QEMU before and after"), &want, &before);

        let (_guard, mnt) = mount(&img, &dir, &[]);
        let got = std::fs::read(mnt.join("disk.raw")).unwrap();
        assert_same(&format!("{name}: disk.raw"), &got, &want);

        let text = list(&img, false);
        assert!(text.contains("RW 16384 SPARSE \"\""), "{name}: {text}");
        assert!(
            text.contains("extent name:") && text.contains("empty in the embedded descriptor"),
            "{name}: {text}"
        );
        let json: serde_json::Value = serde_json::from_str(&list(&img, true)).unwrap();
        let details = &json["layers"][0]["details"];
        let note = details["extent name"].as_str().unwrap_or_default();
        assert!(note.contains("empty"), "{name}: {details}");
    }
}

#[test]
fn files_laid_out_as_mkimg_writes_them_read_as_qemu_reads_them() {
    let s = Scratch::new("vmdk-mkimg-layout");
    let mut rng = Rng::new(44);
    // 2.5 GT's worth of 64 KiB grains (mkimg's smallest) and of 4 KiB ones; data in some.
    for (i, grain_sectors) in [128usize, 8].into_iter().enumerate() {
        let grain = grain_sectors * SECTOR;
        let mut disk = vec![0u8; grain * (GTES * 2 + GTES / 2)];
        for g in [
            0,
            1,
            7,
            GTES - 1,
            GTES,
            GTES * 2 + 3,
            GTES * 2 + GTES / 2 - 1,
        ] {
            let data = rng.bytes(grain - 100 * i);
            disk[g * grain..g * grain + data.len()].copy_from_slice(&data);
        }
        let dir = s.path(&format!("g{grain_sectors}"));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("freebsd.vmdk");
        std::fs::write(&img, mkimg_sparse(&disk, grain_sectors)).unwrap();
        assert_same(
            "qemu-img convert",
            &qemu_raw(&img, Some("vmdk"), &[]),
            &disk,
        );
        let (_guard, mnt) = mount(&img, &dir, &[]);
        assert_same(
            "disk.raw",
            &std::fs::read(mnt.join("disk.raw")).unwrap(),
            &disk,
        );
    }
}

#[test]
fn an_empty_extent_name_in_a_stream_optimized_file_reads_too() {
    let s = Scratch::new("vmdk-empty-name-stream");
    let raw = s.path("disk.raw");
    let mut data = vec![0u8; 4 * MIB as usize];
    data[..300_000].copy_from_slice(&Rng::new(45).bytes(300_000));
    std::fs::write(&raw, &data).unwrap();
    let img = s.path("stream.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    rewrite_descriptor(&img, empty_the_extent_name);
    assert_same(
        "qemu-img convert",
        &qemu_raw(&img, Some("vmdk"), &[]),
        &data,
    );
    assert_same("library", &read_all(&open_view(&img).unwrap()), &data);
    assert!(list(&img, false).contains("empty in the embedded descriptor"));
}

#[test]
fn an_empty_extent_name_elsewhere_is_a_clear_error() {
    let s = Scratch::new("vmdk-empty-name-bad");
    // A separate descriptor: the name must name a file.
    let desc = s.path("sep.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=1\ncreateType=\"monolithicFlat\"\n\
         RW 8 FLAT \"x-flat.vmdk\" 0\nRW 8 FLAT \"\" 0\n",
    )
    .unwrap();
    std::fs::write(s.path("x-flat.vmdk"), vec![0u8; 4096]).unwrap();
    let e = open_view(&desc).err().expect("sep.vmdk opened");
    assert_eq!(e.kind(), Kind::Corrupt, "{e}");
    let msg = e.to_string();
    for part in [
        "sep.vmdk",
        "extent line 6",
        "offset 0x5c",
        "empty file name",
    ] {
        assert!(msg.contains(part), "expected {part:?} in: {msg}");
    }

    // A sparse header of capacity 0 wraps a descriptor whose extents are other files: there
    // "" cannot mean the file itself (it holds no grains).
    let img = s.path("wrapped.vmdk");
    sparse_image(&img, 50);
    rewrite_descriptor(&img, empty_the_extent_name);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&0u64.to_le_bytes(), 12)
        .unwrap();
    let e = open_view(&img).err().expect("wrapped.vmdk opened");
    assert_eq!(e.kind(), Kind::Corrupt, "{e}");
    let msg = e.to_string();
    for part in ["wrapped.vmdk", "extent line", "empty file name"] {
        assert!(msg.contains(part), "expected {part:?} in: {msg}");
    }

    // And the mount command says so in one line, mounting nothing.
    let mnt = s.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(BIN).arg(&desc).arg(&mnt).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty file name"), "{err}");
    assert!(!is_mounted(&mnt.canonicalize().unwrap()));
}
