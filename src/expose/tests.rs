use super::*;
use crate::cache::ByteCache;
use crate::format::raw::RawLayer;
use crate::format::{Extent, Format, Layer, Mapping, OpenCtx};
use crate::view::View;
use crate::write::{BelowReader, LayerWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn seeded(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Tmp(PathBuf);

impl Tmp {
    fn new(name: &str, bytes: &[u8]) -> Tmp {
        let p = std::env::temp_dir().join(format!("vmfs-expose-{name}-{}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        Tmp(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A raw file written in place, with holes where it reads zeros by mapping.
#[derive(Debug)]
struct Holey {
    file: Arc<HostFile>,
    /// [start, end) ranges that map as Zero.
    holes: Vec<(u64, u64)>,
}

impl Layer for Holey {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn path(&self) -> &Path {
        self.file.path()
    }
    fn virtual_size(&self) -> u64 {
        self.file.len()
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        for (s, e) in &self.holes {
            if (*s..*e).contains(&off) {
                return Ok(Extent {
                    len: len.min(e - off),
                    map: Mapping::Zero,
                });
            }
        }
        let next_hole = self
            .holes
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s > off)
            .min()
            .unwrap_or(u64::MAX);
        Ok(Extent {
            len: len.min(next_hole - off),
            map: Mapping::Data {
                file: self.file.clone(),
                host_off: off,
            },
        })
    }
    fn files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }
    fn writer(&self) -> Option<&dyn LayerWriter> {
        Some(self)
    }
}

impl LayerWriter for Holey {
    fn write(&self, off: u64, data: &[u8], _below: BelowReader<'_>) -> Result<()> {
        self.file.write_all_at(data, off)
    }
    fn discard(&self, off: u64, len: u64, _below: BelowReader<'_>) -> Result<()> {
        self.file.write_all_at(&vec![0; len as usize], off)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

fn disk(layer: Arc<dyn Layer>, writable: bool) -> Arc<DiskFile> {
    let size = layer.virtual_size();
    let view = Arc::new(View::new(
        vec![layer],
        size,
        Arc::new(ByteCache::new(1 << 20)),
        64,
    ));
    Arc::new(DiskFile::new(
        view,
        writable,
        UNIX_EPOCH + Duration::from_secs(77),
    ))
}

fn read_all(f: &dyn ExposedFile) -> Vec<u8> {
    let mut buf = vec![0; f.size() as usize + 100];
    let n = f.read(0, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn ranges_read_write_seek_and_count_inside_their_window() {
    const MIB: u64 = 1 << 20;
    let data = seeded(3, 4 * MIB as usize);
    let tmp = Tmp::new("range", &data);
    let layer = Arc::new(Holey {
        file: HostFile::open(&tmp.0, true).unwrap(),
        holes: vec![(MIB, 2 * MIB), (3 * MIB, 3 * MIB + 4096)],
    });
    let d = disk(layer, true);
    let whole: Arc<dyn ExposedFile> = d.clone();
    let part = RangeFile::new(whole.clone(), MIB / 2, 2 * MIB, true);
    assert!(part.writable() && part.mutable());
    assert_eq!(part.size(), 2 * MIB);
    let mut want = data[MIB as usize / 2..(MIB / 2 + 2 * MIB) as usize].to_vec();
    want[MIB as usize / 2..3 * MIB as usize / 2].fill(0);
    assert_eq!(read_all(&part), want);
    // SEEK_DATA/SEEK_HOLE are relative to the range and end at it.
    assert_eq!(part.next_data(0).unwrap(), Some(0));
    assert_eq!(part.next_hole(0).unwrap(), MIB / 2);
    assert_eq!(part.next_data(MIB / 2).unwrap(), Some(3 * MIB / 2));
    assert_eq!(part.next_hole(3 * MIB / 2).unwrap(), 2 * MIB);
    assert_eq!(part.next_data(2 * MIB).unwrap(), None);
    assert_eq!(part.allocated_bytes().unwrap(), MIB);
    // Writes land in the disk, shifted by the start; none pass the end of the range.
    part.write(10, b"hello").unwrap();
    let mut b = [0; 5];
    whole.read(MIB / 2 + 10, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    assert_eq!(
        part.write(2 * MIB - 2, b"abc").unwrap_err().kind(),
        Kind::InvalidInput
    );
    assert!(part.discard(2 * MIB, 1).is_err());
    // A range of a read-only disk, or one asked to be read-only, takes no writes.
    let ro = RangeFile::new(whole.clone(), 0, MIB, false);
    assert_eq!(ro.write(0, b"x").unwrap_err().kind(), Kind::ReadOnly);
    // Clipped to the file: a range past the end is empty, never out of bounds.
    let past = RangeFile::new(whole.clone(), 10 * MIB, MIB, true);
    assert!(past.is_empty());
    assert_eq!(read_all(&past), Vec::<u8>::new());
    assert_eq!(RangeFile::new(whole, 4 * MIB - 7, MIB, true).size(), 7);
}

#[test]
fn disks_watch_ranges_and_move_their_mtime_on_writes() {
    let tmp = Tmp::new("watch", &seeded(4, 1 << 20));
    let layer = Arc::new(Holey {
        file: HostFile::open(&tmp.0, true).unwrap(),
        holes: Vec::new(),
    });
    let d = disk(layer.clone(), true);
    assert_eq!(d.mtime(), UNIX_EPOCH + Duration::from_secs(77));
    d.watch(vec![0..512, 4096..8192]);
    d.write(1024, b"x").unwrap();
    assert!(!d.touched(), "outside the watched ranges");
    assert!(d.mtime() > UNIX_EPOCH + Duration::from_secs(77));
    d.write(4000, &[1; 100]).unwrap();
    assert!(d.take_touched());
    assert!(!d.take_touched(), "taken");
    d.discard(500, 20).unwrap();
    assert!(d.take_touched());
    let ro = disk(layer, false);
    assert!(!ro.writable() && !ro.mutable());
    assert_eq!(ro.write(0, b"x").unwrap_err().kind(), Kind::ReadOnly);
    assert!(
        d.identity_file().is_none(),
        "writable disks are never passed through"
    );
    assert!(ro.identity_file().is_some());
}

#[test]
fn read_only_raw_disks_are_their_host_file() {
    let tmp = Tmp::new("ident", &seeded(5, 8192));
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(1 << 20)), false);
    let raw = RawLayer::open(&tmp.0, &ctx).unwrap();
    let d = disk(raw, false);
    assert_eq!(d.identity_file().unwrap().path(), tmp.0.as_path());
}

#[test]
fn concatenations_read_across_parts_and_write_only_inside_writable_ones() {
    let data = seeded(6, 10_000);
    let tmp = Tmp::new("concat", &data);
    let layer = Arc::new(Holey {
        file: HostFile::open(&tmp.0, true).unwrap(),
        holes: vec![(4096, 8192)],
    });
    let d: Arc<dyn ExposedFile> = disk(layer, true);
    let tail: Arc<dyn ExposedFile> =
        Arc::new(BytesFile::new(b"FOOTER".to_vec(), SystemTime::UNIX_EPOCH));
    let c = ConcatFile::new(vec![d.clone(), tail]).unwrap();
    assert_eq!(c.size(), 10_006);
    let mut want = data.clone();
    want[4096..8192].fill(0);
    want.extend_from_slice(b"FOOTER");
    assert_eq!(read_all(&c), want);
    let mut b = [0; 10];
    assert_eq!(c.read(9_998, &mut b).unwrap(), 8);
    assert_eq!(&b[..8], &want[9_998..]);
    assert_eq!(c.next_data(4096).unwrap(), Some(8192));
    assert_eq!(c.next_hole(0).unwrap(), 4096);
    assert_eq!(c.next_hole(8192).unwrap(), 10_006);
    assert_eq!(c.next_data(10_001).unwrap(), Some(10_001));
    assert_eq!(c.allocated_bytes().unwrap(), 10_000 - 4096 + 6);
    c.write(9_990, &[7; 10]).unwrap();
    assert_eq!(c.write(9_995, &[7; 10]).unwrap_err().kind(), Kind::ReadOnly);
    assert_eq!(c.write(10_001, b"x").unwrap_err().kind(), Kind::ReadOnly);
    assert!(c.write(10_006, b"x").is_err());
    assert!(c.writable() && c.mutable());
}

#[test]
fn bytes_files_read_what_they_hold() {
    let f = BytesFile::new(b"0123456789".to_vec(), UNIX_EPOCH);
    let mut b = [0; 4];
    assert_eq!(f.read(8, &mut b).unwrap(), 2);
    assert_eq!(&b[..2], b"89");
    assert_eq!(f.read(10, &mut b).unwrap(), 0);
    assert_eq!(f.read(u64::MAX, &mut b).unwrap(), 0);
    assert!(!f.writable() && !f.mutable());
    assert_eq!(f.write(0, b"x").unwrap_err().kind(), Kind::ReadOnly);
}

#[test]
fn memory_files_take_writes_in_place_and_keep_their_size() {
    let f = MemoryFile::new(b"0123456789".to_vec(), UNIX_EPOCH);
    assert!(f.writable() && f.mutable());
    f.write(2, b"ab").unwrap();
    let mut b = [0; 12];
    assert_eq!(f.read(0, &mut b).unwrap(), 10);
    assert_eq!(&b[..10], b"01ab456789");
    assert!(f.mtime() > UNIX_EPOCH);
    // Nothing past the end: the size never changes.
    assert_eq!(f.write(8, b"xyz").unwrap_err().kind(), Kind::InvalidInput);
    assert_eq!(
        f.write(u64::MAX, b"x").unwrap_err().kind(),
        Kind::InvalidInput
    );
    f.discard(0, 2).unwrap();
    assert_eq!(f.read(0, &mut b).unwrap(), 10);
    assert_eq!(&b[..10], b"\0\0ab456789");
    assert_eq!(f.size(), 10);
    assert_eq!(f.read(10, &mut b).unwrap(), 0);
}
