//! Dirty pages of metadata objects (refcount blocks, L2 tables, the L1 and refcount tables):
//! which page-sized pieces of which object changed in memory since they were last written.
//! Pages are 4 KiB (or the cluster, when smaller), the unit a host writes atomically in
//! practice, so a flush writes whole pages of a consistent in-memory copy.

use std::collections::BTreeMap;
use std::ops::Range;

/// The page a metadata write is split into.
pub const PAGE: u64 = 4096;

#[derive(Debug, Default)]
pub struct DirtyPages {
    page: u64,
    /// Object (host offset) -> bitmap of its dirty pages.
    objects: BTreeMap<u64, Vec<u64>>,
    pages: u64,
}

impl DirtyPages {
    /// Pages of `page` bytes (a power of two).
    pub fn new(page: u64) -> DirtyPages {
        DirtyPages {
            page: page.max(1),
            ..DirtyPages::default()
        }
    }

    /// Marks bytes [at, at+len) of the object at `obj` dirty.
    pub fn mark(&mut self, obj: u64, at: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (at / self.page, (at + len - 1) / self.page);
        let bits = self.objects.entry(obj).or_default();
        for p in first..=last {
            let (w, b) = ((p / 64) as usize, p % 64);
            if bits.len() <= w {
                bits.resize(w + 1, 0);
            }
            if bits[w] >> b & 1 == 0 {
                bits[w] |= 1 << b;
                self.pages += 1;
            }
        }
    }

    pub fn page(&self) -> u64 {
        self.page
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Bytes the dirty pages cover.
    pub fn bytes(&self) -> u64 {
        self.pages * self.page
    }

    /// Objects with dirty pages.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn contains(&self, obj: u64) -> bool {
        self.objects.contains_key(&obj)
    }

    /// Forgets an object (it was freed, or rewritten whole).
    pub fn remove(&mut self, obj: u64) {
        if let Some(bits) = self.objects.remove(&obj) {
            self.pages -= bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
    }

    /// Takes every dirty object with its dirty byte ranges (runs of adjacent pages merged,
    /// clipped to `len` bytes of the object), leaving the set clean.
    pub fn take(&mut self, len: u64) -> Vec<(u64, Vec<Range<u64>>)> {
        self.pages = 0;
        std::mem::take(&mut self.objects)
            .into_iter()
            .map(|(obj, bits)| (obj, runs(&bits, self.page, len)))
            .collect()
    }
}

/// Byte ranges of the set bits' pages, adjacent pages merged, clipped to `len`.
fn runs(bits: &[u64], page: u64, len: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (w, &word) in bits.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let b = u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            let start = (w as u64 * 64 + b) * page;
            if start >= len {
                return out;
            }
            let end = (start + page).min(len);
            match out.last_mut() {
                Some(r) if r.end == start => r.end = end,
                _ => out.push(start..end),
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn marks_merge_into_page_runs_and_take_cleans() {
        let mut d = DirtyPages::new(PAGE);
        assert!(d.is_empty());
        d.mark(0x10000, 8, 8);
        d.mark(0x10000, 4090, 16); // straddles pages 0 and 1
        d.mark(0x10000, 3 * PAGE, 1);
        d.mark(0x10000, 64 * PAGE + 5, 1); // second bitmap word
        d.mark(0x20000, 0, 0); // empty: nothing
        d.mark(0x30000, 100, 8);
        assert_eq!(d.bytes(), 5 * PAGE);
        assert!(d.contains(0x10000) && !d.contains(0x20000));
        let got = d.take(1 << 20);
        assert_eq!(
            got,
            vec![
                (
                    0x10000,
                    vec![0..2 * PAGE, 3 * PAGE..4 * PAGE, 64 * PAGE..65 * PAGE]
                ),
                (0x30000, vec![0..PAGE]),
            ]
        );
        assert!(d.is_empty());
        assert_eq!(d.bytes(), 0);
    }

    #[test]
    fn runs_are_clipped_to_the_object_and_small_pages_work() {
        let mut d = DirtyPages::new(512);
        d.mark(0, 0, 2000);
        assert_eq!(d.bytes(), 4 * 512);
        assert_eq!(d.take(1500), vec![(0, vec![0..1500])]);
        d.mark(7, 600, 1);
        d.mark(9, 0, 1);
        d.remove(7);
        assert_eq!(d.bytes(), 512);
        assert_eq!(d.take(512), vec![(9, vec![0..512])]);
    }
}
