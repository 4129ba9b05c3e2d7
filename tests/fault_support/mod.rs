//! Helpers for the host-failure tests (host_full, host_eio): writing through `disk.raw` buffered
//! or with O_DIRECT, a model of the bytes that were acknowledged durable, and checks of the
//! image after the failure.
#![allow(dead_code)]

use super::common::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

/// How the test writes to `disk.raw`.
#[derive(Clone, Copy, Debug)]
pub enum Io {
    Buffered,
    Direct,
}

pub fn open_disk(path: &Path, io: Io) -> File {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if let Io::Direct = io {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A page-aligned copy of `data` (O_DIRECT needs aligned buffers); use `&buf[..data.len()]`.
pub struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    pub fn new(data: &[u8]) -> Aligned {
        let mut raw = vec![0u8; data.len() + 4096];
        let start = (4096 - (raw.as_ptr() as usize % 4096)) % 4096;
        raw[start..start + data.len()].copy_from_slice(data);
        Aligned {
            raw,
            start,
            len: data.len(),
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Writes `data` at `off` and fsyncs; the errno of the first failure (write or fsync).
pub fn write_sync(f: &File, off: u64, data: &[u8]) -> Result<(), i32> {
    let buf = Aligned::new(data);
    f.write_all_at(buf.bytes(), off)
        .map_err(|e| e.raw_os_error().unwrap_or(0))?;
    f.sync_data().map_err(|e| e.raw_os_error().unwrap_or(0))
}

/// Reads `len` bytes at `off` (aligned buffer, so it works with O_DIRECT too).
pub fn read_at(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Aligned::new(&vec![0u8; len]);
    f.read_exact_at(buf.bytes_mut(), off)?;
    Ok(buf.bytes().to_vec())
}

/// The guest bytes the test knows, in extents written and acknowledged by a successful fsync.
#[derive(Default)]
pub struct Durable(pub Vec<(u64, Vec<u8>)>);

impl Durable {
    pub fn add(&mut self, off: u64, data: Vec<u8>) {
        self.0.push((off, data));
    }
    /// Every acknowledged extent reads back unchanged through `f`.
    pub fn check_file(&self, what: &str, f: &File) {
        for (off, want) in &self.0 {
            let got = read_at(f, *off, want.len())
                .unwrap_or_else(|e| panic!("{what}: reading {off:#x}: {e}"));
            assert_same(&format!("{what} at {off:#x}"), &got, want);
        }
    }
    /// Every acknowledged extent is in `raw` (a whole-disk image).
    pub fn check_raw(&self, what: &str, raw: &[u8]) {
        for (off, want) in &self.0 {
            let o = *off as usize;
            assert_same(
                &format!("{what} at {off:#x}"),
                &raw[o..o + want.len()],
                want,
            );
        }
    }
}

/// `qemu-img check` finds no corruption (exit 0; exit 3 means leaked clusters only, which a
/// failed allocation may leave: wasted space, no harm to data). Returns the report.
pub fn assert_check_consistent(image: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["check", image.to_str().unwrap()])
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check {} (exit {code:?}): {report}",
        image.display()
    );
    assert!(!report.contains("ERROR"), "{report}");
    report
}

/// A random-data errno check: ENOSPC or EIO is what a full or failing host may give.
pub fn assert_host_errno(what: &str, errno: i32) {
    assert!(
        errno == libc::ENOSPC || errno == libc::EIO,
        "{what}: expected ENOSPC or EIO, got errno {errno}"
    );
}

/// Seeded random chunk `i` of a test (so each chunk is distinct and reproducible).
pub fn chunk(seed: u64, i: u64, len: usize) -> Vec<u8> {
    Rng::new(seed * 1_000_003 + i).bytes(len)
}

/// A 64 MiB qcow2 base at `path` with 1 MiB of seeded data at 40 MiB, recorded in `durable`
/// (the overlay layouts read it through the overlay before and after the failure).
pub fn base_with_data(path: &Path, seed: u64, durable: &mut Durable) {
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]);
    let mut rng = Rng::new(seed ^ 0xba5e);
    durable.add(
        40 << 20,
        write_random("qcow2", path, &mut rng, 40 << 20, 1 << 20),
    );
}

/// Writes `chunks` seeded chunks of `len` bytes from 4 MiB on, each fsynced, until one fails;
/// records the acknowledged ones in `durable` and returns the errno of the failure, if any.
pub fn write_until_failure(
    disk: &File,
    seed: u64,
    chunks: u64,
    len: usize,
    durable: &mut Durable,
) -> Option<i32> {
    for i in 0..chunks {
        let off = (4 << 20) + i * len as u64;
        let data = chunk(seed, i + 1, len);
        match write_sync(disk, off, &data) {
            Ok(()) => durable.add(off, data),
            Err(e) => return Some(e),
        }
    }
    None
}

/// After a failed write: no later fsync reports success for what may not be durable, reads
/// of everything acknowledged go on, and the daemon's `log` says what to do.
pub fn assert_latched_after_failure(disk: &File, durable: &Durable, log: &str) {
    assert!(
        disk.sync_data().is_err(),
        "an fsync after the failure reported success"
    );
    durable.check_file("after the failure", disk);
    assert!(
        log.contains("unmount and mount again"),
        "the log does not say what to do: {log}"
    );
}

/// Mounts `image` again (the host healthy), writes and fsyncs one more 256 KiB chunk, then after
/// unmounting checks `host_file` (the image written to) with qemu-img and every acknowledged
/// extent in its converted bytes.
pub fn remount_write_and_verify(
    image: &Path,
    dir: &Path,
    extra: &[&str],
    io: Io,
    seed: u64,
    mut durable: Durable,
    host_file: &Path,
) {
    let mut d = super::mount_support::mount_foreground(image, dir, extra);
    let disk = open_disk(&d.mnt.join("disk.raw"), io);
    let late = chunk(seed, 1000, 256 << 10);
    write_sync(&disk, 60 << 20, &late).expect("writing after the remount");
    durable.add(60 << 20, late);
    durable.check_file("after the remount", &disk);
    drop(disk);
    d.unmount();
    let host = host_file.to_str().unwrap();
    qemu_img(&["check", "-q", "-r", "leaks", host]);
    qemu_img(&["check", "-q", host]);
    durable.check_raw("qemu-img convert", &qemu_raw(host_file, Some("qcow2"), &[]));
}
