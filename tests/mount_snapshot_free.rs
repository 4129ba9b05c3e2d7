//! `rmdir snapshots/NAME` frees what only that snapshot held: many snapshots sharing clusters
//! with each other and the live disk, deleted out of order with writes between, leave an
//! image `qemu-img check` finds clean with no leaked cluster, the other snapshots as taken,
//! and, once all are gone, no more allocated clusters than the live disk needs.

mod common;
mod mount_support;
mod qcow2_support;

use common::*;
use mount_support::*;
use qcow2_support::{create, same};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

/// `qemu-img check` output; asserts no errors and no leaks.
fn check_no_leaks(what: &str, image: &Path) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "{what}: qemu-img check: {text}"
    );
    text
}

/// The "A/B = ..% allocated" count of `qemu-img check`: clusters in use.
fn allocated(check: &str) -> u64 {
    let line = check.lines().find(|l| l.contains("allocated")).unwrap();
    line.split('/').next().unwrap().trim().parse().unwrap()
}

/// Random writes of up to 1 MiB at 4 KiB-aligned offsets, through `disk` and into `live`.
fn scribble(disk: &std::fs::File, rng: &mut Rng, live: &mut [u8], count: usize) {
    for _ in 0..count {
        let len = (1 + rng.below(256) as usize) * 4096;
        let off = (rng.below((SIZE - len as u64) / 4096) * 4096) as usize;
        let data = rng.bytes(len);
        disk.write_all_at(&data, off as u64).unwrap();
        live[off..off + len].copy_from_slice(&data);
    }
    disk.sync_all().unwrap();
}

#[test]
fn rmdir_frees_clusters_of_shared_snapshots_without_leaks() {
    if !is_root() {
        return;
    }
    let d = Scratch::new("msnap-free");
    let mut rng = Rng::new(91);
    let img = d.path("vm.qcow2");
    create(&img, "", SIZE);
    write_random("qcow2", &img, &mut rng, 0, (SIZE / 2) as usize);
    let mut live = qemu_raw(&img, None, &[]);
    let (guard, mnt) = mount(&img, &d.0, &[]);
    let snaps = mnt.join("snapshots");
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap();
    // Six snapshots, each sharing most clusters with the one before and the live disk.
    let mut taken: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..6 {
        let name = format!("s{i}");
        std::fs::create_dir(snaps.join(&name)).unwrap();
        taken.push((name, live.clone()));
        scribble(&disk, &mut rng, &mut live, 12);
    }
    // Deleted out of order (middle first, then the oldest, ...), writing between.
    for name in ["s2", "s0", "s5", "s3"] {
        std::fs::remove_dir(snaps.join(name)).unwrap();
        taken.retain(|(n, _)| n != name);
        scribble(&disk, &mut rng, &mut live, 4);
        for (n, want) in &taken {
            let got = std::fs::read(snaps.join(format!("{n}/disk.raw"))).unwrap();
            same(&format!("{n} after rmdir {name}"), &got, want);
        }
    }
    drop(disk);
    drop(guard);
    check_no_leaks("two snapshots left", &img);
    same("live", &qemu_raw(&img, None, &[]), &live);
    for (n, want) in &taken {
        let opt = format!("snapshot.name={n}");
        same(n, &qemu_raw(&img, None, &["-l", &opt]), want);
    }

    // The last two go; what is left is what the live disk needs, as QEMU would leave it.
    let (guard, mnt) = mount(&img, &d.0, &[]);
    for (n, _) in &taken {
        std::fs::remove_dir(mnt.join(format!("snapshots/{n}"))).unwrap();
    }
    drop(guard);
    let ours = allocated(&check_no_leaks("no snapshots left", &img));
    assert!(
        qemu_img(&["snapshot", "-l", img.to_str().unwrap()])
            .trim()
            .is_empty()
    );
    same("live at the end", &qemu_raw(&img, None, &[]), &live);
    let copy = d.path("copy.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        img.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    let needed = allocated(&check_no_leaks("a fresh copy", &copy));
    // Metadata may differ (our L2 tables and refcount blocks sit where they were made).
    assert!(
        ours <= needed + 8,
        "{ours} clusters allocated after deleting every snapshot, a fresh copy needs {needed}"
    );
}
