//! The daemon in the foreground (`-f`) as a child of the test, so that the test knows its PID:
//! it can kill it like a crash would, or unmount and wait until it has really exited (an
//! unmount returns before the daemon has flushed and released the image locks).

use super::{BIN, is_mounted, is_root};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);

pub struct Daemon {
    child: Child,
    pub mnt: PathBuf,
    log: PathBuf,
}

/// Mounts `image` on `dir/mnt` with `vmfs-mount -f` and returns once the mount is listed.
/// The daemon's log (stderr) goes to `dir/daemon.log`.
pub fn mount_foreground(image: &Path, dir: &Path, extra: &[&str]) -> Daemon {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let log = dir.join("daemon.log");
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let child = Command::new(BIN)
        .arg("-f")
        .args(extra)
        .arg(image)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut d = Daemon { child, mnt, log };
    let deadline = Instant::now() + DEADLINE;
    while !is_mounted(&d.mnt) {
        if let Some(status) = d.child.try_wait().unwrap() {
            panic!(
                "vmfs-mount -f {} exited ({status}): {}",
                image.display(),
                d.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "vmfs-mount -f: no mount after {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, as a crash: nothing is flushed; the dead mount stays until `unmount`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Unmounts (lazily if a dead mount is still busy) and waits until the daemon has exited;
    /// returns its exit status (None if it had been killed).
    pub fn unmount(&mut self) -> Option<i32> {
        if is_mounted(&self.mnt) {
            detach(&self.mnt);
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!("vmfs-mount did not exit after the unmount: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Unmounts without waiting for the daemon (`unmount` waits for it to vanish from /proc, which
/// a child of ours does only once we have reaped it).
fn detach(mnt: &Path) {
    let ok = if is_root() {
        Command::new("umount").arg(mnt).status()
    } else {
        Command::new("fusermount3").arg("-u").arg(mnt).status()
    };
    if !ok.is_ok_and(|s| s.success()) {
        let lazy = if is_root() { "-l" } else { "-uz" };
        let cmd = if is_root() { "umount" } else { "fusermount3" };
        let _ = Command::new(cmd).arg(lazy).arg(mnt).status();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            detach(&self.mnt);
        }
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
