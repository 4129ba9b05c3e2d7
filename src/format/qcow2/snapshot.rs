//! The internal snapshot table: variable-length entries, each 8-byte aligned
//! (QEMU `qcow2_do_read_snapshots`).

use super::header::c_string;
use crate::endian::{be16, be32, be64};
use crate::error::{Error, Result};
use std::path::Path;

/// QEMU's limits: snapshot count, extra data per entry, and the whole table.
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_EXTRA_DATA: u32 = 1024;
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
const FIXED_LEN: usize = 40;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Where the entry starts in the file (for error messages and rewrites).
    pub entry_offset: u64,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// The 64-bit size from the extra data when present, else the 32-bit field.
    pub vm_state_size: u64,
    /// The guest size when the snapshot was taken; `None` in old entries (QEMU then uses
    /// the image's current size).
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
    /// The raw extra data (unknown trailing fields must survive a rewrite).
    pub extra: Vec<u8>,
    /// The raw id and name bytes as stored (a rewrite keeps them byte for byte).
    pub raw_id: Vec<u8>,
    pub raw_name: Vec<u8>,
    /// The 32-bit VM state size field as stored.
    pub raw_vm_state_size: u32,
}

impl Snapshot {
    /// A new entry as `qemu-img snapshot -c` writes it: no VM state, 24 bytes of extra data
    /// (64-bit VM state size 0, the disk size, icount -1).
    pub fn new_entry(
        id: &str,
        name: &str,
        l1_table_offset: u64,
        l1_size: u32,
        disk_size: u64,
        date: std::time::Duration,
    ) -> Snapshot {
        let mut extra = 0u64.to_be_bytes().to_vec();
        extra.extend(disk_size.to_be_bytes());
        extra.extend(u64::MAX.to_be_bytes());
        Snapshot {
            entry_offset: 0,
            l1_table_offset,
            l1_size,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: u32::try_from(date.as_secs()).unwrap_or(u32::MAX),
            date_nsec: date.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(disk_size),
            icount: None,
            extra,
            raw_id: id.as_bytes().to_vec(),
            raw_name: name.as_bytes().to_vec(),
            raw_vm_state_size: 0,
        }
    }

    /// The same entry under another name.
    pub fn renamed(&self, name: &str) -> Snapshot {
        Snapshot {
            name: name.to_string(),
            raw_name: name.as_bytes().to_vec(),
            ..self.clone()
        }
    }

    /// The entry's bytes in the table, padded to 8 bytes (QEMU `qcow2_write_snapshots`).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FIXED_LEN + self.extra.len() + 64);
        v.extend(self.l1_table_offset.to_be_bytes());
        v.extend(self.l1_size.to_be_bytes());
        v.extend((self.raw_id.len() as u16).to_be_bytes());
        v.extend((self.raw_name.len() as u16).to_be_bytes());
        v.extend(self.date_sec.to_be_bytes());
        v.extend(self.date_nsec.to_be_bytes());
        v.extend(self.vm_clock_nsec.to_be_bytes());
        v.extend(self.raw_vm_state_size.to_be_bytes());
        v.extend((self.extra.len() as u32).to_be_bytes());
        v.extend(&self.extra);
        v.extend(&self.raw_id);
        v.extend(&self.raw_name);
        v.resize(v.len().next_multiple_of(8), 0);
        v
    }
}

/// The whole table: entries back to back, each 8-byte aligned.
pub fn encode_table(entries: &[Snapshot]) -> Vec<u8> {
    entries.iter().flat_map(Snapshot::encode).collect()
}

/// Bytes the parsed table occupies in the file (from its first entry to the end of the last).
pub fn table_len(entries: &[Snapshot], table_off: u64) -> u64 {
    entries.last().map_or(0, |s| {
        (s.entry_offset - table_off) + s.encode().len() as u64
    })
}

/// The id QEMU gives a new snapshot: one more than the largest numeric id.
pub fn next_id(entries: &[Snapshot]) -> String {
    let max = entries
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// Parses `count` entries from `buf`, the file's bytes from `table_off` (at most
/// `MAX_TABLE_BYTES`; shorter when the file ends first, given by `file_ends`).
pub fn parse_table(
    buf: &[u8],
    table_off: u64,
    count: u32,
    file_ends: bool,
    file: &Path,
) -> Result<Vec<Snapshot>> {
    if count > MAX_SNAPSHOTS {
        return Err(Error::corrupt(
            file,
            "nb_snapshots",
            60,
            format!("{count} exceeds the limit of {MAX_SNAPSHOTS}"),
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut pos = 0usize;
    for index in 0..count {
        pos = pos.next_multiple_of(8);
        let entry_offset = table_off + pos as u64;
        let take = |pos: usize, len: usize, what: &str| -> Result<&[u8]> {
            match pos.checked_add(len).and_then(|end| buf.get(pos..end)) {
                Some(s) => Ok(s),
                None => Err(Error::corrupt(
                    file,
                    &format!("snapshot table entry {index} {what}"),
                    entry_offset,
                    if file_ends {
                        "runs past the end of the file".to_string()
                    } else {
                        format!("the snapshot table exceeds {MAX_TABLE_BYTES} bytes")
                    },
                )),
            }
        };
        let h = take(pos, FIXED_LEN, "header")?;
        let extra_len = be32(h, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(Error::corrupt(
                file,
                &format!("snapshot table entry {index} extra_data_size"),
                entry_offset,
                format!("{extra_len} bytes exceed the limit of {MAX_EXTRA_DATA}"),
            ));
        }
        let (id_len, name_len) = (be16(h, 12) as usize, be16(h, 14) as usize);
        let mut sn = Snapshot {
            entry_offset,
            l1_table_offset: be64(h, 0),
            l1_size: be32(h, 8),
            id: String::new(),
            name: String::new(),
            date_sec: be32(h, 16),
            date_nsec: be32(h, 20),
            vm_clock_nsec: be64(h, 24),
            vm_state_size: u64::from(be32(h, 32)),
            disk_size: None,
            icount: None,
            extra: Vec::new(),
            raw_id: Vec::new(),
            raw_name: Vec::new(),
            raw_vm_state_size: be32(h, 32),
        };
        pos += FIXED_LEN;
        let extra = take(pos, extra_len as usize, "extra data")?;
        if extra.len() >= 8 {
            sn.vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            let size = be64(extra, 8);
            if size > i64::MAX as u64 {
                return Err(Error::corrupt(
                    file,
                    &format!("snapshot table entry {index} disk_size"),
                    entry_offset,
                    format!("{size} bytes is beyond any disk"),
                ));
            }
            sn.disk_size = Some(size);
        }
        if extra.len() >= 24 {
            sn.icount = Some(be64(extra, 16)).filter(|&c| c != u64::MAX);
        }
        sn.extra = extra.to_vec();
        pos += extra.len();
        // Ids and names are not NUL-terminated; a NUL inside ends them as in QEMU's C strings.
        sn.raw_id = take(pos, id_len, "id")?.to_vec();
        sn.id = c_string(&sn.raw_id);
        pos += id_len;
        sn.raw_name = take(pos, name_len, "name")?.to_vec();
        sn.name = c_string(&sn.raw_name);
        pos += name_len;
        out.push(sn);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn entry(l1: u64, l1_size: u32, id: &str, name: &str, extra: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(l1.to_be_bytes());
        v.extend(l1_size.to_be_bytes());
        v.extend((id.len() as u16).to_be_bytes());
        v.extend((name.len() as u16).to_be_bytes());
        v.extend(1_700_000_000u32.to_be_bytes());
        v.extend(5u32.to_be_bytes());
        v.extend(77u64.to_be_bytes());
        v.extend(9u32.to_be_bytes());
        v.extend((extra.len() as u32).to_be_bytes());
        v.extend(extra);
        v.extend(id.as_bytes());
        v.extend(name.as_bytes());
        while !v.len().is_multiple_of(8) {
            v.push(0);
        }
        v
    }

    fn extra(vm_state: u64, disk: u64) -> Vec<u8> {
        let mut e = vm_state.to_be_bytes().to_vec();
        e.extend(disk.to_be_bytes());
        e.extend(u64::MAX.to_be_bytes());
        e
    }

    #[test]
    fn parses_entries_with_and_without_extra_data() {
        let mut t = entry(0x50000, 8, "1", "before upgrade", &extra(0, 64 << 20));
        t.extend(entry(0x60000, 2, "2", "s1", &[]));
        let p = Path::new("s.qcow2");
        let s = parse_table(&t, 0x10000, 2, true, p).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].id.as_str(), s[0].name.as_str()),
            ("1", "before upgrade")
        );
        assert_eq!((s[0].l1_table_offset, s[0].l1_size), (0x50000, 8));
        assert_eq!(s[0].disk_size, Some(64 << 20));
        assert_eq!(s[0].icount, None);
        assert_eq!(
            (s[0].date_sec, s[0].date_nsec, s[0].vm_clock_nsec),
            (1_700_000_000, 5, 77)
        );
        assert_eq!(s[1].disk_size, None);
        assert_eq!(s[1].vm_state_size, 9);
        assert_eq!(
            s[1].entry_offset,
            0x10000 + (40 + 24 + 1 + 14usize).next_multiple_of(8) as u64
        );
    }

    #[test]
    fn entries_encode_back_to_what_was_parsed() {
        let mut t = entry(0x50000, 8, "1", "before upgrade", &extra(0, 64 << 20));
        t.extend(entry(0x60000, 2, "12", "s\0x", &[]));
        let p = Path::new("s.qcow2");
        let s = parse_table(&t, 0x10000, 2, true, p).unwrap();
        assert_eq!(encode_table(&s), t);
        assert_eq!(table_len(&s, 0x10000), t.len() as u64);
        assert_eq!(s[1].name, "s");
        assert_eq!(next_id(&s), "13");
        let n = Snapshot::new_entry(
            "13",
            "new",
            0x70000,
            8,
            1 << 30,
            std::time::Duration::new(5, 6),
        );
        let mut all = s.clone();
        all.push(n.renamed("other"));
        let back = parse_table(&encode_table(&all), 0, 3, true, p).unwrap();
        assert_eq!(back[2].name, "other");
        assert_eq!((back[2].date_sec, back[2].date_nsec), (5, 6));
        assert_eq!((back[2].disk_size, back[2].icount), (Some(1 << 30), None));
        assert_eq!((back[2].l1_table_offset, back[2].l1_size), (0x70000, 8));
    }

    #[test]
    fn refuses_hostile_tables() {
        let p = Path::new("s.qcow2");
        let t = entry(0x50000, 8, "1", "x", &[]);
        let e = parse_table(&t, 0, 2, true, p).unwrap_err();
        assert!(
            e.to_string().contains("entry 1 header") && e.to_string().contains("end of the file"),
            "{e}"
        );
        let e = parse_table(&t[..41], 0, 1, false, p).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        let mut big = t.clone();
        big[36..40].copy_from_slice(&2000u32.to_be_bytes());
        assert!(
            parse_table(&big, 0, 1, true, p)
                .unwrap_err()
                .to_string()
                .contains("extra_data_size")
        );
        assert!(parse_table(&t, 0, MAX_SNAPSHOTS + 1, true, p).is_err());
    }
}
