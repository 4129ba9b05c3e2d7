//! Sorted, disjoint byte ranges: the currency of changed-block tracking.

use std::ops::Range;

/// Appends `r`, merging it with the last range when it starts inside or right after it
/// (so appending in order keeps a list sorted and merged). Empty ranges are dropped.
pub fn push_range(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    if let Some(last) = out.last_mut()
        && (last.start..=last.end).contains(&r.start)
    {
        last.end = last.end.max(r.end);
        return;
    }
    out.push(r);
}

/// The union of any ranges, sorted and merged.
pub fn union(mut all: Vec<Range<u64>>) -> Vec<Range<u64>> {
    all.sort_unstable_by_key(|r| r.start);
    let mut out = Vec::with_capacity(all.len());
    for r in all {
        push_range(&mut out, r);
    }
    out
}

/// Total bytes of sorted, disjoint ranges.
pub fn total(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_overlapping_and_touching_ranges() {
        assert_eq!(
            union(vec![10..20, 0..5, 5..7, 15..30, 40..40, 31..32]),
            vec![0..7, 10..30, 31..32]
        );
        assert_eq!(union(vec![]), Vec::<Range<u64>>::new());
        assert_eq!(total(&[0..7, 10..30]), 27);
        // Appending out of order keeps both ranges (for `union` to sort).
        let mut v = Vec::new();
        push_range(&mut v, 50..60);
        push_range(&mut v, 40..58);
        assert_eq!(v, vec![50..60, 40..58]);
        assert_eq!(union(v), vec![40..60]);
    }
}
