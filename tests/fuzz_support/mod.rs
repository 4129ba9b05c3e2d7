//! The fuzz harness, shared by the cargo-fuzz targets (fuzz/, nightly) and the regression
//! test that replays every input they found (tests/fuzz_regressions.rs, stable).
//!
//! An input is one or more files joined by `SPLIT`; each target names the files (the first
//! is the image the user names, the rest its parents, extents or sidecars, so a chain of two
//! or a descriptor with its extent is one input). The files are written to a private temp
//! directory, the first is opened with its chain under the default backing-file policy, and
//! ranges derived from the input are read. Errors are fine; a panic, a hang or a huge
//! allocation is a bug.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::format::{Format, Layer, OpenCtx, probe};
use vmfs_mount::partition;
use vmfs_mount::view::View;

/// Separates the files of one input.
pub const SPLIT: &[u8] = b"\n--8<--FILE--8<--\n";

/// Most bytes read from one view, so one input stays fast whatever its virtual size.
const READ_LEN: usize = 64 << 10;

/// One fuzz target: its name (the fuzz/ target and the regression directory) and the file
/// names the parts of an input are written to.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub files: &'static [&'static str],
    /// The top image's format, or None to detect it (probe).
    pub format: Option<Format>,
}

pub const PROBE: Target = Target {
    name: "probe",
    files: &["image", "parent"],
    format: None,
};
pub const QCOW2: Target = Target {
    name: "qcow2",
    files: &["top.qcow2", "base.img"],
    format: Some(Format::Qcow2),
};
pub const VMDK: Target = Target {
    name: "vmdk",
    files: &["top.vmdk", "base.vmdk", "top-s001.vmdk", "vm.vmsd"],
    format: Some(Format::Vmdk),
};
pub const VHD: Target = Target {
    name: "vhd",
    files: &["top.vhd", "base.vhd"],
    format: Some(Format::Vpc),
};
pub const VHDX: Target = Target {
    name: "vhdx",
    files: &["top.vhdx", "base.vhdx"],
    format: Some(Format::Vhdx),
};
/// VirtualBox's layout: a differencing image in Snapshots/, its parent and the .vbox above.
pub const VDI: Target = Target {
    name: "vdi",
    files: &[
        "Snapshots/{11111111-2222-3333-4444-555555555555}.vdi",
        "base.vdi",
        "vm.vbox",
    ],
    format: Some(Format::Vdi),
};

pub const ALL: &[Target] = &[PROBE, QCOW2, VMDK, VHD, VHDX, VDI];

/// Splits an input into at most `n` files.
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < n {
        match find(rest, SPLIT) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + SPLIT.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Joins files into one input (seed corpora).
pub fn join(files: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(SPLIT);
        }
        out.extend_from_slice(f);
    }
    out
}

/// A per-process scratch directory under the temp dir, emptied before each input.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hostile-fuzz-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create fuzz scratch dir");
        Scratch { dir }
    }

    /// Writes the parts of `data` as `target`'s files; returns the first one's path.
    pub fn write(&self, target: &Target, data: &[u8]) -> PathBuf {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).expect("recreate fuzz scratch dir");
        let parts = split(data, target.files.len());
        for (name, bytes) in target.files.iter().zip(&parts) {
            let p = self.dir.join(name);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).expect("create fuzz subdir");
            }
            std::fs::write(&p, bytes).expect("write fuzz file");
        }
        self.dir.join(target.files[0])
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A small deterministic generator, seeded from the input, for the read offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Runs one input through `target`.
pub fn run(target: &Target, scratch: &Scratch, data: &[u8]) {
    if target.format.is_none() {
        let head = &data[..data.len().min(1024)];
        let tail = (data.len() >= 512).then(|| &data[data.len() - 512..]);
        let _ = probe::detect_bytes(head, tail);
    }
    let top = scratch.write(target, data);
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(8 << 20)), false);
    let Ok(layers) = vmfs_mount::chain::open_chain(&top, target.format, &ctx) else {
        return;
    };
    // The last 8 bytes pick the read offsets, so the fuzzer can steer them.
    let mut seed = [0u8; 8];
    let n = data.len().min(8);
    seed[..n].copy_from_slice(&data[data.len() - n..]);
    let mut rng = Rng(u64::from_le_bytes(seed));
    for l in &layers {
        let _ = (l.details(), l.identity(), l.display_name(), l.files());
    }
    let size = layers[0].virtual_size();
    let sector = layers[0].logical_sector_size();
    let snapshots = layers[0].snapshots();
    exercise(layers.clone(), size, sector, &mut rng);
    for s in snapshots.iter().take(4) {
        if let Ok(snap) = layers[0].open_snapshot(s.index) {
            let mut chain = vec![snap];
            chain.extend(layers[1..].iter().cloned());
            exercise(chain, s.virtual_size, sector, &mut rng);
        }
        if let Ok(older) = layers[0].open_snapshot(s.index) {
            let _ = layers[0].changed_since(&*older, 0, size.min(1 << 30));
        }
    }
}

/// Reads a view the way the FUSE side does: the start, the end, random ranges, the
/// partition table, SEEK_DATA/SEEK_HOLE and the allocated size.
fn exercise(layers: Vec<Arc<dyn Layer>>, size: u64, sector: Option<u32>, rng: &mut Rng) {
    let view = View::new(layers, size, Arc::new(ByteCache::new(4 << 20)), 64);
    let mut buf = vec![0u8; 8192];
    let mut budget = READ_LEN;
    let mut offsets = vec![0, size.saturating_sub(4096), size / 2];
    for _ in 0..4 {
        offsets.push(if size == 0 { 0 } else { rng.next() % size });
    }
    for off in offsets {
        let len = (1 + rng.next() % buf.len() as u64) as usize;
        if budget < len {
            break;
        }
        budget -= len;
        let _ = view.read(off, &mut buf[..len]);
    }
    let read =
        |off: u64, b: &mut [u8]| -> vmfs_mount::error::Result<()> { view.read(off, b).map(|_| ()) };
    let _ = partition::scan(&read, size, sector);
    // Seeks cost bounded work whatever the virtual size (a huge empty image once hung here).
    let probe_at = if size == 0 { 0 } else { rng.next() % size };
    for off in [0, probe_at] {
        let _ = view.next_data(off);
        let _ = view.next_hole(off);
    }
    let _ = view.allocated_bytes();
}

/// The partition-table target: the input is the disk (zeros past its end up to a size the
/// first bytes may make larger), read with each sector size.
pub fn run_partition(data: &[u8]) {
    let disk = data;
    let extra = data
        .get(..2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as u64)
        << 9;
    for (size, sector) in [
        (disk.len() as u64, None),
        (disk.len() as u64 + extra, Some(512)),
        (disk.len() as u64 + extra, Some(4096)),
    ] {
        let read = |off: u64, b: &mut [u8]| -> vmfs_mount::error::Result<()> {
            assert!(
                off.checked_add(b.len() as u64).is_some_and(|e| e <= size),
                "partition scan read [{off}, +{}) past the disk of {size} bytes",
                b.len()
            );
            b.fill(0);
            if let Some(avail) = disk.get(off as usize..) {
                let n = avail.len().min(b.len());
                b[..n].copy_from_slice(&avail[..n]);
            }
            Ok(())
        };
        let _ = partition::scan(&read, size, sector);
    }
}

/// Replays every file under `dir` through `target` (regression test).
pub fn replay_dir(target: &Target, dir: &Path) -> usize {
    let scratch = Scratch::new(&format!("replay-{}", target.name));
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let data = std::fs::read(&p).expect("read regression input");
        eprintln!("replaying {}", p.display());
        if target.name == "partition" {
            run_partition(&data);
        } else {
            run(target, &scratch, &data);
        }
        n += 1;
    }
    n
}
