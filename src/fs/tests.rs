//! The FUSE tree with snapshots, mounted in-process: a chain of raw files whose top layer
//! pretends to carry two internal snapshots (until a format with snapshots exists, this is how
//! the snapshots/ tree gets exercised). Skipped when /dev/fuse cannot be opened.

use super::DiskFs;
use crate::mount::expose;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use vmfs_mount::cache::ByteCache;
use vmfs_mount::error::Result;
use vmfs_mount::format::raw::RawLayer;
use vmfs_mount::format::{Extent, Format, Layer, OpenCtx, SnapshotInfo};
use vmfs_mount::storage::HostFile;
use vmfs_mount::write::{BelowReader, LayerWriter};

/// A layer that reads like `inner` and lists `snaps` as its internal snapshots.
#[derive(Debug)]
struct WithSnapshots {
    inner: Arc<dyn Layer>,
    snaps: Vec<(SnapshotInfo, Arc<dyn Layer>)>,
}

impl Layer for WithSnapshots {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        self.inner.map(off, len)
    }
    fn files(&self) -> Vec<Arc<HostFile>> {
        self.inner.files()
    }
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snaps.iter().map(|(i, _)| i.clone()).collect()
    }
    fn open_snapshot(&self, index: usize) -> Result<Arc<dyn Layer>> {
        Ok(self.snaps[index].1.clone())
    }
}

/// Seeded bytes (xorshift), so each file differs.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
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

/// Compares without dumping megabytes into the failure message.
fn same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at {i:#x} of {:#x}", want.len());
    }
}

/// Mounts the tree of `opened` in this process, with kernel invalidations wired up.
fn spawn(
    opened: &crate::mount::Opened,
    mnt: &Path,
    config: &fuser::Config,
) -> fuser::BackgroundSession {
    let fs = DiskFs::new(opened, &vmfs_mount::expose::FileOptions::default());
    let tree = fs.shared();
    let session = fuser::spawn_mount(fs, mnt, config).unwrap();
    tree.attach(session.notifier());
    session
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn snapshot_tree_shows_every_view_read_only() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        eprintln!("skipped: /dev/fuse is not accessible");
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("vmfs-fs-unit-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("mnt")).unwrap();
    let files = [
        ("top.img", 3 << 20),
        ("base.img", 2 << 20),
        ("s1.img", (1 << 20) + 512),
        ("s2.img", 4096),
    ];
    let mut data = Vec::new();
    for (i, (name, len)) in files.iter().enumerate() {
        let d = bytes(i as u64 + 1, *len);
        std::fs::write(dir.0.join(name), &d).unwrap();
        data.push(d);
    }
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(1 << 20)), false);
    let raw = |name: &str| RawLayer::open(&dir.0.join(name), &ctx).unwrap();
    let info = |index, id: &str, name: &str, size, secs| SnapshotInfo {
        index,
        id: id.into(),
        name: name.into(),
        virtual_size: size,
        date: (secs, 0),
    };
    let top: Arc<dyn Layer> = Arc::new(WithSnapshots {
        inner: raw("top.img"),
        snaps: vec![
            (
                info(0, "1", "s1", files[2].1 as u64, 1_600_000_000),
                raw("s1.img"),
            ),
            (
                info(1, "7", "", files[3].1 as u64, 1_700_000_000),
                raw("s2.img"),
            ),
        ],
    });
    let opened = expose(
        vec![top, raw("base.img")],
        false,
        &Arc::new(ByteCache::new(1 << 20)),
    )
    .unwrap();
    let mnt = dir.0.join("mnt");
    let mut config = fuser::Config::default();
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session = spawn(&opened, &mnt, &config);

    let snaps = mnt.join("snapshots");
    let mut names: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["7", "base", "s1"]);
    let expect = [
        ("disk.raw", 0usize),
        ("snapshots/base/disk.raw", 1),
        ("snapshots/s1/disk.raw", 2),
        ("snapshots/7/disk.raw", 3),
    ];
    for (path, idx) in expect {
        let p = mnt.join(path);
        same(path, &std::fs::read(&p).unwrap(), &data[idx]);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o444, "{path}");
        assert_eq!(m.len(), data[idx].len() as u64, "{path}");
        if idx >= 2 {
            let e = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{path}");
        }
    }
    let s1 = std::fs::metadata(snaps.join("s1/disk.raw")).unwrap();
    assert_eq!(
        s1.modified().unwrap(),
        UNIX_EPOCH + Duration::from_secs(1_600_000_000)
    );
    let base = std::fs::metadata(snaps.join("base/disk.raw")).unwrap();
    assert_eq!(
        base.modified().unwrap(),
        std::fs::metadata(dir.0.join("base.img"))
            .unwrap()
            .modified()
            .unwrap()
    );
    let sdir = std::fs::metadata(snaps.join("s1")).unwrap();
    assert_eq!((sdir.mode() & 0o777, sdir.is_dir()), (0o555, true));
    assert_eq!(std::fs::metadata(&snaps).unwrap().nlink(), 5);
    assert!(std::fs::metadata(snaps.join("s1/other")).is_err());
    session.umount_and_join().unwrap();
}

/// A raw layer written in place: enough to drive the write handlers until a real writer exists.
#[derive(Debug)]
struct InPlace {
    file: Arc<HostFile>,
}

impl Layer for InPlace {
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
        let map = vmfs_mount::format::Mapping::Data {
            file: self.file.clone(),
            host_off: off,
        };
        Ok(Extent { len, map })
    }
    fn files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }
    fn writer(&self) -> Option<&dyn LayerWriter> {
        Some(self)
    }
}

impl LayerWriter for InPlace {
    fn write(&self, off: u64, data: &[u8], _below: BelowReader<'_>) -> Result<()> {
        self.file.write_all_at(data, off)
    }
    fn discard(&self, off: u64, len: u64, _below: BelowReader<'_>) -> Result<()> {
        self.file.write_all_at(&vec![0; len as usize], off)
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data()
    }
}

#[test]
fn writable_disk_takes_writes_discards_and_refuses_resizing() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        eprintln!("skipped: /dev/fuse is not accessible");
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("vmfs-fs-unit-w-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("mnt")).unwrap();
    let img = dir.0.join("rw.img");
    let mut model = bytes(99, 4 << 20);
    std::fs::write(&img, &model).unwrap();
    let old = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let layer: Arc<dyn Layer> = Arc::new(InPlace {
        file: HostFile::open(&img, true).unwrap(),
    });
    let clusters = Arc::new(ByteCache::new(1 << 20));
    assert!(
        !expose(vec![layer.clone()], true, &clusters)
            .unwrap()
            .live
            .writable,
        "-r wins"
    );
    let opened = expose(vec![layer], false, &clusters).unwrap();
    assert!(opened.live.writable);
    let mnt = dir.0.join("mnt");
    let session = spawn(&opened, &mnt, &fuser::Config::default());
    let disk = mnt.join("disk.raw");
    assert_eq!(std::fs::metadata(&disk).unwrap().mode() & 0o777, 0o644);
    assert_eq!(std::fs::metadata(&disk).unwrap().modified().unwrap(), old);

    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut seed = 1;
    for _ in 0..40 {
        seed += 1;
        let chunk = bytes(seed, 1 + (seed as usize * 7919) % 200_000);
        let off = (seed as usize * 104_729) % (model.len() - chunk.len());
        f.write_all_at(&chunk, off as u64).unwrap();
        model[off..off + chunk.len()].copy_from_slice(&chunk);
    }
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: fd is open for the duration of these calls.
    let fallocate =
        |mode, off: usize, len: usize| unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
    assert_eq!(
        fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            100_000,
            70_000
        ),
        0
    );
    model[100_000..170_000].fill(0);
    assert_eq!(fallocate(libc::FALLOC_FL_ZERO_RANGE, 1 << 20, 5000), 0);
    model[1 << 20..(1 << 20) + 5000].fill(0);
    assert_ne!(
        fallocate(0, 0, 4096),
        0,
        "plain preallocation is not supported"
    );
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );

    let e = f.set_len(1 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    f.set_len(model.len() as u64).unwrap();
    // A write straddling the end writes what fits (like a block device) and no more.
    let end = model.len();
    let n = f.write_at(&[1; 100], end as u64 - 10).unwrap_or(0);
    assert!(n <= 10, "only the part inside the disk may be written");
    model[end - 10..end - 10 + n].fill(1);
    assert!(
        f.write_at(&[1; 10], end as u64).is_err(),
        "nothing is written past the end"
    );
    drop(f);

    same("through the mount", &std::fs::read(&disk).unwrap(), &model);
    same("in the image", &std::fs::read(&img).unwrap(), &model);
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), model.len() as u64);
    assert!(meta.modified().unwrap() > old, "a write moves the mtime");
    session.umount_and_join().unwrap();
}

/// A directory whose mkdir makes a directory holding one small file, whose rmdir removes a
/// directory with its contents and whose rename moves entries: the hooks snapshot management
/// builds on, driven through a real mount.
struct Scratch;

impl super::handler::DirHandler for Scratch {
    fn writable(&self) -> bool {
        true
    }
    fn mkdir(&self, tree: &super::SharedTree, dir: u64, name: &str) -> Result<u64> {
        let content = bytes(name.len() as u64, 3000);
        let file = Arc::new(vmfs_mount::expose::BytesFile::new(content, UNIX_EPOCH));
        let now = std::time::SystemTime::now();
        tree.change(|t| {
            let ino = t.add_dir(dir, name, None, now)?;
            t.add_file(ino, "data", file, now)?;
            Ok(ino)
        })
    }
    fn rmdir(&self, tree: &super::SharedTree, dir: u64, name: &str) -> Result<()> {
        tree.change(|t| t.remove_all(dir, name, std::time::SystemTime::now()))
            .map(|_| ())
    }
    fn rename(
        &self,
        tree: &super::SharedTree,
        dir: u64,
        name: &str,
        new_dir: u64,
        new_name: &str,
    ) -> Result<()> {
        tree.change(|t| t.rename(dir, name, new_dir, new_name, std::time::SystemTime::now()))
    }
}

/// Polls `cond` for up to five seconds (kernel invalidations arrive asynchronously).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::yield_now();
    }
}

#[test]
fn directory_handlers_make_remove_and_rename_while_mounted() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        eprintln!("skipped: /dev/fuse is not accessible");
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("vmfs-fs-unit-h-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("mnt")).unwrap();
    std::fs::write(dir.0.join("top.img"), bytes(5, 1 << 20)).unwrap();
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(1 << 20)), false);
    let top = RawLayer::open(&dir.0.join("top.img"), &ctx).unwrap();
    let opened = expose(vec![top], true, &Arc::new(ByteCache::new(1 << 20))).unwrap();
    let fs = DiskFs::new(&opened, &vmfs_mount::expose::FileOptions::default());
    let tree = fs.shared();
    let now = std::time::SystemTime::now();
    tree.change(|t| t.add_dir(super::tree::ROOT, "scratch", Some(Arc::new(Scratch)), now))
        .unwrap();
    let mnt = dir.0.join("mnt");
    let session = fuser::spawn_mount(fs, &mnt, &fuser::Config::default()).unwrap();
    tree.attach(session.notifier());
    let scratch = mnt.join("scratch");
    assert_eq!(std::fs::metadata(&scratch).unwrap().mode() & 0o777, 0o755);
    let before = std::fs::metadata(&scratch).unwrap().modified().unwrap();

    std::fs::create_dir(scratch.join("a")).unwrap();
    same(
        "a/data",
        &std::fs::read(scratch.join("a/data")).unwrap(),
        &bytes(1, 3000),
    );
    assert_eq!(
        std::fs::create_dir(scratch.join("a"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EEXIST)
    );
    assert!(std::fs::metadata(&scratch).unwrap().modified().unwrap() >= before);
    assert_eq!(std::fs::metadata(&scratch).unwrap().nlink(), 3);
    // Nothing else takes new directories (snapshots/ only on a writable qcow2 top).
    let e = std::fs::create_dir(mnt.join("snapshots/x")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));

    std::fs::rename(scratch.join("a"), scratch.join("b")).unwrap();
    assert!(std::fs::metadata(scratch.join("a")).is_err());
    same(
        "b/data",
        &std::fs::read(scratch.join("b/data")).unwrap(),
        &bytes(1, 3000),
    );

    // An open file outlives its directory.
    let open = std::fs::File::open(scratch.join("b/data")).unwrap();
    std::fs::remove_dir(scratch.join("b")).unwrap();
    assert!(std::fs::metadata(scratch.join("b")).is_err());
    let mut buf = vec![0; 3000];
    assert_eq!(read_at(&open, &mut buf, 0), 3000);
    same("removed but open", &buf, &bytes(1, 3000));
    drop(open);
    assert_eq!(names(&scratch), Vec::<String>::new());

    // A change made from outside any request reaches the kernel's caches.
    let seen = names(&mnt);
    assert!(seen.contains(&"scratch".to_string()));
    tree.change(|t| t.remove_all(super::tree::ROOT, "scratch", std::time::SystemTime::now()))
        .unwrap();
    eventually("scratch/ disappears", || {
        !names(&mnt).contains(&"scratch".to_string())
    });
    eventually("its dentry is dropped", || {
        std::fs::metadata(&scratch).is_err()
    });
    session.umount_and_join().unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn read_at(f: &std::fs::File, buf: &mut [u8], off: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}
