//! Real chains mounted through the built binary: every exposed file (disk.raw and each
//! snapshots/<name>/disk.raw) must read as `qemu-img convert -O raw` of that view, with the
//! names, sizes, modes and times the mount promises. Needs /dev/fuse, qemu-img and qemu-io.

mod common;
mod mount_support;

use common::*;
use mount_support::*;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::SystemTime;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
const CLUSTER: u64 = 64 * K;

fn create(fmt: &str, image: &Path, size: &str) {
    create_with(fmt, "", image, size);
}

/// `opts`: qemu-img create -o options ("" for none).
fn create_with(fmt: &str, opts: &str, image: &Path, size: &str) {
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([image.to_str().unwrap(), size]);
    qemu_img(&args);
}

/// Creates `image` over `backing` (named relative to it: both live in one directory).
fn create_over(fmt: &str, image: &Path, backing: &Path, backing_fmt: &str, size: Option<&str>) {
    create_over_with(fmt, "", image, backing, backing_fmt, size);
}

fn create_over_with(
    fmt: &str,
    opts: &str,
    image: &Path,
    backing: &Path,
    backing_fmt: &str,
    size: Option<&str>,
) {
    let name = backing.file_name().unwrap().to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", fmt, "-b", name, "-F", backing_fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(image.to_str().unwrap());
    args.extend(size);
    qemu_img(&args);
}

/// Writes zeros through qemu-io's write -z (`unmap`: -u, may deallocate).
fn zero(fmt: &str, image: &Path, off: u64, len: u64, unmap: bool) {
    let u = if unmap { "-u " } else { "" };
    qemu_io(fmt, image, &[format!("write -z {u}{off} {len}")]);
}

fn snapshot(image: &Path, tag: &str) {
    qemu_img(&["snapshot", "-c", tag, image.to_str().unwrap()]);
}

fn virtual_size(image: &Path) -> u64 {
    let json = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    // The image's own size comes after its children's (the protocol layer's) in the output.
    let at = json.rfind("\"virtual-size\"").unwrap();
    json_u64(&json[at..], "virtual-size").unwrap()
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn views(list: Vec<(&str, Vec<u8>)>) -> BTreeMap<String, Vec<u8>> {
    list.into_iter().map(|(n, b)| (n.to_string(), b)).collect()
}

#[test]
fn qcow2_chain_with_internal_snapshots_shows_every_view() {
    let s = Scratch::new("mv-chain");
    let (base, mid, top) = (
        s.path("base.qcow2"),
        s.path("mid.qcow2"),
        s.path("top.qcow2"),
    );
    let mut rng = Rng::new(101);

    // base: s1 at 3 MiB, then grown to 4 MiB before nightly/2024, then changed again.
    create("qcow2", &base, "3M");
    write_random("qcow2", &base, &mut rng, 0, 256 * K as usize);
    write_random("qcow2", &base, &mut rng, M + 4096, 300_000);
    write_random("qcow2", &base, &mut rng, 2 * M + 3584, 600_000);
    zero("qcow2", &base, M + 64 * K, 128 * K, false);
    snapshot(&base, "s1");
    qemu_img(&["resize", "-q", base.to_str().unwrap(), "4M"]);
    write_random("qcow2", &base, &mut rng, 2 * M + 512 * K, M as usize);
    zero("qcow2", &base, 64 * K, 128 * K, true);
    snapshot(&base, "nightly/2024");
    write_random("qcow2", &base, &mut rng, 3 * M + 512 * K + 100, 200_000);
    zero("qcow2", &base, 0, 32 * K, false);

    create_over("qcow2", &mid, &base, "qcow2", None);
    write_random("qcow2", &mid, &mut rng, 512 * K, 700_000);
    zero("qcow2", &mid, M + 8192, 192 * K, false);
    // A snapshot of a middle layer reads through the layers below it.
    snapshot(&mid, "pre");
    zero("qcow2", &mid, 2 * M + 512 * K, 128 * K, true);
    write_random("qcow2", &mid, &mut rng, 3 * M + 100, 5000);

    // top is larger than mid: its tail reads as zeros below it.
    create_over("qcow2", &top, &mid, "qcow2", Some("5M"));
    write_random("qcow2", &top, &mut rng, 4 * M - 4096, 8192);
    write_random("qcow2", &top, &mut rng, 100 * K, 50_000);
    snapshot(&top, "before upgrade");
    write_random("qcow2", &top, &mut rng, 0, 64 * K as usize);
    zero("qcow2", &top, 512 * K, 128 * K, true);
    write_random("qcow2", &top, &mut rng, 4 * M + 512 * K, 300_000);

    let live = qemu_raw(&top, Some("qcow2"), &[]);
    let want = views(vec![
        ("mid", qemu_raw(&mid, Some("qcow2"), &[])),
        ("mid@pre", snapshot_oracle(&mid, "qcow2", "pre")),
        ("base", qemu_raw(&base, Some("qcow2"), &[])),
        ("base@s1", snapshot_oracle(&base, "qcow2", "s1")),
        (
            "base@nightly_2024",
            snapshot_oracle(&base, "qcow2", "nightly/2024"),
        ),
        (
            "before upgrade",
            snapshot_oracle(&top, "qcow2", "before upgrade"),
        ),
    ]);
    assert_eq!(live.len() as u64, 5 * M);
    assert_eq!(want["base@s1"].len() as u64, 3 * M, "oracle of s1");
    assert_eq!(want["mid"].len() as u64, 4 * M);
    let base_dates = snapshot_dates(&base);
    let mid_dates = snapshot_dates(&mid);
    let top_dates = snapshot_dates(&top);
    let lower = capture_files(&[&base, &mid]);
    let top_mtime = mtime(&top);

    // Read-write (the default): snapshot files must still refuse writes.
    let (guard, mnt) = mount(&top, &s.0, &[]);
    assert_mount_shows(&mnt, &live, &want);

    let snap_file = |name: &str| mnt.join("snapshots").join(name).join("disk.raw");
    let file_mtime = |p: &Path| mtime(p);
    assert_eq!(file_mtime(&mnt.join("disk.raw")), top_mtime, "live mtime");
    assert_eq!(file_mtime(&snap_file("mid")), mtime(&mid), "mid mtime");
    assert_eq!(file_mtime(&snap_file("base")), mtime(&base), "base mtime");
    assert_eq!(file_mtime(&snap_file("mid@pre")), mid_dates["pre"]);
    assert_eq!(file_mtime(&snap_file("base@s1")), base_dates["s1"]);
    assert_eq!(
        file_mtime(&snap_file("base@nightly_2024")),
        base_dates["nightly/2024"]
    );
    assert_eq!(
        file_mtime(&snap_file("before upgrade")),
        top_dates["before upgrade"]
    );
    for (name, bytes) in &want {
        assert_refuses_writes(&snap_file(name), bytes);
    }

    drop(guard);
    assert!(!is_mounted(&mnt));
    assert_files_unchanged(&lower);
}

/// Per-cluster "holds data" of a chain, from `qemu-img map` (zero and unallocated are holes).
fn qemu_data_map(image: &Path, clusters: usize) -> Vec<bool> {
    let json = qemu_img(&["map", "--output=json", image.to_str().unwrap()]);
    let mut data = vec![false; clusters];
    for obj in json.split('{').skip(1) {
        let start = json_u64(obj, "start").unwrap();
        let len = json_u64(obj, "length").unwrap();
        if json_bool(obj, "data").unwrap() {
            assert!(
                start.is_multiple_of(CLUSTER) && len.is_multiple_of(CLUSTER),
                "{obj}"
            );
            for c in start / CLUSTER..(start + len) / CLUSTER {
                data[c as usize] = true;
            }
        }
    }
    data
}

/// Checks SEEK_DATA and SEEK_HOLE at, inside and at the end of every cluster of `file`.
fn assert_seeks_follow(file: &Path, data: &[bool]) {
    let f = File::open(file).unwrap();
    let size = data.len() as u64 * CLUSTER;
    let first = |from: usize, want: bool| (from..data.len()).find(|&c| data[c] == want);
    for c in 0..data.len() {
        for off in [
            c as u64 * CLUSTER,
            c as u64 * CLUSTER + 777,
            (c as u64 + 1) * CLUSTER - 1,
        ] {
            let want_data = match first(c, true) {
                Some(k) if k == c => Ok(off),
                Some(k) => Ok(k as u64 * CLUSTER),
                None => Err(libc::ENXIO),
            };
            let want_hole = match first(c, false) {
                Some(k) if k == c => off,
                Some(k) => k as u64 * CLUSTER,
                None => size,
            };
            let what = format!("{} at {off:#x}", file.display());
            assert_eq!(
                seek(&f, off, libc::SEEK_DATA),
                want_data,
                "SEEK_DATA {what}"
            );
            assert_eq!(
                seek(&f, off, libc::SEEK_HOLE),
                Ok(want_hole),
                "SEEK_HOLE {what}"
            );
        }
    }
    assert_eq!(seek(&f, size, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(&f, size, libc::SEEK_HOLE), Err(libc::ENXIO));
}

#[test]
fn sparse_qcow2_seeks_blocks_and_sparse_copies_follow_the_data() {
    let s = Scratch::new("mv-sparse");
    let (base, top) = (s.path("base.qcow2"), s.path("top.qcow2"));
    const CLUSTERS: usize = 128;
    let mut rng = Rng::new(202);
    let base_data = [2, 3, 4, 10, 20, 21, 22, 23, 40, 63, 100, 127];
    let base_zero = [30, 31];
    // Cluster 45 gets a partial write: the whole cluster is allocated, mostly zeros.
    let top_data = [0, 5, 6, 41, 45, 50, 51, 99];
    let top_zero = [3, 21, 100, 60];

    create("qcow2", &base, "8M");
    for c in base_data {
        write_random("qcow2", &base, &mut rng, c * CLUSTER, CLUSTER as usize);
    }
    for c in base_zero {
        zero("qcow2", &base, c * CLUSTER, CLUSTER, false);
    }
    create_over("qcow2", &top, &base, "qcow2", None);
    for c in top_data {
        let (off, len) = if c == 45 { (1000, 4096) } else { (0, CLUSTER) };
        write_random("qcow2", &top, &mut rng, c * CLUSTER + off, len as usize);
    }
    for c in top_zero {
        zero("qcow2", &top, c * CLUSTER, CLUSTER, c % 2 == 0);
    }

    let mut base_model = vec![false; CLUSTERS];
    base_data
        .iter()
        .for_each(|&c| base_model[c as usize] = true);
    let mut live_model = base_model.clone();
    top_zero
        .iter()
        .for_each(|&c| live_model[c as usize] = false);
    top_data.iter().for_each(|&c| live_model[c as usize] = true);
    // The model is what QEMU itself reports, so the seeks below test the mount, not the model.
    assert_eq!(qemu_data_map(&top, CLUSTERS), live_model, "live model");
    assert_eq!(qemu_data_map(&base, CLUSTERS), base_model, "base model");

    let live = qemu_raw(&top, Some("qcow2"), &[]);
    let base_raw = qemu_raw(&base, Some("qcow2"), &[]);
    let (_guard, mnt) = mount(&top, &s.0, &["-r"]);
    assert_mount_shows(&mnt, &live, &views(vec![("base", base_raw.clone())]));
    let disk = mnt.join("disk.raw");
    let base_disk = mnt.join("snapshots/base/disk.raw");
    assert_seeks_follow(&disk, &live_model);
    assert_seeks_follow(&base_disk, &base_model);

    for (file, model) in [(&disk, &live_model), (&base_disk, &base_model)] {
        let allocated = model.iter().filter(|d| **d).count() as u64 * CLUSTER;
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!(
            meta.blocks() * 512,
            allocated,
            "st_blocks of {}",
            file.display()
        );
        assert!(allocated * 4 < meta.len());
    }

    let copy = s.path("copy.raw");
    run(
        "cp",
        &[
            "--sparse=always",
            disk.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    );
    assert_same("sparse copy", &std::fs::read(&copy).unwrap(), &live);
    let copied = std::fs::metadata(&copy).unwrap().blocks() * 512;
    let allocated = live_model.iter().filter(|d| **d).count() as u64 * CLUSTER;
    assert!(
        copied <= allocated + CLUSTER,
        "the copy holds {copied} bytes for {allocated} bytes of data"
    );
}

/// Base extensions as the tools name them.
fn ext_of(fmt: &str) -> &str {
    match fmt {
        "vpc" => "vhd",
        f => f,
    }
}

/// A format and its qemu-img create -o options ("" for the defaults).
type Fmt<'a> = (&'a str, &'a str);

/// A `top_fmt` image over a `base_fmt` base, both with random data and zeroed ranges,
/// mounted read-only: disk.raw and snapshots/base/disk.raw must match QEMU.
fn check_overlay(name: &str, (base_fmt, base_opts): Fmt, (top_fmt, top_opts): Fmt, seed: u64) {
    let s = Scratch::new(name);
    let base = s.path(&format!("base.{}", ext_of(base_fmt)));
    let top = s.path(&format!("top.{}", ext_of(top_fmt)));
    let mut rng = Rng::new(seed);

    create_with(base_fmt, base_opts, &base, "6M");
    let size = virtual_size(&base);
    assert!(size > 5 * M, "{base_fmt} base of {size} bytes");
    write_random(base_fmt, &base, &mut rng, 0, 100_000);
    write_random(base_fmt, &base, &mut rng, M + 333, 700_000);
    write_random(base_fmt, &base, &mut rng, 4 * M + 4096, 64 * K as usize);
    write_random(base_fmt, &base, &mut rng, size - 5000, 5000);
    zero(base_fmt, &base, M + 200 * K, 64 * K, false);

    create_over_with(top_fmt, top_opts, &top, &base, base_fmt, None);
    assert_eq!(virtual_size(&top), size);
    write_random(top_fmt, &top, &mut rng, 64 * K + 100, 200_000);
    write_random(top_fmt, &top, &mut rng, 3 * M, 512 * K as usize);
    write_random(top_fmt, &top, &mut rng, size - 3000, 3000);
    zero(top_fmt, &top, M + 400 * K, 128 * K, false);

    let live = qemu_raw(&top, Some(top_fmt), &[]);
    let base_raw = qemu_raw(&base, Some(base_fmt), &[]);
    let (_guard, mnt) = mount(&top, &s.0, &["-r"]);
    assert_mount_shows(&mnt, &live, &views(vec![("base", base_raw)]));
}

#[test]
fn vmdk_delta_over_vmdk_base() {
    check_overlay("mv-vmdk-vmdk", ("vmdk", ""), ("vmdk", ""), 301);
}

#[test]
fn qcow2_over_vmdk_base() {
    check_overlay("mv-qcow2-vmdk", ("vmdk", ""), ("qcow2", ""), 302);
}

#[test]
fn qcow2_over_vpc_base() {
    check_overlay("mv-qcow2-vpc", ("vpc", ""), ("qcow2", ""), 303);
}

#[test]
fn qcow2_over_vhdx_base() {
    check_overlay("mv-qcow2-vhdx", ("vhdx", ""), ("qcow2", ""), 304);
}

#[test]
fn qcow2_with_subclusters_over_a_vhdx_base_with_small_blocks() {
    check_overlay(
        "mv-qcow2x-vhdx1m",
        ("vhdx", "block_size=1M"),
        ("qcow2", "extended_l2=on,cluster_size=128k"),
        307,
    );
}

#[test]
fn qcow2_over_vdi_base() {
    check_overlay("mv-qcow2-vdi", ("vdi", ""), ("qcow2", ""), 305);
}

#[test]
fn qcow2_over_a_shorter_raw_base_reads_zeros_past_its_end() {
    let s = Scratch::new("mv-short-raw");
    let (base, top) = (s.path("base.raw"), s.path("top.qcow2"));
    let mut rng = Rng::new(306);
    // Ends inside a cluster that the overlay leaves unallocated.
    let base_len = 3 * M + 1536;
    std::fs::write(&base, rng.bytes(base_len as usize)).unwrap();
    create_over("qcow2", &top, &base, "raw", Some("5M"));
    write_random("qcow2", &top, &mut rng, 100 * K, 300_000);
    write_random("qcow2", &top, &mut rng, 4 * M + 100, 64 * K as usize);
    zero("qcow2", &top, 2 * M, 128 * K, false);

    let live = qemu_raw(&top, Some("qcow2"), &[]);
    assert_eq!(live.len() as u64, 5 * M);
    assert!(
        live[base_len as usize..4 * M as usize]
            .iter()
            .all(|b| *b == 0)
    );
    let base_raw = std::fs::read(&base).unwrap();
    let (_guard, mnt) = mount(&top, &s.0, &["-r"]);
    assert_mount_shows(&mnt, &live, &views(vec![("base", base_raw)]));
}

/// Writes seeded random bytes compressed (whole clusters) through qemu-io.
fn write_compressed(image: &Path, rng: &mut Rng, off: u64, len: u64) {
    let pat = image.with_extension("cpat");
    std::fs::write(&pat, rng.bytes(len as usize)).unwrap();
    let pat_s = pat.to_str().unwrap();
    qemu_io(
        "qcow2",
        image,
        &[format!("write -c -s {pat_s} {off} {len}")],
    );
    std::fs::remove_file(&pat).unwrap();
}

/// A buffer of `len` bytes aligned to 4 KiB, as O_DIRECT wants.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let skip = storage.as_ptr().align_offset(4096);
    &mut storage[skip..skip + len]
}

#[test]
fn concurrent_direct_and_buffered_readers_see_the_oracle() {
    let s = Scratch::new("mv-concurrent");
    let (base, top) = (s.path("base.qcow2"), s.path("top.qcow2"));
    let mut rng = Rng::new(401);
    create("qcow2", &base, "8M");
    write_random("qcow2", &base, &mut rng, 0, 3 * M as usize + 5000);
    write_compressed(&base, &mut rng, 4 * M, 8 * CLUSTER);
    write_random("qcow2", &base, &mut rng, 6 * M + 777, 900_000);
    create_over("qcow2", &top, &base, "qcow2", None);
    write_random("qcow2", &top, &mut rng, M + 12345, 1_500_000);
    write_random("qcow2", &top, &mut rng, 4 * M + 3 * CLUSTER + 10, 70_000);
    zero("qcow2", &top, 6 * M + 64 * K, 256 * K, true);

    let live = qemu_raw(&top, Some("qcow2"), &[]);
    let base_raw = qemu_raw(&base, Some("qcow2"), &[]);
    let (_guard, mnt) = mount(&top, &s.0, &["-r"]);
    let (live, base_raw) = (&live, &base_raw);
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let (path, want) = if t % 4 == 3 {
                (mnt.join("snapshots/base/disk.raw"), base_raw)
            } else {
                (mnt.join("disk.raw"), live)
            };
            scope.spawn(move || {
                let direct = t % 2 == 0;
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                    .open(&path)
                    .unwrap();
                let mut rng = Rng::new(500 + t);
                let mut storage = Vec::new();
                let size = want.len() as u64;
                for i in 0..150 {
                    let (off, len) = if direct {
                        (
                            rng.below(size / 4096 + 2) * 4096,
                            (1 + rng.below(96)) * 4096,
                        )
                    } else {
                        (rng.below(size + 8192), 1 + rng.below(400_000))
                    };
                    let buf = aligned(&mut storage, len as usize);
                    let n = read_fully_at(&f, buf, off);
                    let lo = off.min(size) as usize;
                    let expect = &want[lo..(off + len).min(size) as usize];
                    assert_eq!(n, expect.len(), "thread {t} read {i}: {len} at {off}");
                    assert!(
                        buf[..n] == *expect,
                        "thread {t} (direct={direct}) read {i}: bytes differ in {off}+{len}"
                    );
                }
            });
        }
    });
}

#[test]
fn read_only_mount_refuses_writes_and_leaves_the_images_alone() {
    let s = Scratch::new("mv-readonly");
    let (base, top) = (s.path("base.qcow2"), s.path("top.qcow2"));
    let mut rng = Rng::new(501);
    create("qcow2", &base, "4M");
    write_random("qcow2", &base, &mut rng, 0, 2 * M as usize + 999);
    create_over("qcow2", &top, &base, "qcow2", None);
    write_random("qcow2", &top, &mut rng, M - 5, 1_000_000);
    snapshot(&top, "snap");
    write_random("qcow2", &top, &mut rng, 3 * M, 500_000);
    zero("qcow2", &top, 0, 128 * K, true);

    let live = qemu_raw(&top, Some("qcow2"), &[]);
    let want = views(vec![
        ("base", qemu_raw(&base, Some("qcow2"), &[])),
        ("snap", snapshot_oracle(&top, "qcow2", "snap")),
    ]);
    let before = capture_files(&[&base, &top]);

    let (guard, mnt) = mount(&top, &s.0, &["--read-only"]);
    let opts = mount_options(&mnt).unwrap();
    assert!(opts.split(',').any(|o| o == "ro"), "mount options {opts}");
    assert_mount_shows(&mnt, &live, &want);
    let disk = mnt.join("disk.raw");
    assert_file(&disk, &live, Some(0o444));
    assert_refuses_writes(&disk, &live);
    for name in want.keys() {
        let file = mnt.join("snapshots").join(name).join("disk.raw");
        assert_refuses_writes(&file, &want[name]);
    }
    drop(guard);
    assert!(!is_mounted(&mnt));
    assert_files_unchanged(&before);
}
