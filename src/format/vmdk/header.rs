//! On-disk headers of sparse extents: hosted sparse ("KDMV", VMDK4, with the
//! streamOptimized footer) and ESX redo logs ("COWD", VMDK3). All integers little-endian.

use crate::endian::*;
use crate::ensure_corrupt;
use crate::error::{Error, Result};
use crate::storage::HostFile;

pub const SECTOR: u64 = 512;
pub const GD_AT_END: u64 = u64::MAX;
/// QEMU refuses grains above 0x200000 sectors (1 GiB).
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// QEMU refuses grain directories above 32 Mi entries ("L1 size too big").
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// A COWD grain table always holds 4096 entries.
pub const COWD_GTES: u64 = 4096;

pub const FLAG_NEWLINE_TEST: u32 = 1 << 0;
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESSED: u32 = 1 << 16;
pub const FLAG_MARKERS: u32 = 1 << 17;

const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;

/// The fields of a grain-table extent that translation needs, whichever header it came from.
#[derive(Clone, Debug)]
pub struct SparseHeader {
    pub cowd: bool,
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_sectors: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u64,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub gd_entries: u64,
    /// Grains are zlib streams (compressAlgorithm 1).
    pub compressed: bool,
    /// Each grain starts with a 12-byte marker (lba u64, size u32).
    pub markers: bool,
    /// The header came from the streamOptimized footer.
    pub from_footer: bool,
}

impl SparseHeader {
    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }
    /// The redundant GD, when the flags say it is maintained.
    pub fn redundant_gd(&self) -> Option<u64> {
        (!self.cowd && self.flags & FLAG_REDUNDANT_GD != 0 && self.rgd_offset != 0)
            .then_some(self.rgd_offset)
    }
}

/// Reads the header of a sparse extent (KDMV or COWD), following the footer when the GD is
/// at the end.
pub fn read(file: &HostFile) -> Result<SparseHeader> {
    let mut b = [0u8; 512];
    file.read_exact_at(&mut b, 0, "sparse extent header")?;
    match &b[..4] {
        b"KDMV" => {
            let mut h = decode_kdmv(&b, file, 0)?;
            if h.gd_offset == GD_AT_END {
                h = read_footer(file)?;
            }
            validate(h, file)
        }
        b"COWD" => validate(decode_cowd(&b, file)?, file),
        _ => Err(Error::corrupt(
            file.path(),
            "sparse extent magic",
            0,
            "neither KDMV nor COWD",
        )),
    }
}

/// Decodes a KDMV header sector found at `off` (0, or the footer).
pub fn decode_kdmv(b: &[u8], file: &HostFile, off: u64) -> Result<SparseHeader> {
    let path = file.path();
    ensure_corrupt!(&b[..4] == b"KDMV", path, "KDMV magic", off, "missing");
    let version = le32(b, 4);
    if version > 3 {
        return Err(Error::unsupported(
            path,
            format!("hosted sparse extent version {version}"),
        ));
    }
    let flags = le32(b, 8);
    if flags & FLAG_NEWLINE_TEST != 0 {
        ensure_corrupt!(
            &b[73..77] == b"\n \r\n",
            path,
            "newline test bytes",
            off + 73,
            "damaged (the file went through a text-mode transfer)"
        );
    }
    Ok(SparseHeader {
        cowd: false,
        version,
        flags,
        capacity: le64(b, 12),
        grain_sectors: le64(b, 20),
        desc_offset: le64(b, 28),
        desc_size: le64(b, 36),
        gtes_per_gt: le32(b, 44) as u64,
        rgd_offset: le64(b, 48),
        gd_offset: le64(b, 56),
        overhead: le64(b, 64),
        gd_entries: 0,
        compressed: le16(b, 77) == 1,
        markers: flags & FLAG_MARKERS != 0,
        from_footer: false,
    })
}

fn decode_cowd(b: &[u8], file: &HostFile) -> Result<SparseHeader> {
    let version = le32(b, 4);
    if version != 1 {
        return Err(Error::unsupported(
            file.path(),
            format!("COWD version {version}"),
        ));
    }
    Ok(SparseHeader {
        cowd: true,
        version,
        flags: le32(b, 8),
        capacity: le32(b, 12) as u64,
        grain_sectors: le32(b, 16) as u64,
        desc_offset: 0,
        desc_size: 0,
        gtes_per_gt: COWD_GTES,
        rgd_offset: 0,
        gd_offset: le32(b, 20) as u64,
        overhead: 0,
        gd_entries: le32(b, 24) as u64,
        compressed: false,
        markers: false,
        from_footer: false,
    })
}

/// streamOptimized with GD_AT_END: footer marker, footer header, end-of-stream marker in the
/// last 1536 bytes (checked as QEMU checks them).
fn read_footer(file: &HostFile) -> Result<SparseHeader> {
    let path = file.path();
    let len = file.len();
    ensure_corrupt!(
        len >= 1536 + 512,
        path,
        "streamOptimized footer",
        len,
        "file too short for a footer"
    );
    let off = len - 1536;
    let mut b = vec![0u8; 1536];
    file.read_exact_at(&mut b, off, "streamOptimized footer")?;
    let (marker, rest) = b.split_at(512);
    let (footer, eos) = rest.split_at(512);
    ensure_corrupt!(
        le32(marker, 8) == 0 && le32(marker, 12) == MARKER_FOOTER,
        path,
        "footer marker",
        off,
        "missing (size {}, type {})",
        le32(marker, 8),
        le32(marker, 12)
    );
    ensure_corrupt!(
        le64(eos, 0) == 0 && le32(eos, 8) == 0 && le32(eos, 12) == MARKER_EOS,
        path,
        "end-of-stream marker",
        off + 1024,
        "missing"
    );
    let mut h = decode_kdmv(footer, file, off + 512)?;
    ensure_corrupt!(
        h.gd_offset != GD_AT_END,
        path,
        "footer gdOffset",
        off + 512 + 56,
        "still GD_AT_END"
    );
    h.from_footer = true;
    Ok(h)
}

/// Checks sizes so that later arithmetic cannot overflow, and computes the GD length.
fn validate(mut h: SparseHeader, file: &HostFile) -> Result<SparseHeader> {
    let path = file.path();
    ensure_corrupt!(
        h.grain_sectors >= 1 && h.grain_sectors <= MAX_GRAIN_SECTORS,
        path,
        "grainSize",
        20,
        "{} sectors is not in 1..={MAX_GRAIN_SECTORS}",
        h.grain_sectors
    );
    ensure_corrupt!(
        h.gtes_per_gt >= 1 && h.gtes_per_gt <= if h.cowd { COWD_GTES } else { 512 },
        path,
        "numGTEsPerGT",
        44,
        "{} entries per grain table is invalid",
        h.gtes_per_gt
    );
    ensure_corrupt!(
        h.capacity
            .checked_mul(SECTOR)
            .is_some_and(|b| b <= i64::MAX as u64),
        path,
        "capacity",
        12,
        "{} sectors is absurd",
        h.capacity
    );
    let gt_span = h.gtes_per_gt * h.grain_sectors;
    let needed = h.capacity.div_ceil(gt_span);
    if h.cowd {
        ensure_corrupt!(
            h.gd_entries >= needed,
            path,
            "numGDEntries",
            24,
            "{} entries cannot cover {needed} grain tables",
            h.gd_entries
        );
    } else {
        h.gd_entries = needed;
    }
    ensure_corrupt!(
        h.gd_entries <= MAX_GD_ENTRIES,
        path,
        "grain directory",
        h.gd_offset,
        "{} entries is too big",
        h.gd_entries
    );
    let min_len = h.overhead.checked_mul(SECTOR);
    ensure_corrupt!(
        min_len.is_some_and(|m| m <= file.len()),
        path,
        "overHead",
        64,
        "file truncated: expected at least {} sectors, have {} bytes",
        h.overhead,
        file.len()
    );
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    pub fn kdmv_header(capacity: u64, grain: u64, gtes: u32, gd: u64, flags: u32) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..4].copy_from_slice(b"KDMV");
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[12..20].copy_from_slice(&capacity.to_le_bytes());
        b[20..28].copy_from_slice(&grain.to_le_bytes());
        b[44..48].copy_from_slice(&gtes.to_le_bytes());
        b[56..64].copy_from_slice(&gd.to_le_bytes());
        b[73..77].copy_from_slice(b"\n \r\n");
        b
    }

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn open(bytes: &[u8], name: &str) -> (Tmp, std::sync::Arc<HostFile>) {
        let p = std::env::temp_dir().join(format!("vmfs-vmdk-hdr-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let f = HostFile::open(&p, false).unwrap();
        (Tmp(p), f)
    }

    #[test]
    fn decodes_a_kdmv_header() {
        let mut img = kdmv_header(2048 * 64, 128, 512, 1, FLAG_NEWLINE_TEST | FLAG_ZERO_GRAIN);
        img.resize(4096, 0);
        let (_t, f) = open(&img, "ok");
        let h = read(&f).unwrap();
        assert_eq!(h.grain_bytes(), 65536);
        assert_eq!(h.gd_entries, 2);
        assert!(h.zero_grain());
        assert!(h.redundant_gd().is_none());
    }

    #[test]
    fn rejects_hostile_headers() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("grain0", kdmv_header(100, 0, 512, 1, 0)),
            ("grainbig", kdmv_header(100, 1 << 30, 512, 1, 0)),
            ("gtes", kdmv_header(100, 128, 513, 1, 0)),
            ("gtes0", kdmv_header(100, 128, 0, 1, 0)),
            ("cap", kdmv_header(u64::MAX / 2, 128, 512, 1, 0)),
            ("gd", kdmv_header(1 << 54, 1, 1, 1, 0)),
            ("nl", {
                let mut h = kdmv_header(100, 128, 512, 1, FLAG_NEWLINE_TEST);
                h[75] = b'\n';
                h
            }),
            ("footer", kdmv_header(100, 128, 512, GD_AT_END, 0)),
        ];
        for (name, mut img) in cases {
            img.resize(4096, 0);
            let (_t, f) = open(&img, name);
            let e = read(&f).unwrap_err();
            assert!(e.to_string().contains("vmfs-vmdk-hdr"), "{name}: {e}");
        }
    }

    #[test]
    fn decodes_cowd() {
        let mut b = vec![0u8; 2048];
        b[..4].copy_from_slice(b"COWD");
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&(4096u32 * 8).to_le_bytes());
        b[16..20].copy_from_slice(&8u32.to_le_bytes());
        b[20..24].copy_from_slice(&4u32.to_le_bytes());
        b[24..28].copy_from_slice(&1u32.to_le_bytes());
        let (_t, f) = open(&b, "cowd");
        let h = read(&f).unwrap();
        assert!(h.cowd);
        assert_eq!((h.gtes_per_gt, h.gd_entries, h.gd_offset), (4096, 1, 4));
        b[24..28].copy_from_slice(&0u32.to_le_bytes());
        let (_t2, f2) = open(&b, "cowd0");
        assert!(read(&f2).is_err());
    }
}
