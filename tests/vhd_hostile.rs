//! Damaged and hostile VHDs: every one must give a clear error naming what is wrong (never a
//! panic, never wrong bytes).

mod common;
mod vhd_gen;

use common::*;
use std::path::Path;
use vhd_gen::{Sparse, fix_all, locator_at, put_be32, put_be64, utf16le};
use vmfs_mount::error::{Error, Kind};
use vmfs_mount::format::Format;

const MIB: u64 = 1024 * 1024;

/// A 4 MiB dynamic disk with 1 MiB blocks, two of them allocated: [footer][header @512]
/// [BAT @1536][blocks...][footer].
fn base() -> (Sparse, Vec<u8>) {
    let mut g = Sparse::new(4 * MIB, MIB, 3, [1; 16]);
    let mut rng = Rng::new(5);
    let mut junk = |n| vec![0u8; n];
    g.write(0, &rng.bytes(64 * 1024), &mut junk);
    g.write(3 * MIB, &rng.bytes(4096), &mut junk);
    let img = g.build();
    (g, img)
}

fn open_forced(path: &Path) -> vmfs_mount::error::Result<vmfs_mount::view::View> {
    let layers = vmfs_mount::chain::open_chain(path, Some(Format::Vpc), &ctx())?;
    let size = layers[0].virtual_size();
    Ok(vmfs_mount::view::View::new(
        layers,
        size,
        std::sync::Arc::new(vmfs_mount::cache::ByteCache::new(1 << 20)),
        64,
    ))
}

/// Writes `img` and expects opening it to fail with `kind` and a message containing `what`.
fn expect_open_error(s: &Scratch, name: &str, img: &[u8], kind: Kind, what: &str) -> Error {
    let p = s.path(name);
    std::fs::write(&p, img).unwrap();
    let e = open_forced(&p)
        .err()
        .unwrap_or_else(|| panic!("{name}: opened"));
    assert_eq!(e.kind(), kind, "{name}: {e}");
    assert!(e.to_string().contains(what), "{name}: {e}");
    assert!(
        e.to_string().contains(name),
        "{name}: error does not name the file: {e}"
    );
    e
}

#[test]
fn the_generated_base_reads_correctly() {
    let s = Scratch::new("vhd-hostile-base");
    let (g, img) = base();
    let p = s.path("base.vhd");
    std::fs::write(&p, &img).unwrap();
    assert_same("base", &read_all(&open_view(&p).unwrap()), &g.qemu_view());
}

#[test]
fn damaged_footers_headers_and_sizes_are_refused() {
    let s = Scratch::new("vhd-hostile-open");
    let (_, img) = base();
    let n = img.len();

    let mut both = img.clone();
    both[100] ^= 1;
    both[n - 512 + 100] ^= 1;
    expect_open_error(
        &s,
        "both-footers.vhd",
        &both,
        Kind::Corrupt,
        "checksum mismatch",
    );

    let mut t = img.clone();
    put_be32(&mut t, 60, 5);
    put_be32(&mut t, n - 512 + 60, 5);
    fix_all(&mut t);
    expect_open_error(&s, "type5.vhd", &t, Kind::Corrupt, "disk type");

    let mut t = img.clone();
    t[512 + 800] ^= 1;
    expect_open_error(
        &s,
        "dyn-checksum.vhd",
        &t,
        Kind::Corrupt,
        "dynamic disk header",
    );

    for (name, bs) in [
        ("bs-3m.vhd", 3 * MIB as u32),
        ("bs-0.vhd", 0),
        ("bs-256.vhd", 256),
    ] {
        let mut t = img.clone();
        put_be32(&mut t, 512 + 32, bs);
        fix_all(&mut t);
        expect_open_error(&s, name, &t, Kind::Corrupt, "block size");
    }

    let mut t = img.clone();
    put_be32(&mut t, 512 + 28, 0x4000_0001);
    fix_all(&mut t);
    expect_open_error(&s, "mte-huge.vhd", &t, Kind::Corrupt, "too large");

    let mut t = img.clone();
    put_be32(&mut t, 512 + 28, 3);
    fix_all(&mut t);
    expect_open_error(&s, "mte-small.vhd", &t, Kind::Corrupt, "do not cover");

    let mut t = img.clone();
    put_be64(&mut t, 512 + 16, n as u64 - 8);
    fix_all(&mut t);
    expect_open_error(
        &s,
        "bat-past-eof.vhd",
        &t,
        Kind::Corrupt,
        "block allocation table",
    );

    let mut t = img.clone();
    put_be64(&mut t, 16, u64::MAX - 100);
    put_be64(&mut t, n - 512 + 16, u64::MAX - 100);
    fix_all(&mut t);
    expect_open_error(
        &s,
        "header-past-eof.vhd",
        &t,
        Kind::Corrupt,
        "dynamic disk header",
    );

    // 2041 GiB: above QEMU's (and our) VHD limit.
    let mut t = img.clone();
    for at in [48, n - 512 + 48] {
        put_be64(&mut t, at, 2041 << 30);
    }
    fix_all(&mut t);
    expect_open_error(&s, "too-big.vhd", &t, Kind::Unsupported, "2040 GiB");

    expect_open_error(&s, "tiny.vhd", &img[..100], Kind::Corrupt, "too small");
    expect_open_error(
        &s,
        "no-footer.vhd",
        &vec![0u8; 4096],
        Kind::Corrupt,
        "cookie",
    );
}

#[test]
fn a_block_past_the_end_of_file_fails_the_read_that_needs_it() {
    let s = Scratch::new("vhd-hostile-block");
    let (_, mut img) = base();
    // BAT entry 3 (the block at 3 MiB) now points one sector before the end of the file.
    let last = (img.len() / 512 - 1) as u32;
    put_be32(&mut img, 1536 + 12, last);
    let p = s.path("block-past-eof.vhd");
    std::fs::write(&p, &img).unwrap();
    let view = open_view(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    view.read(0, &mut buf).unwrap();
    let e = view.read(3 * MIB, &mut buf).unwrap_err();
    assert_eq!(e.kind(), Kind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("BAT entry 3") && e.to_string().contains("past the end"),
        "{e}"
    );
}

#[test]
fn hostile_parent_locators_are_refused() {
    let s = Scratch::new("vhd-hostile-locator");
    let mut g = Sparse::new(2 * MIB, MIB, 4, [2; 16]);
    g.locators.push((*b"W2ru", utf16le(".\\parent.vhd")));
    let img = g.build();

    let mut t = img.clone();
    put_be64(&mut t, locator_at(0) + 16, img.len() as u64 - 4);
    fix_all(&mut t);
    expect_open_error(
        &s,
        "loc-outside.vhd",
        &t,
        Kind::Corrupt,
        "parent locator W2ru",
    );

    let mut t = img.clone();
    put_be32(&mut t, locator_at(0) + 8, 0x7fff_ffff);
    fix_all(&mut t);
    expect_open_error(&s, "loc-huge.vhd", &t, Kind::Corrupt, "exceeds");

    // No locator and no name: nothing to look for.
    let mut t = img;
    t[locator_at(0)..locator_at(0) + 24].fill(0);
    fix_all(&mut t);
    expect_open_error(&s, "no-parent.vhd", &t, Kind::Corrupt, "names no parent");
}

#[test]
fn random_header_damage_never_panics() {
    let s = Scratch::new("vhd-hostile-fuzz");
    let (_, img) = base();
    let mut rng = Rng::new(77);
    let p = s.path("fuzz.vhd");
    for round in 0..300 {
        let mut t = img.clone();
        for _ in 0..1 + rng.below(4) {
            // Footer, header and BAT fields, then make the checksums right again.
            let at = match rng.below(3) {
                0 => rng.below(90) as usize,
                1 => 512 + rng.below(40) as usize,
                _ => 1536 + rng.below(16) as usize,
            };
            t[at] = rng.next_u64() as u8;
        }
        let n = t.len();
        t.copy_within(0..512, n - 512);
        if round % 5 != 0 {
            fix_all(&mut t);
        }
        std::fs::write(&p, &t).unwrap();
        if let Ok(view) = open_forced(&p) {
            let size = view.size().min(8 * MIB);
            let mut buf = vec![0u8; 256 * 1024];
            let mut off = 0;
            while off < size {
                if view.read(off, &mut buf).is_err() {
                    break;
                }
                off += buf.len() as u64;
            }
        }
    }
}
