//! VHDX driver tests: QEMU-made images compared with `qemu-img convert`, and images written
//! by the small generator in `vhdx_gen` (differencing chains, 4 KiB sectors, big BATs)
//! compared with a model of what they hold.

mod common;
mod vhdx_gen;

use common::*;
use std::path::Path;
use std::sync::Arc;
use vhdx_gen::model::*;
use vhdx_gen::*;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::error::Kind;
use vmfs_mount::view::View;

fn random_block(rng: &mut Rng, spec: &Spec) -> Vec<u8> {
    rng.bytes(spec.block_size as usize)
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

    // a stale relative_path: the Windows absolute path's file name beside the child is used
    spec.parent = Some(vec![
        ("parent_linkage".into(), right.clone()),
        ("relative_path".into(), "..\\gone\\x.vhdx".into()),
        (
            "absolute_win32_path".into(),
            "\\\\?\\D:\\vms\\base.vhdx".into(),
        ),
    ]);
    write(&s.path("moved.avhdx"), &build(&spec));
    let view = open_view(&s.path("moved.avhdx")).unwrap();
    assert_same("moved", &read_all(&view), &model(&base));

    // parent and child must agree on the logical sector size
    let mut spec4k = Spec::new(4 << 20, 1 << 20, 4096);
    spec4k.parent = Some(pairs(&right, None));
    write(&s.path("sector.avhdx"), &build(&spec4k));
    let e = open_err(&s.path("sector.avhdx"));
    assert!(e.to_string().contains("logical sector size"), "{e}");
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
