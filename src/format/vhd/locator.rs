//! Where a differencing VHD's parent may be: the parent locators (W2ru relative UTF-16 LE,
//! W2ku absolute UTF-16 LE, the deprecated ANSI Wi2r/Wi2k, MacX file URLs) and, as a last
//! resort, the parent name from the dynamic header. Windows paths are turned into paths that
//! make sense here: separators become '/', drive letters and "\\?\" prefixes are dropped,
//! relative paths are taken against the child's directory, and an absolute path is also
//! tried as its file name next to the child.

use super::dynamic::utf16_until_nul;
use std::path::{Path, PathBuf};

/// Longest locator we read: a Windows path has at most 32767 UTF-16 units.
pub const MAX_LOCATOR_LEN: u32 = 64 * 1024;

/// Locator platform codes in the order they are tried.
pub const PREFERRED: [&[u8; 4]; 5] = [b"W2ru", b"W2ku", b"Wi2r", b"Wi2k", b"MacX"];

/// Decodes the stored bytes of a locator with platform `code` (None for codes we ignore).
pub fn decode(code: &[u8; 4], data: &[u8]) -> Option<String> {
    let text = match code {
        b"W2ru" | b"W2ku" => utf16_until_nul(data, u16::from_le_bytes),
        b"Wi2r" | b"Wi2k" => until_nul_lossy(data),
        b"MacX" => {
            let url = until_nul_lossy(data);
            url.strip_prefix("file://localhost")
                .or_else(|| url.strip_prefix("file://"))
                .map(str::to_string)?
        }
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

fn until_nul_lossy(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// The host paths a stored (possibly Windows) path may refer to, best first.
pub fn candidates(child: &Path, stored: &str) -> Vec<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut s = stored.replace('\\', "/");
    for prefix in ["//?/UNC/", "//?/", "//./"] {
        if let Some(rest) = s.strip_prefix(prefix) {
            s = if prefix.ends_with("UNC/") {
                format!("//{rest}")
            } else {
                rest.to_string()
            };
            break;
        }
    }
    let b = s.as_bytes();
    let has_drive = b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':';
    let rest = if has_drive { &s[2..] } else { &s[..] };
    if rest.is_empty() {
        return Vec::new();
    }
    if !rest.starts_with('/') {
        // Relative (also "C:name", relative to the current directory of drive C).
        return vec![dir.join(rest)];
    }
    let mut out = vec![PathBuf::from(rest)];
    if let Some(name) = rest
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
    {
        let beside = dir.join(name);
        if !out.contains(&beside) {
            out.push(beside);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_windows_paths_follow_the_child() {
        let c = Path::new("/imgs/child.vhd");
        assert_eq!(
            candidates(c, ".\\parent.vhd"),
            vec![PathBuf::from("/imgs/./parent.vhd")]
        );
        assert_eq!(
            candidates(c, "..\\base\\p.vhd"),
            vec![PathBuf::from("/imgs/../base/p.vhd")]
        );
        assert_eq!(candidates(c, "p.vhd"), vec![PathBuf::from("/imgs/p.vhd")]);
        assert_eq!(candidates(c, "D:p.vhd"), vec![PathBuf::from("/imgs/p.vhd")]);
        assert_eq!(
            candidates(Path::new("child.vhd"), "p.vhd"),
            vec![PathBuf::from("p.vhd")]
        );
    }

    #[test]
    fn absolute_windows_paths_lose_the_drive_and_are_tried_beside_the_child() {
        let c = Path::new("/imgs/child.vhd");
        assert_eq!(
            candidates(c, "C:\\Projects\\test_data\\fat-parent.vhd"),
            vec![
                PathBuf::from("/Projects/test_data/fat-parent.vhd"),
                PathBuf::from("/imgs/fat-parent.vhd")
            ]
        );
        assert_eq!(
            candidates(c, "\\\\?\\C:\\x\\p.vhd"),
            vec![PathBuf::from("/x/p.vhd"), PathBuf::from("/imgs/p.vhd")]
        );
        assert_eq!(
            candidates(c, "\\\\server\\share\\p.vhd"),
            vec![
                PathBuf::from("//server/share/p.vhd"),
                PathBuf::from("/imgs/p.vhd")
            ]
        );
        assert_eq!(
            candidates(c, "/imgs/p.vhd"),
            vec![PathBuf::from("/imgs/p.vhd")]
        );
        assert_eq!(candidates(c, "C:\\"), vec![PathBuf::from("/")]);
        assert!(candidates(c, "C:").is_empty());
        assert!(candidates(c, "").is_empty());
    }

    #[test]
    fn locator_data_decodes_per_platform() {
        let le: Vec<u8> = ".\\p.vhd"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .chain([0, 0, 7, 7])
            .collect();
        assert_eq!(decode(b"W2ru", &le).as_deref(), Some(".\\p.vhd"));
        assert_eq!(
            decode(b"Wi2k", b"C:\\p.vhd\0junk").as_deref(),
            Some("C:\\p.vhd")
        );
        assert_eq!(
            decode(b"MacX", b"file:///Users/p.vhd").as_deref(),
            Some("/Users/p.vhd")
        );
        assert_eq!(decode(b"MacX", b"http://x/p.vhd"), None);
        assert_eq!(decode(b"Mac ", b"alias"), None);
        assert_eq!(decode(b"W2ku", &[0, 0]), None);
    }
}
