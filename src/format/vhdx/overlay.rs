//! The image as it would look after replaying its log: the host file plus an in-memory map of
//! replayed ranges (4 KiB data sectors and zeroed runs). The image itself is never written.
//!
//! Metadata reads (region table, metadata, BAT, sector bitmaps) patch the bytes they read;
//! payload mappings that hit a replayed data sector point into a private, unlinked copy of
//! the replayed sectors, so the view can read them like any other host data.

use crate::error::{Error, Result};
use crate::format::Mapping;
use crate::storage::HostFile;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug)]
enum Fill {
    Zero,
    /// Replayed bytes; `packed` is their offset in the private copy once frozen.
    Data {
        bytes: Arc<[u8]>,
        packed: u64,
    },
}

#[derive(Clone, Debug)]
struct Segment {
    end: u64,
    fill: Fill,
}

/// Non-overlapping replayed ranges keyed by start offset; later writes replace earlier ones.
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    segs: BTreeMap<u64, Segment>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// The end of the highest replayed range (0 if none).
    pub fn end(&self) -> u64 {
        self.segs.values().next_back().map_or(0, |s| s.end)
    }

    pub fn write_data(&mut self, off: u64, bytes: Vec<u8>) {
        let end = off.saturating_add(bytes.len() as u64);
        self.insert(
            off,
            end,
            Fill::Data {
                bytes: bytes.into(),
                packed: 0,
            },
        );
    }

    pub fn write_zeros(&mut self, off: u64, len: u64) {
        self.insert(off, off.saturating_add(len), Fill::Zero);
    }

    fn insert(&mut self, start: u64, end: u64, fill: Fill) {
        if start >= end {
            return;
        }
        let overlapping: Vec<u64> = self
            .segs
            .range(..end)
            .rev()
            .take_while(|(_, s)| s.end > start)
            .map(|(&k, _)| k)
            .collect();
        for k in overlapping {
            let Some(old) = self.segs.remove(&k) else {
                continue;
            };
            if k < start {
                self.segs.insert(
                    k,
                    Segment {
                        end: start,
                        fill: slice(&old.fill, 0, start - k),
                    },
                );
            }
            if old.end > end {
                self.segs.insert(
                    end,
                    Segment {
                        end: old.end,
                        fill: slice(&old.fill, end - k, old.end - k),
                    },
                );
            }
        }
        self.segs.insert(start, Segment { end, fill });
    }

    /// Patches `buf` (the file's bytes at `off`) with the replayed ranges.
    pub fn apply(&self, buf: &mut [u8], off: u64) {
        let end = off.saturating_add(buf.len() as u64);
        let first = self.segs.range(..=off).next_back().map_or(off, |(&k, _)| k);
        for (&k, seg) in self.segs.range(first..end) {
            let from = k.max(off);
            let to = seg.end.min(end);
            if from >= to {
                continue;
            }
            let dst = &mut buf[(from - off) as usize..(to - off) as usize];
            match &seg.fill {
                Fill::Zero => dst.fill(0),
                Fill::Data { bytes, .. } => {
                    let s = (from - k) as usize;
                    dst.copy_from_slice(&bytes[s..s + dst.len()]);
                }
            }
        }
    }

    /// Assigns each data range its place in the private copy and returns that copy's bytes.
    fn freeze(&mut self) -> Vec<u8> {
        let mut packed = Vec::new();
        for seg in self.segs.values_mut() {
            if let Fill::Data { bytes, packed: at } = &mut seg.fill {
                *at = packed.len() as u64;
                packed.extend_from_slice(bytes);
            }
        }
        packed
    }
}

fn slice(fill: &Fill, from: u64, to: u64) -> Fill {
    match fill {
        Fill::Zero => Fill::Zero,
        Fill::Data { bytes, .. } => Fill::Data {
            bytes: bytes[from as usize..to as usize].into(),
            packed: 0,
        },
    }
}

/// Reads of one VHDX file as if its log had been replayed.
#[derive(Debug)]
pub struct Replayed {
    file: Arc<HostFile>,
    overlay: Overlay,
    /// The replayed file's size: at least the host size, LastFileOffset and every replayed range.
    len: u64,
    /// The private copy of replayed data sectors (only when there are any).
    copy: Option<Arc<HostFile>>,
}

impl Replayed {
    /// A file without replayed ranges.
    pub fn plain(file: Arc<HostFile>) -> Replayed {
        let len = file.len();
        Replayed {
            file,
            overlay: Overlay::default(),
            len,
            copy: None,
        }
    }

    pub fn new(file: Arc<HostFile>, mut overlay: Overlay, min_len: u64) -> Result<Replayed> {
        let len = file.len().max(min_len).max(overlay.end());
        let packed = overlay.freeze();
        let copy = if packed.is_empty() {
            None
        } else {
            Some(private_copy(file.path(), &packed)?)
        };
        Ok(Replayed {
            file,
            overlay,
            len,
            copy,
        })
    }

    pub fn file(&self) -> &Arc<HostFile> {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.len
    }

    /// Reads metadata bytes [off, off+buf.len()) of the replayed file; the range must lie
    /// inside it.
    pub fn read(&self, buf: &mut [u8], off: u64, field: &str) -> Result<()> {
        let end = off.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(Error::corrupt(
                self.file.path(),
                field,
                off,
                format!(
                    "{} bytes reach past the end of the file ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        let in_file = self.file.len().saturating_sub(off).min(buf.len() as u64) as usize;
        if in_file > 0 {
            self.file.read_exact_at(&mut buf[..in_file], off, field)?;
        }
        buf[in_file..].fill(0);
        self.overlay.apply(buf, off);
        Ok(())
    }

    pub fn read_vec(&self, off: u64, len: u64, limit: u64, field: &str) -> Result<Vec<u8>> {
        if len > limit {
            return Err(Error::corrupt(
                self.file.path(),
                field,
                off,
                format!("size {len} exceeds the limit of {limit} bytes"),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.read(&mut buf, off, field)?;
        Ok(buf)
    }

    /// Maps payload bytes at host offset `off` (up to `len` of them): host data, replayed
    /// data in the private copy, or zeros (replayed zeros, or past the host file's end).
    pub fn map_data(&self, off: u64, len: u64) -> (Mapping, u64) {
        let covering = self
            .overlay
            .segs
            .range(..=off)
            .next_back()
            .filter(|(_, s)| s.end > off);
        if let Some((&start, seg)) = covering {
            let n = len.min(seg.end - off);
            return match (&seg.fill, &self.copy) {
                (Fill::Data { packed, .. }, Some(copy)) => (
                    Mapping::Data {
                        file: copy.clone(),
                        host_off: packed + (off - start),
                    },
                    n,
                ),
                _ => (Mapping::Zero, n),
            };
        }
        let mut n = len;
        if let Some((&next, _)) = self.overlay.segs.range(off..).next() {
            n = n.min(next - off);
        }
        let host_len = self.file.len();
        if off >= host_len {
            (Mapping::Zero, n)
        } else {
            (
                Mapping::Data {
                    file: self.file.clone(),
                    host_off: off,
                },
                n.min(host_len - off),
            )
        }
    }
}

/// Writes `bytes` to a new private temporary file, opens it read-only and unlinks it.
fn private_copy(image: &Path, bytes: &[u8]) -> Result<Arc<HostFile>> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "vmfs-vhdx-replay-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let path = std::env::temp_dir().join(name);
    let io = |e| Error::io(&path, "write replayed log sectors", e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let written = f.write_all(bytes).map_err(io);
    drop(f);
    let opened = written.and_then(|_| HostFile::open(&path, false));
    let _ = std::fs::remove_file(&path);
    opened.map_err(|e| e.context(format!("replaying the log of {}", image.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(o: &Overlay, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0xEEu8; len];
        o.apply(&mut b, off);
        b
    }

    #[test]
    fn later_writes_win_and_split_older_ranges() {
        let mut o = Overlay::default();
        o.write_data(4096, vec![1; 4096]);
        o.write_zeros(0, 16384);
        o.write_data(8192, vec![2; 4096]);
        assert_eq!(o.segs.len(), 3);
        let b = contents(&o, 0, 20480);
        assert!(b[..8192].iter().all(|&x| x == 0));
        assert!(b[8192..12288].iter().all(|&x| x == 2));
        assert!(b[12288..16384].iter().all(|&x| x == 0));
        assert!(b[16384..].iter().all(|&x| x == 0xEE));
        assert_eq!(o.end(), 16384);
    }

    #[test]
    fn apply_handles_partial_overlap() {
        let mut o = Overlay::default();
        o.write_data(4096, (0..4096u32).map(|i| i as u8).collect());
        let b = contents(&o, 4096 + 100, 10);
        assert_eq!(b, (100..110u32).map(|i| i as u8).collect::<Vec<_>>());
        let b = contents(&o, 4000, 200);
        assert!(b[..96].iter().all(|&x| x == 0xEE));
        assert_eq!(b[96], 0);
    }

    #[test]
    fn replayed_file_maps_host_data_copies_and_zeros() {
        let dir = std::env::temp_dir().join(format!("vmfs-vhdx-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.vhdx");
        std::fs::write(&path, vec![7u8; 16384]).unwrap();
        let file = HostFile::open(&path, false).unwrap();
        let mut o = Overlay::default();
        o.write_data(4096, vec![9u8; 4096]);
        o.write_zeros(8192, 4096);
        let r = Replayed::new(file.clone(), o, 32768).unwrap();
        assert_eq!(r.size(), 32768);
        let expect = |off, len, want_len, host: Option<(u64, bool)>| {
            let (m, n) = r.map_data(off, len);
            assert_eq!(n, want_len, "at {off}");
            match (m, host) {
                (Mapping::Data { file: f, host_off }, Some((h, is_image))) => {
                    assert_eq!(host_off, h, "at {off}");
                    assert_eq!(f.id() == file.id(), is_image, "at {off}");
                }
                (Mapping::Zero, None) => {}
                (m, _) => panic!("at {off}: {m:?}"),
            }
        };
        expect(0, 65536, 4096, Some((0, true)));
        expect(4096 + 10, 65536, 4086, Some((10, false)));
        expect(8192, 100, 100, None);
        expect(12288, 65536, 4096, Some((12288, true)));
        expect(16384, 65536, 65536, None); // past the host file: the replay extended it
        let mut buf = vec![0u8; 12288];
        r.read(&mut buf, 4096, "t").unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9) && buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..].iter().all(|&b| b == 7));
        assert!(r.read(&mut buf, 32768 - 100, "t").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
