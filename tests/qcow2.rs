//! qcow2 reads compared byte for byte with `qemu-img convert -O raw`.

mod common;
mod qcow2_support;

use common::*;
use qcow2_support::*;
use std::sync::Arc;
use vmfs_mount::format::{Layer, Mapping};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn v3_64k_two_write_rounds() {
    let d = Scratch::new("q2-v3");
    let img = d.path("disk.qcow2");
    let mut rng = Rng::new(1);
    create(&img, "", 16 * MIB);
    apply_random(&img, &mut rng, 16 * MIB, 20, 200 * KIB);
    apply_random(&img, &mut rng, 16 * MIB, 20, 200 * KIB);
    assert_eq!(check_all_views(&img), 1);
}

#[test]
fn compat_010_with_compressed_clusters() {
    let d = Scratch::new("q2-v2");
    let img = d.path("old.qcow2");
    let mut rng = Rng::new(2);
    create(&img, "compat=0.10", 16 * MIB);
    let ops = [
        Op::Compressed(0, 256 * KIB),
        Op::Compressed(4 * MIB, 64 * KIB),
        Op::Compressed(16 * MIB - 128 * KIB, 128 * KIB),
    ];
    apply("qcow2", &img, &mut rng, &ops);
    apply(
        "qcow2",
        &img,
        &mut rng,
        &[
            Op::Data(4 * MIB + 1000, 3000),
            Op::Data(9 * MIB + 7, 100 * KIB),
        ],
    );
    let layer = vmfs_mount::format::open_detect(&img, None, &ctx()).unwrap();
    assert!(matches!(
        layer.map(0, 4096).unwrap().map,
        Mapping::Compressed { .. }
    ));
    assert!(
        layer
            .details()
            .iter()
            .any(|(k, v)| k == "version" && v.contains("0.10"))
    );
    check_all_views(&img);
}

#[test]
fn small_and_huge_clusters() {
    let d = Scratch::new("q2-cs");
    let mut rng = Rng::new(3);
    for (name, cs) in [("c512.qcow2", 512), ("c2m.qcow2", 2 * MIB)] {
        let img = d.path(name);
        create(&img, &format!("cluster_size={cs}"), 12 * MIB + 512);
        // Compressed writes need unallocated clusters: first.
        apply(
            "qcow2",
            &img,
            &mut rng,
            &[Op::Compressed(6 * MIB, cs.max(64 * KIB))],
        );
        let mut ops = random_ops(&mut rng, 12 * MIB + 512, 12, 200 * KIB);
        ops.push(Op::Zero(MIB, 3 * cs));
        apply("qcow2", &img, &mut rng, &ops);
        check_all_views(&img);
    }
}

#[test]
fn partial_last_cluster() {
    let d = Scratch::new("q2-tail");
    let img = d.path("odd.qcow2");
    let size = 33 * MIB + 1536;
    let mut rng = Rng::new(4);
    create(&img, "", size);
    // A compressed short last cluster (it still decompresses to a whole cluster).
    apply(
        "qcow2",
        &img,
        &mut rng,
        &[Op::Compressed(size - 1536, 1536)],
    );
    let layer = vmfs_mount::format::open_detect(&img, None, &ctx()).unwrap();
    assert!(matches!(
        layer.map(size - 1536, 1536).unwrap().map,
        Mapping::Compressed { .. }
    ));
    check_all_views(&img);
    let ops = [
        Op::Data(size - 1, 1),
        Op::Data(size - 70 * KIB, 5000),
        Op::Data(MIB - 1000, 2000),
    ];
    apply("qcow2", &img, &mut rng, &ops);
    let view = open_view(&img).unwrap();
    assert_eq!(view.size(), size);
    check_all_views(&img);
}

#[test]
fn zlib_compressed_then_overwritten_and_zeroed() {
    let d = Scratch::new("q2-zlib");
    let raw = d.path("src.raw");
    let img = d.path("z.qcow2");
    let mut rng = Rng::new(5);
    let mut data: Vec<u8> = rng
        .bytes(4 * MIB as usize)
        .iter()
        .map(|b| b & 0x0f)
        .collect();
    data[3 * MIB as usize..3 * MIB as usize + 300 * KIB as usize].fill(0);
    std::fs::write(&raw, &data).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    let ops = [
        Op::Data(70 * KIB, 1000),
        Op::Data(200 * KIB - 100, 300),
        Op::Zero(MIB + 4096, 8192),
        Op::ZeroUnmap(2 * MIB, 64 * KIB),
        Op::ZeroUnmap(3 * MIB + 512, 100 * KIB),
        Op::Zero(4 * MIB - 128 * KIB, 128 * KIB),
    ];
    apply("qcow2", &img, &mut rng, &ops);
    check_all_views(&img);
}

#[test]
fn zstd_compressed_then_overwritten() {
    let d = Scratch::new("q2-zstd");
    let raw = d.path("src.raw");
    let img = d.path("zs.qcow2");
    let mut rng = Rng::new(6);
    let data: Vec<u8> = rng
        .bytes(6 * MIB as usize)
        .iter()
        .map(|b| b & 0x0f)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-o",
        "compression_type=zstd",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    apply(
        "qcow2",
        &img,
        &mut rng,
        &[
            Op::Data(10 * KIB, 5000),
            Op::Data(3 * MIB - 10, 200 * KIB),
            Op::Zero(MIB, 4096),
        ],
    );
    let layer = vmfs_mount::format::open_detect(&img, None, &ctx()).unwrap();
    assert!(
        layer
            .details()
            .iter()
            .any(|(k, v)| k == "compression" && v == "zstd")
    );
    check_all_views(&img);
}

#[test]
fn extended_l2_over_a_base() {
    let d = Scratch::new("q2-extl2");
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    let mut rng = Rng::new(7);
    create(&base, "", 8 * MIB);
    apply("qcow2", &base, &mut rng, &[Op::Data(0, 8 * MIB)]);
    overlay(
        &top,
        "base.qcow2",
        "qcow2",
        None,
        "extended_l2=on,cluster_size=64k",
    );
    let sc = 2 * KIB; // 64 KiB / 32
    // Compressed clusters have no subclusters; a partial write then allocates the cluster.
    let compressed = [Op::Compressed(4 * MIB, 128 * KIB)];
    apply("qcow2", &top, &mut rng, &compressed);
    apply("qcow2", &top, &mut rng, &[Op::Data(4 * MIB + 5 * sc, 100)]);
    let ops = [
        Op::Data(3 * sc, sc),             // one subcluster
        Op::Data(5 * sc + 100, 10),       // inside one subcluster, unaligned
        Op::Zero(9 * sc, 2 * sc),         // zeroed subclusters
        Op::Data(64 * KIB - 3000, 6000),  // crosses a cluster boundary
        Op::Data(MIB + 31 * sc, 2 * sc),  // last subcluster + next cluster's first
        Op::ZeroUnmap(2 * MIB, 64 * KIB), // a whole zero cluster
        Op::Zero(3 * MIB + sc, sc),
    ];
    apply("qcow2", &top, &mut rng, &ops);
    let layer = vmfs_mount::format::open_detect(&top, None, &ctx()).unwrap();
    assert!(
        layer
            .details()
            .iter()
            .any(|(k, v)| k == "extended L2" && v == "yes")
    );
    // An untouched subcluster of an allocated cluster falls through to the base.
    assert!(matches!(
        layer.map(0, sc).unwrap().map,
        Mapping::Unallocated
    ));
    assert!(matches!(layer.map(9 * sc, sc).unwrap().map, Mapping::Zero));
    assert_eq!(check_all_views(&top), 2);
}

#[test]
fn three_level_chain_with_zeroed_ranges() {
    let d = Scratch::new("q2-chain3");
    let (base, mid, top) = (
        d.path("base.qcow2"),
        d.path("mid.qcow2"),
        d.path("top.qcow2"),
    );
    let mut rng = Rng::new(8);
    create(&base, "", 16 * MIB);
    apply("qcow2", &base, &mut rng, &[Op::Data(0, 16 * MIB)]);
    overlay(&mid, "base.qcow2", "qcow2", None, "");
    apply(
        "qcow2",
        &mid,
        &mut rng,
        &[
            Op::Zero(MIB, 3 * MIB),
            Op::Data(2 * MIB + 77, 5000),
            Op::ZeroUnmap(8 * MIB, MIB),
        ],
    );
    overlay(&top, "mid.qcow2", "qcow2", None, "");
    apply(
        "qcow2",
        &top,
        &mut rng,
        &[
            Op::Zero(10 * MIB + 512, 4096),
            Op::Data(MIB + 4096, 4096),
            Op::Data(15 * MIB, 100),
        ],
    );
    assert_eq!(check_all_views(&top), 3);
}

#[test]
fn chain_of_32_layers() {
    let d = Scratch::new("q2-chain32");
    let mut rng = Rng::new(9);
    let size = 2 * MIB;
    create(&d.path("l0.qcow2"), "cluster_size=4k", size);
    apply("qcow2", &d.path("l0.qcow2"), &mut rng, &[Op::Data(0, size)]);
    for i in 1..32 {
        let img = d.path(&format!("l{i}.qcow2"));
        let backing = format!("l{}.qcow2", i - 1);
        // -u and a write without the backing chain: opening 31 backing files per step is slow.
        let args = [
            "create", "-q", "-f", "qcow2", "-u", "-b", &backing, "-F", "qcow2",
        ];
        qemu_img(&[&args[..], &["-o", "cluster_size=4k", s(&img), "2M"]].concat());
        let off = rng.below(size - 32 * KIB);
        let len = 1 + rng.below(32 * KIB);
        let zero_at = rng.below(size / 4096) * 4096;
        apply_alone(
            &img,
            &mut rng,
            &[Op::Data(off, len), Op::Zero(zero_at, 4096)],
        );
    }
    let top = d.path("l31.qcow2");
    let view = open_view(&top).unwrap();
    assert_eq!(view.layers().len(), 32);
    same("32 layers", &read_all(&view), &qemu_raw(&top, None, &[]));
}

#[test]
fn big_overlay_over_short_base() {
    let d = Scratch::new("q2-short");
    let (base, top) = (d.path("base.qcow2"), d.path("top.qcow2"));
    let mut rng = Rng::new(10);
    let bsize = 5 * MIB + 1536;
    create(&base, "", bsize);
    apply("qcow2", &base, &mut rng, &[Op::Data(0, bsize)]);
    // An internal snapshot of a lower layer is a view too ("base@early").
    qemu_img(&["snapshot", "-c", "early", s(&base)]);
    apply("qcow2", &base, &mut rng, &[Op::Data(MIB, 100 * KIB)]);
    overlay(&top, "base.qcow2", "qcow2", Some(24 * MIB), "");
    apply(
        "qcow2",
        &top,
        &mut rng,
        &[Op::Data(bsize - 100, 300), Op::Data(20 * MIB, 4096)],
    );
    assert_eq!(check_all_views(&top), 3);
}

#[test]
fn qcow2_over_raw_backing_with_relative_path() {
    let d = Scratch::new("q2-raw");
    std::fs::create_dir_all(d.path("sub")).unwrap();
    let base = d.path("sub/base.raw");
    let top = d.path("top.qcow2");
    let mut rng = Rng::new(11);
    std::fs::write(&base, rng.bytes(6 * MIB as usize)).unwrap();
    overlay(&top, "sub/base.raw", "raw", None, "");
    apply_random(&top, &mut rng, 6 * MIB, 8, 100 * KIB);
    let layer = vmfs_mount::format::open_detect(&top, None, &ctx()).unwrap();
    match layer.parent() {
        vmfs_mount::format::ParentRef::Path { raw, path, format } => {
            assert_eq!(raw, "sub/base.raw");
            assert_eq!(path, base);
            assert_eq!(format, Some(vmfs_mount::format::Format::Raw));
        }
        other => panic!("parent {other:?}"),
    }
    // The backing path follows the image, not the working directory (the package root).
    assert_eq!(check_all_views(&top), 2);
}

#[test]
fn internal_snapshots_then_grow() {
    let d = Scratch::new("q2-snap");
    let img = d.path("vm.qcow2");
    let mut rng = Rng::new(12);
    create(&img, "", 64 * MIB);
    for tag in ["s1", "before upgrade", "it's late"] {
        apply_random(&img, &mut rng, 64 * MIB, 6, 200 * KIB);
        qemu_img(&["snapshot", "-c", tag, s(&img)]);
    }
    apply(
        "qcow2",
        &img,
        &mut rng,
        &[Op::Zero(0, MIB), Op::Data(5 * MIB, 3 * MIB)],
    );
    qemu_img(&["resize", "-q", s(&img), "80M"]);
    apply("qcow2", &img, &mut rng, &[Op::Data(79 * MIB, MIB)]);
    let layer = vmfs_mount::format::open_detect(&img, None, &ctx()).unwrap();
    let names: Vec<String> = layer.snapshots().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["s1", "before upgrade", "it's late"]);
    assert!(
        layer
            .snapshots()
            .iter()
            .all(|s| s.virtual_size == 64 * MIB && s.date.0 > 0)
    );
    assert_eq!(check_all_views(&img), 4);
}

#[test]
fn snapshot_then_shrink() {
    let d = Scratch::new("q2-shrink");
    let img = d.path("vm.qcow2");
    let mut rng = Rng::new(13);
    create(&img, "", 32 * MIB);
    apply(
        "qcow2",
        &img,
        &mut rng,
        &[
            Op::Data(0, 2 * MIB),
            Op::Data(20 * MIB, 3 * MIB),
            Op::Data(32 * MIB - 4096, 4096),
        ],
    );
    qemu_img(&["snapshot", "-c", "big", s(&img)]);
    qemu_img(&["resize", "-q", "--shrink", s(&img), "16M"]);
    apply("qcow2", &img, &mut rng, &[Op::Data(MIB, 4096)]);
    let layer = vmfs_mount::format::open_detect(&img, None, &ctx()).unwrap();
    assert_eq!(layer.virtual_size(), 16 * MIB);
    assert_eq!(layer.snapshots()[0].virtual_size, 32 * MIB);
    assert_eq!(check_all_views(&img), 2);
}

#[test]
fn external_data_file_raw_and_not() {
    for raw_flag in ["off", "on"] {
        let d = Scratch::new(&format!("q2-df-{raw_flag}"));
        let img = d.path("ext.qcow2");
        let mut rng = Rng::new(14);
        // Run in the image's directory so that the stored name stays relative.
        let opts = format!("data_file=ext.bin,data_file_raw={raw_flag}");
        let out = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "ext.qcow2",
                "8M",
            ])
            .current_dir(&d.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        apply(
            "qcow2",
            &img,
            &mut rng,
            &[Op::Data(0, 3 * MIB), Op::Data(6 * MIB + 5, 4000)],
        );
        apply(
            "qcow2",
            &img,
            &mut rng,
            &[Op::Zero(MIB, 256 * KIB), Op::ZeroUnmap(2 * MIB, 64 * KIB)],
        );
        // Stale bytes in the data file under the zero clusters must not show.
        let bin = d.path("ext.bin");
        let data = std::fs::read(&bin).unwrap();
        assert!(
            data[MIB as usize..MIB as usize + 4096]
                .iter()
                .any(|&b| b != 0)
                || raw_flag == "on"
        );
        let layer = vmfs_mount::format::open_detect(&img, None, &ctx()).unwrap();
        assert_eq!(layer.files().len(), 2);
        assert!(layer.details().iter().any(|(k, _)| k == "data file"));
        assert_eq!(check_all_views(&img), 1);
    }
}

#[test]
fn map_returns_long_extents() {
    let d = Scratch::new("q2-map");
    let img = d.path("m.qcow2");
    let mut rng = Rng::new(15);
    create(&img, "", 64 * MIB);
    apply(
        "qcow2",
        &img,
        &mut rng,
        &[Op::Data(MIB, 4 * MIB), Op::Zero(10 * MIB, 2 * MIB)],
    );
    let layer: Arc<dyn Layer> = vmfs_mount::format::open_detect(&img, None, &ctx()).unwrap();
    let e = layer.map(0, 64 * MIB).unwrap();
    assert!(
        matches!(e.map, Mapping::Unallocated) && e.len == MIB,
        "{e:?}"
    );
    let e = layer.map(MIB + 512, 63 * MIB).unwrap();
    assert!(
        matches!(e.map, Mapping::Data { .. }) && e.len == 4 * MIB - 512,
        "{e:?}"
    );
    let e = layer.map(10 * MIB, 54 * MIB).unwrap();
    assert!(matches!(e.map, Mapping::Zero) && e.len == 2 * MIB, "{e:?}");
    let e = layer.map(12 * MIB, 52 * MIB).unwrap();
    assert!(
        matches!(e.map, Mapping::Unallocated) && e.len == 52 * MIB,
        "{e:?}"
    );
}

#[test]
fn backing_without_a_format_is_probed() {
    let d = Scratch::new("q2-nofmt");
    let (base, top) = (d.path("base.qcow2"), d.path("top.qcow2"));
    let mut rng = Rng::new(16);
    create(&base, "", 2 * MIB);
    apply("qcow2", &base, &mut rng, &[Op::Data(0, 2 * MIB)]);
    overlay(&top, "base.qcow2", "qcow2", None, "");
    apply("qcow2", &top, &mut rng, &[Op::Data(MIB + 3, 5000)]);
    // Turn the backing format extension into an unknown one (kept, ignored).
    let (ext, _) = find_ext(&top, 0xe279_2aca).expect("qemu-img writes a backing format");
    patch(&top, ext, &0x1234_5678u32.to_be_bytes());
    let layer = vmfs_mount::format::open_detect(&top, None, &ctx()).unwrap();
    assert!(matches!(
        layer.parent(),
        vmfs_mount::format::ParentRef::Path { format: None, .. }
    ));
    assert_eq!(check_all_views(&top), 2);
}
