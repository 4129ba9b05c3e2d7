//! Opening an image with its whole parent chain: backing-path resolution, parent identity
//! checks, a depth limit and loop detection.

use crate::error::{Error, Kind, Result};
use crate::format::{self, Format, Layer, OpenCtx, ParentRef};
use crate::paths::check_reference;
use crate::storage::FileKey;
use crate::storage::location;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longer chains are refused (QEMU has no limit, but a hostile image must not make us open
/// files forever).
pub const MAX_DEPTH: usize = 1024;

/// Files tried when searching a directory for a parent by identity.
const MAX_SEARCH: usize = 10_000;

/// The layers of an image, top first.
pub fn open_chain(
    path: &Path,
    forced: Option<Format>,
    ctx: &OpenCtx,
) -> Result<Vec<Arc<dyn Layer>>> {
    let top = format::open_detect(path, forced, ctx)?;
    let lower = OpenCtx {
        writable: false,
        ..ctx.clone()
    };
    let mut seen = HashSet::new();
    seen.insert(file_key(top.path())?);
    let mut layers = vec![top];
    loop {
        let child = layers.last().cloned().expect("chain has a top");
        let parent = match child.parent() {
            ParentRef::None => break,
            ParentRef::Path { raw, path, format } => {
                open_parent_path(&*child, &raw, &path, format, &lower)?
            }
            ParentRef::Search { dir, hints, wanted } => {
                search_parent(&*child, &dir, &hints, &wanted, &seen, &lower)?
            }
        };
        if layers.len() >= MAX_DEPTH {
            return Err(Error::new(
                Kind::Unsupported,
                format!(
                    "{}: backing chain is deeper than {MAX_DEPTH} layers",
                    path.display()
                ),
            ));
        }
        if !seen.insert(file_key(parent.path())?) {
            return Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: backing chain loop: its parent {} is already in the chain",
                    child.path().display(),
                    parent.path().display()
                ),
            ));
        }
        child.verify_parent(&*parent)?;
        layers.push(parent);
    }
    Ok(layers)
}

fn open_parent_path(
    child: &dyn Layer,
    raw: &str,
    path: &Path,
    format: Option<Format>,
    ctx: &OpenCtx,
) -> Result<Arc<dyn Layer>> {
    check_reference(child.path(), raw, path)?;
    if !location::exists(path) {
        return Err(Error::new(
            Kind::NotFound,
            format!(
                "{}: backing file {raw:?} not found (tried {})",
                child.path().display(),
                path.display()
            ),
        ));
    }
    format::open_detect(path, format, ctx)
        .map_err(|e| e.context(format!("backing file of {}", child.path().display())))
}

/// Finds the parent of `child` among the images in `dir` (formats that store only an
/// identity): hints first, then every regular file, skipping those already in the chain.
fn search_parent(
    child: &dyn Layer,
    dir: &Path,
    hints: &[PathBuf],
    wanted: &str,
    seen: &HashSet<FileKey>,
    ctx: &OpenCtx,
) -> Result<Arc<dyn Layer>> {
    let mut candidates: Vec<PathBuf> = hints.to_vec();
    candidates.extend(location::list_files(dir, MAX_SEARCH));
    // A remote child's parent is searched only beside it.
    candidates.retain(|c| check_reference(child.path(), &c.to_string_lossy(), c).is_ok());
    let mut in_chain = Vec::new();
    for cand in candidates {
        match file_key(&cand) {
            Ok(k) if !seen.contains(&k) => {}
            Ok(_) => {
                in_chain.push(cand);
                continue;
            }
            Err(_) => continue,
        }
        let Ok(layer) = format::open_detect(&cand, None, ctx) else {
            continue;
        };
        if child.verify_parent(&*layer).is_ok() {
            return Ok(layer);
        }
    }
    // Only a file already in the chain matches: identities that point at each other.
    for cand in in_chain {
        if format::open_detect(&cand, None, ctx)
            .is_ok_and(|layer| child.verify_parent(&*layer).is_ok())
        {
            return Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: backing chain loop: its parent ({wanted}) is {}, already in the chain",
                    child.path().display(),
                    cand.display()
                ),
            ));
        }
    }
    Err(Error::new(
        Kind::NotFound,
        format!(
            "{}: parent image not found: no image in {} has {wanted}",
            child.path().display(),
            dir.display()
        ),
    ))
}

fn file_key(path: &Path) -> Result<FileKey> {
    location::key_of(path)
}
