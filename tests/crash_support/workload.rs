//! One recorded run: a chain (backing file, overlay with an internal snapshot) built with
//! qemu-img/qemu-io on a hostfs, the daemon mounted on the overlay while hostfs records, and
//! a seeded workload of O_DIRECT writes, discards and fsyncs through disk.raw.

use super::guest::{GuestLog, GuestOp, SECTOR, tagged_range};
use crate::common::*;
use crate::hostfs::{Event, HostFs};
use crate::mount_support::*;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

pub const TOP: &str = "top.qcow2";
pub const BASE: &str = "base.qcow2";
pub const SNAP: &str = "snap1";

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub name: &'static str,
    /// `qemu-img create -o` options of both images.
    pub opts: &'static str,
    pub size: u64,
    /// Guest operations in the workload.
    pub ops: usize,
    /// Bytes the setup writes per 64 KiB of a prefilled region.
    pub fill: u64,
    /// Guest threads writing at once (each its own slice of the disk).
    pub threads: usize,
}

/// What a run leaves: the overlay before the daemon opened it, every host event on the
/// chain's files, and the guest's history.
pub struct Run {
    pub pre: Vec<u8>,
    pub base: Vec<u8>,
    pub events: Vec<Event>,
    pub log: GuestLog,
    /// Sector generations of the internal snapshot.
    pub snapshot: Vec<u64>,
}

/// A 4 KiB-aligned buffer for O_DIRECT.
pub struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    pub fn new(data: &[u8]) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(data.len().max(1), 4096).unwrap();
        // SAFETY: a non-zero size layout; checked for null below.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: ptr has room for data.len() bytes and does not overlap data.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Aligned { ptr, layout }
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr holds layout.size() initialised bytes, alive as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Writes generation `generation` to the sectors of `chunks` of `image` with qemu-io.
fn qemu_fill(dir: &Path, image: &Path, chunks: &[(u64, u64)], generation: u64, gens: &mut [u64]) {
    let mut cmds = Vec::new();
    for (i, &(off, len)) in chunks.iter().enumerate() {
        let pat = dir.join(format!("fill-{generation}-{i}.pat"));
        std::fs::write(&pat, tagged_range(off, len, generation)).unwrap();
        cmds.push(format!("write -q -s {} {off} {len}", pat.display()));
        for s in off / SECTOR..(off + len) / SECTOR {
            gens[s as usize] = generation;
        }
    }
    qemu_io("qcow2", image, &cmds);
    for i in 0..chunks.len() {
        let _ = std::fs::remove_file(dir.join(format!("fill-{generation}-{i}.pat")));
    }
}

/// Chunks of `fill` bytes every 64 KiB of `range`, at a seeded offset inside each.
fn chunks(rng: &mut Rng, from: u64, to: u64, fill: u64) -> Vec<(u64, u64)> {
    (from / 65536..to / 65536)
        .map(|i| {
            let slack = (65536 - fill) / SECTOR;
            (i * 65536 + rng.below(slack + 1) * SECTOR, fill)
        })
        .collect()
}

fn create(image: &Path, opts: &str, size: u64, backing: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    let size = size.to_string();
    args.extend([image.to_str().unwrap(), &size]);
    qemu_img(&args);
}

/// Builds the chain under `fs` (see `Run`): the sector generations of the overlay's disk and
/// of its internal snapshot.
pub fn build_chain(s: &Scratch, fs: &HostFs, cfg: &Config, rng: &mut Rng) -> (Vec<u64>, Vec<u64>) {
    let (size, q) = (cfg.size, cfg.size / 4);
    let sectors = (size / SECTOR) as usize;
    let (base, top) = (fs.path(BASE), fs.path(TOP));
    let mut gens = vec![0u64; sectors];
    // Quarter 0: backing data; 1: overlay data shared with the snapshot; 2: overlay data
    // written after the snapshot; 3: nothing.
    create(&base, cfg.opts, size, None);
    qemu_fill(&s.0, &base, &chunks(rng, 0, q, cfg.fill), 1, &mut gens);
    create(&top, cfg.opts, size, Some(BASE));
    let shared = chunks(rng, q / 2, 2 * q, cfg.fill);
    qemu_fill(&s.0, &top, &shared, 2, &mut gens);
    qemu_img(&["snapshot", "-c", SNAP, top.to_str().unwrap()]);
    let snapshot = gens.clone();
    qemu_fill(
        &s.0,
        &top,
        &chunks(rng, 2 * q, 3 * q, cfg.fill),
        3,
        &mut gens,
    );
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    (gens, snapshot)
}

/// Builds the chain under `fs`, records the daemon serving the workload of `seed`.
pub fn record(s: &Scratch, fs: &HostFs, cfg: &Config, seed: u64) -> Run {
    let mut rng = Rng::new(seed);
    let (gens, snapshot) = build_chain(s, fs, cfg, &mut rng);
    let top = fs.path(TOP);
    let pre = std::fs::read(fs.backing_path(TOP)).unwrap();
    let base_bytes = std::fs::read(fs.backing_path(BASE)).unwrap();
    let mut log = GuestLog::new(gens);
    fs.start_recording();
    let (guard, mnt) = mount(&top, &s.0, &[]);
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(mnt.join("disk.raw"))
        .unwrap();
    // Guest threads write disjoint slices of every quarter (so each sector's versions come
    // from one thread, in order) while sharing the L2 tables and refcount blocks.
    let threads = cfg.threads.max(1);
    let results: Vec<Share> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (disk, fs) = (&disk, fs);
                let mut rng = Rng::new(rng.next_u64() ^ t as u64);
                scope.spawn(move || guest_thread(cfg, t, threads, &mut rng, disk, fs))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ops: Vec<GuestOp> = Vec::new();
    for (o, f) in results {
        ops.extend(o);
        log.fsyncs.extend(f);
    }
    ops.sort_by_key(|o| o.start);
    for op in ops {
        log.push(op);
    }
    let start = fs.mark();
    disk.sync_all().unwrap();
    log.fsyncs.push((start, fs.mark()));
    drop(disk);
    unmount(&mnt);
    drop(guard);
    let events = fs.stop_recording();
    Run {
        pre,
        base: base_bytes,
        events,
        log,
        snapshot,
    }
}

/// A guest thread's operations and the (start, end) marks of its fsyncs.
type Share = (Vec<GuestOp>, Vec<(u64, u64)>);

/// One guest thread's share of the workload: its operations and fsyncs, placed by marks.
fn guest_thread(
    cfg: &Config,
    t: usize,
    threads: usize,
    rng: &mut Rng,
    disk: &std::fs::File,
    fs: &HostFs,
) -> Share {
    let q = cfg.size / 4;
    let mut ops = Vec::new();
    let mut fsyncs = Vec::new();
    for i in 0..cfg.ops / threads {
        let generation = 10 + (i * threads + t) as u64;
        let r = rng.below(100);
        if r < 10 {
            let start = fs.mark();
            if r < 8 {
                disk.sync_data().unwrap();
            } else {
                disk.sync_all().unwrap();
            }
            fsyncs.push((start, fs.mark()));
            continue;
        }
        let quarter = rng.below(4);
        let aligned = rng.below(10) < 6;
        let len = match rng.below(20) {
            0..=11 => 4096,
            12..=16 => (1 + rng.below(8)) * SECTOR,
            _ => (2 + rng.below(31)) * 4096,
        };
        let unit = if aligned { 4096 } else { SECTOR };
        let slice = q / threads as u64;
        let from = quarter * q + t as u64 * slice;
        let span = slice.saturating_sub(len) / unit;
        let off = (from + rng.below(span + 1) * unit).min(from + slice - len);
        let start = fs.mark();
        if r < 18 {
            // SAFETY: fallocate on an open descriptor with plain integer arguments.
            let rc = unsafe {
                libc::fallocate(
                    disk.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                )
            };
            assert_eq!(rc, 0, "discard: {}", std::io::Error::last_os_error());
            let end = fs.mark();
            ops.push(GuestOp {
                off,
                len,
                generation: 0,
                start,
                end,
            });
        } else {
            let buf = Aligned::new(&tagged_range(off, len, generation));
            disk.write_all_at(buf.bytes(), off).unwrap();
            let end = fs.mark();
            ops.push(GuestOp {
                off,
                len,
                generation,
                start,
                end,
            });
        }
    }
    (ops, fsyncs)
}
