//! Lock interoperability with QEMU: while we hold an image for writing, qemu-io cannot write
//! it or its backing file; while qemu-io holds it for writing, we cannot mount it.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use vmfs_mount::error::Kind;
use vmfs_mount::lock::{lock_for_mount, lock_for_mount_shared};
use vmfs_mount::storage::HostFile;

/// Runs a QEMU tool and returns (success, stdout + stderr).
fn try_run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // qemu-io reports some failures on stdout with status 0.
    (out.status.success() && !text.contains("ailed"), text)
}

fn images(s: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = s.path("base.raw");
    let top = s.path("top.qcow2");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
        "1M",
    ]);
    (base, top)
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

#[test]
fn qemu_cannot_write_what_we_mount() {
    let s = Scratch::new("lock-mount");
    let (base, top) = images(&s);
    let rw = HostFile::open(&top, true).unwrap();
    let ro = HostFile::open(&base, false).unwrap();
    let guard = lock_for_mount(&[rw], &[ro]).unwrap();

    let (ok, text) = try_run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", p(&top)]);
    assert!(
        !ok && text.contains("lock"),
        "qemu-io wrote the mounted image: {text}"
    );
    let (ok, text) = try_run("qemu-io", &["-f", "raw", "-c", "write 0 512", p(&base)]);
    assert!(
        !ok && text.contains("lock"),
        "qemu-io wrote the backing file: {text}"
    );
    // As with a running QEMU: info needs -U on the written image, works on the backing file.
    let (ok, _) = try_run("qemu-img", &["info", "-U", p(&top)]);
    assert!(ok);
    let (ok, text) = try_run("qemu-img", &["info", p(&top)]);
    assert!(!ok && text.contains("lock"), "{text}");
    let (ok, text) = try_run("qemu-img", &["info", "-f", "raw", p(&base)]);
    assert!(ok, "{text}");

    drop(guard);
    let (ok, text) = try_run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", p(&top)]);
    assert!(ok, "after unlock: {text}");
}

#[test]
fn we_cannot_mount_what_qemu_writes() {
    let s = Scratch::new("lock-qemu");
    let (_base, top) = images(&s);
    let mut qio = Command::new("qemu-io")
        .args(["-f", "qcow2", p(&top)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = qio.stdin.take().unwrap();
    let mut out = BufReader::new(qio.stdout.take().unwrap());
    // Once a write has completed, qemu-io holds its locks.
    writeln!(stdin, "write 0 512").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io exited");
    }

    let rw = HostFile::open(&top, true).unwrap();
    let e = lock_for_mount(std::slice::from_ref(&rw), &[])
        .err()
        .expect("locked a file qemu-io writes");
    assert_eq!(e.kind(), Kind::Busy, "{e}");
    assert!(e.to_string().contains("lock"), "{e}");
    let ro = HostFile::open(&top, false).unwrap();
    assert_eq!(
        lock_for_mount(&[], std::slice::from_ref(&ro))
            .err()
            .map(|e| e.kind()),
        Some(Kind::Busy)
    );
    // Force-share (read-only mounts only) reads along.
    drop(lock_for_mount_shared(&[ro]).unwrap());

    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    qio.wait().unwrap();
    drop(lock_for_mount(&[rw], &[]).unwrap());
}
