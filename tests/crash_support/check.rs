//! Checking one crash state with QEMU: `qemu-img check` must find no errors (leaks are
//! allowed), and `qemu-img convert` of the disk (and sometimes of the internal snapshot) must
//! show only what the guest may see after a crash at that instant.

use super::guest::GuestLog;
use super::workload::{BASE, SNAP, TOP};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory to check states in: the backing file beside a state file named like the overlay.
pub struct Bench {
    dir: PathBuf,
}

impl Bench {
    pub fn new(dir: PathBuf, base: &[u8]) -> Bench {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(BASE), base).unwrap();
        Bench { dir }
    }

    pub fn image(&self) -> PathBuf {
        self.dir.join(TOP)
    }

    /// Problems of `state`, a crash at `tc` (empty: it passes).
    pub fn check(
        &self,
        state: &[u8],
        log: &GuestLog,
        tc: u64,
        snapshot: Option<&[u64]>,
    ) -> Vec<String> {
        let image = self.image();
        std::fs::write(&image, state).unwrap();
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        // 0: clean, 3: leaked clusters only; 1: not checkable, 2: corruption.
        let code = out.status.code();
        if !(code == Some(0) || code == Some(3)) || text.contains("ERROR") {
            let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).take(12).collect();
            return vec![format!(
                "qemu-img check exit {code:?}: {}",
                lines.join(" | ")
            )];
        }
        let mut bad = match self.convert(&image, &[]) {
            Ok(disk) => log.check(&disk, tc),
            Err(e) => vec![e],
        };
        if let Some(want) = snapshot {
            let opt = format!("snapshot.name={SNAP}");
            match self.convert(&image, &["-l", &opt]) {
                Ok(disk) => {
                    let snap = GuestLog::new(want.to_vec());
                    for b in snap.check(&disk, 0) {
                        bad.push(format!("snapshot {SNAP}: {b}"));
                    }
                }
                Err(e) => bad.push(format!("snapshot {SNAP}: {e}")),
            }
        }
        bad
    }

    /// The disk of `image` (`extra`: e.g. `-l snapshot.name=X`) as raw bytes.
    pub fn convert(&self, image: &Path, extra: &[&str]) -> Result<Vec<u8>, String> {
        let raw = self.dir.join("state.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2"])
            .args(extra)
            .args(["-O", "raw"])
            .arg(image)
            .arg(&raw)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "qemu-img convert: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let disk = std::fs::read(&raw).unwrap();
        std::fs::remove_file(&raw).unwrap();
        Ok(disk)
    }
}
