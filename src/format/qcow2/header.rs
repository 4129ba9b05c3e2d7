//! The qcow2 header (cluster 0): the fixed v2/v3 fields and the header extensions.
//! Pure decoding over bytes, so every check is unit tested; all integers are big-endian.

use crate::endian::{be32, be64};
use crate::error::{Error, Result};
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Bytes of the version 2 header; version 3 adds fields up to `V3_MIN_LEN`.
pub const V2_LEN: usize = 72;
pub const V3_MIN_LEN: usize = 104;
/// Offset of the optional compression type byte (present when header_length > 104).
const COMPRESSION_TYPE_OFF: usize = 104;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 needs 32 subclusters of at least 512 bytes.
pub const MIN_EXTL2_CLUSTER_BITS: u32 = 14;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// QEMU keeps the backing format in a 16-byte buffer, NUL included.
const MAX_BACKING_FORMAT_LEN: u32 = 15;
const FEATURE_ENTRY_LEN: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The fixed header fields. Version 2 images read the v3 fields as QEMU does: no features,
/// 16-bit refcounts, a 72-byte header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// The virtual size as stored (QEMU exposes it rounded down to 512 bytes).
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
}

impl Header {
    /// Decodes and checks the fixed header from the first bytes of the file (at least
    /// `V3_MIN_LEN` bytes if the file has them). Feature bits are checked by `check_features`
    /// once the extensions (with their feature names) are known.
    pub fn parse(b: &[u8], file: &Path) -> Result<Header> {
        if b.len() < 8 || &b[0..4] != MAGIC {
            return Err(Error::corrupt(file, "qcow2 magic", 0, "not a qcow2 image"));
        }
        let version = be32(b, 4);
        if version == 1 {
            return Err(Error::unsupported(
                file,
                "qcow version 1 (the original QEMU qcow format), only qcow2 v2/v3",
            ));
        }
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                file,
                format!("qcow2 version {version} (only 2 and 3 exist)"),
            ));
        }
        let need = if version == 2 { V2_LEN } else { V3_MIN_LEN };
        if b.len() < need {
            return Err(Error::corrupt(
                file,
                "qcow2 header",
                0,
                format!(
                    "truncated: {} bytes, a version {version} header needs {need}",
                    b.len()
                ),
            ));
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(
                file,
                "cluster_bits",
                20,
                format!("{cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_LEN as u32,
            compression: Compression::Zlib,
        };
        if version == 3 {
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            // QEMU does not insist on the spec's multiple of 8, so neither do we.
            if (h.header_length as usize) < V3_MIN_LEN {
                return Err(Error::corrupt(
                    file,
                    "header_length",
                    100,
                    format!(
                        "{} is shorter than the version 3 header ({V3_MIN_LEN})",
                        h.header_length
                    ),
                ));
            }
        }
        if u64::from(h.header_length) > cluster_size {
            return Err(Error::corrupt(
                file,
                "header_length",
                100,
                format!(
                    "{} exceeds the cluster size {cluster_size}",
                    h.header_length
                ),
            ));
        }
        if h.backing_file_offset > cluster_size {
            return Err(Error::corrupt(
                file,
                "backing_file_offset",
                8,
                format!(
                    "{:#x} lies outside the first cluster",
                    h.backing_file_offset
                ),
            ));
        }
        if h.header_length as usize > COMPRESSION_TYPE_OFF {
            if b.len() <= COMPRESSION_TYPE_OFF {
                return Err(Error::corrupt(
                    file,
                    "compression_type",
                    COMPRESSION_TYPE_OFF as u64,
                    "truncated header",
                ));
            }
            h.compression = match b[COMPRESSION_TYPE_OFF] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                t => {
                    return Err(Error::unsupported(
                        file,
                        format!("compression type {t} (known: 0 zlib, 1 zstd)"),
                    ));
                }
            };
        }
        let bit_set = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if bit_set != (h.compression != Compression::Zlib) {
            return Err(Error::corrupt(
                file,
                "incompatible_features",
                72,
                format!(
                    "the compression type bit (3) is {} but the compression type is {}",
                    if bit_set { "set" } else { "clear" },
                    h.compression.name()
                ),
            ));
        }
        if h.crypt_method != 0 {
            let what = match h.crypt_method {
                1 => "AES-CBC",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::unsupported(
                file,
                format!(
                    "encrypted image (crypt_method {} = {what}); decrypt it with qemu-img convert first",
                    h.crypt_method
                ),
            ));
        }
        if h.refcount_order > 6 {
            return Err(Error::corrupt(
                file,
                "refcount_order",
                96,
                format!("{} (at most 6)", h.refcount_order),
            ));
        }
        if h.extended_l2() && cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            return Err(Error::corrupt(
                file,
                "cluster_bits",
                20,
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, not {cluster_size} bytes"
                ),
            ));
        }
        Ok(h)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Where the header extensions stop: the backing file name, or the end of cluster 0.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// Refuses incompatible feature bits this reader does not know, naming each bit and,
    /// when the image's feature name table has it, its name.
    pub fn check_features(&self, ext: &Extensions, file: &Path) -> Result<()> {
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown == 0 {
            return Ok(());
        }
        let names: Vec<String> = (0..64u8)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(
                |bit| match ext.feature_name(FeatureKind::Incompatible, bit) {
                    Some(name) => format!("bit {bit} ({name:?})"),
                    None => format!("bit {bit}"),
                },
            )
            .collect();
        Err(Error::unsupported(
            file,
            format!("incompatible qcow2 feature {}", names.join(", ")),
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
}

/// What the header extensions say. Unknown extensions are kept (a writer must preserve them).
/// A type that appears twice: the last one wins, as in QEMU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// (kind byte, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
    /// The bitmaps extension: (offset of its header in the file, its data), decoded by
    /// `bitmap.rs`.
    pub bitmaps: Option<(u64, Vec<u8>)>,
    /// (type, data) of every other extension, in file order.
    pub unknown: Vec<(u32, Vec<u8>)>,
}

impl Extensions {
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        let k = match kind {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        };
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == k && *b == bit)
            .map(|(_, _, n)| n.as_str())
    }

    /// Walks the extensions in `cluster0` (the file's bytes from 0, zero-padded where the file
    /// is shorter) from `start` to `end`: `u32 type, u32 len, data, pad to 8`, until type 0.
    pub fn parse(cluster0: &[u8], start: u64, end: u64, file: &Path) -> Result<Extensions> {
        let mut ext = Extensions::default();
        let end = end.min(cluster0.len() as u64);
        let mut off = start;
        while off < end {
            let Some(data_off) = off.checked_add(8).filter(|&d| d <= end) else {
                return Err(Error::corrupt(
                    file,
                    "header extension",
                    off,
                    "header runs past the extension area",
                ));
            };
            let kind = be32(cluster0, off as usize);
            let len = be32(cluster0, off as usize + 4);
            // Checked before the end marker, as QEMU does.
            if u64::from(len) > end - data_off {
                return Err(Error::corrupt(
                    file,
                    "header extension",
                    off,
                    format!(
                        "type {kind:#010x} length {len} runs past the extension area (ends at {end:#x})"
                    ),
                ));
            }
            if kind == EXT_END {
                break;
            }
            let data = &cluster0[data_off as usize..(data_off + u64::from(len)) as usize];
            match kind {
                EXT_BACKING_FORMAT => {
                    if len > MAX_BACKING_FORMAT_LEN {
                        return Err(Error::corrupt(
                            file,
                            "backing format extension",
                            off,
                            format!("length {len} is too long (at most {MAX_BACKING_FORMAT_LEN})"),
                        ));
                    }
                    ext.backing_format = Some(c_string(data));
                }
                EXT_DATA_FILE => ext.data_file = Some(c_string(data)),
                EXT_BITMAPS => ext.bitmaps = Some((off, data.to_vec())),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(FEATURE_ENTRY_LEN) {
                        ext.feature_names.push((e[0], e[1], c_string(&e[2..])));
                    }
                }
                _ => ext.unknown.push((kind, data.to_vec())),
            }
            // Padding to 8 bytes; the last extension's padding may be cut off by `end`.
            off = data_off + u64::from(len).div_ceil(8) * 8;
        }
        Ok(ext)
    }
}

/// A stored string: up to the first NUL (as QEMU's C strings end), lossily decoded.
pub fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.qcow2")
    }

    /// A valid v3 header with 64 KiB clusters and 112 bytes of header.
    pub fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    fn set32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn decodes_v3_fields() {
        let h = Header::parse(&v3(), p()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.l1_size, 2);
        assert_eq!(h.l1_table_offset, 0x30000);
        assert_eq!(h.header_length, 112);
        assert_eq!(h.compression, Compression::Zlib);
        assert_eq!(h.extensions_end(), 65536);
    }

    #[test]
    fn v2_header_reads_v3_fields_as_defaults() {
        let mut b = v3();
        set32(&mut b, 4, 2);
        set64(&mut b, 72, u64::MAX); // garbage past the v2 header must be ignored
        let h = Header::parse(&b[..V2_LEN], p()).unwrap();
        assert_eq!(
            (h.incompatible_features, h.refcount_order, h.header_length),
            (0, 4, 72)
        );
    }

    #[test]
    fn refuses_bad_fixed_fields() {
        type Patch = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Patch, &str)> = vec![
            (Box::new(|b| b[3] = 0), "magic"),
            (Box::new(|b| set32(b, 4, 1)), "version 1"),
            (Box::new(|b| set32(b, 4, 4)), "version 4"),
            (Box::new(|b| set32(b, 20, 8)), "cluster_bits"),
            (Box::new(|b| set32(b, 20, 22)), "cluster_bits"),
            (Box::new(|b| set32(b, 100, 100)), "header_length"),
            (Box::new(|b| set32(b, 100, 0x20000)), "header_length"),
            (Box::new(|b| set32(b, 32, 2)), "LUKS"),
            (Box::new(|b| set32(b, 96, 7)), "refcount_order"),
            (Box::new(|b| set64(b, 8, 0x20000)), "backing_file_offset"),
            (Box::new(|b| b[104] = 1), "compression type bit"),
            (Box::new(|b| b[104] = 9), "compression type 9"),
            (
                Box::new(|b| set64(b, 72, INCOMPAT_COMPRESSION)),
                "compression type bit",
            ),
            (
                Box::new(|b| {
                    set32(b, 20, 12);
                    set64(b, 72, INCOMPAT_EXTL2)
                }),
                "extended L2",
            ),
        ];
        for (patch, want) in cases {
            let mut b = v3();
            patch(&mut b);
            let e = Header::parse(&b, p()).unwrap_err();
            assert!(e.to_string().contains(want), "{e} should mention {want}");
        }
        let e = Header::parse(&v3()[..80], p()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn zstd_needs_its_feature_bit() {
        let mut b = v3();
        b[104] = 1;
        set64(&mut b, 72, INCOMPAT_COMPRESSION);
        assert_eq!(
            Header::parse(&b, p()).unwrap().compression,
            Compression::Zstd
        );
    }

    fn ext(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = kind.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        while !v.len().is_multiple_of(8) {
            v.push(0);
        }
        v
    }

    #[test]
    fn walks_extensions_and_names_unknown_features() {
        let mut c0 = v3();
        c0.truncate(112);
        c0.extend(ext(EXT_BACKING_FORMAT, b"raw"));
        c0.extend(ext(0x1234_5678, b"keep me"));
        let mut table = vec![0u8; 48];
        table[1] = 7;
        table[2..9].copy_from_slice(b"feature");
        c0.extend(ext(EXT_FEATURE_TABLE, &table));
        c0.extend(ext(EXT_DATA_FILE, b"data.bin"));
        c0.resize(1024, 0);
        let e = Extensions::parse(&c0, 112, 1024, p()).unwrap();
        assert_eq!(e.backing_format.as_deref(), Some("raw"));
        assert_eq!(e.data_file.as_deref(), Some("data.bin"));
        assert_eq!(e.unknown, vec![(0x1234_5678, b"keep me".to_vec())]);
        let mut h = Header::parse(&v3(), p()).unwrap();
        h.incompatible_features |= 1 << 7 | 1 << 9;
        let err = h.check_features(&e, p()).unwrap_err().to_string();
        assert!(
            err.contains("bit 7 (\"feature\")") && err.contains("bit 9"),
            "{err}"
        );
    }

    #[test]
    fn refuses_overflowing_extensions() {
        let mut c0 = vec![0u8; 112];
        c0.extend(0xdead_beefu32.to_be_bytes());
        c0.extend(u32::MAX.to_be_bytes());
        c0.resize(512, 0);
        let e = Extensions::parse(&c0, 112, 512, p()).unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        // An extension header cut by the end of the area.
        let e = Extensions::parse(&c0, 508, 512, p()).unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        let mut c0 = vec![0u8; 112];
        c0.extend(ext(EXT_BACKING_FORMAT, &[b'x'; 40]));
        c0.resize(512, 0);
        assert!(Extensions::parse(&c0, 112, 512, p()).is_err());
    }
}
