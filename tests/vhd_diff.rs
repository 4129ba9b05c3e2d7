//! Differencing VHDs written from the spec (tests/vhd_gen) over qemu-made parents. QEMU
//! reads differencing disks as if they had no parent, so the expected bytes come from a
//! model: the parent's bytes overridden by the sectors whose bitmap bit is set in the child.

mod common;
mod vhd_gen;

use common::*;
use std::path::{Path, PathBuf};
use vhd_gen::{Sparse, footer_uuid, utf16le};
use vmfs_mount::error::Kind;

const MIB: u64 = 1024 * 1024;

/// A qemu-made dynamic parent (exact size) with random data; returns its path and bytes.
fn qemu_parent(s: &Scratch, name: &str, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let img = s.path(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut rng = Rng::new(seed);
    for _ in 0..12 {
        let len = 1 + rng.below(MIB) as usize;
        let off = rng.below(size - len as u64);
        write_random("vpc", &img, &mut rng, off, len);
    }
    let bytes = qemu_raw(&img, Some("vpc"), &[]);
    (img, bytes)
}

/// Scatters `writes` random sector runs over `child`, some inside one block, some across.
fn scatter(child: &mut Sparse, rng: &mut Rng, writes: usize) {
    let sectors = child.size / 512;
    let mut junk_rng = Rng::new(rng.next_u64());
    let mut junk = move |n| junk_rng.bytes(n);
    for i in 0..writes {
        let n = if i % 4 == 0 {
            1
        } else {
            1 + rng.below(3 * child.block_size / 512)
        };
        let first = rng.below(sectors - n);
        let data = rng.bytes((n * 512) as usize);
        child.write(first * 512, &data, &mut junk);
    }
}

fn child_of(parent_bytes: &[u8], size: u64, block_size: u64, seed: u64) -> Sparse {
    let mut c = Sparse::new(size, block_size, 4, [seed as u8; 16]);
    c.parent_uuid = footer_uuid(parent_bytes);
    c
}

/// The parent's view, cut or zero-extended to `size`, with `layers` applied bottom-up.
fn model(parent_view: &[u8], size: u64, layers: &[&Sparse]) -> Vec<u8> {
    let mut m = parent_view.to_vec();
    m.resize(size as usize, 0);
    for l in layers {
        l.overlay(&mut m);
    }
    m
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn child_with_relative_locator_and_smaller_blocks_reads_the_model() {
    let s = Scratch::new("vhd-diff-rel");
    let (parent, parent_img_bytes) = qemu_parent(&s, "parent.vhd", 10 * MIB, 1);
    let parent_view = parent_img_bytes.clone();
    let file_bytes = std::fs::read(&parent).unwrap();
    let mut child = child_of(&file_bytes, 10 * MIB, 512 * 1024, 2);
    child.locators.push((*b"W2ru", utf16le(".\\parent.vhd")));
    child.parent_name = "parent.vhd".into();
    scatter(&mut child, &mut Rng::new(3), 40);
    let img = s.path("child.vhd");
    write_file(&img, &child.build());

    let view = open_view(&img).unwrap();
    assert_eq!(view.layers().len(), 2);
    assert_eq!(view.layers()[1].path(), s.path("./parent.vhd"));
    assert_same(
        "child over parent",
        &read_all(&view),
        &model(&parent_view, child.size, &[&child]),
    );
    let d = view.layers()[0].details();
    assert!(
        d.iter()
            .any(|(k, v)| k == "disk type" && v == "differencing"),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|(k, v)| k == "parent name" && v == "parent.vhd"),
        "{d:?}"
    );
}

#[test]
fn three_layers_with_different_sizes_block_sizes_and_locators() {
    let s = Scratch::new("vhd-diff-chain");
    let (base, base_view) = qemu_parent(&s, "base.vhd", 6 * MIB, 10);
    let base_file = std::fs::read(&base).unwrap();
    // mid: bigger than base, 4 KiB blocks, found through an absolute Windows path.
    let mut mid = child_of(&base_file, 8 * MIB, 4096, 11);
    let win = format!("C:{}", base.display()).replace('/', "\\");
    mid.locators.push((*b"W2ku", utf16le(&win)));
    scatter(&mut mid, &mut Rng::new(12), 300);
    let mid_img = mid.build();
    write_file(&s.path("mid.vhd"), &mid_img);
    // top: 1 MiB blocks, only the parent name (UTF-16 BE in the header) to go by, plus a
    // W2ru locator to a file that does not exist (skipped because the name exists).
    let mut top = child_of(&mid_img, 8 * MIB, MIB, 13);
    top.locators.push((*b"W2ru", utf16le(".\\gone\\mid.vhd")));
    top.parent_name = "mid.vhd".into();
    scatter(&mut top, &mut Rng::new(14), 25);
    let img = s.path("top.vhd");
    write_file(&img, &top.build());

    let view = open_view(&img).unwrap();
    assert_eq!(view.layers().len(), 3);
    assert_same(
        "three layers",
        &read_all(&view),
        &model(&base_view, 8 * MIB, &[&mid, &top]),
    );
    // The mid layer alone (what snapshots/mid/disk.raw shows).
    let layers = view.layers()[1..].to_vec();
    let mid_view = vmfs_mount::view::View::new(
        layers,
        8 * MIB,
        std::sync::Arc::new(vmfs_mount::cache::ByteCache::new(1 << 20)),
        64,
    );
    assert_same(
        "mid view",
        &read_all(&mid_view),
        &model(&base_view, 8 * MIB, &[&mid]),
    );
}

#[test]
fn every_sector_state_pattern_in_one_block() {
    // Alternating runs of every length 1..=16 sectors in a 64 KiB-block child, read with
    // requests that start and end inside sectors.
    let s = Scratch::new("vhd-diff-pattern");
    let (parent, parent_view) = qemu_parent(&s, "p.vhd", 2 * MIB, 20);
    let mut child = child_of(&std::fs::read(&parent).unwrap(), 2 * MIB, 64 * 1024, 21);
    child.parent_name = "p.vhd".into();
    let mut rng = Rng::new(22);
    let mut junk = |n| Rng::new(23).bytes(n);
    let mut sector = 0u64;
    for len in (1..=16u64).cycle().take(60) {
        child.write(sector * 512, &rng.bytes((len * 512) as usize), &mut junk);
        sector += 2 * len + (len % 3);
    }
    let img = s.path("c.vhd");
    write_file(&img, &child.build());
    let view = open_view(&img).unwrap();
    let want = model(&parent_view, child.size, &[&child]);
    assert_same("pattern", &read_all(&view), &want);
    let mut buf = vec![0u8; 3000];
    for off in (0..want.len() as u64 - 3000).step_by(7777) {
        assert_eq!(view.read(off, &mut buf).unwrap(), 3000);
        assert_same(
            &format!("read at {off}"),
            &buf,
            &want[off as usize..off as usize + 3000],
        );
    }
}

#[test]
fn parent_uuid_mismatch_names_both_files_and_uuids() {
    let s = Scratch::new("vhd-diff-uuid");
    let (parent, _) = qemu_parent(&s, "parent.vhd", 2 * MIB, 30);
    let mut child = child_of(&std::fs::read(&parent).unwrap(), 2 * MIB, 2 * MIB, 31);
    child.parent_uuid = [0x42; 16];
    child.locators.push((*b"W2ru", utf16le(".\\parent.vhd")));
    let img = s.path("child.vhd");
    write_file(&img, &child.build());
    let e = open_view(&img).err().expect("open must fail");
    assert_eq!(e.kind(), Kind::Corrupt, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("child.vhd") && msg.contains("parent.vhd"),
        "{msg}"
    );
    assert!(
        msg.contains("42424242-4242-4242-4242-424242424242"),
        "{msg}"
    );
}

#[test]
fn missing_parent_is_reported_with_what_was_tried() {
    let s = Scratch::new("vhd-diff-missing");
    let (parent, _) = qemu_parent(&s, "parent.vhd", 2 * MIB, 40);
    let mut child = child_of(&std::fs::read(&parent).unwrap(), 2 * MIB, 2 * MIB, 41);
    child.locators.push((*b"W2ru", utf16le(".\\elsewhere.vhd")));
    child
        .locators
        .push((*b"W2ku", utf16le("D:\\vms\\elsewhere.vhd")));
    let img = s.path("child.vhd");
    write_file(&img, &child.build());
    let e = open_view(&img).err().expect("open must fail");
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
    assert!(e.to_string().contains("elsewhere.vhd"), "{e}");
    assert!(
        e.to_string()
            .contains(&s.path("./elsewhere.vhd").display().to_string()),
        "{e}"
    );
}
