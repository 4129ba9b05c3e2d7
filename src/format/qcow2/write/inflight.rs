//! Guest clusters whose L2 entry is being changed. Copy-on-write does its data I/O without the
//! metadata lock, so a second writer (or a discard) of the same guest cluster must wait until
//! the first one has published its entry; it then sees the new cluster and writes in place.

use parking_lot::{Condvar, Mutex};
use std::collections::HashSet;

#[derive(Default)]
pub struct InFlight {
    clusters: Mutex<HashSet<u64>>,
    released: Condvar,
}

/// Holds guest cluster `g` for its owner until dropped (also on error paths).
pub struct Claim<'a> {
    set: &'a InFlight,
    g: u64,
}

impl InFlight {
    /// Waits until no one else holds guest cluster `g`, then holds it.
    /// A thread must hold at most one claim at a time (no lock order between claims).
    pub fn claim(&self, g: u64) -> Claim<'_> {
        let mut set = self.clusters.lock();
        while set.contains(&g) {
            self.released.wait(&mut set);
        }
        set.insert(g);
        Claim { set: self, g }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set.clusters.lock().remove(&self.g);
        self.set.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn one_holder_per_cluster_at_a_time() {
        let f = Arc::new(InFlight::default());
        let inside = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (f, inside) = (f.clone(), inside.clone());
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let _c = f.claim(i % 3);
                        let before = inside.fetch_or(1 << (i % 3), Ordering::SeqCst);
                        assert_eq!(before & (1 << (i % 3)), 0, "cluster held twice");
                        inside.fetch_and(!(1 << (i % 3)), Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(f.clusters.lock().is_empty());
    }
}
