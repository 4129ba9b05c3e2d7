//! The metadata log: finding the active sequence and replaying it into an in-memory overlay
//! (MS-VHDX 2.3). The image is never written.

use super::crc32c::crc32c_with_zeroed_field;
use super::guid::Guid;
use super::header::{Header, MIB};
use super::overlay::Overlay;
use crate::endian::{le32, le64};
use crate::error::{Error, Result};
use crate::storage::HostFile;
use std::collections::HashMap;
use std::fmt;

pub const SECTOR: u64 = 4096;
const ENTRY_HEADER: usize = 64;
const DESCRIPTOR: usize = 32;
/// Larger logs are refused (Hyper-V and QEMU use 1 MiB).
const MAX_LOG: u64 = 64 * MIB;
/// Entry validation reads at most this many times the log size (hostile logs with
/// overlapping candidate entries cannot make the scan quadratic).
const WORK_FACTOR: u64 = 8;

/// What the log held when the file was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogState {
    /// LogGuid is zero: nothing to replay.
    Clean,
    /// LogGuid is set but no valid sequence exists (treated as empty, as QEMU does).
    NoValidEntries,
    /// The active sequence was replayed in memory.
    Replayed {
        entries: usize,
        first_seq: u64,
        last_seq: u64,
        descriptors: usize,
    },
}

impl fmt::Display for LogState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogState::Clean => f.write_str("clean"),
            LogState::NoValidEntries => f.write_str("log GUID set, no valid entries"),
            LogState::Replayed {
                entries,
                first_seq,
                last_seq,
                descriptors,
            } => write!(
                f,
                "dirty: replayed {entries} entries (sequence {first_seq}..={last_seq}, {descriptors} descriptors) in memory"
            ),
        }
    }
}

/// A validated descriptor. Data sectors stay in the log buffer (`sector_pos`) until replay,
/// so that scanning a hostile log costs no more memory than the log itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Descriptor {
    Zero {
        offset: u64,
        length: u64,
    },
    Data {
        offset: u64,
        sector_pos: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
}

/// The 4 KiB a data descriptor writes: its leading bytes, the data sector's middle, its
/// trailing bytes.
pub fn data_sector(log: &[u8], sector_pos: u64, leading: &[u8; 8], trailing: &[u8; 4]) -> Vec<u8> {
    let p = sector_pos as usize;
    let mut sector = log
        .get(p..p + SECTOR as usize)
        .map_or_else(|| vec![0u8; SECTOR as usize], <[u8]>::to_vec);
    sector[0..8].copy_from_slice(leading);
    sector[4092..4096].copy_from_slice(trailing);
    sector
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub pos: u64,
    pub length: u64,
    pub tail: u64,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub descriptors: Vec<Descriptor>,
}

/// The replay result: the overlay, the state, and the size the replayed file must have.
pub struct Replay {
    pub overlay: Overlay,
    pub state: LogState,
    pub min_len: u64,
}

/// Reads the log named by `hdr` and replays its active sequence in memory.
pub fn replay(file: &HostFile, hdr: &Header) -> Result<Replay> {
    let clean = |state| {
        Ok(Replay {
            overlay: Overlay::default(),
            state,
            min_len: 0,
        })
    };
    if hdr.log_guid.is_zero() {
        return clean(LogState::Clean);
    }
    let path = file.path();
    let field = "log";
    if hdr.log_version != 0 {
        return Err(Error::unsupported(
            path,
            format!("log version {} with a log to replay", hdr.log_version),
        ));
    }
    if hdr.log_length == 0 {
        return clean(LogState::NoValidEntries);
    }
    let (off, len) = (hdr.log_offset, hdr.log_length as u64);
    if off < MIB || off % MIB != 0 || len % MIB != 0 {
        return Err(Error::corrupt(
            path,
            field,
            off,
            format!("log of {len} bytes at {off:#x} is not 1 MiB aligned"),
        ));
    }
    let log = file.read_table(off, len, MAX_LOG, field)?;
    let Some(active) = find_active(&log, hdr.log_guid) else {
        return clean(LogState::NoValidEntries);
    };
    let head = active.last().expect("an active sequence is never empty");
    if head.flushed_file_offset > file.len() {
        return Err(Error::corrupt(
            path,
            "log entry",
            off + head.pos,
            format!(
                "FlushedFileOffset {} is past the end of the file ({} bytes): the file was truncated",
                head.flushed_file_offset,
                file.len()
            ),
        ));
    }
    let mut overlay = Overlay::default();
    let mut descriptors = 0;
    for entry in &active {
        for d in &entry.descriptors {
            descriptors += 1;
            match d {
                Descriptor::Zero { offset, length } => overlay.write_zeros(*offset, *length),
                Descriptor::Data {
                    offset,
                    sector_pos,
                    leading,
                    trailing,
                } => overlay.write_data(*offset, data_sector(&log, *sector_pos, leading, trailing)),
            }
        }
    }
    let state = LogState::Replayed {
        entries: active.len(),
        first_seq: active[0].sequence,
        last_seq: head.sequence,
        descriptors,
    };
    Ok(Replay {
        overlay,
        state,
        min_len: head.last_file_offset,
    })
}

/// Finds the active sequence (MS-VHDX 2.3.3): scanning from each candidate tail, extend a
/// sequence while entries are valid and numbered consecutively; it is valid when its head's
/// tail lies inside it. Returns the entries from the tail to the head of the valid sequence
/// with the highest head sequence number.
pub fn find_active(log: &[u8], guid: Guid) -> Option<Vec<Entry>> {
    let n = log.len() as u64;
    if n == 0 || !n.is_multiple_of(SECTOR) {
        return None;
    }
    let mut scanner = Scanner {
        log,
        guid,
        memo: HashMap::new(),
        budget: n.saturating_mul(WORK_FACTOR),
    };
    let mut best: Option<Vec<Entry>> = None;
    let mut cur = 0u64;
    loop {
        let seq = scanner.sequence_from(cur);
        let tail_at = seq
            .last()
            .and_then(|head| seq.iter().position(|e| e.pos == head.tail));
        let next = match (tail_at, seq.last()) {
            (Some(t), Some(head)) => {
                if best
                    .as_ref()
                    .is_none_or(|b| b.last().is_none_or(|bh| head.sequence > bh.sequence))
                {
                    best = Some(seq[t..].to_vec());
                }
                (head.pos + head.length) % n
            }
            _ => cur + SECTOR,
        };
        if next >= n || next <= cur {
            break;
        }
        cur = next;
    }
    best
}

struct Scanner<'a> {
    log: &'a [u8],
    guid: Guid,
    memo: HashMap<u64, Option<Entry>>,
    budget: u64,
}

impl Scanner<'_> {
    fn sequence_from(&mut self, start: u64) -> Vec<Entry> {
        let n = self.log.len() as u64;
        let mut seq: Vec<Entry> = Vec::new();
        let (mut pos, mut covered) = (start, 0u64);
        while covered < n {
            let Some(e) = self.entry_at(pos) else { break };
            if seq
                .last()
                .is_some_and(|last| last.sequence.checked_add(1) != Some(e.sequence))
            {
                break;
            }
            covered += e.length;
            pos = (pos + e.length) % n;
            seq.push(e);
            if pos == start {
                break;
            }
        }
        seq
    }

    fn entry_at(&mut self, pos: u64) -> Option<Entry> {
        if let Some(e) = self.memo.get(&pos) {
            return e.clone();
        }
        let e = self.parse(pos);
        self.memo.insert(pos, e.clone());
        e
    }

    /// Copies `len` bytes of the circular log starting at `pos`.
    fn bytes(&self, pos: u64, len: u64) -> Vec<u8> {
        let n = self.log.len();
        let (pos, len) = (pos as usize, len as usize);
        let first = len.min(n - pos);
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&self.log[pos..pos + first]);
        out.extend_from_slice(&self.log[..len - first]);
        out
    }

    /// Validates the entry at `pos`: header fields, descriptor and data-sector signatures and
    /// sequence numbers, then the CRC-32C over the whole entry.
    fn parse(&mut self, pos: u64) -> Option<Entry> {
        let n = self.log.len() as u64;
        let h = self.bytes(pos, ENTRY_HEADER as u64);
        if &h[0..4] != b"loge" {
            return None;
        }
        let length = le32(&h, 8) as u64;
        let tail = le32(&h, 12) as u64;
        let sequence = le64(&h, 16);
        let count = le32(&h, 24) as u64;
        let valid_header = length >= SECTOR
            && length.is_multiple_of(SECTOR)
            && length <= n
            && tail.is_multiple_of(SECTOR)
            && tail < n
            && sequence != 0
            && Guid::from_slice(&h[32..48]) == self.guid;
        if !valid_header {
            return None;
        }
        let desc_sectors = (ENTRY_HEADER as u64 + count * DESCRIPTOR as u64).div_ceil(SECTOR);
        if desc_sectors > length / SECTOR || self.budget < length {
            return None;
        }
        self.budget -= length;
        let e = self.bytes(pos, length);
        let mut descriptors = Vec::with_capacity(count.min(1024) as usize);
        let mut next_data = desc_sectors;
        for i in 0..count as usize {
            let d = &e[ENTRY_HEADER + DESCRIPTOR * i..ENTRY_HEADER + DESCRIPTOR * (i + 1)];
            let offset = le64(d, 16);
            if le64(d, 24) != sequence || !offset.is_multiple_of(SECTOR) {
                return None;
            }
            match &d[0..4] {
                b"zero" => {
                    let length = le64(d, 8);
                    if !length.is_multiple_of(SECTOR) || offset.checked_add(length).is_none() {
                        return None;
                    }
                    descriptors.push(Descriptor::Zero { offset, length });
                }
                b"desc" => {
                    if next_data >= length / SECTOR || offset.checked_add(SECTOR).is_none() {
                        return None;
                    }
                    let s = &e[(next_data * SECTOR) as usize..((next_data + 1) * SECTOR) as usize];
                    let seq_ok = le32(s, 4) as u64 == sequence >> 32
                        && le32(s, 4092) as u64 == sequence & 0xFFFF_FFFF;
                    if &s[0..4] != b"data" || !seq_ok {
                        return None;
                    }
                    let mut leading = [0u8; 8];
                    leading.copy_from_slice(&d[8..16]);
                    let mut trailing = [0u8; 4];
                    trailing.copy_from_slice(&d[4..8]);
                    let sector_pos = (pos + next_data * SECTOR) % n;
                    descriptors.push(Descriptor::Data {
                        offset,
                        sector_pos,
                        leading,
                        trailing,
                    });
                    next_data += 1;
                }
                _ => return None,
            }
        }
        if le32(&e, 4) != crc32c_with_zeroed_field(&e, 4) {
            return None;
        }
        Some(Entry {
            pos,
            length,
            tail,
            sequence,
            flushed_file_offset: le64(&h, 48),
            last_file_offset: le64(&h, 56),
            descriptors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crc32c::crc32c;

    const GUID: Guid = Guid([9; 16]);

    /// Builds one entry: `zeros` (offset, length) and `datas` (offset, 4 KiB sector).
    fn entry(seq: u64, tail: u64, zeros: &[(u64, u64)], datas: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let count = zeros.len() + datas.len();
        let desc_sectors = (64 + 32 * count).div_ceil(4096);
        let mut e = vec![0u8; (desc_sectors + datas.len()) * 4096];
        let len = e.len() as u32;
        e[0..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
        e[16..24].copy_from_slice(&seq.to_le_bytes());
        e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
        e[32..48].copy_from_slice(&GUID.0);
        let mut d = 64;
        for (off, l) in zeros {
            e[d..d + 4].copy_from_slice(b"zero");
            e[d + 8..d + 16].copy_from_slice(&l.to_le_bytes());
            e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
            e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
            d += 32;
        }
        for (i, (off, sector)) in datas.iter().enumerate() {
            e[d..d + 4].copy_from_slice(b"desc");
            e[d + 4..d + 8].copy_from_slice(&sector[4092..]);
            e[d + 8..d + 16].copy_from_slice(&sector[..8]);
            e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
            e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
            d += 32;
            let s = (desc_sectors + i) * 4096;
            e[s..s + 4096].copy_from_slice(sector);
            e[s..s + 4].copy_from_slice(b"data");
            e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
            e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
        }
        let crc = crc32c(&e);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        e
    }

    fn place(log: &mut [u8], pos: usize, e: &[u8]) {
        for (i, b) in e.iter().enumerate() {
            let n = log.len();
            log[(pos + i) % n] = *b;
        }
    }

    #[test]
    fn picks_the_newest_complete_sequence_and_restores_split_bytes() {
        let mut log = vec![0u8; MIB as usize];
        let sector: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let e1 = entry(10, 0, &[(8 * MIB, 8192)], &[]);
        let e2 = entry(11, 0, &[], &[(3 * MIB, sector.clone())]);
        place(&mut log, 0, &e1);
        place(&mut log, e1.len(), &e2);
        // an older, unrelated sequence further on
        place(&mut log, 64 * 4096, &entry(5, 64 * 4096, &[(0, 4096)], &[]));
        let active = find_active(&log, GUID).unwrap();
        assert_eq!(
            active.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![10, 11]
        );
        let Descriptor::Data {
            offset,
            sector_pos,
            leading,
            trailing,
        } = &active[1].descriptors[0]
        else {
            panic!()
        };
        assert_eq!(*offset, 3 * MIB);
        assert_eq!(data_sector(&log, *sector_pos, leading, trailing), sector);
        assert_eq!(
            active[0].descriptors[0],
            Descriptor::Zero {
                offset: 8 * MIB,
                length: 8192
            }
        );
    }

    #[test]
    fn replays_only_from_the_heads_tail_and_handles_wrapping() {
        let mut log = vec![0u8; MIB as usize];
        let n = log.len();
        let a = entry(20, (n - 4096) as u64, &[(0, 4096)], &[]);
        let b = entry(21, (n - 4096) as u64, &[], &[(MIB, vec![3u8; 4096])]);
        place(&mut log, n - 4096, &a);
        place(&mut log, 0, &b); // b starts at 0 after a wraps exactly
        let active = find_active(&log, GUID).unwrap();
        assert_eq!(
            active.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![20, 21]
        );
        // an entry that wraps around the end of the log
        let mut log = vec![0u8; MIB as usize];
        let w = entry(7, (n - 4096) as u64, &[], &[(MIB, vec![1u8; 4096])]);
        place(&mut log, n - 4096, &w);
        let active = find_active(&log, GUID).unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].pos, (n - 4096) as u64);
    }

    #[test]
    fn rejects_damaged_or_foreign_entries() {
        let good = entry(3, 0, &[(0, 4096)], &[(MIB, vec![5u8; 4096])]);
        let check = |e: &[u8]| {
            let mut log = vec![0u8; MIB as usize];
            place(&mut log, 0, e);
            find_active(&log, GUID)
        };
        assert!(check(&good).is_some());
        let mut bad = good.clone();
        bad[5000] ^= 1; // payload byte: CRC mismatch
        assert!(check(&bad).is_none());
        let mut bad = good.clone();
        bad[4096..4100].copy_from_slice(b"xxxx"); // data sector signature
        assert!(check(&bad).is_none());
        let mut foreign = good.clone();
        foreign[32] ^= 1; // LogGuid differs
        assert!(check(&foreign).is_none());
        // a tail that points outside the sequence makes it invalid
        assert!(check(&entry(3, 8192, &[], &[])).is_none());
    }
}
