//! A view is a stack of layers read as one disk: the live chain, a backing layer with
//! everything below it, or an internal snapshot over its layer's parents.
//!
//! Reads resolve guest ranges with a loop over the layers (never recursion) and cache the
//! resolved extents per 64 KiB chunk, so a deep chain costs what a shallow one does once
//! warm. Data then moves with as few preads as the layout allows: contiguous host runs
//! of one file are merged into one read.

use crate::cache::{ByteCache, Key};
use crate::error::{Error, Kind, Result};
use crate::format::{Extent, Layer, Mapping, compress};
use crate::storage::HostFile;
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Granule of the resolved-extent cache.
pub const CHUNK: u64 = 64 * 1024;
/// Largest compressed cluster we agree to read (qcow2 allows up to cluster size + a sector).
const MAX_STORED_COMPRESSED: u64 = 4 * 1024 * 1024;
const CLUSTER_CACHE_TAG: u8 = 0xC0;

pub struct View {
    layers: Vec<Arc<dyn Layer>>,
    size: u64,
    resolved: Mutex<LruCache<u64, Arc<[Extent]>>>,
    /// Bumped by every write so a resolve that raced with it is not cached.
    generation: AtomicU64,
    clusters: Arc<ByteCache>,
    allocated: Mutex<Option<(u64, Instant)>>,
    dirty_alloc: std::sync::atomic::AtomicBool,
    /// A view over a shared base (a clone over its image): `layers[..own]` are this view's
    /// own layers, resolved on every read; what they leave unallocated comes from the base
    /// view's resolved extents, so every view over one base shares one cache of them.
    base: Option<(Arc<View>, usize)>,
}

impl View {
    /// `layers[0]` is the top. `size` is the view's virtual size (the top layer's, or a
    /// snapshot's own). `chunk_entries` bounds the resolved-extent cache.
    pub fn new(
        layers: Vec<Arc<dyn Layer>>,
        size: u64,
        clusters: Arc<ByteCache>,
        chunk_entries: usize,
    ) -> View {
        View {
            layers,
            size,
            resolved: Mutex::new(LruCache::new(
                NonZeroUsize::new(chunk_entries.max(16)).unwrap_or(NonZeroUsize::MIN),
            )),
            generation: AtomicU64::new(0),
            clusters,
            allocated: Mutex::new(None),
            dirty_alloc: false.into(),
            base: None,
        }
    }

    /// A view of `own` layers (top first) over the view `base`, which must not change while
    /// this view lives (a read-only image under its clones). Its size is the top's.
    pub fn over(own: Vec<Arc<dyn Layer>>, base: Arc<View>, clusters: Arc<ByteCache>) -> View {
        let n = own.len();
        let size = own.first().map_or(0, |l| l.virtual_size());
        let mut layers = own;
        layers.extend(base.layers.iter().cloned());
        let mut v = View::new(layers, size, clusters, 16);
        v.base = Some((base, n));
        v
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }

    pub fn is_writable(&self) -> bool {
        self.layers.first().is_some_and(|l| l.writer().is_some())
    }

    /// Reads into `buf` from `off`; returns the byte count (short only at the end of the disk).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        if off >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - off) as usize;
        let mut pieces = Vec::new();
        let mut pos = off;
        let end = off + n as u64;
        while pos < end {
            let chunk = pos / CHUNK;
            let exts = self.chunk(chunk)?;
            let mut ext_start = chunk * CHUNK;
            for e in exts.iter() {
                let ext_end = ext_start + e.len;
                if ext_end > pos && pos < end {
                    let take = ext_end.min(end) - pos;
                    pieces.push(Piece {
                        map: e.map.clone(),
                        skip: pos - ext_start,
                        dst: (pos - off) as usize,
                        len: take as usize,
                    });
                    pos += take;
                }
                ext_start = ext_end;
            }
            if pos < (chunk + 1) * CHUNK && pos < end {
                return Err(Error::new(
                    Kind::Corrupt,
                    format!("internal: chunk {chunk} does not cover {pos:#x}"),
                ));
            }
        }
        self.read_pieces(pieces, &mut buf[..n])?;
        Ok(n)
    }

    /// The resolved extents of one chunk, from cache or by walking the layers.
    fn chunk(&self, idx: u64) -> Result<Arc<[Extent]>> {
        if let Some((base, own)) = &self.base {
            return self.chunk_over(base, *own, idx);
        }
        if let Some(e) = self.resolved.lock().get(&idx) {
            return Ok(e.clone());
        }
        let gen_before = self.generation.load(Ordering::Acquire);
        let start = idx * CHUNK;
        let len = CHUNK.min(self.size - start);
        let exts: Arc<[Extent]> = resolve(&self.layers, start, len)?.into();
        let mut cache = self.resolved.lock();
        if self.generation.load(Ordering::Acquire) == gen_before {
            cache.put(idx, exts.clone());
        }
        Ok(exts)
    }

    /// A chunk of a view over a base: its own layers first, the base's cached extents where
    /// they hold nothing. Chunks of both views start at the same offsets.
    fn chunk_over(&self, base: &View, own: usize, idx: u64) -> Result<Arc<[Extent]>> {
        let start = idx * CHUNK;
        let len = CHUNK.min(self.size - start);
        let mine = resolve_down_to(&self.layers[..own], start, len, Mapping::Unallocated)?;
        if !mine.iter().any(|e| matches!(e.map, Mapping::Unallocated)) {
            return Ok(mine.into());
        }
        let below = (start < base.size).then(|| base.chunk(idx)).transpose()?;
        let mut out = Vec::with_capacity(mine.len());
        let mut pos = start;
        for e in mine {
            let end = pos + e.len;
            if !matches!(e.map, Mapping::Unallocated) {
                push_merged(&mut out, e);
                pos = end;
                continue;
            }
            // The base's extents inside [pos, end); zeros past the base's end.
            let mut ext_start = start;
            for b in below.iter().flat_map(|b| b.iter()) {
                let ext_end = ext_start + b.len;
                let (from, to) = (ext_start.max(pos), ext_end.min(end));
                if from < to {
                    push_merged(
                        &mut out,
                        Extent {
                            len: to - from,
                            map: advanced(&b.map, from - ext_start),
                        },
                    );
                }
                ext_start = ext_end;
            }
            let covered = ext_start.clamp(pos, end);
            if covered < end {
                push_merged(
                    &mut out,
                    Extent {
                        len: end - covered,
                        map: Mapping::Zero,
                    },
                );
            }
            pos = end;
        }
        Ok(out.into())
    }

    fn read_pieces(&self, pieces: Vec<Piece>, buf: &mut [u8]) -> Result<()> {
        let mut i = 0;
        while i < pieces.len() {
            let p = &pieces[i];
            match &p.map {
                Mapping::Data { file, host_off } => {
                    // Merge the following pieces that continue this host run in the same file.
                    let start = host_off + p.skip;
                    let mut len = p.len;
                    let mut j = i + 1;
                    while let Some(Piece {
                        map:
                            Mapping::Data {
                                file: f2,
                                host_off: h2,
                            },
                        skip,
                        len: l2,
                        ..
                    }) = pieces.get(j)
                    {
                        if f2.id() != file.id() || h2 + skip != start + len as u64 {
                            break;
                        }
                        len += l2;
                        j += 1;
                    }
                    file.read_data_at(&mut buf[p.dst..p.dst + len], start)?;
                    i = j;
                    continue;
                }
                Mapping::Zero | Mapping::Unallocated => buf[p.dst..p.dst + p.len].fill(0),
                Mapping::Compressed {
                    file,
                    host_off,
                    stored_len,
                    codec,
                    cluster_len,
                    skip,
                } => {
                    let cluster =
                        self.decompressed(file, *host_off, *stored_len, *codec, *cluster_len)?;
                    let from = (skip + p.skip) as usize;
                    let src = cluster.get(from..from + p.len).ok_or_else(|| {
                        Error::corrupt(
                            file.path(),
                            "compressed cluster",
                            *host_off,
                            "extent outside the cluster",
                        )
                    })?;
                    buf[p.dst..p.dst + p.len].copy_from_slice(src);
                }
            }
            i += 1;
        }
        Ok(())
    }

    fn decompressed(
        &self,
        file: &Arc<HostFile>,
        host_off: u64,
        stored_len: u64,
        codec: crate::format::Codec,
        cluster_len: u64,
    ) -> Result<Arc<[u8]>> {
        let key = Key::new(file.id(), host_off, CLUSTER_CACHE_TAG);
        self.clusters.get_or_load(key, || {
            if stored_len > MAX_STORED_COMPRESSED || cluster_len > MAX_STORED_COMPRESSED {
                return Err(Error::corrupt(
                    file.path(),
                    "compressed cluster",
                    host_off,
                    format!("absurd size {stored_len}"),
                ));
            }
            let mut raw = vec![0u8; stored_len as usize];
            file.read_data_at(&mut raw, host_off)?;
            compress::decompress(codec, &raw, cluster_len as usize, file.path(), host_off)
        })
    }

    /// The first offset >= `off` that holds data (anything but zeros-by-mapping), if any.
    /// Where the seek budget runs out, the rest counts as data (see `SEEK_BUDGET`).
    pub fn next_data(&self, off: u64) -> Result<Option<u64>> {
        Ok(match self.scan(off, |m| !is_hole(m))? {
            Scan::Found(p) | Scan::GaveUp(p) => Some(p),
            Scan::End => None,
        })
    }

    /// The first offset >= `off` in a hole; the end of the disk counts as a hole (and is the
    /// answer where the seek budget runs out: everything before it then counts as data).
    pub fn next_hole(&self, off: u64) -> Result<u64> {
        Ok(match self.scan(off, is_hole)? {
            Scan::Found(p) => p,
            Scan::End | Scan::GaveUp(_) => self.size,
        }
        .max(off.min(self.size)))
    }

    /// Walks the layers' translations from `off` in extents as long as their tables allow
    /// (an empty qcow2 L1 entry, VMDK grain directory entry or VHD/VHDX/VDI block is one
    /// extent), not chunk by chunk, so the cost follows the layout, not the virtual size.
    fn scan(&self, off: u64, want: impl Fn(&Mapping) -> bool) -> Result<Scan> {
        let mut budget = SEEK_BUDGET;
        let mut pos = off;
        while pos < self.size {
            if budget == 0 {
                return Ok(Scan::GaveUp(pos));
            }
            let e = resolve_step(&self.layers, pos, self.size, &Mapping::Zero, &mut budget)?;
            if want(&e.map) {
                return Ok(Scan::Found(pos));
            }
            pos += e.len;
        }
        Ok(Scan::End)
    }

    /// Bytes that hold data in this view (for st_blocks). Computed on first use; a written
    /// view recomputes at most every few seconds.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let mut cached = self.allocated.lock();
        if let Some((bytes, at)) = *cached {
            let stale =
                self.dirty_alloc.load(Ordering::Relaxed) && at.elapsed() > Duration::from_secs(5);
            if !stale {
                return Ok(bytes);
            }
        }
        self.dirty_alloc.store(false, Ordering::Relaxed);
        // Extents as long as the tables allow, as for seeks; past the budget the rest counts
        // as allocated (an overestimate, never a hang).
        let mut budget = 4 * SEEK_BUDGET;
        let mut total = 0;
        let mut pos = 0;
        while pos < self.size {
            if budget == 0 {
                total += self.size - pos;
                break;
            }
            let e = resolve_step(&self.layers, pos, self.size, &Mapping::Zero, &mut budget)?;
            if !is_hole(&e.map) {
                total += e.len;
            }
            pos += e.len;
        }
        *cached = Some((total, Instant::now()));
        Ok(total)
    }

    /// Reads what the layers below the top show (for copy-on-write fills).
    fn read_below(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if let Some((base, 1)) = &self.base {
            let n = base.read(off, buf)?;
            buf[n..].fill(0);
            return Ok(());
        }
        read_uncached(&self.layers[1..], off, buf, &self.clusters)
    }

    fn writer(&self) -> Result<&dyn crate::write::LayerWriter> {
        self.layers
            .first()
            .and_then(|l| l.writer())
            .ok_or_else(|| Error::new(Kind::ReadOnly, "this view is read-only"))
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(
                Kind::InvalidInput,
                format!(
                    "range {off:#x}+{len} is past the end of the disk ({} bytes); the size never changes",
                    self.size
                ),
            )),
        }
    }

    /// Writes `data` at `off`; the range must lie inside the disk.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        let w = self.writer()?;
        self.check_range(off, data.len() as u64)?;
        let below = |o: u64, b: &mut [u8]| self.read_below(o, b);
        let r = w.write(off, data, &below);
        self.invalidate(off, data.len() as u64);
        r
    }

    /// Makes [off, off+len) read as zeros.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        let w = self.writer()?;
        self.check_range(off, len)?;
        let below = |o: u64, b: &mut [u8]| self.read_below(o, b);
        let r = w.discard(off, len, &below);
        self.invalidate(off, len);
        r
    }

    pub fn flush(&self) -> Result<()> {
        match self.layers.first().and_then(|l| l.writer()) {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// A clean unmount (see `LayerWriter::close`).
    pub fn close(&self) -> Result<()> {
        match self.layers.first().and_then(|l| l.writer()) {
            Some(w) => w.close(),
            None => Ok(()),
        }
    }

    fn invalidate(&self, off: u64, len: u64) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.dirty_alloc.store(true, Ordering::Relaxed);
        if len == 0 {
            return;
        }
        let mut cache = self.resolved.lock();
        for c in off / CHUNK..=(off + len - 1) / CHUNK {
            cache.pop(&c);
        }
    }
}

/// Most layer translations one SEEK_DATA/SEEK_HOLE makes. Past it the rest of the disk
/// counts as data, which is never a wrong answer (data may hold zeros; a hole is only
/// promised where the layers say so), so a crafted image cannot make one seek walk a
/// huge virtual size step by step. Well-formed images end far sooner: each empty table
/// entry is one step.
const SEEK_BUDGET: u32 = 1 << 15;

/// How a seek scan ended.
enum Scan {
    Found(u64),
    /// Nothing wanted up to the end of the disk.
    End,
    /// The budget ran out at this offset, nothing wanted before it.
    GaveUp(u64),
}

struct Piece {
    map: Mapping,
    /// Offset into the extent where this piece starts.
    skip: u64,
    dst: usize,
    len: usize,
}

/// Resolves [off, off+len) through `layers` (top first) into extents that never say
/// Unallocated. A layer shorter than the request reads as zeros past its end, as in QEMU:
/// the layers below it are not consulted there.
pub fn resolve(layers: &[Arc<dyn Layer>], off: u64, len: u64) -> Result<Vec<Extent>> {
    resolve_down_to(layers, off, len, Mapping::Zero)
}

/// `resolve`, answering `bottom` where no layer maps anything (Unallocated: a base below
/// decides).
fn resolve_down_to(
    layers: &[Arc<dyn Layer>],
    off: u64,
    len: u64,
    bottom: Mapping,
) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let end = off + len;
    let mut pos = off;
    let mut calls = u32::MAX;
    while pos < end {
        let e = resolve_step(layers, pos, end, &bottom, &mut calls)?;
        pos += e.len;
        push_merged(&mut out, e);
    }
    Ok(out)
}

/// The extent at `pos` (ending by `end`) through `layers`, top first: the first layer that
/// maps anything there decides, `bottom` where none does. Counts each layer's translation
/// against `calls`.
fn resolve_step(
    layers: &[Arc<dyn Layer>],
    pos: u64,
    end: u64,
    bottom: &Mapping,
    calls: &mut u32,
) -> Result<Extent> {
    let mut seg = end - pos;
    for layer in layers {
        let vsize = layer.virtual_size();
        if pos >= vsize {
            return Ok(Extent {
                len: seg,
                map: Mapping::Zero,
            });
        }
        seg = seg.min(vsize - pos);
        *calls = calls.saturating_sub(1);
        let e = layer.map(pos, seg)?;
        if e.len == 0 || e.len > seg {
            return Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: translation of {pos:#x} returned a bad length {}",
                    crate::storage::show_path(layer.path()),
                    e.len
                ),
            ));
        }
        seg = e.len;
        if !matches!(e.map, Mapping::Unallocated) {
            return Ok(e);
        }
    }
    Ok(Extent {
        len: seg,
        map: bottom.clone(),
    })
}

/// Reads as zeros by mapping (a hole for SEEK_HOLE and st_blocks).
fn is_hole(m: &Mapping) -> bool {
    matches!(m, Mapping::Zero | Mapping::Unallocated)
}

/// `map` as seen `by` bytes further into its extent.
fn advanced(map: &Mapping, by: u64) -> Mapping {
    match map {
        Mapping::Data { file, host_off } => Mapping::Data {
            file: file.clone(),
            host_off: host_off + by,
        },
        Mapping::Compressed {
            file,
            host_off,
            stored_len,
            codec,
            cluster_len,
            skip,
        } => Mapping::Compressed {
            file: file.clone(),
            host_off: *host_off,
            stored_len: *stored_len,
            codec: *codec,
            cluster_len: *cluster_len,
            skip: skip + by,
        },
        other => other.clone(),
    }
}

/// Appends, merging with the previous extent when they continue each other.
fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut()
        && last.map.continues(last.len, &e.map)
    {
        last.len += e.len;
        return;
    }
    out.push(e);
}

/// Reads through `layers` without the resolved-extent cache (copy-on-write fills).
pub fn read_uncached(
    layers: &[Arc<dyn Layer>],
    off: u64,
    buf: &mut [u8],
    clusters: &Arc<ByteCache>,
) -> Result<()> {
    if layers.is_empty() {
        buf.fill(0);
        return Ok(());
    }
    let size = layers[0].virtual_size();
    let inside = if off >= size {
        0
    } else {
        (buf.len() as u64).min(size - off) as usize
    };
    buf[inside..].fill(0);
    if inside == 0 {
        return Ok(());
    }
    let tmp = View::new(layers.to_vec(), size, clusters.clone(), 16);
    let mut pieces = Vec::new();
    let mut ext_start = off;
    for e in resolve(layers, off, inside as u64)? {
        pieces.push(Piece {
            map: e.map,
            skip: 0,
            dst: (ext_start - off) as usize,
            len: e.len as usize,
        });
        ext_start += e.len;
    }
    tmp.read_pieces(pieces, &mut buf[..inside])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Format;
    use std::path::Path;

    /// A layer of 4 KiB pieces that never merge, as a crafted table can make them: holes
    /// that alternate zeros and unallocated, or data scattered over the file.
    #[derive(Debug)]
    struct Shattered {
        data: Option<Arc<HostFile>>,
        size: u64,
    }

    impl Layer for Shattered {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn path(&self) -> &Path {
            Path::new("shattered")
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn map(&self, off: u64, len: u64) -> Result<Extent> {
            let piece = off / 4096;
            let len = len.min(4096 - off % 4096);
            let map = match &self.data {
                None if piece.is_multiple_of(2) => Mapping::Zero,
                None => Mapping::Unallocated,
                Some(file) => Mapping::Data {
                    file: file.clone(),
                    host_off: (1 - piece % 2) * 8192 + off % 4096,
                },
            };
            Ok(Extent { len, map })
        }
        fn files(&self) -> Vec<Arc<HostFile>> {
            Vec::new()
        }
    }

    fn view(data: Option<Arc<HostFile>>) -> View {
        let size = 1 << 50;
        let layer: Arc<dyn Layer> = Arc::new(Shattered { data, size });
        View::new(vec![layer], size, Arc::new(ByteCache::new(1 << 20)), 16)
    }

    #[test]
    fn a_seek_over_endless_pieces_of_holes_stops_and_calls_the_rest_data() {
        let v = view(None);
        let stop = 4096 * u64::from(SEEK_BUDGET);
        assert_eq!(v.next_data(0).unwrap(), Some(stop));
        // From there the scan goes on with a budget of its own.
        assert_eq!(v.next_data(stop).unwrap(), Some(2 * stop));
        assert_eq!(v.next_hole(5).unwrap(), 5);
        // st_blocks: what was walked counts as holes, the rest as data.
        assert_eq!(v.allocated_bytes().unwrap(), v.size() - 4 * stop);
    }

    #[test]
    fn a_seek_over_endless_pieces_of_data_answers_the_end() {
        let tmp = std::env::temp_dir().join(format!("vmfs-view-seek-{}", std::process::id()));
        std::fs::write(&tmp, vec![1u8; 16384]).unwrap();
        let file = HostFile::open(&tmp, false).unwrap();
        std::fs::remove_file(&tmp).unwrap();
        let v = view(Some(file));
        assert_eq!(v.next_hole(0).unwrap(), v.size());
        assert_eq!(v.next_data(12345).unwrap(), Some(12345));
    }
}
