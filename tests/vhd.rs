//! VHD images made by qemu-img and written by qemu-io, read through the library and compared
//! byte for byte with `qemu-img convert -O raw`; plus dynamic and old fixed disks written
//! from the spec by tests/vhd_gen.

mod common;
mod vhd_gen;

use common::*;
use std::path::Path;

const MIB: u64 = 1024 * 1024;

/// Creates a VHD with qemu-img, scatters seeded random writes over it with qemu-io.
fn qemu_vhd(
    s: &Scratch,
    name: &str,
    size: u64,
    opts: &str,
    seed: u64,
    writes: usize,
) -> std::path::PathBuf {
    let img = s.path(name);
    let o = format!("-o{opts}");
    let size_arg = size.to_string();
    let mut args = vec!["create", "-q", "-f", "vpc"];
    if !opts.is_empty() {
        args.push(&o);
    }
    args.extend([img.to_str().unwrap(), size_arg.as_str()]);
    qemu_img(&args);
    let mut rng = Rng::new(seed);
    for i in 0..writes {
        // Mix sector-aligned and unaligned writes, short and block-crossing ones.
        let len = if i % 3 == 0 {
            1 + rng.below(3 * MIB)
        } else {
            1 + rng.below(70_000)
        } as usize;
        let mut off = rng.below(size - len as u64);
        if i % 2 == 0 {
            off &= !511;
        }
        write_random("vpc", &img, &mut rng, off, len);
    }
    img
}

fn check_against_qemu(img: &Path) -> Vec<u8> {
    let want = qemu_raw(img, Some("vpc"), &[]);
    let view = open_view(img).unwrap();
    assert_eq!(
        view.size(),
        want.len() as u64,
        "virtual size of {}",
        img.display()
    );
    let got = read_all(&view);
    assert_same(&img.display().to_string(), &got, &want);
    got
}

#[test]
fn dynamic_disk_matches_qemu() {
    let s = Scratch::new("vhd-dynamic");
    // qemu's "qemu" creator: CHS-rounded size (larger than asked).
    let img = qemu_vhd(&s, "dyn.vhd", 64 * MIB, "subformat=dynamic", 1, 40);
    check_against_qemu(&img);
    let view = open_view(&img).unwrap();
    assert!(view.size() > 64 * MIB);
    let d = view.layers()[0].details();
    assert!(
        d.iter().any(|(k, v)| k == "disk type" && v == "dynamic"),
        "{d:?}"
    );
    assert!(
        d.iter().any(|(k, v)| k == "block size" && v == "2097152"),
        "{d:?}"
    );
}

#[test]
fn dynamic_disk_with_forced_size_matches_qemu() {
    let s = Scratch::new("vhd-dynamic-qem2");
    let img = qemu_vhd(
        &s,
        "dyn2.vhd",
        37 * MIB + 4096,
        "subformat=dynamic,force_size=on",
        2,
        25,
    );
    let got = check_against_qemu(&img);
    assert_eq!(got.len() as u64, 37 * MIB + 4096);
}

#[test]
fn fixed_disks_match_qemu() {
    let s = Scratch::new("vhd-fixed");
    let forced = qemu_vhd(
        &s,
        "fixed.vhd",
        16 * MIB,
        "subformat=fixed,force_size=on",
        3,
        20,
    );
    assert_eq!(check_against_qemu(&forced).len() as u64, 16 * MIB);
    let chs = qemu_vhd(&s, "fixed-chs.vhd", 10 * MIB, "subformat=fixed", 4, 12);
    check_against_qemu(&chs);
    let layer = open_view(&chs).unwrap().layers()[0].clone();
    assert!(
        layer
            .details()
            .iter()
            .any(|(k, v)| k == "disk type" && v == "fixed")
    );
}

#[test]
fn empty_dynamic_disk_reads_as_zeros() {
    let s = Scratch::new("vhd-empty");
    let img = qemu_vhd(&s, "empty.vhd", 20 * MIB, "", 5, 0);
    let got = check_against_qemu(&img);
    assert!(got.iter().all(|&b| b == 0));
    let view = open_view(&img).unwrap();
    assert_eq!(view.next_data(0).unwrap(), None);
}

#[test]
fn dynamic_disk_ignores_bitmaps_like_qemu() {
    // A dynamic (not differencing) disk whose bitmaps are partly clear: QEMU reads the whole
    // data area of allocated blocks, and so do we. Small blocks, a size that ends mid-block.
    let s = Scratch::new("vhd-dyn-bitmap");
    let mut rng = Rng::new(6);
    let mut g = vhd_gen::Sparse::new(3 * MIB + 7 * 512, 64 * 1024, 3, [7; 16]);
    let mut junk = |n| Rng::new(99).bytes(n);
    for _ in 0..30 {
        let off = rng.below(g.size / 512 - 64) * 512;
        let len = (1 + rng.below(40)) as usize * 512;
        let data = rng.bytes(len);
        g.write(off, &data, &mut junk);
    }
    let img = s.path("gen-dyn.vhd");
    std::fs::write(&img, g.build()).unwrap();
    let got = check_against_qemu(&img);
    assert_same("model", &got, &g.qemu_view());
}

#[test]
fn old_511_byte_footer_fixed_disk_reads() {
    // Pre-2004 Virtual PC images end in a 511-byte footer (QEMU cannot read them: model).
    let s = Scratch::new("vhd-511");
    let data = Rng::new(8).bytes(2 * MIB as usize);
    // CHS 241/4/17 = 16388 sectors (> 2 MiB): the extra sectors read the footer, then zeros.
    let mut footer = vhd_gen::Sparse::new(2 * MIB, 512, 2, [9; 16]).footer();
    footer[28..32].copy_from_slice(b"vpc ");
    vhd_gen::put_be64(&mut footer, 16, u64::MAX);
    footer[56..60].copy_from_slice(&[0, 241, 4, 17]);
    footer.truncate(511);
    let c = vhd_gen::checksum(&footer, 64);
    vhd_gen::put_be32(&mut footer, 64, c);
    let mut file = data.clone();
    file.extend_from_slice(&footer);
    let img = s.path("old.vhd");
    std::fs::write(&img, &file).unwrap();
    let view = open_view(&img).unwrap();
    assert_eq!(view.size(), 241 * 4 * 17 * 512);
    let got = read_all(&view);
    let mut want = file.clone();
    want.resize(view.size() as usize, 0);
    assert_same("511-byte footer", &got, &want);
}

#[test]
fn head_copy_damaged_uses_the_footer_at_the_end() {
    let s = Scratch::new("vhd-head-bad");
    let img = qemu_vhd(&s, "d.vhd", 8 * MIB, "", 10, 6);
    let want = qemu_raw(&img, Some("vpc"), &[]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[100] ^= 0x55; // reserved byte of the copy at offset 0: checksum now wrong
    std::fs::write(&img, &bytes).unwrap();
    assert_same(
        "head copy damaged",
        &read_all(&open_view(&img).unwrap()),
        &want,
    );
    // And the other way round: the copy at offset 0 is what QEMU uses.
    bytes[100] ^= 0x55;
    let n = bytes.len();
    bytes[n - 512 + 100] ^= 0x55;
    std::fs::write(&img, &bytes).unwrap();
    assert_same(
        "end copy damaged",
        &read_all(&open_view(&img).unwrap()),
        &want,
    );
}

#[test]
fn virtual_size_follows_the_creator_like_qemu() {
    // CHS geometry says 10514432 bytes, current_size 10485760: QEMU picks by creator.
    let s = Scratch::new("vhd-creators");
    let img = qemu_vhd(&s, "c.vhd", 10 * MIB, "", 11, 8);
    let orig = std::fs::read(&img).unwrap();
    for app in [
        b"vpc ", b"qemu", b"qem2", b"win ", b"d2v\0", b"CTXS", b"tap\0", b"xyz ",
    ] {
        let mut b = orig.clone();
        let n = b.len();
        for at in [0, n - 512] {
            b[at + 28..at + 32].copy_from_slice(app);
            vhd_gen::put_be64(&mut b, at + 48, 10 * MIB);
            vhd_gen::fix_footer(&mut b, at);
        }
        std::fs::write(&img, &b).unwrap();
        let got = check_against_qemu(&img);
        let chs = app == b"vpc " || app == b"qemu";
        assert_eq!(got.len() as u64, if chs { 10514432 } else { 10 * MIB });
    }
}
