//! QEMU persistent dirty bitmaps: what the library reads from an image must be what QEMU
//! exports (qemu-nbd -B and the NBD dirty-bitmap context), and hostile directories fail
//! cleanly.

mod bitmap_support;
mod common;
mod qcow2_support;

use bitmap_support::qemu_dirty_ranges;
use common::*;
use qcow2_support::{find_ext, patch};
use std::ops::Range;
use std::path::Path;
use vmfs_mount::format::qcow2::Qcow2Image;

const MIB: u64 = 1 << 20;

/// Our reading of every bitmap of `image`: name -> (flags, dirty ranges).
fn our_bitmaps(image: &Path) -> Vec<(String, u32, Vec<Range<u64>>)> {
    let img = Qcow2Image::open(image, &ctx()).unwrap();
    let Some(b) = img.bitmaps().unwrap() else {
        return Vec::new();
    };
    b.entries
        .iter()
        .map(|e| {
            let table = img.bitmap_table(e).unwrap();
            let bits = img.bitmap_bits(e, &table).unwrap();
            (e.name.clone(), e.flags, bits.ranges(0, img.size))
        })
        .collect()
}

fn random_writes(image: &Path, rng: &mut Rng, size: u64, n: usize) {
    let mut cmds = Vec::new();
    for i in 0..n {
        let len = 1 + rng.below(300 << 10);
        let off = rng.below(size - len);
        cmds.push(match i % 6 {
            4 => format!("write -z {off} {len}"),
            5 => format!("discard {} {}", off / 512 * 512, len.div_ceil(512) * 512),
            _ => format!("write -P {} {off} {len}", rng.below(255)),
        });
    }
    qemu_io("qcow2", image, &cmds);
}

#[test]
fn bitmaps_read_as_qemu_exports_them() {
    let d = Scratch::new("bitmaps-read");
    let img = d.path("disk.qcow2");
    let size = 64 * MIB;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut rng = Rng::new(7);
    random_writes(&img, &mut rng, size, 10);
    let p = img.to_str().unwrap();
    qemu_img(&["bitmap", "--add", "-g", "65536", p, "coarse"]);
    qemu_img(&["bitmap", "--add", "-g", "4096", p, "fine"]);
    qemu_img(&["bitmap", "--add", "-g", "512", "--disable", p, "off"]);
    // qemu-io records writes in the enabled bitmaps and stores them on exit.
    random_writes(&img, &mut rng, size, 40);
    let ours = our_bitmaps(&img);
    let names: Vec<&str> = ours.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["coarse", "fine", "off"]);
    for (name, flags, dirty) in &ours {
        assert_eq!(*flags & 1, 0, "{name} in use");
        assert_eq!(*flags & 2 != 0, name != "off", "{name} auto flag");
        assert_eq!(*dirty, qemu_dirty_ranges(&img, name), "bitmap {name}");
        assert_eq!(dirty.is_empty(), name == "off", "{name}: {dirty:x?}");
    }
}

#[test]
fn a_hostile_directory_is_an_error_not_a_panic() {
    let d = Scratch::new("bitmaps-hostile");
    let img = d.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b"]);
    let (ext_at, _) = find_ext(&img, 0x2385_2875).unwrap();
    let bytes = std::fs::read(&img).unwrap();
    let dir = u64::from_be_bytes(
        bytes[ext_at as usize + 24..ext_at as usize + 32]
            .try_into()
            .unwrap(),
    );
    let cases: Vec<(u64, Vec<u8>, &str)> = vec![
        (ext_at + 8, 70000u32.to_be_bytes().to_vec(), "nb_bitmaps"),
        (ext_at + 8, 2u32.to_be_bytes().to_vec(), "declares 2"),
        (
            ext_at + 16,
            u64::MAX.to_be_bytes().to_vec(),
            "bitmap_directory_size",
        ),
        (
            ext_at + 24,
            0x123u64.to_be_bytes().to_vec(),
            "bitmap_directory_offset",
        ),
        (
            dir,
            0x10200u64.to_be_bytes().to_vec(),
            "bitmap_table_offset",
        ),
        (
            dir + 8,
            u32::MAX.to_be_bytes().to_vec(),
            "bitmap_table_size",
        ),
        (dir + 17, vec![40], "granularity_bits"),
        (dir + 18, 60000u16.to_be_bytes().to_vec(), "past the end"),
    ];
    for (at, value, want) in cases {
        let copy = d.path("copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        patch(&copy, at, &value);
        let q = Qcow2Image::open(&copy, &ctx()).unwrap();
        let e = q.bitmaps().unwrap_err().to_string();
        assert!(
            e.contains(want),
            "patch at {at:#x}: {e} should mention {want}"
        );
    }
    // A table far past the end of the file.
    let copy = d.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    patch(&copy, dir, &(1u64 << 62).to_be_bytes());
    let q = Qcow2Image::open(&copy, &ctx()).unwrap();
    let e = &q.bitmaps().unwrap().unwrap().entries[0];
    assert!(q.bitmap_table(e).is_err());
    // A table entry pointing nowhere sensible.
    std::fs::copy(&img, &copy).unwrap();
    let q = Qcow2Image::open(&copy, &ctx()).unwrap();
    let table = q.bitmaps().unwrap().unwrap().entries[0].table_offset;
    patch(&copy, table, &0x0000_0000_0001_0200u64.to_be_bytes());
    let q = Qcow2Image::open(&copy, &ctx()).unwrap();
    let e = &q.bitmaps().unwrap().unwrap().entries[0];
    let err = q.bitmap_table(e).unwrap_err().to_string();
    assert!(err.contains("not a valid cluster reference"), "{err}");
    patch(&copy, table, &(1u64 << 50).to_be_bytes());
    let q = Qcow2Image::open(&copy, &ctx()).unwrap();
    let e = &q.bitmaps().unwrap().unwrap().entries[0];
    let table = q.bitmap_table(e).unwrap();
    assert!(q.bitmap_bits(e, &table).is_err());
}

/// name -> flags as `qemu-img info --output=json` lists them.
fn qemu_flags(image: &Path) -> Vec<(String, Vec<String>)> {
    let out = qemu_img(&["info", "-U", "--output=json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut out: Vec<(String, Vec<String>)> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|b| {
                    let f = b["flags"].as_array().unwrap().iter();
                    let f = f.map(|x| x.as_str().unwrap().to_string()).collect();
                    (b["name"].as_str().unwrap().to_string(), f)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn the_writer_keeps_enabled_bitmaps_and_closes_them_consistent() {
    let d = Scratch::new("bitmaps-writer");
    let img = d.path("disk.qcow2");
    let size = 16 * MIB;
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, &size.to_string()]);
    qemu_img(&["bitmap", "--add", "-g", "65536", p, "on"]);
    qemu_img(&["bitmap", "--add", "-g", "65536", "--disable", p, "off"]);
    let mut rng = Rng::new(99);
    let mut touched = Vec::new();
    {
        let view = open_rw(&img);
        // Opening writes nothing: no write, no in-use flag.
        assert!(qemu_flags(&img).iter().all(|(_, f)| f.len() <= 1));
        for i in 0..20 {
            let len = 1 + rng.below(100 << 10);
            let off = rng.below(size - len);
            if i % 4 == 3 {
                view.discard(off, len).unwrap();
            } else {
                view.write(off, &rng.bytes(len as usize)).unwrap();
            }
            touched.push(off / 65536 * 65536..(off + len).next_multiple_of(65536));
            if i == 10 {
                view.flush().unwrap();
            }
        }
        let flags = qemu_flags(&img);
        assert_eq!(flags[1].1, ["in-use", "auto"], "{flags:?}");
        assert!(flags[0].1.is_empty(), "{flags:?}");
        view.close().unwrap();
    }
    assert_eq!(
        qemu_flags(&img),
        [
            ("off".to_string(), vec![]),
            ("on".to_string(), vec!["auto".to_string()])
        ]
    );
    let check = std::process::Command::new("qemu-img")
        .args(["check", p])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let want = vmfs_mount::changes::ranges::union(touched);
    assert_eq!(qemu_dirty_ranges(&img, "on"), want);
    assert!(qemu_dirty_ranges(&img, "off").is_empty());
}

/// A bitmap cluster with refcount 2 (shared with something else, or a crafted file) cannot
/// be written in place: the writer falls back to clearing the autoclear bit, so QEMU drops
/// the bitmaps instead of trusting a record we could not keep.
#[test]
fn a_shared_bitmap_cluster_makes_the_writer_drop_the_bitmaps() {
    let d = Scratch::new("bitmaps-shared");
    let img = d.path("disk.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"]);
    qemu_img(&["bitmap", "--add", p, "b"]);
    let q = Qcow2Image::open(&img, &ctx()).unwrap();
    let table = q.bitmaps().unwrap().unwrap().entries[0].table_offset;
    let cs = q.geometry.cluster_size();
    let reftable = q.header.refcount_table_offset;
    drop(q);
    // 16-bit refcounts; the first refcount block covers the whole small file.
    let bytes = std::fs::read(&img).unwrap();
    let block = u64::from_be_bytes(
        bytes[reftable as usize..reftable as usize + 8]
            .try_into()
            .unwrap(),
    );
    patch(&img, block + table / cs * 2, &2u16.to_be_bytes());
    {
        let view = open_rw(&img);
        view.write(0, b"x").unwrap();
        view.close().unwrap();
    }
    assert!(qemu_flags(&img).is_empty(), "{:?}", qemu_flags(&img));
    assert_eq!(qemu_raw(&img, None, &[])[0], b'x');
}
