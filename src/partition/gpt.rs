//! GPT: headers and entry arrays checked by CRC32, primary first, then the backup.

use super::{PartType, Partition, Reader};
use crate::endian::{le32, le64};
use uuid::Uuid;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const MIN_HEADER: u32 = 92;
/// Entry arrays larger than this are refused (a header claiming millions of entries).
const MAX_ENTRIES_BYTES: u64 = 4 << 20;

struct Header {
    lba: u64,
    alternate_lba: u64,
    disk_guid: Uuid,
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// The partitions of the first good header with a good entry array (primary, then backup),
/// with the disk GUID and whether the backup was used. None (and notes) when neither is good.
pub fn read(
    r: &mut Reader<'_>,
    sector: u32,
    notes: &mut Vec<String>,
) -> Option<(Uuid, bool, Vec<Partition>)> {
    let ss = u64::from(sector);
    let sectors = r.size / ss;
    if sectors < 3 {
        return None;
    }
    let last = sectors - 1;
    // The backup sits in the last sector; watch it even when nothing is there yet.
    r.watch(last * ss, ss);
    let primary = header(r, 1, ss, last);
    let primary_entries = primary.as_ref().ok().and_then(|h| {
        entries(r, h, ss, last)
            .map_err(|e| notes.push(format!("primary GPT: {e}")))
            .ok()
    });
    if let Err(e) = &primary {
        notes.push(format!(
            "primary GPT header at LBA 1 ({sector}-byte sectors): {e}"
        ));
    }
    let mut backup_at = vec![last];
    if let Ok(h) = &primary
        && h.alternate_lba != last
        && h.alternate_lba > 1
        && h.alternate_lba <= last
    {
        backup_at.insert(0, h.alternate_lba);
    }
    let mut backup = None;
    for lba in backup_at {
        r.watch(lba * ss, ss);
        match header(r, lba, ss, last) {
            Ok(h) => match entries(r, &h, ss, last) {
                Ok(e) => {
                    backup = Some((h, e));
                    break;
                }
                Err(e) => notes.push(format!("backup GPT at LBA {lba}: {e}")),
            },
            Err(e) => notes.push(format!("backup GPT header at LBA {lba}: {e}")),
        }
    }
    let (h, raw, from_backup) = match (primary, primary_entries, backup) {
        (Ok(h), Some(e), _) => (h, e, false),
        (_, _, Some((h, e))) => {
            notes.push(format!(
                "the primary GPT is damaged; using the backup at LBA {}",
                h.lba
            ));
            (h, e, true)
        }
        _ => return None,
    };
    if !from_backup && notes.iter().any(|n| n.starts_with("backup GPT")) {
        notes.push("the backup GPT is damaged; the primary is used".into());
    }
    Some((
        h.disk_guid,
        from_backup,
        partitions(&h, &raw, ss, last, notes),
    ))
}

/// A header at `lba` that passes every check Linux makes.
fn header(r: &mut Reader<'_>, lba: u64, ss: u64, last: u64) -> Result<Header, String> {
    let b = r
        .read(lba * ss, ss)
        .ok_or_else(|| "cannot be read".to_string())?;
    if &b[..8] != SIGNATURE {
        return Err("no EFI PART signature".into());
    }
    let size = le32(&b, 12);
    if size < MIN_HEADER || u64::from(size) > ss {
        return Err(format!("header size {size} is outside {MIN_HEADER}..={ss}"));
    }
    let stored = le32(&b, 16);
    let mut copy = b[..size as usize].to_vec();
    copy[16..20].fill(0);
    let crc = crc32fast::hash(&copy);
    if crc != stored {
        return Err(format!(
            "header CRC32 {stored:#010x} does not match {crc:#010x}"
        ));
    }
    let my_lba = le64(&b, 24);
    if my_lba != lba {
        return Err(format!("says it is at LBA {my_lba}"));
    }
    let (first_usable, last_usable) = (le64(&b, 40), le64(&b, 48));
    if first_usable > last_usable || last_usable > last {
        return Err(format!(
            "usable LBAs {first_usable}..={last_usable} do not fit a disk of {} sectors",
            last + 1
        ));
    }
    let entry_size = le32(&b, 84);
    if entry_size < 128 || !entry_size.is_power_of_two() || u64::from(entry_size) > ss.max(128) * 8
    {
        return Err(format!(
            "entry size {entry_size} is not 128 times a power of two"
        ));
    }
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&b[56..72]);
    Ok(Header {
        lba,
        alternate_lba: le64(&b, 32),
        disk_guid: Uuid::from_bytes_le(guid),
        entries_lba: le64(&b, 72),
        entries: le32(&b, 80),
        entry_size,
        entries_crc: le32(&b, 88),
    })
}

/// The entry array of `h`, CRC-checked.
fn entries(r: &mut Reader<'_>, h: &Header, ss: u64, last: u64) -> Result<Vec<u8>, String> {
    let len = u64::from(h.entries) * u64::from(h.entry_size);
    if len > MAX_ENTRIES_BYTES {
        return Err(format!(
            "{} entries of {} bytes are too many",
            h.entries, h.entry_size
        ));
    }
    let start = h
        .entries_lba
        .checked_mul(ss)
        .filter(|s| {
            h.entries_lba <= last && s.checked_add(len).is_some_and(|e| e <= (last + 1) * ss)
        })
        .ok_or_else(|| format!("entry array at LBA {} runs past the disk", h.entries_lba))?;
    let raw = r
        .read(start, len)
        .ok_or_else(|| format!("entry array at LBA {} cannot be read", h.entries_lba))?;
    let crc = crc32fast::hash(&raw);
    if crc != h.entries_crc {
        return Err(format!(
            "entry array CRC32 {:#010x} does not match {crc:#010x}",
            h.entries_crc
        ));
    }
    Ok(raw)
}

/// Used entries, numbered by index + 1 as Linux does (unused entries leave gaps).
fn partitions(
    h: &Header,
    raw: &[u8],
    ss: u64,
    last: u64,
    notes: &mut Vec<String>,
) -> Vec<Partition> {
    let mut out = Vec::new();
    for (i, e) in raw.chunks_exact(h.entry_size as usize).enumerate() {
        let mut kind = [0u8; 16];
        kind.copy_from_slice(&e[..16]);
        if kind == [0; 16] {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last_lba) = (le64(e, 32), le64(e, 40));
        if first > last_lba || last_lba > last {
            notes.push(format!(
                "GPT entry {number}: LBAs {first}..={last_lba} do not fit a disk of {} sectors: skipped",
                last + 1
            ));
            continue;
        }
        let mut unique = [0u8; 16];
        unique.copy_from_slice(&e[16..32]);
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|c| *c != 0)
            .collect();
        out.push(Partition {
            number,
            start: first * ss,
            size: (last_lba - first + 1) * ss,
            kind: PartType::Gpt(Uuid::from_bytes_le(kind)),
            name: String::from_utf16_lossy(&name),
            guid: Some(Uuid::from_bytes_le(unique)),
        });
    }
    out
}
