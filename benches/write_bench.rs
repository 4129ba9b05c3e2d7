//! Write throughput through the library next to `qemu-img bench` on the same kind of image.
//! Not part of the test suite (timings are not assertions): `cargo bench --bench write_bench`.

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::format::OpenCtx;
use vmfs_mount::view::View;

const SIZE: u64 = 1 << 30;

fn open_rw(image: &Path) -> View {
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(64 << 20)), true);
    let layers = vmfs_mount::chain::open_chain(image, None, &ctx).unwrap();
    let size = layers[0].virtual_size();
    View::new(layers, size, Arc::new(ByteCache::new(8 << 20)), 4096)
}

fn fresh(s: &Scratch, name: &str) -> std::path::PathBuf {
    let p = s.path(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    p
}

fn report(what: &str, bytes: u64, ops: u64, t: Instant) {
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{what:<44} {:>8.1} MiB/s {:>9.0} IOPS",
        bytes as f64 / secs / 1048576.0,
        ops as f64 / secs
    );
}

fn qemu_bench(what: &str, image: &Path, bs: u64, count: u64) {
    let t = Instant::now();
    let (bs_s, count_s) = (bs.to_string(), count.to_string());
    qemu_img(&[
        "bench",
        "-q",
        "-w",
        "-f",
        "qcow2",
        "-t",
        "writeback",
        "-s",
        &bs_s,
        "-S",
        &bs_s,
        "-c",
        &count_s,
        image.to_str().unwrap(),
    ]);
    report(what, bs * count, count, t);
}

fn main() {
    let s = Scratch::new("write-bench");
    let mut rng = Rng::new(1);
    let block = rng.bytes(1 << 20);

    // 1 MiB sequential into a fresh image (allocating).
    let img = fresh(&s, "seq.qcow2");
    let view = open_rw(&img);
    let t = Instant::now();
    for off in (0..SIZE / 2).step_by(1 << 20) {
        view.write(off, &block).unwrap();
    }
    view.flush().unwrap();
    report(
        "library: 1M sequential, allocating",
        SIZE / 2,
        (SIZE / 2) >> 20,
        t,
    );
    // 4 KiB random over the now allocated half (the in-place path).
    let n = 50_000u64;
    let t = Instant::now();
    for _ in 0..n {
        let off = rng.below(SIZE / 2 / 4096) * 4096;
        view.write(off, &block[..4096]).unwrap();
    }
    view.flush().unwrap();
    report("library: 4k random, allocated clusters", n * 4096, n, t);
    // 4 KiB random over the unallocated half (allocating, partial-cluster fill).
    let n = 5_000u64;
    let t = Instant::now();
    for _ in 0..n {
        let off = SIZE / 2 + rng.below(SIZE / 2 / 4096) * 4096;
        view.write(off, &block[..4096]).unwrap();
    }
    view.flush().unwrap();
    report("library: 4k random, allocating", n * 4096, n, t);
    drop(view);
    // Baseline: plain pwrite of 4 KiB at random offsets of the same file.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let host_len = f.metadata().unwrap().len();
    let n = 50_000u64;
    let t = Instant::now();
    for _ in 0..n {
        use std::os::unix::fs::FileExt;
        let off = rng.below(host_len / 2 / 4096) * 4096;
        f.write_all_at(&block[..4096], off).unwrap();
    }
    f.sync_data().unwrap();
    report("baseline: pwrite 4k random, same file", n * 4096, n, t);

    let img = fresh(&s, "qemu.qcow2");
    qemu_bench(
        "qemu-img bench: 1M sequential, allocating",
        &img,
        1 << 20,
        (SIZE / 2) >> 20,
    );
    qemu_bench(
        "qemu-img bench: 4k sequential, allocated",
        &img,
        4096,
        50_000,
    );
    let img2 = fresh(&s, "qemu2.qcow2");
    qemu_bench(
        "qemu-img bench: 4k sequential, allocating",
        &img2,
        4096,
        50_000,
    );
}
