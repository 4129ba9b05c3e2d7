//! Coherence of cached L2 tables with in-place updates. A reader that loads a table from the
//! file while the writer rewrites it could otherwise insert the stale copy after the writer
//! published the new one; here every publication bumps a sequence number and a load caches
//! its result only if no publication happened since it started.

use crate::cache::{Blob, ByteCache, Key};
use crate::error::Result;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct L2Sync {
    seq: AtomicU64,
    insert: Mutex<()>,
}

impl L2Sync {
    /// The cached table, or one loaded with `load` (outside any lock).
    pub fn get_or_load(
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

    /// Publishes a table the writer has just written to the file.
    pub fn publish(&self, tables: &ByteCache, key: Key, blob: Blob) {
        let _g = self.insert.lock();
        self.seq.fetch_add(1, Ordering::AcqRel);
        tables.insert(key, blob);
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
            .get_or_load(&tables, key, || {
                // The writer publishes while this (stale) load is in flight.
                sync.publish(&tables, key, vec![2u8].into());
                Ok(vec![1u8])
            })
            .unwrap();
        assert_eq!(&*got, &[1]);
        assert_eq!(&*tables.get(&key).unwrap(), &[2]);
        let k2 = Key::new(1, 512, 0x32);
        sync.get_or_load(&tables, k2, || Ok(vec![3])).unwrap();
        assert_eq!(&*tables.get(&k2).unwrap(), &[3]);
    }
}
