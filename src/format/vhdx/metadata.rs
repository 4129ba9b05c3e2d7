//! The metadata region: its table and the known items (file parameters, sizes, disk id,
//! parent locator).

use super::guid::Guid;
use super::header::{KIB, MIB, Region};
use super::overlay::Replayed;
use crate::endian::{le16, le32, le64};
use crate::error::{Error, Kind, Result};
use std::path::Path;

const TABLE_SIZE: u64 = 64 * KIB;
const MAX_ENTRIES: u16 = 2047;
const MAX_ITEM: u64 = MIB;
/// MS-VHDX: the virtual disk is at most 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

pub const FILE_PARAMETERS: Guid =
    Guid::from_fields(0xCAA16737, 0xFA36, 0x4D43, 0xB3B6_33F0_AA44_E76B);
pub const VIRTUAL_DISK_SIZE: Guid =
    Guid::from_fields(0x2FA54224, 0xCD1B, 0x4876, 0xB211_5DBE_D83B_F4B8);
pub const PAGE83: Guid = Guid::from_fields(0xBECA12AB, 0xB2E6, 0x4523, 0x93EF_C309_E000_C746);
pub const LOGICAL_SECTOR: Guid =
    Guid::from_fields(0x8141BF1D, 0xA96F, 0x4709, 0xBA47_F233_A8FA_AB5F);
pub const PHYSICAL_SECTOR: Guid =
    Guid::from_fields(0xCDA348C7, 0x445D, 0x4471, 0x9CC9_E988_5251_C556);
pub const PARENT_LOCATOR: Guid =
    Guid::from_fields(0xA8D35F2D, 0xB30B, 0x454D, 0xABF7_D3D8_4834_AB0C);
pub const VHDX_LOCATOR_TYPE: Guid =
    Guid::from_fields(0xB04AEFB7, 0xD19E, 0x4A81, 0xB789_25B8_E944_5913);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u64,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub disk_id: Option<Guid>,
    pub logical_sector: u64,
    pub physical_sector: u64,
    /// Key/value pairs of the parent locator (differencing disks only).
    pub parent_locator: Option<Vec<(String, String)>>,
}

impl Metadata {
    pub fn locator(&self, key: &str) -> Option<&str> {
        self.parent_locator
            .as_ref()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    id: Guid,
    offset: u64,
    length: u64,
    is_user: bool,
    required: bool,
}

pub fn read_metadata(src: &Replayed, region: &Region) -> Result<Metadata> {
    let path = src.file().path();
    if region.length < TABLE_SIZE {
        return Err(Error::corrupt(
            path,
            "metadata region",
            region.offset,
            "shorter than its 64 KiB table",
        ));
    }
    let table = src.read_vec(region.offset, TABLE_SIZE, TABLE_SIZE, "metadata table")?;
    let entries = parse_table(path, region, &table)?;
    let item = |id: Guid, min: u64| -> Result<Option<Vec<u8>>> {
        let Some(e) = entries.iter().find(|e| e.id == id && !e.is_user) else {
            return Ok(None);
        };
        let at = region.offset + e.offset;
        if e.length < min {
            return Err(Error::corrupt(
                path,
                &format!("metadata item {{{id}}}"),
                at,
                format!("{} bytes, need {min}", e.length),
            ));
        }
        src.read_vec(at, e.length, MAX_ITEM, &format!("metadata item {{{id}}}"))
            .map(Some)
    };
    let need = |id: Guid, min: u64, name: &str| -> Result<Vec<u8>> {
        item(id, min)?.ok_or_else(|| {
            Error::corrupt(
                path,
                "metadata table",
                region.offset,
                format!("no {name} item"),
            )
        })
    };

    let params = need(FILE_PARAMETERS, 8, "file parameters")?;
    let block_size = le32(&params, 0) as u64;
    let flags = le32(&params, 4);
    let size = le64(&need(VIRTUAL_DISK_SIZE, 8, "virtual disk size")?, 0);
    let logical = le32(&need(LOGICAL_SECTOR, 4, "logical sector size")?, 0) as u64;
    let physical = match item(PHYSICAL_SECTOR, 4)? {
        Some(b) => le32(&b, 0) as u64,
        None => logical,
    };
    let disk_id = item(PAGE83, 16)?.map(|b| Guid::from_slice(&b));
    let has_parent = flags & 2 != 0;

    let bad = |field: &str, what: String| Error::corrupt(path, field, region.offset, what);
    if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(bad(
            "file parameters",
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    if logical != 512 && logical != 4096 {
        return Err(bad(
            "logical sector size",
            format!("{logical} (must be 512 or 4096)"),
        ));
    }
    if physical != 512 && physical != 4096 {
        return Err(bad(
            "physical sector size",
            format!("{physical} (must be 512 or 4096)"),
        ));
    }
    if size > MAX_VIRTUAL_SIZE || !size.is_multiple_of(logical) {
        return Err(bad(
            "virtual disk size",
            format!("{size} bytes is over 64 TiB or not a multiple of the {logical}-byte sector"),
        ));
    }
    let locator_at = entries
        .iter()
        .find(|e| e.id == PARENT_LOCATOR && !e.is_user)
        .map_or(region.offset, |e| region.offset + e.offset);
    let parent_locator = match item(PARENT_LOCATOR, 20)? {
        Some(b) if has_parent => Some(parse_locator(path, locator_at, &b)?),
        None if has_parent => {
            return Err(bad(
                "metadata table",
                "a differencing disk without a parent locator".into(),
            ));
        }
        _ => None,
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size: size,
        disk_id,
        logical_sector: logical,
        physical_sector: physical,
        parent_locator,
    })
}

fn parse_table(path: &Path, region: &Region, t: &[u8]) -> Result<Vec<Entry>> {
    let bad = |what: String| Error::corrupt(path, "metadata table", region.offset, what);
    if &t[0..8] != b"metadata" {
        return Err(bad("no \"metadata\" signature".into()));
    }
    let count = le16(t, 10);
    if count > MAX_ENTRIES {
        return Err(bad(format!(
            "{count} entries (at most {MAX_ENTRIES} allowed)"
        )));
    }
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE83,
        LOGICAL_SECTOR,
        PHYSICAL_SECTOR,
        PARENT_LOCATOR,
    ];
    let mut out: Vec<Entry> = Vec::new();
    for i in 0..count as usize {
        let e = &t[32 + 32 * i..64 + 32 * i];
        let flags = le32(e, 24);
        let entry = Entry {
            id: Guid::from_slice(&e[0..16]),
            offset: le32(e, 16) as u64,
            length: le32(e, 20) as u64,
            is_user: flags & 1 != 0,
            required: flags & 4 != 0,
        };
        let field = format!("metadata entry {i} {{{}}}", entry.id);
        let at = region.offset + 32 + 32 * i as u64;
        if entry.length > MAX_ITEM {
            return Err(Error::corrupt(
                path,
                &field,
                at,
                format!("item length {} exceeds 1 MiB", entry.length),
            ));
        }
        let inside = entry.offset >= TABLE_SIZE && entry.offset + entry.length <= region.length;
        if entry.length > 0 && !inside {
            return Err(Error::corrupt(
                path,
                &field,
                at,
                format!(
                    "item at {:#x}+{} lies outside the {}-byte region (or inside its table)",
                    entry.offset, entry.length, region.length
                ),
            ));
        }
        if entry.required && (entry.is_user || !known.contains(&entry.id)) {
            return Err(Error::new(
                Kind::Unsupported,
                format!(
                    "{}: {field}: unknown required metadata item",
                    path.display()
                ),
            ));
        }
        if out
            .iter()
            .any(|o| o.id == entry.id && o.is_user == entry.is_user)
        {
            return Err(Error::corrupt(path, &field, at, "item appears twice"));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Decodes the VHDX parent locator: a type GUID and UTF-16LE key/value pairs.
pub fn parse_locator(path: &Path, item_off: u64, b: &[u8]) -> Result<Vec<(String, String)>> {
    let bad = |what: String| Error::corrupt(path, "parent locator", item_off, what);
    let kind = Guid::from_slice(&b[0..16]);
    if kind != VHDX_LOCATOR_TYPE {
        return Err(Error::unsupported(
            path,
            format!("parent locator type {{{kind}}} (only VHDX parents are supported)"),
        ));
    }
    let count = le16(b, 18) as usize;
    if 20 + 12 * count > b.len() {
        return Err(bad(format!(
            "{count} entries do not fit in {} bytes",
            b.len()
        )));
    }
    let string = |off: u32, len: u16, what: &str| -> Result<String> {
        let (off, len) = (off as usize, len as usize);
        let bytes = b
            .get(off..off + len)
            .filter(|_| off > 0 && len > 0 && len % 2 == 0);
        let bytes = bytes.ok_or_else(|| {
            bad(format!(
                "{what} at {off:#x}+{len} is empty, odd-sized or outside the item"
            ))
        })?;
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units)
            .map_err(|_| bad(format!("{what} at {off:#x} is not valid UTF-16")))
    };
    let mut out: Vec<(String, String)> = Vec::with_capacity(count);
    for i in 0..count {
        let e = &b[20 + 12 * i..32 + 12 * i];
        let key = string(le32(e, 0), le16(e, 8), "key")?;
        let value = string(le32(e, 4), le16(e, 10), "value")?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(bad(format!("key {key:?} appears twice")));
        }
        out.push((key, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
    }

    pub fn locator(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut b = VHDX_LOCATOR_TYPE.0.to_vec();
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
        let mut strings = Vec::new();
        let base = 20 + 12 * pairs.len();
        for (k, v) in pairs {
            let (k, v) = (utf16(k), utf16(v));
            let ko = base + strings.len();
            strings.extend_from_slice(&k);
            let vo = base + strings.len();
            strings.extend_from_slice(&v);
            b.extend_from_slice(&(ko as u32).to_le_bytes());
            b.extend_from_slice(&(vo as u32).to_le_bytes());
            b.extend_from_slice(&(k.len() as u16).to_le_bytes());
            b.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn decodes_locator_pairs() {
        let b = locator(&[
            ("parent_linkage", "{01020304-0506-0708-090a-0b0c0d0e0f10}"),
            ("relative_path", "..\\base.vhdx"),
        ]);
        let kv = parse_locator(Path::new("c.vhdx"), 0, &b).unwrap();
        assert_eq!(
            kv[1],
            ("relative_path".to_string(), "..\\base.vhdx".to_string())
        );
    }

    #[test]
    fn rejects_hostile_locators() {
        let p = Path::new("c.vhdx");
        let good = locator(&[("relative_path", "a")]);
        let mut b = good.clone();
        b[20..24].copy_from_slice(&5000u32.to_le_bytes());
        assert!(parse_locator(p, 0, &b).is_err());
        let mut b = good.clone();
        b[18] = 200;
        assert!(parse_locator(p, 0, &b).is_err());
        let mut b = good.clone();
        b[0] ^= 1;
        assert_eq!(
            parse_locator(p, 0, &b).unwrap_err().kind(),
            Kind::Unsupported
        );
        let dup = locator(&[("a", "1"), ("a", "2")]);
        assert!(parse_locator(p, 0, &dup).is_err());
        let mut lone = locator(&[("k", "v")]);
        let n = lone.len();
        lone[n - 2..].copy_from_slice(&0xD800u16.to_le_bytes());
        assert!(
            parse_locator(p, 0, &lone)
                .unwrap_err()
                .message()
                .contains("UTF-16")
        );
    }

    fn table(entries: &[(Guid, u32, u32, u32)]) -> Vec<u8> {
        let mut t = vec![0u8; TABLE_SIZE as usize];
        t[0..8].copy_from_slice(b"metadata");
        t[10..12].copy_from_slice(&(entries.len() as u16).to_le_bytes());
        for (i, (g, off, len, flags)) in entries.iter().enumerate() {
            let e = &mut t[32 + 32 * i..];
            e[0..16].copy_from_slice(&g.0);
            e[16..20].copy_from_slice(&off.to_le_bytes());
            e[20..24].copy_from_slice(&len.to_le_bytes());
            e[24..28].copy_from_slice(&flags.to_le_bytes());
        }
        t
    }

    #[test]
    fn table_entries_are_bounded_and_unknown_required_items_refused() {
        let p = Path::new("t.vhdx");
        let region = Region {
            guid: Guid::ZERO,
            offset: 2 * MIB,
            length: MIB,
            required: true,
        };
        let ok = parse_table(
            p,
            &region,
            &table(&[
                (FILE_PARAMETERS, 65536, 8, 4),
                (Guid::from_fields(9, 9, 9, 9), 65544, 8, 0),
            ]),
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let outside = table(&[(FILE_PARAMETERS, MIB as u32 - 4, 8, 4)]);
        assert!(
            parse_table(p, &region, &outside)
                .unwrap_err()
                .message()
                .contains("outside")
        );
        let in_table = table(&[(FILE_PARAMETERS, 100, 8, 4)]);
        assert!(parse_table(p, &region, &in_table).is_err());
        let unknown = table(&[(Guid::from_fields(9, 9, 9, 9), 65536, 8, 4)]);
        assert_eq!(
            parse_table(p, &region, &unknown).unwrap_err().kind(),
            Kind::Unsupported
        );
        let user_unknown = table(&[(Guid::from_fields(9, 9, 9, 9), 65536, 8, 5)]);
        assert_eq!(
            parse_table(p, &region, &user_unknown).unwrap_err().kind(),
            Kind::Unsupported
        );
        let dup = table(&[
            (FILE_PARAMETERS, 65536, 8, 4),
            (FILE_PARAMETERS, 65544, 8, 4),
        ]);
        assert!(parse_table(p, &region, &dup).is_err());
        let mut many = table(&[]);
        many[10..12].copy_from_slice(&3000u16.to_le_bytes());
        assert!(parse_table(p, &region, &many).is_err());
    }
}
