//! Opening an image with its whole parent chain: backing-path resolution, parent identity
//! checks, a depth limit and loop detection.

use crate::error::{Error, Kind, Result};
use crate::format::{self, Format, Layer, OpenCtx, ParentRef};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longer chains are refused (QEMU has no limit, but a hostile image must not make us open
/// files forever).
pub const MAX_DEPTH: usize = 1024;

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
    if !path.exists() {
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
    seen: &HashSet<(u64, u64)>,
    ctx: &OpenCtx,
) -> Result<Arc<dyn Layer>> {
    let mut candidates: Vec<PathBuf> = hints.to_vec();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut all: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        all.sort();
        candidates.extend(all);
    }
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

fn file_key(path: &Path) -> Result<(u64, u64)> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
    Ok((m.dev(), m.ino()))
}
