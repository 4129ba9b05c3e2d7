//! `--overlay`: prepare_overlay creates a qcow2 v3 overlay over the image that QEMU accepts,
//! writes land in it (the image is untouched), and an existing overlay is reused only when
//! its backing file is the image.

mod common;
use common::*;
use std::path::Path;
use vmfs_mount::backing_policy::BackingPolicy;
use vmfs_mount::error::Kind;
use vmfs_mount::format::Format;
use vmfs_mount::overlay::prepare_overlay;

fn info(image: &Path) -> String {
    qemu_img(&["info", image.to_str().unwrap()])
}

/// The backing file name as stored (qemu-img adds " (actual path: ...)" to relative ones).
fn stored_backing(image: &Path) -> String {
    let text = info(image);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("backing file: "))
        .unwrap_or_default();
    line.split(" (actual path")
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn overlay_over_raw_image_in_the_same_directory() {
    let s = Scratch::new("overlay-raw");
    let img = s.path("disk.img");
    let ov = s.path("disk.overlay.qcow2");
    let mut rng = Rng::new(3);
    let original = rng.bytes((3 << 20) + 512);
    std::fs::write(&img, &original).unwrap();
    prepare_overlay(&img, &ov, Format::Raw, &BackingPolicy::new()).unwrap();
    let text = info(&ov);
    assert_eq!(stored_backing(&ov), "disk.img");
    assert!(text.contains("backing file format: raw"), "{text}");
    assert!(
        text.contains(&format!("virtual size: 3 MiB ({} bytes)", original.len())),
        "{text}"
    );
    qemu_img(&["check", ov.to_str().unwrap()]);

    let mut model = original.clone();
    {
        let view = open_rw(&ov);
        for _ in 0..50 {
            let off = rng.below(model.len() as u64 - 70_000) as usize;
            let n = 1 + rng.below(70_000) as usize;
            let data = rng.bytes(n);
            view.write(off as u64, &data).unwrap();
            model[off..off + data.len()].copy_from_slice(&data);
        }
        view.discard(65536, 65536).unwrap();
        model[65536..131072].fill(0);
        view.flush().unwrap();
    }
    qemu_img(&["check", ov.to_str().unwrap()]);
    assert_same("overlay", &qemu_raw(&ov, Some("qcow2"), &[]), &model);
    assert!(
        std::fs::read(&img).unwrap() == original,
        "the image was written"
    );
    // Reused as is.
    prepare_overlay(&img, &ov, Format::Raw, &BackingPolicy::new()).unwrap();
    assert_same("reused", &read_all(&open_view(&ov).unwrap()), &model);
}

#[test]
fn overlay_elsewhere_stores_an_absolute_path_and_wrong_overlays_are_refused() {
    let s = Scratch::new("overlay-abs");
    std::fs::create_dir_all(s.path("imgs")).unwrap();
    std::fs::create_dir_all(s.path("ovl")).unwrap();
    let img = s.path("imgs/base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "5M"]);
    let mut rng = Rng::new(8);
    write_random("qcow2", &img, &mut rng, 12345, 100_000);
    let ov = s.path("ovl/top.qcow2");
    prepare_overlay(&img, &ov, Format::Qcow2, &BackingPolicy::new()).unwrap();
    let text = info(&ov);
    let abs = img.canonicalize().unwrap();
    assert_eq!(stored_backing(&ov), abs.to_str().unwrap());
    assert!(text.contains("backing file format: qcow2"), "{text}");
    assert_same(
        "overlay reads the image",
        &qemu_raw(&ov, Some("qcow2"), &[]),
        &qemu_raw(&img, Some("qcow2"), &[]),
    );

    // Below the overlay's directory: relative.
    let sub = s.path("imgs/ov2.qcow2");
    prepare_overlay(&img, &sub, Format::Qcow2, &BackingPolicy::new()).unwrap();
    assert_eq!(stored_backing(&sub), "base.qcow2");

    // Not qcow2, no backing file, another backing file: refused.
    let other = s.path("ovl/other.raw");
    std::fs::write(&other, [0u8; 4096]).unwrap();
    assert_eq!(
        prepare_overlay(&img, &other, Format::Qcow2, &BackingPolicy::new())
            .unwrap_err()
            .kind(),
        Kind::InvalidInput
    );
    let plain = s.path("ovl/plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", plain.to_str().unwrap(), "5M"]);
    assert_eq!(
        prepare_overlay(&img, &plain, Format::Qcow2, &BackingPolicy::new())
            .unwrap_err()
            .kind(),
        Kind::InvalidInput
    );
    let img2 = s.path("imgs/base2.qcow2");
    std::fs::copy(&img, &img2).unwrap();
    let e = prepare_overlay(&img2, &ov, Format::Qcow2, &BackingPolicy::new()).unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidInput);
    assert!(e.to_string().contains("another file"), "{e}");
}
