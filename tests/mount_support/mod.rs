//! Mount plumbing for the tests that mount image chains through the built binary: mounting,
//! unmounting in a guard, QEMU oracles for internal snapshots, and checks of a whole mount.
#![allow(dead_code)]

mod daemon;
#[allow(unused_imports)]
pub use daemon::*;

use super::common::*;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_vmfs-mount");

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The mount options of `mnt` as /proc/self/mountinfo lists them, if it is mounted.
pub fn mount_options(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mnt.to_str().unwrap();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(want))
        .map(|l| l.split(' ').nth(5).unwrap_or("").to_string())
}

pub fn is_mounted(mnt: &Path) -> bool {
    mount_options(mnt).is_some()
}

/// Unmounts on drop if still mounted, so a failing test leaves no mount behind.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            unmount(&self.0);
        }
    }
}

/// Unmounts `mnt` and waits (bounded) until the daemons that served it have exited: the
/// kernel lets umount return before the daemon has finished its last flush and released the
/// image locks.
pub fn unmount(mnt: &Path) {
    let daemons = daemons_of(mnt);
    let status = if is_root() {
        Command::new("umount").arg(mnt).status()
    } else {
        Command::new("fusermount3").arg("-u").arg(mnt).status()
    };
    if !status.is_ok_and(|s| s.success()) && is_root() {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while daemons
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon of {} did not exit after unmounting",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pids of vmfs-mount processes whose command line names `mnt`.
fn daemons_of(mnt: &Path) -> Vec<u32> {
    let want = mnt.as_os_str().as_encoded_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmd.split(|&b| b == 0);
            args.next().is_some_and(|a0| a0.ends_with(b"vmfs-mount")) && args.any(|a| a == want)
        })
        .collect()
}

/// Creates `dir/mnt` and mounts `image` there with `extra` options. The command returns once
/// the mount answers, so the mount is usable as soon as this returns.
pub fn mount(image: &Path, dir: &Path, extra: &[&str]) -> (MountGuard, PathBuf) {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let out = Command::new(BIN)
        .args(extra)
        .arg(image)
        .arg(&mnt)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mounting {} failed: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt), "the command returned before the mount");
    (MountGuard(mnt.clone()), mnt)
}

/// lseek(2) on `f`: the new offset, or the errno.
pub fn lseek(f: &File, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: f is an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(errno_of(&std::io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

pub fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// `qemu-img convert` of internal snapshot `tag` of `image`, at the snapshot's own size.
///
/// `-l snapshot.name=TAG` reads the snapshot's tables but keeps the image's current size, so
/// for a snapshot taken before a resize it is not the disk the snapshot holds. Applying the
/// snapshot to a copy (`qemu-img snapshot -a`) restores the size too; its bytes must equal the
/// `-l` bytes up to that size, which is checked here.
pub fn snapshot_oracle(image: &Path, fmt: &str, tag: &str) -> Vec<u8> {
    let via_l = qemu_raw(image, Some(fmt), &["-l", &format!("snapshot.name={tag}")]);
    // Same directory, so that a relative backing file name still resolves.
    let copy = image.with_file_name(format!(
        "applied-{}.{fmt}",
        image.file_name().unwrap().to_string_lossy()
    ));
    std::fs::copy(image, &copy).unwrap();
    qemu_img(&["snapshot", "-a", tag, copy.to_str().unwrap()]);
    let applied = qemu_raw(&copy, Some(fmt), &[]);
    std::fs::remove_file(&copy).unwrap();
    let n = applied.len().min(via_l.len());
    assert_same(&format!("{tag}: -l vs applied"), &applied[..n], &via_l[..n]);
    applied
}

/// Internal snapshot dates of `image` as `qemu-img info` reports them: name -> time.
pub fn snapshot_dates(image: &Path) -> BTreeMap<String, SystemTime> {
    let json = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    let Some(start) = json.find("\"snapshots\"") else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    // Each snapshot is a flat object: split on braces and read the fields of each.
    for obj in json[start..].split('{').skip(1) {
        let obj = obj.split('}').next().unwrap();
        let (Some(name), Some(sec), Some(nsec)) = (
            json_str(obj, "name"),
            json_u64(obj, "date-sec"),
            json_u64(obj, "date-nsec"),
        ) else {
            break;
        };
        out.insert(name, UNIX_EPOCH + Duration::new(sec, nsec as u32));
    }
    out
}

/// The value of `"key": "..."` in a flat JSON object (no escapes in the tests' names).
pub fn json_str(obj: &str, key: &str) -> Option<String> {
    let rest = &obj[obj.find(&format!("\"{key}\": \""))? + key.len() + 5..];
    Some(rest[..rest.find('"')?].to_string())
}

pub fn json_u64(obj: &str, key: &str) -> Option<u64> {
    let rest = &obj[obj.find(&format!("\"{key}\": "))? + key.len() + 4..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn json_bool(obj: &str, key: &str) -> Option<bool> {
    let rest = &obj[obj.find(&format!("\"{key}\": "))? + key.len() + 4..];
    Some(rest.starts_with("true"))
}

pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Checks a whole mount: the live file, the exact set of snapshot names, every directory's
/// mode and content, and every file's size, mode and bytes (whole, then in odd ranges).
pub fn assert_mount_shows(mnt: &Path, live: &[u8], snapshots: &BTreeMap<String, Vec<u8>>) {
    // changes/ holds one file per snapshot view when there is any.
    if snapshots.is_empty() {
        assert_eq!(names_in(mnt), ["disk.raw", "snapshots"]);
    } else {
        assert_eq!(names_in(mnt), ["changes", "disk.raw", "snapshots"]);
        assert_dir(&mnt.join("changes"));
        let mut want: Vec<String> = snapshots.keys().map(|n| format!("{n}.raw")).collect();
        want.sort();
        assert_eq!(names_in(&mnt.join("changes")), want, "names under changes/");
    }
    assert_dir(mnt);
    // snapshots/ takes mkdir (live snapshots) when the top is a writable qcow2 image.
    let snaps = std::fs::metadata(mnt.join("snapshots")).unwrap();
    assert!(snaps.is_dir());
    assert!(
        [0o555, 0o755].contains(&(snaps.mode() & 0o7777)),
        "mode of snapshots/"
    );
    assert_file(&mnt.join("disk.raw"), live, None);
    let want: Vec<String> = snapshots.keys().cloned().collect();
    assert_eq!(
        names_in(&mnt.join("snapshots")),
        want,
        "names under snapshots/"
    );
    for (name, bytes) in snapshots {
        let dir = mnt.join("snapshots").join(name);
        assert_dir(&dir);
        assert_eq!(names_in(&dir), ["disk.raw"], "content of snapshots/{name}");
        assert_file(&dir.join("disk.raw"), bytes, Some(0o444));
    }
}

pub fn assert_dir(dir: &Path) {
    let meta = std::fs::metadata(dir).unwrap();
    assert!(meta.is_dir(), "{} is not a directory", dir.display());
    assert_eq!(meta.mode() & 0o7777, 0o555, "mode of {}", dir.display());
}

/// Size, mode (if given; else read-only or read-write) and bytes of one exposed file.
pub fn assert_file(path: &Path, want: &[u8], mode: Option<u32>) {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).unwrap();
    assert!(meta.is_file(), "{what} is not a regular file");
    assert_eq!(meta.len(), want.len() as u64, "size of {what}");
    match mode {
        Some(m) => assert_eq!(meta.mode() & 0o7777, m, "mode of {what}"),
        None => assert!(
            matches!(meta.mode() & 0o7777, 0o444 | 0o644),
            "mode of {what}: {:o}",
            meta.mode()
        ),
    }
    assert_same(&what, &std::fs::read(path).unwrap(), want);
    // Odd ranges, read through a fresh descriptor: boundaries fall inside clusters and past EOF.
    let f = File::open(path).unwrap();
    let mut rng = Rng::new(want.len() as u64);
    for _ in 0..24 {
        let off = rng.below(want.len() as u64 + 1000) as usize;
        let len = 1 + rng.below(300_000) as usize;
        let mut buf = vec![0u8; len];
        let n = read_fully_at(&f, &mut buf, off as u64);
        let expect = &want[off.min(want.len())..(off + len).min(want.len())];
        assert_eq!(n, expect.len(), "{what}: read of {len} at {off}");
        assert!(buf[..n] == *expect, "{what}: bytes differ in {off}+{len}");
    }
}

/// Reads until `buf` is full or EOF; returns the byte count.
pub fn read_fully_at(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// Asserts that no way of writing to `path` gets through and that its bytes stay `want`.
pub fn assert_refuses_writes(path: &Path, want: &[u8]) {
    let what = path.display();
    for (read, append) in [(false, false), (true, false), (false, true)] {
        let e = OpenOptions::new()
            .read(read)
            .write(!append)
            .append(append)
            .open(path)
            .unwrap_err();
        assert!(
            matches!(errno_of(&e), libc::EROFS | libc::EACCES),
            "{what}: open for writing (read={read} append={append}): {e}"
        );
    }
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    unsafe {
        assert_ne!(
            libc::access(c.as_ptr(), libc::W_OK),
            0,
            "{what}: access(W_OK)"
        );
        assert_ne!(libc::truncate(c.as_ptr(), 0), 0, "{what}: truncate");
    }
    assert_eq!(std::fs::metadata(path).unwrap().len(), want.len() as u64);
    assert_same(
        &format!("{what} after refusals"),
        &std::fs::read(path).unwrap(),
        want,
    );
}

/// lseek on an open file: the new offset or the errno.
pub fn seek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: f is an open descriptor; lseek touches no memory.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as u64)
    }
}

/// Every image file's bytes, to prove a mount left them alone.
pub fn capture_files(files: &[&Path]) -> Vec<(PathBuf, Vec<u8>, SystemTime)> {
    files
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).unwrap();
            (
                p.to_path_buf(),
                std::fs::read(p).unwrap(),
                m.modified().unwrap(),
            )
        })
        .collect()
}

pub fn assert_files_unchanged(before: &[(PathBuf, Vec<u8>, SystemTime)]) {
    for (path, bytes, mtime) in before {
        let now = std::fs::read(path).unwrap();
        assert!(now == *bytes, "{} changed", path.display());
        let m = std::fs::metadata(path).unwrap().modified().unwrap();
        assert_eq!(m, *mtime, "mtime of {}", path.display());
    }
}
