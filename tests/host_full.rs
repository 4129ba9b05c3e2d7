//! The host runs out of space under a writable qcow2 (in place, and as an overlay over a base
//! on another file system): writes through `disk.raw` (buffered and O_DIRECT, seeded random
//! data, fsync after each) go on until the host is full; then the writer gets ENOSPC or EIO,
//! every extent fsynced before reads back intact (reads go on), a later fsync does not report
//! success, the log says what to do, and `qemu-img check` finds the image consistent. After
//! space is freed and the image remounted (the mount latches after a failed host write, see
//! README "When the host fails"), writes work again and everything acknowledged is there.
//! The small host is a `size=` tmpfs (needs root; skipped otherwise).

mod common;
mod fault_support;
mod mount_support;
use common::*;
use fault_support::*;
use mount_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const DISK: u64 = 64 << 20;
const CHUNK: usize = 256 << 10;

/// A tmpfs of `size` bytes mounted on `dir`; unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: u64) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` completely, then frees `keep` bytes again.
fn fill_leaving(path: &Path, keep: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0xeeu8; 64 << 10];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(keep)).unwrap();
}

enum Layout {
    InPlace,
    Overlay,
}

fn run_until_full(name: &str, layout: Layout, io: Io, seed: u64) {
    if !is_root() {
        println!("skipped: a tmpfs mount needs root");
        return;
    }
    let s = Scratch::new(name);
    let small = SmallFs::mount(&s.path("small"), 8 << 20);
    let mut durable = Durable::default();
    let (image, fmt_image, extra): (PathBuf, PathBuf, Vec<String>) = match layout {
        Layout::InPlace => {
            let top = small.0.join("top.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "64M"]);
            (top.clone(), top, vec![])
        }
        Layout::Overlay => {
            // The base has data of its own, read through the overlay before and after.
            let base = s.path("base.qcow2");
            base_with_data(&base, seed, &mut durable);
            let ov = small.0.join("ov.qcow2");
            (
                base,
                ov.clone(),
                vec![format!("--overlay={}", ov.display())],
            )
        }
    };
    let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
    let mut d = mount_foreground(&image, &s.0, &extra);
    let disk = open_disk(&d.mnt.join("disk.raw"), io);

    // Acknowledged before the host fills up.
    let first = chunk(seed, 0, 1 << 20);
    write_sync(&disk, 0, &first).unwrap();
    durable.add(0, first);

    fill_leaving(&small.0.join("filler"), 2 << 20);
    let errno = write_until_failure(&disk, seed, DISK / CHUNK as u64 - 8, CHUNK, &mut durable);
    let errno = errno.expect("the host never filled up");
    assert_host_errno("writing into a full host", errno);
    assert_latched_after_failure(&disk, &durable, &d.log());

    // Space comes back: the mount stays latched (EIO) until it is remounted.
    std::fs::remove_file(small.0.join("filler")).unwrap();
    let again = write_sync(&disk, 2 << 20, &chunk(seed, 999, 4096));
    assert_eq!(again, Err(libc::EIO), "the latched mount took a write");
    drop(disk);
    d.unmount();
    println!(
        "qemu-img check after the failure: {}",
        assert_check_consistent(&fmt_image)
    );

    remount_write_and_verify(&image, &s.0, &extra, io, seed, durable, &fmt_image);
}

#[test]
fn in_place_qcow2_on_a_full_host_o_direct() {
    run_until_full("full-inplace-direct", Layout::InPlace, Io::Direct, 1);
}

#[test]
fn in_place_qcow2_on_a_full_host_buffered() {
    run_until_full("full-inplace-buffered", Layout::InPlace, Io::Buffered, 2);
}

#[test]
fn overlay_on_a_full_host_o_direct() {
    run_until_full("full-overlay-direct", Layout::Overlay, Io::Direct, 3);
}

#[test]
fn overlay_on_a_full_host_buffered() {
    run_until_full("full-overlay-buffered", Layout::Overlay, Io::Buffered, 4);
}
