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
        sn.id = c_string(take(pos, id_len, "id")?);
        pos += id_len;
        sn.name = c_string(take(pos, name_len, "name")?);
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
