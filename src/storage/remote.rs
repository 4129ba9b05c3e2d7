//! The remote backend: one object on an HTTP(S) server or in an S3 bucket, read lazily
//! through the chunk cache.
//!
//! A read looks its range up in the cache; what is missing is fetched with ranged GETs
//! (neighbouring misses merged into one GET, 4 KiB-aligned for random reads, to the end of
//! the chunk for sequential ones) while sequential streams get read-ahead: whole chunks
//! further on, fetched by a small pool of threads, several GETs in flight. A range being
//! fetched is claimed, so concurrent readers of it wait for that one GET instead of issuing
//! their own. The object's size and validator are pinned when it is opened: a reply for any
//! other version fails the reads that needed it with EIO and a log line naming the URL.

use super::chunk_cache::{BLOCK, CHUNK, EntryImage, ObjectCache, Piece};
use super::http::{Client, Failure, MAX_GET, Pinned};
use super::url::RemoteUrl;
use super::{Backend, FileKey};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Builds the URL of each request (S3 signs every one afresh).
pub type UrlFn = Box<dyn Fn() -> String + Send + Sync>;

/// Read-ahead grows to this many chunks ahead of a sequential reader.
const MAX_READAHEAD_CHUNKS: u64 = 32;
/// Read-ahead GETs (and so the most in flight for one stream).
const PREFETCH_GET: u64 = 4 * CHUNK;
const PREFETCH_THREADS: usize = 6;
/// No read-ahead is queued while this many jobs wait.
const PREFETCH_QUEUE: usize = 64;
/// Sequential streams tracked per object.
const STREAMS: usize = 8;
/// How far out of order a read may come and still continue a sequential stream (a 1 MiB
/// read arrives as up to eight 128 KiB requests, several reads in flight).
const SEQ_SLACK: u64 = 4 << 20;
/// Bytes of completed fetches kept in memory per object (a little more than read-ahead's
/// window, so its reader finds them there).
const RECENT_BYTES: u64 = MAX_READAHEAD_CHUNKS * CHUNK + 2 * PREFETCH_GET;
/// Cached bytes between two misses that are fetched again rather than split the GET.
const MERGE_GAP: u64 = 64 << 10;

/// What `--list` and the log show about a remote object.
#[derive(Clone, Debug, Default)]
pub struct RemoteStats {
    pub url: String,
    pub size: u64,
    pub validator: String,
    pub reads: u64,
    pub bytes_read: u64,
    pub bytes_from_cache: u64,
    pub bytes_fetched: u64,
    pub gets: u64,
    pub failures: u64,
    /// Bytes of this object in the persistent cache (only filled in on request).
    pub cached_bytes: Option<u64>,
}

/// A claimed range being fetched. Its bytes are published piece by piece (a chunk at a time)
/// as they arrive, so readers waiting on the start of a large GET need not wait for its end.
struct Fetch {
    start: u64,
    end: u64,
    state: Mutex<FetchState>,
    ready: Condvar,
}

/// Bytes of the object from an offset.
type Arrived = (u64, Arc<EntryImage>);

struct FetchState {
    /// The pieces that arrived, in order from `start`.
    pieces: Vec<Arrived>,
    /// Bytes up to here have arrived.
    filled: u64,
    /// Set when the GET ended: why it failed, if it did.
    done: Option<Result<(), String>>,
}

impl Fetch {
    /// Waits until the bytes [a, b) of this fetch arrived and gives the pieces holding them.
    fn wait_for(&self, a: u64, b: u64) -> Result<Vec<Arrived>, String> {
        let mut st = self.state.lock();
        loop {
            if st.filled >= b {
                return Ok(st
                    .pieces
                    .iter()
                    .filter(|(at, p)| *at < b && at + p.data().len() as u64 > a)
                    .cloned()
                    .collect());
            }
            match &st.done {
                Some(Err(e)) => return Err(e.clone()),
                Some(Ok(())) => return Err("the fetch ended before the bytes arrived".into()),
                None => self.ready.wait(&mut st),
            }
        }
    }

    /// Copies what this fetch holds of [off, off + buf.len()) into `buf`, waiting for it.
    fn copy_into(&self, buf: &mut [u8], off: u64) -> Result<(), String> {
        let a = off.max(self.start);
        let b = (off + buf.len() as u64).min(self.end);
        if a >= b {
            return Ok(());
        }
        for (at, piece) in self.wait_for(a, b)? {
            copy_overlap(buf, off, piece.data(), at);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
struct Stream {
    /// Where the stream started.
    first: u64,
    /// Where the next sequential read would start.
    next: u64,
    /// Sequential reads in a row.
    run: u32,
    /// Bytes read sequentially in this stream.
    bytes: u64,
    /// Read-ahead was issued up to here.
    ahead_to: u64,
    last_use: u64,
}

struct Inner {
    url: RemoteUrl,
    request_url: UrlFn,
    client: Arc<Client>,
    pinned: Pinned,
    cache: Option<ObjectCache>,
    inflight: Mutex<Vec<Arc<Fetch>>>,
    /// The last fetches that completed, kept in memory (bounded by `RECENT_BYTES`): read-ahead
    /// runs ahead of its reader, and reading its bytes back from the cache would cost more
    /// than fetching them did.
    recent: Mutex<VecDeque<Arc<Fetch>>>,
    streams: Mutex<(u64, [Stream; STREAMS])>,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    bytes_from_cache: AtomicU64,
    bytes_fetched: AtomicU64,
    gets: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<(String, Instant)>>,
}

/// A remote object opened for reading (the `Backend`), sharable between opens of one URL.
#[derive(Clone)]
pub struct RemoteObject {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RemoteObject({}, {} bytes)",
            self.inner.url, self.inner.pinned.size
        )
    }
}

impl RemoteObject {
    pub fn new(
        url: RemoteUrl,
        request_url: UrlFn,
        client: Arc<Client>,
        pinned: Pinned,
        cache: Option<ObjectCache>,
    ) -> RemoteObject {
        RemoteObject {
            inner: Arc::new(Inner {
                url,
                request_url,
                client,
                pinned,
                cache,
                inflight: Mutex::new(Vec::new()),
                recent: Mutex::new(VecDeque::new()),
                streams: Mutex::new((0, [Stream::default(); STREAMS])),
                reads: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                bytes_from_cache: AtomicU64::new(0),
                bytes_fetched: AtomicU64::new(0),
                gets: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        }
    }

    pub fn size(&self) -> u64 {
        self.inner.pinned.size
    }

    /// The object's Last-Modified, as pinned when it was opened.
    pub fn modified(&self) -> Option<std::time::SystemTime> {
        httpdate::parse_http_date(self.inner.pinned.last_modified.as_deref()?).ok()
    }

    pub fn stats(&self, with_cached_bytes: bool) -> RemoteStats {
        let i = &self.inner;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            url: i.url.to_string(),
            size: i.pinned.size,
            validator: i.pinned.validator(),
            reads: get(&i.reads),
            bytes_read: get(&i.bytes_read),
            bytes_from_cache: get(&i.bytes_from_cache),
            bytes_fetched: get(&i.bytes_fetched),
            gets: get(&i.gets),
            failures: get(&i.failures),
            cached_bytes: with_cached_bytes
                .then(|| i.cache.as_ref().map_or(0, |c| c.cached_bytes())),
        }
    }
}

impl Backend for RemoteObject {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let size = self.inner.pinned.size;
        if off >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(size - off) as usize;
        let sequential = self.inner.note_read(off, len as u64);
        self.inner.fill(&mut buf[..len], off, sequential)?;
        self.inner.reads.fetch_add(1, Ordering::Relaxed);
        self.inner
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        if sequential {
            self.inner.read_ahead(off + len as u64);
        }
        Ok(len)
    }

    fn write_all_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn current_len(&self) -> io::Result<u64> {
        Ok(self.inner.pinned.size)
    }

    fn punch_hole(&self, _off: u64, _len: u64) -> io::Result<bool> {
        Err(read_only())
    }

    fn key(&self) -> FileKey {
        FileKey::Remote(self.inner.url.to_string())
    }

    fn remote(&self) -> Option<&RemoteObject> {
        Some(self)
    }
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        "remote objects are read-only",
    )
}

impl Stream {
    /// Two reads or more that read most of the span they cover: random reads that happen to
    /// land near each other (within `SEQ_SLACK`) cover a span far larger than what they read.
    fn sequential(&self) -> bool {
        self.run >= 2 && self.bytes.saturating_mul(2) >= self.next.saturating_sub(self.first)
    }
}

impl Inner {
    /// Records a read in the stream table; true when it continues a sequential stream.
    fn note_read(&self, off: u64, len: u64) -> bool {
        let mut guard = self.streams.lock();
        let (clock, streams) = &mut *guard;
        *clock += 1;
        let now = *clock;
        let end = off + len;
        // The kernel splits a large read into several requests that worker threads serve in
        // any order, so a read near where a stream is continues it.
        if let Some(s) = streams
            .iter_mut()
            .find(|s| s.run > 0 && continues(s.next, off, end))
        {
            s.next = s.next.max(end);
            s.run = s.run.saturating_add(1);
            s.bytes = s.bytes.saturating_add(len);
            s.last_use = now;
            return s.sequential();
        }
        let oldest = streams
            .iter_mut()
            .min_by_key(|s| s.last_use)
            .expect("STREAMS > 0");
        *oldest = Stream {
            first: off,
            next: end,
            run: 1,
            bytes: len,
            ahead_to: end,
            last_use: now,
        };
        false
    }

    /// Fills `buf` with the object's bytes at `off` (inside the object).
    fn fill(self: &Arc<Self>, buf: &mut [u8], off: u64, sequential: bool) -> io::Result<()> {
        let end = off + buf.len() as u64;
        let mut todo = vec![(off, end)];
        let mut rounds = 0;
        while let Some((a, b)) = todo.pop() {
            rounds += 1;
            if rounds > 64 {
                return Err(io::Error::other(
                    "the chunk cache keeps changing under this read",
                ));
            }
            let mut pieces = Vec::new();
            for (a, b) in self.copy_recent(buf, off, a, b) {
                match &self.cache {
                    Some(c) => pieces.extend(c.lookup(a, b)),
                    None => pieces.push(Piece::Missing { start: a, end: b }),
                }
            }
            let mut missing = Vec::new();
            for p in pieces {
                match p {
                    Piece::Cached {
                        start,
                        end: e,
                        entry,
                    } => {
                        let dst = &mut buf[(start - off) as usize..(e - off) as usize];
                        let cache = self.cache.as_ref().expect("cached pieces need a cache");
                        if cache.read(entry, start, dst)? {
                            self.bytes_from_cache
                                .fetch_add(e - start, Ordering::Relaxed);
                        } else {
                            todo.push((start, e));
                        }
                    }
                    Piece::Missing { start, end: e } => missing.push((start, e)),
                }
            }
            if !missing.is_empty() {
                self.fetch_into(buf, off, &merge(missing), sequential)?;
            }
        }
        Ok(())
    }

    /// Copies what recent fetches hold of [a, b) into `buf` (which starts at `off`); gives the
    /// parts of [a, b) they do not hold.
    fn copy_recent(&self, buf: &mut [u8], off: u64, a: u64, b: u64) -> Vec<(u64, u64)> {
        let recent = self.recent.lock();
        let mut held: Vec<(u64, u64)> = Vec::new();
        for f in recent.iter().filter(|f| f.start < b && f.end > a) {
            // Recent fetches completed: nothing to wait for.
            if f.copy_into(buf, off).is_ok() {
                held.push((f.start.max(a), f.end.min(b)));
            }
        }
        drop(recent);
        let from_memory: u64 = held.iter().map(|(x, y)| y - x).sum();
        self.bytes_from_cache
            .fetch_add(from_memory, Ordering::Relaxed);
        held.sort_unstable();
        let mut rest = Vec::new();
        let mut pos = a;
        for (x, y) in held {
            if x > pos {
                rest.push((pos, x));
            }
            pos = pos.max(y);
        }
        if pos < b {
            rest.push((pos, b));
        }
        rest
    }

    /// Fetches the `missing` ranges of `buf` (which starts at `off`): ranges someone else is
    /// fetching are waited for, the rest is claimed and fetched here.
    fn fetch_into(
        self: &Arc<Self>,
        buf: &mut [u8],
        off: u64,
        missing: &[(u64, u64)],
        sequential: bool,
    ) -> io::Result<()> {
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            for &(a, b) in missing {
                let mut pos = a;
                while pos < b {
                    if let Some(f) = inflight.iter().find(|f| f.start <= pos && pos < f.end) {
                        theirs.push(f.clone());
                        pos = f.end;
                        continue;
                    }
                    // Claims are block-aligned, so aligning `pos` down never reaches into one.
                    let limit = claimed_after(&inflight, pos);
                    let (start, stop) = self.aligned(pos, b.min(limit), sequential);
                    let stop = stop.min(limit).min(start + MAX_GET);
                    mine.push(claim(&mut inflight, start, stop));
                    pos = stop;
                }
            }
        }
        let mut first_err = None;
        for f in &mine {
            if let Err(e) = self.run_fetch(f)
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        }
        for f in mine.iter().chain(&theirs) {
            if let Err(e) = f.copy_into(buf, off)
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        }
        match first_err {
            Some(e) => Err(io::Error::other(e)),
            None => Ok(()),
        }
    }

    /// The range to fetch for a miss at [a, b): 4 KiB-aligned, and for sequential readers
    /// on to the end of the chunk.
    fn aligned(&self, a: u64, b: u64, sequential: bool) -> (u64, u64) {
        let size = self.pinned.size;
        let start = a / BLOCK * BLOCK;
        let mut end = b.div_ceil(BLOCK) * BLOCK;
        if sequential {
            end = end.max((a / CHUNK + 1) * CHUNK);
        }
        (start, end.min(size))
    }

    /// Fetches a claimed range, publishing each chunk's piece to the waiters and storing it
    /// in the cache as it arrives, and releases the claim.
    fn run_fetch(&self, f: &Arc<Fetch>) -> Result<(), String> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let mut arrived = |at: u64, mut data: EntryImage| {
            let len = data.data().len() as u64;
            if self.cache.is_some() {
                data.seal();
            }
            let data = Arc::new(data);
            {
                let mut st = f.state.lock();
                st.pieces.push((at, data.clone()));
                st.filled = at + len;
            }
            f.ready.notify_all();
            self.bytes_fetched.fetch_add(len, Ordering::Relaxed);
            if let Some(cache) = &self.cache {
                cache.store_image(at, &data);
            }
        };
        let got = self.client.get_range_pieces(
            &*self.request_url,
            &self.pinned,
            f.start,
            f.end,
            CHUNK,
            &mut arrived,
        );
        let result = got.map_err(|fail| self.failed(fail, f.start, (f.end - f.start) as usize));
        f.state.lock().done = Some(result.clone());
        f.ready.notify_all();
        if result.is_ok() {
            let mut recent = self.recent.lock();
            recent.push_back(f.clone());
            let mut kept: u64 = recent.iter().map(|f| f.end - f.start).sum();
            while kept > RECENT_BYTES
                && let Some(old) = recent.pop_front()
            {
                kept -= old.end - old.start;
            }
        }
        self.inflight.lock().retain(|x| !Arc::ptr_eq(x, f));
        result
    }

    /// Logs a failed GET (once per distinct error a few seconds) and says what the reads
    /// that needed it get.
    fn failed(&self, fail: Failure, off: u64, len: usize) -> String {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let why = match &fail {
            Failure::Missing => "the object no longer exists on the server".to_string(),
            Failure::Transient(m) | Failure::Changed(m) | Failure::Fatal(m) => m.clone(),
        };
        let msg = format!("{}: {len} bytes at {off:#x}: {why}", self.url);
        let mut last = self.last_error.lock();
        let repeat = last
            .as_ref()
            .is_some_and(|(m, t)| *m == why && t.elapsed() < Duration::from_secs(5));
        if repeat {
            log::debug!("{msg}");
        } else {
            log::error!("{msg}; reads that need these bytes fail with EIO");
            *last = Some((why.clone(), Instant::now()));
        }
        why
    }

    /// Queues read-ahead for a sequential stream that reached `pos`.
    fn read_ahead(self: &Arc<Self>, pos: u64) {
        // Without a cache, read-ahead would have nowhere to keep what it fetched; with too
        // much queued, the readers are faster than the network anyway.
        if self.cache.is_none() || !READ_AHEAD.load(Ordering::Acquire) || prefetcher().busy() {
            return;
        }
        let size = self.pinned.size;
        let (from, to) = {
            let mut guard = self.streams.lock();
            let Some(s) = guard
                .1
                .iter_mut()
                .find(|s| s.run > 0 && continues(s.next, pos, pos))
            else {
                return;
            };
            let pos = s.next;
            // Like the kernel's read-ahead: twice what the stream read so far, up to a limit.
            let window = s
                .bytes
                .saturating_mul(2)
                .clamp(CHUNK, MAX_READAHEAD_CHUNKS * CHUNK);
            let want = (pos + window).min(size);
            // Issue in steps of at least one GET, not per read.
            if s.ahead_to >= want || want - s.ahead_to.max(pos) < PREFETCH_GET.min(size - pos) {
                return;
            }
            let from = s.ahead_to.max(pos);
            s.ahead_to = want;
            (from, want)
        };
        let missing = match &self.cache {
            Some(c) => c
                .lookup(from, to)
                .into_iter()
                .filter_map(|p| match p {
                    Piece::Missing { start, end } => Some((start, end)),
                    _ => None,
                })
                .collect(),
            None => vec![(from, to)],
        };
        let mut jobs = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            for (a, b) in missing {
                let mut pos = a / BLOCK * BLOCK;
                let b = b.div_ceil(BLOCK).saturating_mul(BLOCK).min(size);
                while pos < b {
                    if let Some(f) = inflight.iter().find(|f| f.start <= pos && pos < f.end) {
                        pos = f.end;
                        continue;
                    }
                    let stop = (pos + PREFETCH_GET)
                        .min(b)
                        .min(claimed_after(&inflight, pos));
                    jobs.push(claim(&mut inflight, pos, stop));
                    pos = stop;
                }
            }
        }
        for f in jobs {
            prefetcher().submit(self.clone(), f);
        }
    }
}

/// Whether a read of [off, end) continues a stream whose next read would start at `next`:
/// it starts at most `SEQ_SLACK` before or after it.
fn continues(next: u64, off: u64, end: u64) -> bool {
    off <= next.saturating_add(SEQ_SLACK) && end.saturating_add(SEQ_SLACK) >= next
}

/// Where the next claimed range after `pos` starts.
fn claimed_after(inflight: &[Arc<Fetch>], pos: u64) -> u64 {
    inflight
        .iter()
        .map(|f| f.start)
        .filter(|&s| s > pos)
        .min()
        .unwrap_or(u64::MAX)
}

fn claim(inflight: &mut Vec<Arc<Fetch>>, start: u64, end: u64) -> Arc<Fetch> {
    let f = Arc::new(Fetch {
        start,
        end,
        state: Mutex::new(FetchState {
            pieces: Vec::new(),
            filled: start,
            done: None,
        }),
        ready: Condvar::new(),
    });
    inflight.push(f.clone());
    f
}

/// Merges misses separated by little cached data into one GET.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match out.last_mut() {
            Some((_, e)) if a <= e.saturating_add(MERGE_GAP) => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Copies the part of `data` (object bytes from `data_off`) that overlaps `buf` (from `off`).
fn copy_overlap(buf: &mut [u8], off: u64, data: &[u8], data_off: u64) {
    let a = off.max(data_off);
    let b = (off + buf.len() as u64).min(data_off + data.len() as u64);
    if a < b {
        buf[(a - off) as usize..(b - off) as usize]
            .copy_from_slice(&data[(a - data_off) as usize..(b - data_off) as usize]);
    }
}

/// Set by `enable_read_ahead` in the process that serves.
static READ_AHEAD: AtomicBool = AtomicBool::new(false);

/// Lets sequential readers get read-ahead (its threads start on first use).
pub fn enable_read_ahead() {
    READ_AHEAD.store(true, Ordering::Release);
}

type Job = (Arc<Inner>, Arc<Fetch>);

/// Threads that run read-ahead GETs.
struct Prefetcher {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

fn prefetcher() -> &'static Prefetcher {
    static P: OnceLock<&'static Prefetcher> = OnceLock::new();
    P.get_or_init(|| {
        let p: &'static Prefetcher = Box::leak(Box::new(Prefetcher {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        }));
        for i in 0..PREFETCH_THREADS {
            let spawned = std::thread::Builder::new()
                .name(format!("vmfs-prefetch-{i}"))
                .spawn(move || p.work());
            if let Err(e) = spawned {
                log::warn!("cannot start a read-ahead thread: {e}");
            }
        }
        p
    })
}

impl Prefetcher {
    fn busy(&self) -> bool {
        self.queue.lock().len() >= PREFETCH_QUEUE
    }

    fn submit(&self, inner: Arc<Inner>, f: Arc<Fetch>) {
        self.queue.lock().push_back((inner, f));
        self.ready.notify_one();
    }

    fn work(&self) {
        loop {
            let (inner, f) = {
                let mut q = self.queue.lock();
                loop {
                    if let Some(job) = q.pop_front() {
                        break job;
                    }
                    self.ready.wait(&mut q);
                }
            };
            let _ = inner.run_fetch(&f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_close_together_merge_into_one_get() {
        assert_eq!(
            merge(vec![(0, 4096), (8192, 12288), (1 << 30, (1 << 30) + 1)]),
            vec![(0, 12288), (1 << 30, (1 << 30) + 1)]
        );
    }

    #[test]
    fn reads_out_of_order_near_a_stream_continue_it() {
        assert!(continues(1 << 20, 1 << 20, 2 << 20));
        assert!(continues(8 << 20, 9 << 20, 10 << 20), "a little ahead");
        assert!(
            continues(8 << 20, 7 << 20, 7 << 20 | 4096),
            "a little behind"
        );
        assert!(!continues(8 << 20, 100 << 20, 101 << 20));
        assert!(!continues(100 << 20, 0, 4096));
    }

    #[test]
    fn random_reads_near_each_other_are_not_a_stream_but_shuffled_sequential_ones_are() {
        let mut s = Stream {
            first: 0,
            next: 4096,
            run: 1,
            bytes: 4096,
            ..Default::default()
        };
        for off in [3 << 20, 6 << 20, 9 << 20] {
            assert!(continues(s.next, off, off + 4096));
            s.next = s.next.max(off + 4096);
            s.run += 1;
            s.bytes += 4096;
            assert!(!s.sequential(), "4 KiB reads megabytes apart at {off}");
        }
        let mut s = Stream {
            first: 1 << 20,
            next: (1 << 20) + (128 << 10),
            run: 1,
            bytes: 128 << 10,
            ..Default::default()
        };
        // The other 128 KiB requests of a 1 MiB read, served out of order.
        for i in [3u64, 2, 7, 4, 1, 6, 5] {
            let off = (1 << 20) + i * (128 << 10);
            s.next = s.next.max(off + (128 << 10));
            s.run += 1;
            s.bytes += 128 << 10;
            assert!(s.sequential());
        }
    }

    #[test]
    fn overlaps_are_copied_exactly() {
        let mut buf = [0u8; 8];
        copy_overlap(&mut buf, 100, &[1, 2, 3, 4, 5, 6], 98);
        assert_eq!(buf, [3, 4, 5, 6, 0, 0, 0, 0]);
        copy_overlap(&mut buf, 100, &[9, 9], 200);
        assert_eq!(buf, [3, 4, 5, 6, 0, 0, 0, 0]);
    }
}
