//! Writing the metadata cache back (see `meta/`): on a guest flush, on unmount, before and
//! inside snapshot changes, and from a background thread once the oldest change is
//! `FLUSH_INTERVAL` old or the dirty sets pass their limits.
//!
//! A flush runs under the exclusive metadata lock: it is short (a few page writes and two
//! or three syncs), and no change can slip between the copy it writes and the releases it
//! applies afterwards.

use super::Qcow2Writer;
use super::meta::{FLUSH_INTERVAL, Host, Plan, Write};
use super::refcount::Refcounts;
use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

/// Wakes the background flusher early (dirty limit) or for good (the writer is gone).
#[derive(Default)]
pub(super) struct Kick {
    state: Mutex<KickState>,
    cv: Condvar,
}

#[derive(Default)]
struct KickState {
    kicked: bool,
    stop: bool,
}

impl Kick {
    pub fn kick(&self) {
        self.state.lock().kicked = true;
        self.cv.notify_one();
    }

    pub fn stop(&self) {
        self.state.lock().stop = true;
        self.cv.notify_one();
    }

    /// Waits up to `FLUSH_INTERVAL / 4` or until kicked; false once stopped.
    fn wait(&self) -> bool {
        let mut s = self.state.lock();
        if !s.kicked && !s.stop {
            self.cv.wait_for(&mut s, FLUSH_INTERVAL / 4);
        }
        s.kicked = false;
        !s.stop
    }
}

/// The image file (and the data file, for syncs) as a plan's target.
struct Files<'a>(&'a Qcow2Writer);

impl Host for Files<'_> {
    fn write(&self, off: u64, bytes: &[u8]) -> Result<()> {
        self.0.file().write_all_at(bytes, off)
    }

    fn sync(&self) -> Result<()> {
        self.0.file().sync_data()?;
        match &self.0.img.data_file {
            Some(d) => d.sync_data(),
            None => Ok(()),
        }
    }
}

impl Qcow2Writer {
    /// Makes every change so far durable, in dependency order, and applies the releases
    /// it made safe (written and synced too, so the file is exactly the in-memory state).
    /// The caller holds the metadata lock exclusively: this is the seam for operations that
    /// need the file complete before a step of their own (snapshot changes).
    pub(super) fn flush_locked(&self, rc: &mut Refcounts) -> Result<()> {
        let plan = self.take_plan(rc)?;
        plan.run(&Files(self))?;
        self.img.l2_sync.unpin_all();
        if plan.releases.is_empty() {
            return Ok(());
        }
        let cs = self.cs();
        for c in plan.releases {
            if rc.decrement(self.file(), c)? {
                // Best effort: nothing references the bytes any more.
                let _ = self.file().punch_hole(c * cs, cs);
            }
        }
        // Only refcount decrements now: safe in any order, one sync.
        let rest = self.take_plan(rc)?;
        rest.run(&Files(self))?;
        Ok(())
    }

    /// Copies everything dirty into a plan and leaves the cache clean.
    fn take_plan(&self, rc: &mut Refcounts) -> Result<Plan> {
        let mut plan = Plan::default();
        rc.take_plan(&mut plan);
        let cs = self.cs();
        let fresh = std::mem::take(&mut rc.dirty.fresh_l2);
        for (off, ranges) in rc.dirty.l2.take(cs) {
            let table = self.l2_table(off)?;
            if !matches!(table, super::L2Ref::Live(_)) {
                return Err(Error::invalid(format!(
                    "internal: dirty L2 table {off:#x} is not in memory"
                )));
            }
            let bytes = table.to_bytes();
            if fresh.contains(&off) {
                // Nothing in the file points to it yet: out with the refcounts, whole.
                plan.refcounts.push(Write { off, bytes });
                continue;
            }
            for r in ranges {
                plan.tables.push(Write {
                    off: off + r.start,
                    bytes: bytes[r.start as usize..r.end as usize].to_vec(),
                });
            }
        }
        let l1_off = self.img.header.l1_table_offset;
        let l1 = self.l1.read().clone();
        for (_, ranges) in rc.dirty.l1.take(l1.len() as u64 * 8) {
            let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            for r in ranges {
                plan.tables.push(Write {
                    off: l1_off + r.start,
                    bytes: bytes[r.start as usize..r.end as usize].to_vec(),
                });
            }
        }
        rc.dirty.taken();
        Ok(plan)
    }

    /// A whole flush for the guest (fsync) or unmount.
    pub(super) fn flush_all(&self) -> Result<()> {
        let mut guard = self.meta.write();
        self.flush_locked(&mut guard)
    }

    /// Asks the background flusher to start now if the dirty sets are past their limits.
    pub(super) fn kick_if_over_limit(&self) {
        if self.meta.read().dirty.over_limit() {
            self.kick.kick();
        }
    }

    /// Flushes if the oldest change is old enough; a failure latches like a failed write.
    fn flush_if_due(&self) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        let mut guard = self.meta.write();
        if guard.dirty.is_clean() || !guard.dirty.due(Instant::now()) {
            return;
        }
        let r = self.flush_locked(&mut guard);
        drop(guard);
        let _ = self.latch(r);
    }
}

/// Starts the thread that writes the cache back on its own. It holds the writer weakly and
/// ends when the writer is dropped.
pub fn start_background_flush(w: &Arc<Qcow2Writer>) {
    let weak: Weak<Qcow2Writer> = Arc::downgrade(w);
    let kick = w.kick.clone();
    let spawned = std::thread::Builder::new()
        .name("qcow2-flush".into())
        .spawn(move || {
            while kick.wait() {
                match weak.upgrade() {
                    Some(w) => w.flush_if_due(),
                    None => return,
                }
            }
        });
    if let Err(e) = spawned {
        // Guest flushes and unmount still write everything back.
        log::warn!("no background metadata flusher: {e}");
    }
}

impl Drop for Qcow2Writer {
    fn drop(&mut self) {
        self.kick.stop();
        if self.failed.load(Ordering::Acquire) || self.meta.get_mut().dirty.is_clean() {
            return;
        }
        let r = self.flush_all();
        if let Err(e) = r {
            log::error!(
                "{}: writing metadata back at close failed: {e}",
                self.img.path.display()
            );
        }
    }
}
