//! Damaged and hostile qcow2 images: valid images made by qemu-img, then patched. Each must
//! fail with a clear error naming the file, the field and the offset: no panic, no wrong bytes.

mod common;
mod qcow2_support;

use common::*;
use qcow2_support::*;
use std::path::{Path, PathBuf};
use vmfs_mount::error::{Error, Kind};
use vmfs_mount::format::{self, Format, Layer, OpenCtx};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// A 4 MiB v3 image with data at 0 and 1 MiB and a compressed cluster at 2 MiB.
fn good(d: &Scratch) -> PathBuf {
    let img = d.path("good.qcow2");
    if !img.exists() {
        create(&img, "", 4 * MIB);
        let mut rng = Rng::new(99);
        apply(
            "qcow2",
            &img,
            &mut rng,
            &[Op::Compressed(2 * MIB, 64 * KIB)],
        );
        apply(
            "qcow2",
            &img,
            &mut rng,
            &[Op::Data(0, 64 * KIB), Op::Data(MIB, 64 * KIB)],
        );
    }
    img
}

/// A copy of the good image named `name`.
fn copy(d: &Scratch, name: &str) -> PathBuf {
    let p = d.path(name);
    std::fs::copy(good(d), &p).unwrap();
    p
}

fn open(p: &Path) -> vmfs_mount::error::Result<std::sync::Arc<dyn Layer>> {
    format::open_layer(p, Format::Qcow2, &ctx())
}

/// Opening fails with `kind` and a message holding every piece of `parts`.
fn open_fails(p: &Path, kind: Kind, parts: &[&str]) -> Error {
    let e = open(p).expect_err("open should fail");
    check(&e, p, kind, parts);
    e
}

fn check(e: &Error, p: &Path, kind: Kind, parts: &[&str]) {
    assert_eq!(e.kind(), kind, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(p.file_name().unwrap().to_str().unwrap()),
        "{msg} should name the file"
    );
    for part in parts {
        assert!(msg.contains(part), "{msg:?} should contain {part:?}");
    }
}

/// Opening works but reading at `off` fails with a Corrupt error mentioning `parts`.
fn read_fails(p: &Path, off: u64, parts: &[&str]) {
    let view = open_view(p).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = view.read(off, &mut buf).expect_err("read should fail");
    check(&e, p, Kind::Corrupt, parts);
    assert_eq!(e.errno(), libc::EIO);
}

fn header(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn truncated_and_foreign_headers() {
    let d = Scratch::new("q2h-hdr");
    let p = copy(&d, "trunc.qcow2");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(90)
        .unwrap();
    open_fails(&p, Kind::Corrupt, &["qcow2 header", "truncated"]);
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0)
        .unwrap();
    open_fails(&p, Kind::Corrupt, &["not a qcow2 image"]);

    type Case<'a> = (&'a str, u64, &'a [u8], Kind, &'a [&'a str]);
    let cases: &[Case] = &[
        (
            "v1.qcow2",
            4,
            &1u32.to_be_bytes(),
            Kind::Unsupported,
            &["qcow version 1"],
        ),
        (
            "v4.qcow2",
            4,
            &4u32.to_be_bytes(),
            Kind::Unsupported,
            &["version 4"],
        ),
        (
            "cb.qcow2",
            20,
            &30u32.to_be_bytes(),
            Kind::Corrupt,
            &["cluster_bits", "0x14"],
        ),
        (
            "aes.qcow2",
            32,
            &1u32.to_be_bytes(),
            Kind::Unsupported,
            &["encrypted", "AES"],
        ),
        (
            "luks.qcow2",
            32,
            &2u32.to_be_bytes(),
            Kind::Unsupported,
            &["encrypted", "LUKS"],
        ),
        (
            "hlen.qcow2",
            100,
            &0x20000u32.to_be_bytes(),
            Kind::Corrupt,
            &["header_length", "cluster size"],
        ),
        (
            "hshort.qcow2",
            100,
            &96u32.to_be_bytes(),
            Kind::Corrupt,
            &["header_length"],
        ),
        (
            "rc0.qcow2",
            56,
            &0u32.to_be_bytes(),
            Kind::Corrupt,
            &["refcount_table_clusters"],
        ),
        (
            "rcord.qcow2",
            96,
            &7u32.to_be_bytes(),
            Kind::Corrupt,
            &["refcount_order"],
        ),
        (
            "ctype.qcow2",
            104,
            &[1],
            Kind::Corrupt,
            &["compression type bit"],
        ),
        (
            "bfo.qcow2",
            8,
            &0x20000u64.to_be_bytes(),
            Kind::Corrupt,
            &["backing_file_offset"],
        ),
    ];
    for (name, off, bytes, kind, parts) in cases {
        let p = copy(&d, name);
        patch(&p, *off, bytes);
        open_fails(&p, *kind, parts);
    }
}

#[test]
fn bad_l1_tables() {
    let d = Scratch::new("q2h-l1");
    let len = std::fs::metadata(good(&d)).unwrap().len();
    let past = (len + 2 * 65536) & !65535;
    let p = copy(&d, "l1eof.qcow2");
    patch(&p, 40, &past.to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["L1 table", "past the end"]);
    let p = copy(&d, "l1huge.qcow2");
    patch(&p, 36, &0x1000_0000u32.to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["L1 table", "exceeds the limit"]);
    let p = copy(&d, "l1small.qcow2");
    patch(&p, 36, &0u32.to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["l1_size", "cannot cover"]);
    let p = copy(&d, "l1align.qcow2");
    let l1 = be64_at(&header(&p), 40);
    patch(&p, 40, &(l1 + 512).to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["L1 table", "aligned"]);
}

#[test]
fn bad_l2_tables_and_entries_fail_at_read_time() {
    let d = Scratch::new("q2h-l2");
    let (l2, entry) = first_l2(&good(&d));
    let b = header(&good(&d));
    let l1 = be64_at(&b, 40);
    let len = b.len() as u64;
    let past = (len + 2 * 65536) & !65535;

    let p = copy(&d, "l2eof.qcow2");
    patch(&p, l1, &(past | 1 << 63).to_be_bytes());
    read_fails(&p, 0, &["L2 table", "past the end"]);
    let p = copy(&d, "l2align.qcow2");
    patch(&p, l1, &((l2 + 512) | 1 << 63).to_be_bytes());
    read_fails(&p, 0, &["L1 entry", "aligned"]);

    // The first L2 entry maps guest cluster 0.
    assert_eq!(entry, l2);
    let p = copy(&d, "l2eeof.qcow2");
    patch(&p, entry, &(past | 1 << 63).to_be_bytes());
    read_fails(&p, 0, &["L2 entry", "past the end"]);
    // The other clusters still read right.
    let view = open_view(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    view.read(MIB, &mut buf).unwrap();
    let p = copy(&d, "l2ealign.qcow2");
    let e = be64_at(&header(&p), entry as usize);
    patch(&p, entry, &(e + 512).to_be_bytes());
    read_fails(&p, 0, &["L2 entry", "aligned"]);

    // Compressed descriptors: past the end of the file, or pointing at garbage.
    let p = copy(&d, "ceof.qcow2");
    patch(&p, entry, &(1u64 << 62 | (past + 100)).to_be_bytes());
    read_fails(&p, 0, &["L2 entry", "compressed", "past the end"]);
    let p = copy(&d, "cgarbage.qcow2");
    patch(&p, entry, &(1u64 << 62 | 3 << 54 | 8).to_be_bytes());
    read_fails(&p, 0, &["compressed cluster"]);
}

#[test]
fn zero_flag_in_a_v2_image_is_corrupt() {
    let d = Scratch::new("q2h-v2z");
    let p = d.path("v2.qcow2");
    create(&p, "compat=0.10", MIB);
    apply("qcow2", &p, &mut Rng::new(1), &[Op::Data(0, 4096)]);
    let (_, entry) = first_l2(&p);
    let e = be64_at(&header(&p), entry as usize);
    patch(&p, entry, &(e | 1).to_be_bytes());
    read_fails(&p, 0, &["L2 entry", "version 2"]);
}

#[test]
fn bad_extended_l2_bitmaps() {
    let d = Scratch::new("q2h-extl2");
    let p = d.path("x.qcow2");
    create(&p, "extended_l2=on", MIB);
    apply("qcow2", &p, &mut Rng::new(1), &[Op::Data(0, 2048)]);
    let (_, entry) = first_l2(&p);
    patch(&p, entry + 8, &(1u64 | 1 << 32).to_be_bytes());
    read_fails(&p, 0, &["L2 entry", "both allocated and zero"]);
    patch(&p, entry, &0u64.to_be_bytes());
    patch(&p, entry + 8, &1u64.to_be_bytes());
    read_fails(&p, 0, &["L2 entry", "unallocated cluster"]);
}

#[test]
fn bad_snapshot_tables() {
    let d = Scratch::new("q2h-snap");
    let len = std::fs::metadata(good(&d)).unwrap().len();
    let past = (len + 2 * 65536) & !65535;
    // Past the end of the file: the live image still opens (as in QEMU), without snapshots.
    let p = copy(&d, "sneof.qcow2");
    patch(&p, 60, &5u32.to_be_bytes());
    patch(&p, 64, &past.to_be_bytes());
    let layer = open(&p).unwrap();
    assert!(layer.snapshots().is_empty());
    assert!(
        layer
            .details()
            .iter()
            .any(|(k, v)| k == "snapshots" && v.contains("snapshot table"))
    );
    let e = layer.open_snapshot(0).unwrap_err();
    check(&e, &p, Kind::Corrupt, &["snapshot table", "past the end"]);
    same(
        "live",
        &read_all(&open_view(&p).unwrap()),
        &oracle(&good(&d), &[]),
    );

    let p = copy(&d, "snmany.qcow2");
    patch(&p, 60, &70000u32.to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["nb_snapshots", "65536"]);
    let p = copy(&d, "snalign.qcow2");
    patch(&p, 60, &1u32.to_be_bytes());
    patch(&p, 64, &0x10008u64.to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["snapshot table", "aligned"]);

    // A snapshot whose L1 table lies past the end of the file fails when it is opened.
    let p = copy(&d, "snl1.qcow2");
    qemu_img(&["snapshot", "-c", "one", p.to_str().unwrap()]);
    let b = header(&p);
    let table = be64_at(&b, 64);
    patch(&p, table, &past.to_be_bytes());
    let layer = open(&p).unwrap();
    assert_eq!(layer.snapshots().len(), 1);
    let e = layer.open_snapshot(0).unwrap_err();
    check(
        &e,
        &p,
        Kind::Corrupt,
        &["snapshot 0", "L1 table", "past the end"],
    );
}

#[test]
fn unknown_features_and_bad_extensions() {
    let d = Scratch::new("q2h-feat");
    let p = copy(&d, "bit5.qcow2");
    patch(&p, 72, &(1u64 << 5 | 1 << 40).to_be_bytes());
    open_fails(&p, Kind::Unsupported, &["bit 5", "bit 40"]);
    // Name bit 5 in the feature name table: the error gives the name.
    let (ext, len) = find_ext(&p, 0x6803_f857).expect("qemu-img writes a feature name table");
    let b = header(&p);
    let entry = (0..len as u64 / 48)
        .map(|i| ext + 8 + i * 48)
        .find(|&e| b[e as usize] == 0 && b[e as usize + 1] == 0)
        .unwrap();
    patch(&p, entry + 1, &[5]);
    open_fails(&p, Kind::Unsupported, &["bit 5 (\"dirty bit\")"]);

    let p = copy(&d, "extlen.qcow2");
    let first = u64::from(be32_at(&header(&p), 100));
    patch(&p, first + 4, &0xffff_fff0u32.to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["header extension", "runs past"]);

    let p = copy(&d, "nodf.qcow2");
    patch(&p, 72, &(1u64 << 2).to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["incompatible_features", "data file"]);
    let p = copy(&d, "dfraw.qcow2");
    patch(&p, 88, &(1u64 << 1).to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["autoclear_features", "data_file_raw"]);
}

#[test]
fn dirty_and_corrupt_images_still_read() {
    let d = Scratch::new("q2h-dirty");
    let want = oracle(&good(&d), &[]);
    for (name, bit) in [("dirty.qcow2", 1u64), ("corrupt.qcow2", 2)] {
        let p = copy(&d, name);
        patch(&p, 72, &bit.to_be_bytes());
        same(name, &read_all(&open_view(&p).unwrap()), &want);
        // A corrupt image is never opened for writing.
        let wctx = OpenCtx {
            writable: true,
            ..ctx()
        };
        let layer = format::open_layer(&p, Format::Qcow2, &wctx).unwrap();
        assert_eq!(layer.files()[0].writable(), bit == 1, "{name}");
    }
}

#[test]
fn hostile_backing_and_data_file_names() {
    let d = Scratch::new("q2h-names");
    let p = d.path("json.qcow2");
    let json = r#"json:{"file":{"driver":"file","filename":"/etc/passwd"}}"#;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        json,
        "-F",
        "raw",
        p.to_str().unwrap(),
        "1M",
    ]);
    open_fails(&p, Kind::Unsupported, &["protocol"]);

    let p = d.path("long.qcow2");
    good(&d);
    overlay(&p, "good.qcow2", "qcow2", None, "");
    patch(&p, 16, &2000u32.to_be_bytes());
    open_fails(&p, Kind::Corrupt, &["backing_file_size", "too long"]);

    let p = d.path("missing.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nothere.qcow2",
        "-F",
        "qcow2",
        p.to_str().unwrap(),
        "1M",
    ]);
    let e = vmfs_mount::chain::open_chain(&p, None, &ctx()).unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
    assert!(e.to_string().contains("nothere.qcow2"), "{e}");

    let p = d.path("df.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.bin",
            "df.qcow2",
            "1M",
        ])
        .current_dir(&d.0)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::remove_file(d.path("df.bin")).unwrap();
    let e = open(&p).unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
    assert!(e.to_string().contains("df.bin"), "{e}");
}

#[test]
fn random_metadata_damage_never_panics() {
    let d = Scratch::new("q2h-fuzz");
    let src = d.path("src.qcow2");
    let mut rng = Rng::new(1234);
    create(&src, "cluster_size=4k", MIB);
    apply(
        "qcow2",
        &src,
        &mut rng,
        &[Op::Compressed(256 * KIB, 16 * KIB)],
    );
    let ops = [
        Op::Data(0, 20 * KIB),
        Op::Zero(64 * KIB, 8 * KIB),
        Op::Data(MIB - 5000, 5000),
    ];
    apply("qcow2", &src, &mut rng, &ops);
    qemu_img(&["snapshot", "-c", "snap", src.to_str().unwrap()]);
    let good = std::fs::read(&src).unwrap();
    let p = d.path("fuzz.qcow2");
    // Damage falls in the first clusters: header, refcount table, L1 and L2 tables.
    let meta = good.len().min(64 * 1024) as u64;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..150 {
        let mut img = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(meta) as usize;
            img[at] = rng.next_u64() as u8;
        }
        std::fs::write(&p, &img).unwrap();
        let Ok(layer) = open(&p) else { continue };
        for s in layer.snapshots() {
            let _ = layer.open_snapshot(s.index);
        }
        let _ = layer.details();
        let Ok(view) = open_view(&p) else { continue };
        let mut off = 0;
        while off < view.size().min(4 * MIB) {
            let _ = view.read(off, &mut buf);
            off += buf.len() as u64;
        }
    }
}
