//! The qcow2 header fields a writer needs, decoded and validated from hostile bytes.

use crate::ensure_corrupt;
use crate::error::{Error, Result};
use crate::host::endian::{be32, be64};
use std::path::Path;

pub const MAGIC: u32 = 0x5146_49fb;
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// QEMU's limits: L1 at most 32 MiB, refcount table at most 8 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

#[derive(Clone, Debug, Default)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompat: u64,
    pub compat: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn extended_l2(&self) -> bool {
        self.incompat & INCOMPAT_EXTL2 != 0
    }
    /// Guest bytes covered by one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }
}

/// Decodes cluster 0 (`buf` holds at least the first min(cluster, file) bytes).
pub fn parse(buf: &[u8], file: &Path, file_len: u64) -> Result<Header> {
    ensure_corrupt!(buf.len() >= 72, file, "header", 0, "file too short for a qcow2 header");
    ensure_corrupt!(be32(buf, 0) == MAGIC, file, "magic", 0, "not a qcow2 image");
    let mut h = Header {
        version: be32(buf, 4),
        backing_file_offset: be64(buf, 8),
        backing_file_size: be32(buf, 16),
        cluster_bits: be32(buf, 20),
        size: be64(buf, 24),
        l1_size: be32(buf, 36),
        l1_offset: be64(buf, 40),
        reftable_offset: be64(buf, 48),
        reftable_clusters: be32(buf, 56),
        nb_snapshots: be32(buf, 60),
        snapshots_offset: be64(buf, 64),
        refcount_order: 4,
        header_length: 72,
        ..Header::default()
    };
    if h.version != 2 && h.version != 3 {
        return Err(Error::unsupported(file, format!("qcow2 version {}", h.version)));
    }
    ensure_corrupt!((9..=21).contains(&h.cluster_bits), file, "cluster_bits", 20, "{} is out of range 9..21", h.cluster_bits);
    let cs = h.cluster_size();
    if be32(buf, 32) != 0 {
        return Err(Error::unsupported(file, "encrypted qcow2 images"));
    }
    if h.version == 3 {
        ensure_corrupt!(buf.len() >= 104, file, "header", 0, "file too short for a v3 header");
        h.incompat = be64(buf, 72);
        h.compat = be64(buf, 80);
        h.autoclear = be64(buf, 88);
        h.refcount_order = be32(buf, 96);
        h.header_length = be32(buf, 100);
        ensure_corrupt!(
            h.header_length >= 104 && h.header_length % 8 == 0 && u64::from(h.header_length) <= cs,
            file,
            "header_length",
            100,
            "{} is invalid",
            h.header_length
        );
        if h.header_length > 104 {
            h.compression_type = buf.get(104).copied().unwrap_or(0);
        }
    }
    if h.incompat & !INCOMPAT_KNOWN != 0 {
        return Err(Error::unsupported(file, format!("incompatible features {:#x}", h.incompat & !INCOMPAT_KNOWN)));
    }
    ensure_corrupt!(h.refcount_order <= 6, file, "refcount_order", 96, "{} > 6", h.refcount_order);
    ensure_corrupt!(
        (h.compression_type != 0) == (h.incompat & INCOMPAT_COMPRESSION != 0) && h.compression_type <= 1,
        file,
        "compression_type",
        104,
        "{} does not match the incompatible feature bit",
        h.compression_type
    );
    ensure_corrupt!(!h.extended_l2() || h.cluster_bits >= 14, file, "cluster_bits", 20, "extended L2 needs 16 KiB clusters");
    check_table(file, "L1 table", h.l1_offset, u64::from(h.l1_size) * 8, MAX_L1_BYTES, cs, file_len)?;
    let needed = h.size.div_ceil(cs).div_ceil(h.l2_entries());
    ensure_corrupt!(u64::from(h.l1_size) >= needed, file, "l1_size", 36, "{} entries cannot map {} bytes", h.l1_size, h.size);
    let rt_bytes = u64::from(h.reftable_clusters) * cs;
    check_table(file, "refcount table", h.reftable_offset, rt_bytes, MAX_REFTABLE_BYTES, cs, file_len)?;
    ensure_corrupt!(h.reftable_clusters > 0, file, "refcount_table_clusters", 56, "is zero");
    parse_extensions(buf, file, &mut h)?;
    if h.backing_file_offset != 0 {
        let off = h.backing_file_offset;
        let len = u64::from(h.backing_file_size);
        ensure_corrupt!(len <= 1023 && off.checked_add(len).is_some_and(|e| e <= cs.min(buf.len() as u64)), file, "backing_file_offset", 8, "name at {off:#x}+{len} is outside cluster 0");
        let name = String::from_utf8(buf[off as usize..(off + len) as usize].to_vec())
            .map_err(|_| Error::corrupt(file, "backing file name", off, "not UTF-8"))?;
        h.backing = (!name.is_empty()).then_some(name);
    }
    Ok(h)
}

/// A table must be cluster-aligned, no larger than `limit` and inside the file.
fn check_table(file: &Path, field: &str, off: u64, len: u64, limit: u64, cs: u64, file_len: u64) -> Result<()> {
    ensure_corrupt!(off % cs == 0, file, field, off, "offset is not cluster-aligned");
    ensure_corrupt!(len <= limit, file, field, off, "size {len} exceeds the limit {limit}");
    ensure_corrupt!(off.checked_add(len).is_some_and(|e| e <= file_len), file, field, off, "{len} bytes reach past the end of the file");
    Ok(())
}

fn parse_extensions(buf: &[u8], file: &Path, h: &mut Header) -> Result<()> {
    let end = if h.backing_file_offset != 0 { h.backing_file_offset.min(buf.len() as u64) } else { buf.len() as u64 };
    let mut pos = u64::from(h.header_length);
    while pos + 8 <= end {
        let ty = be32(buf, pos as usize);
        let len = u64::from(be32(buf, pos as usize + 4));
        if ty == 0 {
            break;
        }
        let data = pos + 8;
        ensure_corrupt!(data + len <= end, file, "header extension", pos, "{len} bytes run past the end of cluster 0");
        let bytes = &buf[data as usize..(data + len) as usize];
        let text = || String::from_utf8(bytes.to_vec()).map_err(|_| Error::corrupt(file, "header extension", pos, "not UTF-8"));
        match ty {
            EXT_BACKING_FORMAT => h.backing_format = Some(text()?),
            EXT_DATA_FILE => h.data_file = Some(text()?),
            _ => {}
        }
        pos = data + len.div_ceil(8) * 8;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn v3_header(cluster_bits: u32, size: u64) -> Vec<u8> {
        let cs = 1usize << cluster_bits;
        let mut b = vec![0u8; cs * 4];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3 * cs as u64).to_be_bytes());
        b[48..56].copy_from_slice(&(cs as u64).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    #[test]
    fn decodes_a_v3_header_with_extensions() {
        let mut b = v3_header(16, 1 << 20);
        b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[108..112].copy_from_slice(&3u32.to_be_bytes());
        b[112..115].copy_from_slice(b"raw");
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[200..208].copy_from_slice(b"base.img");
        let h = parse(&b, Path::new("t"), b.len() as u64).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.backing.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.l2_entries(), 8192);
    }

    #[test]
    fn rejects_hostile_fields() {
        let good = v3_header(16, 1 << 20);
        let n = good.len() as u64;
        let cases: Vec<(usize, Vec<u8>)> = vec![
            (20, 40u32.to_be_bytes().to_vec()),            // cluster_bits
            (40, 12345u64.to_be_bytes().to_vec()),         // unaligned L1
            (36, 0u32.to_be_bytes().to_vec()),             // L1 too small
            (36, u32::MAX.to_be_bytes().to_vec()),         // L1 too big
            (48, (1u64 << 40).to_be_bytes().to_vec()),     // reftable past EOF
            (96, 7u32.to_be_bytes().to_vec()),             // refcount_order
            (72, (1u64 << 9).to_be_bytes().to_vec()),      // unknown incompatible bit
            (100, 99u32.to_be_bytes().to_vec()),           // header_length
            (16, 5000u32.to_be_bytes().to_vec()),          // backing name size (with offset below)
        ];
        for (off, bytes) in cases {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(&bytes);
            if off == 16 {
                b[8..16].copy_from_slice(&200u64.to_be_bytes());
            }
            assert!(parse(&b, Path::new("t"), n).is_err(), "field at {off} accepted");
        }
    }
}
