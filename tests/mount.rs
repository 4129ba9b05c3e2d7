//! Real mounts through the built binary: readiness, bytes, attributes, refusals, seeking,
//! signals and unmounting. Needs /dev/fuse (root, or a normal user with fusermount3).

mod common;
use common::*;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vmfs-mount");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mnt.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// Unmounts on drop if still mounted (tests fail without leaving mounts behind).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            unmount(&self.0);
        }
    }
}

fn unmount(mnt: &Path) {
    let status = if is_root() {
        Command::new("umount").arg(mnt).status()
    } else {
        Command::new("fusermount3").arg("-u").arg(mnt).status()
    };
    if !status.is_ok_and(|s| s.success()) && is_root() {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
}

fn vmfs(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A scratch dir with a raw image of `data` and an empty mount point (canonical paths).
struct Setup {
    img: PathBuf,
    mnt: PathBuf,
    _scratch: Scratch,
}

fn setup(name: &str, data: &[u8]) -> Setup {
    let scratch = Scratch::new(name);
    let img = scratch.path("disk.img");
    std::fs::write(&img, data).unwrap();
    let mnt = scratch.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    Setup {
        img,
        mnt,
        _scratch: scratch,
    }
}

/// Mounts with `extra` options; panics with the daemon's message if it fails.
fn mount(s: &Setup, extra: &[&str]) -> MountGuard {
    let mut args: Vec<&str> = extra.to_vec();
    args.push(s.img.to_str().unwrap());
    args.push(s.mnt.to_str().unwrap());
    let out = vmfs(&args);
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    MountGuard(s.mnt.clone())
}

/// The pid of the daemon serving `mnt`, found by its command line.
fn daemon_pid(mnt: &Path) -> Option<i32> {
    let want = mnt.to_str().unwrap();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_ours = args.first().is_some_and(|a| a.ends_with(b"vmfs-mount"));
        if is_ours && args.contains(&want.as_bytes()) && !is_zombie(pid) {
            return Some(pid);
        }
    }
    None
}

fn is_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

/// Polls (with a deadline) until `cond` holds.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn mount_answers_when_the_command_returns_and_shows_the_image() {
    let data = Rng::new(1).bytes(5 * 1024 * 1024 + 1536);
    let s = setup("mount-basic", &data);
    let _m = mount(&s, &["-r"]);
    // No waiting: the command returned, so the mount must answer now.
    let disk = s.mnt.join("disk.raw");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), data.len() as u64);
    assert_eq!(meta.mode() & 0o7777, 0o444);
    assert!(meta.is_file());
    assert_eq!(meta.blocks(), (data.len() as u64).div_ceil(512));
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_same(
        "disk.raw",
        &std::fs::read(&disk).unwrap(),
        &qemu_raw(&s.img, Some("raw"), &[]),
    );

    let root = std::fs::metadata(&s.mnt).unwrap();
    assert_eq!(root.mode() & 0o7777, 0o555);
    let snaps = s.mnt.join("snapshots");
    assert_eq!(std::fs::metadata(&snaps).unwrap().mode() & 0o7777, 0o555);
    assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
    let mut names: Vec<String> = std::fs::read_dir(&s.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["disk.raw", "snapshots"]);
    assert_eq!(
        std::fs::metadata(s.mnt.join("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn random_reads_match_the_image() {
    let mut data = Rng::new(2).bytes(9 * 1024 * 1024 + 77);
    let s = setup("mount-reads", &data);
    // QEMU rounds a raw image up to whole sectors, reading zeros there; so do we.
    data.resize(data.len().div_ceil(512) * 512, 0);
    let _m = mount(&s, &[]);
    let f = File::open(s.mnt.join("disk.raw")).unwrap();
    let mut rng = Rng::new(3);
    for _ in 0..300 {
        let off = rng.below(data.len() as u64 + 4096);
        let len = 1 + rng.below(3 * 1024 * 1024) as usize;
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off).unwrap();
        let want = &data[(off as usize).min(data.len())..(off as usize + len).min(data.len())];
        assert_eq!(n, want.len(), "short read at {off}+{len}");
        assert!(buf[..n] == *want, "bytes differ at {off}+{len}");
    }
}

#[test]
fn concurrent_readers_see_the_same_bytes() {
    let data = std::sync::Arc::new(Rng::new(14).bytes(16 << 20));
    let s = setup("mount-concurrent", &data);
    // Through the daemon (raw files would otherwise be read by the kernel directly).
    let _m = mount(&s, &["-r", "-o", "threads=4,nopassthrough"]);
    let disk = s.mnt.join("disk.raw");
    let workers: Vec<_> = (0..6u64)
        .map(|t| {
            let (data, disk) = (data.clone(), disk.clone());
            std::thread::spawn(move || {
                let f = File::open(&disk).unwrap();
                let mut rng = Rng::new(100 + t);
                for _ in 0..150 {
                    let off = rng.below(data.len() as u64) as usize;
                    let len = (1 + rng.below(1 << 20) as usize).min(data.len() - off);
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(
                        buf == data[off..off + len],
                        "thread {t}: bytes differ at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn read_only_files_refuse_writes_truncation_and_new_names() {
    let data = Rng::new(4).bytes(1 << 20);
    let s = setup("mount-erofs", &data);
    let _m = mount(&s, &["-o", "ro"]);
    let disk = s.mnt.join("disk.raw");
    for (w, rw) in [(true, false), (true, true), (false, true)] {
        let e = OpenOptions::new()
            .read(rw)
            .write(w || rw)
            .open(&disk)
            .unwrap_err();
        assert_eq!(errno_of(&e), libc::EROFS, "open write={w} read={rw}: {e}");
    }
    let c = std::ffi::CString::new(disk.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid path.
    assert_ne!(
        unsafe { libc::truncate(c.as_ptr(), 4096) },
        0,
        "truncate must fail"
    );
    assert!(File::create(s.mnt.join("new")).is_err());
    assert!(std::fs::create_dir(s.mnt.join("newdir")).is_err());
    assert!(std::fs::remove_file(&disk).is_err());
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20);
    assert_same("after refusals", &std::fs::read(&disk).unwrap(), &data);
}

#[test]
fn seek_data_and_hole_agree_with_the_library() {
    let s = setup("mount-seek", &[]);
    {
        let f = OpenOptions::new().write(true).open(&s.img).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&Rng::new(5).bytes(300_000), 1 << 20)
            .unwrap();
    }
    let view = open_view(&s.img).unwrap();
    let _m = mount(&s, &["-r"]);
    let f = File::open(s.mnt.join("disk.raw")).unwrap();
    let seek = |off: i64, whence: i32| -> Result<i64, i32> {
        // SAFETY: f is an open descriptor.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        } else {
            Ok(r)
        }
    };
    let size = 8i64 << 20;
    for off in [0i64, 4096, (1 << 20) + 5, size - 1] {
        let want_data = view
            .next_data(off as u64)
            .unwrap()
            .map(|o| o as i64)
            .ok_or(libc::ENXIO);
        assert_eq!(seek(off, libc::SEEK_DATA), want_data, "SEEK_DATA {off}");
        assert_eq!(
            seek(off, libc::SEEK_HOLE),
            Ok(view.next_hole(off as u64).unwrap() as i64),
            "SEEK_HOLE {off}"
        );
    }
    assert_eq!(seek(size, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(size + 4096, libc::SEEK_HOLE), Err(libc::ENXIO));
}

#[test]
fn sigterm_unmounts_and_the_daemon_exits() {
    let s = setup("mount-sigterm", &Rng::new(6).bytes(1 << 20));
    let log = s.img.with_file_name("daemon.log");
    let _m = mount(&s, &["-v", "--log-file", log.to_str().unwrap()]);
    let pid = daemon_pid(&s.mnt).expect("daemon process");
    // SAFETY: plain kill of the daemon we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_until("the mount is gone", || !is_mounted(&s.mnt));
    wait_until("the daemon exited", || is_zombie(pid));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("signal 15: flushing and unmounting"),
        "{text}"
    );
    assert!(text.contains("unmounted"), "{text}");
}

#[test]
fn umount_ends_the_daemon() {
    let s = setup("mount-umount", &Rng::new(7).bytes(1 << 20));
    let _m = mount(&s, &[]);
    let pid = daemon_pid(&s.mnt).expect("daemon process");
    unmount(&s.mnt);
    assert!(!is_mounted(&s.mnt));
    wait_until("the daemon exited", || is_zombie(pid));
}

#[test]
fn foreground_mode_serves_until_sigint_and_exits_zero() {
    let data = Rng::new(8).bytes(3 << 20);
    let s = setup("mount-fg", &data);
    let mut child = Command::new(BIN)
        .args(["-f", s.img.to_str().unwrap(), s.mnt.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _m = MountGuard(s.mnt.clone());
    wait_until("the foreground mount appears", || is_mounted(&s.mnt));
    assert_same("fg", &std::fs::read(s.mnt.join("disk.raw")).unwrap(), &data);
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!is_mounted(&s.mnt));
}

#[test]
fn the_daemon_does_not_hold_the_callers_output_open() {
    let s = setup("mount-pipes", &Rng::new(9).bytes(1 << 20));
    let (tx, rx) = std::sync::mpsc::channel();
    let (img, mnt) = (s.img.clone(), s.mnt.clone());
    let _m = MountGuard(s.mnt.clone());
    std::thread::spawn(move || {
        // output() reads stdout and stderr to EOF: it returns only once no process holds them.
        let out = Command::new(BIN)
            .arg("-v")
            .arg(&img)
            .arg(&mnt)
            .stdin(Stdio::null())
            .output();
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the caller's pipes stayed open")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&s.mnt));
}

#[test]
fn a_second_mount_on_the_same_point_is_refused() {
    let s = setup("mount-twice", &Rng::new(10).bytes(1 << 20));
    let _m = mount(&s, &[]);
    let out = vmfs(&[s.img.to_str().unwrap(), s.mnt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("vmfs-mount: ") && err.contains("already mounted"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn generic_mount_options_are_accepted_and_restrictive_ones_applied() {
    let s = setup("mount-opts", &Rng::new(11).bytes(1 << 20));
    let _m = mount(
        &s,
        &[
            "-o",
            "ro,noexec,nosuid,nodev,noatime,relatime,defaults,_netdev,nofail,x-systemd.automount,comment=x",
            "-o",
            "threads=2,cache_size=16M",
        ],
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == s.mnt.to_str())
        .unwrap();
    let opts = line.split(' ').nth(5).unwrap();
    for want in ["ro", "noexec", "nosuid", "nodev", "noatime"] {
        assert!(
            opts.split(',').any(|o| o == want),
            "{want} missing from {opts}"
        );
    }
    assert!(line.contains(" - fuse.vmfs-mount "), "{line}");
}

#[test]
fn mount_helper_passes_ro_through_mount_fuse3() {
    if !Path::new("/sbin/mount.fuse3").exists() || !is_root() {
        eprintln!("skipped: needs /sbin/mount.fuse3 and root");
        return;
    }
    let data = Rng::new(12).bytes(2 << 20);
    let s = setup("mount-helper", &data);
    let _m = MountGuard(s.mnt.clone());
    // mount(8) runs mount.fuse3 with an empty PATH, so name the program with the
    // `prog#source` form instead of relying on `-t fuse.vmfs-mount` finding it.
    let source = format!("{BIN}#{}", s.img.display());
    let out = Command::new("mount")
        .args([
            "-t",
            "fuse",
            &source,
            s.mnt.to_str().unwrap(),
            "-o",
            "ro,noatime,nofail",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == s.mnt.to_str())
        .unwrap();
    assert!(
        line.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{line}"
    );
    assert_same(
        "via mount",
        &std::fs::read(s.mnt.join("disk.raw")).unwrap(),
        &data,
    );
    let e = OpenOptions::new()
        .write(true)
        .custom_flags(0)
        .open(s.mnt.join("disk.raw"))
        .unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS);
}

#[test]
fn a_backing_chain_shows_every_layer_under_snapshots() {
    let s = setup("mount-chain", &[]);
    let dir = s.img.parent().unwrap().to_path_buf();
    let (base, mid, top) = (
        dir.join("base.vmdk"),
        dir.join("mid.vmdk"),
        dir.join("top.vmdk"),
    );
    let mut rng = Rng::new(13);
    qemu_img(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "48M"]);
    write_random("vmdk", &base, &mut rng, 0, 3 << 20);
    write_random("vmdk", &base, &mut rng, 40 << 20, 1 << 20);
    for (child, parent) in [(&mid, &base), (&top, &mid)] {
        let p = parent.file_name().unwrap().to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            p,
            "-F",
            "vmdk",
            child.to_str().unwrap(),
        ]);
        let off = rng.below(40 << 20) & !0xffff;
        write_random("vmdk", child, &mut rng, off, (1 << 20) + 4096);
    }
    let out = vmfs(&["-r", top.to_str().unwrap(), s.mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _m = MountGuard(s.mnt.clone());
    let mut names: Vec<String> = std::fs::read_dir(s.mnt.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["base", "mid"]);
    for (path, image) in [
        ("disk.raw", &top),
        ("snapshots/mid/disk.raw", &mid),
        ("snapshots/base/disk.raw", &base),
    ] {
        let file = s.mnt.join(path);
        assert_same(
            path,
            &std::fs::read(&file).unwrap(),
            &qemu_raw(image, Some("vmdk"), &[]),
        );
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o444, "{path}");
        assert_eq!(
            meta.modified().unwrap(),
            std::fs::metadata(image).unwrap().modified().unwrap(),
            "{path}"
        );
    }
    // Holes are real here: SEEK_DATA/SEEK_HOLE must follow the chain's allocation.
    let view = open_view(&top).unwrap();
    let f = File::open(s.mnt.join("disk.raw")).unwrap();
    let seek = |off: u64, whence| {
        // SAFETY: f is an open descriptor.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
        if r < 0 { None } else { Some(r as u64) }
    };
    for off in [
        0,
        3 << 20,
        (3 << 20) + 1,
        20 << 20,
        40 << 20,
        (48 << 20) - 1,
    ] {
        assert_eq!(
            seek(off, libc::SEEK_DATA),
            view.next_data(off).unwrap(),
            "SEEK_DATA {off}"
        );
        assert_eq!(
            seek(off, libc::SEEK_HOLE),
            Some(view.next_hole(off).unwrap()),
            "SEEK_HOLE {off}"
        );
    }
}
