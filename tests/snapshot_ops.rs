//! Internal snapshots taken, renamed and deleted through the writer while the image is open,
//! against byte models: QEMU must list them (`qemu-img snapshot -l`), read each one as the
//! model says (`qemu-img convert -l`), and find no error and no leak (`qemu-img check`),
//! including after deletions freed what only a snapshot held.

mod common;
mod qcow2_support;

use common::*;
use qcow2_support::{create, overlay};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vmfs_mount::format::Layer;
use vmfs_mount::format::qcow2::Qcow2Layer;
use vmfs_mount::format::qcow2::write::Qcow2Writer;
use vmfs_mount::view::View;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn check_clean(image: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "qemu-img check {}: {text}",
        image.display()
    );
    text
}

fn top(view: &View) -> &Qcow2Layer {
    let l: &dyn Layer = &*view.layers()[0];
    (l as &dyn std::any::Any)
        .downcast_ref::<Qcow2Layer>()
        .expect("qcow2 top")
}

fn writer(view: &View) -> &Arc<Qcow2Writer> {
    top(view).writer.as_ref().expect("writable")
}

/// Random writes and discards through `view`, applied to `model` too.
fn workload(view: &View, model: &mut [u8], rng: &mut Rng, ops: usize) {
    for i in 0..ops {
        let len = 1 + rng.below(200 << 10) as usize;
        let off = rng.below(SIZE - len as u64) as usize;
        if i % 7 == 6 {
            view.discard(off as u64, len as u64).unwrap();
            model[off..off + len].fill(0);
        } else {
            let data = rng.bytes(len);
            view.write(off as u64, &data).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
    }
    view.flush().unwrap();
}

fn listed(image: &Path) -> String {
    qemu_img(&["snapshot", "-l", image.to_str().unwrap()])
}

fn run_case(opts: &str, backing: bool, seed: u64) {
    run_case_with(opts, backing, false, seed)
}

fn run_case_with(opts: &str, backing: bool, compressed: bool, seed: u64) {
    let d = Scratch::new(&format!("snapops-{seed}"));
    let mut rng = Rng::new(seed);
    let img = d.path("top.qcow2");
    let mut model = vec![0u8; SIZE as usize];
    if backing {
        let base = d.path("base.qcow2");
        create(&base, "", SIZE);
        let data = write_random("qcow2", &base, &mut rng, 0, SIZE as usize / 2);
        model[..data.len()].copy_from_slice(&data);
        overlay(&img, "base.qcow2", "qcow2", None, opts);
    } else if compressed {
        // Compressed clusters share host clusters: each holds one reference per entry.
        let raw = d.path("src.qcow2");
        create(&raw, "", SIZE);
        qemu_io("qcow2", &raw, &[format!("write -P 0x5a 0 {}", 5 * MIB)]);
        model[..5 * MIB as usize].fill(0x5a);
        let (r, i) = (raw.to_str().unwrap(), img.to_str().unwrap());
        qemu_img(&["convert", "-c", "-O", "qcow2", r, i]);
        let map = qemu_img(&["map", "--output=json", i]);
        assert!(map.contains("\"compressed\": true"), "{map}");
    } else {
        create(&img, opts, SIZE);
    }
    // A snapshot QEMU made before we open the image.
    let data = write_random("qcow2", &img, &mut rng, MIB, 3 * MIB as usize);
    model[MIB as usize..4 * MIB as usize].copy_from_slice(&data);
    qemu_img(&["snapshot", "-c", "old", img.to_str().unwrap()]);
    let old_model = model.clone();

    let mut models = Vec::new();
    {
        let view = open_rw(&img);
        let w = writer(&view);
        for (k, name) in ["s1", "s2", "s3"].iter().enumerate() {
            workload(&view, &mut model, &mut rng, 25 + k * 10);
            let made = w.create_snapshot(name).unwrap();
            assert_eq!(made.name, *name);
            models.push((name.to_string(), model.clone()));
            // Shown at once, with the bytes of that instant.
            let layer = Qcow2Layer::made_snapshot(&top(&view).image, &made);
            let mut layers = vec![layer];
            layers.extend(view.layers()[1..].iter().cloned());
            let sv = View::new(
                layers,
                made.size,
                Arc::new(vmfs_mount::cache::ByteCache::new(1 << 20)),
                64,
            );
            assert_same(&format!("{name} right after"), &read_all(&sv), &model);
        }
        let e = w.create_snapshot("s2").unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST, "{e}");
        workload(&view, &mut model, &mut rng, 30);
        // Rename s1 to "renamed"; delete s2.
        let ids: Vec<(String, String)> = w
            .snapshot_entries()
            .iter()
            .map(|s| (s.name.clone(), s.id.clone()))
            .collect();
        let id = |n: &str| ids.iter().find(|(m, _)| m == n).unwrap().1.clone();
        w.rename_snapshot(&id("s1"), "renamed").unwrap();
        assert_eq!(
            w.rename_snapshot(&id("s3"), "old").unwrap_err().errno(),
            libc::EEXIST
        );
        w.delete_snapshot(&id("s2")).unwrap();
        models.retain(|(n, _)| n != "s2");
        models[0].0 = "renamed".into();
        workload(&view, &mut model, &mut rng, 30);
        assert_same("live", &read_all(&view), &model);
    }
    let text = listed(&img);
    for n in ["old", "renamed", "s3"] {
        assert!(text.contains(n), "{n} not listed: {text}");
    }
    assert!(!text.contains("s1") && !text.contains("s2"), "{text}");
    check_clean(&img);
    assert_same("live (qemu)", &qemu_raw(&img, None, &[]), &model);
    assert_same(
        "old (qemu)",
        &qemu_raw(&img, None, &["-l", "snapshot.name=old"]),
        &old_model,
    );
    for (n, m) in &models {
        let arg = format!("snapshot.name={n}");
        assert_same(n, &qemu_raw(&img, None, &["-l", &arg]), m);
    }

    // Deleting every snapshot frees what they held: the file shrinks back to what the live
    // disk needs, and the image stays clean.
    use std::os::unix::fs::MetadataExt;
    let used = || std::fs::metadata(&img).unwrap().blocks() * 512;
    let before = used();
    {
        let view = open_rw(&img);
        let w = writer(&view);
        for s in w.snapshot_entries() {
            w.delete_snapshot(&s.id).unwrap();
        }
        assert!(w.snapshot_entries().is_empty());
    }
    let after = used();
    // Each snapshot held clusters the live disk overwrote since (at least 1 MiB here).
    assert!(
        after + MIB < before,
        "deleting snapshots freed too little: {before} -> {after} bytes"
    );
    check_clean(&img);
    assert!(!listed(&img).contains("s3"));
    {
        // Written in place again where the snapshots no longer share.
        let view = open_rw(&img);
        workload(&view, &mut model, &mut rng, 10);
    }
    check_clean(&img);
    assert_same("live at the end", &qemu_raw(&img, None, &[]), &model);
}

#[test]
fn snapshots_of_a_plain_image() {
    run_case("", false, 71);
}

#[test]
fn snapshots_of_an_overlay_with_small_clusters_and_narrow_refcounts() {
    run_case("cluster_size=4096,refcount_bits=4", true, 72);
}

#[test]
fn snapshots_of_v2_and_extended_l2_images() {
    run_case("compat=0.10", false, 73);
    run_case("extended_l2=on,cluster_size=65536", true, 74);
}

#[test]
fn snapshots_of_a_compressed_image() {
    run_case_with("", false, true, 75);
}
