//! Partition tables (MBR with its extended chain, GPT), read the way Linux reads them, so
//! that `pN.raw` is what `/dev/sdaN` would be.
//!
//! Pure: `scan` reads the disk only through the closure it is given and returns plain data,
//! including every byte range it read (a write there may change the table) and a note for
//! everything it skipped. Every byte is hostile: a damaged table yields no partitions and a
//! note, never an error or a panic, and every offset is checked against the disk.
//!
//! - Sector size: the one the image declares, else 512; a GPT found only at 4096-byte LBA 1
//!   makes it 4096.
//! - GPT (needs a protective or hybrid MBR, as in Linux): the primary header and its entry
//!   array are CRC32-checked, then the backup at the last LBA (or where the primary says);
//!   the first good pair wins. Partitions are numbered by entry index + 1.
//! - MBR: primaries 1-4 by slot; logical partitions from 5 along the extended chain (loop- and
//!   length-bounded). An extended container itself is not a partition (it only holds EBRs).
//!   A protective MBR whose GPT is damaged gives no partitions (Linux does the same).
//! - A partition past the end of the disk, or overlapping one with a lower number, is skipped.

mod gpt;
mod mbr;
#[cfg(test)]
mod tests;

use crate::error::Result;
use std::fmt;
use std::ops::Range;
use uuid::Uuid;

/// Most partitions reported for one disk (Linux's limit per disk).
pub const MAX_PARTITIONS: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// No partition table (or one too damaged to use).
    None,
    Mbr {
        /// The 32-bit disk signature at offset 440.
        disk_id: u32,
    },
    Gpt {
        disk_guid: Uuid,
        /// The backup header and entries were used because the primary ones are bad.
        from_backup: bool,
        /// The MBR also describes partitions (hybrid MBR); GPT wins, as in Linux.
        hybrid: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartType {
    /// An MBR system id (0x83 Linux, 0x07 NTFS/exFAT, ...).
    Mbr(u8),
    /// A GPT partition type GUID.
    Gpt(Uuid),
}

impl fmt::Display for PartType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartType::Mbr(id) => write!(f, "0x{id:02x}"),
            PartType::Gpt(g) => write!(f, "{g}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The number Linux gives it (`sdaN`).
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes (never 0).
    pub size: u64,
    pub kind: PartType,
    /// The GPT partition name ("" for MBR).
    pub name: String,
    /// The GPT unique partition GUID.
    pub guid: Option<Uuid>,
}

impl Partition {
    /// The file name it is shown under.
    pub fn file_name(&self) -> String {
        format!("p{}.raw", self.number)
    }

    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub scheme: Scheme,
    pub sector_size: u32,
    pub partitions: Vec<Partition>,
    /// What was skipped or repaired and why (for the log and --list).
    pub notes: Vec<String>,
    /// Byte ranges the scan read: writing one may change the table.
    pub watched: Vec<Range<u64>>,
}

/// Reads exactly `buf.len()` bytes at an offset inside the disk.
pub type ReadAt<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<()>;

/// Reads the partition table of a disk of `disk_size` bytes. `declared_sector` is the logical
/// sector size the image format states, if it states one. I/O errors end the scan with no
/// partitions and a note.
pub fn scan(read: ReadAt<'_>, disk_size: u64, declared_sector: Option<u32>) -> Table {
    let mut r = Reader::new(read, disk_size);
    let sector = declared_sector
        .filter(|s| matches!(s, 512 | 4096))
        .unwrap_or(512);
    let mut notes = Vec::new();
    if declared_sector.is_some_and(|s| s != 512 && s != 4096) {
        notes.push(format!(
            "declared sector size {} is not 512 or 4096; using 512",
            declared_sector.unwrap_or(0)
        ));
    }
    let (scheme, sector, parts) = read_table(&mut r, sector, declared_sector.is_some(), &mut notes);
    let partitions = check_bounds(parts, disk_size, &mut notes);
    notes.extend(r.take_errors());
    Table {
        scheme,
        sector_size: sector,
        partitions,
        notes,
        watched: r.watched,
    }
}

/// Which table the disk holds, in Linux's order: GPT behind a protective or hybrid MBR,
/// else a plain MBR.
fn read_table(
    r: &mut Reader<'_>,
    sector: u32,
    declared: bool,
    notes: &mut Vec<String>,
) -> (Scheme, u32, Vec<Partition>) {
    // LBA 1 is watched at both sector sizes: a GPT may appear at either.
    r.watch(0, 8192.min(r.size));
    let Some(mbr) = r.read(0, 512).and_then(|b| mbr::Mbr::parse(&b)) else {
        return (Scheme::None, sector, Vec::new());
    };
    if mbr.is_protective() {
        let hybrid = mbr.is_hybrid();
        let sizes: &[u32] = if declared { &[sector] } else { &[512, 4096] };
        let mut first_notes = None;
        for &ss in sizes {
            let mut tried = Vec::new();
            if let Some((disk_guid, from_backup, parts)) = gpt::read(r, ss, &mut tried) {
                notes.extend(tried);
                let scheme = Scheme::Gpt {
                    disk_guid,
                    from_backup,
                    hybrid,
                };
                return (scheme, ss, parts);
            }
            first_notes.get_or_insert(tried);
        }
        notes.extend(first_notes.unwrap_or_default());
        notes.push("protective MBR without a usable GPT: no partitions".into());
        return (Scheme::None, sector, Vec::new());
    }
    if mbr.has_gpt_entry() {
        notes.push("MBR has a GPT entry (0xEE) that does not start at LBA 1: no partitions".into());
        return (Scheme::None, sector, Vec::new());
    }
    let parts = mbr::partitions(r, &mbr, sector, notes);
    (
        Scheme::Mbr {
            disk_id: mbr.disk_id,
        },
        sector,
        parts,
    )
}

/// Drops partitions past the end of the disk or overlapping a lower-numbered one.
fn check_bounds(
    mut parts: Vec<Partition>,
    disk_size: u64,
    notes: &mut Vec<String>,
) -> Vec<Partition> {
    parts.sort_by_key(|p| p.number);
    let mut kept: Vec<Partition> = Vec::new();
    for p in parts {
        if p.start
            .checked_add(p.size)
            .is_none_or(|end| end > disk_size)
        {
            notes.push(format!(
                "partition {} (bytes {}+{}) runs past the end of the disk ({disk_size} bytes): skipped",
                p.number, p.start, p.size
            ));
            continue;
        }
        if let Some(other) = kept.iter().find(|k| k.start < p.end() && p.start < k.end()) {
            notes.push(format!(
                "partition {} (bytes {}+{}) overlaps partition {}: skipped",
                p.number, p.start, p.size, other.number
            ));
            continue;
        }
        if kept.len() == MAX_PARTITIONS {
            notes.push(format!(
                "more than {MAX_PARTITIONS} partitions: the rest are skipped"
            ));
            break;
        }
        kept.push(p);
    }
    kept
}

/// Bounds-checked reads that record what they read.
struct Reader<'a> {
    read: ReadAt<'a>,
    size: u64,
    watched: Vec<Range<u64>>,
    errors: Vec<String>,
    failed: bool,
}

impl<'a> Reader<'a> {
    fn new(read: ReadAt<'a>, size: u64) -> Reader<'a> {
        Reader {
            read,
            size,
            watched: Vec::new(),
            errors: Vec::new(),
            failed: false,
        }
    }

    fn watch(&mut self, off: u64, len: u64) {
        if len > 0 {
            self.watched.push(off..off.saturating_add(len));
        }
    }

    /// `len` bytes at `off`, or None when the range is outside the disk or the read fails.
    fn read(&mut self, off: u64, len: u64) -> Option<Vec<u8>> {
        let end = off.checked_add(len)?;
        if end > self.size || len > MAX_READ {
            return None;
        }
        self.watch(off, len);
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        match (self.read)(off, &mut buf) {
            Ok(()) => Some(buf),
            Err(e) => {
                self.failed = true;
                self.errors
                    .push(format!("cannot read the partition table at {off:#x}: {e}"));
                None
            }
        }
    }

    fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.errors)
    }
}

/// Largest single read (a GPT entry array): 16 MiB.
const MAX_READ: u64 = 16 << 20;
