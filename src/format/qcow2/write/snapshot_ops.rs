//! Internal snapshots of the image being written, made, deleted and renamed while it is
//! mounted, as `qemu-img snapshot` does them (QEMU `qcow2_snapshot_create`/`_delete`).
//!
//! Each change runs with no write or discard in flight (the writer's gate, held
//! exclusively) and under the metadata lock, so a guest write is wholly before or after it.
//!
//! Crash safety: the snapshot table is never changed in place. A change first writes the
//! metadata cache back (`flush_locked`), makes its changes (refcount increments and COPIED
//! flags in the cache, the L1 copy and the new table written directly, unreferenced), writes
//! the cache back again, then switches the header to the new table with one 12-byte write
//! and syncs. What follows the switch is written back before the operation returns. A crash
//! before the switch leaves the old table and at worst leaked clusters; after it, the new
//! table. Deletion drops references only after the switch (leaks, never a reference to a
//! free cluster). One window remains, as in QEMU: refcount increments are written back before
//! the COPIED flags they clear, so a crash between them leaves COPIED set on clusters of
//! refcount 2 that nothing else references yet (`qemu-img check` counts these as errors, `-r
//! all` repairs them; no data is at risk; tests/crash_snapshots.rs).
//!
//! Refcounts follow QEMU: a data cluster counts one reference per L1 table that reaches it
//! (a shared L2 table counts once per L1 that points to it), and COPIED is set exactly on
//! active entries whose refcount is 1.

use super::Qcow2Writer;
use super::entry::{COMPRESSED, COPIED, Kind as EntryKind, OFFSET_MASK, compressed_clusters};
use super::refcount::Refcounts;
use crate::endian::be64;
use crate::error::{Error, Kind, Result};
use crate::format::qcow2::MAX_L1_BYTES;
use crate::format::qcow2::snapshot::{self, MAX_SNAPSHOTS, Snapshot};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Clusters an allocation of a contiguous run may try before giving up (a file whose free
/// space is all in holes smaller than the run).
const MAX_RUN_ATTEMPTS: usize = 1 << 20;
/// Snapshot L1 tables read to find the L2 tables snapshots use (as at open).
const SNAPSHOT_L1_BUDGET: u64 = 64 << 20;

/// The snapshot table as it is in the file.
pub(crate) struct SnapTable {
    pub entries: Vec<Snapshot>,
    pub offset: u64,
    /// Bytes the table occupies at `offset`.
    pub len: u64,
}

/// A snapshot just taken: what a read-only layer over it needs.
#[derive(Clone, Debug)]
pub struct MadeSnapshot {
    pub id: String,
    pub name: String,
    pub l1: Arc<[u64]>,
    pub l1_offset: u64,
    pub size: u64,
    /// Since the Unix epoch, as stored.
    pub date: Duration,
}

impl Qcow2Writer {
    /// The snapshot table as it is now.
    pub fn snapshot_entries(&self) -> Vec<Snapshot> {
        self.snaps.lock().entries.clone()
    }

    /// Takes an internal snapshot named `name` of the image as it is now: every write
    /// acknowledged before is in it, none that starts after.
    pub fn create_snapshot(&self, name: &str) -> Result<MadeSnapshot> {
        self.check_writable()?;
        if self.has_data_file() {
            return Err(Error::unsupported(
                &self.img.path,
                "internal snapshots of an image with an external data file (QEMU refuses them too)",
            ));
        }
        let _gate = self.gate.write();
        let mut guard = self.meta.write();
        let mut table = self.snaps.lock();
        check_new_name(&table.entries, name, None)?;
        if table.entries.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::unsupported(
                &self.img.path,
                format!("more than {MAX_SNAPSHOTS} snapshots"),
            ));
        }
        let r = self
            .flush_locked(&mut guard)
            .and_then(|_| self.create_locked(&mut guard, &mut table, name))
            .and_then(|made| self.flush_locked(&mut guard).map(|_| made));
        self.latch(r)
    }

    /// Deletes the snapshot with id `id` and frees what only it held.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.check_writable()?;
        let _gate = self.gate.write();
        let mut guard = self.meta.write();
        let mut table = self.snaps.lock();
        let i = find(&table.entries, id, &self.img.path)?;
        let r = self
            .flush_locked(&mut guard)
            .and_then(|_| self.delete_locked(&mut guard, &mut table, i))
            .and_then(|_| self.flush_locked(&mut guard));
        self.latch(r)
    }

    /// Gives the snapshot with id `id` the name `name`.
    pub fn rename_snapshot(&self, id: &str, name: &str) -> Result<()> {
        self.check_writable()?;
        let mut guard = self.meta.write();
        let mut table = self.snaps.lock();
        let i = find(&table.entries, id, &self.img.path)?;
        check_new_name(&table.entries, name, Some(i))?;
        let mut entries = table.entries.clone();
        entries[i] = entries[i].renamed(name);
        let r = self
            .switch_table(&mut guard, &mut table, entries)
            .and_then(|_| self.flush_locked(&mut guard));
        self.latch(r)
    }

    fn create_locked(
        &self,
        rc: &mut Refcounts,
        table: &mut SnapTable,
        name: &str,
    ) -> Result<MadeSnapshot> {
        let cs = self.cs();
        let file = self.file().clone();
        let l1: Vec<u64> = self.l1.read().to_vec();
        let l2s: Vec<u64> = l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        // 1. Everything the active tables reach gains the snapshot's reference.
        for &l2_off in &l2s {
            let l2 = self.l2_table(l2_off)?;
            for idx in 0..self.l2_entries() {
                let (desc, _) = self.l2_entry(&l2, idx);
                for c in self.data_clusters(desc) {
                    rc.increment(&file, c)?;
                }
            }
            rc.increment(&file, l2_off / cs)?;
        }
        // 2. Shared now: no active entry may be written in place (COPIED off).
        let mut seen = BTreeSet::new();
        for &l2_off in &l2s {
            if seen.insert(l2_off) {
                self.rewrite_copied(rc, l2_off, |_, _| Ok(false))?;
            }
        }
        let new_l1: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
        self.write_active_l1(rc, &l1, &new_l1);
        // 3. The snapshot's L1 table.
        let l1_bytes: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_clusters = (l1_bytes.len() as u64).div_ceil(cs);
        let l1_off = self.alloc_run(rc, l1_clusters)?;
        rc.metadata
            .extend((l1_off / cs)..(l1_off / cs + l1_clusters));
        if !l1_bytes.is_empty() {
            file.write_all_at(&l1_bytes, l1_off)?;
        }
        // 4. The new table, then the switch.
        let date = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = snapshot::next_id(&table.entries);
        let l1_size = u32::try_from(new_l1.len())
            .map_err(|_| Error::invalid("internal: L1 table too large"))?;
        let sn = Snapshot::new_entry(&id, name, l1_off, l1_size, self.size(), date);
        let mut entries = table.entries.clone();
        entries.push(sn);
        self.switch_table(rc, table, entries)?;
        rc.snapshot_l2.extend(l2s.iter().map(|o| o / cs));
        Ok(MadeSnapshot {
            id,
            name: name.to_string(),
            l1: new_l1.into(),
            l1_offset: l1_off,
            size: self.size(),
            date,
        })
    }

    fn delete_locked(&self, rc: &mut Refcounts, table: &mut SnapTable, i: usize) -> Result<()> {
        let cs = self.cs();
        let file = self.file().clone();
        let sn = table.entries[i].clone();
        let l1_len = u64::from(sn.l1_size) * 8;
        let field = format!("snapshot {:?} L1 table", sn.name);
        let raw = file.read_table(sn.l1_table_offset, l1_len, MAX_L1_BYTES, &field)?;
        let mut entries = table.entries.clone();
        entries.remove(i);
        self.switch_table(rc, table, entries)?;
        // The entry is gone: drop the references its tables stood for.
        let mut freed = Vec::new();
        for e in raw.chunks_exact(8).map(|c| be64(c, 0) & OFFSET_MASK) {
            if e == 0 {
                continue;
            }
            let l2 = self.l2_table(e)?;
            for idx in 0..self.l2_entries() {
                let (desc, _) = self.l2_entry(&l2, idx);
                for c in self.data_clusters(desc) {
                    if rc.decrement(&file, c)? {
                        freed.push(c);
                    }
                }
            }
            if rc.decrement(&file, e / cs)? {
                freed.push(e / cs);
            }
        }
        if l1_len > 0 {
            let first = sn.l1_table_offset / cs;
            for c in first..(sn.l1_table_offset + l1_len).div_ceil(cs) {
                if rc.decrement(&file, c)? {
                    freed.push(c);
                }
            }
        }
        // Best effort: the bytes are referenced by nothing now. One punch per run of
        // clusters, as QEMU merges its discards: a host file system that discards each
        // punch synchronously (ext4 -o discard) makes one per cluster slow.
        for run in cluster_runs(freed) {
            let _ = file.punch_hole(run.start * cs, (run.end - run.start) * cs);
        }
        rc.snapshot_l2 = self.l2_tables_of(&table.entries)?;
        self.fix_copied(rc)
    }

    /// Writes `entries` as a new snapshot table and switches the header to it (see the module
    /// comment), then frees the old table.
    fn switch_table(
        &self,
        rc: &mut Refcounts,
        table: &mut SnapTable,
        mut entries: Vec<Snapshot>,
    ) -> Result<()> {
        let cs = self.cs();
        let file = self.file().clone();
        let bytes = snapshot::encode_table(&entries);
        let clusters = (bytes.len() as u64).div_ceil(cs);
        let off = self.alloc_run(rc, clusters)?;
        rc.metadata.extend((off / cs)..(off / cs + clusters));
        if !bytes.is_empty() {
            file.write_all_at(&bytes, off)?;
        }
        // Everything the new table names (and the table) is durable before the switch.
        self.flush_locked(rc)?;
        let count = u32::try_from(entries.len())
            .map_err(|_| Error::invalid("internal: too many snapshots"))?;
        let mut header = count.to_be_bytes().to_vec();
        header.extend(off.to_be_bytes());
        file.write_all_at(&header, 60)?;
        file.sync_data()?;
        if table.len > 0 {
            let first = table.offset / cs;
            for c in first..(table.offset + table.len).div_ceil(cs) {
                rc.metadata.remove(&c);
                if rc.decrement(&file, c)? {
                    let _ = file.punch_hole(c * cs, cs);
                }
            }
        }
        let mut pos = off;
        for e in &mut entries {
            e.entry_offset = pos;
            pos += e.encode().len() as u64;
        }
        *table = SnapTable {
            entries,
            offset: off,
            len: bytes.len() as u64,
        };
        Ok(())
    }

    /// Host clusters whose references an L2 descriptor holds.
    fn data_clusters(&self, desc: u64) -> Vec<u64> {
        let cs = self.cs();
        match self.decode(desc) {
            EntryKind::Normal { host, .. } | EntryKind::Zero { host } if host != 0 => {
                vec![host / cs]
            }
            EntryKind::Compressed { off, len } => compressed_clusters(off, len, cs).collect(),
            _ => Vec::new(),
        }
    }

    /// Rewrites the COPIED flags of the L2 table at `l2_off`: `owned(host cluster)` says
    /// whether an entry's cluster has refcount 1. Writes only when a flag changes.
    fn rewrite_copied(
        &self,
        rc: &mut Refcounts,
        l2_off: u64,
        mut owned: impl FnMut(&mut Refcounts, u64) -> Result<bool>,
    ) -> Result<()> {
        let cs = self.cs();
        let l2 = self.l2_table(l2_off)?;
        let mut bytes = l2.to_bytes();
        let es = self.entry_size() as usize;
        let mut changed = false;
        for at in (0..bytes.len()).step_by(es) {
            let d = be64(&bytes, at);
            if d & COMPRESSED != 0 {
                continue;
            }
            let host = match self.decode(d) {
                EntryKind::Normal { host, .. } | EntryKind::Zero { host } if host != 0 => host,
                _ => continue,
            };
            let want = if owned(rc, host / cs)? {
                d | COPIED
            } else {
                d & !COPIED
            };
            if want != d {
                bytes[at..at + 8].copy_from_slice(&want.to_be_bytes());
                changed = true;
            }
        }
        if changed {
            self.write_l2(rc, l2_off, &l2, 0, &bytes)?;
        }
        Ok(())
    }

    /// After a deletion: COPIED on exactly the active entries whose refcount is 1 again.
    fn fix_copied(&self, rc: &mut Refcounts) -> Result<()> {
        let cs = self.cs();
        let file = self.file().clone();
        let l1: Vec<u64> = self.l1.read().to_vec();
        let mut new_l1 = l1.clone();
        let mut seen = BTreeSet::new();
        for (i, &e) in l1.iter().enumerate() {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            new_l1[i] = if rc.get(&file, l2_off / cs)? == 1 {
                e | COPIED
            } else {
                e & !COPIED
            };
            if seen.insert(l2_off) {
                self.rewrite_copied(rc, l2_off, |rc, c| Ok(rc.get(&file, c)? == 1))?;
            }
        }
        self.write_active_l1(rc, &l1, &new_l1);
        Ok(())
    }

    /// Publishes the active L1 table and marks the entries that changed for the flush.
    fn write_active_l1(&self, rc: &mut Refcounts, old: &[u64], new: &[u64]) {
        let l1_off = self.img.header.l1_table_offset;
        for (i, _) in old.iter().zip(new).enumerate().filter(|(_, (a, b))| a != b) {
            rc.dirty.l1(l1_off, i as u64);
        }
        *self.l1.write() = new.to_vec().into();
    }

    /// `n` contiguous free clusters (refcount 1 on return); 0 for none. Allocation goes
    /// lowest first, so the run is found at the first hole big enough or at the end.
    fn alloc_run(&self, rc: &mut Refcounts, n: u64) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        let cs = self.cs();
        let file = self.file().clone();
        let mut got = Vec::new();
        let (mut start, mut len) = (0u64, 0u64);
        while len < n {
            if got.len() >= MAX_RUN_ATTEMPTS {
                for c in got {
                    rc.decrement(&file, c)?;
                }
                return Err(Error::unsupported(
                    &self.img.path,
                    format!("no run of {n} free clusters found"),
                ));
            }
            let c = self.alloc(rc)? / cs;
            got.push(c);
            if len > 0 && start + len == c {
                len += 1;
            } else {
                (start, len) = (c, 1);
            }
        }
        for c in got.into_iter().filter(|c| !(start..start + n).contains(c)) {
            rc.decrement(&file, c)?;
        }
        Ok(start * cs)
    }

    /// The L2 tables (cluster indices) the L1 tables of `entries` point to.
    fn l2_tables_of(&self, entries: &[Snapshot]) -> Result<HashSet<u64>> {
        let cs = self.cs();
        let mut out = HashSet::new();
        let mut seen = HashSet::new();
        let mut bytes = 0u64;
        for s in entries {
            if !seen.insert((s.l1_table_offset, s.l1_size)) {
                continue;
            }
            let len = u64::from(s.l1_size) * 8;
            bytes += len;
            if bytes > SNAPSHOT_L1_BUDGET {
                return Err(Error::unsupported(
                    &self.img.path,
                    format!("snapshot L1 tables over {SNAPSHOT_L1_BUDGET} bytes in total"),
                ));
            }
            let field = format!("snapshot {:?} L1 table", s.name);
            let raw = self
                .file()
                .read_table(s.l1_table_offset, len, MAX_L1_BYTES, &field)?;
            for e in raw.chunks_exact(8).map(|c| be64(c, 0) & OFFSET_MASK) {
                if e != 0 {
                    out.insert(e / cs);
                }
            }
        }
        Ok(out)
    }
}

/// Cluster indices as sorted runs of consecutive clusters (duplicates merged).
fn cluster_runs(mut clusters: Vec<u64>) -> Vec<std::ops::Range<u64>> {
    clusters.sort_unstable();
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for c in clusters {
        match runs.last_mut() {
            Some(r) if c <= r.end => r.end = r.end.max(c + 1),
            _ => runs.push(c..c + 1),
        }
    }
    runs
}

fn find(entries: &[Snapshot], id: &str, path: &std::path::Path) -> Result<usize> {
    entries.iter().position(|s| s.id == id).ok_or_else(|| {
        Error::new(
            Kind::NotFound,
            format!("{}: no snapshot with id {id}", path.display()),
        )
    })
}

/// A name QEMU can store and address: not empty, no NUL, at most 65535 bytes, and no
/// other snapshot's name or id (`qemu-img snapshot -d NAME` looks up both).
fn check_new_name(entries: &[Snapshot], name: &str, except: Option<usize>) -> Result<()> {
    if name.is_empty() || name.contains('\0') || name.len() > usize::from(u16::MAX) {
        return Err(Error::invalid(format!(
            "{name:?} cannot be a snapshot name"
        )));
    }
    let clash = entries
        .iter()
        .enumerate()
        .any(|(i, s)| Some(i) != except && (s.name == name || s.id == name));
    if clash {
        return Err(Error::new(
            Kind::Exists,
            format!("a snapshot named {name:?} exists"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cluster_runs;

    #[test]
    fn freed_clusters_are_punched_as_runs() {
        assert_eq!(
            cluster_runs(vec![9, 3, 4, 5, 4, 12, 10]),
            vec![3..6, 9..11, 12..13]
        );
        assert!(cluster_runs(Vec::new()).is_empty());
    }
}
