//! Host-side ext4 helpers for guest tests (e2fsprogs): build an image from a directory, read a
//! file out of an image without mounting it, check an image, and hash bytes as the guest's
//! `sha256sum` does.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Creates `out` (`size` bytes) holding an ext4 file system with the contents of `tree`.
pub fn mkfs(tree: &Path, size: u64, out: &Path) {
    let f = std::fs::File::create(out).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let res = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
        ])
        .arg(tree)
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("mkfs.ext4: {e}; run .ci/guest-deps.sh"));
    assert!(
        res.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// The bytes of `path` in the ext4 image `image`, None if there is no such file.
pub fn read_file(image: &Path, path: &str) -> Option<Vec<u8>> {
    let stat = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&stat.stderr);
    if err.contains("not found") {
        return None;
    }
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs cat {path}: {err}");
    Some(out.stdout)
}

/// `e2fsck -fn` of `image`: Ok, or its report.
pub fn fsck(image: &Path) -> Result<(), String> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {} exited with {}:\n{}{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The SHA-256 of `bytes` in hex, as `sha256sum` prints it.
pub fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().unwrap_or("").to_string()
}
