//! Refcount bookkeeping of a writable qcow2 image: lookups, allocation (lowest free cluster
//! first), decrements, new refcount blocks (self-describing when they must be) and a growing
//! refcount table. Changes stay in memory, marked in the write-back cache (`meta`); the
//! flush writes them before anything that references the clusters (see `meta/plan.rs`).
//! References dropped by entries not yet durable wait there as releases.

use super::super::MAX_REFTABLE_BYTES;
use super::entry::{get_refcount, max_refcount, set_refcount};
use super::meta::{Dirty, Plan, Write};
use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use std::collections::{HashMap, HashSet};

/// Reftable entry bits that hold the refcount block offset.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;
/// Host offsets must stay below 2^56 (L2 entries cannot hold more).
const MAX_HOST_CLUSTER_BYTES: u64 = 1 << 56;

#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Refcount entries per refcount block.
    per_block: u64,
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    /// Loaded refcount blocks by host offset (only this writer changes them).
    blocks: HashMap<u64, Vec<u8>>,
    /// No free cluster below this index.
    free_hint: u64,
    /// One past the highest cluster ever allocated or present in the file.
    pub end: u64,
    /// Host clusters holding metadata (header, tables): never handed out, never written as data.
    pub metadata: HashSet<u64>,
    /// L2 tables (cluster indices) that internal snapshots use: never changed in place,
    /// whatever the COPIED flag of an active L1 entry claims.
    pub snapshot_l2: HashSet<u64>,
    /// What changed in memory and is not in the file yet (all the image's metadata).
    pub dirty: Dirty,
}

impl Refcounts {
    pub fn new(
        file: &HostFile,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let bytes = table_clusters.saturating_mul(cs);
        let raw = file.read_table(table_offset, bytes, MAX_REFTABLE_BYTES, "refcount table")?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| crate::endian::be64(c, 0))
            .collect();
        let mut metadata: HashSet<u64> = (0..table_clusters)
            .map(|i| (table_offset >> cluster_bits) + i)
            .collect();
        for (i, &e) in table.iter().enumerate() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let at = table_offset + i as u64 * 8;
            crate::ensure_corrupt!(
                off.is_multiple_of(cs),
                file.path(),
                "refcount table entry",
                at,
                "block offset {off:#x} is not cluster-aligned"
            );
            metadata.insert(off >> cluster_bits);
        }
        metadata.insert(0);
        Ok(Refcounts {
            cluster_bits,
            order,
            per_block: (cs * 8) >> order,
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::new(),
            free_hint: 1,
            end: file.len().div_ceil(cs),
            metadata,
            snapshot_l2: HashSet::new(),
            dirty: Dirty::new(cs),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The loaded refcount block covering table index `ri`, if one is allocated.
    fn block(&mut self, file: &HostFile, ri: u64) -> Result<Option<u64>> {
        let Some(&e) = self.table.get(ri as usize) else {
            return Ok(None);
        };
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&off) {
            let cs = self.cs();
            let b = file.read_table(off, cs, cs, "refcount block")?;
            self.blocks.insert(off, b);
        }
        Ok(Some(off))
    }

    /// The refcount of host cluster `c` (0 where no block covers it).
    pub fn get(&mut self, file: &HostFile, c: u64) -> Result<u64> {
        let (ri, i) = (c / self.per_block, c % self.per_block);
        Ok(match self.block(file, ri)? {
            Some(off) => self
                .blocks
                .get(&off)
                .map_or(0, |b| get_refcount(b, self.order, i)),
            None => 0,
        })
    }

    /// Stores refcount `v` of cluster `c` (its block must exist) and marks it dirty.
    fn set(&mut self, file: &HostFile, c: u64, v: u64) -> Result<()> {
        let (ri, i) = (c / self.per_block, c % self.per_block);
        let off = self.block(file, ri)?.ok_or_else(|| {
            Error::corrupt(
                file.path(),
                "refcount table",
                self.table_offset + ri * 8,
                format!("no refcount block covers cluster {c}"),
            )
        })?;
        let order = self.order;
        let b = self
            .blocks
            .get_mut(&off)
            .ok_or_else(|| Error::invalid("internal: refcount block not loaded"))?;
        let r = set_refcount(b, order, i, v);
        self.dirty.refblock(off, r);
        Ok(())
    }

    /// Adds one reference to host cluster `c`, which must be in use already (an internal
    /// snapshot taking a second reference to what the active tables hold).
    pub fn increment(&mut self, file: &HostFile, c: u64) -> Result<()> {
        let v = self.get(file, c)?;
        if v == 0 || v >= max_refcount(self.order) {
            return Err(Error::corrupt(
                file.path(),
                "refcount",
                c << self.cluster_bits,
                if v == 0 {
                    "a referenced cluster has refcount 0".to_string()
                } else {
                    format!(
                        "refcount {v} cannot grow (refcount_bits {})",
                        1u32 << self.order
                    )
                },
            ));
        }
        self.set(file, c, v + 1)
    }

    /// Drops one reference to host cluster `c` once the entry that stood for it is durable:
    /// the next flush applies it.
    pub fn release(&mut self, c: u64) {
        self.dirty.release(c);
    }

    /// Drops one reference to host cluster `c` now; call only when no durable reference
    /// stands for it any more (or never did). Returns true when the cluster became free.
    pub fn decrement(&mut self, file: &HostFile, c: u64) -> Result<bool> {
        let v = self.get(file, c)?;
        if v == 0 {
            return Err(Error::corrupt(
                file.path(),
                "refcount",
                c << self.cluster_bits,
                "dropping a reference to a free cluster",
            ));
        }
        self.set(file, c, v - 1)?;
        if v == 1 {
            self.free_hint = self.free_hint.min(c);
            self.metadata.remove(&c);
        }
        Ok(v == 1)
    }

    /// The lowest cluster >= the hint whose refcount is 0.
    fn find_free(&mut self, file: &HostFile) -> Result<u64> {
        let mut c = self.free_hint.max(1);
        loop {
            let ri = c / self.per_block;
            match self.block(file, ri)? {
                None => return Ok(c),
                Some(off) => {
                    let first = c % self.per_block;
                    let found = self.blocks.get(&off).and_then(|b| {
                        (first..self.per_block).find(|&i| get_refcount(b, self.order, i) == 0)
                    });
                    if let Some(i) = found {
                        return Ok(ri * self.per_block + i);
                    }
                    c = (ri + 1) * self.per_block;
                }
            }
        }
    }

    /// Allocates one cluster: its refcount is 1 (in memory; the flush writes it before
    /// anything that points to the cluster).
    pub fn alloc(&mut self, file: &HostFile) -> Result<u64> {
        loop {
            let c = self.find_free(file)?;
            if c.checked_mul(self.cs())
                .is_none_or(|o| o >= MAX_HOST_CLUSTER_BYTES)
            {
                return Err(Error::new(
                    Kind::Unsupported,
                    format!(
                        "{}: the image file is full (2^56 bytes)",
                        file.path().display()
                    ),
                ));
            }
            if self.metadata.contains(&c) {
                return Err(Error::corrupt(
                    file.path(),
                    "refcount",
                    c << self.cluster_bits,
                    "a metadata cluster has refcount 0",
                ));
            }
            let ri = c / self.per_block;
            if ri >= self.table.len() as u64 {
                self.grow_table(file, ri)?;
                continue;
            }
            if self.table[ri as usize] & REFTABLE_OFFSET_MASK == 0 {
                // The block describes itself: it takes the free cluster it covers.
                let mut b = vec![0u8; self.cs() as usize];
                set_refcount(&mut b, self.order, c % self.per_block, 1);
                let off = c << self.cluster_bits;
                self.dirty.new_refblock(off);
                self.dirty.reftable_entry(self.table_offset, ri);
                self.table[ri as usize] = off;
                self.blocks.insert(off, b);
                self.metadata.insert(c);
                self.end = self.end.max(c + 1);
                continue;
            }
            self.set(file, c, 1)?;
            self.free_hint = c + 1;
            self.end = self.end.max(c + 1);
            return Ok(c);
        }
    }

    /// Moves the refcount table to a bigger one at the end of the file that covers index
    /// `need`, with new refcount blocks for the area it occupies (which count themselves).
    /// The flush writes them, then switches the header; the old table is released.
    fn grow_table(&mut self, file: &HostFile, need: u64) -> Result<()> {
        let cs = self.cs();
        let pb = self.per_block;
        let mut start = self.end.max(1);
        let (mut nblocks, mut nclusters) = (0u64, 0u64);
        let new_blocks: Vec<u64> = loop {
            let last = start + nblocks + nclusters.max(1) - 1;
            let blocks: Vec<u64> = (start / pb..=last / pb)
                .filter(|&ri| {
                    self.table
                        .get(ri as usize)
                        .is_none_or(|e| e & REFTABLE_OFFSET_MASK == 0)
                })
                .collect();
            let entries = (need + 1).max(last / pb + 1).max(self.table.len() as u64);
            let want = (entries * 8).div_ceil(cs);
            let want = (want + want / 2).max(self.table_clusters + 1);
            if want * cs > MAX_REFTABLE_BYTES {
                return Err(Error::new(
                    Kind::Unsupported,
                    format!(
                        "{}: the refcount table would exceed {MAX_REFTABLE_BYTES} bytes",
                        file.path().display()
                    ),
                ));
            }
            // Hostile refcounts may claim clusters past the end: start after them.
            let hi = start + blocks.len() as u64 + want;
            let mut claimed = None;
            for c in start..hi {
                if self.get(file, c)? != 0 {
                    claimed = Some(c);
                }
            }
            if let Some(c) = claimed {
                start = c + 1;
                continue;
            }
            if blocks.len() as u64 == nblocks && want == nclusters {
                break blocks;
            }
            nblocks = blocks.len() as u64;
            nclusters = want;
        };
        let area = start..start + nblocks + nclusters;
        let table_start = start + nblocks;
        let mut table = self.table.clone();
        table.resize((nclusters * cs / 8) as usize, 0);
        // 1. Refcounts of the area in blocks that already exist.
        for c in area.clone() {
            if !new_blocks.contains(&(c / pb)) {
                self.set(file, c, 1)?;
            }
        }
        // 2. The new blocks, each counting the area clusters it covers.
        let mut made = Vec::new();
        for (k, &ri) in new_blocks.iter().enumerate() {
            let mut b = vec![0u8; cs as usize];
            for c in area.clone().filter(|c| c / pb == ri) {
                set_refcount(&mut b, self.order, c % pb, 1);
            }
            let off = (start + k as u64) << self.cluster_bits;
            self.dirty.new_refblock(off);
            table[ri as usize] = off;
            made.push((off, b));
        }
        // 3. The new table (written whole by the flush), then the header switch.
        let table_offset = table_start << self.cluster_bits;
        self.dirty.reftable_moved(table_offset, nclusters as u32);
        let old = (self.table_offset >> self.cluster_bits, self.table_clusters);
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = nclusters;
        for (off, b) in made {
            self.metadata.insert(off >> self.cluster_bits);
            self.blocks.insert(off, b);
        }
        self.metadata.extend(area.clone());
        self.end = self.end.max(area.end);
        // 4. The old table, once the header no longer points to it.
        for c in old.0..old.0 + old.1 {
            self.release(c);
        }
        Ok(())
    }

    /// Moves the dirty refcount metadata into `plan` (refcount block pages, a moved table
    /// whole; the header switch or the table entries of new blocks) with the releases.
    pub fn take_plan(&mut self, plan: &mut Plan) {
        let cs = self.cs();
        for (off, ranges) in self.dirty.refblocks.take(cs) {
            let Some(b) = self.blocks.get(&off) else {
                continue;
            };
            for r in ranges {
                plan.refcounts.push(Write {
                    off: off + r.start,
                    bytes: b[r.start as usize..r.end as usize].to_vec(),
                });
            }
        }
        let table_bytes =
            || -> Vec<u8> { self.table.iter().flat_map(|e| e.to_be_bytes()).collect() };
        if let Some((off, clusters)) = self.dirty.header_reftable.take() {
            plan.refcounts.push(Write {
                off,
                bytes: table_bytes(),
            });
            let mut h = off.to_be_bytes().to_vec();
            h.extend_from_slice(&clusters.to_be_bytes());
            plan.reftable.push(Write { off: 48, bytes: h });
            self.dirty.reftable.take(0);
        } else {
            let len = self.table.len() as u64 * 8;
            let ranges = self.dirty.reftable.take(len);
            if !ranges.is_empty() {
                let bytes = table_bytes();
                for (_, rs) in ranges {
                    for r in rs {
                        plan.reftable.push(Write {
                            off: self.table_offset + r.start,
                            bytes: bytes[r.start as usize..r.end as usize].to_vec(),
                        });
                    }
                }
            }
        }
        plan.releases.append(&mut self.dirty.releases);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny image file: 512-byte clusters, cluster 0 header, 1 reftable cluster at 1, one
    /// refcount block at 2 covering clusters 0..2.
    /// Writes everything dirty as a flush would (releases applied, then written too);
    /// returns the header's refcount table fields if they changed.
    fn write_back(rc: &mut Refcounts, f: &HostFile) -> Option<(u64, u32)> {
        let mut header = None;
        for _ in 0..2 {
            let mut plan = Plan::default();
            rc.take_plan(&mut plan);
            rc.dirty.taken();
            for w in plan.refcounts.iter().chain(&plan.reftable) {
                if w.off == 48 {
                    let o = u64::from_be_bytes(w.bytes[..8].try_into().unwrap());
                    let n = u32::from_be_bytes(w.bytes[8..12].try_into().unwrap());
                    header = Some((o, n));
                } else {
                    f.write_all_at(&w.bytes, w.off).unwrap();
                }
            }
            for c in plan.releases {
                rc.decrement(f, c).unwrap();
            }
        }
        header
    }

    fn tiny(dir: &std::path::Path, order: u32) -> std::sync::Arc<HostFile> {
        let p = dir.join(format!("rc{order}"));
        let mut img = vec![0u8; 3 * 512];
        img[512..520].copy_from_slice(&1024u64.to_be_bytes());
        for c in 0..3 {
            set_refcount(&mut img[1024..1536], order, c, 1);
        }
        std::fs::write(&p, &img).unwrap();
        HostFile::open(&p, true).unwrap()
    }

    #[test]
    fn allocation_grows_blocks_and_table_and_stays_consistent() {
        let dir = std::env::temp_dir().join(format!("vmfs-rc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for order in [3u32, 4, 6] {
            let f = tiny(&dir, order);
            let mut rc = Refcounts::new(&f, 9, order, 512, 1).unwrap();
            let mut got = Vec::new();
            // 64 table entries * (4096 >> order) clusters: enough allocations to grow the table.
            let n = 64 * ((512 * 8) >> order) + 10;
            let mut header = None;
            for i in 0..n {
                got.push(rc.alloc(&f).unwrap());
                if i % 1000 == 999 {
                    header = write_back(&mut rc, &f).or(header);
                }
            }
            header = write_back(&mut rc, &f).or(header);
            assert!(header.is_some(), "order {order}: table never grew");
            let mut seen = HashSet::new();
            for &c in &got {
                assert!(seen.insert(c), "cluster {c} handed out twice");
                assert!(!rc.metadata.contains(&c));
                assert_eq!(rc.get(&f, c).unwrap(), 1);
            }
            // A freed cluster is handed out again first.
            rc.release(got[5]);
            assert_ne!(rc.alloc(&f).unwrap(), got[5], "released before the flush");
            write_back(&mut rc, &f);
            assert_eq!(rc.alloc(&f).unwrap(), got[5]);
            write_back(&mut rc, &f);
            // A fresh reader of the file agrees with the in-memory state.
            let (to, tc) = header.unwrap();
            let mut again = Refcounts::new(&f, 9, order, to, u64::from(tc)).unwrap();
            for &c in got.iter().take(50).chain(got.iter().rev().take(50)) {
                assert_eq!(again.get(&f, c).unwrap(), 1);
            }
            assert!(rc.decrement(&f, 2).is_ok());
            assert!(rc.decrement(&f, 2).is_err(), "underflow must be refused");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn table_growth_skips_clusters_a_hostile_block_claims() {
        let dir = std::env::temp_dir().join(format!("vmfs-rc-claim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        // 64-bit refcounts, 512-byte clusters: 64 per block, 64 blocks per table cluster.
        // Block 63 (at cluster 3) claims clusters 4090..4096 past the end of the file.
        let mut img = vec![0u8; 4 * 512];
        img[512..520].copy_from_slice(&1024u64.to_be_bytes());
        img[512 + 63 * 8..512 + 64 * 8].copy_from_slice(&1536u64.to_be_bytes());
        for c in 0..4 {
            set_refcount(&mut img[1024..1536], 6, c, 1);
        }
        for c in 4090..4096 {
            set_refcount(&mut img[1536..2048], 6, c % 64, 1);
        }
        std::fs::write(&p, &img).unwrap();
        let f = HostFile::open(&p, true).unwrap();
        let mut rc = Refcounts::new(&f, 9, 6, 512, 1).unwrap();
        while rc.dirty.header_reftable.is_none() {
            let c = rc.alloc(&f).unwrap();
            assert!(!(4090..4096).contains(&c), "handed out claimed cluster {c}");
        }
        let t = rc.table_offset / 512;
        assert!(
            t >= 4096,
            "new table at cluster {t} overlaps the claimed clusters"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
