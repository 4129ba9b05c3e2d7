//! The write-back metadata cache of a writable qcow2 image: which metadata changed in memory
//! and is not yet in the file, and the references waiting to be dropped.
//!
//! The in-memory metadata stays where the read path finds it (the writer's L1, the live L2
//! tables of `tables.rs`, pinned while dirty; the refcount blocks and table of
//! `refcount.rs`); this module only tracks what is dirty. A flush copies the dirty pages at
//! one instant (under the metadata lock) into a [`Plan`] and writes it back in dependency
//! order (see `plan.rs`). Two rules make any instant's copy safe to write in that order:
//! - refcount increments happen in memory before anything references the cluster, and
//!   decrements only after the entries that dropped the reference are durable (they wait
//!   here as `releases`), so in-memory refcounts may be written at any time;
//! - a new L2 table, refcount block or refcount table is nothing the file points to until
//!   the entry naming it is written: the new object goes out whole with the refcounts, what
//!   points to it after the next sync.

mod pages;
pub mod plan;

pub use pages::{DirtyPages, PAGE};
pub use plan::{Host, Plan, Write};

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A flush starts on its own once the oldest unwritten change is this old...
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// ...or once this many bytes of metadata pages are dirty...
pub const DIRTY_LIMIT: u64 = 8 << 20;
/// ...or once dirty L2 tables (pinned in memory while dirty) add up to this many bytes.
pub const DIRTY_TABLES_LIMIT: u64 = 16 << 20;

/// The dirty sets, taken by a flush.
#[derive(Debug)]
pub struct Dirty {
    cluster: u64,
    /// Refcount blocks by host offset (new ones marked whole).
    pub refblocks: DirtyPages,
    /// L2 tables by host offset.
    pub l2: DirtyPages,
    /// L2 tables made since the last flush: written whole, before what points to them.
    pub fresh_l2: BTreeSet<u64>,
    /// The active L1 table (one object, at its host offset).
    pub l1: DirtyPages,
    /// The refcount table (one object, at its host offset): entries of new refcount blocks.
    pub reftable: DirtyPages,
    /// The refcount table moved (to `(offset, clusters)`): written whole, then the header.
    pub header_reftable: Option<(u64, u32)>,
    /// Host clusters whose reference to drop once the entries changed so far are durable.
    pub releases: Vec<u64>,
    /// When the oldest unwritten change was made.
    since: Option<Instant>,
}

impl Dirty {
    pub fn new(cluster_size: u64) -> Dirty {
        let page = PAGE.min(cluster_size);
        Dirty {
            cluster: cluster_size,
            refblocks: DirtyPages::new(page),
            l2: DirtyPages::new(page),
            fresh_l2: BTreeSet::new(),
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

    pub fn refblock(&mut self, block: u64, at: std::ops::Range<usize>) {
        self.touch();
        self.refblocks
            .mark(block, at.start as u64, (at.end - at.start) as u64);
    }

    /// A refcount block made in memory: all of it goes out.
    pub fn new_refblock(&mut self, block: u64) {
        self.touch();
        self.refblocks.mark(block, 0, self.cluster);
    }

    /// Returns true if the table was clean (the caller pins it in memory).
    pub fn l2(&mut self, table: u64, at: u64, len: u64) -> bool {
        self.touch();
        let was_clean = !self.l2.contains(table);
        self.l2.mark(table, at, len);
        was_clean
    }

    /// An L2 table made in memory (nothing in the file points to it yet).
    pub fn new_l2(&mut self, table: u64) -> bool {
        self.fresh_l2.insert(table);
        self.l2(table, 0, self.cluster)
    }

    pub fn l1(&mut self, l1_offset: u64, index: u64) {
        self.touch();
        self.l1.mark(l1_offset, index * 8, 8);
    }

    pub fn reftable_entry(&mut self, table_offset: u64, index: u64) {
        self.touch();
        self.reftable.mark(table_offset, index * 8, 8);
    }

    /// The refcount table moved to `offset`: it is written whole, so entries marked for the
    /// old one need no writes of their own.
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

    /// Everything was taken by a flush.
    pub fn taken(&mut self) {
        debug_assert!(
            self.refblocks.is_empty()
                && self.l2.is_empty()
                && self.l1.is_empty()
                && self.reftable.is_empty()
                && self.releases.is_empty()
                && self.header_reftable.is_none()
        );
        self.fresh_l2.clear();
        self.since = None;
    }

    /// Bytes of dirty metadata pages.
    pub fn bytes(&self) -> u64 {
        self.refblocks.bytes() + self.l2.bytes() + self.l1.bytes() + self.reftable.bytes()
    }

    /// Whether the dirty sets are big enough that a flush should start now.
    pub fn over_limit(&self) -> bool {
        self.bytes() >= DIRTY_LIMIT || self.l2.len() as u64 * self.cluster >= DIRTY_TABLES_LIMIT
    }

    /// Whether a flush should start on its own now.
    pub fn due(&self, now: Instant) -> bool {
        self.over_limit()
            || self
                .since
                .is_some_and(|t| now.duration_since(t) >= FLUSH_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_age_size_and_limits() {
        let mut d = Dirty::new(1 << 16);
        assert!(d.is_clean());
        let t0 = Instant::now();
        assert!(!d.due(t0));
        d.refblock(0x20000, 10..12);
        assert!(d.l2(0x50000, 8, 8), "first change of a table");
        assert!(!d.l2(0x50000, 16, 8));
        assert!(d.new_l2(0x60000));
        d.l1(0x30000, 600); // byte 4800: page 1
        d.reftable_entry(0x10000, 3);
        d.release(77);
        assert!(!d.is_clean());
        assert_eq!(d.bytes(), 4 * PAGE + (1 << 16));
        assert!(!d.due(t0));
        assert!(d.due(t0 + FLUSH_INTERVAL + Duration::from_millis(10)));
        assert!(d.fresh_l2.contains(&0x60000));
        d.refblocks.take(1 << 16);
        d.l2.take(1 << 16);
        d.l1.take(1 << 16);
        d.reftable.take(1 << 16);
        d.releases.clear();
        d.taken();
        assert!(d.is_clean() && d.fresh_l2.is_empty() && d.bytes() == 0);
    }

    #[test]
    fn a_moved_refcount_table_drops_old_entry_marks_and_switches_the_header() {
        let mut d = Dirty::new(512);
        d.reftable_entry(0x400, 1);
        d.reftable_moved(0x8000, 2);
        assert!(d.reftable.is_empty());
        assert_eq!(d.header_reftable, Some((0x8000, 2)));
    }

    #[test]
    fn the_dirty_limits_trigger_a_flush() {
        let mut d = Dirty::new(1 << 16);
        for i in 0..DIRTY_TABLES_LIMIT >> 16 {
            d.l2(i << 16, 0, 8);
        }
        assert!(d.over_limit(), "dirty tables");
        let mut d = Dirty::new(4096);
        for i in 0..DIRTY_LIMIT / PAGE {
            d.refblock(i << 12, 0..8);
        }
        assert!(d.over_limit(), "dirty bytes");
    }
}
