//! Seeks over changes that a crafted table splits into endless pieces stop after a bounded
//! number of translations and answer conservatively.

use super::*;
use crate::format::{Extent, Format};
use crate::storage::HostFile;
use std::path::Path;

/// A layer answering in 4 KiB pieces of one kind (a real driver would merge them).
#[derive(Debug)]
struct Pieces {
    map: Mapping,
    size: u64,
}

impl Layer for Pieces {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn path(&self) -> &Path {
        Path::new("pieces")
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            len: len.min(4096 - off % 4096),
            map: self.map.clone(),
        })
    }
    fn files(&self) -> Vec<Arc<HostFile>> {
        Vec::new()
    }
}

/// The changes from a base to itself under one `Pieces` layer of `map`.
fn over_base(map: Mapping) -> Changes {
    let size = 1 << 50;
    let base: Arc<dyn Layer> = Arc::new(Pieces {
        map: Mapping::Zero,
        size,
    });
    let top: Arc<dyn Layer> = Arc::new(Pieces { map, size });
    let new = [top, base.clone()];
    Changes::between(std::slice::from_ref(&base), size, &new, size)
}

#[test]
fn a_seek_over_endless_unchanged_pieces_stops_and_calls_the_rest_changed() {
    let c = over_base(Mapping::Unallocated);
    let stop = 4096 * u64::from(SEEK_BUDGET);
    assert_eq!(c.next_changed(0).unwrap(), Some(stop));
    assert_eq!(c.next_unchanged(12345).unwrap(), 12345);
    assert_eq!(c.changed_bytes().unwrap(), c.size() - 4 * stop);
    // Reads are exact, whatever their length.
    assert!(c.ranges(0, 1 << 30).unwrap().is_empty());
}

#[test]
fn a_seek_over_endless_changed_pieces_answers_the_end() {
    let c = over_base(Mapping::Zero);
    assert_eq!(c.next_unchanged(0).unwrap(), c.size());
    assert_eq!(c.next_changed(12345).unwrap(), Some(12345));
    assert_eq!(c.changed_bytes().unwrap(), c.size());
}
