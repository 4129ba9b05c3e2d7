use super::*;
use crate::format::vhd::Footer;
use crate::format::vmdk::descriptor::{Access, Descriptor, ExtentType};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

const UUID: [u8; 16] = [7; 16];

fn when() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

#[test]
fn footer_decodes_and_sizes_the_disk_by_current_size() {
    // Sizes the CHS geometry cannot express, and one it can.
    for size in [
        512u64,
        10 << 20,
        (10 << 20) + 512,
        3 << 30,
        16 * 63 * 1000 * 512,
    ] {
        let f = fixed_footer(size, &UUID, when()).unwrap();
        let d = Footer::decode(&f).unwrap();
        assert_eq!(d.disk_type_raw, 2, "fixed");
        assert_eq!(d.data_offset, u64::MAX);
        assert_eq!((d.current_size, d.original_size), (size, size));
        assert_eq!(d.size_sectors(), size / 512, "size {size}");
        assert_eq!(d.uuid, UUID);
        assert_eq!(&d.creator_app, b"qem2");
        assert_eq!(d.timestamp, 1_700_000_000 - 946_684_800);
        assert!(d.chs_sectors() <= size / 512, "geometry past the disk");
    }
}

#[test]
fn footer_refuses_what_a_vhd_cannot_hold() {
    assert!(fixed_footer(0, &UUID, when()).is_err());
    assert!(
        fixed_footer(1000, &UUID, when())
            .unwrap_err()
            .contains("multiple of 512")
    );
    assert!(fixed_footer(0xff00_0000 * 512, &UUID, when()).is_ok());
    assert!(
        fixed_footer(0xff00_0001 * 512, &UUID, when())
            .unwrap_err()
            .contains("2040 GiB")
    );
    // A date before 2000 gives timestamp 0, not a wrapped one.
    let f = fixed_footer(512, &UUID, UNIX_EPOCH).unwrap();
    assert_eq!(Footer::decode(&f).unwrap().timestamp, 0);
}

#[test]
fn vhd_geometry_follows_the_spec() {
    // Values from the VHD specification's algorithm, as qemu-img create -f vpc computes them.
    assert_eq!(
        vhd_geometry(20480),
        Chs {
            cylinders: 301,
            heads: 4,
            sectors: 17
        }
    );
    assert_eq!(
        vhd_geometry(2 * 1024 * 1024 * 2),
        Chs {
            cylinders: 4161,
            heads: 16,
            sectors: 63
        }
    );
    assert_eq!(
        vhd_geometry(u64::MAX),
        Chs {
            cylinders: 65535,
            heads: 16,
            sectors: 255
        }
    );
    for s in [
        1u64,
        17,
        1000,
        65535 * 16 * 63,
        65535 * 16 * 63 - 1,
        1 << 32,
    ] {
        let g = vhd_geometry(s);
        assert!(g.heads <= 16 && g.sectors <= 255 && g.cylinders <= 65535);
        assert!(
            u64::from(g.cylinders) * u64::from(g.heads) * u64::from(g.sectors) <= s,
            "{s}: {g:?}"
        );
    }
}

#[test]
fn descriptor_parses_as_one_flat_extent_naming_the_disk() {
    let text = flat_descriptor(64 << 20, "disk.raw", &UUID).unwrap();
    let d = Descriptor::parse(text.as_bytes(), Path::new("disk.vmdk"), 0).unwrap();
    assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
    assert_eq!(d.parent_cid, Some(0xffff_ffff));
    assert!(d.cid.is_some_and(|c| c < 0xffff_fffe));
    assert_eq!(d.extents.len(), 1);
    let e = &d.extents[0];
    assert_eq!(
        (e.access, e.kind, e.sectors, e.start),
        (Access::ReadWrite, ExtentType::Flat, (64 << 20) / 512, 0)
    );
    assert_eq!(e.file.as_deref(), Some(&b"disk.raw"[..]));
    assert_eq!(d.ddb_value("ddb.geometry.heads"), Some("16"));
    assert_eq!(d.ddb_value("ddb.geometry.cylinders"), Some("131"));
    assert_eq!(
        d.ddb_value("ddb.uuid.image"),
        Some("07070707-0707-0707-0707-070707070707")
    );
    assert!(flat_descriptor(1000, "disk.raw", &UUID).is_err());
    assert!(flat_descriptor(512, "a\"b", &UUID).is_err());
    assert!(flat_descriptor(512, "", &UUID).is_err());
}

#[test]
fn uuids_are_stable_per_identity_and_differ_between_views() {
    assert_eq!(
        disk_uuid("/img/a.qcow2\0disk.raw"),
        disk_uuid("/img/a.qcow2\0disk.raw")
    );
    assert_ne!(
        disk_uuid("/img/a.qcow2\0disk.raw"),
        disk_uuid("/img/a.qcow2\0snapshots/s1/disk.raw")
    );
}

#[test]
fn vhd_wrapper_is_the_disk_then_the_footer_and_writes_only_reach_the_disk() {
    let disk: Arc<dyn ExposedFile> = Arc::new(BytesFile::new(vec![5u8; 4096], when()));
    let (files, notes) = wrappers(
        &disk,
        "disk.raw",
        "x",
        Wrappers {
            vmdk: true,
            vhd: true,
        },
        when(),
    );
    assert!(notes.is_empty(), "{notes:?}");
    let names: Vec<_> = files.iter().map(|w| w.name).collect();
    assert_eq!(names, [VMDK_FILE_NAME, VHD_FILE_NAME]);
    let vhd = &files[1];
    assert!(vhd.shows_disk);
    assert_eq!(vhd.file.size(), 4096 + 512);
    let mut buf = vec![0u8; 5000];
    assert_eq!(vhd.file.read(0, &mut buf).unwrap(), 4608);
    assert!(buf[..4096].iter().all(|&b| b == 5));
    assert_eq!(&buf[4096..4104], b"conectix");
    Footer::decode(&buf[4096..4608]).unwrap();
    // The disk here is read-only: so is the whole wrapper, footer included.
    assert!(vhd.file.write(4096, &[0; 512]).is_err());
    assert!(vhd.file.write(0, &[0; 512]).is_err());
}

#[test]
fn disks_that_cannot_be_wrapped_get_notes_not_files() {
    let disk: Arc<dyn ExposedFile> = Arc::new(BytesFile::new(vec![0u8; 1000], when()));
    let (files, notes) = wrappers(
        &disk,
        "disk.raw",
        "x",
        Wrappers {
            vmdk: true,
            vhd: true,
        },
        when(),
    );
    assert!(files.is_empty());
    assert_eq!(notes.len(), 2);
    assert!(
        notes.iter().all(|n| n.contains("multiple of 512")),
        "{notes:?}"
    );
}

#[test]
fn a_writable_disk_gets_a_descriptor_qemu_can_rewrite() {
    let layer = std::env::temp_dir().join(format!("vmfs-wrap-rw-{}", std::process::id()));
    std::fs::write(&layer, vec![3u8; 8192]).unwrap();
    let ctx = crate::format::OpenCtx::new(Arc::new(crate::cache::ByteCache::new(1 << 20)), true);
    let raw = crate::format::raw::RawLayer::open(&layer, &ctx).unwrap();
    let view = Arc::new(crate::view::View::new(
        vec![raw],
        8192,
        Arc::new(crate::cache::ByteCache::new(1 << 20)),
        64,
    ));
    let disk: Arc<dyn ExposedFile> = Arc::new(crate::expose::DiskFile::new(view, true, when()));
    let want = Wrappers {
        vmdk: true,
        vhd: false,
    };
    let (files, _) = wrappers(&disk, "disk.raw", "x", want, when());
    let vmdk = &files[0].file;
    assert!(vmdk.writable());
    assert_eq!(vmdk.size(), WRITABLE_DESCRIPTOR_LEN as u64);
    let mut buf = vec![0u8; WRITABLE_DESCRIPTOR_LEN];
    vmdk.read(0, &mut buf).unwrap();
    let text = flat_descriptor(8192, "disk.raw", &disk_uuid("x")).unwrap();
    assert_eq!(&buf[..text.len()], text.as_bytes());
    assert!(buf[text.len()..].iter().all(|&b| b == 0));
    // QEMU's CID update: its DESC_SIZE buffer at offset 0, rounded up to 4096 bytes.
    let new = text.replacen("CID=", "CID=1234abcd\n#", 1);
    let mut rewritten = new.into_bytes();
    rewritten.resize(20 * 512, 0);
    rewritten.resize(rewritten.len().next_multiple_of(4096), 0);
    vmdk.write(0, &rewritten).unwrap();
    vmdk.read(0, &mut buf).unwrap();
    assert_eq!(buf, rewritten);
    // The same disk read-only: the plain text, refusing writes.
    let (ro, _) = wrappers(
        &(Arc::new(BytesFile::new(vec![3u8; 8192], when())) as Arc<dyn ExposedFile>),
        "disk.raw",
        "x",
        want,
        when(),
    );
    assert!(!ro[0].file.writable());
    assert_eq!(ro[0].file.size(), text.len() as u64);
    std::fs::remove_file(&layer).unwrap();
}
