//! The command line without mounting: errors before anything is mounted, --list, --help.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_vmfs-mount");

fn vmfs(args: &[&Path]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn vmfs_str(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Asserts a failure with `code` and exactly one stderr line containing `needle`.
fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.starts_with("vmfs-mount: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(out.stdout.is_empty());
}

fn scratch_with_image(name: &str, len: usize) -> (Scratch, std::path::PathBuf, std::path::PathBuf) {
    let s = Scratch::new(name);
    let img = s.path("disk.img");
    std::fs::write(&img, Rng::new(len as u64).bytes(len)).unwrap();
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    (s, img, mnt)
}

#[test]
fn missing_image_is_one_line_and_mounts_nothing() {
    let (s, _img, mnt) = scratch_with_image("cli-missing", 4096);
    let out = vmfs(&[&s.path("nope.qcow2"), &mnt]);
    assert_one_line_error(&out, 1, "nope.qcow2");
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
}

#[test]
fn directory_as_image_is_refused() {
    let (s, _img, mnt) = scratch_with_image("cli-dirimg", 4096);
    let out = vmfs(&[&s.0, &mnt]);
    assert_one_line_error(&out, 1, "not a disk image");
}

#[test]
fn bad_mount_points_are_refused() {
    let (s, img, _mnt) = scratch_with_image("cli-badmnt", 4096);
    assert_one_line_error(&vmfs(&[&img, &s.path("absent")]), 1, "does not exist");
    assert_one_line_error(&vmfs(&[&img, &img]), 1, "is not a directory");
}

#[test]
fn unknown_mount_option_exits_2() {
    let (_s, img, mnt) = scratch_with_image("cli-badopt", 4096);
    let out = vmfs_str(&[
        "-o",
        "ro,frobnicate",
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, 2, "unknown mount option \"frobnicate\"");
    let out = vmfs_str(&[
        "-o",
        "threads=lots",
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, 2, "threads=lots");
    let out = vmfs_str(&[
        "--format",
        "floppy",
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, 2, "unknown format");
}

#[test]
fn overlay_over_another_image_is_refused() {
    let (s, img, mnt) = scratch_with_image("cli-overlay", 4096);
    let other = s.path("other.img");
    std::fs::write(&other, [0u8; 4096]).unwrap();
    let overlay = s.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "other.img",
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    let out = vmfs(&[Path::new("--overlay"), &overlay, &img, &mnt]);
    assert_one_line_error(&out, 1, "overlay.qcow2");
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
}

#[test]
fn force_share_needs_a_read_only_mount() {
    let (_s, img, mnt) = scratch_with_image("cli-force-share", 4096);
    let out = vmfs_str(&[
        "--force-share",
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, 2, "read-only");
}

#[test]
fn list_prints_the_chain_and_the_tree() {
    let (_s, img, _mnt) = scratch_with_image("cli-list", 3 * 1024 * 1024 + 512);
    let out = vmfs_str(&["--list", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("[0] {}", img.display())), "{text}");
    assert!(text.contains("format:        raw"), "{text}");
    assert!(text.contains("3146240 bytes"), "{text}");
    assert!(text.contains("modified:"), "{text}");
    assert!(text.contains("disk.raw"), "{text}");
    assert!(text.contains("live"), "{text}");
}

#[test]
fn list_json_is_escaped_and_complete() {
    let s = Scratch::new("cli-json");
    let img = s.path("we\"ird\\name.img");
    std::fs::write(&img, Rng::new(1).bytes(1 << 20)).unwrap();
    let out = vmfs_str(&["--list", "--json", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("we\\\"ird\\\\name.img"), "{json}");
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["image"], img.to_str().unwrap());
    let layer = &doc["layers"][0];
    assert_eq!(layer["format"], "raw");
    assert_eq!(layer["virtual_size"], 1048576);
    assert!(layer["backing_file"].is_null());
    assert_eq!(layer["details"], serde_json::json!({}));
    assert!(layer["mtime"].is_i64());
    let view = &doc["views"][0];
    assert_eq!(view["path"], "disk.raw");
    assert_eq!(view["kind"], "live");
    assert_eq!(view["size"], 1048576);
    assert!(view["date_iso"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn list_errors_like_mount() {
    let out = vmfs_str(&["--list", "/nonexistent/vmfs/test.img"]);
    assert_one_line_error(&out, 1, "/nonexistent/vmfs/test.img");
}

#[test]
fn help_and_usage() {
    let out = vmfs_str(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--foreground",
        "--read-only",
        "--overlay",
        "--list",
        "allow_other",
        "snapshots/<name>/disk.raw",
    ] {
        assert!(help.contains(needle), "{needle} missing from --help");
    }
    let out = vmfs_str(&["only-an-image"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_backing_file_is_named() {
    let s = Scratch::new("cli-backing");
    let (base, top) = (s.path("base.vmdk"), s.path("top.vmdk"));
    qemu_img(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    std::fs::remove_file(&base).unwrap();
    let mnt = s.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = vmfs(&[&top, &mnt]);
    assert_one_line_error(&out, 1, "base.vmdk");
    let out = vmfs(&[Path::new("--list"), &top]);
    assert_one_line_error(&out, 1, "base.vmdk");
}
