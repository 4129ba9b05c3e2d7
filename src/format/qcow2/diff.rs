//! Where two L1 tables of one qcow2 image (the live one and an internal snapshot's, or two
//! snapshots') map guest bytes differently, from the tables alone.
//!
//! An L2 table or data cluster referenced by both is never written in place (a shared
//! cluster is copied before a write), so an equal L2 offset means an equal L2 table and an
//! equal entry state means equal bytes. Entries are compared by what they mean (state and
//! host offset), so the COPIED flag, which only the active table keeps accurate, does not
//! count. An entry that does not decode counts as changed.

use super::Qcow2Image;
use super::entry::{self, Geometry};
use super::tables::{L2Ref, l2_table};
use crate::changes::ranges::push_range;
use crate::error::Result;
use std::ops::Range;

/// The guest ranges inside [off, end) where `old` and `new` (L1 tables of `img`) may differ,
/// sorted and merged, at (sub)cluster granularity.
pub fn changed_between(
    img: &Qcow2Image,
    old: &[u64],
    new: &[u64],
    off: u64,
    end: u64,
) -> Result<Vec<Range<u64>>> {
    let g = &img.geometry;
    let span_bits = g.l1_span_bits();
    let mut out = Vec::new();
    let mut l1_index = off >> span_bits;
    while let Some(span_start) = l1_index.checked_shl(span_bits)
        && span_start < end
    {
        let span_end = span_start.saturating_add(1 << span_bits).min(end);
        let from = span_start.max(off);
        let entry_of = |l1: &[u64]| {
            let e = usize::try_from(l1_index)
                .ok()
                .and_then(|i| l1.get(i).copied())
                .unwrap_or(0);
            entry::l2_offset(g, e)
        };
        match (entry_of(old), entry_of(new)) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(a), Ok(b)) => {
                let ta = a.map(|o| l2_table(img, o)).transpose()?;
                let tb = b.map(|o| l2_table(img, o)).transpose()?;
                compare_tables(g, ta.as_ref(), tb.as_ref(), from, span_end, &mut out);
            }
            // An L1 entry that does not decode: the whole span may differ.
            _ => push_range(&mut out, from..span_end),
        }
        l1_index += 1;
    }
    Ok(out)
}

/// Compares the entries of two L2 tables (None: all unallocated) for guest [from, to), which
/// lies inside one L2 table's span.
fn compare_tables(
    g: &Geometry,
    old: Option<&L2Ref>,
    new: Option<&L2Ref>,
    from: u64,
    to: u64,
    out: &mut Vec<Range<u64>>,
) {
    let cs = g.cluster_size();
    let entries_mask = (1u64 << g.l2_bits()) - 1;
    let entry_len = g.entry_len() as usize;
    let words = |t: Option<&L2Ref>, at: usize| match t {
        Some(t) => (t.word(at), if g.extended_l2 { t.word(at + 8) } else { 0 }),
        None => (0, 0),
    };
    let mut cluster = from / cs * cs;
    while cluster < to {
        let at = (((cluster >> g.cluster_bits) & entries_mask) as usize) * entry_len;
        let (a, b) = (words(old, at), words(new, at));
        let next = cluster.saturating_add(cs);
        if a != b {
            let units = if g.extended_l2 { entry::SUBCLUSTERS } else { 1 };
            let unit = cs / u64::from(units);
            for sub in 0..units {
                let state = |(desc, bitmap)| entry::decode(g, desc, bitmap, sub, cluster);
                let same = matches!((state(a), state(b)), (Ok(x), Ok(y)) if x == y);
                if !same {
                    let start = cluster + u64::from(sub) * unit;
                    push_range(out, start.max(from)..(start + unit).min(to));
                }
            }
        }
        cluster = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use entry::{OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};

    const G: Geometry = Geometry {
        cluster_bits: 16,
        version: 3,
        extended_l2: false,
        has_data_file: false,
    };

    fn table(words: &[(usize, u64)], entry_len: usize) -> L2Ref {
        let mut b = vec![0u8; 65536];
        for &(i, w) in words {
            b[i * entry_len..i * entry_len + 8].copy_from_slice(&w.to_be_bytes());
        }
        L2Ref::Cached(b.into())
    }

    fn diff(
        g: &Geometry,
        a: Option<&L2Ref>,
        b: Option<&L2Ref>,
        from: u64,
        to: u64,
    ) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        compare_tables(g, a, b, from, to, &mut out);
        out
    }

    #[test]
    fn entries_compare_by_meaning() {
        const C: u64 = 65536;
        let old = table(
            &[
                (0, OFLAG_COPIED | 0x50000),
                (1, OFLAG_ZERO | 0x70000),
                (2, 0x80000),
                (3, OFLAG_COMPRESSED | 0x90000),
                (5, 0x300200),
            ],
            8,
        );
        let new = table(
            &[
                (0, 0x50000),
                (1, OFLAG_ZERO),
                (2, 0x60000),
                (3, OFLAG_COMPRESSED | 0x90000),
                (4, OFLAG_ZERO),
                (5, 0x300400),
            ],
            8,
        );
        // COPIED and a preallocated zero cluster change nothing; a new host offset, a new
        // zero cluster and an undecodable (unaligned) entry do.
        assert_eq!(
            diff(&G, Some(&old), Some(&new), 0, 8 * C),
            vec![2 * C..3 * C, 4 * C..6 * C]
        );
        // Clipped to the asked range, which may start and end inside clusters.
        assert_eq!(
            diff(&G, Some(&old), Some(&new), 2 * C + 5, 4 * C + 7),
            vec![2 * C + 5..3 * C, 4 * C..4 * C + 7]
        );
        // A missing table is all unallocated.
        assert_eq!(diff(&G, None, Some(&new), 0, 8 * C), vec![0..6 * C]);
        assert!(diff(&G, None, None, 0, 8 * C).is_empty());
    }

    #[test]
    fn extended_entries_compare_per_subcluster() {
        let g = Geometry {
            extended_l2: true,
            ..G
        };
        let sub = 65536 / 32;
        let mut a = vec![0u8; 65536];
        let mut b = vec![0u8; 65536];
        a[0..8].copy_from_slice(&0x50000u64.to_be_bytes());
        b[0..8].copy_from_slice(&0x50000u64.to_be_bytes());
        // Subclusters 0 and 1 allocated before; 1 and 2 allocated after, 3 zero after.
        a[8..16].copy_from_slice(&0b011u64.to_be_bytes());
        b[8..16].copy_from_slice(&(0b110u64 | 0b1000 << 32).to_be_bytes());
        let (a, b) = (L2Ref::Cached(a.into()), L2Ref::Cached(b.into()));
        assert_eq!(
            diff(&g, Some(&a), Some(&b), 0, 65536),
            vec![0..sub, 2 * sub..4 * sub]
        );
    }
}
