//! Where to look for a differencing image's parent. A VDI stores only its parent's UUID;
//! VirtualBox keeps the paths in the machine's `.vbox` file:
//!   <MediaRegistry><HardDisks>
//!     <HardDisk uuid="{base}" location="disk.vdi" format="VDI" type="Normal">
//!       <HardDisk uuid="{child}" location="Snapshots/{child}.vdi" format="VDI"/>
//!     </HardDisk>
//!   </HardDisks></MediaRegistry>
//! Locations are relative to the `.vbox` file's directory. Snapshots live in `Snapshots/`
//! with the base one level up, so both the child's directory and its parent are searched.

use super::header::SIGNATURE;
use super::uuid::Uuid;
use crate::endian::le32;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

/// Bigger .vbox files are ignored (they are a few KiB).
const MAX_VBOX_BYTES: u64 = 16 << 20;
/// Directory entries looked at per directory.
const MAX_DIR_ENTRIES: usize = 100_000;

/// One medium of a media registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Medium {
    pub uuid: Uuid,
    pub location: String,
    /// The enclosing <HardDisk>, i.e. the parent of a differencing image.
    pub parent: Option<Uuid>,
}

/// The <HardDisk> elements of a .vbox (or VirtualBox.xml) text. A simple scanner, not a full
/// XML parser: it only needs tag names, attributes and nesting.
pub fn parse_media(xml: &str) -> Vec<Medium> {
    let mut out = Vec::new();
    // Open <HardDisk> elements; None for one whose uuid did not parse.
    let mut stack: Vec<Option<Uuid>> = Vec::new();
    let mut rest = xml;
    while let Some(lt) = rest.find('<') {
        rest = &rest[lt + 1..];
        let Some(gt) = rest.find('>') else { break };
        let tag = &rest[..gt];
        rest = &rest[gt + 1..];
        if let Some(name_rest) = tag.strip_prefix("/HardDisk") {
            if name_rest.trim().is_empty() {
                stack.pop();
            }
            continue;
        }
        let Some(attrs) = tag.strip_prefix("HardDisk") else {
            continue;
        };
        if !attrs.starts_with(|c: char| c.is_whitespace() || c == '/') && !attrs.is_empty() {
            continue; // e.g. <HardDisks>
        }
        let uuid = attribute(attrs, "uuid").and_then(|u| Uuid::parse(&u));
        if let (Some(uuid), Some(location)) = (uuid, attribute(attrs, "location")) {
            out.push(Medium {
                uuid,
                location,
                parent: stack.last().copied().flatten(),
            });
        }
        if !attrs.trim_end().ends_with('/') {
            stack.push(uuid);
        }
    }
    out
}

/// The value of attribute `name` in the inside of a tag, with XML entities decoded.
fn attribute(attrs: &str, name: &str) -> Option<String> {
    let mut rest = attrs;
    loop {
        let i = rest.find(name)?;
        let before_ok = i == 0 || rest[..i].ends_with(char::is_whitespace);
        let after = rest[i + name.len()..].trim_start();
        rest = &rest[i + name.len()..];
        if !before_ok {
            continue;
        }
        let Some(after_eq) = after.strip_prefix('=') else {
            continue;
        };
        let after_eq = after_eq.trim_start();
        let quote = after_eq.chars().next().filter(|&q| q == '"' || q == '\'')?;
        let body = &after_eq[1..];
        let end = body.find(quote)?;
        return Some(unescape(&body[..end]));
    }
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Resolves a registry location against the .vbox directory. Only relative paths that stay
/// inside that directory are followed; for others (absolute paths, Windows paths, `..`) only
/// the file name is tried there and in its `Snapshots/` folder: the strings are untrusted.
fn resolve_location(vbox_dir: &Path, location: &str) -> Vec<PathBuf> {
    let unix = location.replace('\\', "/");
    let rel = Path::new(&unix);
    let inside = !unix.contains(':')
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside && rel.file_name().is_some() {
        return vec![vbox_dir.join(rel)];
    }
    match rel.file_name() {
        Some(name) if name != ".." => {
            vec![vbox_dir.join(name), vbox_dir.join("Snapshots").join(name)]
        }
        _ => Vec::new(),
    }
}

/// Candidate files for the parent with `wanted` as uuidCreate of the VDI at `child`: media
/// registry entries from .vbox files in the child's directory and the one above it, then
/// VDI files in the directory above whose header carries that UUID (the child's own
/// directory is scanned by the chain opener).
pub fn parent_hints(child: &Path, wanted: &Uuid) -> Vec<PathBuf> {
    let child_dir = child
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let child_dir = if child_dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        child_dir
    };
    let upper = upper_dir(&child_dir);
    let mut hints = Vec::new();
    for dir in [&child_dir, &upper] {
        for vbox in files_in(dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "vbox"))
        {
            let Some(text) = read_small(&vbox) else {
                continue;
            };
            for m in parse_media(&text).into_iter().filter(|m| m.uuid == *wanted) {
                hints.extend(resolve_location(dir, &m.location));
            }
        }
    }
    hints.extend(
        files_in(&upper)
            .into_iter()
            .filter(|p| vdi_uuid_create(p) == Some(*wanted)),
    );
    let mut seen = HashSet::new();
    hints.retain(|p| p.is_file() && seen.insert(p.clone()));
    hints
}

/// The directory above `dir`, without `..` when the path allows.
fn upper_dir(dir: &Path) -> PathBuf {
    match dir.components().next_back() {
        Some(Component::Normal(_)) => match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
        _ => dir.join(".."),
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .take(MAX_DIR_ENTRIES)
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn read_small(path: &Path) -> Option<String> {
    let f = File::open(path).ok()?;
    if f.metadata().ok()?.len() > MAX_VBOX_BYTES {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// uuidCreate of `path` if it starts like a VDI (one small read; no validation).
fn vdi_uuid_create(path: &Path) -> Option<Uuid> {
    let f = File::open(path).ok()?;
    let mut b = [0u8; 0x198];
    f.read_exact_at(&mut b, 0).ok()?;
    if le32(&b, 0x40) != SIGNATURE {
        return None;
    }
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&b[0x188..0x198]);
    Some(Uuid::from_disk(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VBOX: &str = r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{99999999-0000-0000-0000-000000000000}" name="vm" snapshotFolder="Snapshots">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{11111111-0000-0000-0000-000000000000}" location="vm.vdi" format="VDI" type="Normal">
          <HardDisk uuid="{22222222-0000-0000-0000-000000000000}" location="Snapshots/{22222222-0000-0000-0000-000000000000}.vdi" format="VDI">
            <HardDisk uuid='{33333333-0000-0000-0000-000000000000}' location="Snapshots/a&amp;b.vdi" format="VDI"/>
          </HardDisk>
        </HardDisk>
        <HardDisk location="C:\VMs\other.vdi" uuid="{44444444-0000-0000-0000-000000000000}"/>
      </HardDisks>
    </MediaRegistry>
  </Machine>
</VirtualBox>"#;

    fn u(s: &str) -> Uuid {
        Uuid::parse(s).unwrap()
    }

    #[test]
    fn reads_media_with_their_parents() {
        let m = parse_media(VBOX);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[0],
            Medium {
                uuid: u("11111111-0000-0000-0000-000000000000"),
                location: "vm.vdi".into(),
                parent: None
            }
        );
        assert_eq!(m[1].parent, Some(m[0].uuid));
        assert_eq!(m[2].location, "Snapshots/a&b.vdi");
        assert_eq!(m[2].parent, Some(m[1].uuid));
        assert_eq!(m[3].location, r"C:\VMs\other.vdi");
        assert_eq!(
            m[3].parent, None,
            "the self-closed child does not stay open"
        );
    }

    #[test]
    fn survives_garbage() {
        assert!(parse_media("<HardDisk uuid=\"{x}\" location=\"a\"><<<>").is_empty());
        assert!(
            parse_media("<HardDisk uuid=\"{11111111-0000-0000-0000-000000000000}\" location=\"a")
                .is_empty()
        );
        assert!(parse_media("</HardDisk></HardDisk><HardDisk").is_empty());
        assert_eq!(
            attribute(r#" xuuid="1" uuid = '2'"#, "uuid").as_deref(),
            Some("2")
        );
    }

    #[test]
    fn untrusted_locations_stay_in_the_machine_folder() {
        let d = Path::new("/vm");
        assert_eq!(
            resolve_location(d, "Snapshots/x.vdi"),
            vec![PathBuf::from("/vm/Snapshots/x.vdi")]
        );
        assert_eq!(
            resolve_location(d, "/etc/x.vdi"),
            vec![
                PathBuf::from("/vm/x.vdi"),
                PathBuf::from("/vm/Snapshots/x.vdi")
            ]
        );
        assert_eq!(
            resolve_location(d, r"C:\VMs\y.vdi")[0],
            PathBuf::from("/vm/y.vdi")
        );
        assert_eq!(
            resolve_location(d, "../../z.vdi")[0],
            PathBuf::from("/vm/z.vdi")
        );
        assert!(resolve_location(d, "..").is_empty());
        assert_eq!(
            resolve_location(d, "./2019.vdi"),
            vec![PathBuf::from("/vm/./2019.vdi")]
        );
        assert_eq!(
            resolve_location(d, "C:/VMs/vm/Snapshots/{u}.vdi")[1],
            PathBuf::from("/vm/Snapshots/{u}.vdi")
        );
    }

    #[test]
    fn the_directory_above() {
        assert_eq!(upper_dir(Path::new("/vm/Snapshots")), PathBuf::from("/vm"));
        assert_eq!(upper_dir(Path::new("Snapshots")), PathBuf::from("."));
        assert_eq!(upper_dir(Path::new(".")), PathBuf::from("./.."));
        assert_eq!(upper_dir(Path::new("/")), PathBuf::from("/.."));
    }
}
