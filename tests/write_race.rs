//! Many threads allocate at once: in lock-step rounds every thread writes its own 4 KiB
//! blocks of the SAME fresh cluster (so copy-on-write of one guest cluster races between
//! all of them), and between rounds each writes or discards its own random blocks anywhere
//! (fresh clusters, clusters shared with a snapshot, clusters already allocated). Each
//! block has one owner, so the final content is determined; the image must then pass
//! `qemu-img check` and read back as the model, through the library and through QEMU.

mod common;
use common::*;
use std::process::Command;
use std::sync::{Arc, Barrier};
use vmfs_mount::view::View;

const BLOCK: u64 = 4096;
const THREADS: u64 = 8;
const CLUSTER: u64 = 65536;
const ROUNDS: u64 = 48;
const RANDOM_PER_ROUND: u64 = 6;

/// One thread's work: the (offset, bytes) it left in its own blocks, in order. After an
/// error it keeps meeting the others at the barrier (so nobody hangs) but does no more I/O.
fn worker(
    view: &View,
    barrier: &Barrier,
    t: u64,
    size: u64,
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let mut rng = Rng::new(7000 + t);
    let mut mine = Vec::new();
    let mut failed = None;
    for round in 0..ROUNDS {
        barrier.wait();
        if failed.is_none()
            && let Err(e) = round_ops(view, &mut rng, t, size, round, &mut mine)
        {
            failed = Some(format!("thread {t} round {round}: {e}"));
        }
    }
    failed.map_or(Ok(mine), Err)
}

fn round_ops(
    view: &View,
    rng: &mut Rng,
    t: u64,
    size: u64,
    round: u64,
    mine: &mut Vec<(u64, Vec<u8>)>,
) -> vmfs_mount::error::Result<()> {
    // The same cluster for every thread this round; the upper half of the disk is fresh
    // (never written before the test) and each round takes a new cluster there.
    let clusters = size / CLUSTER;
    let c = clusters / 2 + (round * 7) % (clusters / 2);
    for b in (t..CLUSTER / BLOCK).step_by(THREADS as usize) {
        let off = c * CLUSTER + b * BLOCK;
        let d = rng.bytes(BLOCK as usize);
        view.write(off, &d)?;
        mine.push((off, d));
    }
    for _ in 0..RANDOM_PER_ROUND {
        let block = rng.below(size / BLOCK / THREADS) * THREADS + t;
        let off = block * BLOCK;
        let d = if rng.below(10) == 0 {
            view.discard(off, BLOCK)?;
            vec![0u8; BLOCK as usize]
        } else {
            let d = rng.bytes(BLOCK as usize);
            view.write(off, &d)?;
            d
        };
        mine.push((off, d));
    }
    if round % 16 == 15 {
        view.flush()?;
    }
    Ok(())
}

fn run(opts: &str, name: &str) {
    let s = Scratch::new(name);
    let base = s.path("base.raw");
    let top = s.path("top.qcow2");
    let size: u64 = 8 << 20;
    let mut rng = Rng::new(4242);
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
    // Some clusters already allocated (and shared with a snapshot) in the lower half.
    write_random("qcow2", &top, &mut rng, 0, 1 << 20);
    write_random("qcow2", &top, &mut rng, 3 << 20, 300_000);
    qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
    let snap = qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]);
    let mut model = qemu_raw(&top, Some("qcow2"), &[]);
    let view = Arc::new(open_rw(&top));
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (view, barrier) = (view.clone(), barrier.clone());
            std::thread::spawn(move || worker(&view, &barrier, t, size))
        })
        .collect();
    for th in threads {
        for (off, data) in th.join().unwrap().unwrap() {
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    view.flush().unwrap();
    assert_same("view after racing writers", &read_all(&view), &model);
    drop(view);
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same("convert", &qemu_raw(&top, Some("qcow2"), &[]), &model);
    assert_same(
        "snapshot",
        &qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]),
        &snap,
    );
    // Reopened fresh (no cache), the library agrees too.
    let again = open_rw(&top);
    assert_same("reopened", &read_all(&again), &model);
}

#[test]
fn racing_allocations_of_the_same_clusters() {
    run("cluster_size=65536", "race-v3");
}

#[test]
fn racing_allocations_of_the_same_clusters_extended_l2() {
    run("cluster_size=65536,extended_l2=on", "race-extl2");
}

#[test]
fn racing_allocations_of_the_same_clusters_v2() {
    run("cluster_size=65536,compat=0.10", "race-v2");
}
