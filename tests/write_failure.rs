//! A failed host write (here EFBIG from RLIMIT_FSIZE, standing in for ENOSPC/EIO) fails
//! that write, latches the writer so later writes fail cleanly, lets reads go on, and
//! leaves an image `qemu-img check` finds consistent (leaks allowed).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use vmfs_mount::error::Kind;

const CHILD_ENV: &str = "VMFS_FAIL_CHILD";

/// The child: the file may not grow past its current size, so the next allocation fails.
#[test]
fn failure_child() {
    let Ok(image) = std::env::var(CHILD_ENV) else {
        return;
    };
    let view = open_rw(Path::new(&image));
    let mut rng = Rng::new(1);
    let first = rng.bytes(100_000);
    view.write(0, &first).unwrap();
    view.flush().unwrap();
    let len = std::fs::metadata(&image).unwrap().len();
    // SAFETY: plain syscalls on this process only (the test runs alone in this child).
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit {
            rlim_cur: len,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
    let e = view.write(1 << 20, &rng.bytes(200_000)).unwrap_err();
    assert_eq!(e.kind(), Kind::Io, "{e}");
    assert_eq!(e.errno(), libc::EFBIG, "{e}");
    // Latched: even a write into an owned cluster is refused now.
    assert_eq!(view.write(10, &[1, 2, 3]).unwrap_err().kind(), Kind::Failed);
    assert_eq!(view.discard(0, 4096).unwrap_err().kind(), Kind::Failed);
    // Reads go on and show what was written before the failure.
    let mut back = vec![0u8; first.len()];
    view.read(0, &mut back).unwrap();
    assert!(back == first, "data written before the failure is lost");
    println!("CHILD OK");
}

#[test]
fn a_failed_host_write_latches_and_leaves_the_image_consistent() {
    let s = Scratch::new("write-fail");
    let top = s.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        top.to_str().unwrap(),
        "4M",
    ]);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "failure_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &top)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("CHILD OK"),
        "child: {text}"
    );
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&top)
        .output()
        .unwrap();
    let ctext = String::from_utf8_lossy(&check.stdout);
    assert!(
        matches!(check.status.code(), Some(0) | Some(3)) && !ctext.contains("ERROR"),
        "{ctext}"
    );
}
