//! Helpers shared by the integration tests: scratch dirs, seeded random data, qemu-img and
//! qemu-io wrappers, and reading a whole view through the library.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::format::OpenCtx;

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vmfs-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small seeded PRNG (xorshift64*): the tests need reproducible, incompressible bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Runs a command and panics with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io commands on an image of format `fmt`.
pub fn qemu_io(fmt: &str, image: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(image.to_str().unwrap().to_string());
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run("qemu-io", &refs);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
}

/// Writes `len` seeded random bytes at `off` in `image` through qemu-io; returns the bytes.
pub fn write_random(fmt: &str, image: &Path, rng: &mut Rng, off: u64, len: usize) -> Vec<u8> {
    let data = rng.bytes(len);
    let pat = image.with_extension(format!("pat{}", rng.next_u64() % 1_000_000));
    std::fs::write(&pat, &data).unwrap();
    qemu_io(
        fmt,
        image,
        &[format!("write -s {} {off} {len}", pat.display())],
    );
    std::fs::remove_file(&pat).unwrap();
    data
}

/// What `qemu-img convert -O raw` gives for `image` (`extra` e.g. ["-l", "snapshot.name=s1"]).
pub fn qemu_raw(image: &Path, fmt: Option<&str>, extra: &[&str]) -> Vec<u8> {
    let out = image.with_extension("oracle.raw");
    let mut args = vec!["convert"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.extend_from_slice(extra);
    args.extend(["-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

pub fn ctx() -> OpenCtx {
    OpenCtx::new(Arc::new(ByteCache::new(64 << 20)), false)
}

/// Opens `image` with its chain and returns the live view.
pub fn open_view(image: &Path) -> vmfs_mount::error::Result<vmfs_mount::view::View> {
    let layers = vmfs_mount::chain::open_chain(image, None, &ctx())?;
    let size = layers[0].virtual_size();
    Ok(vmfs_mount::view::View::new(
        layers,
        size,
        Arc::new(ByteCache::new(8 << 20)),
        4096,
    ))
}

/// Opens `image` with its chain for writing (the top layer only) and returns the live view.
pub fn open_rw(image: &Path) -> vmfs_mount::view::View {
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(16 << 20)), true);
    let layers = vmfs_mount::chain::open_chain(image, None, &ctx).unwrap();
    let size = layers[0].virtual_size();
    vmfs_mount::view::View::new(layers, size, Arc::new(ByteCache::new(8 << 20)), 4096)
}

/// Reads a whole view, in odd-sized requests so that request boundaries fall everywhere.
pub fn read_all(view: &vmfs_mount::view::View) -> Vec<u8> {
    let mut out = vec![0u8; view.size() as usize];
    let mut off = 0usize;
    let mut step = 4096 * 31 + 512;
    while off < out.len() {
        let end = (off + step).min(out.len());
        let n = view.read(off as u64, &mut out[off..end]).unwrap();
        assert_eq!(n, end - off, "short read at {off}");
        off = end;
        step = if step > 1 << 20 {
            4096 * 31 + 512
        } else {
            step * 2 + 512
        };
    }
    out
}

/// Asserts two disk images are equal, reporting the first differing offset.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at offset {i:#x}");
    }
}

/// How the deltas of `qemu_delta_chain` name their backing file.
#[derive(Clone, Copy)]
pub enum BackingName {
    /// The bare file name, beside it (VMware's snapshot deltas).
    FileName,
    /// The absolute path (libvirt pools).
    Absolute,
}

/// A chain made by qemu-img in `dir`: the base `names[0]` of `size` with seeded data in its
/// first `base_data` bytes, then each further name a delta over the one before with
/// `delta_data` seeded bytes at a random offset in the first 3 MiB. Returns the top.
pub fn qemu_delta_chain(
    dir: &Path,
    fmt: &str,
    names: &[&str],
    size: &str,
    (base_data, delta_data): (usize, usize),
    by: BackingName,
    rng: &mut Rng,
) -> PathBuf {
    let base = dir.join(names[0]);
    qemu_img(&["create", "-q", "-f", fmt, base.to_str().unwrap(), size]);
    write_random(fmt, &base, rng, 0, base_data);
    for pair in names.windows(2) {
        let top = dir.join(pair[1]);
        let backing = match by {
            BackingName::FileName => pair[0].to_string(),
            BackingName::Absolute => dir.join(pair[0]).to_str().unwrap().to_string(),
        };
        qemu_img(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-b",
            &backing,
            "-F",
            fmt,
            top.to_str().unwrap(),
        ]);
        let off = rng.below(3 << 20);
        write_random(fmt, &top, rng, off, delta_data);
    }
    dir.join(names[names.len() - 1])
}
