//! VHDX hostile-input and log tests: dirty logs replayed in memory, damaged logs, and
//! corrupted headers, region tables, metadata and BAT entries that must give clear errors.

mod common;
mod vhdx_gen;

use common::*;
use std::path::PathBuf;
use vhdx_gen::model::*;
use vhdx_gen::*;
use vmfs_mount::error::Kind;

#[test]
fn dirty_log_is_replayed_in_memory_only() {
    let s = Scratch::new("vhdx-log");
    let mut rng = Rng::new(12);
    let (img_bytes, spec) = dirty_image(&mut rng);
    let img = s.path("dirty.vhdx");
    write(&img, &img_bytes);
    let view = open_view(&img).unwrap();
    let want = model(&spec);
    assert_same("replayed", &read_all(&view), &want);
    let log = view.layers()[0]
        .details()
        .into_iter()
        .find(|(k, _)| k == "log")
        .unwrap()
        .1;
    assert!(log.contains("replayed 2 entries"), "{log}");
    drop(view);
    assert!(
        std::fs::read(&img).unwrap() == img_bytes,
        "the image was modified"
    );

    // QEMU agrees once it has replayed the log into a copy
    let copy = s.path("copy.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    let _ = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-r", "all", "-f", "vhdx"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_same("qemu replay", &qemu_raw(&copy, Some("vhdx"), &[]), &want);
}

#[test]
fn damaged_or_truncated_logs() {
    let s = Scratch::new("vhdx-badlog");
    let mut rng = Rng::new(13);
    let (mut img_bytes, _) = dirty_image(&mut rng);
    // damage entry 2's CRC: entry 1 alone is a valid sequence and is replayed
    let e2 = LOG_OFF as usize + 2 * 4096;
    img_bytes[e2 + 100] ^= 1;
    let img = s.path("badcrc.vhdx");
    write(&img, &img_bytes);
    let view = open_view(&img).unwrap();
    let log = view.layers()[0]
        .details()
        .into_iter()
        .find(|(k, _)| k == "log")
        .unwrap()
        .1;
    assert!(
        log.contains("replayed 1 entries (sequence 41..=41"),
        "{log}"
    );
    // with entry 1 damaged too nothing is valid: the log is ignored (as QEMU does) and the
    // stale BAT shows through
    img_bytes[LOG_OFF as usize + 100] ^= 1;
    write(&img, &img_bytes);
    let view = open_view(&img).unwrap();
    let details = view.layers()[0].details();
    assert!(
        details.contains(&("log".into(), "log GUID set, no valid entries".into())),
        "{details:?}"
    );
    let mut first = vec![1u8; 4096];
    view.read(0, &mut first).unwrap();
    assert!(first.iter().all(|&b| b == 0));
    // a file shorter than the entry's FlushedFileOffset was truncated
    let (img_bytes, _) = dirty_image(&mut rng);
    let short = s.path("short.vhdx");
    write(&short, &img_bytes[..img_bytes.len() - (1 << 20)]);
    let e = open_err(&short);
    assert!(e.to_string().contains("FlushedFileOffset"), "{e}");
}

/// A simple valid image for the hostile tests, and the path it was written to.
fn hostile_base(s: &Scratch, rng: &mut Rng) -> (Vec<u8>, PathBuf) {
    let mut spec = Spec::new(4 << 20, 1 << 20, 512);
    spec.blocks = vec![
        Block::Full(rng.bytes(1 << 20)),
        Block::Zero,
        Block::Full(rng.bytes(1 << 20)),
    ];
    (build(&spec), s.path("h.vhdx"))
}

#[test]
fn hostile_images_give_clear_errors() {
    let s = Scratch::new("vhdx-hostile");
    let mut rng = Rng::new(14);
    let (base, path) = hostile_base(&s, &mut rng);
    type Edit = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Edit, Kind, &str)> = vec![
        (
            "both header CRCs",
            |i| {
                i[HEADER_OFFS[0] as usize + 200] ^= 1;
                i[HEADER_OFFS[1] as usize + 200] ^= 1;
            },
            Kind::Corrupt,
            "no valid header",
        ),
        (
            "region tables past EOF",
            |i| i.truncate(200 << 10),
            Kind::Corrupt,
            "region table",
        ),
        (
            "both region tables",
            |i| {
                i[REGION_OFFS[0] as usize + 100] ^= 1;
                i[REGION_OFFS[1] as usize + 100] ^= 1;
            },
            Kind::Corrupt,
            "no valid region table",
        ),
        (
            "BAT past EOF",
            |i| i.truncate(BAT_OFF as usize),
            Kind::Corrupt,
            "BAT region",
        ),
        (
            "block size 3 MiB",
            |i| {
                let at = metadata_item(i, FILE_PARAMS);
                set_u32(i, at, 3 << 20);
            },
            Kind::Corrupt,
            "block size",
        ),
        (
            "block size 512 MiB",
            |i| {
                let at = metadata_item(i, FILE_PARAMS);
                set_u32(i, at, 512 << 20);
            },
            Kind::Corrupt,
            "block size",
        ),
        (
            "virtual size 65 TiB",
            |i| {
                let at = metadata_item(i, VDISK_SIZE);
                set_u64(i, at, 65 << 40);
            },
            Kind::Corrupt,
            "virtual disk size",
        ),
        (
            "BAT too small for the disk",
            |i| {
                let at = metadata_item(i, VDISK_SIZE);
                set_u64(i, at, 60 << 40);
            },
            Kind::Corrupt,
            "do not fit",
        ),
        (
            "metadata item outside its region",
            |i| {
                let e = metadata_entry(i, VDISK_SIZE).unwrap();
                set_u32(i, e + 16, (1 << 20) - 4);
            },
            Kind::Corrupt,
            "outside",
        ),
        (
            "unknown required metadata item",
            |i| {
                let e = metadata_entry(i, VDISK_SIZE).unwrap() as usize;
                i[e] ^= 0xFF;
            },
            Kind::Unsupported,
            "unknown required metadata item",
        ),
        (
            "unknown required region",
            |i| {
                for t in REGION_OFFS {
                    let e = t as usize + 16 + 32 * 2;
                    i[e..e + 16].copy_from_slice(&[0x77; 16]);
                    set_u64(i, e as u64 + 16, 40 << 20);
                    set_u32(i, e as u64 + 24, 1 << 20);
                    set_u32(i, e as u64 + 28, 1);
                    set_u32(i, t + 8, 3);
                    fix_crc(i, t, 64 << 10);
                }
            },
            Kind::Unsupported,
            "unknown required region",
        ),
    ];
    for (what, edit, kind, needle) in cases {
        let mut img = base.clone();
        edit(&mut img);
        write(&path, &img);
        let e = open_err(&path);
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(
            e.to_string().contains(needle) && e.to_string().contains("h.vhdx"),
            "{what}: {e}"
        );
    }
    // one damaged header or region table is survivable
    for off in [HEADER_OFFS[1], REGION_OFFS[0]] {
        let mut img = base.clone();
        img[off as usize + 300] ^= 1;
        write(&path, &img);
        assert!(open_view(&path).is_ok());
    }
}

#[test]
fn hostile_bat_entries_fail_reads_not_opens() {
    let s = Scratch::new("vhdx-hostile-bat");
    let mut rng = Rng::new(15);
    let (base, path) = hostile_base(&s, &mut rng);
    let len = base.len() as u64;
    for (what, entry, cut, needle) in [
        ("offset past EOF", (len + MIB) | 6, 0, "outside the file"),
        (
            "block reaching past EOF",
            (len - MIB) | 6,
            MIB / 2,
            "outside the file",
        ),
        ("offset in the header area", 6, 0, "outside the file"),
        (
            "partially present in a dynamic disk",
            (4 * MIB) | 7,
            0,
            "state 7",
        ),
        ("reserved state 4", 4, 0, "state 4"),
    ] {
        let mut img = base.clone();
        set_u64(&mut img, bat_entry_offset(1), entry);
        img.truncate((len - cut) as usize);
        write(&path, &img);
        let view = open_view(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        view.read(0, &mut buf).unwrap();
        let e = view.read(MIB + 512, &mut buf).unwrap_err();
        assert_eq!(e.kind(), Kind::Corrupt, "{what}: {e}");
        assert!(
            e.to_string().contains(needle) && e.to_string().contains("payload BAT entry 1"),
            "{what}: {e}"
        );
    }
}

#[test]
fn differencing_without_its_bitmap_block_fails_reads() {
    let s = Scratch::new("vhdx-hostile-bitmap");
    let mut rng = Rng::new(16);
    let mut base = Spec::new(2 << 20, 1 << 20, 512);
    base.blocks = vec![Block::Full(rng.bytes(1 << 20))];
    write(&s.path("base.vhdx"), &build(&base));
    let mut spec = Spec::new(2 << 20, 1 << 20, 512);
    spec.parent = Some(child_of(&s.path("base.vhdx"), "base.vhdx"));
    spec.blocks = vec![Block::Partial(rng.bytes(1 << 20), vec![true; 2048])];
    let mut img = build(&spec);
    let bitmap_idx = spec.chunk_ratio();
    set_u64(&mut img, bat_entry_offset(bitmap_idx), 0);
    write(&s.path("c.avhdx"), &img);
    let view = open_view(&s.path("c.avhdx")).unwrap();
    let e = view.read(0, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("sector bitmap"), "{e}");
    // and a differencing disk without a parent locator does not open
    spec.parent = Some(Vec::new());
    let mut img = build(&spec);
    let e = metadata_entry(
        &img,
        guid(0xA8D35F2D, 0xB30B, 0x454D, 0xABF7_D3D8_4834_AB0C),
    )
    .unwrap();
    img[e as usize..e as usize + 16].fill(0);
    set_u32(&mut img, e + 24, 0);
    write(&s.path("noloc.avhdx"), &img);
    assert!(
        open_err(&s.path("noloc.avhdx"))
            .to_string()
            .contains("parent locator")
    );
}
