//! One write-back of the metadata cache, in dependency order, so that every state a power
//! cut can expose (everything before the last completed sync, any subset of the writes since)
//! is a consistent image:
//!
//! 1. refcount block pages (increments are safe at any time; decrements are in memory only
//!    once the entries that dropped the references are durable), then sync — together with
//!    the data of newly allocated clusters, written before their entries were made;
//! 2. only when there are some: refcount table entries that hook in new refcount blocks and
//!    the header switch to a new refcount table (their blocks and table were written when
//!    made), then sync;
//! 3. L2 table pages and L1 table pages (new L2 tables were written when made), then sync;
//! 4. the caller then applies `releases`: references dropped by entries that are durable now
//!    (only then may those clusters be freed and handed out again).
//!
//! A plan with no table writes needs one sync (a guest flush always needs one).

use crate::error::Result;

/// Bytes to write at a host offset of the image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub off: u64,
    pub bytes: Vec<u8>,
}

/// Where a plan writes: the image file, and a sync that also covers the data file.
pub trait Host {
    fn write(&self, off: u64, bytes: &[u8]) -> Result<()>;
    fn sync(&self) -> Result<()>;
}

/// What one flush writes, copied from the in-memory metadata at one instant.
#[derive(Debug, Default)]
pub struct Plan {
    pub refcounts: Vec<Write>,
    /// Refcount table entries and the header's refcount table fields.
    pub reftable: Vec<Write>,
    /// L2 and L1 table pages.
    pub tables: Vec<Write>,
    /// Host clusters whose reference to drop once the tables are durable.
    pub releases: Vec<u64>,
}

/// Counts of what a plan did (for tests and tracing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub writes: usize,
    pub syncs: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.refcounts.is_empty()
            && self.reftable.is_empty()
            && self.tables.is_empty()
            && self.releases.is_empty()
    }

    /// Runs stages 1-3 (the caller applies the releases afterwards).
    pub fn run(&self, host: &dyn Host) -> Result<Done> {
        let mut done = Done::default();
        let write = |ws: &[Write], done: &mut Done| -> Result<()> {
            for w in ws {
                host.write(w.off, &w.bytes)?;
                done.writes += 1;
            }
            Ok(())
        };
        write(&self.refcounts, &mut done)?;
        host.sync()?;
        done.syncs += 1;
        for stage in [&self.reftable, &self.tables] {
            if stage.is_empty() {
                continue;
            }
            write(stage, &mut done)?;
            host.sync()?;
            done.syncs += 1;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        W(u64),
        Sync,
    }

    #[derive(Default)]
    struct Rec(RefCell<Vec<Ev>>);

    impl Host for Rec {
        fn write(&self, off: u64, _bytes: &[u8]) -> Result<()> {
            self.0.borrow_mut().push(Ev::W(off));
            Ok(())
        }
        fn sync(&self) -> Result<()> {
            self.0.borrow_mut().push(Ev::Sync);
            Ok(())
        }
    }

    fn w(off: u64) -> Write {
        Write {
            off,
            bytes: vec![1],
        }
    }

    #[test]
    fn stages_are_separated_by_syncs() {
        let plan = Plan {
            refcounts: vec![w(1), w(2)],
            reftable: vec![w(3)],
            tables: vec![w(4), w(5)],
            releases: vec![9],
        };
        let rec = Rec::default();
        let done = plan.run(&rec).unwrap();
        use Ev::*;
        assert_eq!(
            *rec.0.borrow(),
            vec![W(1), W(2), Sync, W(3), Sync, W(4), W(5), Sync]
        );
        assert_eq!(
            done,
            Done {
                writes: 5,
                syncs: 3
            }
        );
    }

    #[test]
    fn empty_stages_cost_no_sync_but_a_flush_always_syncs() {
        use Ev::*;
        let rec = Rec::default();
        Plan::default().run(&rec).unwrap();
        assert_eq!(*rec.0.borrow(), vec![Sync]);
        let rec = Rec::default();
        let plan = Plan {
            tables: vec![w(7)],
            ..Plan::default()
        };
        plan.run(&rec).unwrap();
        // Data of new clusters must be durable before the entries: a sync first.
        assert_eq!(*rec.0.borrow(), vec![Sync, W(7), Sync]);
    }

    #[test]
    fn a_failed_write_stops_before_anything_that_depends_on_it() {
        struct Failing(Rec);
        impl Host for Failing {
            fn write(&self, off: u64, b: &[u8]) -> Result<()> {
                if off == 2 {
                    return Err(crate::error::Error::invalid("injected"));
                }
                self.0.write(off, b)
            }
            fn sync(&self) -> Result<()> {
                self.0.sync()
            }
        }
        let plan = Plan {
            refcounts: vec![w(1), w(2)],
            tables: vec![w(4)],
            ..Plan::default()
        };
        let f = Failing(Rec::default());
        assert!(plan.run(&f).is_err());
        assert_eq!(*f.0.0.borrow(), vec![Ev::W(1)]);
    }
}
