//! VHDX driver tests: QEMU-made images compared with `qemu-img convert`, and images written
//! by the small generator in `vhdx_gen` (differencing chains, 4 KiB sectors, dirty logs,
//! hostile fields) compared with a model of what they hold.

mod common;
mod vhdx_gen;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhdx_gen::*;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::error::Kind;
use vmfs_mount::format::{Format, open_layer};
use vmfs_mount::view::View;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn random_block(rng: &mut Rng, spec: &Spec) -> Vec<u8> {
    rng.bytes(spec.block_size as usize)
}

/// What a non-differencing `spec` reads as.
fn model(spec: &Spec) -> Vec<u8> {
    model_over(spec, &[])
}

/// What `spec` reads as over a parent that reads as `parent` (zeros past its end).
fn model_over(spec: &Spec, parent: &[u8]) -> Vec<u8> {
    let size = spec.virtual_size as usize;
    let mut out = vec![0u8; size];
    let n = parent.len().min(size);
    let differencing = spec.parent.is_some();
    if differencing {
        out[..n].copy_from_slice(&parent[..n]);
    }
    let bs = spec.block_size as usize;
    let lss = spec.logical_sector as usize;
    for (i, b) in spec.blocks.iter().enumerate() {
        let start = i * bs;
        let end = (start + bs).min(size);
        match b {
            Block::Full(d) => out[start..end].copy_from_slice(&d[..end - start]),
            Block::Zero => out[start..end].fill(0),
            Block::Partial(d, present) => {
                for (s, &p) in present.iter().enumerate() {
                    let (a, z) = (start + s * lss, (start + (s + 1) * lss).min(end));
                    if p && a < end {
                        out[a..z].copy_from_slice(&d[s * lss..s * lss + (z - a)]);
                    }
                }
            }
            _ if !differencing => out[start..end].fill(0),
            _ => {}
        }
    }
    out
}

fn open_err(path: &Path) -> vmfs_mount::error::Error {
    match open_view(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e,
    }
}

/// The DataWriteGuid of a VHDX as its driver reports it.
fn data_write_guid(path: &Path) -> [u8; 16] {
    open_layer(path, Format::Vhdx, &ctx())
        .unwrap()
        .identity()
        .uuid
        .unwrap()
}

fn child_of(parent: &Path, relative: &str) -> Vec<(String, String)> {
    vec![
        ("parent_linkage".into(), guid_text(&data_write_guid(parent))),
        ("relative_path".into(), relative.into()),
        (
            "absolute_win32_path".into(),
            "\\\\?\\C:\\images\\elsewhere.vhdx".into(),
        ),
    ]
}

fn random_present(rng: &mut Rng, sectors: usize) -> Vec<bool> {
    // runs of random length so that both long and one-sector runs occur
    let mut v = Vec::with_capacity(sectors);
    while v.len() < sectors {
        let bit = rng.below(2) == 1;
        let max = if rng.below(4) == 0 { 1 } else { 40 };
        let run = 1 + rng.below(max) as usize;
        v.extend(std::iter::repeat_n(bit, run));
    }
    v.truncate(sectors);
    v
}

fn qemu_create(path: &Path, opts: &str, size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        opts,
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
}

fn random_writes(path: &Path, rng: &mut Rng, size: u64, count: usize) {
    for _ in 0..count {
        let len = 1 + rng.below(3 << 20);
        let len = if rng.below(2) == 0 {
            len.div_ceil(512) * 512
        } else {
            len
        };
        let len = len.min(size);
        let off = rng.below(size - len + 1);
        write_random("vhdx", path, rng, off, len as usize);
    }
}

#[test]
fn qemu_dynamic_and_fixed_images_read_like_qemu() {
    let s = Scratch::new("vhdx-qemu");
    let cases = [
        ("subformat=dynamic,block_size=1M", 24 << 20),
        (
            "subformat=dynamic,block_size=8M,log_size=2M",
            (40 << 20) + 3 * 512,
        ),
        ("subformat=fixed,block_size=2M", 12 << 20),
    ];
    for (i, (opts, size)) in cases.into_iter().enumerate() {
        let img = s.path(&format!("q{i}.vhdx"));
        qemu_create(&img, opts, size);
        let mut rng = Rng::new(100 + i as u64);
        random_writes(&img, &mut rng, size, 6);
        let block = if opts.contains("8M") {
            8 << 20
        } else {
            1 << 20
        };
        qemu_io("vhdx", &img, &[format!("write -z {block} {block}")]);
        let want = qemu_raw(&img, Some("vhdx"), &[]);
        let view = open_view(&img).unwrap();
        assert_eq!(view.size(), want.len() as u64, "{opts}");
        assert_same(opts, &read_all(&view), &want);
    }
}

#[test]
fn generated_images_match_qemu_and_the_model() {
    let s = Scratch::new("vhdx-gen");
    let mut rng = Rng::new(7);
    for (lss, block) in [(512u32, 1u32 << 20), (4096, 2 << 20)] {
        let mut spec = Spec::new(9 * (block as u64) + 5 * lss as u64, block, lss);
        spec.blocks = vec![
            Block::Full(random_block(&mut rng, &spec)),
            Block::NotPresent,
            Block::Zero,
            Block::Undefined,
            Block::Unmapped,
            Block::Full(random_block(&mut rng, &spec)),
            Block::Full(random_block(&mut rng, &spec)),
            Block::NotPresent,
            Block::Full(random_block(&mut rng, &spec)),
            Block::Full(random_block(&mut rng, &spec)),
        ];
        let img = s.path(&format!("g{lss}.vhdx"));
        write(&img, &build(&spec));
        let want = model(&spec);
        if lss == 512 {
            // QEMU refuses 4 KiB logical sectors (ENOTSUP)
            assert_same("qemu vs model", &qemu_raw(&img, Some("vhdx"), &[]), &want);
        }
        let view = open_view(&img).unwrap();
        assert_same(&format!("sector {lss}"), &read_all(&view), &want);
        let details = view.layers()[0].details();
        assert!(
            details.contains(&("logical sector size".into(), lss.to_string())),
            "{details:?}"
        );
    }
}

#[test]
fn big_bats_are_paged_and_runs_merge() {
    // 16 GiB in 1 MiB blocks: 16384 payload entries, a BAT of several 64 KiB pages
    let s = Scratch::new("vhdx-bigbat");
    let mut rng = Rng::new(8);
    let mut spec = Spec::new(16 << 30, 1 << 20, 512);
    let mut blocks = vec![Block::NotPresent; 16384];
    let mut present = Vec::new();
    for i in [0usize, 8190, 8191, 8192, 8193, 16383] {
        blocks[i] = Block::Full(rng.bytes(1 << 20));
        present.push(i);
    }
    spec.blocks = blocks;
    let img = s.path("big.vhdx");
    write(&img, &build(&spec));
    let view = open_view(&img).unwrap();
    for i in [0usize, 1, 8189, 8190, 8191, 8192, 8193, 8194, 16382, 16383] {
        let mut got = vec![0u8; 1 << 20];
        assert_eq!(view.read((i as u64) << 20, &mut got).unwrap(), 1 << 20);
        match &spec.blocks[i] {
            Block::Full(d) => assert!(got == *d, "block {i}"),
            _ => assert!(got.iter().all(|&b| b == 0), "block {i}"),
        }
    }
    // blocks 8190..=8193 were allocated one after another: one extent for all four
    let layer = &view.layers()[0];
    let e = layer.map(8190 << 20, 4 << 20).unwrap();
    assert_eq!(e.len, 4 << 20);
    assert_eq!(layer.map(1 << 20, 100 << 20).unwrap().len, 100 << 20);
    assert_eq!(view.next_data(1 << 20).unwrap(), Some(8190 << 20));
}

/// A child with every block state over a QEMU-made parent with another block size.
#[test]
fn differencing_child_over_a_qemu_parent() {
    let s = Scratch::new("vhdx-diff");
    let mut rng = Rng::new(9);
    let base = s.path("base.vhdx");
    let base_size = 20u64 << 20;
    qemu_create(&base, "subformat=dynamic,block_size=2M", base_size);
    random_writes(&base, &mut rng, base_size, 8);
    let base_raw = qemu_raw(&base, Some("vhdx"), &[]);

    let mut spec = Spec::new(24 << 20, 1 << 20, 512);
    spec.parent = Some(child_of(&base, "base.vhdx"));
    let sectors = (1 << 20) / 512;
    let mut blocks = Vec::new();
    for i in 0..24 {
        blocks.push(match i % 6 {
            0 => Block::Full(rng.bytes(1 << 20)),
            1 | 4 => Block::Partial(rng.bytes(1 << 20), random_present(&mut rng, sectors)),
            2 => Block::NotPresent,
            3 => Block::Zero,
            _ => {
                if i % 2 == 0 {
                    Block::Undefined
                } else {
                    Block::Unmapped
                }
            }
        });
    }
    // a partially present block whose sectors are all present or all absent
    blocks[7] = Block::Partial(rng.bytes(1 << 20), vec![true; sectors]);
    blocks[10] = Block::Partial(rng.bytes(1 << 20), vec![false; sectors]);
    spec.blocks = blocks;
    let child = s.path("child.avhdx");
    write(&child, &build(&spec));

    let view = open_view(&child).unwrap();
    assert_eq!(view.layers().len(), 2);
    assert_same(
        "child over parent",
        &read_all(&view),
        &model_over(&spec, &base_raw),
    );
    // the parent's own view is the parent alone
    let parent_view = View::new(
        view.layers()[1..].to_vec(),
        base_size,
        Arc::new(ByteCache::new(1 << 20)),
        64,
    );
    assert_same("parent view", &read_all(&parent_view), &base_raw);
}

/// Three layers with 4 KiB logical sectors: bitmaps at 4 KiB granularity, blocks of 1, 2 and
/// 4 MiB.
#[test]
fn differencing_chain_with_4k_sectors() {
    let s = Scratch::new("vhdx-chain4k");
    let mut rng = Rng::new(10);
    let size = 16u64 << 20;
    let mut base = Spec::new(size, 4 << 20, 4096);
    base.data_write_guid = guid(1, 1, 1, 1);
    base.blocks = (0..4)
        .map(|i| {
            if i == 2 {
                Block::NotPresent
            } else {
                Block::Full(rng.bytes(4 << 20))
            }
        })
        .collect();
    write(&s.path("base.vhdx"), &build(&base));
    let mut layer_models = model(&base);

    let mut prev = s.path("base.vhdx");
    for (level, block) in [(1u64, 1u32 << 20), (2, 2 << 20)] {
        let mut spec = Spec::new(size, block, 4096);
        spec.data_write_guid = guid(level as u32 + 1, 2, 2, 2);
        spec.parent = Some(child_of(
            &prev,
            &format!(".\\{}", prev.file_name().unwrap().to_str().unwrap()),
        ));
        let n = size / block as u64;
        let sectors = block as usize / 4096;
        spec.blocks = (0..n)
            .map(|i| match (i + level) % 3 {
                0 => Block::Partial(rng.bytes(block as usize), random_present(&mut rng, sectors)),
                1 => Block::Full(rng.bytes(block as usize)),
                _ => Block::NotPresent,
            })
            .collect();
        let path = s.path(&format!("l{level}.avhdx"));
        write(&path, &build(&spec));
        layer_models = model_over(&spec, &layer_models);
        prev = path;
    }
    let view = open_view(&prev).unwrap();
    assert_eq!(view.layers().len(), 3);
    assert_same("three layers", &read_all(&view), &layer_models);
}

#[test]
fn parent_identity_is_checked() {
    let s = Scratch::new("vhdx-linkage");
    let mut rng = Rng::new(11);
    let mut base = Spec::new(4 << 20, 1 << 20, 512);
    base.data_write_guid = guid(0xAAAA, 1, 2, 3);
    base.blocks = vec![Block::Full(rng.bytes(1 << 20))];
    write(&s.path("base.vhdx"), &build(&base));
    let wrong = guid_text(&guid(0xBBBB, 1, 2, 3));
    let right = guid_text(&base.data_write_guid);

    let mut spec = Spec::new(4 << 20, 1 << 20, 512);
    let pairs = |linkage: &str, linkage2: Option<&str>| {
        let mut p = vec![
            ("parent_linkage".to_string(), linkage.to_string()),
            ("relative_path".to_string(), "base.vhdx".to_string()),
        ];
        if let Some(l2) = linkage2 {
            p.push(("parent_linkage2".to_string(), l2.to_string()));
        }
        p
    };
    // parent_linkage2 names the parent: accepted
    spec.parent = Some(pairs(&wrong, Some(&right)));
    write(&s.path("ok.avhdx"), &build(&spec));
    let view = open_view(&s.path("ok.avhdx")).unwrap();
    assert_same("linkage2", &read_all(&view), &model(&base));

    // neither does: refused, naming both files and both GUIDs
    spec.parent = Some(pairs(&wrong, None));
    write(&s.path("bad.avhdx"), &build(&spec));
    let e = open_err(&s.path("bad.avhdx"));
    let msg = e.to_string();
    for needle in ["bad.avhdx", "base.vhdx", &wrong[1..37], &right[1..37]] {
        assert!(msg.contains(needle), "{needle} missing from: {msg}");
    }

    // a parent that is not there
    spec.parent = Some(vec![
        ("parent_linkage".into(), right.clone()),
        ("relative_path".into(), "..\\gone\\x.vhdx".into()),
    ]);
    write(&s.path("orphan.avhdx"), &build(&spec));
    assert_eq!(open_err(&s.path("orphan.avhdx")).kind(), Kind::NotFound);
}

#[test]
fn parent_loops_are_refused() {
    let s = Scratch::new("vhdx-loop");
    let (ga, gb) = (guid(0xA, 0, 0, 0), guid(0xB, 0, 0, 0));
    for (name, own, other, parent) in [
        ("a.avhdx", ga, gb, "b.avhdx"),
        ("b.avhdx", gb, ga, "a.avhdx"),
    ] {
        let mut spec = Spec::new(2 << 20, 1 << 20, 512);
        spec.data_write_guid = own;
        spec.parent = Some(vec![
            ("parent_linkage".into(), guid_text(&other)),
            ("relative_path".into(), parent.into()),
        ]);
        write(&s.path(name), &build(&spec));
    }
    let e = open_err(&s.path("a.avhdx"));
    assert!(e.to_string().contains("loop"), "{e}");
    // a child naming itself
    let mut spec = Spec::new(2 << 20, 1 << 20, 512);
    spec.parent = Some(vec![
        ("parent_linkage".into(), guid_text(&spec.data_write_guid)),
        ("relative_path".into(), "self.avhdx".into()),
    ]);
    write(&s.path("self.avhdx"), &build(&spec));
    assert!(open_err(&s.path("self.avhdx")).to_string().contains("loop"));
}

/// The true image, then its BAT sector, one payload sector and one zeroed range made stale
/// on disk, with two log entries (in one sequence) that restore them.
fn dirty_image(rng: &mut Rng) -> (Vec<u8>, Spec) {
    let mut spec = Spec::new(6 << 20, 1 << 20, 512);
    let mut b2 = rng.bytes(1 << 20);
    b2[64 << 10..192 << 10].fill(0);
    spec.blocks = vec![
        Block::Full(rng.bytes(1 << 20)),
        Block::NotPresent,
        Block::Full(b2),
        Block::Full(rng.bytes(1 << 20)),
    ];
    let mut img = build(&spec);
    let log_guid = [0x4C; 16];
    let block2 = (BAT_OFF + MIB) + MIB; // the second block allocated
    let payload_sector = BAT_OFF + MIB + 4096 * 3;
    let zero_range = (block2 + (64 << 10), 128 << 10);
    // entry 1 (older) writes junk to the payload sector; entry 2 writes the truth
    let mut junk_img = img.clone();
    junk_img[payload_sector as usize..payload_sector as usize + 4096]
        .copy_from_slice(&rng.bytes(4096));
    let e1 = log_entry(&junk_img, 41, 0, log_guid, &[payload_sector], &[]);
    let e2 = log_entry(
        &img,
        42,
        0,
        log_guid,
        &[BAT_OFF, payload_sector],
        &[zero_range],
    );
    let mut pos = LOG_OFF as usize;
    for e in [&e1, &e2] {
        img[pos..pos + e.len()].copy_from_slice(e);
        pos += e.len();
    }
    // stale on disk: empty BAT, junk payload sector and junk in the zeroed range
    img[BAT_OFF as usize..BAT_OFF as usize + 4096].fill(0);
    img[payload_sector as usize..payload_sector as usize + 4096].copy_from_slice(&rng.bytes(4096));
    let (zo, zl) = (zero_range.0 as usize, zero_range.1 as usize);
    img[zo..zo + zl].copy_from_slice(&rng.bytes(zl));
    set_log_guid(&mut img, log_guid);
    (img, spec)
}

#[test]
fn dirty_log_is_replayed_in_memory_only() {
    let s = Scratch::new("vhdx-log");
    let mut rng = Rng::new(12);
    let (img_bytes, spec) = dirty_image(&mut rng);
    let img = s.path("dirty.vhdx");
    write(&img, &img_bytes);
    let view = open_view(&img).unwrap();
    let want = model(&spec);
    assert_same("replayed", &read_all(&view), &want);
    let log = view.layers()[0]
        .details()
        .into_iter()
        .find(|(k, _)| k == "log")
        .unwrap()
        .1;
    assert!(log.contains("replayed 2 entries"), "{log}");
    drop(view);
    assert!(
        std::fs::read(&img).unwrap() == img_bytes,
        "the image was modified"
    );

    // QEMU agrees once it has replayed the log into a copy
    let copy = s.path("copy.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    let _ = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-r", "all", "-f", "vhdx"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_same("qemu replay", &qemu_raw(&copy, Some("vhdx"), &[]), &want);
}

#[test]
fn damaged_or_truncated_logs() {
    let s = Scratch::new("vhdx-badlog");
    let mut rng = Rng::new(13);
    let (mut img_bytes, _) = dirty_image(&mut rng);
    // damage entry 2's CRC: entry 1 alone is a valid sequence and is replayed
    let e2 = LOG_OFF as usize + 2 * 4096;
    img_bytes[e2 + 100] ^= 1;
    let img = s.path("badcrc.vhdx");
    write(&img, &img_bytes);
    let view = open_view(&img).unwrap();
    let log = view.layers()[0]
        .details()
        .into_iter()
        .find(|(k, _)| k == "log")
        .unwrap()
        .1;
    assert!(
        log.contains("replayed 1 entries (sequence 41..=41"),
        "{log}"
    );
    // with entry 1 damaged too nothing is valid: the log is ignored (as QEMU does) and the
    // stale BAT shows through
    img_bytes[LOG_OFF as usize + 100] ^= 1;
    write(&img, &img_bytes);
    let view = open_view(&img).unwrap();
    let details = view.layers()[0].details();
    assert!(
        details.contains(&("log".into(), "log GUID set, no valid entries".into())),
        "{details:?}"
    );
    let mut first = vec![1u8; 4096];
    view.read(0, &mut first).unwrap();
    assert!(first.iter().all(|&b| b == 0));
    // a file shorter than the entry's FlushedFileOffset was truncated
    let (img_bytes, _) = dirty_image(&mut rng);
    let short = s.path("short.vhdx");
    write(&short, &img_bytes[..img_bytes.len() - (1 << 20)]);
    let e = open_err(&short);
    assert!(e.to_string().contains("FlushedFileOffset"), "{e}");
}

/// A simple valid image for the hostile tests, and the path it was written to.
fn hostile_base(s: &Scratch, rng: &mut Rng) -> (Vec<u8>, PathBuf) {
    let mut spec = Spec::new(4 << 20, 1 << 20, 512);
    spec.blocks = vec![
        Block::Full(rng.bytes(1 << 20)),
        Block::Zero,
        Block::Full(rng.bytes(1 << 20)),
    ];
    (build(&spec), s.path("h.vhdx"))
}

fn set_u32(img: &mut [u8], off: u64, v: u32) {
    img[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u64(img: &mut [u8], off: u64, v: u64) {
    img[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn hostile_images_give_clear_errors() {
    let s = Scratch::new("vhdx-hostile");
    let mut rng = Rng::new(14);
    let (base, path) = hostile_base(&s, &mut rng);
    type Edit = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Edit, Kind, &str)> = vec![
        (
            "both header CRCs",
            |i| {
                i[HEADER_OFFS[0] as usize + 200] ^= 1;
                i[HEADER_OFFS[1] as usize + 200] ^= 1;
            },
            Kind::Corrupt,
            "no valid header",
        ),
        (
            "region tables past EOF",
            |i| i.truncate(200 << 10),
            Kind::Corrupt,
            "region table",
        ),
        (
            "both region tables",
            |i| {
                i[REGION_OFFS[0] as usize + 100] ^= 1;
                i[REGION_OFFS[1] as usize + 100] ^= 1;
            },
            Kind::Corrupt,
            "no valid region table",
        ),
        (
            "BAT past EOF",
            |i| i.truncate(BAT_OFF as usize),
            Kind::Corrupt,
            "BAT region",
        ),
        (
            "block size 3 MiB",
            |i| {
                let at = metadata_item(i, FILE_PARAMS);
                set_u32(i, at, 3 << 20);
            },
            Kind::Corrupt,
            "block size",
        ),
        (
            "block size 512 MiB",
            |i| {
                let at = metadata_item(i, FILE_PARAMS);
                set_u32(i, at, 512 << 20);
            },
            Kind::Corrupt,
            "block size",
        ),
        (
            "virtual size 65 TiB",
            |i| {
                let at = metadata_item(i, VDISK_SIZE);
                set_u64(i, at, 65 << 40);
            },
            Kind::Corrupt,
            "virtual disk size",
        ),
        (
            "BAT too small for the disk",
            |i| {
                let at = metadata_item(i, VDISK_SIZE);
                set_u64(i, at, 60 << 40);
            },
            Kind::Corrupt,
            "do not fit",
        ),
        (
            "metadata item outside its region",
            |i| {
                let e = metadata_entry(i, VDISK_SIZE).unwrap();
                set_u32(i, e + 16, (1 << 20) - 4);
            },
            Kind::Corrupt,
            "outside",
        ),
        (
            "unknown required metadata item",
            |i| {
                let e = metadata_entry(i, VDISK_SIZE).unwrap() as usize;
                i[e] ^= 0xFF;
            },
            Kind::Unsupported,
            "unknown required metadata item",
        ),
        (
            "unknown required region",
            |i| {
                for t in REGION_OFFS {
                    let e = t as usize + 16 + 32 * 2;
                    i[e..e + 16].copy_from_slice(&[0x77; 16]);
                    set_u64(i, e as u64 + 16, 40 << 20);
                    set_u32(i, e as u64 + 24, 1 << 20);
                    set_u32(i, e as u64 + 28, 1);
                    set_u32(i, t + 8, 3);
                    fix_crc(i, t, 64 << 10);
                }
            },
            Kind::Unsupported,
            "unknown required region",
        ),
    ];
    for (what, edit, kind, needle) in cases {
        let mut img = base.clone();
        edit(&mut img);
        write(&path, &img);
        let e = open_err(&path);
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(
            e.to_string().contains(needle) && e.to_string().contains("h.vhdx"),
            "{what}: {e}"
        );
    }
    // one damaged header or region table is survivable
    for off in [HEADER_OFFS[1], REGION_OFFS[0]] {
        let mut img = base.clone();
        img[off as usize + 300] ^= 1;
        write(&path, &img);
        assert!(open_view(&path).is_ok());
    }
}

#[test]
fn hostile_bat_entries_fail_reads_not_opens() {
    let s = Scratch::new("vhdx-hostile-bat");
    let mut rng = Rng::new(15);
    let (base, path) = hostile_base(&s, &mut rng);
    let len = base.len() as u64;
    for (what, entry, cut, needle) in [
        ("offset past EOF", (len + MIB) | 6, 0, "outside the file"),
        (
            "block reaching past EOF",
            (len - MIB) | 6,
            MIB / 2,
            "outside the file",
        ),
        ("offset in the header area", 6, 0, "outside the file"),
        (
            "partially present in a dynamic disk",
            (4 * MIB) | 7,
            0,
            "state 7",
        ),
        ("reserved state 4", 4, 0, "state 4"),
    ] {
        let mut img = base.clone();
        set_u64(&mut img, bat_entry_offset(1), entry);
        img.truncate((len - cut) as usize);
        write(&path, &img);
        let view = open_view(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        view.read(0, &mut buf).unwrap();
        let e = view.read(MIB + 512, &mut buf).unwrap_err();
        assert_eq!(e.kind(), Kind::Corrupt, "{what}: {e}");
        assert!(
            e.to_string().contains(needle) && e.to_string().contains("payload BAT entry 1"),
            "{what}: {e}"
        );
    }
}

#[test]
fn differencing_without_its_bitmap_block_fails_reads() {
    let s = Scratch::new("vhdx-hostile-bitmap");
    let mut rng = Rng::new(16);
    let mut base = Spec::new(2 << 20, 1 << 20, 512);
    base.blocks = vec![Block::Full(rng.bytes(1 << 20))];
    write(&s.path("base.vhdx"), &build(&base));
    let mut spec = Spec::new(2 << 20, 1 << 20, 512);
    spec.parent = Some(child_of(&s.path("base.vhdx"), "base.vhdx"));
    spec.blocks = vec![Block::Partial(rng.bytes(1 << 20), vec![true; 2048])];
    let mut img = build(&spec);
    let bitmap_idx = spec.chunk_ratio();
    set_u64(&mut img, bat_entry_offset(bitmap_idx), 0);
    write(&s.path("c.avhdx"), &img);
    let view = open_view(&s.path("c.avhdx")).unwrap();
    let e = view.read(0, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("sector bitmap"), "{e}");
    // and a differencing disk without a parent locator does not open
    spec.parent = Some(Vec::new());
    let mut img = build(&spec);
    let e = metadata_entry(
        &img,
        guid(0xA8D35F2D, 0xB30B, 0x454D, 0xABF7_D3D8_4834_AB0C),
    )
    .unwrap();
    img[e as usize..e as usize + 16].fill(0);
    set_u32(&mut img, e + 24, 0);
    write(&s.path("noloc.avhdx"), &img);
    assert!(
        open_err(&s.path("noloc.avhdx"))
            .to_string()
            .contains("parent locator")
    );
}
