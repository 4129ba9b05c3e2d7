//! The host fails with EIO under a writable qcow2 (tests/hostfs injects it): on the pwrite of
//! guest data (also in the middle of one request), of L2/refcount metadata, and on fsync. The
//! same promises as on a full host (tests/host_full.rs): the writer gets EIO, a later fsync
//! never reports success (fsyncgate: what failed to reach the disk must not be forgotten), every
//! extent fsynced before reads back intact, the log says what to do, `qemu-img check` finds no
//! corruption, and after a remount on a healthy host writes work and all acknowledged bytes are
//! in the image.

mod common;
mod fault_support;
mod hostfs;
mod mount_support;
use common::*;
use fault_support::*;
use hostfs::{Fault, HostFs};
use mount_support::*;

const CHUNK: usize = 256 << 10;

#[derive(Clone, Copy)]
enum Layout {
    InPlace,
    Overlay,
}

#[derive(Clone, Copy)]
enum Where {
    /// Writes past the file's end before the fault: new data clusters only (the chunks are
    /// 4 clusters, and the 2nd write of them fails: mid-request).
    Data,
    /// Writes below the file's end before the fault: L2 tables, refcount blocks, header.
    Metadata,
    /// The first fsync of the image file from then on.
    Fsync,
}

fn run_eio(name: &str, layout: Layout, io: Io, at: Where, seed: u64) {
    let s = Scratch::new(name);
    let fs = HostFs::mount(&s.path("back"), &s.path("host"));
    let mut durable = Durable::default();
    let (image, file, extra) = match layout {
        Layout::InPlace => {
            let top = fs.path("top.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "64M"]);
            (top, "top.qcow2", vec![])
        }
        Layout::Overlay => {
            let base = s.path("base.qcow2");
            base_with_data(&base, seed, &mut durable);
            // Made here: hostfs has no link(), which the daemon's own overlay creation uses.
            let ov = fs.path("ov.qcow2");
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "qcow2",
                ov.to_str().unwrap(),
            ]);
            (
                base,
                "ov.qcow2",
                vec![format!("--overlay={}", ov.display())],
            )
        }
    };
    let host_file = fs.path(file);
    let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
    let mut d = mount_foreground(&image, &s.0, &extra);
    let disk = open_disk(&d.mnt.join("disk.raw"), io);

    // Acknowledged before the fault; this also allocates the one L2 table the disk needs.
    let first = chunk(seed, 0, 1 << 20);
    write_sync(&disk, 0, &first).unwrap();
    durable.add(0, first);

    let len0 = std::fs::metadata(&host_file).unwrap().len();
    let fault = match at {
        Where::Data => Fault::write(libc::EIO)
            .file(file)
            .offsets(len0..u64::MAX)
            .after(1),
        Where::Metadata => Fault::write(libc::EIO).file(file).offsets(0..len0),
        Where::Fsync => Fault::fsync(libc::EIO).file(file).times(1),
    };
    let id = fs.inject(fault);
    let errno = write_until_failure(&disk, seed, 16, CHUNK, &mut durable);
    assert!(fs.hits(id) >= 1, "the fault never fired");
    let errno = errno.expect("the injected EIO never reached the writer");
    assert_eq!(errno, libc::EIO, "the writer's errno");
    // The host is healthy again (a one-shot fault, or cleared): still no fsync may succeed,
    // since what the failed operation should have stored may not be on the disk.
    fs.clear_faults();
    assert_latched_after_failure(&disk, &durable, &d.log());
    assert_eq!(
        write_sync(&disk, 2 << 20, &chunk(seed, 999, 4096)),
        Err(libc::EIO),
        "the latched mount took a write"
    );
    drop(disk);
    d.unmount();
    println!(
        "qemu-img check after the failure: {}",
        assert_check_consistent(&host_file)
    );

    remount_write_and_verify(&image, &s.0, &extra, io, seed, durable, &host_file);
}

#[test]
fn eio_on_a_data_write_mid_request_o_direct() {
    run_eio("eio-data", Layout::InPlace, Io::Direct, Where::Data, 11);
}

#[test]
fn eio_on_a_data_write_of_an_overlay_buffered() {
    run_eio(
        "eio-data-ov",
        Layout::Overlay,
        Io::Buffered,
        Where::Data,
        12,
    );
}

#[test]
fn eio_on_a_metadata_write_buffered() {
    run_eio(
        "eio-meta",
        Layout::InPlace,
        Io::Buffered,
        Where::Metadata,
        13,
    );
}

#[test]
fn eio_on_a_metadata_write_of_an_overlay_o_direct() {
    run_eio(
        "eio-meta-ov",
        Layout::Overlay,
        Io::Direct,
        Where::Metadata,
        14,
    );
}

#[test]
fn eio_on_fsync_o_direct() {
    run_eio("eio-fsync", Layout::InPlace, Io::Direct, Where::Fsync, 15);
}

#[test]
fn eio_on_fsync_of_an_overlay_buffered() {
    run_eio(
        "eio-fsync-ov",
        Layout::Overlay,
        Io::Buffered,
        Where::Fsync,
        16,
    );
}
