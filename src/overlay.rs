//! `--overlay FILE`: writes go to a qcow2 overlay whose backing file is the image, so the
//! image itself is never written. The overlay is created when missing and reused only when
//! its backing file is the image.

use crate::backing_policy::BackingPolicy;
use crate::cache::ByteCache;
use crate::error::{Error, Kind, Result};
use crate::format::qcow2::Qcow2Image;
use crate::format::qcow2::header::MAGIC;
use crate::format::qcow2::write::create;
use crate::format::{self, Format, OpenCtx, ParentRef};
use crate::storage::HostFile;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Creates `overlay` over `image` (of `image_format`) if it does not exist; otherwise checks
/// that it is a qcow2 image whose backing file is `image` (same file, not just same name).
/// `policy` governs the files the image names (its extents, data file).
pub fn prepare_overlay(
    image: &Path,
    overlay: &Path,
    image_format: Format,
    policy: &BackingPolicy,
) -> Result<()> {
    let image_meta = std::fs::metadata(image).map_err(|e| Error::io(image, "stat", e))?;
    match std::fs::symlink_metadata(overlay) {
        Ok(_) => validate(image, &image_meta, overlay),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_over(image, overlay, image_format, policy)
        }
        Err(e) => Err(Error::io(overlay, "stat", e)),
    }
}

fn create_over(
    image: &Path,
    overlay: &Path,
    image_format: Format,
    policy: &BackingPolicy,
) -> Result<()> {
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(4 << 20)), false)
        .with_policy(policy.clone().trust_named(image));
    let size = format::open_layer(image, image_format, &ctx)?.virtual_size();
    let stored = backing_name(image, overlay)?;
    let name = stored
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{}: path is not UTF-8", image.display())))?;
    create::create(overlay, size, Some((name, image_format.name())))?;
    log::info!(
        "created overlay {} over {} ({name})",
        overlay.display(),
        image.display()
    );
    Ok(())
}

/// The backing name to store: relative to the overlay's directory when the image lies in or
/// below it, else the image's absolute path.
pub fn backing_name(image: &Path, overlay: &Path) -> Result<PathBuf> {
    let image_abs = image
        .canonicalize()
        .map_err(|e| Error::io(image, "resolve path", e))?;
    let dir = match overlay.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir_abs = dir
        .canonicalize()
        .map_err(|e| Error::io(&dir, "resolve overlay directory", e))?;
    Ok(match image_abs.strip_prefix(&dir_abs) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
        _ => image_abs,
    })
}

fn validate(image: &Path, image_meta: &std::fs::Metadata, overlay: &Path) -> Result<()> {
    let not_ours = |why: &str| {
        Error::new(
            Kind::InvalidInput,
            format!(
                "{}: cannot be used as the overlay of {}: {why}",
                overlay.display(),
                image.display()
            ),
        )
    };
    let file = HostFile::open(overlay, false)?;
    let mut magic = [0u8; 4];
    if file.len() < 4 || file.read_exact_at(&mut magic, 0, "magic").is_err() || &magic != MAGIC {
        return Err(not_ours("it exists and is not a qcow2 image"));
    }
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(1 << 20)), false);
    let q = Qcow2Image::open(overlay, &ctx)?;
    let ParentRef::Path { raw, path, .. } = &q.parent else {
        return Err(not_ours("it has no backing file"));
    };
    let m = std::fs::metadata(path)
        .map_err(|_| not_ours(&format!("its backing file {raw:?} does not exist")))?;
    if (m.dev(), m.ino()) != (image_meta.dev(), image_meta.ino()) {
        return Err(not_ours(&format!(
            "its backing file is {raw:?}, another file"
        )));
    }
    Ok(())
}
