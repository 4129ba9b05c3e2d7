//! VDI base images made by qemu-img/qemu-io, read through the library and compared byte for
//! byte with `qemu-img convert -O raw`; and damaged headers and block maps.

mod common;
use common::*;
use std::path::Path;
use vmfs_mount::chain::open_chain;
use vmfs_mount::error::Kind;
use vmfs_mount::format::Format;

const MB: u64 = 1 << 20;

/// Random writes of random lengths, some crossing block boundaries, some tiny.
fn scatter_writes(img: &Path, rng: &mut Rng, size: u64, count: usize) {
    for _ in 0..count {
        let len = match rng.below(3) {
            0 => 512 * (1 + rng.below(8)),
            1 => 4096 * (1 + rng.below(64)),
            _ => 512 * (1 + rng.below(5000)),
        };
        let len = len.min(size);
        let off = rng.below((size - len) / 512 + 1) * 512;
        write_random("vdi", img, rng, off, len as usize);
    }
}

fn compare_with_qemu(img: &Path, what: &str) {
    let want = qemu_raw(img, Some("vdi"), &[]);
    let view = open_view(img).unwrap();
    assert_same(what, &read_all(&view), &want);
}

fn patch(img: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn open_err(img: &Path) -> vmfs_mount::error::Error {
    open_chain(img, Some(Format::Vdi), &ctx()).expect_err("open should fail")
}

#[test]
fn dynamic_image_matches_qemu() {
    let s = Scratch::new("vdi-dynamic");
    let img = s.path("dyn.vdi");
    let size = 23 * MB + 3 * 512;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vdi",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut rng = Rng::new(0x5d1);
    scatter_writes(&img, &mut rng, size, 25);
    // The last, partial block.
    write_random("vdi", &img, &mut rng, size - 1024, 1024);
    compare_with_qemu(&img, "dynamic");
    let view = open_view(&img).unwrap();
    assert_eq!(view.layers()[0].format(), Format::Vdi);
    assert_eq!(view.size(), size);
}

#[test]
fn static_image_matches_qemu() {
    let s = Scratch::new("vdi-static");
    let img = s.path("fixed.vdi");
    let size = 9 * MB;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vdi",
        "-o",
        "static=on",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut rng = Rng::new(0x5d2);
    scatter_writes(&img, &mut rng, size, 12);
    compare_with_qemu(&img, "static");
    let details = open_view(&img).unwrap().layers()[0].details();
    assert!(
        details.contains(&("image type".to_string(), "fixed".to_string())),
        "{details:?}"
    );
}

#[test]
fn converted_image_with_holes_matches_qemu_and_reports_them() {
    let s = Scratch::new("vdi-convert");
    let raw = s.path("src.raw");
    let mut rng = Rng::new(0x5d3);
    let mut data = vec![0u8; (12 * MB) as usize];
    for (i, chunk) in data.chunks_mut(MB as usize).enumerate() {
        if i % 3 != 1 {
            chunk.copy_from_slice(&rng.bytes(MB as usize));
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let img = s.path("conv.vdi");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vdi",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    compare_with_qemu(&img, "converted");
    let view = open_view(&img).unwrap();
    assert_same("converted vs source", &read_all(&view), &data);
    assert_eq!(view.next_hole(0).unwrap(), MB);
    assert_eq!(view.next_data(MB).unwrap(), Some(2 * MB));
}

#[test]
fn odd_disk_size_rounds_up_like_qemu() {
    let s = Scratch::new("vdi-odd");
    let img = s.path("odd.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", img.to_str().unwrap(), "3M"]);
    write_random("vdi", &img, &mut Rng::new(0x5d4), 2 * MB, MB as usize);
    patch(&img, 0x170, &(3 * MB - 700).to_le_bytes());
    let view = open_view(&img).unwrap();
    assert_eq!(view.size(), 3 * MB - 512);
    compare_with_qemu(&img, "odd size");
}

#[test]
fn block_index_past_the_end_of_the_file_fails_the_read() {
    let s = Scratch::new("vdi-badindex");
    let img = s.path("bad.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", img.to_str().unwrap(), "4M"]);
    let mut rng = Rng::new(0x5d5);
    write_random("vdi", &img, &mut rng, 0, MB as usize);
    write_random("vdi", &img, &mut rng, 2 * MB, 4096);
    // Block 2 is data block 1; send it to block 40.
    patch(&img, 0x200 + 8, &40u32.to_le_bytes());
    let view = open_view(&img).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(view.read(0, &mut buf).unwrap(), 4096);
    let e = view.read(2 * MB, &mut buf).unwrap_err();
    assert_eq!(e.kind(), Kind::Corrupt);
    assert!(
        e.message().contains("block map entry at offset 0x208") && e.message().contains("block 2"),
        "{e}"
    );
}

#[test]
fn damaged_headers_fail_with_clear_errors() {
    let s = Scratch::new("vdi-hostile");
    let img = s.path("h.vdi");
    let fresh = |img: &Path| {
        let _ = std::fs::remove_file(img);
        qemu_img(&["create", "-q", "-f", "vdi", img.to_str().unwrap(), "8M"]);
    };
    let cases: &[(u64, &[u8], Kind, &str)] = &[
        (
            0x40,
            &0x11111111u32.to_le_bytes(),
            Kind::Corrupt,
            "signature at offset 0x40",
        ),
        (
            0x44,
            &0x00020000u32.to_le_bytes(),
            Kind::Unsupported,
            "VDI version 2.0",
        ),
        (
            0x48,
            &0x7fff_ffffu32.to_le_bytes(),
            Kind::Corrupt,
            "header size at offset 0x48",
        ),
        (
            0x4c,
            &7u32.to_le_bytes(),
            Kind::Corrupt,
            "image type at offset 0x4c",
        ),
        (
            0x178,
            &12345u32.to_le_bytes(),
            Kind::Corrupt,
            "block size at offset 0x178",
        ),
        (
            0x178,
            &0x8000_0000u32.to_le_bytes(),
            Kind::Corrupt,
            "block size at offset 0x178",
        ),
        (
            0x170,
            &(1u64 << 50).to_le_bytes(),
            Kind::Corrupt,
            "disk size at offset 0x170",
        ),
        (
            0x180,
            &1u32.to_le_bytes(),
            Kind::Corrupt,
            "disk size at offset 0x170",
        ),
        (
            0x180,
            &0x4000_0000u32.to_le_bytes(),
            Kind::Corrupt,
            "block count at offset 0x180",
        ),
        (
            0x154,
            &0x10_0000u32.to_le_bytes(),
            Kind::Corrupt,
            "data offset at offset 0x158",
        ),
        (
            0x184,
            &9u32.to_le_bytes(),
            Kind::Corrupt,
            "allocated block count",
        ),
        (0x4c, &4u32.to_le_bytes(), Kind::Corrupt, "uuidLinkage"),
    ];
    for (off, bytes, kind, text) in cases {
        fresh(&img);
        patch(&img, *off, bytes);
        let e = open_err(&img);
        assert_eq!(e.kind(), *kind, "patch at {off:#x}: {e}");
        assert!(
            e.message().contains(text) && e.message().contains("h.vdi"),
            "patch at {off:#x}: {e}"
        );
    }
}

#[test]
fn block_map_past_the_end_of_the_file_is_refused() {
    let s = Scratch::new("vdi-bigmap");
    let img = s.path("m.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", img.to_str().unwrap(), "8M"]);
    // A block map far out in the file, data after it.
    patch(&img, 0x154, &0x10_0000u32.to_le_bytes());
    patch(&img, 0x158, &0x20_0000u32.to_le_bytes());
    let e = open_err(&img);
    assert!(
        e.message().contains("block map at offset 0x100000")
            && e.message().contains("past the end"),
        "{e}"
    );
    // A truncated file: the header alone.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(0x100).unwrap();
    let e = open_err(&img);
    assert!(e.message().contains("too short"), "{e}");
}
