//! `-o vmdk,vhd`: the hypervisor wrappers of real mounts. Chains of qcow2 layers over a raw
//! and over a VDI base, seeded random data, one internal snapshot. In every view's directory
//! `qemu-img convert -f vmdk disk.vmdk` and `-f vpc disk.vhd` give exactly that view's disk;
//! the VHD UUID and the VMDK CID are the same on every mount of an image and differ between
//! views and images; writes through `disk.vhd` (by hand and by QEMU's vpc driver) and through
//! `disk.vmdk` (QEMU's vmdk driver, O_DIRECT, which first rewrites the descriptor's CID) land in
//! the disk and in the image, the footer refuses them; read-only mounts refuse every write; a disk
//! not a multiple of either CHS geometry is wrapped at its exact size.

mod common;
mod mount_support;

use common::*;
use mount_support::*;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

const M: u64 = 1 << 20;
/// 18439 sectors: a multiple of neither 16 * 63 (the VMDK's IDE geometry) nor the VHD
/// geometry (4 heads, 17 sectors, 271 cylinders = 18428 sectors).
const ODD: u64 = 9 * M + 7 * 512;
const FOOTER: u64 = 512;

/// An image chain and what each of its views holds (the QEMU oracle), by directory under
/// the mount ("" is the live view).
struct Chain {
    top: PathBuf,
    views: BTreeMap<String, Vec<u8>>,
}

fn write_scattered(fmt: &str, img: &Path, rng: &mut Rng, size: u64, n: usize) {
    for _ in 0..n {
        let len = 512 * (1 + rng.below(300)) as usize;
        let off = 512 * rng.below((size - len as u64) / 512);
        write_random(fmt, img, rng, off, len);
    }
}

/// base.raw (ODD bytes) <- mid.qcow2 <- top.qcow2 with internal snapshot s1, writes on every
/// layer, the last sector written on the top.
fn raw_chain(dir: &Path, seed: u64) -> Chain {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(seed);
    let base = dir.join("base.raw");
    std::fs::write(&base, rng.bytes(ODD as usize)).unwrap();
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    write_scattered("qcow2", &mid, &mut rng, ODD, 6);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    write_scattered("qcow2", &top, &mut rng, ODD, 4);
    qemu_img(&["snapshot", "-c", "s1", s(&top)]);
    write_scattered("qcow2", &top, &mut rng, ODD, 4);
    write_random("qcow2", &top, &mut rng, ODD - 512, 512);
    let mut views = BTreeMap::new();
    views.insert(String::new(), qemu_raw(&top, Some("qcow2"), &[]));
    views.insert("snapshots/base".into(), qemu_raw(&base, Some("raw"), &[]));
    views.insert("snapshots/mid".into(), qemu_raw(&mid, Some("qcow2"), &[]));
    views.insert("snapshots/s1".into(), snapshot_oracle(&top, "qcow2", "s1"));
    Chain { top, views }
}

/// base.vdi (12 MiB) <- top.qcow2.
fn vdi_chain(dir: &Path, seed: u64) -> Chain {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(seed);
    let raw = dir.join("seed.raw");
    std::fs::write(&raw, rng.bytes(12 * M as usize)).unwrap();
    let base = dir.join("base.vdi");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "vdi", s(&raw), s(&base)]);
    std::fs::remove_file(&raw).unwrap();
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.vdi",
        "-F",
        "vdi",
        s(&top),
    ]);
    write_scattered("qcow2", &top, &mut rng, 12 * M, 5);
    let mut views = BTreeMap::new();
    views.insert(String::new(), qemu_raw(&top, Some("qcow2"), &[]));
    views.insert("snapshots/base".into(), qemu_raw(&base, Some("vdi"), &[]));
    Chain { top, views }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img convert -f fmt wrapper` to raw, read back.
fn convert_wrapper(fmt: &str, wrapper: &Path, out: &Path) -> Vec<u8> {
    qemu_img(&["convert", "-q", "-f", fmt, "-O", "raw", s(wrapper), s(out)]);
    let bytes = std::fs::read(out).unwrap();
    std::fs::remove_file(out).unwrap();
    bytes
}

/// The virtual size `qemu-img info -f fmt` reports (of the image, not of its file child).
fn qemu_size(fmt: &str, path: &Path) -> u64 {
    let info = qemu_img(&["info", "-f", fmt, "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// The footer's UUID, after checking its magic, checksum, disk type and sizes.
fn footer_uuid(what: &str, footer: &[u8], size: u64) -> [u8; 16] {
    assert_eq!(footer.len() as u64, FOOTER, "{what}: footer length");
    assert_eq!(&footer[0..8], b"conectix", "{what}: footer magic");
    let mut zeroed = footer.to_vec();
    zeroed[64..68].fill(0);
    let sum = !zeroed
        .iter()
        .fold(0u32, |a, b| a.wrapping_add(u32::from(*b)));
    assert_eq!(footer[64..68], sum.to_be_bytes(), "{what}: footer checksum");
    assert_eq!(
        footer[60..64],
        2u32.to_be_bytes(),
        "{what}: disk type fixed"
    );
    assert_eq!(footer[40..48], size.to_be_bytes(), "{what}: original size");
    assert_eq!(footer[48..56], size.to_be_bytes(), "{what}: current size");
    footer[68..84].try_into().unwrap()
}

/// The descriptor's CID, after checking that its one extent is the whole disk.raw.
fn descriptor_cid(what: &str, text: &str, size: u64) -> u32 {
    let extents: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("RW ") || l.starts_with("RDONLY "))
        .collect();
    assert_eq!(
        extents,
        [format!("RW {} FLAT \"disk.raw\" 0", size / 512)],
        "{what}: extents\n{text}"
    );
    assert!(
        text.contains("createType=\"monolithicFlat\""),
        "{what}\n{text}"
    );
    let cid = text
        .lines()
        .find_map(|l| l.strip_prefix("CID="))
        .unwrap_or_else(|| panic!("{what}: no CID\n{text}"));
    u32::from_str_radix(cid.trim(), 16).unwrap()
}

/// Checks every view's wrappers against its oracle; returns (VHD UUID, VMDK CID) by view.
fn check_wrappers(mnt: &Path, chain: &Chain, scratch: &Path) -> BTreeMap<String, ([u8; 16], u32)> {
    let mut ids = BTreeMap::new();
    for (view, want) in &chain.views {
        let dir = mnt.join(view);
        let what = format!("{}:{view}", chain.top.display());
        let names = names_in(&dir);
        for n in ["disk.raw", "disk.vhd", "disk.vmdk"] {
            assert!(names.contains(&n.to_string()), "{what}: {names:?}");
        }
        let size = want.len() as u64;
        assert_same(&what, &std::fs::read(dir.join("disk.raw")).unwrap(), want);
        let raw_mode = std::fs::metadata(dir.join("disk.raw")).unwrap().mode() & 0o777;
        let vhd = dir.join("disk.vhd");
        let vmdk = dir.join("disk.vmdk");
        let vhd_meta = std::fs::metadata(&vhd).unwrap();
        assert_eq!(vhd_meta.len(), size + FOOTER, "{what}: size of disk.vhd");
        assert_eq!(
            vhd_meta.mode() & 0o777,
            raw_mode,
            "{what}: mode of disk.vhd"
        );
        assert_eq!(
            std::fs::metadata(&vmdk).unwrap().mode() & 0o777,
            raw_mode,
            "{what}: mode of disk.vmdk"
        );

        let out = scratch.join("converted.raw");
        assert_same(
            &format!("{what}: -f vpc"),
            &convert_wrapper("vpc", &vhd, &out),
            want,
        );
        assert_same(
            &format!("{what}: -f vmdk"),
            &convert_wrapper("vmdk", &vmdk, &out),
            want,
        );
        assert_eq!(qemu_size("vpc", &vhd), size, "{what}: qemu-img info -f vpc");
        assert_eq!(
            qemu_size("vmdk", &vmdk),
            size,
            "{what}: qemu-img info -f vmdk"
        );

        let bytes = std::fs::read(&vhd).unwrap();
        assert_same(
            &format!("{what}: disk.vhd data"),
            &bytes[..size as usize],
            want,
        );
        let uuid = footer_uuid(&what, &bytes[size as usize..], size);
        let text = std::fs::read_to_string(&vmdk).unwrap();
        let cid = descriptor_cid(&what, &text, size);
        ids.insert(view.clone(), (uuid, cid));
    }
    ids
}

fn assert_all_distinct(ids: &[([u8; 16], u32)]) {
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a.0, b.0, "two views share a VHD UUID: {ids:x?}");
            assert_ne!(a.1, b.1, "two views share a VMDK CID: {ids:x?}");
        }
    }
}

#[test]
fn wrappers_read_as_their_disk_and_keep_their_ids_across_mounts() {
    let sc = Scratch::new("wrappers-read");
    let chains = [
        raw_chain(&sc.path("raw"), 0x7a1),
        vdi_chain(&sc.path("vdi"), 0x7a2),
    ];
    let mut all = Vec::new();
    for (i, chain) in chains.iter().enumerate() {
        let dir = sc.path(&format!("m{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let first = {
            let (_guard, mnt) = mount(&chain.top, &dir, &["-o", "vmdk,vhd"]);
            check_wrappers(&mnt, chain, &dir)
        };
        // A read-only mount of the same image names every view the same way.
        let again = {
            let (_guard, mnt) = mount(&chain.top, &dir, &["-r", "-o", "vmdk", "-o", "vhd"]);
            check_wrappers(&mnt, chain, &dir)
        };
        assert_eq!(
            first,
            again,
            "{}: ids changed between mounts",
            chain.top.display()
        );
        all.extend(first.into_values());
    }
    assert_all_distinct(&all);
}

/// `len` bytes written at `off` through `f`, and the model updated.
fn pwrite(f: &File, model: &mut [u8], rng: &mut Rng, off: u64, len: usize) {
    let data = rng.bytes(len);
    f.write_all_at(&data, off).unwrap();
    model[off as usize..off as usize + len].copy_from_slice(&data);
}

fn assert_write_refused(f: &File, off: u64, len: usize, want: &[i32], what: &str) {
    let e = f.write_all_at(&vec![0x5a; len], off).unwrap_err();
    assert!(
        want.contains(&errno_of(&e)),
        "{what}: write of {len} at {off}: {e}"
    );
}

#[test]
fn writes_through_disk_vhd_reach_the_disk_and_the_footer_refuses_them() {
    let sc = Scratch::new("wrappers-write");
    let chain = raw_chain(&sc.path("raw"), 0x7b1);
    let mut model = chain.views[""].clone();
    let size = model.len() as u64;
    let mut rng = Rng::new(0x7b2);
    let (footer, snapshot) = {
        let (guard, mnt) = mount(&chain.top, &sc.0, &["-o", "vhd,vmdk"]);
        let vhd = mnt.join("disk.vhd");
        let footer = std::fs::read(&vhd).unwrap()[size as usize..].to_vec();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&vhd)
            .unwrap();
        // Aligned and unaligned, the first and the last bytes of the disk.
        pwrite(&f, &mut model, &mut rng, 0, 4096);
        pwrite(&f, &mut model, &mut rng, size - 512, 512);
        pwrite(&f, &mut model, &mut rng, size - 1000, 1000);
        for _ in 0..20 {
            let len = 1 + rng.below(200_000) as usize;
            let off = rng.below(size - len as u64);
            pwrite(&f, &mut model, &mut rng, off, len);
        }
        // The footer, a write across the end of the disk and one past the file: refused, and
        // nothing of them is written.
        assert_write_refused(&f, size, 1, &[libc::EROFS], "footer");
        assert_write_refused(&f, size + 100, 412, &[libc::EROFS], "footer");
        assert_write_refused(&f, size - 10, 20, &[libc::EROFS], "across the end");
        assert_write_refused(
            &f,
            size + FOOTER,
            512,
            &[libc::EINVAL, libc::EFBIG, libc::ENOSPC],
            "past the file",
        );
        f.sync_all().unwrap();
        drop(f);
        let c = std::ffi::CString::new(s(&vhd)).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_ne!(
            unsafe { libc::truncate(c.as_ptr(), 0) },
            0,
            "truncate disk.vhd"
        );

        // QEMU's vpc driver writing through the wrapper.
        let pattern = sc.path("pattern");
        let data = rng.bytes(64 * 1024 + 512);
        std::fs::write(&pattern, &data).unwrap();
        let off = 3 * M + 512;
        qemu_io(
            "vpc",
            &vhd,
            &[format!("write -s {} {off} {}", s(&pattern), data.len())],
        );
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);

        // QEMU's vmdk driver writing through the descriptor's FLAT extent, with O_DIRECT: it
        // rewrites the descriptor's CID first, so that must succeed too.
        let vmdk = mnt.join("disk.vmdk");
        let descriptor = std::fs::read(&vmdk).unwrap();
        let data = rng.bytes(128 * 1024);
        std::fs::write(&pattern, &data).unwrap();
        let off = 5 * M;
        let mut args = vec!["-t", "none", "-f", "vmdk", "-c"];
        let cmd = format!("write -s {} {off} {}", s(&pattern), data.len());
        args.extend([cmd.as_str(), s(&vmdk)]);
        let out = run("qemu-io", &args);
        assert!(!out.contains("failed"), "qemu-io -f vmdk: {out}");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        let rewritten = std::fs::read(&vmdk).unwrap();
        assert_eq!(rewritten.len(), descriptor.len(), "descriptor size");
        let text = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .split('\0')
                .next()
                .unwrap()
                .to_string()
        };
        assert_ne!(
            descriptor_cid("rewritten", &text(&rewritten), size),
            descriptor_cid("derived", &text(&descriptor), size),
            "QEMU set no new CID"
        );

        assert_same(
            "disk.raw after writes",
            &std::fs::read(mnt.join("disk.raw")).unwrap(),
            &model,
        );
        let bytes = std::fs::read(&vhd).unwrap();
        assert_same(
            "disk.vhd data after writes",
            &bytes[..size as usize],
            &model,
        );
        assert_eq!(&bytes[size as usize..], &footer[..], "the footer changed");
        let out = sc.path("converted.raw");
        assert_same(
            "-f vpc after writes",
            &convert_wrapper("vpc", &vhd, &out),
            &model,
        );
        assert_same(
            "-f vmdk after writes",
            &convert_wrapper("vmdk", &mnt.join("disk.vmdk"), &out),
            &model,
        );

        // Snapshot views stay read-only through their wrappers.
        let snap = mnt.join("snapshots/s1/disk.vhd");
        let snapshot = std::fs::read(&snap).unwrap();
        assert_refuses_writes(&snap, &snapshot);
        let snap_vmdk = mnt.join("snapshots/s1/disk.vmdk");
        assert_refuses_writes(&snap_vmdk, &std::fs::read(&snap_vmdk).unwrap());
        drop(guard);
        (footer, snapshot)
    };
    assert!(!footer.is_empty());
    qemu_img(&["check", "-q", "-f", "qcow2", s(&chain.top)]);
    assert_same(
        "the image after unmount",
        &qemu_raw(&chain.top, Some("qcow2"), &[]),
        &model,
    );
    let s1 = snapshot_oracle(&chain.top, "qcow2", "s1");
    assert_same("s1 after unmount", &s1, &snapshot[..s1.len()]);
}

#[test]
fn read_only_mounts_refuse_writes_through_every_wrapper() {
    let sc = Scratch::new("wrappers-ro");
    let chain = vdi_chain(&sc.path("vdi"), 0x7c1);
    let before = capture_files(&[&chain.top, &chain.top.with_file_name("base.vdi")]);
    {
        let (_guard, mnt) = mount(&chain.top, &sc.0, &["-r", "-o", "vmdk,vhd"]);
        for view in chain.views.keys() {
            let dir = mnt.join(view);
            for name in ["disk.vhd", "disk.vmdk"] {
                let path = dir.join(name);
                assert_eq!(
                    std::fs::metadata(&path).unwrap().mode() & 0o777,
                    0o444,
                    "{view}/{name}"
                );
                let bytes = std::fs::read(&path).unwrap();
                assert_refuses_writes(&path, &bytes);
            }
        }
        // QEMU opening the wrapper for writing is refused as well.
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "vpc", "-c", "write 0 512"])
            .arg(mnt.join("disk.vhd"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                || text.contains("failed")
                || text.contains("denied")
                || text.contains("read-only")
                || text.contains("Read-only"),
            "qemu-io wrote through a read-only mount: {text}"
        );
    }
    assert_files_unchanged(&before);
}
