//! The persistent chunk cache of remote objects, shared by every daemon on the host.
//!
//! Layout: `DIR/v1/<object>/<chunk>/<start>+<len>`, where `<object>` hashes the object's
//! location, size and validator (ETag), `<chunk>` is the 1 MiB-aligned chunk index and each
//! entry file holds bytes [start, start+len) of the object (4 KiB-aligned, inside one chunk)
//! behind a 16-byte header with their CRC-32C. Entries are written to a temporary name and
//! renamed, and never modified after: concurrent daemons only ever add or unlink whole files,
//! and a reader holding an open entry keeps reading the bytes it opened. An entry's mtime is
//! its last use; eviction (under an exclusive lock file, one daemon at a time) unlinks the
//! oldest entries until the cache is under its limit again. Power cuts: an entry is checked
//! against its CRC the first time a process reads it, and a bad one is dropped and refetched.

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Cache addressing unit: entries never cross a chunk boundary.
pub const CHUNK: u64 = 1 << 20;
/// Fetch and entry alignment.
pub const BLOCK: u64 = 4096;
const HEADER: u64 = 16;
const MAGIC: &[u8; 8] = b"VMFSCHK1";
/// A hit refreshes the entry's mtime (its LRU age) at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(10);
/// Eviction brings the cache down to this fraction of its limit.
const EVICT_TO_PERCENT: u64 = 90;
/// Open entry files kept per object.
const OPEN_ENTRIES: usize = 64;

/// One cache directory with its size limit, shared by the objects of this process.
#[derive(Debug)]
pub struct DiskCache {
    root: PathBuf,
    max: u64,
    /// Bytes in the cache as this process believes (a scan plus what it added since).
    usage: AtomicU64,
    scanned: AtomicBool,
    added_since_scan: AtomicU64,
    tmp_seq: AtomicU64,
    write_failed: AtomicBool,
    /// Whether entries are written with O_DIRECT (`-o cache_direct`; cleared when the cache's
    /// file system refuses it).
    direct: AtomicBool,
}

impl DiskCache {
    /// `dir` is created (mode 0700: cached disks are as private as the disks) when missing.
    pub fn open(dir: &Path, max: u64) -> io::Result<Arc<DiskCache>> {
        let root = dir.join("v1");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        Ok(Arc::new(DiskCache {
            root,
            max,
            usage: AtomicU64::new(0),
            scanned: AtomicBool::new(false),
            added_since_scan: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            write_failed: AtomicBool::new(false),
            direct: AtomicBool::new(false),
        }))
    }

    /// Writes entries with O_DIRECT from now on (where the file system allows it).
    pub fn write_direct(&self, on: bool) {
        self.direct.store(on, Ordering::Relaxed);
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cache of one object version: `identity` names the object (location, endpoint,
    /// query; only its hash is kept), `shown` is what the directory's `object` file says of
    /// it (nothing secret), `validator` names its version.
    pub fn object(
        self: &Arc<Self>,
        identity: &str,
        shown: &str,
        size: u64,
        validator: &str,
    ) -> ObjectCache {
        let mut h = Sha256::new();
        h.update(format!("{identity}\n{size}\n{validator}\n").as_bytes());
        let hex: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ObjectCache {
            disk: self.clone(),
            dir: self.root.join(hex),
            about: format!("{shown}\n{size}\n{validator}\n"),
            chunks: Mutex::new(HashMap::new()),
            open: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(OPEN_ENTRIES).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    fn account(&self, added: u64) {
        if !self.scanned.swap(true, Ordering::AcqRel) {
            self.usage.store(scan(&self.root).total, Ordering::Release);
        }
        let usage = self.usage.fetch_add(added, Ordering::AcqRel) + added;
        let since = self.added_since_scan.fetch_add(added, Ordering::AcqRel) + added;
        // Other daemons add entries too: look again now and then.
        if usage > self.max || since > self.max / 8 {
            self.evict();
        }
    }

    /// Unlinks the least recently used entries until the cache is under its limit; one
    /// process at a time (the others skip while it runs).
    pub fn evict(&self) {
        let Ok(lock) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.root.join(".evict.lock"))
        else {
            return;
        };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return;
        }
        let mut found = scan(&self.root);
        let target = self.max / 100 * EVICT_TO_PERCENT;
        let mut total = found.total;
        if total > self.max {
            found.entries.sort_by_key(|e| e.mtime);
            for e in &found.entries {
                if total <= target {
                    break;
                }
                if fs::remove_file(&e.path).is_ok() {
                    total = total.saturating_sub(e.size);
                    if let Some(dir) = e.path.parent() {
                        // Only succeeds once the chunk directory is empty.
                        let _ = fs::remove_dir(dir);
                    }
                }
            }
            log::info!(
                "chunk cache {}: evicted down to {total} bytes (limit {})",
                self.root.display(),
                self.max
            );
        }
        self.usage.store(total, Ordering::Release);
        self.added_since_scan.store(0, Ordering::Release);
    }
}

struct Found {
    total: u64,
    entries: Vec<FoundEntry>,
}

struct FoundEntry {
    path: PathBuf,
    size: u64,
    mtime: SystemTime,
}

/// Every entry under `root` (and stale temporary files, removed on the way).
fn scan(root: &Path) -> Found {
    let mut found = Found {
        total: 0,
        entries: Vec::new(),
    };
    let dirs = |p: &Path| -> Vec<PathBuf> {
        fs::read_dir(p)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for obj in dirs(root).into_iter().filter(|p| p.is_dir()) {
        for chunk in dirs(&obj).into_iter().filter(|p| p.is_dir()) {
            for entry in dirs(&chunk) {
                let Ok(meta) = entry.symlink_metadata() else {
                    continue;
                };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let is_tmp = entry
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".tmp"));
                if is_tmp {
                    // A writer that died mid-entry.
                    if mtime.elapsed().is_ok_and(|a| a > Duration::from_secs(3600)) {
                        let _ = fs::remove_file(&entry);
                    }
                    continue;
                }
                found.total += meta.len();
                found.entries.push(FoundEntry {
                    path: entry,
                    size: meta.len(),
                    mtime,
                });
            }
        }
    }
    found
}

/// One entry this process knows of.
#[derive(Clone, Debug)]
struct Entry {
    start: u64,
    len: u64,
    verified: bool,
    touched: Option<Instant>,
}

impl Entry {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Default, Debug)]
struct ChunkIndex {
    /// Whether the chunk directory was listed (entries other daemons wrote).
    listed: bool,
    entries: Vec<Entry>,
}

/// A part of a looked-up range: in the cache, or to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Cached { start: u64, end: u64, entry: u64 },
    Missing { start: u64, end: u64 },
}

/// The cache of one object version.
#[derive(Debug)]
pub struct ObjectCache {
    disk: Arc<DiskCache>,
    dir: PathBuf,
    about: String,
    chunks: Mutex<HashMap<u64, ChunkIndex>>,
    open: Mutex<lru::LruCache<u64, Arc<File>>>,
}

impl ObjectCache {
    fn chunk_dir(&self, chunk: u64) -> PathBuf {
        self.dir.join(format!("{chunk:x}"))
    }

    fn entry_path(&self, start: u64, len: u64) -> PathBuf {
        self.chunk_dir(start / CHUNK)
            .join(format!("{:x}+{len:x}", start % CHUNK))
    }

    /// Splits [start, end) into cached and missing pieces, in order.
    pub fn lookup(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        let mut push = |p: Piece| match (out.last_mut(), p) {
            (Some(Piece::Missing { end: e, .. }), Piece::Missing { start: s, end: ne })
                if *e == s =>
            {
                *e = ne
            }
            _ => out.push(p),
        };
        let mut chunks = self.chunks.lock();
        let mut pos = start;
        while pos < end {
            let chunk = pos / CHUNK;
            let chunk_end = ((chunk + 1) * CHUNK).min(end);
            let idx = chunks.entry(chunk).or_default();
            if !idx.listed {
                idx.listed = true;
                self.list_chunk(chunk, idx);
            }
            while pos < chunk_end {
                let covering = idx
                    .entries
                    .iter()
                    .filter(|e| e.start <= pos && pos < e.end())
                    .max_by_key(|e| e.end());
                match covering {
                    Some(e) => {
                        let to = e.end().min(chunk_end);
                        push(Piece::Cached {
                            start: pos,
                            end: to,
                            entry: e.start,
                        });
                        pos = to;
                    }
                    None => {
                        let next = idx
                            .entries
                            .iter()
                            .map(|e| e.start)
                            .filter(|&s| s > pos && s < chunk_end)
                            .min()
                            .unwrap_or(chunk_end);
                        push(Piece::Missing {
                            start: pos,
                            end: next,
                        });
                        pos = next;
                    }
                }
            }
        }
        out
    }

    /// Adds the entries another daemon (or an earlier mount) left in this chunk.
    fn list_chunk(&self, chunk: u64, idx: &mut ChunkIndex) {
        let Ok(rd) = fs::read_dir(self.chunk_dir(chunk)) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let Some((s, l)) = name.to_str().and_then(|n| n.split_once('+')) else {
                continue;
            };
            let (Ok(s), Ok(l)) = (u64::from_str_radix(s, 16), u64::from_str_radix(l, 16)) else {
                continue;
            };
            if s >= CHUNK || l == 0 || s + l > CHUNK {
                continue;
            }
            let start = chunk * CHUNK + s;
            if !idx.entries.iter().any(|x| x.start == start && x.len == l) {
                idx.entries.push(Entry {
                    start,
                    len: l,
                    verified: false,
                    touched: None,
                });
            }
        }
    }

    /// Forgets what this process knows of `chunk`, so the next lookup lists it again.
    pub fn relist(&self, chunk: u64) {
        self.chunks.lock().remove(&chunk);
    }

    /// Reads `buf.len()` bytes at `off` from the entry starting at `entry`. `Ok(false)`: the
    /// entry is gone (evicted) or damaged, and was forgotten; fetch instead.
    pub fn read(&self, entry: u64, off: u64, buf: &mut [u8]) -> io::Result<bool> {
        let chunk = entry / CHUNK;
        let (len, verified, touch) = {
            let mut chunks = self.chunks.lock();
            let Some(e) = chunks
                .get_mut(&chunk)
                .and_then(|c| c.entries.iter_mut().find(|e| e.start == entry))
            else {
                return Ok(false);
            };
            let touch = e.touched.is_none_or(|t| t.elapsed() > TOUCH_EVERY);
            if touch {
                e.touched = Some(Instant::now());
            }
            (e.len, e.verified, touch)
        };
        let path = self.entry_path(entry, len);
        let ok = if verified {
            self.read_verified(entry, &path, off - entry, buf)
        } else {
            self.verify_and_read(entry, len, &path, off - entry, buf)
        };
        match ok {
            Ok(true) => {
                if touch {
                    touch_now(&path);
                }
                Ok(true)
            }
            Ok(false) | Err(_) => {
                self.forget(entry);
                Ok(false)
            }
        }
    }

    fn open_entry(&self, entry: u64, path: &Path) -> io::Result<Arc<File>> {
        if let Some(f) = self.open.lock().get(&entry) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(path)?);
        self.open.lock().put(entry, f.clone());
        Ok(f)
    }

    fn read_verified(&self, entry: u64, path: &Path, at: u64, buf: &mut [u8]) -> io::Result<bool> {
        let f = self.open_entry(entry, path)?;
        f.read_exact_at(buf, HEADER + at)?;
        Ok(true)
    }

    fn verify_and_read(
        &self,
        entry: u64,
        len: u64,
        path: &Path,
        at: u64,
        buf: &mut [u8],
    ) -> io::Result<bool> {
        let f = File::open(path)?;
        let mut whole = vec![0u8; (HEADER + len) as usize];
        f.read_exact_at(&mut whole, 0)?;
        if f.metadata()?.len() != HEADER + len || !header_ok(&whole, len) {
            log::warn!("chunk cache: dropping damaged entry {}", path.display());
            let _ = fs::remove_file(path);
            return Ok(false);
        }
        let data = &whole[HEADER as usize..];
        buf.copy_from_slice(&data[at as usize..at as usize + buf.len()]);
        if let Some(e) = self
            .chunks
            .lock()
            .get_mut(&(entry / CHUNK))
            .and_then(|c| c.entries.iter_mut().find(|e| e.start == entry))
        {
            e.verified = true;
        }
        self.open.lock().put(entry, Arc::new(f));
        Ok(true)
    }

    fn forget(&self, entry: u64) {
        if let Some(c) = self.chunks.lock().get_mut(&(entry / CHUNK)) {
            c.entries.retain(|e| e.start != entry);
        }
        self.open.lock().pop(&entry);
    }

    /// Stores bytes [start, start + data.len()) of the object, split at chunk boundaries.
    /// A cache that cannot be written is skipped (with one warning): reads still work.
    pub fn store(&self, start: u64, data: &[u8]) {
        let mut pos = start;
        let end = start + data.len() as u64;
        while pos < end {
            let to = ((pos / CHUNK + 1) * CHUNK).min(end);
            let mut image = EntryImage::zeroed((to - pos) as usize);
            image
                .data_mut()
                .copy_from_slice(&data[(pos - start) as usize..(to - start) as usize]);
            image.seal();
            if !self.store_image(pos, &image) {
                return;
            }
            pos = to;
        }
    }

    /// Stores a sealed entry image of the object's bytes from `start` (inside one chunk);
    /// false when the cache cannot be written.
    pub fn store_image(&self, start: u64, image: &EntryImage) -> bool {
        let len = image.data().len() as u64;
        if len == 0 || start / CHUNK != (start + len - 1) / CHUNK {
            self.store(start, image.data());
            return true;
        }
        match self.write_entry(start, image) {
            Ok(size) => {
                let mut chunks = self.chunks.lock();
                let idx = chunks.entry(start / CHUNK).or_default();
                idx.entries.retain(|e| !(e.start == start && e.len == len));
                idx.entries.push(Entry {
                    start,
                    len,
                    verified: true,
                    touched: Some(Instant::now()),
                });
                drop(chunks);
                self.disk.account(size);
                true
            }
            Err(e) => {
                if !self.disk.write_failed.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "chunk cache {}: cannot store fetched data ({e}); reading on without it",
                        self.disk.root.display()
                    );
                }
                false
            }
        }
    }

    fn write_entry(&self, start: u64, image: &EntryImage) -> io::Result<u64> {
        let dir = self.chunk_dir(start / CHUNK);
        if !self.dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)?;
            let _ = fs::write(self.dir.join("object"), &self.about);
        }
        let len = image.data().len() as u64;
        let final_path = self.entry_path(start, len);
        // Eviction elsewhere may remove the chunk directory between our mkdir and rename.
        for attempt in 0..2 {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let tmp = dir.join(format!(
                ".tmp.{}.{}",
                std::process::id(),
                self.disk.tmp_seq.fetch_add(1, Ordering::Relaxed)
            ));
            let written = self
                .write_file(&tmp, image)
                .and_then(|()| fs::rename(&tmp, &final_path));
            match written {
                Ok(()) => return Ok(HEADER + len),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    if attempt == 1 || e.kind() != io::ErrorKind::NotFound {
                        return Err(e);
                    }
                }
            }
        }
        Err(io::ErrorKind::NotFound.into())
    }

    /// Writes an entry file; with O_DIRECT when asked and the file system allows it: a cold
    /// sequential read writes everything it fetches, and through the page cache that can cost
    /// more CPU than the network does (but later reads of the entry then come from the disk).
    fn write_file(&self, path: &Path, image: &EntryImage) -> io::Result<()> {
        let create = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        if self.disk.direct.load(Ordering::Relaxed) {
            match create(libc::O_DIRECT) {
                Ok(mut f) => {
                    let direct = f
                        .write_all(image.padded())
                        .and_then(|()| f.set_len(image.bytes().len() as u64));
                    match direct {
                        Ok(()) => return Ok(()),
                        Err(e) if e.raw_os_error() != Some(libc::EINVAL) => return Err(e),
                        Err(_) => {}
                    }
                    drop(f);
                    fs::remove_file(path)?;
                }
                Err(e) if e.raw_os_error() != Some(libc::EINVAL) => return Err(e),
                Err(_) => {}
            }
            log::debug!("chunk cache: no O_DIRECT here; writing entries buffered");
            self.disk.direct.store(false, Ordering::Relaxed);
        }
        create(0)?.write_all(image.bytes())
    }

    /// Bytes of this object in the cache now (overlapping entries count once).
    pub fn cached_bytes(&self) -> u64 {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut total = 0;
        for chunk in rd.filter_map(|e| e.ok()) {
            let Some(index) = chunk
                .file_name()
                .to_str()
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            let mut idx = ChunkIndex::default();
            self.list_chunk(index, &mut idx);
            let mut ranges: Vec<(u64, u64)> =
                idx.entries.iter().map(|e| (e.start, e.end())).collect();
            ranges.sort_unstable();
            let mut covered_to = 0;
            for (a, b) in ranges {
                let a = a.max(covered_to);
                if b > a {
                    total += b - a;
                    covered_to = b;
                }
            }
        }
        total
    }
}

/// An entry file's bytes (header, then data) in a buffer aligned for O_DIRECT and padded with
/// zeros to whole blocks (the file is cut back after the write). Fetches read into one
/// directly, so storing what they fetched copies nothing.
#[derive(Debug)]
pub struct EntryImage {
    buf: Vec<u8>,
    /// Where the header starts (aligned).
    at: usize,
    /// Bytes of data.
    len: usize,
}

impl super::http::PieceBuf for EntryImage {
    fn zeroed(len: usize) -> Self {
        EntryImage::zeroed(len)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.data_mut()
    }
}

impl EntryImage {
    /// An image for `len` bytes of data, zero until filled through `data_mut`.
    pub fn zeroed(len: usize) -> EntryImage {
        let whole = HEADER as usize + len;
        let padded = whole.div_ceil(BLOCK as usize) * BLOCK as usize;
        let mut buf: Vec<u8> = Vec::with_capacity(padded + BLOCK as usize);
        // Where no offset can be aligned, the write is unaligned: O_DIRECT refuses it (EINVAL)
        // and entries are written buffered.
        let at = buf
            .as_ptr()
            .align_offset(BLOCK as usize)
            .min(BLOCK as usize);
        buf.resize(at + padded, 0);
        EntryImage { buf, at, len }
    }

    pub fn data(&self) -> &[u8] {
        let from = self.at + HEADER as usize;
        &self.buf[from..from + self.len]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        let from = self.at + HEADER as usize;
        &mut self.buf[from..from + self.len]
    }

    /// Writes the header for the data as it is now.
    pub fn seal(&mut self) {
        let crc = crc32c::crc32c(self.data());
        let len = self.len as u32;
        let h = &mut self.buf[self.at..self.at + HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&crc.to_le_bytes());
        h[12..16].copy_from_slice(&len.to_le_bytes());
    }

    fn padded(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + HEADER as usize + self.len]
    }
}

fn header_ok(whole: &[u8], len: u64) -> bool {
    let (h, data) = whole.split_at(HEADER as usize);
    &h[..8] == MAGIC
        && u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as u64 == len
        && u32::from_le_bytes([h[8], h[9], h[10], h[11]]) == crc32c::crc32c(data)
}

fn touch_now(path: &Path) {
    if let Ok(f) = File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmfs-chunks-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn data(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn entries_persist_and_are_found_by_another_process_view() {
        let d = tmpdir("persist");
        let disk = DiskCache::open(&d, 64 << 20).unwrap();
        let obj = disk.object("s3://b/k", "s3://b/k", 8 << 20, "etag \"1\"");
        let bytes = data(1, 3 * CHUNK as usize / 2);
        obj.store(CHUNK / 2, &bytes);
        // Another daemon's view of the same object: found by listing.
        let other = DiskCache::open(&d, 64 << 20).unwrap().object(
            "s3://b/k",
            "s3://b/k",
            8 << 20,
            "etag \"1\"",
        );
        let pieces = other.lookup(0, 3 * CHUNK);
        assert_eq!(
            pieces,
            vec![
                Piece::Missing {
                    start: 0,
                    end: CHUNK / 2
                },
                Piece::Cached {
                    start: CHUNK / 2,
                    end: CHUNK,
                    entry: CHUNK / 2
                },
                Piece::Cached {
                    start: CHUNK,
                    end: 2 * CHUNK,
                    entry: CHUNK
                },
                Piece::Missing {
                    start: 2 * CHUNK,
                    end: 3 * CHUNK
                },
            ]
        );
        let mut buf = vec![0u8; 4096];
        assert!(other.read(CHUNK, CHUNK + 100, &mut buf).unwrap());
        let at = (CHUNK + 100 - CHUNK / 2) as usize;
        assert_eq!(buf, bytes[at..at + 4096]);
        // Another version of the object shares nothing.
        let v2 = disk.object("s3://b/k", "s3://b/k", 8 << 20, "etag \"2\"");
        assert_eq!(
            v2.lookup(CHUNK, CHUNK + 1),
            vec![Piece::Missing {
                start: CHUNK,
                end: CHUNK + 1
            }]
        );
        assert_eq!(obj.cached_bytes(), bytes.len() as u64);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn entries_written_direct_read_back_exactly() {
        let d = tmpdir("direct");
        let disk = DiskCache::open(&d, 64 << 20).unwrap();
        disk.write_direct(true);
        let obj = disk.object("s3://b/k", "s3://b/k", 8 << 20, "etag \"1\"");
        // Lengths that are not whole blocks: the padding is cut off again.
        let bytes = data(2, CHUNK as usize + 5000);
        obj.store(0, &bytes);
        let other = DiskCache::open(&d, 64 << 20).unwrap().object(
            "s3://b/k",
            "s3://b/k",
            8 << 20,
            "etag \"1\"",
        );
        assert_eq!(
            other.lookup(0, 2 * CHUNK).len(),
            3,
            "two entries and a miss"
        );
        let mut buf = vec![0u8; 5000];
        assert!(other.read(CHUNK, CHUNK, &mut buf).unwrap());
        assert_eq!(buf, bytes[CHUNK as usize..]);
        let mut buf = vec![0u8; 100];
        assert!(other.read(0, 7, &mut buf).unwrap());
        assert_eq!(buf, bytes[7..107]);
        assert_eq!(obj.cached_bytes(), bytes.len() as u64);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_identity_is_only_kept_hashed() {
        let d = tmpdir("identity");
        let disk = DiskCache::open(&d, 64 << 20).unwrap();
        let obj = disk.object("https://h/x?token=sekrit", "https://h/x?...", 1 << 20, "v");
        obj.store(0, &data(4, 4096));
        let about = fs::read_to_string(obj.dir.join("object")).unwrap();
        assert!(about.starts_with("https://h/x?...\n"), "{about}");
        let other = disk.object("https://h/x?token=other", "https://h/x?...", 1 << 20, "v");
        assert_ne!(obj.dir, other.dir, "another query is another object");
        for e in fs::read_dir(disk.root()).unwrap() {
            assert!(!e.unwrap().file_name().to_string_lossy().contains("sekrit"));
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn damaged_or_vanished_entries_read_as_missing() {
        let d = tmpdir("damaged");
        let disk = DiskCache::open(&d, 64 << 20).unwrap();
        let obj = disk.object("x", "x", 1 << 20, "v");
        obj.store(0, &data(2, 8192));
        obj.store(65536, &data(3, 4096));
        let fresh = disk.object("x", "x", 1 << 20, "v");
        let path = fresh.entry_path(0, 8192);
        let mut raw = fs::read(&path).unwrap();
        raw[100] ^= 1;
        fs::write(&path, raw).unwrap();
        let mut buf = vec![0u8; 10];
        assert!(matches!(fresh.lookup(0, 10)[0], Piece::Cached { .. }));
        assert!(!fresh.read(0, 0, &mut buf).unwrap(), "CRC mismatch");
        assert_eq!(
            fresh.lookup(0, 10),
            vec![Piece::Missing { start: 0, end: 10 }]
        );
        assert!(!path.exists());
        fs::remove_file(fresh.entry_path(65536, 4096)).unwrap();
        assert!(!fresh.read(65536, 65536, &mut buf).unwrap(), "evicted");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn eviction_keeps_the_cache_under_its_limit_dropping_the_oldest() {
        let d = tmpdir("evict");
        let disk = DiskCache::open(&d, 4 * CHUNK).unwrap();
        let obj = disk.object("y", "y", 64 << 20, "v");
        let old = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..8u64 {
            obj.store(i * CHUNK, &data(i, CHUNK as usize));
            if i == 0 {
                // The first entry was used long ago: it goes first.
                File::open(obj.entry_path(0, CHUNK))
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        }
        let total = scan(disk.root()).total;
        assert!(total <= 4 * CHUNK + 64, "{total}");
        assert!(!obj.entry_path(0, CHUNK).exists());
        assert!(
            obj.entry_path(7 * CHUNK, CHUNK).exists(),
            "the newest stays"
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
