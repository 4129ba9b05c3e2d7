//! Several threads write, discard and read at once. Each writer owns interleaved 512-byte
//! stripes, so every cluster is shared by several writers (allocation, copy-on-write of
//! snapshot data and L2 tables race) while the final content is still determined: each
//! stripe holds its owner's last write.

mod common;
use common::*;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use vmfs_mount::cache::ByteCache;
use vmfs_mount::view::View;

const STRIPE: u64 = 512;
const WRITERS: u64 = 4;

fn run(opts: &str, name: &str) {
    let s = Scratch::new(name);
    let base = s.path("base.raw");
    let top = s.path("top.qcow2");
    let size: u64 = 1 << 20;
    let mut rng = Rng::new(42);
    std::fs::write(&base, rng.bytes(size as usize)).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
        &size.to_string(),
    ]);
    write_random("qcow2", &top, &mut rng, 0, 256 * 1024);
    qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
    let snap = qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]);
    let mut model = qemu_raw(&top, Some("qcow2"), &[]);
    let view = Arc::new(open_rw(&top));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2u64)
        .map(|t| {
            let (view, done) = (view.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(900 + t);
                let mut buf = vec![0u8; 70_000];
                while !done.load(Ordering::Acquire) {
                    let off = rng.below(size);
                    let n = 1 + rng.below(buf.len() as u64) as usize;
                    view.read(off, &mut buf[..n]).unwrap();
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let view = view.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                let mut mine = Vec::new();
                for i in 0..400 {
                    let stripe = rng.below(size / STRIPE / WRITERS) * WRITERS + t;
                    let off = stripe * STRIPE;
                    let data = if rng.below(8) == 0 {
                        view.discard(off, STRIPE).unwrap();
                        vec![0u8; STRIPE as usize]
                    } else {
                        let d = rng.bytes(STRIPE as usize);
                        view.write(off, &d).unwrap();
                        d
                    };
                    mine.push((off, data));
                    if i % 50 == 0 {
                        view.flush().unwrap();
                    }
                }
                mine
            })
        })
        .collect();
    for w in writers {
        for (off, data) in w.join().unwrap() {
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    done.store(true, Ordering::Release);
    for r in readers {
        r.join().unwrap();
    }
    view.flush().unwrap();
    assert_same("view after concurrent writes", &read_all(&view), &model);
    // The snapshot seen through the same open image (shared table cache) is unchanged.
    let layers = view.layers();
    let info = layers[0]
        .snapshots()
        .into_iter()
        .find(|s| s.name == "s1")
        .unwrap();
    let mut snap_layers = layers.to_vec();
    snap_layers[0] = layers[0].open_snapshot(info.index).unwrap();
    let snap_view = View::new(
        snap_layers,
        info.virtual_size,
        Arc::new(ByteCache::new(1 << 20)),
        64,
    );
    assert_same(
        "snapshot through the live image",
        &read_all(&snap_view),
        &snap,
    );
    drop(snap_view);
    drop(view);
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_same("convert", &qemu_raw(&top, Some("qcow2"), &[]), &model);
    assert_same(
        "snapshot",
        &qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]),
        &snap,
    );
}

#[test]
fn concurrent_writers_on_shared_clusters() {
    run("cluster_size=4096", "conc-v3");
}

#[test]
fn concurrent_writers_on_shared_subclusters() {
    run("cluster_size=16384,extended_l2=on", "conc-extl2");
}
