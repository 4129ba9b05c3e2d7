//! The fixed part of a VHDX file: file identifier, the two headers, the region tables.

use super::crc32c::crc32c_with_zeroed_field;
use super::guid::Guid;
use super::overlay::Replayed;
use crate::endian::{le16, le32, le64};
use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use std::path::Path;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
const MAX_REGION_ENTRIES: u32 = 2047;

pub const BAT_REGION: Guid = Guid::from_fields(0x2DC27766, 0xF623, 0x4200, 0x9D64_115E_9BFD_4A08);
pub const METADATA_REGION: Guid =
    Guid::from_fields(0x8B7CA206, 0x4790, 0x4B9A, 0xB8FE_575F_050F_886E);

/// One of the two file headers, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub log_length: u32,
    pub log_offset: u64,
    /// Which slot (0: 64 KiB, 1: 128 KiB) it came from.
    pub slot: usize,
}

/// Decodes a 4 KiB header; Err says why it is not valid.
pub fn parse_header(b: &[u8], slot: usize) -> std::result::Result<Header, String> {
    if b.len() < HEADER_SIZE {
        return Err("short header".into());
    }
    let b = &b[..HEADER_SIZE];
    if &b[0..4] != b"head" {
        return Err("no \"head\" signature".into());
    }
    let stored = le32(b, 4);
    let computed = crc32c_with_zeroed_field(b, 4);
    if stored != computed {
        return Err(format!(
            "checksum {stored:#010x} does not match the computed {computed:#010x}"
        ));
    }
    let version = le16(b, 66);
    if version != 1 {
        return Err(format!("version {version} (only 1 is defined)"));
    }
    Ok(Header {
        sequence: le64(b, 8),
        file_write_guid: Guid::from_slice(&b[16..32]),
        data_write_guid: Guid::from_slice(&b[32..48]),
        log_guid: Guid::from_slice(&b[48..64]),
        log_version: le16(b, 64),
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
        slot,
    })
}

/// Checks the file identifier and returns the creator string (diagnostic only).
pub fn read_identifier(file: &HostFile) -> Result<String> {
    let mut b = vec![0u8; 8 + 512];
    file.read_exact_at(&mut b, 0, "file type identifier")?;
    if &b[..8] != b"vhdxfile" {
        return Err(Error::corrupt(
            file.path(),
            "file type identifier",
            0,
            "no \"vhdxfile\" signature",
        ));
    }
    let units: Vec<u16> = b[8..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

/// The current header: the valid one with the higher sequence number. Equal sequence numbers
/// are accepted only when both headers are identical (Disk2vhd writes them so).
pub fn current_header(file: &HostFile) -> Result<Header> {
    let mut parsed = Vec::new();
    let mut raws = Vec::new();
    for (slot, &off) in HEADER_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; HEADER_SIZE];
        let r = file
            .read_exact_at(&mut b, off, "header")
            .map_err(|e| e.message().to_string());
        parsed.push(r.and_then(|_| parse_header(&b, slot)));
        raws.push(b);
    }
    match (&parsed[0], &parsed[1]) {
        (Ok(h1), Ok(h2)) => {
            if h1.sequence > h2.sequence {
                Ok(h1.clone())
            } else if h2.sequence > h1.sequence {
                Ok(h2.clone())
            } else if raws[0] == raws[1] {
                Ok(h1.clone())
            } else {
                Err(Error::corrupt(
                    file.path(),
                    "headers",
                    HEADER_OFFSETS[0],
                    format!(
                        "both headers are valid with the same sequence number {} but differ",
                        h1.sequence
                    ),
                ))
            }
        }
        (Ok(h), Err(_)) | (Err(_), Ok(h)) => Ok(h.clone()),
        (Err(e1), Err(e2)) => Err(Error::corrupt(
            file.path(),
            "headers",
            HEADER_OFFSETS[0],
            format!(
                "no valid header (header 1: {e1}; header 2 at {:#x}: {e2})",
                HEADER_OFFSETS[1]
            ),
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub guid: Guid,
    pub offset: u64,
    pub length: u64,
    pub required: bool,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Decodes a 64 KiB region table; Err says why it is not valid.
pub fn parse_region_table(b: &[u8]) -> std::result::Result<Vec<Region>, String> {
    if b.len() < REGION_TABLE_SIZE {
        return Err("short region table".into());
    }
    let b = &b[..REGION_TABLE_SIZE];
    if &b[0..4] != b"regi" {
        return Err("no \"regi\" signature".into());
    }
    let stored = le32(b, 4);
    let computed = crc32c_with_zeroed_field(b, 4);
    if stored != computed {
        return Err(format!(
            "checksum {stored:#010x} does not match the computed {computed:#010x}"
        ));
    }
    let count = le32(b, 8);
    if count > MAX_REGION_ENTRIES {
        return Err(format!(
            "{count} entries (at most {MAX_REGION_ENTRIES} allowed)"
        ));
    }
    let regions: Vec<Region> = (0..count as usize)
        .map(|i| {
            let e = &b[16 + 32 * i..16 + 32 * (i + 1)];
            Region {
                guid: Guid::from_slice(&e[0..16]),
                offset: le64(e, 16),
                length: le32(e, 24) as u64,
                required: le32(e, 28) & 1 != 0,
            }
        })
        .collect();
    Ok(regions)
}

/// The regions a reader needs.
#[derive(Clone, Copy, Debug)]
pub struct Regions {
    pub bat: Region,
    pub metadata: Region,
}

/// Reads region table 1 (or 2 if 1 is invalid) from the replayed file and checks it: known
/// regions present once, unknown required regions refused, everything 1 MiB aligned and
/// clear of the header area, the log and each other.
pub fn read_regions(src: &Replayed, hdr: &Header) -> Result<Regions> {
    let path = src.file().path();
    let mut reasons = Vec::new();
    let mut table = None;
    for &off in &REGION_TABLE_OFFSETS {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        match src
            .read(&mut b, off, "region table")
            .map_err(|e| e.message().to_string())
            .and_then(|_| parse_region_table(&b))
        {
            Ok(t) => {
                table = Some((off, t));
                break;
            }
            Err(why) => reasons.push(format!("at {off:#x}: {why}")),
        }
    }
    let Some((table_off, regions)) = table else {
        return Err(Error::corrupt(
            path,
            "region table",
            REGION_TABLE_OFFSETS[0],
            format!("no valid region table ({})", reasons.join("; ")),
        ));
    };
    check_regions(path, table_off, &regions, hdr)
}

fn check_regions(path: &Path, table_off: u64, regions: &[Region], hdr: &Header) -> Result<Regions> {
    let (mut bat, mut metadata) = (None, None);
    for (i, r) in regions.iter().enumerate() {
        let field = format!("region table entry {i}");
        let slot = match r.guid {
            g if g == BAT_REGION => &mut bat,
            g if g == METADATA_REGION => &mut metadata,
            g if r.required => {
                return Err(Error::new(
                    Kind::Unsupported,
                    format!(
                        "{}: {field}: unknown required region {{{g}}}",
                        path.display()
                    ),
                ));
            }
            _ => continue,
        };
        if slot.is_some() {
            return Err(Error::corrupt(
                path,
                &field,
                table_off,
                format!("region {{{}}} appears twice", r.guid),
            ));
        }
        if r.offset < MIB
            || r.offset % MIB != 0
            || r.length == 0
            || r.length % MIB != 0
            || r.offset.checked_add(r.length).is_none()
        {
            return Err(Error::corrupt(
                path,
                &field,
                table_off,
                format!(
                    "region at {:#x} of {} bytes is not 1 MiB aligned, empty or inside the header area",
                    r.offset, r.length
                ),
            ));
        }
        *slot = Some(*r);
    }
    let missing =
        |what| Error::corrupt(path, "region table", table_off, format!("no {what} region"));
    let bat = bat.ok_or_else(|| missing("BAT"))?;
    let metadata = metadata.ok_or_else(|| missing("metadata"))?;
    let overlaps = |a: &Region, start: u64, end: u64| a.offset < end && start < a.end();
    if overlaps(&bat, metadata.offset, metadata.end()) {
        return Err(Error::corrupt(
            path,
            "region table",
            table_off,
            "the BAT and metadata regions overlap",
        ));
    }
    if hdr.log_length > 0 {
        let log_end = hdr.log_offset.saturating_add(hdr.log_length as u64);
        for (name, r) in [("BAT", &bat), ("metadata", &metadata)] {
            if overlaps(r, hdr.log_offset, log_end) {
                return Err(Error::corrupt(
                    path,
                    "region table",
                    table_off,
                    format!("the {name} region overlaps the log"),
                ));
            }
        }
    }
    Ok(Regions { bat, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn header_bytes(seq: u64, log_guid: Guid) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[32..48].copy_from_slice(&[7; 16]);
        b[48..64].copy_from_slice(&log_guid.0);
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&(MIB as u32).to_le_bytes());
        b[72..80].copy_from_slice(&MIB.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn decodes_a_valid_header_and_rejects_damage() {
        let b = header_bytes(5, Guid::ZERO);
        let h = parse_header(&b, 0).unwrap();
        assert_eq!(h.sequence, 5);
        assert_eq!(h.data_write_guid, Guid([7; 16]));
        assert_eq!((h.log_length, h.log_offset), (MIB as u32, MIB));
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(parse_header(&bad, 0).unwrap_err().contains("checksum"));
        let mut bad = b.clone();
        bad[0] = b'x';
        assert!(parse_header(&bad, 0).unwrap_err().contains("signature"));
        assert!(parse_header(&b[..100], 0).is_err());
    }

    fn table(entries: &[(Guid, u64, u32, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[0..4].copy_from_slice(b"regi");
        b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        for (i, (g, off, len, req)) in entries.iter().enumerate() {
            let e = &mut b[16 + 32 * i..];
            e[0..16].copy_from_slice(&g.0);
            e[16..24].copy_from_slice(&off.to_le_bytes());
            e[24..28].copy_from_slice(&len.to_le_bytes());
            e[28..32].copy_from_slice(&req.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn region_tables_are_checked() {
        let hdr = parse_header(&header_bytes(1, Guid::ZERO), 0).unwrap();
        let p = Path::new("t.vhdx");
        let ok = parse_region_table(&table(&[
            (BAT_REGION, 3 * MIB, MIB as u32, 1),
            (METADATA_REGION, 2 * MIB, MIB as u32, 1),
        ]))
        .unwrap();
        let r = check_regions(p, 0, &ok, &hdr).unwrap();
        assert_eq!((r.bat.offset, r.metadata.offset), (3 * MIB, 2 * MIB));

        let unknown = Guid::from_fields(1, 2, 3, 4);
        let t = parse_region_table(&table(&[
            (BAT_REGION, 3 * MIB, MIB as u32, 1),
            (METADATA_REGION, 2 * MIB, MIB as u32, 1),
            (unknown, 5 * MIB, MIB as u32, 1),
        ]))
        .unwrap();
        assert_eq!(
            check_regions(p, 0, &t, &hdr).unwrap_err().kind(),
            Kind::Unsupported
        );
        let t = parse_region_table(&table(&[
            (BAT_REGION, 3 * MIB, MIB as u32, 1),
            (METADATA_REGION, 2 * MIB, MIB as u32, 1),
            (unknown, 5 * MIB, MIB as u32, 0),
        ]))
        .unwrap();
        assert!(check_regions(p, 0, &t, &hdr).is_ok());
        // overlapping the log at 1 MiB
        let t = parse_region_table(&table(&[
            (BAT_REGION, MIB, MIB as u32, 1),
            (METADATA_REGION, 2 * MIB, MIB as u32, 1),
        ]))
        .unwrap();
        assert!(
            check_regions(p, 0, &t, &hdr)
                .unwrap_err()
                .message()
                .contains("log")
        );
        // inside the header area, unaligned, overlapping each other
        for (b, m) in [(0, 2 * MIB), (3 * MIB + 1, 2 * MIB), (2 * MIB, 2 * MIB)] {
            let t = parse_region_table(&table(&[
                (BAT_REGION, b, MIB as u32, 1),
                (METADATA_REGION, m, MIB as u32, 1),
            ]))
            .unwrap();
            assert_eq!(
                check_regions(p, 0, &t, &hdr).unwrap_err().kind(),
                Kind::Corrupt
            );
        }
        let t = parse_region_table(&table(&[(BAT_REGION, 3 * MIB, MIB as u32, 1)])).unwrap();
        assert!(
            check_regions(p, 0, &t, &hdr)
                .unwrap_err()
                .message()
                .contains("no metadata region")
        );
        let mut bad = table(&[]);
        bad[8] = 0xFF;
        bad[9] = 0xFF;
        assert!(parse_region_table(&bad).is_err());
    }
}
