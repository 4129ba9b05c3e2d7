//! Helpers for the qcow2 tests: batched qemu-io writes from seeded pattern files, every view
//! of an image compared with its `qemu-img convert` oracle, and header patching.
#![allow(dead_code)]

use crate::common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::format::Layer;
use vmfs_mount::plan::{self, Origin};
use vmfs_mount::view::View;

/// One qemu-io operation.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Random bytes.
    Data(u64, u64),
    /// Random nibbles written as compressed clusters (`write -c`, cluster-aligned).
    Compressed(u64, u64),
    /// `write -z` (zero flag, keeps the allocation).
    Zero(u64, u64),
    /// `write -z -u` (may unmap).
    ZeroUnmap(u64, u64),
}

/// Runs `ops` on `image` in one qemu-io call.
pub fn apply(fmt: &str, image: &Path, rng: &mut Rng, ops: &[Op]) {
    apply_to(&["-f", fmt, image.to_str().unwrap()], image, rng, ops);
}

/// `apply` on a qcow2 overlay without opening its backing chain (fast in deep chains;
/// partial-cluster writes then fill from zeros instead of the backing file).
pub fn apply_alone(image: &Path, rng: &mut Rng, ops: &[Op]) {
    let json = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
        image.display()
    );
    apply_to(&[&json], image, rng, ops);
}

fn apply_to(target: &[&str], image: &Path, rng: &mut Rng, ops: &[Op]) {
    let mut args: Vec<String> = Vec::new();
    let mut pats = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let mut pattern = |len: u64, mask: u8| {
            let mut data = rng.bytes(len as usize);
            data.iter_mut().for_each(|b| *b &= mask);
            let p = image.with_extension(format!("pat{i}"));
            std::fs::write(&p, &data).unwrap();
            pats.push(p.clone());
            p
        };
        let cmd = match *op {
            Op::Data(off, len) => format!("write -s {} {off} {len}", pattern(len, 0xff).display()),
            Op::Compressed(off, len) => {
                format!("write -c -s {} {off} {len}", pattern(len, 0x0f).display())
            }
            Op::Zero(off, len) => format!("write -z {off} {len}"),
            Op::ZeroUnmap(off, len) => format!("write -z -u {off} {len}"),
        };
        args.extend(["-c".to_string(), cmd]);
    }
    args.extend(target.iter().map(|s| s.to_string()));
    let out = run_beside(image, "qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
    for p in pats {
        std::fs::remove_file(p).unwrap();
    }
}

/// Runs a command in `image`'s directory: QEMU opens a relative external data file name
/// relative to its working directory (we resolve it against the image's directory).
pub fn run_beside(image: &Path, cmd: &str, args: &[String]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .current_dir(image.parent().unwrap())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `qemu-img convert -O raw` of `image` (run beside it), with `extra` options.
pub fn oracle(image: &Path, extra: &[&str]) -> Vec<u8> {
    let out = image.with_extension("oracle.raw");
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([
        "-O".into(),
        "raw".into(),
        image.to_str().unwrap().into(),
        out.to_str().unwrap().into(),
    ]);
    run_beside(image, "qemu-img", &args);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `count` random data writes inside [0, size): unaligned, cluster-crossing, some at the
/// very start and the very end.
pub fn random_ops(rng: &mut Rng, size: u64, count: usize, max_len: u64) -> Vec<Op> {
    let mut ops = vec![Op::Data(0, 512.min(size)), Op::Data(size - 1, 1)];
    for _ in 0..count {
        let len = 1 + rng.below(max_len);
        let off = rng.below(size - len.min(size - 1));
        let len = len.min(size - off);
        ops.push(Op::Data(off, len));
    }
    ops
}

/// `apply` of `random_ops` on a qcow2 image.
pub fn apply_random(image: &Path, rng: &mut Rng, size: u64, count: usize, max_len: u64) {
    let ops = random_ops(rng, size, count, max_len);
    apply("qcow2", image, rng, &ops);
}

pub fn create(path: &Path, opts: &str, size: u64) {
    let p = path.to_str().unwrap();
    let s = size.to_string();
    if opts.is_empty() {
        qemu_img(&["create", "-q", "-f", "qcow2", p, &s]);
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p, &s]);
    }
}

/// Creates `path` as an overlay of `backing` (format `bfmt`); size None: the backing's.
pub fn overlay(path: &Path, backing: &str, bfmt: &str, size: Option<u64>, opts: &str) {
    let p = path.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", bfmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(p);
    let s = size.map(|s| s.to_string());
    if let Some(s) = &s {
        args.push(s);
    }
    qemu_img(&args);
}

fn view_of(layers: Vec<Arc<dyn Layer>>, size: u64) -> View {
    View::new(layers, size, Arc::new(ByteCache::new(8 << 20)), 4096)
}

/// The oracle of internal snapshot `tag` of `image` whose disk size is `size`: `-l` when the
/// size is the image's, else a copy reverted with `snapshot -a` (so QEMU uses its size).
pub fn snapshot_oracle(image: &Path, tag: &str, size: u64) -> Vec<u8> {
    let current = vmfs_mount::format::open_detect(image, None, &ctx())
        .unwrap()
        .virtual_size();
    if size == current {
        return oracle(
            image,
            &["-f", "qcow2", "-l", &format!("snapshot.name={tag}")],
        );
    }
    let copy: PathBuf = image.with_extension("revert.qcow2");
    std::fs::copy(image, &copy).unwrap();
    qemu_img(&["snapshot", "-a", tag, copy.to_str().unwrap()]);
    let out = oracle(&copy, &["-f", "qcow2"]);
    std::fs::remove_file(&copy).unwrap();
    out
}

/// Compares every view of `image` (live, each backing layer, each internal snapshot of
/// the top layer) with QEMU. Returns the number of views checked.
pub fn check_all_views(image: &Path) -> usize {
    let layers = vmfs_mount::chain::open_chain(image, None, &ctx()).unwrap();
    let (live, snaps) = plan::plan(&layers).unwrap();
    let got = read_all(&view_of(live.layers, live.size));
    same(
        &format!("{} live", image.display()),
        &got,
        &oracle(image, &[]),
    );
    for spec in &snaps {
        let want = match spec.origin {
            Origin::Layer { index } => oracle(layers[index].path(), &[]),
            Origin::Snapshot { layer, info_index } => {
                let info = &layers[layer].snapshots()[info_index];
                let tag = if info.name.is_empty() {
                    &info.id
                } else {
                    &info.name
                };
                snapshot_oracle(layers[layer].path(), tag, spec.size)
            }
            Origin::Live => unreachable!(),
        };
        let got = read_all(&view_of(spec.layers.clone(), spec.size));
        same(
            &format!("{} view {}", image.display(), spec.name),
            &got,
            &want,
        );
    }
    1 + snaps.len()
}

/// `common::assert_same`, but comparing 64 KiB blocks with memcmp first (fast in debug builds).
pub fn same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    for (i, (a, b)) in got.chunks(1 << 16).zip(want.chunks(1 << 16)).enumerate() {
        if a != b {
            let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
            panic!("{what}: first difference at offset {:#x}", (i << 16) + at);
        }
    }
}

/// Big-endian field access for patching headers.
pub fn be64_at(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
pub fn be32_at(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// Overwrites bytes of `path` at `off`.
pub fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// The host offset of the first L2 table and of its first non-zero entry of `image`.
pub fn first_l2(image: &Path) -> (u64, u64) {
    let b = std::fs::read(image).unwrap();
    let l1 = be64_at(&b, 40) as usize;
    let l2 = be64_at(&b, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "no L2 table");
    let entry = (0..(1 << 13))
        .map(|i| l2 as usize + i * 8)
        .find(|&e| be64_at(&b, e) != 0)
        .unwrap();
    (l2, entry as u64)
}

/// Finds the header extension of `kind` in `p`: (offset of its header, its length).
pub fn find_ext(p: &Path, kind: u32) -> Option<(u64, u32)> {
    let b = std::fs::read(p).unwrap();
    let mut off = be32_at(&b, 100) as usize;
    while off + 8 <= 65536 {
        let (k, len) = (be32_at(&b, off), be32_at(&b, off + 4));
        if k == 0 {
            return None;
        }
        if k == kind {
            return Some((off as u64, len));
        }
        off += 8 + (len as usize).div_ceil(8) * 8;
    }
    None
}
