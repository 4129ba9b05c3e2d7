//! Clone management: clone files are qcow2 overlays QEMU reads as we do, found again by a
//! new CloneDir when their backing file is the image, and read through a view over the
//! shared base exactly as through their whole chain.

mod common;
mod qcow2_support;

use common::*;
use qcow2_support::*;
use std::path::Path;
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::clones::CloneDir;
use vmfs_mount::format::{Format, Layer, OpenCtx};
use vmfs_mount::view::View;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// A two-layer golden image: data, zeros and compressed clusters in both layers.
fn golden(d: &Scratch, rng: &mut Rng) -> std::path::PathBuf {
    let base = d.path("base.qcow2");
    create(&base, "", 16 * MIB);
    apply(
        "qcow2",
        &base,
        rng,
        &[
            Op::Compressed(0, 128 * KIB),
            Op::Compressed(8 * MIB, 64 * KIB),
        ],
    );
    apply_random(&base, rng, 16 * MIB, 30, 300 * KIB);
    let top = d.path("golden.qcow2");
    overlay(&top, "base.qcow2", "qcow2", None, "cluster_size=16k");
    apply_random(&top, rng, 16 * MIB, 30, 100 * KIB);
    apply("qcow2", &top, rng, &[Op::Zero(4 * MIB, 300 * KIB)]);
    top
}

fn layers_of(image: &Path, tables: &Arc<ByteCache>) -> Vec<Arc<dyn Layer>> {
    vmfs_mount::chain::open_chain(image, None, &OpenCtx::new(tables.clone(), false)).unwrap()
}

fn backing_filename(image: &Path) -> String {
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        image.to_str().unwrap(),
    ]))
    .unwrap();
    info["backing-filename"].as_str().unwrap().to_string()
}

#[test]
fn clones_are_qemu_overlays_found_again_and_read_like_their_chain() {
    let d = Scratch::new("clones-lib");
    let mut rng = Rng::new(31);
    let image = golden(&d, &mut rng);
    let dir = d.path("clones");
    let clones = CloneDir::new(&dir, &image, Format::Qcow2, 16 * MIB).unwrap();
    let a = clones.create("web-a").unwrap();
    let b = clones.create("web b").unwrap();
    assert_eq!(a, dir.join("web-a.qcow2"));
    assert!(
        clones.create("web-a").is_err(),
        "an existing clone is not replaced"
    );
    for bad in ["", "..", "x/y"] {
        assert!(clones.create(bad).is_err(), "{bad:?}");
    }
    // Relative to the clone directory, and QEMU agrees about what it names.
    assert_eq!(backing_filename(&a), "../golden.qcow2");
    assert_eq!(
        qemu_raw(&a, None, &[]),
        qemu_raw(&image, None, &[]),
        "a fresh clone reads as the image"
    );
    // Strangers in the directory are left alone.
    let other = d.path("other.qcow2");
    create(&other, "", 16 * MIB);
    overlay(
        &dir.join("stranger.qcow2"),
        "../other.qcow2",
        "qcow2",
        None,
        "",
    );
    create(&dir.join("standalone.qcow2"), "", 16 * MIB);
    std::fs::write(dir.join("notes.qcow2"), b"not an image").unwrap();
    std::fs::write(dir.join("readme.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink(&a, dir.join("link.qcow2")).unwrap();
    let found = clones.discover().unwrap();
    let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["web b", "web-a"]);

    // Write through a view over the shared base; read back; QEMU reads the same clone.
    let tables = Arc::new(ByteCache::new(32 << 20));
    let clusters = Arc::new(ByteCache::new(8 << 20));
    let base_layers = layers_of(&image, &tables);
    let base = Arc::new(View::new(
        base_layers.clone(),
        16 * MIB,
        clusters.clone(),
        4096,
    ));
    let mut model = read_all(&base);
    let chain = clones
        .open(&a, &base_layers, &OpenCtx::new(tables.clone(), false))
        .unwrap();
    assert_eq!(chain.len(), base_layers.len() + 1);
    let view = View::over(chain[..1].to_vec(), base.clone(), clusters.clone());
    for i in 0..60 {
        let len = 1 + rng.below(200 * KIB) as usize;
        let off = rng.below(16 * MIB - len as u64) as usize;
        if i % 7 == 6 {
            view.discard(off as u64, len as u64).unwrap();
            model[off..off + len].fill(0);
        } else {
            let data = rng.bytes(len);
            view.write(off as u64, &data).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
    }
    same("clone through the view", &read_all(&view), &model);
    // The same chain read as one plain view gives the same bytes and the same holes.
    let plain = View::new(chain.clone(), 16 * MIB, clusters.clone(), 4096);
    same("clone as a plain view", &read_all(&plain), &model);
    let mut off = 0;
    while let Some(data) = view.next_data(off).unwrap() {
        assert_eq!(
            plain.next_data(off).unwrap(),
            Some(data),
            "SEEK_DATA from {off:#x}"
        );
        let hole = view.next_hole(data).unwrap();
        assert_eq!(
            plain.next_hole(data).unwrap(),
            hole,
            "SEEK_HOLE from {data:#x}"
        );
        off = hole;
    }
    assert_eq!(
        view.allocated_bytes().unwrap(),
        plain.allocated_bytes().unwrap()
    );
    view.flush().unwrap();
    drop((view, plain, chain, base, base_layers));
    let check = qemu_img(&["check", a.to_str().unwrap()]);
    assert!(check.contains("No errors"), "{check}");
    same("clone through QEMU", &qemu_raw(&a, None, &[]), &model);
    assert_same(
        "image untouched",
        &qemu_raw(&image, None, &[]),
        &read_all(&open_view(&image).unwrap()),
    );

    // A new CloneDir (a remount) finds both again; delete removes one.
    let again = CloneDir::new(&dir, &image, Format::Qcow2, 16 * MIB).unwrap();
    assert_eq!(again.discover().unwrap(), found);
    again.delete("web b").unwrap();
    assert!(!b.exists());
    assert_eq!(again.discover().unwrap().len(), 1);
    assert!(again.delete("web b").is_err());
}

#[test]
fn a_clone_directory_elsewhere_stores_a_path_that_resolves() {
    let d = Scratch::new("clones-path");
    let mut rng = Rng::new(32);
    let image = golden(&d, &mut rng);
    // Beside the image: a plain name; deeper: climbs with ..; through a symlink: absolute.
    let here = CloneDir::new(&d.0, &image, Format::Qcow2, 16 * MIB).unwrap();
    assert_eq!(backing_filename(&here.create("c").unwrap()), "golden.qcow2");
    let deep = CloneDir::new(&d.path("x/y"), &image, Format::Qcow2, 16 * MIB).unwrap();
    assert_eq!(
        backing_filename(&deep.create("c").unwrap()),
        "../../golden.qcow2"
    );
    std::os::unix::fs::symlink(d.path("x/y"), d.path("link")).unwrap();
    let linked = CloneDir::new(&d.path("link"), &image, Format::Qcow2, 16 * MIB).unwrap();
    let c2 = linked.create("c2").unwrap();
    assert_eq!(
        backing_filename(&c2),
        image.canonicalize().unwrap().to_str().unwrap()
    );
    for c in [d.path("c.qcow2"), d.path("x/y/c.qcow2"), c2] {
        same(
            &c.display().to_string(),
            &qemu_raw(&c, None, &[]),
            &qemu_raw(&image, None, &[]),
        );
    }
}

/// A view over a base with an own layer of small clusters: its unallocated pieces start
/// inside the base's extents.
#[test]
fn a_view_over_a_base_splits_base_extents_where_the_top_holds_data() {
    let d = Scratch::new("clones-over");
    let mut rng = Rng::new(33);
    let image = golden(&d, &mut rng);
    let top = d.path("small.qcow2");
    overlay(&top, "golden.qcow2", "qcow2", None, "cluster_size=4k");
    apply_random(&top, &mut rng, 16 * MIB, 200, 12 * KIB);
    apply("qcow2", &top, &mut rng, &[Op::Zero(5 * MIB + 4096, 8192)]);
    let tables = Arc::new(ByteCache::new(32 << 20));
    let clusters = Arc::new(ByteCache::new(8 << 20));
    let base_layers = layers_of(&image, &tables);
    let base = Arc::new(View::new(base_layers, 16 * MIB, clusters.clone(), 4096));
    let own = vmfs_mount::format::open_detect(&top, None, &OpenCtx::new(tables, false)).unwrap();
    let view = View::over(vec![own], base, clusters);
    same(
        "view over the base",
        &read_all(&view),
        &qemu_raw(&top, None, &[]),
    );
}
