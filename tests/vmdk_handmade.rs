//! VMDK layouts qemu-img cannot make: hand-written descriptors (multiple extent types, ZERO,
//! RDONLY, start offsets), ESX redo logs (COWD) and ESXi seSparse deltas built from the spec,
//! compared with a model (parent bytes overridden by the child's grains) and with QEMU where
//! QEMU reads them.

mod common;
mod vmdk_gen;
use common::*;
use std::path::Path;
use vmdk_gen::*;

const MIB: u64 = 1 << 20;

/// A flat parent disk (descriptor + -flat file) with `data`; returns its CID.
fn flat_parent(dir: &Path, data: &[u8], cid: u32) {
    std::fs::write(dir.join("parent-flat.vmdk"), data).unwrap();
    let ext = format!("RW {} FLAT \"parent-flat.vmdk\" 0", data.len() / 512);
    std::fs::write(
        dir.join("parent.vmdk"),
        descriptor("monolithicFlat", cid, None, &[ext]),
    )
    .unwrap();
}

#[test]
fn descriptor_with_mixed_extents_matches_qemu() {
    let s = Scratch::new("vmdk-mixed");
    let mut rng = Rng::new(21);
    // FLAT with a start offset, a qemu-made sparse extent, a VMFS flat extent.
    let flat1 = rng.bytes(3 * MIB as usize);
    std::fs::write(s.path("a.bin"), &flat1).unwrap();
    let sparse = s.path("b.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        sparse.to_str().unwrap(),
        &(2 * MIB).to_string(),
    ]);
    write_random("vmdk", &sparse, &mut rng, 12345, 300_000);
    let flat2 = rng.bytes(MIB as usize);
    std::fs::write(s.path("c d.bin"), &flat2).unwrap();
    let text = descriptor(
        "monolithicFlat",
        7,
        None,
        &[
            "RW 4096 FLAT \"a.bin\" 2048".into(),
            "RW 4096 SPARSE \"b.vmdk\"".into(),
            "RW 2048 VMFS \"c d.bin\"".into(),
        ],
    )
    .replace('\n', "\r\n");
    let img = s.path("mixed.vmdk");
    std::fs::write(&img, text).unwrap();
    let want = qemu_raw(&img, None, &[]);
    assert_eq!(want.len() as u64, 5 * MIB);
    assert_same(
        "model vs qemu",
        &want[..2 * MIB as usize],
        &flat1[MIB as usize..],
    );
    assert_same("mixed extents", &read_all(&open_view(&img).unwrap()), &want);
}

#[test]
fn zero_and_rdonly_extents_follow_the_spec() {
    // QEMU skips ZERO and RDONLY lines (shifting what follows); VMware reads them in place.
    let s = Scratch::new("vmdk-zero");
    let mut rng = Rng::new(22);
    let a = rng.bytes(MIB as usize);
    let b = rng.bytes(MIB as usize / 2 + 512);
    std::fs::write(s.path("a.bin"), &a).unwrap();
    std::fs::write(s.path("b.bin"), &b).unwrap();
    let text = "# Disk DescriptorFile\n# comment\n  cid = 0000abcd\nCREATETYPE=\"twoGbMaxExtentFlat\"\nrdonly 2048 flat \"a.bin\"\nRW 300 ZERO\n\
                RW 1025 FLAT \"b.bin\" 0 # trailing words are ignored\n";
    let img = s.path("z.vmdk");
    std::fs::write(&img, text).unwrap();
    let mut want = a.clone();
    want.extend(vec![0u8; 300 * 512]);
    want.extend_from_slice(&b);
    let view = open_view(&img).unwrap();
    assert_same("ZERO and RDONLY", &read_all(&view), &want);
    let layers = vmfs_mount::chain::open_chain(&img, None, &ctx()).unwrap();
    assert_eq!(layers[0].identity().cid, Some(0xabcd));
}

#[test]
fn vmfs_sparse_redo_log_over_a_flat_parent() {
    let s = Scratch::new("vmdk-cowd");
    let mut rng = Rng::new(23);
    let grain_sectors = 2u32;
    let gb = grain_sectors as usize * 512;
    let capacity = 3 * 4096 * grain_sectors + 100; // four GTs, the last partial
    let parent = rng.bytes(capacity as usize * 512);
    flat_parent(&s.0, &parent, 0x1234);
    let mut grains = Vec::new();
    for g in [
        0u64,
        1,
        2,
        7,
        4095,
        4096 * 2 + 5,
        4096 * 2 + 6,
        4096 * 3 + 49,
    ] {
        grains.push((g, rng.bytes(gb)));
    }
    std::fs::write(
        s.path("child-delta.vmdk"),
        cowd(capacity, grain_sectors, &grains),
    )
    .unwrap();
    let ext = format!("RW {capacity} VMFSSPARSE \"child-delta.vmdk\"");
    let child = s.path("child.vmdk");
    std::fs::write(
        &child,
        descriptor("vmfsSparse", 0x99, Some((0x1234, "parent.vmdk")), &[ext]),
    )
    .unwrap();

    let mut model = parent.clone();
    for (g, data) in &grains {
        put(&mut model, *g as usize * gb, data);
    }
    let got = read_all(&open_view(&child).unwrap());
    assert_same("COWD vs model", &got, &model);
    assert_same("COWD vs qemu", &got, &qemu_raw(&child, None, &[]));
}

#[test]
fn sesparse_delta_over_a_sparse_parent() {
    let s = Scratch::new("vmdk-sesparse");
    let mut rng = Rng::new(24);
    let capacity = 2 * 4096 * 8 + 800; // three GTs of 16 MiB, the last partial
    let size = capacity * 512;
    let parent_path = s.path("parent.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        parent_path.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut model = vec![0u8; size as usize];
    for (off, len) in [
        (0u64, 100_000usize),
        (16 * MIB - 5000, 10_000),
        (size - 70_000, 70_000),
    ] {
        let d = write_random("vmdk", &parent_path, &mut rng, off, len);
        put(&mut model, off as usize, &d);
    }
    let parent_cid = vmfs_mount::chain::open_chain(&parent_path, None, &ctx()).unwrap()[0]
        .identity()
        .cid
        .unwrap();
    let mut entries = Vec::new();
    for g in [0u64, 1, 2, 3, 10, 4095, 4096 * 2, 4096 * 2 + 3] {
        entries.push((g, SeGrain::Data(rng.bytes(4096))));
    }
    entries.push((5, SeGrain::Zero));
    entries.push((6, SeGrain::Unmapped));
    entries.push((4096 * 2 + 1, SeGrain::Zero));
    for (g, kind) in &entries {
        let at = *g as usize * 4096;
        match kind {
            SeGrain::Data(d) => put(&mut model, at, d),
            _ => model[at..at + 4096].fill(0),
        }
    }
    // GT 1 of the GD is unallocated (parent shows through); GTs are stored out of order.
    std::fs::write(
        s.path("child-sesparse.vmdk"),
        sesparse(capacity, &[Some(1), None, Some(0)], &entries),
    )
    .unwrap();
    let child = s.path("child.vmdk");
    let ext = format!("RW {capacity} SESPARSE \"child-sesparse.vmdk\"");
    std::fs::write(
        &child,
        descriptor("seSparse", 5, Some((parent_cid, "parent.vmdk")), &[ext]),
    )
    .unwrap();
    let got = read_all(&open_view(&child).unwrap());
    assert_same("seSparse vs model", &got, &model);
    assert_same("seSparse vs qemu", &got, &qemu_raw(&child, None, &[]));

    // The bare extent, opened without its descriptor, is a standalone disk: what the child
    // does not hold reads as zeros.
    let mut alone = vec![0u8; size as usize];
    for (g, kind) in &entries {
        if let SeGrain::Data(d) = kind {
            put(&mut alone, *g as usize * 4096, d);
        }
    }
    let bare = read_all(&open_view(&s.path("child-sesparse.vmdk")).unwrap());
    assert_same("bare seSparse extent", &bare, &alone);
}

#[test]
fn vmsd_names_snapshot_layers() {
    let s = Scratch::new("vmdk-vmsd");
    let data = Rng::new(25).bytes(MIB as usize);
    flat_parent(&s.0, &data, 0x42);
    let child = s.path("vm-000001.vmdk");
    std::fs::write(s.path("vm-000001-delta.vmdk"), cowd(2048, 8, &[])).unwrap();
    let ext = "RW 2048 VMFSSPARSE \"vm-000001-delta.vmdk\"".to_string();
    std::fs::write(
        &child,
        descriptor("vmfsSparse", 0x43, Some((0x42, "parent.vmdk")), &[ext]),
    )
    .unwrap();
    std::fs::write(
        s.path("vm.vmsd"),
        ".encoding = \"UTF-8\"\nsnapshot0.uid = \"1\"\nsnapshot0.displayName = \"Clean |22install|22\"\n\
         snapshot0.disk0.fileName = \"parent.vmdk\"\nsnapshot0.disk0.node = \"scsi0:0\"\n",
    )
    .unwrap();
    let layers = vmfs_mount::chain::open_chain(&child, None, &ctx()).unwrap();
    assert_eq!(
        layers[1].display_name().as_deref(),
        Some("Clean \"install\"")
    );
    assert_eq!(layers[0].display_name(), None);
    assert_same(
        "empty COWD child",
        &read_all(&open_view(&child).unwrap()),
        &data,
    );
}

#[test]
fn descriptor_wrapped_in_a_sparse_header() {
    // capacity 0 with a descriptor offset: the KDMV file only carries a descriptor.
    let s = Scratch::new("vmdk-wrapper");
    let data = Rng::new(26).bytes(MIB as usize + 512);
    std::fs::write(s.path("w-flat.vmdk"), &data).unwrap();
    let text = descriptor(
        "monolithicFlat",
        9,
        None,
        &["RW 2049 FLAT \"w-flat.vmdk\" 0".into()],
    );
    let mut f = vec![0u8; 512];
    f[..4].copy_from_slice(b"KDMV");
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    f[28..36].copy_from_slice(&1u64.to_le_bytes());
    f[36..44].copy_from_slice(&20u64.to_le_bytes());
    f.extend_from_slice(text.as_bytes());
    f.resize(21 * 512, 0);
    let img = s.path("w.vmdk");
    std::fs::write(&img, &f).unwrap();
    let got = read_all(&open_view(&img).unwrap());
    assert_same("wrapped descriptor", &got, &data);
    assert_same(
        "wrapped descriptor (qemu)",
        &got,
        &qemu_raw(&img, None, &[]),
    );
}
