//! The VMDK text descriptor: `key=value` lines, extent lines and the DDB.
//!
//! Parsed leniently where VMware and QEMU are lenient (case of keys, comments, quotes, CRLF,
//! unknown keys) and strictly where a mistake would give wrong bytes (extent lines).

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

/// QEMU reads at most 1 MiB - 1 of descriptor; anything longer is not a descriptor.
pub const MAX_DESCRIPTOR: u64 = 1 << 20;
/// parentCID value meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentType {
    Flat,
    Sparse,
    Zero,
    Vmfs,
    VmfsSparse,
    SeSparse,
    /// Device-backed (VMFSRDM, VMFSRAW): never opened.
    Device,
}

impl ExtentType {
    fn parse(s: &str) -> Option<ExtentType> {
        Some(match s.to_ascii_uppercase().as_str() {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "VMFSRDM" | "VMFSRAW" => ExtentType::Device,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::Device => "device",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: ExtentType,
    /// The file name exactly as stored (bytes, so legacy code pages survive). May be empty:
    /// FreeBSD's mkimg writes `""` in the descriptor it embeds in a sparse file, meaning the
    /// file itself; the driver refuses an empty name anywhere else.
    pub file: Option<Vec<u8>>,
    /// Start sector inside the file (FLAT/VMFS).
    pub start: u64,
    /// 1-based line number and byte offset of the line in its file, for error messages.
    pub line: usize,
    pub offset: u64,
}

impl ExtentLine {
    pub fn file_name(&self) -> String {
        self.file
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    /// True for `""`, which only an embedded descriptor may write (see `file`).
    pub fn has_empty_name(&self) -> bool {
        self.file.as_ref().is_some_and(|n| n.is_empty())
    }

    pub fn summary(&self) -> String {
        let access = match self.access {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        };
        match &self.file {
            Some(_) => format!(
                "{access} {} {} {:?} {}",
                self.sectors,
                self.kind.name(),
                self.file_name(),
                self.start
            ),
            None => format!("{access} {} {}", self.sectors, self.kind.name()),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Descriptor {
    pub version: Option<String>,
    pub cid: Option<u32>,
    pub parent_cid: Option<u32>,
    pub create_type: Option<String>,
    pub parent_hint: Option<Vec<u8>>,
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` entries, keys lower-cased.
    pub ddb: Vec<(String, String)>,
}

impl Descriptor {
    /// Parses descriptor text (`bytes` stops at the first NUL, as an embedded descriptor is
    /// padded with zeros). `file` names the source in errors.
    pub fn parse(bytes: &[u8], file: &Path, base_off: u64) -> Result<Descriptor> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        let mut d = Descriptor::default();
        let mut line_off = 0u64;
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let here = base_off + line_off;
            line_off += raw.len() as u64 + 1;
            let line = trim(raw);
            if line.is_empty() || line[0] == b'#' {
                continue;
            }
            if let Some(e) = parse_extent(line, i + 1, file, here)? {
                d.extents.push(e);
                continue;
            }
            let Some(eq) = line.iter().position(|&b| b == b'=') else {
                continue;
            };
            let key = String::from_utf8_lossy(trim(&line[..eq])).to_ascii_lowercase();
            let value = unquote(trim(&line[eq + 1..]));
            let text = || String::from_utf8_lossy(value).into_owned();
            match key.as_str() {
                "version" => d.version = Some(text()),
                "cid" => d.cid = Some(parse_cid(value, "CID", file, here)?),
                "parentcid" => d.parent_cid = Some(parse_cid(value, "parentCID", file, here)?),
                "createtype" => d.create_type = Some(text()),
                "parentfilenamehint" => d.parent_hint = Some(value.to_vec()),
                k if k.starts_with("ddb.") => d.ddb.push((key.clone(), text())),
                _ => {}
            }
        }
        Ok(d)
    }

    /// The parent to open, unless parentCID says there is none.
    pub fn parent(&self) -> Option<(&[u8], u32)> {
        let pcid = self.parent_cid?;
        if pcid == NO_PARENT_CID {
            return None;
        }
        let hint = self.parent_hint.as_deref()?;
        Some((hint, pcid))
    }

    pub fn ddb_value(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

fn unquote(b: &[u8]) -> &[u8] {
    if b.len() >= 2 && b[0] == b'"' && b[b.len() - 1] == b'"' {
        &b[1..b.len() - 1]
    } else {
        b
    }
}

fn parse_cid(v: &[u8], field: &str, file: &Path, off: u64) -> Result<u32> {
    let s = String::from_utf8_lossy(v);
    let s = s.trim();
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u32::from_str_radix(hex, 16).map_err(|_| {
        Error::corrupt(
            file,
            &format!("descriptor {field}"),
            off,
            format!("{s:?} is not a 32-bit hex number"),
        )
    })
}

/// One whitespace-separated token and the rest of the line.
fn token(b: &[u8]) -> (&[u8], &[u8]) {
    let b = trim(b);
    let end = b
        .iter()
        .position(|c| c.is_ascii_whitespace())
        .unwrap_or(b.len());
    (&b[..end], &b[end..])
}

/// Parses `ACCESS SECTORS TYPE ["FILE" [START ...]]`, or returns None for other lines.
fn parse_extent(line: &[u8], lineno: usize, file: &Path, off: u64) -> Result<Option<ExtentLine>> {
    let (first, rest) = token(line);
    let access = match first.to_ascii_uppercase().as_slice() {
        b"RW" => Access::ReadWrite,
        b"RDONLY" => Access::ReadOnly,
        b"NOACCESS" => Access::NoAccess,
        _ => return Ok(None),
    };
    let bad =
        |what: String| Error::corrupt(file, &format!("descriptor extent line {lineno}"), off, what);
    let (sectors, rest) = token(rest);
    let sectors = std::str::from_utf8(sectors)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| {
            bad(format!(
                "sector count {:?} is not a number",
                String::from_utf8_lossy(sectors)
            ))
        })?;
    if sectors == 0 || sectors.checked_mul(512).is_none_or(|b| b > i64::MAX as u64) {
        return Err(bad(format!("absurd sector count {sectors}")));
    }
    let (kind_tok, rest) = token(rest);
    let kind = ExtentType::parse(&String::from_utf8_lossy(kind_tok)).ok_or_else(|| {
        bad(format!(
            "unknown extent type {:?}",
            String::from_utf8_lossy(kind_tok)
        ))
    })?;
    let rest = trim(rest);
    let (name, rest) = if rest.first() == Some(&b'"') {
        let close = rest[1..]
            .iter()
            .position(|&c| c == b'"')
            .ok_or_else(|| bad("file name has no closing quote".into()))?;
        (Some(rest[1..1 + close].to_vec()), &rest[close + 2..])
    } else if rest.is_empty() {
        (None, rest)
    } else {
        return Err(bad("file name must be quoted".into()));
    };
    let (start_tok, _) = token(rest);
    let start = if start_tok.is_empty() {
        0
    } else {
        std::str::from_utf8(start_tok)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                bad(format!(
                    "start sector {:?} is not a number",
                    String::from_utf8_lossy(start_tok)
                ))
            })?
    };
    match (&name, kind) {
        (None, ExtentType::Zero) | (None, ExtentType::Device) => {}
        (None, _) => return Err(bad(format!("a {} extent needs a file name", kind.name()))),
        _ => {}
    }
    Ok(Some(ExtentLine {
        access,
        sectors,
        kind,
        file: name,
        start,
        line: lineno,
        offset: off,
    }))
}

/// Turns a stored extent name into a path beside `descriptor` (absolute names stay).
pub fn extent_path(descriptor: &Path, name: &[u8]) -> std::path::PathBuf {
    match std::str::from_utf8(name) {
        Ok(s) => crate::paths::resolve_relative(descriptor, s),
        Err(_) => {
            let p = std::path::PathBuf::from(OsString::from_vec(name.to_vec()));
            if p.is_absolute() {
                p
            } else {
                descriptor.parent().unwrap_or(Path::new(".")).join(p)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=1a2B3c4d\r\n\
        parentCID=ffffffff\r\ncreateType=\"twoGbMaxExtentSparse\"\r\n\r\n# Extent description\r\n\
        RW 4192256 SPARSE \"disk s001.vmdk\"\r\nrdonly 2048 flat \"disk-flat.vmdk\" 128\r\n\
        RW 100 ZERO\r\n\r\n# The Disk Data Base\r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\n";

    #[test]
    fn parses_keys_extents_and_ddb() {
        let d = Descriptor::parse(SAMPLE.as_bytes(), Path::new("d.vmdk"), 0).unwrap();
        assert_eq!(d.cid, Some(0x1a2b3c4d));
        assert_eq!(d.parent_cid, Some(NO_PARENT_CID));
        assert!(d.parent().is_none());
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentSparse"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some(&b"disk s001.vmdk"[..]));
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[1].kind, ExtentType::Flat);
        assert_eq!(d.extents[1].start, 128);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.ddb_value("ddb.adaptertype"), Some("lsilogic"));
    }

    #[test]
    fn stops_at_nul_and_reads_parent() {
        let mut b =
            b"CID=00000002\nparentCID=0000000a\nparentFileNameHint=\"C:\\VMs\\base.vmdk\"\n"
                .to_vec();
        b.extend_from_slice(&[0, b'R', b'W']);
        let d = Descriptor::parse(&b, Path::new("d"), 0).unwrap();
        assert_eq!(d.parent(), Some((&b"C:\\VMs\\base.vmdk"[..], 10)));
        assert!(d.extents.is_empty());
    }

    #[test]
    fn rejects_bad_extent_lines() {
        for bad in [
            "RW 10 WEIRD \"x\"",
            "RW -5 FLAT \"x\" 0",
            "RW 0 FLAT \"x\" 0",
            "RW 99999999999999999999 FLAT \"x\"",
            "RW 36028797018963968 FLAT \"x\"",
            "RW 10 FLAT \"x",
            "RW 10 FLAT x",
            "RW 10 SPARSE",
            "RW 10 FLAT \"x\" zz",
            "CID=nothex",
        ] {
            let e = Descriptor::parse(bad.as_bytes(), Path::new("d.vmdk"), 0).unwrap_err();
            assert!(e.to_string().starts_with("d.vmdk: "), "{bad}: {e}");
        }
    }

    #[test]
    fn an_empty_extent_name_is_kept_for_the_driver_to_judge() {
        let text = b"CID=00000000\n# Extent description\nRW 16384 SPARSE \"\"\n";
        let d = Descriptor::parse(text, Path::new("d"), 512).unwrap();
        let e = &d.extents[0];
        assert!(e.has_empty_name());
        assert_eq!((e.line, e.offset), (3, 512 + 13 + 21));
        assert_eq!(e.summary(), "RW 16384 SPARSE \"\" 0");
    }

    #[test]
    fn legacy_code_page_names_keep_their_bytes() {
        let text = b"encoding=\"windows-1252\"\nRW 8 FLAT \"caf\xe9-flat.vmdk\" 0\n";
        let d = Descriptor::parse(text, Path::new("d"), 0).unwrap();
        let name = d.extents[0].file.clone().unwrap();
        assert_eq!(name, b"caf\xe9-flat.vmdk");
        let p = extent_path(Path::new("/x/d.vmdk"), &name);
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(p.as_os_str().as_bytes(), b"/x/caf\xe9-flat.vmdk");
    }

    #[test]
    fn extent_names_resolve_beside_the_descriptor() {
        assert_eq!(
            extent_path(Path::new("/a/b/d.vmdk"), b"x-flat.vmdk"),
            Path::new("/a/b/x-flat.vmdk")
        );
        assert_eq!(
            extent_path(Path::new("/a/b/d.vmdk"), b"/abs/x"),
            Path::new("/abs/x")
        );
    }
}
