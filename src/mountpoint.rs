//! Checks on the mount point before anything is mounted, so that mistakes print one clear line.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Returns the canonical mount point, or why it cannot be used.
pub fn check(mountpoint: &Path) -> Result<PathBuf, String> {
    let shown = mountpoint.display();
    let meta = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!("mount point {shown} does not exist"));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(format!(
                "mount point {shown}: a dead FUSE mount is still there (transport endpoint is not \
                 connected); run `fusermount3 -u {shown}` first"
            ));
        }
        Err(e) => return Err(format!("mount point {shown}: {e}")),
    };
    if !meta.is_dir() {
        return Err(format!("mount point {shown} is not a directory"));
    }
    let canonical = mountpoint
        .canonicalize()
        .map_err(|e| format!("mount point {shown}: {e}"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(fstype) = mounted_at(&mountinfo, &canonical) {
        return Err(format!(
            "mount point {shown} is already mounted ({fstype}); unmount it first"
        ));
    }
    Ok(canonical)
}

/// The file system type mounted at `path` according to a mountinfo text, if any.
pub fn mounted_at(mountinfo: &str, path: &Path) -> Option<String> {
    let wanted = path.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let point = fields.nth(4)?;
        if unescape(point) != wanted {
            return None;
        }
        let mut rest = fields.skip_while(|f| *f != "-");
        rest.next()?;
        Some(unescape(rest.next()?))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash, ...).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/my\\040vm rw,nosuid,nodev shared:20 - fuse.vmfs-mount /img/a.qcow2 rw,user_id=0
41 22 0:36 / /mnt/other rw,relatime shared:21 opt:x - tmpfs tmpfs rw";

    #[test]
    fn finds_mounts_with_escaped_paths_and_optional_fields() {
        assert_eq!(
            mounted_at(INFO, Path::new("/mnt/my vm")).as_deref(),
            Some("fuse.vmfs-mount")
        );
        assert_eq!(
            mounted_at(INFO, Path::new("/mnt/other")).as_deref(),
            Some("tmpfs")
        );
        assert_eq!(mounted_at(INFO, Path::new("/")).as_deref(), Some("ext4"));
        assert_eq!(mounted_at(INFO, Path::new("/mnt")), None);
        assert_eq!(mounted_at("garbage\n\n1 2 3", Path::new("/")), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\134c\\011"), "a b\\c\t");
        assert_eq!(unescape("\\04"), "\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }

    #[test]
    fn rejects_missing_and_non_directories() {
        let dir = std::env::temp_dir().join(format!("vmfs-mp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(
            check(&dir.join("missing"))
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(check(&file).unwrap_err().contains("is not a directory"));
        assert_eq!(check(&dir).unwrap(), dir.canonicalize().unwrap());
        assert!(
            check(Path::new("/"))
                .unwrap_err()
                .contains("already mounted")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
