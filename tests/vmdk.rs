//! VMDK images made by qemu-img/qemu-io, read through the library and compared byte for byte
//! with `qemu-img convert -O raw`.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vmfs_mount::error::Kind;
use vmfs_mount::format::Mapping;

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 * 1024;

fn create(img: &Path, opts: &str, size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        opts,
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
}

/// Writes seeded random data at the interesting places of a `size`-byte disk: aligned,
/// unaligned, across grain boundaries, the first and the last byte.
fn scatter_writes(img: &Path, rng: &mut Rng, size: u64) {
    let mut places = vec![
        (0, 1),
        (size - 1, 1),
        (GRAIN, GRAIN as usize),
        (3 * GRAIN - 700, 1400),
        (5 * GRAIN + 17, 3 * GRAIN as usize + 5),
        (size / 2 + 4095, 9000),
        (size - 3 * GRAIN - 1, 2 * GRAIN as usize),
    ];
    for _ in 0..8 {
        let len = 1 + rng.below(3 * GRAIN) as usize;
        places.push((rng.below(size - len as u64), len));
    }
    for (off, len) in places {
        write_random("vmdk", img, rng, off, len);
    }
}

/// The error opening `img` (with its chain) gives.
fn open_err(img: &Path) -> vmfs_mount::error::Error {
    match open_view(img) {
        Ok(_) => panic!("{} opened but should not", img.display()),
        Err(e) => e,
    }
}

fn compare_with_qemu(what: &str, img: &Path) {
    let view = open_view(img).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = qemu_raw(img, None, &[]);
    assert_same(what, &read_all(&view), &want);
}

#[test]
fn monolithic_sparse_matches_qemu() {
    let s = Scratch::new("vmdk-mono");
    let img = s.path("disk.vmdk");
    let size = 40 * MIB + 3 * 512;
    create(&img, "subformat=monolithicSparse", size);
    let mut rng = Rng::new(11);
    scatter_writes(&img, &mut rng, size);
    // Zeros written over data stay data (no zeroed_grain flag).
    qemu_io(
        "vmdk",
        &img,
        &[
            format!("write -z {} {}", GRAIN, GRAIN),
            format!("write -z {} 1000", 5 * GRAIN + 100),
        ],
    );
    compare_with_qemu("monolithicSparse", &img);
    let layers = vmfs_mount::chain::open_chain(&img, None, &ctx()).unwrap();
    // One big write lands in consecutive grains: map answers with one run across them.
    let small = s.path("small.vmdk");
    create(&small, "subformat=monolithicSparse", 4 * MIB);
    let run = 20 * GRAIN;
    write_random("vmdk", &small, &mut rng, 30 * GRAIN, run as usize);
    let one = vmfs_mount::chain::open_chain(&small, None, &ctx()).unwrap();
    let e = one[0].map(30 * GRAIN + 100, run).unwrap();
    assert!(
        matches!(e.map, Mapping::Data { .. }) && e.len == run - 100,
        "{e:?}"
    );
    let e = one[0].map(GRAIN + 1, 40 * GRAIN).unwrap();
    assert!(
        matches!(e.map, Mapping::Unallocated) && e.len == 29 * GRAIN - 1,
        "{e:?}"
    );
    let details = layers[0].details();
    assert!(
        details
            .iter()
            .any(|(k, v)| k == "createType" && v == "monolithicSparse"),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|(k, v)| k == "grain size" && v == "65536"),
        "{details:?}"
    );
}

#[test]
fn zeroed_grains_hide_the_parent() {
    let s = Scratch::new("vmdk-zeroed");
    let base = s.path("base.vmdk");
    let top = s.path("top.vmdk");
    let size = 8 * MIB;
    create(&base, "subformat=monolithicSparse", size);
    let mut rng = Rng::new(12);
    write_random("vmdk", &base, &mut rng, 0, size as usize);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "zeroed_grain=on",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    write_random("vmdk", &top, &mut rng, 3 * GRAIN + 5, 100);
    // Whole grains of zeros become zeroed-grain entries; a partial one is written as data.
    qemu_io(
        "vmdk",
        &top,
        &[
            format!("write -z {} {}", 8 * GRAIN, 4 * GRAIN),
            format!("write -z {} 300", 20 * GRAIN + 7),
        ],
    );
    compare_with_qemu("zeroed grains over a parent", &top);
    let view = open_view(&top).unwrap();
    let mut buf = vec![1u8; 4 * GRAIN as usize];
    view.read(8 * GRAIN, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "zeroed grains must not show the parent"
    );
    let layers = vmfs_mount::chain::open_chain(&top, None, &ctx()).unwrap();
    let e = layers[0].map(8 * GRAIN, 4 * GRAIN).unwrap();
    assert!(
        matches!(e.map, Mapping::Zero) && e.len == 4 * GRAIN,
        "{e:?}"
    );
}

#[test]
fn stream_optimized_matches_qemu_including_appended_grains() {
    let s = Scratch::new("vmdk-stream");
    let raw = s.path("src.raw");
    let img = s.path("stream.vmdk");
    let size = 6 * MIB + 5 * 512; // the last grain is short
    let mut rng = Rng::new(13);
    let mut data = rng.bytes(size as usize);
    // Holes (unallocated grains) and a grain of zeros.
    data[GRAIN as usize..3 * GRAIN as usize].fill(0);
    data[(40 * GRAIN) as usize..(60 * GRAIN) as usize].fill(0);
    std::fs::write(&raw, &data).unwrap();
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
    compare_with_qemu("streamOptimized", &img);
    // qemu-io appends compressed grains (whole grains only) to unallocated places.
    write_random("vmdk", &img, &mut rng, 41 * GRAIN, 2 * GRAIN as usize);
    write_random("vmdk", &img, &mut rng, 59 * GRAIN, GRAIN as usize);
    compare_with_qemu("streamOptimized with appended grains", &img);
    let layers = vmfs_mount::chain::open_chain(&img, None, &ctx()).unwrap();
    assert!(
        layers[0]
            .details()
            .iter()
            .any(|(k, v)| k == "createType" && v == "streamOptimized")
    );
}

#[test]
fn stream_optimized_with_gd_at_end() {
    // ESXi exports put the GD at the end and say so in the header: rewrite a qemu-made image
    // into that layout (footer marker, footer, end-of-stream marker).
    let s = Scratch::new("vmdk-gdend");
    let raw = s.path("src.raw");
    let img = s.path("stream.vmdk");
    let mut rng = Rng::new(14);
    let mut data = rng.bytes(2 * MIB as usize);
    data[..GRAIN as usize].fill(0);
    std::fs::write(&raw, &data).unwrap();
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
    let want = qemu_raw(&img, None, &[]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.truncate(bytes.len().div_ceil(512) * 512);
    let header: Vec<u8> = bytes[..512].to_vec();
    bytes[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut marker = vec![0u8; 512];
    marker[0..8].copy_from_slice(&1u64.to_le_bytes());
    marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&marker);
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&img, &bytes).unwrap();
    assert_same("GD_AT_END", &read_all(&open_view(&img).unwrap()), &want);
    assert_same("GD_AT_END (qemu)", &qemu_raw(&img, None, &[]), &want);
    // qemu-io appends a grain after the footer; QEMU then refuses the file ("Invalid
    // footer") and so do we.
    write_random("vmdk", &img, &mut rng, 0, GRAIN as usize);
    let e = open_err(&img);
    assert!(e.to_string().contains("footer marker"), "{e}");
    // A broken footer is refused.
    let n = bytes.len();
    bytes[n - 512 + 12] = 9;
    std::fs::write(&img, &bytes).unwrap();
    let e = open_err(&img);
    assert!(e.to_string().contains("end-of-stream marker"), "{e}");
}

#[test]
fn monolithic_flat_matches_qemu() {
    let s = Scratch::new("vmdk-flat");
    let img = s.path("flat.vmdk");
    let size = 3 * MIB + 512;
    create(&img, "subformat=monolithicFlat", size);
    let mut rng = Rng::new(15);
    scatter_writes(&img, &mut rng, size);
    compare_with_qemu("monolithicFlat", &img);
    // A flat file shorter than its extent reads as zeros past its end, as in QEMU.
    let flat = s.path("flat-flat.vmdk");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&flat)
        .unwrap()
        .set_len(MIB + 100)
        .unwrap();
    compare_with_qemu("short flat file", &img);
}

/// Converts `img` to a sparse raw file and compares the listed regions of it with the view.
fn compare_regions(what: &str, img: &Path, regions: &[(u64, usize)]) {
    let out = img.with_extension("regions.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let raw = std::fs::File::open(&out).unwrap();
    let view = open_view(img).unwrap();
    assert_eq!(view.size(), raw.metadata().unwrap().len(), "{what}: size");
    for &(off, len) in regions {
        let mut want = vec![0u8; len];
        raw.read_exact_at(&mut want, off).unwrap();
        let mut got = vec![0u8; len];
        assert_eq!(view.read(off, &mut got).unwrap(), len);
        assert_same(&format!("{what} at {off:#x}"), &got, &want);
    }
    std::fs::remove_file(&out).unwrap();
}

fn two_gb_case(subformat: &str, seed: u64) {
    let s = Scratch::new(&format!("vmdk-{subformat}"));
    let img = s.path("big.vmdk");
    let size = 2048 * MIB + 64 * MIB;
    create(&img, &format!("subformat={subformat}"), size);
    let mut rng = Rng::new(seed);
    let boundary = 2048 * MIB;
    let writes = [
        (0, 1000),
        (boundary - 3000, 7000),
        (boundary - GRAIN, GRAIN as usize),
        (size - 5000, 5000),
        (777 * MIB + 3, 70_000),
    ];
    for (off, len) in writes {
        write_random("vmdk", &img, &mut rng, off, len);
    }
    let mut regions: Vec<(u64, usize)> = writes
        .iter()
        .map(|&(o, l)| (o.saturating_sub(4096), l + 8192))
        .collect();
    regions.retain(|r| r.0 + r.1 as u64 <= size);
    regions.extend([
        (boundary - 2 * MIB, 4 * MIB as usize),
        (size - 2 * MIB, 2 * MIB as usize),
        (100 * MIB, MIB as usize),
    ]);
    compare_regions(subformat, &img, &regions);
}

#[test]
fn two_gb_max_extent_sparse_matches_qemu() {
    two_gb_case("twoGbMaxExtentSparse", 16);
}

#[test]
fn two_gb_max_extent_flat_matches_qemu() {
    two_gb_case("twoGbMaxExtentFlat", 17);
}

#[test]
fn delta_chain_matches_qemu_and_checks_cids() {
    let s = Scratch::new("vmdk-chain");
    let base = s.path("base.vmdk");
    let mid = s.path("mid.vmdk");
    let top = s.path("top.vmdk");
    let size = 16 * MIB;
    create(&base, "subformat=monolithicSparse", size);
    let mut rng = Rng::new(18);
    scatter_writes(&base, &mut rng, size);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        mid.to_str().unwrap(),
    ]);
    scatter_writes(&mid, &mut rng, size);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "mid.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    scatter_writes(&top, &mut rng, size);
    compare_with_qemu("three-layer chain", &top);
    let layers = vmfs_mount::chain::open_chain(&top, None, &ctx()).unwrap();
    assert_eq!(layers.len(), 3);
    let cid = layers[1].identity().cid.unwrap();
    let parent_cid = layers[0]
        .details()
        .into_iter()
        .find(|(k, _)| k == "parentCID")
        .unwrap()
        .1;
    assert_eq!(parent_cid, format!("{cid:08x}"));

    // Writing to the middle layer gives it a new CID: the top no longer matches.
    write_random("vmdk", &mid, &mut rng, 0, 512);
    let e = vmfs_mount::chain::open_chain(&top, None, &ctx()).unwrap_err();
    assert_eq!(e.kind(), Kind::Corrupt);
    let msg = e.to_string();
    assert!(
        msg.contains("top.vmdk") && msg.contains("mid.vmdk") && msg.contains(&parent_cid),
        "{msg}"
    );
}

#[test]
fn split_sparse_delta_over_a_monolithic_base() {
    let s = Scratch::new("vmdk-splitdelta");
    let base = s.path("base.vmdk");
    let top = s.path("top.vmdk");
    let size = 8 * MIB;
    create(&base, "subformat=monolithicSparse", size);
    let mut rng = Rng::new(19);
    scatter_writes(&base, &mut rng, size);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    scatter_writes(&top, &mut rng, size);
    compare_with_qemu("twoGbMaxExtentSparse delta", &top);
}

#[test]
fn missing_parent_is_named() {
    let s = Scratch::new("vmdk-noparent");
    let base = s.path("base.vmdk");
    let top = s.path("top.vmdk");
    create(&base, "subformat=monolithicSparse", MIB);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    std::fs::remove_file(&base).unwrap();
    let e = open_err(&top);
    assert_eq!(e.kind(), Kind::NotFound);
    assert!(e.to_string().contains("base.vmdk"), "{e}");
}
