//! Mounting remote URLs in the tests and reading what the daemons report.

use crate::common::assert_same;
use crate::mount_support::{BIN, MountGuard, names_in};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Environment variables for a daemon (S3 settings; none for plain HTTP).
pub type Env = [(&'static str, String)];

/// Mounts `url` on `mnt` with `env`; returns the guard and the canonical mount point.
pub fn mount_url(url: &str, mnt: &Path, env: &Env, extra: &[&str]) -> (MountGuard, PathBuf) {
    std::fs::create_dir_all(mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let out = Command::new(BIN)
        .args(extra)
        .arg(url)
        .arg(&mnt)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mounting {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (MountGuard(mnt.clone()), mnt)
}

/// `vmfs-mount --list EXTRA... URL` with `env`.
pub fn list(url: &str, env: &Env, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--list")
        .args(extra)
        .arg(url)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap()
}

/// Every disk file of a mount (disk.raw and each snapshot's), by relative path.
pub fn views(mnt: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    out.insert(
        "disk.raw".into(),
        std::fs::read(mnt.join("disk.raw")).unwrap(),
    );
    for name in names_in(&mnt.join("snapshots")) {
        let rel = format!("snapshots/{name}/disk.raw");
        out.insert(rel.clone(), std::fs::read(mnt.join(&rel)).unwrap());
    }
    out
}

pub fn read_at(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

/// The `bytes fetched` figure of the daemon's last statistics line for `url`.
pub fn fetched_from_log(log: &Path, url: &str) -> u64 {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(url) && l.contains("bytes fetched"))
        .unwrap_or_else(|| panic!("no statistics line for {url} in:\n{text}"));
    let before = line.split(" bytes fetched").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Asserts that two mounts show the same disk files with the same bytes.
pub fn assert_trees_equal(
    what: &str,
    got: &BTreeMap<String, Vec<u8>>,
    want: &BTreeMap<String, Vec<u8>>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: the same files"
    );
    for (k, v) in want {
        assert_same(&format!("{what}: {k}"), &got[k], v);
    }
}
