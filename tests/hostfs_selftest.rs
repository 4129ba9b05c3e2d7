//! The tests' hostfs itself: it passes bytes through, records writes, truncates, fallocates and
//! fsyncs in completion order, and fails exactly the operations its rules name.

mod common;
mod hostfs;
mod mount_support;
use common::*;
use hostfs::{Fault, HostFs, Op};
use mount_support::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn passes_through_and_records_in_completion_order() {
    let s = Scratch::new("hostfs-record");
    let fs = HostFs::mount(&s.path("back"), &s.path("host"));
    let mut rng = Rng::new(7);
    let before = rng.bytes(3 << 20);
    std::fs::write(fs.path("a.img"), &before).unwrap();
    assert_same(
        "write through",
        &std::fs::read(fs.backing_path("a.img")).unwrap(),
        &before,
    );
    std::fs::copy(fs.backing_path("a.img"), s.path("copy.img")).unwrap();

    fs.start_recording();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fs.path("a.img"))
        .unwrap();
    let one = rng.bytes(5000);
    f.write_all_at(&one, 12_345).unwrap();
    f.sync_data().unwrap();
    let two = rng.bytes(70_000);
    f.write_all_at(&two, (3 << 20) - 1000).unwrap(); // grows the file
    f.sync_all().unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&rng.bytes(100), 200).unwrap();
    let events = fs.stop_recording();

    let kinds: Vec<String> = events
        .iter()
        .map(|e| match &e.op {
            Op::Write { off, data } => format!("w{off}+{}", data.len()),
            Op::Fsync { datasync } => format!("sync{}", u8::from(*datasync)),
            Op::SetLen(n) => format!("len{n}"),
            Op::Fallocate { .. } => "falloc".into(),
        })
        .collect();
    let grown = (3 << 20) - 1000;
    assert_eq!(
        kinds,
        [
            "w12345+5000".to_string(),
            "sync1".into(),
            format!("w{grown}+70000"),
            "sync0".into(),
            format!("len{}", 4 << 20),
            "w200+100".into()
        ]
    );
    assert!(events.iter().all(|e| e.file == "a.img" && e.ok()));
    assert!(events.windows(2).all(|w| w[0].completed < w[1].completed));
    assert!(events.iter().all(|e| e.started < e.completed));
    // Barriers: a write before a flush is covered by it, one after it is not.
    assert!(events[0].covered_by(&events[1]));
    assert!(!events[2].covered_by(&events[1]));
    assert!(events[2].covered_by(&events[3]));
    assert!(!events[5].covered_by(&events[3]));

    // Replaying the events on the copy gives the file as it is.
    let copy = OpenOptions::new()
        .write(true)
        .open(s.path("copy.img"))
        .unwrap();
    for e in &events {
        e.apply(&copy).unwrap();
    }
    drop(f);
    assert_same(
        "replayed copy",
        &std::fs::read(s.path("copy.img")).unwrap(),
        &std::fs::read(fs.path("a.img")).unwrap(),
    );
    // Not recording any more.
    std::fs::write(fs.path("b.img"), b"x").unwrap();
    assert!(fs.events().is_empty());
}

#[test]
fn writes_arrive_whole_or_in_consecutive_pieces() {
    let s = Scratch::new("hostfs-large");
    let fs = HostFs::mount(&s.path("back"), &s.path("host"));
    let f = File::create(fs.path("big")).unwrap();
    let mut rng = Rng::new(3);
    fs.start_recording();
    let small = rng.bytes(512 << 10);
    f.write_all_at(&small, 4096).unwrap();
    let events = fs.stop_recording();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].op,
        Op::Write {
            off: 4096,
            data: small
        }
    );

    // Bigger than one FUSE request: pieces in order that add up to the write.
    fs.start_recording();
    let big = rng.bytes(3 << 20);
    f.write_all_at(&big, 1 << 20).unwrap();
    let events = fs.stop_recording();
    assert!(events.len() >= 3, "{events:?}");
    let mut at = 1 << 20;
    let mut joined = Vec::new();
    for e in &events {
        let Op::Write { off, data } = &e.op else {
            panic!("{e:?}")
        };
        assert_eq!(*off, at, "{events:?}");
        at += data.len() as u64;
        joined.extend_from_slice(data);
    }
    assert!(joined == big, "the pieces differ from the write");
}

#[test]
fn faults_fire_on_the_chosen_operations_only() {
    let s = Scratch::new("hostfs-faults");
    let fs = HostFs::mount(&s.path("back"), &s.path("host"));
    let rw = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(fs.path(name))
            .unwrap()
    };
    let (f, g) = (rw("x.img"), rw("y.img"));
    fs.start_recording();

    // The 3rd and 4th writes to x.img fail with ENOSPC; y.img is not affected.
    let id = fs.inject(Fault::write(libc::ENOSPC).file("x.img").after(2).times(2));
    let mut got = Vec::new();
    for i in 0..6u64 {
        got.push(
            f.write_all_at(&[i as u8; 512], i * 512)
                .map_err(|e| errno(&e)),
        );
        g.write_all_at(&[1; 512], i * 512).unwrap();
    }
    let e = Err(libc::ENOSPC);
    assert_eq!(got, [Ok(()), Ok(()), e, e, Ok(()), Ok(())]);
    assert_eq!((fs.matched(id), fs.hits(id)), (6, 2));
    // A failed write leaves the backing file alone.
    let back = std::fs::read(fs.backing_path("x.img")).unwrap();
    assert_eq!(back[1024..2048], [0u8; 1024]);
    assert_eq!(back[2048..2560], [4u8; 512]);

    // fsync faults, switched on and off at runtime.
    let sync = fs.inject(Fault::fsync(libc::EIO));
    assert_eq!(errno(&f.sync_data().unwrap_err()), libc::EIO);
    assert_eq!(errno(&g.sync_all().unwrap_err()), libc::EIO);
    fs.remove(sync);
    f.sync_data().unwrap();

    // Byte ranges and growing writes.
    let range = fs.inject(Fault::write(libc::EIO).offsets(10_000..10_001));
    f.write_all_at(&[9; 100], 9_000).unwrap();
    assert_eq!(
        errno(&f.write_all_at(&[9; 2], 9_999).unwrap_err()),
        libc::EIO
    );
    fs.remove(range);
    let full = fs.inject(Fault::any_update(libc::ENOSPC).growing());
    f.write_all_at(&[7; 100], 0).unwrap(); // overwrite: fine
    let len = f.metadata().unwrap().len();
    assert_eq!(
        errno(&f.write_all_at(&[7; 100], len).unwrap_err()),
        libc::ENOSPC
    );
    assert_eq!(errno(&f.set_len(len + 1).unwrap_err()), libc::ENOSPC);
    f.set_len(len - 1).unwrap();
    assert_eq!(fs.hits(full), 2);
    fs.clear_faults();
    f.write_all_at(&[7; 100], len).unwrap();

    // Read faults.
    fs.inject(Fault::read(libc::EIO).file("y.img"));
    let mut buf = [0u8; 10];
    assert_eq!(errno(&g.read_at(&mut buf, 0).unwrap_err()), libc::EIO);
    f.read_at(&mut buf, 0).unwrap();
    fs.clear_faults();

    // Failed operations are recorded with their errno.
    let events = fs.stop_recording();
    let failed: Vec<(&str, i32)> = events
        .iter()
        .filter_map(|e| e.result.err().map(|n| (e.file.as_str(), n)))
        .collect();
    assert_eq!(
        failed,
        [
            ("x.img", libc::ENOSPC),
            ("x.img", libc::ENOSPC),
            ("x.img", libc::EIO),
            ("y.img", libc::EIO),
            ("x.img", libc::EIO),
            ("x.img", libc::ENOSPC),
            ("x.img", libc::ENOSPC)
        ]
    );
}

#[test]
fn directories_renames_holes_and_locks_pass_through() {
    let s = Scratch::new("hostfs-tree");
    let fs = HostFs::mount(&s.path("back"), &s.path("host"));
    std::fs::create_dir(fs.path("d")).unwrap();
    std::fs::write(fs.path("d/f"), b"hello").unwrap();
    std::fs::rename(fs.path("d"), fs.path("e")).unwrap();
    assert_eq!(std::fs::read(fs.path("e/f")).unwrap(), b"hello");
    assert!(!fs.path("d").exists());
    std::os::unix::fs::symlink("e/f", fs.path("link")).unwrap();
    assert_eq!(std::fs::read(fs.path("link")).unwrap(), b"hello");
    let mut names: Vec<String> = std::fs::read_dir(fs.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["e", "link"]);

    // A sparse file keeps its holes, and SEEK_DATA finds the data.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fs.path("e/sparse"))
        .unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&[1; 4096], 4 << 20).unwrap();
    // SAFETY: lseek on an open descriptor.
    let data = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, libc::SEEK_DATA) };
    assert_eq!(data, 4 << 20);
    fs.start_recording();
    // SAFETY: fallocate on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            4 << 20,
            4096,
        )
    };
    assert_eq!(r, 0);
    let ev = fs.stop_recording();
    assert_eq!(
        ev[0].op,
        Op::Fallocate {
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off: 4 << 20,
            len: 4096
        }
    );
    assert_eq!(ev[0].file, "e/sparse");
    let mut buf = [9u8; 4096];
    f.read_at(&mut buf, 4 << 20).unwrap();
    assert_eq!(buf, [0u8; 4096]);

    // OFD locks conflict between two descriptors of the same file.
    let lock = |file: &File| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = 100;
        fl.l_len = 1;
        // SAFETY: fl is a valid flock for this call.
        unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(file),
                libc::F_OFD_SETLK,
                &mut fl,
            )
        }
    };
    let other = File::open(fs.path("e/sparse")).unwrap();
    let same_rw = OpenOptions::new()
        .write(true)
        .open(fs.path("e/sparse"))
        .unwrap();
    assert_eq!(lock(&f), 0);
    assert_ne!(lock(&same_rw), 0, "a second OFD write lock must conflict");
    drop(other);
    std::fs::remove_file(fs.path("link")).unwrap();
    std::fs::remove_file(fs.path("e/f")).unwrap();
}

/// The daemon runs on hostfs: its writes and its flush through `disk.raw` show up in order,
/// a flush covers the writes before it, and qemu-img reads the image through hostfs.
#[test]
fn the_daemon_writes_through_hostfs() {
    let s = Scratch::new("hostfs-daemon");
    let fs = HostFs::mount(&s.path("back"), &s.path("host"));
    let top = fs.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "8M"]);
    let (_guard, mnt) = mount(&top, &s.0, &[]);
    fs.start_recording();
    let data = Rng::new(11).bytes(200_000);
    let disk = OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap();
    disk.write_all_at(&data, 1 << 20).unwrap();
    disk.sync_data().unwrap();
    let events = fs.stop_recording();
    drop(disk);
    let flush = events
        .iter()
        .rposition(|e| e.is_fsync() && e.file == "top.qcow2")
        .unwrap_or_else(|| panic!("no flush of top.qcow2: {events:?}"));
    let writes: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.op, Op::Write { .. }))
        .collect();
    assert!(!writes.is_empty(), "{events:?}");
    assert!(
        writes
            .iter()
            .all(|w| w.file == "top.qcow2" && w.covered_by(&events[flush]))
    );
    // The guest bytes are in the recorded writes.
    assert!(
        writes.iter().any(|w| matches!(&w.op, Op::Write { data: d, .. } if d.windows(4096).any(|x| x == &data[..4096]))),
        "the data write is missing: {events:?}"
    );
    unmount(&mnt);
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    let raw = qemu_raw(&top, Some("qcow2"), &[]);
    assert_same(
        "written range",
        &raw[1 << 20..(1 << 20) + data.len()],
        &data,
    );
}
