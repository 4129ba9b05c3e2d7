//! systemd's readiness protocol under `-f`: the test plays systemd, binding the datagram socket
//! it names in $NOTIFY_SOCKET. READY=1 must come only once disk.raw can be read, STOPPING=1 on
//! SIGTERM and on umount, and a socket nobody can use must never fail the mount.
//! Needs /dev/fuse.

mod common;
mod mount_support;

use common::*;
use mount_support::*;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bounds every wait; never a synchronisation by itself.
const BOUND: Duration = Duration::from_secs(60);

fn image(dir: &Path, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let img = dir.join("disk.img");
    let data = Rng::new(seed).bytes(3 << 20);
    std::fs::write(&img, &data).unwrap();
    (img, data)
}

fn spawn(img: &Path, dir: &Path, notify_socket: &str) -> (Child, std::path::PathBuf) {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let child = Command::new(BIN)
        .args(["-f", "-v", "-o", "ro"])
        .arg(img)
        .arg(&mnt)
        .env("NOTIFY_SOCKET", notify_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, mnt)
}

fn recv(socket: &UnixDatagram, dir: &Path) -> String {
    socket.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8(buf[..n].to_vec()).unwrap(),
        Err(e) => panic!(
            "no notification within {BOUND:?} ({e}); daemon log: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        ),
    }
}

/// Waits (bounded) for the daemon to exit; returns its exit code.
fn wait_exit(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmfs-mount -f did not exit after the unmount");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The notifications of one mount: READY=1 once disk.raw reads right, then STOPPING=1 after
/// `stop` (which unmounts), then a clean exit.
fn ready_then_stopping(
    socket: &UnixDatagram,
    notify_socket: &str,
    seed: u64,
    dir: &Path,
    stop: impl FnOnce(&Child, &Path),
) {
    let (img, data) = image(dir, seed);
    let (mut child, mnt) = spawn(&img, dir, notify_socket);
    let ready = recv(socket, dir);
    // Read at once: READY=1 promises that the mount already serves.
    let got = std::fs::read(mnt.join("disk.raw"));
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("\nSTATUS=serving "), "{ready:?}");
    assert_same("disk.raw when READY=1 arrived", &got.unwrap(), &data);
    stop(&child, &mnt);
    let stopping = recv(socket, dir);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
    assert_eq!(wait_exit(&mut child), Some(0));
    assert!(!is_mounted(&mnt));
}

#[test]
fn ready_after_the_mount_serves_and_stopping_on_sigterm() {
    let s = Scratch::new("notify-path");
    let sock = s.path("notify.sock");
    let socket = UnixDatagram::bind(&sock).unwrap();
    ready_then_stopping(&socket, sock.to_str().unwrap(), 61, &s.0, |child, _| {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    });
}

#[test]
fn an_abstract_socket_hears_ready_and_stopping_on_umount() {
    let s = Scratch::new("notify-abstract");
    let name = format!("vmfs-mount-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    ready_then_stopping(&socket, &format!("@{name}"), 62, &s.0, |_, mnt| {
        let status = if is_root() {
            Command::new("umount").arg(mnt).status()
        } else {
            Command::new("fusermount3").arg("-u").arg(mnt).status()
        };
        assert!(status.unwrap().success());
    });
}

#[test]
fn an_unusable_notify_socket_never_fails_the_mount() {
    let s = Scratch::new("notify-bad");
    let (img, data) = image(&s.0, 63);
    for (i, bad) in ["relative.sock", "/nonexistent-dir/notify.sock"]
        .iter()
        .enumerate()
    {
        let dir = s.path(&format!("m{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut child, mnt) = spawn(&img, &dir, bad);
        let deadline = Instant::now() + BOUND;
        while !is_mounted(&mnt) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{bad}: the daemon exited"
            );
            assert!(Instant::now() < deadline, "{bad}: no mount");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_same(bad, &std::fs::read(mnt.join("disk.raw")).unwrap(), &data);
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(wait_exit(&mut child), Some(0), "{bad}");
        let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
        assert!(log.contains("NOTIFY_SOCKET="), "{bad}: {log}");
    }
}

#[test]
fn without_foreground_a_notify_socket_gets_a_warning_and_no_message() {
    let s = Scratch::new("notify-background");
    let (img, data) = image(&s.0, 64);
    let sock = s.path("notify.sock");
    let socket = UnixDatagram::bind(&sock).unwrap();
    let mnt = s.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let out = Command::new(BIN)
        .args(["-o", "ro"])
        .arg(&img)
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _guard = MountGuard(mnt.clone());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("NOTIFY_SOCKET is set but -f is not"), "{err}");
    assert_same(
        "disk.raw",
        &std::fs::read(mnt.join("disk.raw")).unwrap(),
        &data,
    );
    unmount(&mnt);
    // The daemon has exited: whatever it would have sent is queued by now.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    assert!(socket.recv(&mut buf).is_err(), "a message without -f");
}
