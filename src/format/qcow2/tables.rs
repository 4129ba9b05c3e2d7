//! The L2 tables the read path and the writer share, and their coherence.
//!
//! Every lookup of an L2 table (a read mapping guest bytes, the writer changing an entry) goes
//! through [`l2_table`]. The read path never needs to know whether the image is being written.
//!
//! Tables the writer changes become "live": arrays of atomic words shared by the writer
//! (which updates single entries in place, under its metadata lock; its write-back cache
//! writes them to the file later) and every reader, so an update costs no copy of the
//! table. Live tables are bounded in number; one pushed out is published to the shared
//! table cache first (one copy), then forgotten, so a reader always finds the newest
//! contents in one or the other. A table whose changes are not in the file yet is pinned:
//! never pushed out, since the cache may drop it and a reload would read stale bytes.
//!
//! Tables the writer never changed go through the cache. A reader that loads one from the
//! file while the writer makes it live could otherwise insert the stale copy afterwards:
//! every publication bumps a sequence number and a load caches its result only if no
//! publication happened since it started.

use super::Qcow2Image;
use crate::cache::{Blob, ByteCache, Key};
use crate::endian::be64;
use crate::error::Result;
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Cache tag of qcow2 L2 tables in the shared table cache.
pub const TAG_L2: u8 = 0x32;

/// The L2 table at `l2_off` of `img`: the writer's live copy, or through the shared table
/// cache (loaded from the file on a miss).
pub fn l2_table(img: &Qcow2Image, l2_off: u64) -> Result<L2Ref> {
    let file = &img.file;
    let cs = img.geometry.cluster_size();
    let key = Key::new(file.id(), l2_off, TAG_L2);
    img.l2_sync.get(&img.tables, key, || {
        file.read_table(l2_off, cs, cs, "L2 table")
    })
}

/// Live tables kept at most (bytes): past this, the oldest goes back to the cache.
const LIVE_BUDGET: usize = 32 << 20;
const MIN_LIVE_TABLES: usize = 16;

/// An L2 table the writer updates in place: its big-endian words, as u64 values.
pub struct LiveTable {
    words: Box<[AtomicU64]>,
}

impl LiveTable {
    fn from_bytes(b: &[u8]) -> LiveTable {
        LiveTable {
            words: b
                .chunks_exact(8)
                .map(|c| AtomicU64::new(be64(c, 0)))
                .collect(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_be_bytes())
            .collect()
    }

    fn word(&self, byte_off: usize) -> u64 {
        if !byte_off.is_multiple_of(8) {
            return 0;
        }
        self.words
            .get(byte_off / 8)
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Stores big-endian `bytes` (whole words) at `byte_off`.
    fn store(&self, byte_off: usize, bytes: &[u8]) {
        for (i, c) in bytes.chunks_exact(8).enumerate() {
            if let Some(w) = self.words.get(byte_off / 8 + i) {
                w.store(be64(c, 0), Ordering::Release);
            }
        }
    }
}

/// An L2 table as a reader sees it: a cached immutable copy or the live one.
#[derive(Clone)]
pub enum L2Ref {
    Cached(Blob),
    Live(Arc<LiveTable>),
}

impl L2Ref {
    /// The big-endian word at `byte_off` (0 past the end, like `be64`).
    pub fn word(&self, byte_off: usize) -> u64 {
        match self {
            L2Ref::Cached(b) => be64(b, byte_off),
            L2Ref::Live(t) => t.word(byte_off),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            L2Ref::Cached(b) => b.to_vec(),
            L2Ref::Live(t) => t.to_bytes(),
        }
    }
}

#[derive(Default)]
struct Live {
    tables: HashMap<u64, Arc<LiveTable>>,
    /// Table offsets in the order they became live (the oldest is pushed out first).
    order: VecDeque<u64>,
    /// Tables with changes not yet in the file: never pushed out.
    pinned: std::collections::HashSet<u64>,
}

pub struct L2Sync {
    seq: AtomicU64,
    insert: Mutex<()>,
    live: RwLock<Live>,
    live_budget: usize,
}

impl Default for L2Sync {
    fn default() -> L2Sync {
        L2Sync::with_budget(LIVE_BUDGET)
    }
}

impl L2Sync {
    fn with_budget(live_budget: usize) -> L2Sync {
        L2Sync {
            seq: AtomicU64::new(0),
            insert: Mutex::new(()),
            live: RwLock::new(Live::default()),
            live_budget,
        }
    }

    /// The table at `key`: live, cached, or loaded with `load` (outside any lock).
    pub fn get(
        &self,
        tables: &ByteCache,
        key: Key,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<L2Ref> {
        if let Some(t) = self.live.read().tables.get(&key.offset) {
            return Ok(L2Ref::Live(t.clone()));
        }
        self.get_or_load(tables, key, load).map(L2Ref::Cached)
    }

    /// The cached table, or one loaded with `load` (outside any lock).
    fn get_or_load(
        &self,
        tables: &ByteCache,
        key: Key,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Blob> {
        if let Some(b) = tables.get(&key) {
            return Ok(b);
        }
        let seq = self.seq.load(Ordering::Acquire);
        let blob: Blob = load()?.into();
        let _g = self.insert.lock();
        if self.seq.load(Ordering::Acquire) == seq {
            tables.insert(key, blob.clone());
        }
        Ok(blob)
    }

    /// Publishes a table into the cache (its bytes are already in the file).
    fn publish(&self, tables: &ByteCache, key: Key, blob: Blob) {
        let _g = self.insert.lock();
        self.seq.fetch_add(1, Ordering::AcqRel);
        tables.insert(key, blob);
    }

    /// Writer only (under its metadata lock): stores `bytes` at `at` in the table at `key`,
    /// whose current contents are `current`, making it live if it is not. Until the bytes
    /// are in the file the writer keeps the table pinned.
    pub fn update(&self, tables: &ByteCache, key: Key, current: &L2Ref, at: u64, bytes: &[u8]) {
        let t = match current {
            L2Ref::Live(t) => t.clone(),
            L2Ref::Cached(b) => self.make_live(tables, key, LiveTable::from_bytes(b)),
        };
        t.store(at as usize, bytes);
    }

    /// Writer only: a whole new table becomes live.
    pub fn replace(&self, tables: &ByteCache, key: Key, table: &[u8]) {
        self.make_live(tables, key, LiveTable::from_bytes(table));
    }

    /// Writer only: the live table at `offset` stays live until unpinned.
    pub fn pin(&self, offset: u64) {
        self.live.write().pinned.insert(offset);
    }

    /// Writer only: every pinned table is in the file now.
    pub fn unpin_all(&self) {
        self.live.write().pinned.clear();
    }

    fn make_live(&self, tables: &ByteCache, key: Key, t: LiveTable) -> Arc<LiveTable> {
        let t = Arc::new(t);
        let limit = (self.live_budget / (t.words.len() * 8).max(1)).max(MIN_LIVE_TABLES);
        let mut live = self.live.write();
        if live.tables.insert(key.offset, t.clone()).is_none() {
            live.order.push_back(key.offset);
        }
        // Readers find it live from now on; a copy loading meanwhile must not be cached.
        {
            let _g = self.insert.lock();
            self.seq.fetch_add(1, Ordering::AcqRel);
            tables.invalidate(&key);
        }
        while live.tables.len() > limit {
            // The oldest unpinned one (the writer flushes before too many are pinned).
            let Some(at) = live.order.iter().position(|o| !live.pinned.contains(o)) else {
                break;
            };
            let Some(old) = live.order.remove(at) else {
                break;
            };
            if let Some(ot) = live.tables.get(&old).cloned() {
                // Cache first, then forget: a reader finds the newest contents in one of them.
                let okey = Key::new(key.file, old, key.tag);
                self.publish(tables, okey, ot.to_bytes().into());
                live.tables.remove(&old);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_racing_with_a_publication_is_not_cached() {
        let tables = ByteCache::new(1 << 20);
        let sync = L2Sync::default();
        let key = Key::new(1, 0, 0x32);
        let got = sync
            .get(&tables, key, || {
                // The writer makes the table live while this (stale) load is in flight.
                sync.replace(&tables, key, &[0, 0, 0, 0, 0, 0, 0, 2]);
                Ok(vec![0, 0, 0, 0, 0, 0, 0, 1])
            })
            .unwrap();
        assert_eq!(got.word(0), 1);
        assert!(tables.get(&key).is_none());
        assert_eq!(
            sync.get(&tables, key, || unreachable!()).unwrap().word(0),
            2
        );
        let k2 = Key::new(1, 512, 0x32);
        sync.get(&tables, k2, || Ok(vec![3; 8])).unwrap();
        assert_eq!(tables.get(&k2).unwrap()[0], 3);
    }

    #[test]
    fn updates_are_seen_in_place_and_survive_being_pushed_out() {
        let tables = ByteCache::new(1 << 20);
        let sync = L2Sync::with_budget(0); // keeps MIN_LIVE_TABLES
        let key = |i: u64| Key::new(1, i << 9, 0x32);
        let load = || Ok(vec![0u8; 64]);
        let first = sync.get(&tables, key(0), load).unwrap();
        sync.update(&tables, key(0), &first, 8, &7u64.to_be_bytes());
        let held = sync.get(&tables, key(0), load).unwrap();
        assert!(matches!(held, L2Ref::Live(_)));
        assert_eq!(held.word(8), 7);
        sync.update(&tables, key(0), &held, 16, &9u64.to_be_bytes());
        assert_eq!(held.word(16), 9, "updated in place");
        for i in 1..=MIN_LIVE_TABLES as u64 + 3 {
            sync.replace(&tables, key(i), &[0u8; 64]);
        }
        assert_eq!(sync.live.read().tables.len(), MIN_LIVE_TABLES);
        // A pinned table stays live however many come after it.
        sync.pin(key(100).offset);
        sync.replace(&tables, key(100), &[1u8; 64]);
        for i in 200..200 + MIN_LIVE_TABLES as u64 {
            sync.replace(&tables, key(i), &[0u8; 64]);
        }
        assert!(matches!(
            sync.get(&tables, key(100), || unreachable!()).unwrap(),
            L2Ref::Live(_)
        ));
        sync.unpin_all();
        // Pushed out: the cache holds the newest contents.
        let back = sync.get(&tables, key(0), || unreachable!()).unwrap();
        assert!(matches!(back, L2Ref::Cached(_)));
        assert_eq!((back.word(8), back.word(16), back.word(24)), (7, 9, 0));
    }
}
