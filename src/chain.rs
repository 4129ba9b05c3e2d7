//! Opening an image with its whole parent chain: backing-path resolution, the backing-file
//! policy, parent identity checks, a depth limit and loop detection.

use crate::backing_policy::{Role, Verdict};
use crate::error::{Error, Kind, Result};
use crate::format::{self, Format, Layer, OpenCtx, ParentRef};
use crate::storage::{FileKey, is_remote, location};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longer chains are refused (QEMU has no limit, but a hostile image must not make us open
/// files forever).
pub const MAX_DEPTH: usize = 1024;

/// Files tried when searching a directory for a parent by identity.
const MAX_SEARCH: usize = 10_000;

/// The layers of an image, top first. `path` is trusted (the caller named it); every file
/// the chain names must pass `ctx.policy`.
pub fn open_chain(
    path: &Path,
    forced: Option<Format>,
    ctx: &OpenCtx,
) -> Result<Vec<Arc<dyn Layer>>> {
    let (layers, stopped) = open_chain_partial(path, forced, ctx)?;
    match stopped {
        Some(e) => Err(e),
        None => Ok(layers),
    }
}

/// The layers opened so far, top first, and the error that stopped the walk, if any.
pub type PartialChain = (Vec<Arc<dyn Layer>>, Option<Error>);

/// Like `open_chain`, but a failure below the top gives the layers opened so far with the
/// error that stopped the walk (for `--list`). A failure of the top itself is an error.
pub fn open_chain_partial(
    path: &Path,
    forced: Option<Format>,
    ctx: &OpenCtx,
) -> Result<PartialChain> {
    let ctx = ctx
        .clone()
        .with_policy(ctx.policy.clone().trust_named(path));
    let top = format::open_detect(path, forced, &ctx)?;
    let lower = OpenCtx {
        writable: false,
        ..ctx
    };
    let mut seen = HashSet::new();
    seen.insert(file_key(top.path())?);
    let mut layers = vec![top];
    let stopped = walk(&mut layers, &mut seen, path, &lower).err();
    Ok((layers, stopped))
}

/// Opens parents below the last layer until a layer has none.
fn walk(
    layers: &mut Vec<Arc<dyn Layer>>,
    seen: &mut HashSet<FileKey>,
    path: &Path,
    lower: &OpenCtx,
) -> Result<()> {
    while let Some(child) = layers.last().cloned() {
        let parent = match child.parent() {
            ParentRef::None => break,
            ParentRef::Path { raw, path, format } => {
                open_parent_path(&*child, &raw, &path, format, lower)?
            }
            ParentRef::Search { dir, hints, wanted } => {
                search_parent(&*child, &dir, &hints, &wanted, seen, lower)?
            }
        };
        if layers.len() >= MAX_DEPTH {
            return Err(Error::new(
                Kind::Unsupported,
                format!(
                    "{}: backing chain is deeper than {MAX_DEPTH} layers",
                    crate::storage::show_path(path)
                ),
            ));
        }
        if !seen.insert(file_key(parent.path())?) {
            return Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: backing chain loop: its parent {} is already in the chain",
                    crate::storage::show_path(child.path()),
                    crate::storage::show_path(parent.path())
                ),
            ));
        }
        child.verify_parent(&*parent)?;
        layers.push(parent);
    }
    Ok(())
}

/// qcow2 says "backing file", the other formats "parent".
fn parent_role(child: &dyn Layer) -> Role {
    match child.format() {
        Format::Qcow2 => Role::BackingFile,
        _ => Role::Parent,
    }
}

/// Fails unless the first file `layer` opened is the one the policy admitted.
fn confirm(admitted: crate::backing_policy::Admitted, layer: &dyn Layer) -> Result<()> {
    match layer.files().first() {
        Some(f) => admitted.confirm(f),
        None => Ok(()),
    }
}

fn open_parent_path(
    child: &dyn Layer,
    raw: &str,
    path: &Path,
    format: Option<Format>,
    ctx: &OpenCtx,
) -> Result<Arc<dyn Layer>> {
    // A reference to or from a remote object is checked before anything is asked of the
    // server it names.
    let early = if is_remote(child.path()) || is_remote(path) {
        Some(
            ctx.policy
                .check(child.path(), parent_role(child), raw, path)?,
        )
    } else {
        None
    };
    if !location::exists(path) {
        return Err(Error::new(
            Kind::NotFound,
            format!(
                "{}: backing file {raw:?} not found (tried {})",
                crate::storage::show_path(child.path()),
                crate::storage::show_path(path)
            ),
        ));
    }
    let admitted = match early {
        Some(a) => a,
        None => ctx
            .policy
            .check(child.path(), parent_role(child), raw, path)?,
    };
    let layer = format::open_detect(path, format, ctx).map_err(|e| {
        e.context(format!(
            "backing file of {}",
            crate::storage::show_path(child.path())
        ))
    })?;
    confirm(admitted, &*layer)?;
    Ok(layer)
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
    // What the policy reports as "stored": the identity, without the search note.
    let stored = wanted.split(" (").next().unwrap_or(wanted);
    let mut in_chain = Vec::new();
    let mut outside = Vec::new();
    for cand in candidates {
        match file_key(&cand) {
            Ok(k) if !seen.contains(&k) => {}
            Ok(_) => {
                in_chain.push(cand);
                continue;
            }
            Err(_) => continue,
        }
        match ctx.policy.verdict(&cand) {
            Verdict::Allowed(_) => {}
            Verdict::Outside(_) => {
                outside.push(cand);
                continue;
            }
            Verdict::NotAnImage(_) | Verdict::Unreadable(_) => continue,
        }
        let Ok(layer) = format::open_detect(&cand, None, ctx) else {
            continue;
        };
        if child.verify_parent(&*layer).is_ok() {
            let admitted = ctx
                .policy
                .check(child.path(), Role::Parent, stored, &cand)?;
            confirm(admitted, &*layer)?;
            return Ok(layer);
        }
    }
    // The parent exists, but where the policy does not look: say so, and how to allow it.
    for cand in outside {
        if format::open_detect(&cand, None, ctx)
            .is_ok_and(|layer| child.verify_parent(&*layer).is_ok())
        {
            ctx.policy
                .check(child.path(), Role::Parent, stored, &cand)?;
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
                    crate::storage::show_path(child.path()),
                    crate::storage::show_path(&cand)
                ),
            ));
        }
    }
    Err(Error::new(
        Kind::NotFound,
        format!(
            "{}: parent image not found: no image in {} has {wanted}",
            crate::storage::show_path(child.path()),
            dir.display()
        ),
    ))
}

fn file_key(path: &Path) -> Result<FileKey> {
    location::key_of(path)
}
