//! Questions about a location, local path or URL, asked without opening it as a layer: does
//! it exist, what is in its directory, what is its identity and mtime. Drivers and the chain
//! opener ask these (parent searches, locator candidates, loop detection, `--list`) so that
//! they work the same on remote images.

use super::{FileKey, RemoteUrl, registry};
use crate::error::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Whether `path` names an existing regular file (or a remote object).
pub fn is_file(path: &Path) -> bool {
    match RemoteUrl::from_path(path) {
        Ok(Some(url)) => registry::open(&url).is_ok(),
        Ok(None) => path.is_file(),
        Err(_) => false,
    }
}

/// Whether `path` exists (a remote object: whether the server has it).
pub fn exists(path: &Path) -> bool {
    match RemoteUrl::from_path(path) {
        Ok(Some(url)) => registry::open(&url).is_ok(),
        Ok(None) => path.exists(),
        Err(_) => false,
    }
}

/// The regular files in `dir`, sorted, at most `limit`. A remote "directory" is an S3 prefix
/// (listed) or an HTTP path (servers cannot list: none). Unreadable directories: none.
pub fn list_files(dir: &Path, limit: usize) -> Vec<PathBuf> {
    if super::is_remote(dir) {
        let Some(d) = dir.to_str() else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = registry::list(d, limit)
            .map_err(|e| log::info!("cannot list {d}: {e}"))
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect();
        v.sort();
        return v;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .take(limit)
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// The whole content of a small file (a .vbox or .vmsd), or `None` if it is missing,
/// unreadable or larger than `limit`.
pub fn read_small(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let f = super::HostFile::open(path, false).ok()?;
    if f.len() > limit {
        return None;
    }
    f.read_table(0, f.len(), limit, "file").ok()
}

/// What identifies the file at `path` (loop detection).
pub fn key_of(path: &Path) -> Result<FileKey> {
    if let Some(url) = RemoteUrl::from_path(path)? {
        return Ok(FileKey::Remote(url.to_string()));
    }
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
    Ok(FileKey::Local {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The modification time of `path` (a remote object's Last-Modified), if known.
pub fn modified(path: &Path) -> Option<SystemTime> {
    match RemoteUrl::from_path(path) {
        Ok(Some(url)) => registry::open(&url).ok()?.modified(),
        Ok(None) => std::fs::metadata(path).ok()?.modified().ok(),
        Err(_) => None,
    }
}
