//! A byte-budgeted, sharded LRU of immutable blobs (decoded tables, decompressed clusters).
//!
//! Keyed by (host file id, host offset), so every view of one file (the live view and each
//! internal snapshot) shares the entries. Loads happen outside the lock: on a miss the caller
//! reads the table, then inserts it; two threads racing on one key both load, which is
//! harmless because entries are immutable.

use crate::error::Result;
use lru::LruCache;
use parking_lot::Mutex;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub file: u64,
    pub offset: u64,
    /// Distinguishes table kinds that could share an offset (e.g. L2 table vs refcount block).
    pub tag: u8,
}

impl Key {
    pub fn new(file: u64, offset: u64, tag: u8) -> Key {
        Key { file, offset, tag }
    }
}

pub type Blob = Arc<[u8]>;

struct Shard {
    lru: LruCache<Key, Blob>,
    bytes: usize,
}

pub struct ByteCache {
    shards: Box<[Mutex<Shard>]>,
    budget_per_shard: usize,
}

const SHARDS: usize = 16;

impl ByteCache {
    pub fn new(budget_bytes: usize) -> ByteCache {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::unbounded(),
                    bytes: 0,
                })
            })
            .collect();
        ByteCache {
            shards,
            budget_per_shard: (budget_bytes / SHARDS).max(1),
        }
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    pub fn get(&self, key: &Key) -> Option<Blob> {
        self.shard(key).lock().lru.get(key).cloned()
    }

    pub fn insert(&self, key: Key, blob: Blob) {
        let mut s = self.shard(&key).lock();
        s.bytes += blob.len();
        if let Some(old) = s.lru.put(key, blob) {
            s.bytes -= old.len();
        }
        // Keep at least the entry just inserted, even if it alone exceeds the budget.
        while s.bytes > self.budget_per_shard && s.lru.len() > 1 {
            match s.lru.pop_lru() {
                Some((_, v)) => s.bytes -= v.len(),
                None => break,
            }
        }
    }

    pub fn invalidate(&self, key: &Key) {
        let mut s = self.shard(key).lock();
        if let Some(v) = s.lru.pop(key) {
            s.bytes -= v.len();
        }
    }

    /// Returns the cached blob or loads it with `load` (no lock held while loading).
    pub fn get_or_load(&self, key: Key, load: impl FnOnce() -> Result<Vec<u8>>) -> Result<Blob> {
        if let Some(b) = self.get(&key) {
            return Ok(b);
        }
        let blob: Blob = load()?.into();
        self.insert(key, blob.clone());
        Ok(blob)
    }

    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_budget_and_keeps_recent_entries() {
        let c = ByteCache::new(16 * 1024);
        for i in 0..1000u64 {
            c.insert(Key::new(1, i, 0), vec![0u8; 512].into());
        }
        assert!(c.bytes() <= 16 * 1024 + SHARDS * 512);
        assert!(c.get(&Key::new(1, 999, 0)).is_some());
        assert!(c.get(&Key::new(1, 0, 0)).is_none());
    }

    #[test]
    fn load_errors_are_not_cached() {
        let c = ByteCache::new(1 << 20);
        let k = Key::new(2, 0, 0);
        assert!(
            c.get_or_load(k, || Err(crate::error::Error::invalid("x")))
                .is_err()
        );
        assert_eq!(&*c.get_or_load(k, || Ok(vec![5])).unwrap(), &[5]);
    }
}
