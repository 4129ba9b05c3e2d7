//! Partitions as files: tables written by sfdisk/sgdisk on raw disks, converted to every
//! format, mounted, and every `pN.raw` compared with the byte range `sfdisk --json` reports.
//! Then writes through partitions, repartitioning while mounted, damaged GPTs and --list.
//! Needs /dev/fuse, qemu-img, sfdisk and sgdisk (fdisk, gdisk); the 4096-byte-sector case
//! needs root (a loop device with 4 KiB sectors).

mod common;
mod mount_support;
mod vhdx_gen;

use common::*;
use mount_support::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const M: u64 = 1 << 20;
const DISK: u64 = 8 * M;

/// (number, start byte, size in bytes, type) of each partition `sfdisk --json` reports.
fn sfdisk_parts(dev: &Path) -> Vec<(u32, u64, u64, String)> {
    let out = run("sfdisk", &["--json", dev.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let table = &doc["partitiontable"];
    let ss = table["sectorsize"].as_u64().unwrap_or(512);
    table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let digits = node.len() - node.chars().rev().take_while(char::is_ascii_digit).count();
            (
                node[digits..].parse().unwrap(),
                p["start"].as_u64().unwrap() * ss,
                p["size"].as_u64().unwrap() * ss,
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A raw disk full of seeded bytes, then partitioned by `tool` reading `script` on stdin
/// (sfdisk) or taking `script` as arguments (sgdisk).
fn raw_disk(path: &Path, seed: u64, tool: &str, script: &str) {
    std::fs::write(path, Rng::new(seed).bytes(DISK as usize)).unwrap();
    partition(path, tool, script);
}

fn partition(path: &Path, tool: &str, script: &str) {
    let mut cmd = Command::new(tool);
    if tool == "sgdisk" {
        cmd.args(script.split_whitespace()).arg(path);
    } else {
        cmd.args(["-q", "--no-reread"])
            .arg(path)
            .stdin(Stdio::piped());
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, script.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `raw` converted to `fmt` beside it.
fn convert(raw: &Path, fmt: &str, opts: &str) -> PathBuf {
    let out = raw.with_extension(fmt);
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([raw.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
    out
}

/// Mounts `image` and checks that the root holds exactly disk.raw, `snapshots` and one
/// pN.raw per partition in `parts` except extended containers, each reading as its range of
/// `raw`, read-only, with SEEK_DATA/SEEK_HOLE inside it. `thorough` adds odd-sized reads
/// and every way of trying to write.
fn check_partitions(
    what: &str,
    image: &Path,
    dir: &Path,
    raw: &[u8],
    parts: &[(u32, u64, u64, String)],
    thorough: bool,
) {
    let (_guard, mnt) = mount(image, dir, &["-r"]);
    let data: Vec<_> = parts
        .iter()
        .filter(|p| !matches!(p.3.as_str(), "5" | "f" | "85"))
        .collect();
    let mut want: Vec<String> = data.iter().map(|p| format!("p{}.raw", p.0)).collect();
    want.extend(["disk.raw".into(), "snapshots".into()]);
    want.sort();
    assert_eq!(names_in(&mnt), want, "{what}: files");
    for (n, start, size, _) in data {
        let path = mnt.join(format!("p{n}.raw"));
        let bytes = &raw[*start as usize..(start + size) as usize];
        if thorough {
            assert_file(&path, bytes, Some(0o444));
        } else {
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o444);
            assert_same(
                &format!("{what}: p{n}"),
                &std::fs::read(&path).unwrap(),
                bytes,
            );
        }
        let f = File::open(&path).unwrap();
        assert_eq!(
            seek(&f, 0, libc::SEEK_DATA),
            Ok(0),
            "{what}: p{n} starts with data"
        );
        assert_eq!(
            seek(&f, 0, libc::SEEK_HOLE),
            Ok(*size),
            "{what}: p{n} has no hole"
        );
        assert_eq!(
            seek(&f, *size, libc::SEEK_DATA),
            Err(libc::ENXIO),
            "{what}: p{n} end"
        );
        if thorough {
            assert_refuses_writes(&path, bytes);
        }
    }
}

#[test]
fn every_partition_of_every_format_reads_as_its_range() {
    let s = Scratch::new("parts-formats");
    // Every format with the GPT; the MBR layouts with a few each.
    let all: &[(&str, &str)] = &[
        ("qcow2", ""),
        ("vmdk", ""),
        ("vpc", "force_size=on"),
        ("vhdx", ""),
        ("vdi", ""),
    ];
    let layouts = [
        (
            "gpt",
            "sgdisk",
            "-n1:2048:+2M -t1:ef00 -c1:esp -n3:0:+3M -c3:data -n4:0:0",
        ),
        (
            "mbr",
            "sfdisk",
            "label: dos\nx4 : start=2048, size=4096, type=83, bootable\nx1 : start=8192, size=4096, type=7\n",
        ),
        (
            "ext",
            "sfdisk",
            "label: dos\nstart=2048, size=2048, type=83\nstart=4096, type=5\nstart=6144, size=2048, type=83\nstart=10240, size=1024, type=82\ntype=83\n",
        ),
    ];
    let formats = [all, &all[..2], &all[2..]];
    for (i, (name, tool, script)) in layouts.iter().enumerate() {
        let raw_path = s.path(&format!("{name}.raw"));
        raw_disk(&raw_path, i as u64 + 1, tool, script);
        let parts = sfdisk_parts(&raw_path);
        assert!(parts.len() >= 2, "{name}: {parts:?}");
        let raw = std::fs::read(&raw_path).unwrap();
        let mnt_dir = s.path(&format!("m-{name}"));
        check_partitions(
            &format!("{name}/raw"),
            &raw_path,
            &mnt_dir,
            &raw,
            &parts,
            true,
        );
        for (fmt, opts) in formats[i].iter() {
            let image = convert(&raw_path, fmt, opts);
            check_partitions(
                &format!("{name}/{fmt}"),
                &image,
                &mnt_dir,
                &raw,
                &parts,
                false,
            );
            std::fs::remove_file(&image).unwrap();
        }
    }
    // A hybrid MBR (sgdisk -h) still shows the GPT's partitions.
    let hybrid = s.path("hybrid.raw");
    raw_disk(&hybrid, 9, "sgdisk", layouts[0].2);
    partition(&hybrid, "sgdisk", "-h 1:3");
    let mbr = std::fs::read(&hybrid).unwrap();
    assert!(
        mbr[446..510].chunks(16).any(|e| e[4] == 0xEE)
            && mbr[446..510].chunks(16).any(|e| e[4] == 0xEF)
    );
    check_partitions(
        "hybrid",
        &hybrid,
        &s.path("m-hybrid"),
        &mbr,
        &sfdisk_parts(&hybrid),
        false,
    );
}

#[test]
fn four_kib_sector_gpts_are_read_in_4096_byte_sectors() {
    if !is_root() {
        eprintln!("skipped: a loop device with 4096-byte sectors needs root");
        return;
    }
    let s = Scratch::new("parts-4k");
    let raw_path = s.path("g4.raw");
    std::fs::write(&raw_path, Rng::new(44).bytes(DISK as usize)).unwrap();
    let out = Command::new("losetup")
        .args(["-b", "4096", "-f", "--show"])
        .arg(&raw_path)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped: losetup -b 4096: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let parts = {
        struct Detach(PathBuf);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
            }
        }
        let _detach = Detach(dev.clone());
        partition(
            &dev,
            "sfdisk",
            "label: gpt\nsize=2M\nsize=3M, name=second\nsize=1M\n",
        );
        sfdisk_parts(&dev)
    };
    assert_eq!(parts[0].1, M, "sfdisk aligns to 1 MiB: {parts:?}");
    let raw = std::fs::read(&raw_path).unwrap();
    let dir = s.path("m");
    check_partitions("4k/raw", &raw_path, &dir, &raw, &parts, false);
    // VHDX declares its logical sector size (QEMU cannot make such a VHDX: the test's
    // writer does).
    let mut spec = vhdx_gen::Spec::new(DISK, M as u32, 4096);
    spec.blocks = raw
        .chunks(M as usize)
        .map(|c| vhdx_gen::Block::Full(c.to_vec()))
        .collect();
    let vhdx = s.path("g4.vhdx");
    std::fs::write(&vhdx, vhdx_gen::build(&spec)).unwrap();
    check_partitions("4k/vhdx", &vhdx, &dir, &raw, &parts, false);
    let list = run(BIN, &["--list", vhdx.to_str().unwrap()]);
    assert!(list.contains("4096-byte sectors"), "{list}");
}

/// Corrupts `len` bytes at `off` of a file.
fn flip(path: &Path, off: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x5A], off).unwrap();
}

#[test]
fn a_damaged_gpt_uses_its_backup_and_a_ruined_one_shows_no_partitions() {
    let s = Scratch::new("parts-damaged");
    let raw_path = s.path("g.raw");
    raw_disk(&raw_path, 5, "sgdisk", "-n1:2048:+3M -n2:0:+3M -c2:two");
    let parts = sfdisk_parts(&raw_path);
    flip(&raw_path, 512 + 60); // primary header: disk GUID, so its CRC fails
    let raw = std::fs::read(&raw_path).unwrap();
    check_partitions(
        "primary damaged",
        &raw_path,
        &s.path("m"),
        &raw,
        &parts,
        false,
    );
    let json = run(BIN, &["--list", "--json", raw_path.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let table = &doc["views"][0]["partition_table"];
    assert_eq!(table["scheme"], "gpt");
    assert_eq!(table["from_backup"], true, "{table}");
    assert_eq!(table["partitions"][1]["name"], "two");
    assert!(table["notes"].to_string().contains("CRC32"), "{table}");

    flip(&raw_path, DISK - 512 + 60); // and the backup header
    let (_g, mnt) = mount(&raw_path, &s.path("m"), &["-r"]);
    assert_eq!(
        names_in(&mnt),
        ["disk.raw", "snapshots"],
        "no partition files, still mounted"
    );
    let list = run(BIN, &["--list", raw_path.to_str().unwrap()]);
    assert!(list.contains("without a usable GPT"), "{list}");
}

/// Polls `cond` until it holds (kernel cache invalidations arrive asynchronously).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn partitions_write_through_follow_repartitioning_and_hold_file_systems() {
    let s = Scratch::new("parts-write");
    let raw_path = s.path("w.raw");
    std::fs::write(&raw_path, vec![0u8; 16 * M as usize]).unwrap();
    partition(
        &raw_path,
        "sfdisk",
        "label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=8192, type=83\n",
    );
    let image = convert(&raw_path, "qcow2", "");
    qemu_img(&["snapshot", "-c", "before", image.to_str().unwrap()]);
    let (_guard, mnt) = mount(&image, &s.path("m"), &[]);
    let (p1, p2, disk) = (mnt.join("p1.raw"), mnt.join("p2.raw"), mnt.join("disk.raw"));
    let meta = std::fs::metadata(&p1).unwrap();
    assert_eq!((meta.len(), meta.mode() & 0o777), (8 * M, 0o644));
    assert_eq!(meta.blocks(), 0, "nothing allocated yet");
    let snap_p1 = mnt.join("snapshots/before/p1.raw");
    assert_refuses_writes(&snap_p1, &vec![0; 8 * M as usize]);

    // Writes through a partition land at its offset in the disk, and an open disk.raw sees
    // them (and the other way round).
    let mut rng = Rng::new(7);
    let pf = OpenOptions::new().read(true).write(true).open(&p1).unwrap();
    let df = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut seen = vec![0u8; 64 * 1024];
    df.read_exact_at(&mut seen, M + 3 * M).unwrap();
    let chunk = rng.bytes(64 * 1024);
    pf.write_all_at(&chunk, 3 * M).unwrap();
    df.read_exact_at(&mut seen, M + 3 * M).unwrap();
    assert!(seen == chunk, "disk.raw shows what p1.raw wrote");
    let other = rng.bytes(4096);
    let mut got = vec![0u8; 4096];
    pf.read_exact_at(&mut got, 3 * M).unwrap();
    df.write_all_at(&other, M + 3 * M).unwrap();
    pf.read_exact_at(&mut got, 3 * M).unwrap();
    assert!(got == other, "p1.raw drops the pages disk.raw overwrote");
    assert!(
        pf.write_all_at(b"x", 8 * M).is_err(),
        "nothing past the partition's end"
    );
    pf.sync_all().unwrap();
    // Holes and allocation are those of the range.
    assert_eq!(seek(&pf, 0, libc::SEEK_DATA), Ok(3 * M));
    let hole = seek(&pf, 3 * M, libc::SEEK_HOLE).unwrap();
    assert!(hole > 3 * M && hole <= 4 * M, "hole at {hole}");
    let blocks = std::fs::metadata(&p1).unwrap().blocks() * 512;
    assert!((64 * 1024..=M).contains(&blocks), "st_blocks {blocks}");
    assert_eq!(std::fs::metadata(&p2).unwrap().blocks(), 0);
    drop(pf);
    drop(df);

    // A file system made and checked through the partition file, then mounted from it.
    let tree = s.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let content = rng.bytes(300_000);
    std::fs::write(tree.join("file.bin"), &content).unwrap();
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            tree.to_str().unwrap(),
            p2.to_str().unwrap(),
        ],
    );
    run("e2fsck", &["-f", "-n", p2.to_str().unwrap()]);
    if is_root() {
        let at = s.path("ext4");
        std::fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(&p2)
            .arg(&at)
            .status()
            .unwrap()
            .success();
        if ok {
            let read = std::fs::read(at.join("file.bin"));
            run("umount", &[at.to_str().unwrap()]);
            assert!(
                read.unwrap() == content,
                "the file read back from the loop mount"
            );
        } else {
            eprintln!("note: loop mount of p2.raw failed here; e2fsck passed");
        }
    }

    // Repartitioning while mounted: the files follow once sfdisk has closed the disk.
    partition(
        &disk,
        "sfdisk",
        "label: dos\nstart=2048, size=4096, type=83\nstart=8192, size=4096, type=83\nstart=12288, size=8192, type=83\n",
    );
    eventually("p3.raw appears", || mnt.join("p3.raw").exists());
    eventually("p1.raw shrinks", || {
        std::fs::metadata(&p1).is_ok_and(|m| m.len() == 2 * M)
    });
    assert_eq!(std::fs::metadata(&p2).unwrap().len(), 2 * M);
    assert_eq!(
        names_in(&mnt),
        [
            "changes",
            "disk.raw",
            "p1.raw",
            "p2.raw",
            "p3.raw",
            "snapshots"
        ]
    );
    // The snapshot keeps its own table.
    assert_eq!(std::fs::metadata(&snap_p1).unwrap().len(), 8 * M);
    // Wiping the table removes the files.
    let df = OpenOptions::new().write(true).open(&disk).unwrap();
    df.write_all_at(&[0u8; 512], 0).unwrap();
    df.sync_all().unwrap();
    drop(df);
    eventually("partition files disappear", || {
        names_in(&mnt) == ["changes", "disk.raw", "snapshots"]
    });
}
