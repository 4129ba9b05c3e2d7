//! The set of views a mount exposes, with their names: the live view, then one per backing
//! layer and one per internal snapshot. Built once at mount; pure, so it is unit tested.

use crate::format::{Layer, SnapshotInfo};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The whole chain (disk.raw at the mount's root).
    Live,
    /// Backing layer `index` (0 = top) with everything below it.
    Layer { index: usize },
    /// Internal snapshot of layer `layer`.
    Snapshot { layer: usize, info_index: usize },
}

#[derive(Clone, Debug)]
pub struct ViewSpec {
    pub name: String,
    pub origin: Origin,
    pub layers: Vec<Arc<dyn Layer>>,
    pub size: u64,
    pub mtime: SystemTime,
}

/// Plans the views of a chain (`layers[0]` is the top). Snapshot layers are opened here.
pub fn plan(layers: &[Arc<dyn Layer>]) -> crate::error::Result<(ViewSpec, Vec<ViewSpec>)> {
    let live = ViewSpec {
        name: String::new(),
        origin: Origin::Live,
        layers: layers.to_vec(),
        size: layers[0].virtual_size(),
        mtime: file_mtime(layers[0].path()),
    };
    let mut names = Names::default();
    let mut snaps = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        // A VMware .vmsd gives snapshot layers their display names; otherwise the file name.
        let stem = match layer.display_name() {
            Some(n) => sanitize(&n),
            None => layer_name(layer.path()),
        };
        if i > 0 {
            snaps.push(ViewSpec {
                name: names.unique(&stem),
                origin: Origin::Layer { index: i },
                layers: layers[i..].to_vec(),
                size: layer.virtual_size(),
                mtime: file_mtime(layer.path()),
            });
        }
        for s in layer.snapshots() {
            let snap = layer.open_snapshot(s.index)?;
            let mut stack = vec![snap];
            stack.extend(layers[i + 1..].iter().cloned());
            snaps.push(ViewSpec {
                name: names.unique(&snapshot_name(i, &stem, &s)),
                origin: Origin::Snapshot {
                    layer: i,
                    info_index: s.index,
                },
                layers: stack,
                size: s.virtual_size,
                mtime: UNIX_EPOCH + Duration::new(s.date.0, s.date.1),
            });
        }
    }
    Ok((live, snaps))
}

/// `base.qcow2` -> `base`; a name without an extension stays as it is.
pub fn layer_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match file.rfind('.') {
        Some(dot) if dot > 0 => file[..dot].to_string(),
        _ => file,
    };
    sanitize(&stem)
}

fn snapshot_name(layer_index: usize, stem: &str, s: &SnapshotInfo) -> String {
    let tag = if s.name.is_empty() { &s.id } else { &s.name };
    if layer_index == 0 {
        sanitize(tag)
    } else {
        format!("{stem}@{}", sanitize(tag))
    }
}

/// Makes a string a safe single path component.
pub fn sanitize(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    match s.as_str() {
        "" => "_".into(),
        "." | ".." => s.replace('.', "_"),
        _ => s,
    }
}

#[derive(Default)]
struct Names(HashSet<String>);

impl Names {
    /// The name itself, or `name-2`, `name-3`, ... when taken.
    fn unique(&mut self, name: &str) -> String {
        let mut candidate = name.to_string();
        let mut n = 2;
        while !self.0.insert(candidate.clone()) {
            candidate = format!("{name}-{n}");
            n += 1;
        }
        candidate
    }
}

fn file_mtime(path: &Path) -> SystemTime {
    crate::storage::location::modified(path).unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_strip_one_extension_and_slashes() {
        assert_eq!(layer_name(Path::new("/x/base.qcow2")), "base");
        assert_eq!(layer_name(Path::new("/x/disk.raw.img")), "disk.raw");
        assert_eq!(layer_name(Path::new("/x/plain")), "plain");
        assert_eq!(layer_name(Path::new("/x/.hidden")), ".hidden");
        assert_eq!(sanitize("nightly/2024"), "nightly_2024");
        assert_eq!(sanitize(".."), "__");
    }

    #[test]
    fn collisions_get_numeric_suffixes() {
        let mut n = Names::default();
        assert_eq!(n.unique("a"), "a");
        assert_eq!(n.unique("a"), "a-2");
        assert_eq!(n.unique("a"), "a-3");
    }
}
