//! The FUSE tree with snapshots, mounted in-process: a chain of raw files whose top layer
//! pretends to carry two internal snapshots (until a format with snapshots exists, this is how
//! the snapshots/ tree gets exercised). Skipped when /dev/fuse cannot be opened.

use super::DiskFs;
use crate::mount::expose;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use vmfs_mount::cache::ByteCache;
use vmfs_mount::error::Result;
use vmfs_mount::format::raw::RawLayer;
use vmfs_mount::format::{Extent, Format, Layer, OpenCtx, SnapshotInfo};
use vmfs_mount::host::HostFile;

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
    let ctx = OpenCtx {
        tables: Arc::new(ByteCache::new(1 << 20)),
        writable: false,
    };
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
    let session = fuser::spawn_mount(DiskFs::new(&opened), &mnt, &config).unwrap();

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
        assert_eq!(std::fs::read(&p).unwrap(), data[idx], "{path}");
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
