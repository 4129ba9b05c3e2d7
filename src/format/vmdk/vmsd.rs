//! VMware's snapshot list (`<vm>.vmsd`), read only to name snapshot layers:
//! `snapshotN.displayName` names the disk `snapshotN.diskM.fileName` that the snapshot froze.

use crate::storage::location;
use std::collections::HashMap;
use std::path::Path;

const MAX_VMSD: u64 = 1 << 20;
/// Files looked at in the layer's directory.
const MAX_DIR_FILES: usize = 10_000;

/// The display name the `.vmsd` beside `layer` gives to it, if any.
pub fn display_name(layer: &Path) -> Option<String> {
    let dir = layer.parent()?;
    let name = layer.file_name()?.to_str()?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    location::list_files(dir, MAX_DIR_FILES)
        .into_iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("vmsd"))
        })
        .find_map(|p| {
            lookup(
                &String::from_utf8_lossy(&location::read_small(&p, MAX_VMSD)?),
                name,
            )
        })
}

/// Finds the snapshot whose disk file name (its last path component) is `file`.
pub fn lookup(text: &str, file: &str) -> Option<String> {
    let mut values = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        values.insert(k.trim().to_ascii_lowercase(), unescape(v));
    }
    let mut hits: Vec<(&str, &String)> = values
        .iter()
        .filter_map(|(k, v)| {
            let snap = k.strip_suffix(".filename")?;
            let (snap, disk) = snap.rsplit_once('.')?;
            disk.starts_with("disk").then_some(())?;
            let base = v.rsplit(['/', '\\']).next().unwrap_or(v);
            (base == file).then_some((snap, v))
        })
        .collect();
    hits.sort();
    let (snap, _) = hits.first()?;
    let name = values.get(&format!("{snap}.displayname"))?;
    (!name.is_empty()).then(|| name.clone())
}

/// VMware config files escape bytes as `|XX` (hex).
fn unescape(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'|'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMSD: &str = ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"2\"\nsnapshot.current = \"2\"\n\
        snapshot0.uid = \"1\"\nsnapshot0.filename = \"vm-Snapshot1.vmsn\"\nsnapshot0.displayName = \"Before |22update|22\"\n\
        snapshot0.numDisks = \"1\"\nsnapshot0.disk0.fileName = \"vm.vmdk\"\nsnapshot0.disk0.node = \"scsi0:0\"\n\
        snapshot1.uid = \"2\"\nsnapshot1.displayName = \"after\"\nsnapshot1.disk0.fileName = \"C:\\VMs\\vm-000001.vmdk\"\n";

    #[test]
    fn names_the_disk_each_snapshot_froze() {
        assert_eq!(
            lookup(VMSD, "vm.vmdk").as_deref(),
            Some("Before \"update\"")
        );
        assert_eq!(lookup(VMSD, "vm-000001.vmdk").as_deref(), Some("after"));
        assert_eq!(lookup(VMSD, "vm-000002.vmdk"), None);
        assert_eq!(lookup(VMSD, "vm-Snapshot1.vmsn"), None);
        assert_eq!(unescape("a|7cb|zz|4"), "a|b|zz|4");
    }
}
