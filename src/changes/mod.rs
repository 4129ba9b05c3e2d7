//! Changed blocks: where one view of a chain may differ from another, found from metadata
//! alone, never by comparing data.
//!
//! Two views of one chain share their bottom layers. Above the shared part, every byte a
//! layer of either side maps (data, zeros or compressed) may differ; where none of them
//! maps anything both read the shared layers, so nothing differs. When the lowest unshared
//! layer of each side is a table of the same qcow2 file (the live image and an internal
//! snapshot of it), the two are compared entry by entry instead. Past the end of either
//! view or of any unshared layer (which cuts off what lies below it) everything may differ.
//! The answer never misses a changed byte and over-reports only at the granularity of the
//! layers' tables (a cluster or subcluster).
//!
//! A QEMU dirty bitmap is another source of changes: its set bits, at its granularity.

pub mod file;
pub mod ranges;
pub mod records;

use crate::error::{Error, Kind, Result};
use crate::format::qcow2::bitmap::Bits;
use crate::format::{Layer, Mapping};
use std::ops::Range;
use std::sync::Arc;

/// Windows in which seeks look for the next change: small first, so a change near the
/// offset is found cheaply, growing so a long unchanged stretch costs few passes.
const FIRST_WINDOW: u64 = 64 << 20;
const MAX_WINDOW: u64 = 64 << 30;

/// The changes from an old view to a new one (of the same chain), or those a dirty bitmap
/// recorded.
#[derive(Clone)]
pub struct Changes {
    source: Source,
    /// The new view's size: every range lies below it.
    size: u64,
}

#[derive(Clone)]
enum Source {
    Views {
        /// Layers only the old / only the new view has, above the shared ones.
        old_only: Vec<Arc<dyn Layer>>,
        new_only: Vec<Arc<dyn Layer>>,
        /// (old, new): two tables of one qcow2 file, right above the shared layers.
        pair: Option<(Arc<dyn Layer>, Arc<dyn Layer>)>,
        /// From here on everything may differ.
        cutoff: u64,
    },
    Bitmap(Arc<Bits>),
}

impl Changes {
    /// The changes from the view of `old` layers (top first, `old_size` bytes) to the view of
    /// `new` layers. Layers count as shared when they are the same object.
    pub fn between(
        old: &[Arc<dyn Layer>],
        old_size: u64,
        new: &[Arc<dyn Layer>],
        new_size: u64,
    ) -> Changes {
        let shared = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take_while(|(a, b)| std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)))
            .count();
        let mut old_only = old[..old.len() - shared].to_vec();
        let mut new_only = new[..new.len() - shared].to_vec();
        let cutoff = old_only
            .iter()
            .chain(&new_only)
            .map(|l| l.virtual_size())
            .fold(old_size.min(new_size), u64::min);
        // An empty range costs nothing and says whether the two tables can be compared.
        let paired = matches!(
            (old_only.last(), new_only.last()),
            (Some(a), Some(b)) if b.changed_since(&**a, 0, 0).is_some()
        );
        let pair = if paired {
            old_only.pop().zip(new_only.pop())
        } else {
            None
        };
        Changes {
            source: Source::Views {
                old_only,
                new_only,
                pair,
                cutoff,
            },
            size: new_size,
        }
    }

    /// The changes a dirty bitmap of a `size`-byte disk recorded (it may still be recording).
    pub fn from_bitmap(bits: Arc<Bits>, size: u64) -> Changes {
        Changes {
            source: Source::Bitmap(bits),
            size,
        }
    }

    /// The size of the new view.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The changed ranges inside [off, end), clipped to it, sorted and merged.
    pub fn ranges(&self, off: u64, end: u64) -> Result<Vec<Range<u64>>> {
        let mut unlimited = u32::MAX;
        Ok(self.ranges_within(off, end, &mut unlimited)?.0)
    }

    /// `ranges`, looking at no more than `budget` layer translations: the ranges below the
    /// offset returned with them, which is `end` unless the budget ran out first.
    fn ranges_within(
        &self,
        off: u64,
        end: u64,
        budget: &mut u32,
    ) -> Result<(Vec<Range<u64>>, u64)> {
        let end = end.min(self.size);
        if off >= end {
            return Ok((Vec::new(), end));
        }
        let (old_only, new_only, pair, cutoff) = match &self.source {
            Source::Bitmap(bits) => return Ok((bits.ranges(off, end), end)),
            Source::Views {
                old_only,
                new_only,
                pair,
                cutoff,
            } => (old_only, new_only, pair, *cutoff),
        };
        let mut below_cutoff = end.min(cutoff);
        let mut all = Vec::new();
        for layer in old_only.iter().chain(new_only) {
            below_cutoff = mapped(&**layer, off, below_cutoff, &mut all, budget)?;
        }
        let covered = if below_cutoff < end.min(cutoff) {
            below_cutoff
        } else {
            end
        };
        if let Some((old, new)) = pair
            && off < below_cutoff
        {
            match new.changed_since(&**old, off, below_cutoff) {
                Some(r) => all.extend(r?),
                None => all.push(off..below_cutoff),
            }
        }
        if covered == end {
            all.push(cutoff.max(off)..end);
        }
        let mut all = ranges::union(all);
        // What a layer looked at past where another one stopped is not the whole answer.
        all.retain_mut(|r| {
            r.end = r.end.min(covered);
            r.start < r.end
        });
        Ok((all, covered))
    }

    /// Every changed range of the new view.
    pub fn all(&self) -> Result<Vec<Range<u64>>> {
        self.ranges(0, self.size)
    }

    /// The first changed offset at or after `off`, if any. Where the seek budget runs out,
    /// the rest counts as changed (it then reads as the live bytes: never a wrong answer).
    pub fn next_changed(&self, off: u64) -> Result<Option<u64>> {
        let mut budget = SEEK_BUDGET;
        let mut pos = off;
        let mut window = FIRST_WINDOW;
        while pos < self.size {
            let end = pos.saturating_add(window).min(self.size);
            let (found, covered) = self.ranges_within(pos, end, &mut budget)?;
            if let Some(r) = found.first() {
                return Ok(Some(r.start));
            }
            if covered < end {
                return Ok(Some(covered));
            }
            pos = end;
            window = (window * 2).min(MAX_WINDOW);
        }
        Ok(None)
    }

    /// The first unchanged offset at or after `off`; the end of the view counts as one (and
    /// is the answer where the seek budget runs out).
    pub fn next_unchanged(&self, off: u64) -> Result<u64> {
        let mut budget = SEEK_BUDGET;
        let mut pos = off;
        let mut window = FIRST_WINDOW;
        while pos < self.size {
            let end = pos.saturating_add(window).min(self.size);
            let (found, covered) = self.ranges_within(pos, end, &mut budget)?;
            match found.first() {
                Some(r) if r.start == pos && r.end == covered && covered < end => break,
                Some(r) if r.start == pos && r.end == end => pos = end,
                Some(r) if r.start == pos => return Ok(r.end),
                _ if covered == pos => break,
                _ => return Ok(pos),
            }
            window = (window * 2).min(MAX_WINDOW);
        }
        Ok(self.size.max(off.min(self.size)))
    }

    /// Changed bytes in all, for st_blocks: past the budget of translations, the rest counts.
    pub fn changed_bytes(&self) -> Result<u64> {
        let mut budget = 4 * SEEK_BUDGET;
        let (found, covered) = self.ranges_within(0, self.size, &mut budget)?;
        Ok(ranges::total(&found) + (self.size - covered))
    }
}

/// Most layer translations one seek or count makes (as `view::SEEK_BUDGET`).
const SEEK_BUDGET: u32 = 1 << 15;

/// Appends the ranges inside [off, end) that `layer` maps itself (anything but
/// "unallocated": its data, zeros or compressed clusters hide what lies below), with at most
/// `budget` translations; returns how far it got (`end` unless the budget ran out).
fn mapped(
    layer: &dyn Layer,
    off: u64,
    end: u64,
    out: &mut Vec<Range<u64>>,
    budget: &mut u32,
) -> Result<u64> {
    let asked = end;
    let end = end.min(layer.virtual_size());
    let mut pos = off;
    while pos < end {
        if *budget == 0 {
            return Ok(pos);
        }
        *budget -= 1;
        let e = layer.map(pos, end - pos)?;
        if e.len == 0 || e.len > end - pos {
            return Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: translation of {pos:#x} returned a bad length {}",
                    layer.path().display(),
                    e.len
                ),
            ));
        }
        if !matches!(e.map, Mapping::Unallocated) {
            ranges::push_range(out, pos..pos + e.len);
        }
        pos += e.len;
    }
    Ok(asked)
}

#[cfg(test)]
mod tests;
