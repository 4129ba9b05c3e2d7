//! VDI differencing chains. QEMU refuses VDIs with a parent UUID, so the children are built
//! here from the format description (header, block map with data, free and zero blocks,
//! shuffled data blocks) over qemu-made parents, and compared with a model: the parent's
//! bytes, overridden by the child's data blocks, zero blocks reading as zeros.

mod common;
mod vdi_gen;
use common::*;
use std::path::{Path, PathBuf};
use vdi_gen::*;
use vmfs_mount::error::Kind;
use vmfs_mount::format::{Layer, OpenCtx};

const MB: u64 = 1 << 20;

/// A qemu-made dynamic VDI of `mb` MiB with random data in most blocks (block 2 full).
fn qemu_parent(path: &Path, mb: u64, rng: &mut Rng) -> Vec<u8> {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vdi",
        path.to_str().unwrap(),
        &format!("{mb}M"),
    ]);
    write_random("vdi", path, rng, 2 * MB, MB as usize);
    for _ in 0..8 {
        let len = 512 * (1 + rng.below(3000));
        let off = rng.below((mb * MB - len) / 512) * 512;
        write_random("vdi", path, rng, off, len as usize);
    }
    qemu_raw(path, Some("vdi"), &[])
}

fn random_blocks(rng: &mut Rng, pattern: &str) -> Vec<Block> {
    pattern
        .chars()
        .map(|c| match c {
            'D' => Block::Data(rng.bytes(MB as usize)),
            'Z' => Block::Zero,
            _ => Block::Free,
        })
        .collect()
}

fn open_layer(path: &Path) -> std::sync::Arc<dyn Layer> {
    let ctx = OpenCtx {
        writable: false,
        ..ctx()
    };
    vmfs_mount::format::open_detect(path, None, &ctx).unwrap()
}

#[test]
fn child_over_a_qemu_parent_matches_the_model() {
    let s = Scratch::new("vdi-child");
    let mut rng = Rng::new(0xd1f);
    let base = s.path("base.vdi");
    let parent_bytes = qemu_parent(&base, 10, &mut rng);
    // Files that are not the parent must be passed over.
    std::fs::write(s.path("notes.raw"), rng.bytes(5000)).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s.path("other.qcow2").to_str().unwrap(),
        "1M",
    ]);
    // Block 2 is all parent data: a zero block there must hide it.
    let spec = {
        let blocks = random_blocks(&mut rng, "DFZDDFZDFD");
        Spec::child_of(&base, &mut rng, blocks)
    };
    let child = s.path("child.vdi");
    spec.write(&child, &mut rng);

    let view = open_view(&child).unwrap();
    assert_eq!(view.layers().len(), 2);
    assert_eq!(view.layers()[1].path(), base);
    let got = read_all(&view);
    assert_same("child", &got, &spec.model(&parent_bytes));
    assert!(
        got[2 * MB as usize..3 * MB as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(
        parent_bytes[2 * MB as usize..3 * MB as usize]
            .iter()
            .any(|&b| b != 0)
    );

    // The parent's own view, as the mount shows it under snapshots/.
    let (_, snaps) = vmfs_mount::plan::plan(view.layers()).unwrap();
    assert_eq!(snaps[0].name, "base");
    let pview = vmfs_mount::view::View::new(
        snaps[0].layers.clone(),
        snaps[0].size,
        std::sync::Arc::new(vmfs_mount::cache::ByteCache::new(1 << 20)),
        64,
    );
    assert_same("parent view", &read_all(&pview), &parent_bytes);

    let d = view.layers()[0].details();
    let parent_uuid = format!("{{{}}}", uuid_text(&spec.linkage));
    assert!(
        d.contains(&("image type".into(), "differencing".into()))
            && d.contains(&("parent uuid".into(), parent_uuid)),
        "{d:?}"
    );
}

/// VirtualBox's layout: the machine folder holds the .vbox, snapshots live in Snapshots/
/// named by their UUID. Here the base sits in a subfolder that only the .vbox names.
#[test]
fn three_deep_chain_found_through_the_vbox_file() {
    let s = Scratch::new("vdi-vbox");
    let mut rng = Rng::new(0xb0c5);
    std::fs::create_dir_all(s.path("vm/Snapshots")).unwrap();
    std::fs::create_dir_all(s.path("vm/disks")).unwrap();
    let base = s.path("vm/disks/system.vdi");
    let base_bytes = qemu_parent(&base, 8, &mut rng);

    let mid_spec = {
        let blocks = random_blocks(&mut rng, "FDZFFDDF");
        Spec::child_of(&base, &mut rng, blocks)
    };
    let mid = s.path(&format!(
        "vm/Snapshots/{{{}}}.vdi",
        uuid_text(&mid_spec.uuid)
    ));
    mid_spec.write(&mid, &mut rng);
    // The top is 2 MiB larger than the layers below: past their end it reads zeros.
    let top_spec = {
        let blocks = random_blocks(&mut rng, "DFFZFFDZFF");
        Spec::child_of(&mid, &mut rng, blocks)
    };
    let top = s.path(&format!(
        "vm/Snapshots/{{{}}}.vdi",
        uuid_text(&top_spec.uuid)
    ));
    top_spec.write(&top, &mut rng);

    let vbox = format!(
        r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{{{m}}}" name="vm" snapshotFolder="Snapshots">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{{{b}}}" location="disks/system.vdi" format="VDI" type="Normal">
          <HardDisk uuid="{{{mid}}}" location="Snapshots/{{{mid}}}.vdi" format="VDI">
            <HardDisk uuid="{{{top}}}" location="Snapshots/{{{top}}}.vdi" format="VDI"/>
          </HardDisk>
        </HardDisk>
      </HardDisks>
    </MediaRegistry>
  </Machine>
</VirtualBox>
"#,
        m = uuid_text(&rng.bytes(16).try_into().unwrap()),
        b = uuid_text(&uuids_of(&base).0),
        mid = uuid_text(&mid_spec.uuid),
        top = uuid_text(&top_spec.uuid),
    );
    let err_without_vbox = open_view(&top)
        .err()
        .expect("base only reachable through the .vbox");
    assert_eq!(
        err_without_vbox.kind(),
        Kind::NotFound,
        "{err_without_vbox}"
    );
    assert!(
        err_without_vbox
            .message()
            .contains(&uuid_text(&uuids_of(&base).0)),
        "{err_without_vbox}"
    );
    std::fs::write(s.path("vm/vm.vbox"), vbox).unwrap();

    let view = open_view(&top).unwrap();
    let paths: Vec<PathBuf> = view
        .layers()
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect();
    assert_eq!(paths.len(), 3);
    assert_eq!(
        (paths[0].clone(), paths[2].canonicalize().unwrap()),
        (top.clone(), base.canonicalize().unwrap())
    );
    let want = top_spec.model(&mid_spec.model(&base_bytes));
    assert_same("top of three", &read_all(&view), &want);
}

/// Without a .vbox, the base one level above Snapshots/ is still found by its UUID.
#[test]
fn base_in_the_directory_above_is_found_without_a_vbox() {
    let s = Scratch::new("vdi-updir");
    let mut rng = Rng::new(0xab0e);
    std::fs::create_dir_all(s.path("Snapshots")).unwrap();
    let base = s.path("disk.vdi");
    let base_bytes = qemu_parent(&base, 4, &mut rng);
    let spec = {
        let blocks = random_blocks(&mut rng, "ZDFD");
        Spec::child_of(&base, &mut rng, blocks)
    };
    let child = s.path("Snapshots/snap.vdi");
    spec.write(&child, &mut rng);
    let view = open_view(&child).unwrap();
    assert_same(
        "child of upper base",
        &read_all(&view),
        &spec.model(&base_bytes),
    );
}

/// The directory above is searched only from VirtualBox's `Snapshots/`: a child anywhere else
/// whose parent lies above it is refused by the backing-file policy, naming the option.
#[test]
fn parent_above_a_directory_other_than_snapshots_is_refused() {
    let s = Scratch::new("vdi-policy");
    let mut rng = Rng::new(0xab0f);
    std::fs::create_dir_all(s.path("disks")).unwrap();
    let base = s.path("disk.vdi");
    let base_bytes = qemu_parent(&base, 4, &mut rng);
    let spec = {
        let blocks = random_blocks(&mut rng, "ZDFD");
        Spec::child_of(&base, &mut rng, blocks)
    };
    let child = s.path("disks/snap.vdi");
    spec.write(&child, &mut rng);
    let Err(e) = open_view(&child) else {
        panic!("a parent outside the child's directory must be refused");
    };
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("disk.vdi") && msg.contains("backing_dirs=") && msg.contains("parent"),
        "{msg}"
    );
    let policy = vmfs_mount::backing_policy::BackingPolicy::new()
        .allow_dir(&s.0)
        .unwrap();
    let layers = vmfs_mount::chain::open_chain(&child, None, &ctx().with_policy(policy)).unwrap();
    let view = vmfs_mount::view::View::new(
        layers,
        spec.size,
        std::sync::Arc::new(vmfs_mount::cache::ByteCache::new(8 << 20)),
        64,
    );
    assert_same(
        "with backing_dirs",
        &read_all(&view),
        &spec.model(&base_bytes),
    );
}

#[test]
fn missing_or_wrong_parent_names_the_uuid() {
    let s = Scratch::new("vdi-missing");
    let mut rng = Rng::new(0x5ad);
    let base = s.path("base.vdi");
    qemu_parent(&base, 4, &mut rng);
    let mut spec = {
        let blocks = random_blocks(&mut rng, "DFFZ");
        Spec::child_of(&base, &mut rng, blocks)
    };
    spec.linkage[15] ^= 0x5a;
    let child = s.path("child.vdi");
    spec.write(&child, &mut rng);
    let wanted = uuid_text(&spec.linkage);
    let e = open_view(&child).err().unwrap();
    assert_eq!(e.kind(), Kind::NotFound);
    assert!(
        e.message().contains(&format!("uuid {{{wanted}}}")) && e.message().contains("child.vdi"),
        "{e}"
    );

    // Asked directly, the child says what it wanted and what it found.
    let e = open_layer(&child)
        .verify_parent(&*open_layer(&base))
        .unwrap_err();
    let found = uuid_text(&uuids_of(&base).0);
    assert!(
        e.message().contains(&wanted) && e.message().contains(&found),
        "{e}"
    );
    let raw = s.path("plain.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    let e = open_layer(&child)
        .verify_parent(&*open_layer(&raw))
        .unwrap_err();
    assert!(
        e.message().contains("raw image") && e.message().contains(&wanted),
        "{e}"
    );

    // With the parent gone entirely.
    std::fs::remove_file(&base).unwrap();
    let e = open_view(&child).err().unwrap();
    assert!(e.message().contains(&wanted), "{e}");
}

/// VirtualBox does not check uuidParentModify: a parent written after the child was made
/// still opens (with a warning).
#[test]
fn parent_modified_after_the_child_still_opens() {
    let s = Scratch::new("vdi-modified");
    let mut rng = Rng::new(0x30d);
    let base = s.path("base.vdi");
    let base_bytes = qemu_parent(&base, 3, &mut rng);
    let mut spec = {
        let blocks = random_blocks(&mut rng, "FDZ");
        Spec::child_of(&base, &mut rng, blocks)
    };
    spec.parent_modify = rng.bytes(16).try_into().unwrap();
    let child = s.path("child.vdi");
    spec.write(&child, &mut rng);
    assert_same(
        "modified parent",
        &read_all(&open_view(&child).unwrap()),
        &spec.model(&base_bytes),
    );
}

#[test]
fn uuid_loops_are_reported() {
    let s = Scratch::new("vdi-loop");
    let mut rng = Rng::new(0x100b);
    let (ua, ub): ([u8; 16], [u8; 16]) = (
        rng.bytes(16).try_into().unwrap(),
        rng.bytes(16).try_into().unwrap(),
    );
    let mk = |uuid: [u8; 16], linkage: [u8; 16], rng: &mut Rng| Spec {
        size: 2 * MB,
        block_size: MB,
        block_extra: 0,
        image_type: 4,
        header_size: 0x190,
        version: 0x0001_0001,
        uuid,
        modify: rng.bytes(16).try_into().unwrap(),
        linkage,
        parent_modify: [0; 16],
        blocks: vec![Block::Free, Block::Zero],
    };
    mk(ua, ub, &mut rng).write(&s.path("a.vdi"), &mut rng);
    mk(ub, ua, &mut rng).write(&s.path("b.vdi"), &mut rng);
    let e = open_view(&s.path("a.vdi")).err().unwrap();
    assert_eq!(e.kind(), Kind::Corrupt, "{e}");
    assert!(
        e.message().contains("loop") && e.message().contains(&uuid_text(&ua)),
        "{e}"
    );

    let s2 = Scratch::new("vdi-selfloop");
    mk(ua, ua, &mut rng).write(&s2.path("self.vdi"), &mut rng);
    let e = open_view(&s2.path("self.vdi")).err().unwrap();
    assert!(e.message().contains("loop"), "{e}");
}

/// Block sizes other than 1 MiB, per-block extra data and the 1.0 header (VirtualBox reads
/// them; QEMU does not).
#[test]
fn small_blocks_with_extra_data_and_a_version_1_0_header() {
    let s = Scratch::new("vdi-smallblocks");
    let mut rng = Rng::new(0x64b);
    let bs = 64 * 1024u64;
    let pattern = "DDFZDFFDDDZZDFDD";
    let blocks: Vec<Block> = pattern
        .chars()
        .map(|c| match c {
            'D' => Block::Data(rng.bytes(bs as usize)),
            'Z' => Block::Zero,
            _ => Block::Free,
        })
        .collect();
    let spec = Spec {
        size: pattern.len() as u64 * bs - 1536,
        block_size: bs,
        block_extra: 512,
        image_type: 1,
        header_size: 0x180,
        version: 0x0001_0000,
        uuid: rng.bytes(16).try_into().unwrap(),
        modify: rng.bytes(16).try_into().unwrap(),
        linkage: [0; 16],
        parent_modify: [0; 16],
        blocks,
    };
    let img = s.path("small.vdi");
    spec.write(&img, &mut rng);
    let view = open_view(&img).unwrap();
    assert_eq!(view.layers().len(), 1);
    assert_same("64 KiB blocks", &read_all(&view), &spec.model(&[]));
}
