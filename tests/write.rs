//! Writes and discards through View::write/discard against an in-memory model, then
//! `qemu-img check` must be clean and `qemu-img convert` must equal the model; backing files
//! and internal snapshots must be unchanged.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::format::OpenCtx;
use vmfs_mount::view::View;

/// Whether `qemu-img map` reports guest offset `off` as compressed.
fn is_compressed(image: &Path, off: u64) -> bool {
    let out = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
    ]);
    out.lines().any(|l| {
        let start = l
            .split("\"start\": ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse::<u64>().ok());
        let len = l
            .split("\"length\": ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse::<u64>().ok());
        matches!((start, len), (Some(s), Some(n)) if s <= off && off < s + n)
            && l.contains("\"compressed\": true")
    })
}

/// The library's view of internal snapshot `name` of `image`.
fn snapshot_view(image: &Path, name: &str) -> View {
    let mut layers = vmfs_mount::chain::open_chain(image, None, &ctx()).unwrap();
    let info = layers[0]
        .snapshots()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap();
    layers[0] = layers[0].open_snapshot(info.index).unwrap();
    View::new(
        layers,
        info.virtual_size,
        Arc::new(ByteCache::new(8 << 20)),
        4096,
    )
}

/// `qemu-img check` must find neither corruption nor leaks.
fn check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors"),
        "qemu-img check {}: {text}",
        image.display()
    );
}

fn sha(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Random writes and discards of every shape, applied to the view and the model.
fn workload(view: &View, model: &mut [u8], rng: &mut Rng, ops: usize, cs: u64) {
    let size = model.len() as u64;
    // The first and the last byte, then a run over the end of the disk.
    for (off, len) in [
        (0, 1),
        (size - 1, 1),
        (size - 3 * cs / 2, 3 * cs / 2),
        (size / 2 + 7, 9),
        // Inside the compressed cluster and the zero clusters the test images have.
        (4 * cs + 100, 200),
        (6 * cs + 10, 50),
    ] {
        let data = rng.bytes(len as usize);
        view.write(off, &data).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    for _ in 0..ops {
        let aligned = rng.below(3) == 0;
        let mut off = rng.below(size);
        if aligned {
            off = off / cs * cs;
        }
        let max = (size - off).min(4 * cs);
        let len = match rng.below(4) {
            0 => 1 + rng.below(600),
            1 if max >= cs => cs,
            _ => 1 + rng.below(max),
        }
        .min(max);
        if rng.below(5) == 0 {
            view.discard(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = rng.bytes(len as usize);
            view.write(off, &data).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if rng.below(16) == 0 {
            view.flush().unwrap();
        }
    }
    view.flush().unwrap();
}

struct Case {
    name: &'static str,
    opts: &'static str,
    cs: u64,
    size: u64,
    backing: bool,
    snapshot: bool,
    ops: usize,
}

fn run_case(c: &Case, seed: u64) {
    let s = Scratch::new(&format!("write-{}", c.name));
    let mut rng = Rng::new(seed);
    let top = s.path("top.qcow2");
    let base = s.path("base.raw");
    let mut args: Vec<String> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        c.opts.into(),
    ];
    if c.backing {
        // A shorter backing file: reads past its end are zeros.
        std::fs::write(&base, rng.bytes((c.size - c.size / 5) as usize)).unwrap();
        args.extend(["-b".into(), "base.raw".into(), "-F".into(), "raw".into()]);
    }
    args.extend([top.to_str().unwrap().to_string(), c.size.to_string()]);
    qemu_img(&args.iter().map(|a| a.as_str()).collect::<Vec<_>>());
    // Some data, a compressed cluster, zero clusters, then (optionally) a snapshot that
    // shares all of it, then more data on top.
    write_random("qcow2", &top, &mut rng, 0, (3 * c.cs) as usize);
    write_random(
        "qcow2",
        &top,
        &mut rng,
        c.size / 2 + 100,
        (2 * c.cs) as usize,
    );
    let pat = s.path("pat");
    // Seeded but low-entropy bytes: QEMU stores a cluster compressed only if it shrinks.
    let low: Vec<u8> = rng.bytes(c.cs as usize).iter().map(|b| b & 7).collect();
    std::fs::write(&pat, low).unwrap();
    qemu_io(
        "qcow2",
        &top,
        &[format!(
            "write -c -s {} {} {}",
            pat.display(),
            4 * c.cs,
            c.cs
        )],
    );
    if c.opts.contains("compat=1.1") || !c.opts.contains("compat=0.10") {
        qemu_io(
            "qcow2",
            &top,
            &[format!("write -z {} {}", 6 * c.cs, 2 * c.cs)],
        );
    }
    assert!(
        is_compressed(&top, 4 * c.cs),
        "the test image has no compressed cluster"
    );
    let mut snap = None;
    if c.snapshot {
        qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
        snap = Some(qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]));
        write_random("qcow2", &top, &mut rng, c.cs / 2, (2 * c.cs) as usize);
    }
    let base_before = c.backing.then(|| sha(&base));
    let mut model = qemu_raw(&top, Some("qcow2"), &[]);
    {
        let view = open_rw(&top);
        assert_same("before", &read_all(&view), &model);
        workload(&view, &mut model, &mut rng, c.ops, c.cs);
        assert_same("through the view", &read_all(&view), &model);
    }
    check_clean(&top);
    assert_same(
        "qemu-img convert",
        &qemu_raw(&top, Some("qcow2"), &[]),
        &model,
    );
    assert_same("reopened", &read_all(&open_view(&top).unwrap()), &model);
    if let Some(before) = snap {
        assert_same(
            "snapshot s1",
            &qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]),
            &before,
        );
        assert_same(
            "snapshot s1 through the library",
            &read_all(&snapshot_view(&top, "s1")),
            &before,
        );
    }
    if let Some(before) = base_before {
        assert!(sha(&base) == before, "backing file changed");
    }
}

#[test]
fn v3_over_backing_with_snapshot() {
    let c = Case {
        name: "v3",
        opts: "compat=1.1,cluster_size=65536",
        cs: 65536,
        size: (5 << 20) + 1536,
        backing: true,
        snapshot: true,
        ops: 300,
    };
    run_case(&c, 1);
}

#[test]
fn v2_over_backing_with_snapshot() {
    let c = Case {
        name: "v2",
        opts: "compat=0.10,cluster_size=4096",
        cs: 4096,
        size: (2 << 20) + 512,
        backing: true,
        snapshot: true,
        ops: 300,
    };
    run_case(&c, 2);
}

#[test]
fn v2_without_backing() {
    let c = Case {
        name: "v2nb",
        opts: "compat=0.10,cluster_size=4096",
        cs: 4096,
        size: 1 << 20,
        backing: false,
        snapshot: false,
        ops: 200,
    };
    run_case(&c, 3);
}

#[test]
fn extended_l2_over_backing_with_snapshot() {
    let c = Case {
        name: "extl2",
        opts: "compat=1.1,extended_l2=on,cluster_size=65536",
        cs: 65536,
        size: (4 << 20) + 3 * 512,
        backing: true,
        snapshot: true,
        ops: 400,
    };
    run_case(&c, 4);
}

#[test]
fn extended_l2_small_clusters_without_backing() {
    let c = Case {
        name: "extl2s",
        opts: "compat=1.1,extended_l2=on,cluster_size=16384,refcount_bits=8",
        cs: 16384,
        size: 2 << 20,
        backing: false,
        snapshot: false,
        ops: 300,
    };
    run_case(&c, 5);
}

#[test]
fn refcount_widths() {
    for (i, bits) in [1u32, 4, 16, 64].into_iter().enumerate() {
        let opts =
            Box::leak(format!("compat=1.1,cluster_size=512,refcount_bits={bits}").into_boxed_str());
        let c = Case {
            name: Box::leak(format!("rc{bits}").into_boxed_str()),
            opts,
            cs: 512,
            size: 1 << 20,
            backing: bits != 1,
            snapshot: bits >= 16,
            ops: 60,
        };
        run_case(&c, 10 + i as u64);
    }
}

#[test]
fn refcount_table_grows_under_sequential_writes() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB with 16-bit refcounts, 2 MiB
    // with 64-bit ones.
    for (bits, mib) in [(16, 10), (64, 3)] {
        grow(bits, mib);
    }
}

fn grow(bits: u32, mib: usize) {
    let s = Scratch::new(&format!("write-grow{bits}"));
    let top = s.path("top.qcow2");
    let opts = format!("cluster_size=512,refcount_bits={bits}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        top.to_str().unwrap(),
        &format!("{mib}M"),
    ]);
    let before = std::fs::read(&top).unwrap()[48..60].to_vec();
    let mut rng = Rng::new(77);
    let mut model = vec![0u8; mib << 20];
    {
        let view = open_rw(&top);
        for off in (0..model.len()).step_by(1 << 20) {
            let data = rng.bytes(1 << 20);
            view.write(off as u64, &data).unwrap();
            model[off..off + data.len()].copy_from_slice(&data);
        }
        view.flush().unwrap();
    }
    let after = std::fs::read(&top).unwrap()[48..60].to_vec();
    assert_ne!(before, after, "refcount table did not move");
    assert!(
        u32::from_be_bytes(after[8..12].try_into().unwrap()) > 1,
        "refcount table did not grow"
    );
    check_clean(&top);
    assert_same("convert", &qemu_raw(&top, Some("qcow2"), &[]), &model);
}

#[test]
fn external_raw_data_file() {
    let s = Scratch::new("write-datafile");
    let top = s.path("top.qcow2");
    let data = s.path("top.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!(
            "data_file={},data_file_raw=on,extended_l2=on",
            data.display()
        ),
        top.to_str().unwrap(),
        "3M",
    ]);
    let mut rng = Rng::new(9);
    write_random("qcow2", &top, &mut rng, 70000, 100000);
    let mut model = qemu_raw(&top, Some("qcow2"), &[]);
    {
        let view = open_rw(&top);
        workload(&view, &mut model, &mut rng, 200, 65536);
    }
    check_clean(&top);
    assert_same("convert", &qemu_raw(&top, Some("qcow2"), &[]), &model);
    // A raw data file reads as the disk on its own.
    assert_same(
        "data file",
        &std::fs::read(&data).unwrap()[..model.len()],
        &model,
    );
}

#[test]
fn raw_top_image_written_in_place() {
    let s = Scratch::new("write-raw");
    let img = s.path("disk.raw");
    let mut rng = Rng::new(11);
    let mut model = rng.bytes((3 << 20) + 777);
    std::fs::write(&img, &model).unwrap();
    {
        let view = open_rw(&img);
        workload(&view, &mut model, &mut rng, 200, 4096);
    }
    assert_same("raw", &std::fs::read(&img).unwrap(), &model);
}

#[test]
fn read_only_views_refuse_writes() {
    let s = Scratch::new("write-ro");
    let top = s.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "1M"]);
    let view = open_view(&top).unwrap();
    let e = view.write(0, &[1]).unwrap_err();
    assert_eq!(e.kind(), vmfs_mount::error::Kind::ReadOnly);
    // Dirty (lazy refcounts) and corrupt images open, but never for writing.
    for bit in [1u64, 2] {
        let mut bytes = std::fs::read(&top).unwrap();
        bytes[72..80].copy_from_slice(&bit.to_be_bytes());
        std::fs::write(&top, &bytes).unwrap();
        let view = open_rw(&top);
        assert!(!view.is_writable(), "incompatible bit {bit}");
        assert_eq!(
            view.write(0, &[1]).unwrap_err().kind(),
            vmfs_mount::error::Kind::ReadOnly
        );
    }
}

#[test]
fn hostile_l2_entry_pointing_at_metadata_is_refused() {
    let s = Scratch::new("write-hostile");
    let top = s.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "1M"]);
    let mut rng = Rng::new(5);
    write_random("qcow2", &top, &mut rng, 0, 4096);
    // Point guest cluster 0 at the header cluster (offset 0 | COPIED).
    let mut bytes = std::fs::read(&top).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    bytes[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | (l1 as u64)).to_be_bytes());
    std::fs::write(&top, &bytes).unwrap();
    let header_before = bytes[..4096].to_vec();
    let view = open_rw(&top);
    let e = view.write(10, &[1, 2, 3]).unwrap_err();
    assert_eq!(e.kind(), vmfs_mount::error::Kind::Corrupt, "{e}");
    // Later writes are refused too (latched), reads go on.
    assert_eq!(
        view.write(200_000, &[1]).unwrap_err().kind(),
        vmfs_mount::error::Kind::Failed
    );
    let mut b = [0u8; 16];
    view.read(500_000, &mut b).unwrap();
    drop(view);
    assert_eq!(&std::fs::read(&top).unwrap()[..4096], &header_before[..]);
}

#[test]
fn external_data_file_over_backing() {
    let s = Scratch::new("write-datafile-backing");
    let base = s.path("base.raw");
    let top = s.path("top.qcow2");
    let data = s.path("top.data");
    let mut rng = Rng::new(21);
    std::fs::write(&base, rng.bytes(2 << 20)).unwrap();
    let opts = format!("data_file={},cluster_size=4096", data.display());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
        "2M",
    ]);
    write_random("qcow2", &top, &mut rng, 5000, 20000);
    qemu_io("qcow2", &top, &["write -z 65536 8192".to_string()]);
    let mut model = qemu_raw(&top, Some("qcow2"), &[]);
    {
        let view = open_rw(&top);
        workload(&view, &mut model, &mut rng, 200, 4096);
    }
    check_clean(&top);
    assert_same("convert", &qemu_raw(&top, Some("qcow2"), &[]), &model);
}

#[test]
fn hostile_refcount_structures_fail_cleanly() {
    let s = Scratch::new("write-hostile-rc");
    let top = s.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "1M"]);
    let good = std::fs::read(&top).unwrap();
    let reftable = u64::from_be_bytes(good[48..56].try_into().unwrap()) as usize;
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(1 << 20)), true);
    // An unaligned refcount block offset: refused when the image is opened for writing.
    let mut bad = good.clone();
    bad[reftable..reftable + 8].copy_from_slice(&0x10200u64.to_be_bytes());
    std::fs::write(&top, &bad).unwrap();
    let e = vmfs_mount::chain::open_chain(&top, None, &ctx).unwrap_err();
    assert_eq!(e.kind(), vmfs_mount::error::Kind::Corrupt, "{e}");
    // A refcount block past the end of the file: the first allocation fails, nothing is
    // written, later writes are refused.
    let mut bad = good.clone();
    bad[reftable..reftable + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&top, &bad).unwrap();
    let view = open_rw(&top);
    let e = view.write(0, &[1; 100]).unwrap_err();
    assert_eq!(e.kind(), vmfs_mount::error::Kind::Corrupt, "{e}");
    assert!(e.to_string().contains("refcount block"), "{e}");
    assert_eq!(
        view.write(0, &[1]).unwrap_err().kind(),
        vmfs_mount::error::Kind::Failed
    );
    drop(view);
    assert!(
        std::fs::read(&top).unwrap() == bad,
        "a failed allocation wrote to the image"
    );
}

#[test]
fn hostile_copied_flag_on_a_shared_l2_table_does_not_change_the_snapshot() {
    let s = Scratch::new("write-hostile-copied");
    let top = s.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "1M"]);
    let mut rng = Rng::new(31);
    write_random("qcow2", &top, &mut rng, 0, 200_000);
    qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
    let snap = qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]);
    // Claim that the active L1 entry owns its (shared) L2 table.
    let mut bytes = std::fs::read(&top).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    bytes[l1] |= 0x80;
    std::fs::write(&top, &bytes).unwrap();
    let mut model = snap.clone();
    {
        let view = open_rw(&top);
        let data = rng.bytes(70_000);
        view.write(1000, &data).unwrap();
        model[1000..71_000].copy_from_slice(&data);
        view.flush().unwrap();
    }
    assert_same(
        "snapshot s1",
        &qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]),
        &snap,
    );
    assert_same("live", &qemu_raw(&top, Some("qcow2"), &[]), &model);
}
