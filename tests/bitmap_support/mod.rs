//! QEMU's side of dirty bitmaps for the tests: what qemu-nbd exports for a bitmap.
#![allow(dead_code)]

use crate::common::run;
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use vmfs_mount::changes::ranges;

/// The dirty ranges of `bitmap` in `image` as QEMU exports them: qemu-nbd -B, read back with
/// `qemu-img map` over NBD with `x-dirty-bitmap` (dirty extents show as "data": false).
pub fn qemu_dirty_ranges(image: &Path, bitmap: &str) -> Vec<Range<u64>> {
    let dir = image.parent().unwrap();
    let sock = dir.join(format!("nbd-{bitmap}.sock"));
    let pid_file = dir.join(format!("nbd-{bitmap}.pid"));
    let _ = std::fs::remove_file(&sock);
    run(
        "qemu-nbd",
        &[
            "-r",
            "-f",
            "qcow2",
            "-B",
            bitmap,
            "-x",
            "e",
            "-k",
            sock.to_str().unwrap(),
            "--fork",
            "--pid-file",
            pid_file.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    let opts = format!(
        "driver=nbd,export=e,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        sock.display()
    );
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts", &opts])
        .output()
        .unwrap();
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill has no memory preconditions; the pid is the qemu-nbd we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Gone before returning: its image lock would refuse the next writer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd {pid} did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    ranges::union(
        recs.iter()
            .filter(|r| r["data"] == false)
            .map(|r| {
                let s = r["start"].as_u64().unwrap();
                s..s + r["length"].as_u64().unwrap()
            })
            .collect(),
    )
}
