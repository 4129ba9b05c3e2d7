//! Chain layouts that real tools write open under the default backing-file policy (no
//! -o backing_dirs, no -o trust_backing). libvirt pools and VirtualBox's Snapshots/ are in
//! tests/backing_policy.rs and tests/vdi_chain.rs; here VMware's delta files with their
//! .vmsd, and Hyper-V's "Virtual Hard Disks" folder with parents named by absolute path.

mod common;
mod vhdx_gen;

use common::*;
use std::path::Path;
use vhdx_gen::model::{data_write_guid, write};
use vhdx_gen::{Block, Spec, build, guid_text};

const MIB: u64 = 1 << 20;

/// VMware Workstation: the base and its snapshot deltas (-000001, -000002) side by side in
/// the VM folder (no spaces: the qemu-io helper cannot take them), deltas naming their parent by file name, and the .vmsd listing them.
#[test]
fn vmware_deltas_beside_the_base_with_a_vmsd() {
    let sc = Scratch::new("layout-vmware");
    let vm = sc.path("Win10x64");
    std::fs::create_dir(&vm).unwrap();
    let mut rng = Rng::new(31);
    let names = [
        "Win10x64.vmdk",
        "Win10x64-000001.vmdk",
        "Win10x64-000002.vmdk",
    ];
    let sizes = (3 << 20, 500_000);
    let top = qemu_delta_chain(
        &vm,
        "vmdk",
        &names,
        "4M",
        sizes,
        BackingName::FileName,
        &mut rng,
    );
    std::fs::write(
        vm.join("Win10x64.vmsd"),
        ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"2\"\nsnapshot.numSnapshots = \"2\"\n\
         snapshot0.uid = \"1\"\nsnapshot0.displayName = \"clean install\"\n\
         snapshot0.disk0.fileName = \"Win10x64.vmdk\"\nsnapshot0.disk0.node = \"scsi0:0\"\n\
         snapshot1.uid = \"2\"\nsnapshot1.parent = \"1\"\nsnapshot1.displayName = \"updates\"\n\
         snapshot1.disk0.fileName = \"Win10x64-000001.vmdk\"\n",
    )
    .unwrap();
    let view = open_view(&top).expect("default policy must open a VMware snapshot chain");
    assert_eq!(view.layers().len(), 3);
    assert_eq!(
        view.layers()[2].display_name().as_deref(),
        Some("clean install")
    );
    assert_same(
        "vmware",
        &read_all(&view),
        &qemu_raw(&top, Some("vmdk"), &[]),
    );
}

/// A parent locator as Hyper-V writes it: relative and absolute Windows paths.
fn locators(parent: &Path, relative: &str, absolute: &str) -> Vec<(String, String)> {
    vec![
        ("parent_linkage".into(), guid_text(&data_write_guid(parent))),
        ("relative_path".into(), relative.into()),
        ("absolute_win32_path".into(), absolute.into()),
    ]
}

/// Hyper-V: the VHDX in "Virtual Hard Disks" and a checkpoint's .avhdx beside it, which
/// names it by relative and absolute Windows path; a chain of two checkpoints.
#[test]
fn hyperv_checkpoints_in_virtual_hard_disks() {
    let sc = Scratch::new("layout-hyperv");
    let vhd_dir = sc.path("Hyper-V/Virtual Hard Disks");
    std::fs::create_dir_all(&vhd_dir).unwrap();
    let mut rng = Rng::new(32);
    let mut base = Spec::new(4 * MIB, MIB as u32, 512);
    base.blocks = (0..4)
        .map(|_| Block::Full(rng.bytes(MIB as usize)))
        .collect();
    let base_path = vhd_dir.join("web01.vhdx");
    write(&base_path, &build(&base));
    let mut want = vhdx_gen::model::model(&base);

    let mut parent = base_path.clone();
    let mut top = base_path.clone();
    for (i, guid) in [
        "6A3C2E5B-4F7D-4E0C-9B1A-2D3E4F5A6B7C",
        "0D1E2F3A-4B5C-4D6E-8F70-8192A3B4C5D6",
    ]
    .iter()
    .enumerate()
    {
        let mut child = Spec::new(4 * MIB, MIB as u32, 512);
        child.data_write_guid = [i as u8 + 1; 16];
        let pname = parent.file_name().unwrap().to_str().unwrap().to_string();
        child.parent = Some(locators(
            &parent,
            &format!(".\\{pname}"),
            &format!("C:\\ProgramData\\Microsoft\\Windows\\Virtual Hard Disks\\{pname}"),
        ));
        let data = rng.bytes(MIB as usize);
        child.blocks = vec![Block::NotPresent; i + 1];
        child.blocks.push(Block::Full(data.clone()));
        want[(i + 1) * MIB as usize..(i + 2) * MIB as usize].copy_from_slice(&data);
        top = vhd_dir.join(format!("web01_{guid}.avhdx"));
        write(&top, &build(&child));
        parent = top.clone();
    }
    let view = open_view(&top).expect("default policy must open a Hyper-V checkpoint chain");
    assert_eq!(view.layers().len(), 3);
    assert_same("hyperv", &read_all(&view), &want);
}

/// A differencing VHDX whose only usable locator is the parent's absolute host path, in the
/// child's own directory (what a Linux tool or a copied Hyper-V folder leaves): opens.
#[test]
fn hyperv_parent_by_absolute_path_in_the_same_folder() {
    let sc = Scratch::new("layout-hyperv-abs");
    let dir = sc.path("Virtual Hard Disks");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(33);
    let mut base = Spec::new(2 * MIB, MIB as u32, 512);
    base.blocks = (0..2)
        .map(|_| Block::Full(rng.bytes(MIB as usize)))
        .collect();
    let base_path = dir.join("base.vhdx");
    write(&base_path, &build(&base));
    let mut child = Spec::new(2 * MIB, MIB as u32, 512);
    child.data_write_guid = [7; 16];
    child.parent = Some(locators(
        &base_path,
        ".\\missing.vhdx",
        base_path.to_str().unwrap(),
    ));
    child.blocks = vec![Block::NotPresent, Block::Zero];
    let top = dir.join("child.avhdx");
    write(&top, &build(&child));
    let view = open_view(&top).expect("parent by absolute path beside the child");
    let mut want = vhdx_gen::model::model(&base);
    want[MIB as usize..].fill(0);
    assert_same("hyperv-abs", &read_all(&view), &want);
}
