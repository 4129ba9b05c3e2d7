//! Writable clones of a mounted image (`--clones DIR`): `DIR/NAME.qcow2`, each a qcow2 v3
//! overlay whose backing file is the mounted image, usable by QEMU directly.
//!
//! A clone is opened as its own top layer over the mount's layers (the same objects, so every
//! clone shares the base's decoded tables); its backing file must be the mounted image itself
//! (same device and inode), which is checked when it is found and when it is opened. Files in
//! DIR that are not clones of this image are left alone.

use crate::cache::ByteCache;
use crate::error::{Error, Kind, Result};
use crate::format::qcow2::Qcow2Image;
use crate::format::qcow2::header::MAGIC;
use crate::format::qcow2::write::create;
use crate::format::{self, Format, Layer, OpenCtx, ParentRef};
use crate::lock::{self, LockGuard};
use crate::view::View;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

pub const CLONE_EXTENSION: &str = "qcow2";
/// Longest clone name: the file name `NAME.qcow2` must fit in 255 bytes.
const MAX_NAME: usize = 255 - 1 - CLONE_EXTENSION.len();

/// The clone directory of one mounted image.
#[derive(Debug, Clone)]
pub struct CloneDir {
    dir: PathBuf,
    image: PathBuf,
    image_format: Format,
    image_size: u64,
    image_key: (u64, u64),
}

/// A clone file found in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub name: String,
    pub path: PathBuf,
}

impl CloneDir {
    /// The clones of `image` (of `image_format`, `image_size` guest bytes) in `dir`, which is
    /// created when missing.
    pub fn new(dir: &Path, image: &Path, image_format: Format, image_size: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create clone directory", e))?;
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, "stat", e))?;
        if !meta.is_dir() {
            return Err(Error::invalid(format!(
                "{}: the clone directory is not a directory",
                dir.display()
            )));
        }
        Ok(CloneDir {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            image: std::path::absolute(image).unwrap_or_else(|_| image.to_path_buf()),
            image_format,
            image_size,
            image_key: file_key(image)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of clone `name`, once the name is checked.
    pub fn path_of(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}.{CLONE_EXTENSION}")))
    }

    /// Creates clone `name` (AlreadyExists if its file exists) and returns its file.
    pub fn create(&self, name: &str) -> Result<PathBuf> {
        let path = self.path_of(name)?;
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(Error::new(
                Kind::Exists,
                format!("{}: a clone of this name exists", path.display()),
            ));
        }
        let stored = backing_name(&self.image, &self.dir)?;
        let stored = stored.to_str().ok_or_else(|| {
            Error::invalid(format!("{}: path is not UTF-8", self.image.display()))
        })?;
        // Refuses to replace a file that appeared meanwhile (EEXIST).
        create::create(
            &path,
            self.image_size,
            Some((stored, self.image_format.name())),
        )?;
        // The stored name must lead back to the image from where QEMU will look.
        if let Err(e) = self.check_clone(&path) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        log::info!(
            "created clone {} over {} (backing file {stored:?})",
            path.display(),
            self.image.display()
        );
        Ok(path)
    }

    /// Deletes the file of clone `name`.
    pub fn delete(&self, name: &str) -> Result<()> {
        let path = self.path_of(name)?;
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, "delete clone", e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        log::info!("deleted clone {}", path.display());
        Ok(())
    }

    /// The clones of this image in the directory, by name. Other files are left alone, each
    /// with a log line saying why.
    pub fn discover(&self) -> Result<Vec<Found>> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, "list", e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&self.dir, "list", e))?;
            let path = entry.path();
            let Some(name) = clone_name(&path) else {
                continue;
            };
            match self.check_clone(&path) {
                Ok(()) => out.push(Found { name, path }),
                Err(e) => log::info!(
                    "{}: not a clone of this image, left alone: {e}",
                    path.display()
                ),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Checks that `path` is a qcow2 file (not a symlink) whose backing file is the image.
    fn check_clone(&self, path: &Path) -> Result<()> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, "stat", e))?;
        if !meta.file_type().is_file() {
            return Err(Error::invalid("not a regular file"));
        }
        // The clone is a file the user asked for (through --clones DIR): a trusted root.
        let ctx = OpenCtx::new(Arc::new(ByteCache::new(1 << 20)), false)
            .with_policy(crate::backing_policy::BackingPolicy::new().trust_named(path));
        let file = crate::storage::HostFile::open(path, false)?;
        let mut magic = [0u8; 4];
        if file.len() < 4 || file.read_exact_at(&mut magic, 0, "magic").is_err() || &magic != MAGIC
        {
            return Err(Error::invalid("not a qcow2 image"));
        }
        let q = Qcow2Image::open(path, &ctx)?;
        self.check_parent(&q.parent)
    }

    fn check_parent(&self, parent: &ParentRef) -> Result<()> {
        let ParentRef::Path { raw, path, .. } = parent else {
            return Err(Error::invalid("it has no backing file"));
        };
        match file_key(path) {
            Ok(k) if k == self.image_key => Ok(()),
            Ok(_) => Err(Error::invalid(format!(
                "its backing file {raw:?} is another file"
            ))),
            Err(_) => Err(Error::invalid(format!(
                "its backing file {raw:?} does not exist"
            ))),
        }
    }

    /// Opens clone file `path` as a writable layer over `base` (the mount's layers, top
    /// first, whose top is the image): the clone's chain, top first. `ctx` gives the shared
    /// table cache and the mount's backing-file policy; the clone itself is a trusted root.
    pub fn open(
        &self,
        path: &Path,
        base: &[Arc<dyn Layer>],
        ctx: &OpenCtx,
    ) -> Result<Vec<Arc<dyn Layer>>> {
        let ctx = OpenCtx {
            writable: true,
            ..ctx.clone()
        }
        .with_policy(ctx.policy.clone().trust_named(path));
        let top = format::open_layer(path, Format::Qcow2, &ctx)?;
        self.check_parent(&top.parent())
            .map_err(|e| e.context(format!("clone {}", path.display())))?;
        let Some(image) = base.first() else {
            return Err(Error::invalid("a clone needs a base image"));
        };
        top.verify_parent(&**image)?;
        let mut layers = vec![top];
        layers.extend(base.iter().cloned());
        Ok(layers)
    }
}

/// The clones of a mount: how to open, make and delete them over the mount's live view,
/// which every clone uses as its base (so they share its decoded tables and resolved
/// extents). The live view must not change while clones exist: the mount is read-only.
pub struct CloneSet {
    dir: CloneDir,
    base: Arc<View>,
    /// The shared table cache and the mount's backing-file policy.
    ctx: OpenCtx,
    clusters: Arc<ByteCache>,
}

/// One clone in use: its view (writable) and its QEMU locks.
pub struct OpenClone {
    pub name: String,
    pub path: PathBuf,
    pub view: Arc<View>,
    pub mtime: SystemTime,
    _locks: LockGuard,
}

impl CloneSet {
    pub fn new(dir: CloneDir, base: Arc<View>, ctx: OpenCtx, clusters: Arc<ByteCache>) -> Self {
        CloneSet {
            dir,
            base,
            ctx,
            clusters,
        }
    }

    pub fn dir(&self) -> &CloneDir {
        &self.dir
    }

    /// Opens every clone of the image found in the directory; one that cannot be opened (a
    /// QEMU holds it, it is damaged) is skipped with a warning.
    pub fn open_existing(&self) -> Result<Vec<OpenClone>> {
        let mut out = Vec::new();
        for f in self.dir.discover()? {
            match self.open(&f.name, &f.path) {
                Ok(c) => out.push(c),
                Err(e) => log::warn!("clone {:?} is not shown: {e}", f.name),
            }
        }
        Ok(out)
    }

    /// Opens clone `name` at `path` for writing, locked as QEMU locks an image it writes.
    pub fn open(&self, name: &str, path: &Path) -> Result<OpenClone> {
        let layers = self.dir.open(path, self.base.layers(), &self.ctx)?;
        let top = layers[0].clone();
        if top.writer().is_none() {
            return Err(Error::new(
                Kind::ReadOnly,
                format!("{}: cannot be written in place", path.display()),
            ));
        }
        let locks = lock::lock_for_mount(&top.files(), &[])?;
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let view = View::over(vec![top], self.base.clone(), self.clusters.clone());
        Ok(OpenClone {
            name: name.to_string(),
            path: path.to_path_buf(),
            view: Arc::new(view),
            mtime,
            _locks: locks,
        })
    }

    /// Makes clone `name` and opens it; the file is removed again if it cannot be opened.
    pub fn create(&self, name: &str) -> Result<OpenClone> {
        let path = self.dir.create(name)?;
        self.open(name, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })
    }

    /// Flushes and closes `clone`, then deletes its file.
    pub fn delete(&self, clone: OpenClone) -> Result<()> {
        if let Err(e) = clone.view.flush() {
            log::warn!("clone {:?}: flush before deleting: {e}", clone.name);
        }
        let name = clone.name.clone();
        drop(clone);
        self.dir.delete(&name)
    }
}

/// The clone name of a directory entry `NAME.qcow2`, if it looks like one.
fn clone_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let name = file.strip_suffix(&format!(".{CLONE_EXTENSION}"))?;
    check_name(name).ok()?;
    Some(name.to_string())
}

/// A clone name is one path component: not empty, not `.`/`..`, no `/` or NUL, short
/// enough for its file name.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| Error::invalid(format!("clone name {name:?}: {why}"));
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("not a usable name"));
    }
    if name.contains(['/', '\0']) {
        return Err(bad("contains / or NUL"));
    }
    if name.len() > MAX_NAME {
        return Err(bad(&format!("longer than {MAX_NAME} bytes")));
    }
    Ok(())
}

/// The backing name a clone in `dir` stores for `image`: relative to `dir` (climbing with
/// `..` if needed) when `dir` has no symbolic link on the way, so QEMU's resolution of the
/// name against the clone's directory lands on the image; otherwise the image's absolute
/// path.
pub fn backing_name(image: &Path, dir: &Path) -> Result<PathBuf> {
    let image_abs = image
        .canonicalize()
        .map_err(|e| Error::io(image, "resolve path", e))?;
    let dir_abs = std::path::absolute(dir).map_err(|e| Error::io(dir, "resolve path", e))?;
    let dir_real = dir_abs
        .canonicalize()
        .map_err(|e| Error::io(dir, "resolve path", e))?;
    if dir_real != dir_abs {
        return Ok(image_abs);
    }
    Ok(relative(&dir_real, &image_abs).unwrap_or(image_abs))
}

/// `to` relative to directory `from` (both absolute, canonical).
fn relative(from: &Path, to: &Path) -> Option<PathBuf> {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    // Sharing only the root: an absolute path says it better.
    if common <= 1 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    Some(out)
}

fn file_key(path: &Path) -> Result<(u64, u64)> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components() {
        assert!(check_name("web-01").is_ok());
        assert!(check_name(".hidden").is_ok());
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"x".repeat(250)).is_err());
        assert!(check_name(&"x".repeat(249)).is_ok());
        assert_eq!(clone_name(Path::new("/d/a.qcow2")), Some("a".into()));
        assert_eq!(clone_name(Path::new("/d/a.img")), None);
        assert_eq!(clone_name(Path::new("/d/.qcow2")), None);
    }

    #[test]
    fn relative_paths_climb_from_the_clone_directory() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b));
        assert_eq!(r("/srv/img", "/srv/img/g.qcow2"), Some("g.qcow2".into()));
        assert_eq!(
            r("/srv/img/clones", "/srv/img/g.qcow2"),
            Some("../g.qcow2".into())
        );
        assert_eq!(
            r("/srv/a/b", "/srv/c/g.qcow2"),
            Some("../../c/g.qcow2".into())
        );
        assert_eq!(r("/tmp/x", "/srv/g.qcow2"), None);
    }
}
