//! The MBR and its extended chain, as Linux's msdos.c reads them.

use super::{PartType, Partition, Reader};
use crate::endian::le32;

const SIGNATURE_OFF: usize = 510;
const ENTRIES_OFF: usize = 446;
/// The protective entry of a GPT disk.
pub const GPT_PROTECTIVE: u8 = 0xEE;
/// Linux follows at most this many EBRs.
const MAX_EBRS: usize = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub boot: u8,
    pub kind: u8,
    /// First sector, relative to what the table says (disk, EBR or extended partition).
    pub start: u32,
    pub sectors: u32,
}

impl Entry {
    fn parse(b: &[u8]) -> Entry {
        Entry {
            boot: b[0],
            kind: b[4],
            start: le32(b, 8),
            sectors: le32(b, 12),
        }
    }

    pub fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0F | 0x85)
    }

    fn is_used(&self) -> bool {
        self.sectors != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mbr {
    pub entries: [Entry; 4],
    pub disk_id: u32,
}

impl Mbr {
    /// A sector ending in 55 AA whose four boot flags are 0 or 0x80 (a file system boot
    /// sector also ends in 55 AA, but holds code where the flags would be).
    pub fn parse(b: &[u8]) -> Option<Mbr> {
        if b.len() < 512 || b[SIGNATURE_OFF..SIGNATURE_OFF + 2] != [0x55, 0xAA] {
            return None;
        }
        let entries = parse_entries(b);
        if entries.iter().any(|e| e.boot != 0 && e.boot != 0x80) {
            return None;
        }
        Some(Mbr {
            entries,
            disk_id: le32(b, 440),
        })
    }

    /// Whether an entry says "GPT disk" (0xEE) at all.
    pub fn has_gpt_entry(&self) -> bool {
        self.entries.iter().any(|e| e.kind == GPT_PROTECTIVE)
    }

    /// A protective entry as Linux accepts it: type 0xEE starting at LBA 1.
    pub fn is_protective(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.kind == GPT_PROTECTIVE && e.start == 1)
    }

    /// A protective MBR that describes other partitions too.
    pub fn is_hybrid(&self) -> bool {
        self.is_protective()
            && self
                .entries
                .iter()
                .any(|e| e.kind != GPT_PROTECTIVE && e.kind != 0 && e.is_used())
    }
}

fn parse_entries(b: &[u8]) -> [Entry; 4] {
    let mut entries = [Entry::default(); 4];
    for (i, e) in entries.iter_mut().enumerate() {
        let off = ENTRIES_OFF + 16 * i;
        *e = Entry::parse(&b[off..off + 16]);
    }
    entries
}

/// Primaries by slot (1-4), then logical partitions from 5 along the extended chain of the
/// first extended entry. Offsets are checked later, against the disk.
pub fn partitions(
    r: &mut Reader<'_>,
    mbr: &Mbr,
    sector: u32,
    notes: &mut Vec<String>,
) -> Vec<Partition> {
    let ss = u64::from(sector);
    let mut out = Vec::new();
    let mut extended = None;
    for (slot, e) in mbr.entries.iter().enumerate() {
        if !e.is_used() {
            continue;
        }
        if e.is_extended() {
            if extended.is_none() {
                extended = Some(*e);
            } else {
                notes.push(format!(
                    "MBR entry {}: a second extended partition is ignored",
                    slot + 1
                ));
            }
            continue;
        }
        out.push(primary(slot as u32 + 1, e, ss));
    }
    if let Some(ext) = extended {
        logical(r, ext, ss, &mut out, notes);
    }
    out
}

fn primary(number: u32, e: &Entry, ss: u64) -> Partition {
    Partition {
        number,
        start: u64::from(e.start) * ss,
        size: u64::from(e.sectors) * ss,
        kind: PartType::Mbr(e.kind),
        name: String::new(),
        guid: None,
    }
}

/// Walks the EBR chain of extended partition `ext`, as Linux's parse_extended does: data
/// entries are relative to their EBR, the link to the next EBR relative to the extended
/// partition. Garbage in the third and fourth slots must lie inside the extended partition.
fn logical(
    r: &mut Reader<'_>,
    ext: Entry,
    ss: u64,
    out: &mut Vec<Partition>,
    notes: &mut Vec<String>,
) {
    let first = u64::from(ext.start) * ss;
    let first_size = u64::from(ext.sectors) * ss;
    let (mut this, mut this_size) = (first, first_size);
    let mut number = 5;
    let mut seen = Vec::new();
    loop {
        if seen.contains(&this) {
            notes.push(format!(
                "extended partition: the EBR chain loops back to byte {this}; stopped"
            ));
            return;
        }
        if seen.len() == MAX_EBRS {
            notes.push(format!(
                "extended partition: more than {MAX_EBRS} EBRs; stopped"
            ));
            return;
        }
        seen.push(this);
        let Some(b) = r.read(this, 512) else {
            notes.push(format!(
                "extended partition: EBR at byte {this} is outside the disk; stopped"
            ));
            return;
        };
        if b[SIGNATURE_OFF..SIGNATURE_OFF + 2] != [0x55, 0xAA] {
            // An EBR without a signature ends the chain (an empty extended partition).
            return;
        }
        let entries = parse_entries(&b);
        for (i, e) in entries.iter().enumerate() {
            if !e.is_used() || e.is_extended() {
                continue;
            }
            let offs = u64::from(e.start) * ss;
            let size = u64::from(e.sectors) * ss;
            let start = this + offs;
            if i >= 2
                && (offs + size > this_size || start < first || start + size > first + first_size)
            {
                continue;
            }
            if start < first || start + size > first + first_size {
                notes.push(format!(
                    "logical partition {number} (bytes {start}+{size}) lies outside its extended partition: skipped"
                ));
                number += 1;
                continue;
            }
            out.push(Partition {
                number,
                start,
                size,
                kind: PartType::Mbr(e.kind),
                name: String::new(),
                guid: None,
            });
            number += 1;
        }
        match entries.iter().find(|e| e.is_used() && e.is_extended()) {
            Some(next) => {
                this = first + u64::from(next.start) * ss;
                this_size = u64::from(next.sectors) * ss;
            }
            None => return,
        }
    }
}
