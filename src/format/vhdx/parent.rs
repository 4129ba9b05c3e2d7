//! Differencing disks: where the parent is (parent locator paths, Windows syntax) and whether
//! an opened parent is the right one (parent_linkage = the parent's DataWriteGuid).

use super::guid::Guid;
use super::metadata::Metadata;
use crate::error::{Error, Kind, Result};
use crate::format::{Format, Layer, ParentRef};
use std::path::{Path, PathBuf};

/// The GUIDs a parent's DataWriteGuid may equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linkage {
    pub primary: Guid,
    pub secondary: Option<Guid>,
}

pub fn linkage(path: &Path, meta: &Metadata) -> Result<Linkage> {
    let parse = |key: &str| -> Result<Option<Guid>> {
        match meta.locator(key) {
            None => Ok(None),
            Some(v) => Guid::parse(v).map(Some).ok_or_else(|| {
                Error::corrupt(
                    path,
                    "parent locator",
                    0,
                    format!("{key} {v:?} is not a {{GUID}}"),
                )
            }),
        }
    };
    let primary = parse("parent_linkage")?
        .ok_or_else(|| Error::corrupt(path, "parent locator", 0, "no parent_linkage entry"))?;
    let secondary = parse("parent_linkage2")?.filter(|g| !g.is_zero());
    Ok(Linkage { primary, secondary })
}

/// Candidate parent files in MS-VHDX order: relative_path, then volume_path, then
/// absolute_win32_path. Windows absolute paths cannot be followed on this host, so they
/// stand for a file of that name beside the child.
pub fn candidates(child: &Path, meta: &Metadata) -> Vec<(String, PathBuf)> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for key in ["relative_path", "volume_path", "absolute_win32_path"] {
        let Some(raw) = meta.locator(key) else {
            continue;
        };
        if raw.contains('\0') {
            continue;
        }
        let parts: Vec<&str> = raw
            .split(['\\', '/'])
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        let absolute = key != "relative_path"
            || raw.starts_with(['\\', '/'])
            || parts.first().is_some_and(|p| p.ends_with(':'));
        let path = if absolute {
            match parts.last() {
                Some(name) if *name != ".." && !name.ends_with(':') => dir.join(name),
                _ => continue,
            }
        } else {
            parts.iter().fold(dir.to_path_buf(), |p, c| p.join(c))
        };
        if !out.iter().any(|(_, p)| *p == path) {
            out.push((raw.to_string(), path));
        }
    }
    out
}

/// The parent reference: the first candidate that exists, else the first one (so that the
/// chain opener reports it as missing).
pub fn parent_ref(child: &Path, meta: &Metadata) -> Result<ParentRef> {
    let cands = candidates(child, meta);
    let allowed = |p: &Path| crate::paths::stays_within(child, p);
    let pick = cands
        .iter()
        .find(|(_, p)| allowed(p) && crate::storage::location::exists(p))
        .or_else(|| cands.iter().find(|(_, p)| allowed(p)))
        .or(cands.first());
    match pick {
        Some((raw, path)) => Ok(ParentRef::Path {
            raw: raw.clone(),
            path: path.clone(),
            format: Some(Format::Vhdx),
        }),
        None => Err(Error::corrupt(
            child,
            "parent locator",
            0,
            "no usable relative_path, volume_path or absolute_win32_path",
        )),
    }
}

/// Checks that `parent` is the VHDX whose DataWriteGuid the child links to and that the
/// logical sector sizes agree.
pub fn verify(child: &Path, link: &Linkage, logical_sector: u64, parent: &dyn Layer) -> Result<()> {
    let mismatch = |what: String| {
        Error::new(
            Kind::Corrupt,
            format!(
                "{}: parent {} does not match: {what}",
                child.display(),
                parent.path().display()
            ),
        )
    };
    if parent.format() != Format::Vhdx {
        return Err(mismatch(format!("it is {}, not vhdx", parent.format())));
    }
    let Some(uuid) = parent.identity().uuid else {
        return Err(mismatch("it has no DataWriteGuid".into()));
    };
    let found = Guid(uuid);
    if found != link.primary && Some(found) != link.secondary {
        let wanted = match link.secondary {
            Some(s) => format!("{{{}}} or {{{s}}}", link.primary),
            None => format!("{{{}}}", link.primary),
        };
        return Err(mismatch(format!(
            "the child's parent_linkage is {wanted} but the parent's DataWriteGuid is {{{found}}}"
        )));
    }
    let parent_sector = parent
        .details()
        .into_iter()
        .find(|(k, _)| k == super::DETAIL_LOGICAL_SECTOR)
        .map(|(_, v)| v);
    if let Some(ps) = parent_sector
        && ps != logical_sector.to_string()
    {
        return Err(mismatch(format!(
            "logical sector size {ps} differs from the child's {logical_sector}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> Metadata {
        Metadata {
            block_size: 1 << 20,
            leave_blocks_allocated: false,
            has_parent: true,
            virtual_size: 0,
            disk_id: None,
            logical_sector: 512,
            physical_sector: 512,
            parent_locator: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn windows_paths_become_candidates_beside_the_child() {
        let m = meta(&[
            ("relative_path", "..\\base\\.\\p.vhdx"),
            (
                "volume_path",
                "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\x\\p2.vhdx",
            ),
            ("absolute_win32_path", "\\\\?\\C:\\x\\p2.vhdx"),
        ]);
        let c = candidates(Path::new("/d/sub/c.avhdx"), &m);
        let paths: Vec<PathBuf> = c.into_iter().map(|(_, p)| p).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/d/sub/../base/p.vhdx"),
                PathBuf::from("/d/sub/p2.vhdx")
            ]
        );
        let m = meta(&[("relative_path", "C:\\x\\p.vhdx")]);
        assert_eq!(
            candidates(Path::new("/d/c.vhdx"), &m)[0].1,
            PathBuf::from("/d/p.vhdx")
        );
        let m = meta(&[("relative_path", ".\\Generation 1_49C4.avhdx")]);
        assert_eq!(
            candidates(Path::new("/d/c.vhdx"), &m)[0].1,
            PathBuf::from("/d/Generation 1_49C4.avhdx")
        );
        let m = meta(&[
            ("absolute_win32_path", "\\\\?\\C:"),
            ("volume_path", "a\0b"),
        ]);
        assert!(candidates(Path::new("/d/c.vhdx"), &m).is_empty());
        assert!(parent_ref(Path::new("/d/c.vhdx"), &m).is_err());
    }

    #[test]
    fn linkage_needs_a_guid() {
        let p = Path::new("c.vhdx");
        let l = linkage(
            p,
            &meta(&[
                ("parent_linkage", "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}"),
                ("parent_linkage2", "{00000000-0000-0000-0000-000000000000}"),
            ]),
        )
        .unwrap();
        assert_eq!(
            l.primary.to_string(),
            "83ed0ec3-24c8-49a6-a959-5e4bf1288bfb"
        );
        assert_eq!(l.secondary, None);
        assert!(linkage(p, &meta(&[("parent_linkage", "nope")])).is_err());
        assert!(linkage(p, &meta(&[])).is_err());
    }
}
