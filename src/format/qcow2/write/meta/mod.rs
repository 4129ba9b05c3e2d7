//! The write-back metadata cache of a writable qcow2 image: which metadata changed in memory
//! and is not yet in the file, and the references waiting to be dropped.
//!
//! The in-memory metadata stays where the read path finds it (the writer's L1, the live L2
//! tables of `tables.rs`, the refcount blocks of `refcount.rs`); this module only tracks what
//! is dirty. A flush copies the dirty pages at one instant (under the metadata lock) into a
//! [`Plan`] and writes it back in dependency order (see `plan.rs`). Two rules make any
//! instant's copy safe to write in that order:
//! - refcount increments happen in memory before anything references the cluster, and
//!   decrements only after the entries that dropped the reference are durable (they wait
//!   here as `releases`), so in-memory refcounts may be written at any time;
//! - a new L2 table, refcount block or refcount table is written whole when it is made,
//!   before anything in the file points to it; what points to it is dirty metadata, written
//!   after the next sync.

mod pages;
pub mod plan;

pub use pages::{DirtyPages, PAGE};
pub use plan::{Host, Plan, Write};

use std::ops::Range;
use std::time::{Duration, Instant};

/// A flush starts on its own once the oldest unwritten change is this old...
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// ...or once this many bytes of metadata pages are dirty.
pub const DIRTY_LIMIT: u64 = 8 << 20;

/// The dirty sets, taken whole by a flush.
#[derive(Debug)]
pub struct Dirty {
    /// Refcount blocks by host offset.
    pub refblocks: DirtyPages,
    /// L2 tables by host offset.
    pub l2: DirtyPages,
    /// The active L1 table (one object, at its host offset).
    pub l1: DirtyPages,
    /// The refcount table (one object, at its host offset): entries of new refcount blocks.
    pub reftable: DirtyPages,
    /// A new refcount table the header must be switched to: (offset, clusters).
    pub header_reftable: Option<(u64, u32)>,
    /// Host clusters whose reference to drop once the entries changed so far are durable.
    pub releases: Vec<u64>,
    /// When the oldest unwritten change was made.
    since: Option<Instant>,
}

/// Everything a flush takes from [`Dirty`]: (object offset, dirty byte ranges).
#[derive(Debug, Default)]
pub struct Taken {
    pub refblocks: Vec<(u64, Vec<Range<u64>>)>,
    pub l2: Vec<(u64, Vec<Range<u64>>)>,
    pub l1: Vec<(u64, Vec<Range<u64>>)>,
    pub reftable: Vec<(u64, Vec<Range<u64>>)>,
    pub header_reftable: Option<(u64, u32)>,
    pub releases: Vec<u64>,
}

/// Byte lengths of the objects, to clip page runs.
#[derive(Clone, Copy, Debug)]
pub struct Lengths {
    pub cluster: u64,
    pub l1: u64,
    pub reftable: u64,
}

impl Dirty {
    pub fn new(cluster_size: u64) -> Dirty {
        let page = PAGE.min(cluster_size);
        Dirty {
            refblocks: DirtyPages::new(page),
            l2: DirtyPages::new(page),
            l1: DirtyPages::new(page),
            reftable: DirtyPages::new(page),
            header_reftable: None,
            releases: Vec::new(),
            since: None,
        }
    }

    fn touch(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    pub fn refblock(&mut self, block: u64, at: Range<usize>) {
        self.touch();
        self.refblocks
            .mark(block, at.start as u64, (at.end - at.start) as u64);
    }

    /// Returns true if the table was clean (the caller pins it in memory).
    pub fn l2(&mut self, table: u64, at: u64, len: u64) -> bool {
        self.touch();
        let was_clean = !self.l2.contains(table);
        self.l2.mark(table, at, len);
        was_clean
    }

    pub fn l1(&mut self, l1_offset: u64, index: u64) {
        self.touch();
        self.l1.mark(l1_offset, index * 8, 8);
    }

    pub fn reftable_entry(&mut self, table_offset: u64, index: u64) {
        self.touch();
        self.reftable.mark(table_offset, index * 8, 8);
    }

    /// The refcount table moved to `offset` (written whole there): entries marked for the
    /// old one are in it already.
    pub fn reftable_moved(&mut self, offset: u64, clusters: u32) {
        self.touch();
        self.reftable = DirtyPages::new(self.refblocks.page());
        self.header_reftable = Some((offset, clusters));
    }

    pub fn release(&mut self, cluster: u64) {
        self.touch();
        self.releases.push(cluster);
    }

    pub fn is_clean(&self) -> bool {
        self.since.is_none()
    }

    /// Bytes of dirty metadata pages.
    pub fn bytes(&self) -> u64 {
        self.refblocks.bytes() + self.l2.bytes() + self.l1.bytes() + self.reftable.bytes()
    }

    /// Whether a flush should start on its own now.
    pub fn due(&self, now: Instant) -> bool {
        self.bytes() >= DIRTY_LIMIT
            || self
                .since
                .is_some_and(|t| now.duration_since(t) >= FLUSH_INTERVAL)
    }

    /// The oldest unwritten change's age.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.since.map(|t| now.duration_since(t))
    }

    /// Takes everything, leaving the cache clean.
    pub fn take(&mut self, len: Lengths) -> Taken {
        self.since = None;
        Taken {
            refblocks: self.refblocks.take(len.cluster),
            l2: self.l2.take(len.cluster),
            l1: self.l1.take(len.l1),
            reftable: self.reftable.take(len.reftable),
            header_reftable: self.header_reftable.take(),
            releases: std::mem::take(&mut self.releases),
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn tracks_age_size_and_takes_everything() {
        let mut d = Dirty::new(1 << 16);
        assert!(d.is_clean());
        let t0 = Instant::now();
        assert!(!d.due(t0));
        d.refblock(0x20000, 10..12);
        assert!(d.l2(0x50000, 8, 8), "first change of a table");
        assert!(!d.l2(0x50000, 16, 8));
        d.l1(0x30000, 600); // byte 4800: page 1
        d.reftable_entry(0x10000, 3);
        d.release(77);
        assert!(!d.is_clean());
        assert_eq!(d.bytes(), 4 * PAGE);
        assert!(d.due(t0 + FLUSH_INTERVAL + Duration::from_millis(10)));
        let len = Lengths {
            cluster: 1 << 16,
            l1: 8 * 1000,
            reftable: 1 << 16,
        };
        let t = d.take(len);
        assert_eq!(t.refblocks, vec![(0x20000, vec![0..PAGE])]);
        assert_eq!(t.l2, vec![(0x50000, vec![0..PAGE])]);
        assert_eq!(t.l1, vec![(0x30000, vec![PAGE..8000])]);
        assert_eq!(t.reftable, vec![(0x10000, vec![0..PAGE])]);
        assert_eq!(t.releases, vec![77]);
        assert!(d.is_clean() && d.bytes() == 0);
        assert!(d.take(len).l2.is_empty());
    }

    #[test]
    fn a_moved_refcount_table_drops_old_entry_marks_and_switches_the_header() {
        let mut d = Dirty::new(512);
        d.reftable_entry(0x400, 1);
        d.reftable_moved(0x8000, 2);
        let t = d.take(Lengths {
            cluster: 512,
            l1: 512,
            reftable: 1024,
        });
        assert!(t.reftable.is_empty());
        assert_eq!(t.header_reftable, Some((0x8000, 2)));
    }

    #[test]
    fn the_dirty_limit_triggers_a_flush() {
        let mut d = Dirty::new(1 << 16);
        for i in 0..DIRTY_LIMIT / PAGE {
            d.l2(i << 16, 0, 8);
        }
        assert!(d.due(Instant::now()));
    }
}
