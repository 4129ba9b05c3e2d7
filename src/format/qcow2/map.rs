//! Guest-to-host translation of one qcow2 L1 (the live one or a snapshot's): walks L1/L2
//! entries from `off` and merges runs that stay in one state (contiguous host data, zeros,
//! unallocated) into one long extent.

use super::Qcow2Image;
use super::entry::{self, Cluster};
use super::header::Compression;
use super::tables::{L2Ref, l2_table};
use crate::error::{Error, Result};
use crate::format::{Codec, Extent, MAX_ENTRIES_PER_MAP, Mapping};

/// One translated unit (a cluster, a subcluster or an unallocated L2 range).
#[derive(Clone, Copy, Debug)]
enum State {
    Unallocated,
    Zero,
    /// Host offset of the unit's first requested byte.
    Data(u64),
    Compressed {
        offset: u64,
        stored_len: u64,
        skip: u64,
    },
}

struct Walker<'a> {
    img: &'a Qcow2Image,
    l1: &'a [u64],
    l1_offset: u64,
    /// The last L2 table used, so a run inside one table costs one cache lookup.
    l2: Option<(u64, L2Ref)>,
    /// L2 entries looked at so far in this call (see MAX_ENTRIES_PER_MAP).
    work: u32,
}

/// Maps [off, off+len) of the layer whose L1 is `l1` (stored at `l1_offset`).
pub fn map(img: &Qcow2Image, l1: &[u64], l1_offset: u64, off: u64, len: u64) -> Result<Extent> {
    let end = off
        .checked_add(len)
        .ok_or_else(|| Error::invalid(format!("range {off:#x}+{len} overflows")))?;
    let mut w = Walker {
        img,
        l1,
        l1_offset,
        l2: None,
        work: 0,
    };
    let (first, n) = w.unit(off, end)?;
    if let State::Compressed {
        offset,
        stored_len,
        skip,
    } = first
    {
        let codec = match img.header.compression {
            Compression::Zlib => Codec::Deflate,
            Compression::Zstd => Codec::Zstd,
        };
        let map = Mapping::Compressed {
            file: img.file.clone(),
            host_off: offset,
            stored_len,
            codec,
            cluster_len: img.geometry.cluster_size(),
            skip,
        };
        return Ok(Extent { len: n, map });
    }
    let mut pos = off + n;
    // Bounded work per call: a longer run is answered in pieces.
    while pos < end && w.work < MAX_ENTRIES_PER_MAP {
        // A bad entry after the first unit ends the run; it is reported when it is asked for.
        let Ok((next, n)) = w.unit(pos, end) else {
            break;
        };
        let continues = match (first, next) {
            (State::Unallocated, State::Unallocated) | (State::Zero, State::Zero) => true,
            (State::Data(h0), State::Data(h)) => h0.checked_add(pos - off) == Some(h),
            _ => false,
        };
        if !continues {
            break;
        }
        pos += n;
    }
    let map = match first {
        State::Unallocated => Mapping::Unallocated,
        State::Zero => Mapping::Zero,
        State::Data(host_off) => Mapping::Data {
            file: img.data_file().clone(),
            host_off,
        },
        State::Compressed { .. } => return Err(Error::invalid("internal: compressed run merged")),
    };
    Ok(Extent {
        len: pos - off,
        map,
    })
}

impl Walker<'_> {
    /// The state at `pos` and how many bytes from `pos` (up to `end`) share it.
    fn unit(&mut self, pos: u64, end: u64) -> Result<(State, u64)> {
        self.work += 1;
        let img = self.img;
        let g = &img.geometry;
        let l1_index = pos >> g.l1_span_bits();
        let Some(&l1_entry) = self.l1.get(l1_index as usize) else {
            // Past the L1 table: everything from here is unallocated.
            return Ok((State::Unallocated, end - pos));
        };
        let span_end = (l1_index + 1).saturating_mul(1 << g.l1_span_bits());
        let l1e_off = self.l1_offset.saturating_add(l1_index * 8);
        let l2_off = entry::l2_offset(g, l1_entry)
            .map_err(|w| Error::corrupt(img.file.path(), "L1 entry", l1e_off, w))?;
        let Some(l2_off) = l2_off else {
            // Following L1 entries without a table are unallocated too: one unit for the
            // whole run, so an empty disk of any size costs one pass over its L1 in memory.
            let mut run_end = span_end;
            for &next in &self.l1[l1_index as usize + 1..] {
                if run_end >= end || !matches!(entry::l2_offset(g, next), Ok(None)) {
                    break;
                }
                run_end = run_end.saturating_add(1 << g.l1_span_bits());
            }
            return Ok((State::Unallocated, run_end.min(end) - pos));
        };
        let table = self.l2_table(l2_off)?;
        let cs = g.cluster_size();
        let guest_cluster = pos & !(cs - 1);
        let index = (pos >> g.cluster_bits) & ((1 << g.l2_bits()) - 1);
        let entry_off = (index * g.entry_len()) as usize;
        let word = table.word(entry_off);
        let bitmap = if g.extended_l2 {
            table.word(entry_off + 8)
        } else {
            0
        };
        if word == 0 && bitmap == 0 {
            // An empty entry: the following empty entries of this table are one unit with it.
            let entries = 1u64 << g.l2_bits();
            let mut run_end = guest_cluster.saturating_add(cs);
            let mut i = index + 1;
            while i < entries && run_end < end && self.work < MAX_ENTRIES_PER_MAP {
                self.work += 1;
                let at = (i * g.entry_len()) as usize;
                if table.word(at) != 0 || (g.extended_l2 && table.word(at + 8) != 0) {
                    break;
                }
                run_end = run_end.saturating_add(cs);
                i += 1;
            }
            return Ok((State::Unallocated, run_end.min(end) - pos));
        }
        let sub_bits = g.subcluster_bits();
        let sub = ((pos & (cs - 1)) >> sub_bits) as u32;
        let field_off = l2_off + entry_off as u64;
        let state = entry::decode(g, word, bitmap, sub, guest_cluster)
            .map_err(|w| Error::corrupt(img.file.path(), "L2 entry", field_off, w))?;
        let cluster_end = guest_cluster + cs;
        let unit_end = match state {
            Cluster::Compressed { .. } => cluster_end,
            _ => (pos | ((1 << sub_bits) - 1)) + 1,
        };
        let n = unit_end.min(end) - pos;
        let state = match state {
            Cluster::Unallocated => State::Unallocated,
            Cluster::Zero => State::Zero,
            Cluster::Normal { host } => {
                let data = img.data_file();
                if host >= data.len() {
                    return Err(Error::corrupt(
                        img.file.path(),
                        "L2 entry",
                        field_off,
                        format!(
                            "cluster offset {host:#x} is past the end of {} ({} bytes)",
                            data.path().display(),
                            data.len()
                        ),
                    ));
                }
                State::Data(host + (pos - guest_cluster))
            }
            Cluster::Compressed { offset, stored_len } => {
                if offset >= img.file.len() {
                    return Err(Error::corrupt(
                        img.file.path(),
                        "L2 entry",
                        field_off,
                        format!(
                            "compressed cluster at {offset:#x} is past the end of the file ({} bytes)",
                            img.file.len()
                        ),
                    ));
                }
                State::Compressed {
                    offset,
                    stored_len,
                    skip: pos - guest_cluster,
                }
            }
        };
        Ok((state, n))
    }

    fn l2_table(&mut self, l2_off: u64) -> Result<L2Ref> {
        if let Some((o, t)) = &self.l2
            && *o == l2_off
        {
            return Ok(t.clone());
        }
        let t = l2_table(self.img, l2_off)?;
        self.l2 = Some((l2_off, t.clone()));
        Ok(t)
    }
}
