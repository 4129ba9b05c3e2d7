//! The backing-file policy: files an image names (backing files, parents, extents, data
//! files) are refused when they are not regular files or block devices, or lie outside the
//! directories of the chain the user named; every layout real tools write still opens.

mod common;
mod mount_support;
mod vhdx_gen;

use common::*;
use mount_support::mount;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use vhdx_gen::model::{child_of, write};
use vhdx_gen::{Block, Spec, build};
use vmfs_mount::backing_policy::BackingPolicy;
use vmfs_mount::error::{Error, Kind};
use vmfs_mount::format::OpenCtx;

const BIN: &str = env!("CARGO_BIN_EXE_vmfs-mount");
const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 at `path` whose backing file is `backing` (not opened by qemu-img).
fn qcow2_over(path: &Path, backing: &str, fmt: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        fmt,
        s(path),
        "1M",
    ]);
}

fn refusal(image: &Path, ctx: &OpenCtx) -> Error {
    let e = vmfs_mount::chain::open_chain(image, None, ctx).expect_err("must be refused");
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    e
}

fn with_policy(p: BackingPolicy) -> OpenCtx {
    ctx().with_policy(p)
}

/// A raw file of `len` seeded random bytes.
fn random_raw(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let b = Rng::new(seed).bytes(len);
    std::fs::write(path, &b).unwrap();
    b
}

fn vmfs(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn system_files_devices_and_proc_are_refused() {
    let sc = Scratch::new("policy-system");
    let evil = sc.path("evil.qcow2");
    qcow2_over(&evil, "/etc/passwd", "raw");
    let e = refusal(&evil, &ctx());
    let msg = e.to_string();
    for needle in [
        s(&evil),
        "backing file \"/etc/passwd\"",
        "outside",
        "backing_dirs=/etc",
        "trust_backing",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing in {msg}");
    }
    // trust_backing accepts any path, but never a device or a procfs file
    let trusting = with_policy(BackingPolicy::new().trust_any(true));
    assert!(vmfs_mount::chain::open_chain(&evil, None, &trusting).is_ok());
    for (name, target, what) in [
        ("zero.qcow2", "/dev/zero", "character device"),
        ("env.qcow2", "/proc/self/environ", "procfs"),
        ("dir.qcow2", "/tmp", "directory"),
    ] {
        let p = sc.path(name);
        qcow2_over(&p, target, "raw");
        for c in [ctx(), trusting.clone()] {
            let msg = refusal(&p, &c).to_string();
            assert!(msg.contains(what) && msg.contains(target), "{msg}");
        }
    }
}

#[test]
fn symlinks_and_dotdot_are_resolved_before_deciding() {
    let sc = Scratch::new("policy-paths");
    std::fs::create_dir_all(sc.path("img/sub")).unwrap();
    std::fs::create_dir_all(sc.path("out")).unwrap();
    let outside = random_raw(&sc.path("out/base.raw"), 1, MIB as usize);
    let inside = random_raw(&sc.path("img/base2.raw"), 2, MIB as usize);

    // ../ out of the directory: refused; allowed with backing_dirs, and then reads right
    let a = sc.path("img/a.qcow2");
    qcow2_over(&a, "../out/base.raw", "raw");
    let msg = refusal(&a, &ctx()).to_string();
    let out_dir = sc.path("out").canonicalize().unwrap();
    assert!(
        msg.contains(&format!("backing_dirs={}", out_dir.display())),
        "{msg}"
    );
    let allowed = with_policy(BackingPolicy::new().allow_dir(&sc.path("out")).unwrap());
    let layers = vmfs_mount::chain::open_chain(&a, None, &allowed).unwrap();
    let view = vmfs_mount::view::View::new(
        layers,
        MIB,
        std::sync::Arc::new(vmfs_mount::cache::ByteCache::new(MIB as usize)),
        64,
    );
    assert_same("backing_dirs", &read_all(&view), &outside);

    // a symlink inside the directory that points outside is outside
    std::os::unix::fs::symlink("../out/base.raw", sc.path("img/link.raw")).unwrap();
    let b = sc.path("img/b.qcow2");
    qcow2_over(&b, "link.raw", "raw");
    let msg = refusal(&b, &ctx()).to_string();
    assert!(msg.contains(s(&out_dir)), "{msg}");

    // `..` that stays inside is fine, also from a lower layer climbing back up
    let c = sc.path("img/c.qcow2");
    qcow2_over(&c, "sub/../base2.raw", "raw");
    assert_same("sub/..", &read_all(&open_view(&c).unwrap()), &inside);
    let mid = sc.path("img/sub/mid.qcow2");
    qcow2_over(&mid, "../base2.raw", "raw");
    let d = sc.path("img/d.qcow2");
    qcow2_over(&d, "sub/mid.qcow2", "qcow2");
    assert_same("lower ..", &read_all(&open_view(&d).unwrap()), &inside);
}

/// libvirt pools: every volume in one directory, absolute backing paths.
#[test]
fn libvirt_pool_chain_opens() {
    let sc = Scratch::new("policy-libvirt");
    let pool = sc.path("pool");
    std::fs::create_dir(&pool).unwrap();
    let mut rng = Rng::new(3);
    let names = ["vm.qcow2", "vm.snap1", "vm.snap2"];
    let sizes = (2 << 20, 300_000);
    let top = qemu_delta_chain(
        &pool,
        "qcow2",
        &names,
        "4M",
        sizes,
        BackingName::Absolute,
        &mut rng,
    );
    let view = open_view(&top).unwrap();
    assert_eq!(view.layers().len(), 3);
    assert_same(
        "libvirt",
        &read_all(&view),
        &qemu_raw(&top, Some("qcow2"), &[]),
    );
}

/// VMware: split extents beside the descriptor and a snapshot delta beside the base.
#[test]
fn vmware_split_extents_and_deltas_open() {
    let sc = Scratch::new("policy-vmware");
    let base = sc.path("vm.vmdk");
    random_raw(&sc.path("vm-f001.vmdk"), 4, MIB as usize);
    random_raw(&sc.path("vm-f002.vmdk"), 5, MIB as usize);
    std::fs::write(
        &base,
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n\
         RW 2048 FLAT \"vm-f001.vmdk\" 0\nRW 2048 FLAT \"vm-f002.vmdk\" 0\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();
    let delta = sc.path("vm-000001.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "vm.vmdk",
        "-F",
        "vmdk",
        s(&delta),
    ]);
    write_random("vmdk", &delta, &mut Rng::new(6), 900_000, 400_000);
    let view = open_view(&delta).unwrap();
    assert_eq!(view.layers()[1].files().len(), 3);
    assert_same(
        "vmware",
        &read_all(&view),
        &qemu_raw(&delta, Some("vmdk"), &[]),
    );

    // an extent elsewhere is refused, naming the extent and the option
    std::fs::create_dir(sc.path("elsewhere")).unwrap();
    let far = sc.path("elsewhere/far-flat.vmdk");
    random_raw(&far, 7, MIB as usize);
    std::fs::create_dir(sc.path("sub")).unwrap();
    let bad = sc.path("sub/bad.vmdk");
    std::fs::write(
        &bad,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{}\" 0\n",
            far.display()
        ),
    )
    .unwrap();
    let e = vmfs_mount::format::open_detect(&bad, None, &ctx()).unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("extent") && msg.contains("far-flat.vmdk") && msg.contains("backing_dirs="),
        "{msg}"
    );
}

/// Hyper-V keeps a checkpoint's .avhdx beside its parent; a parent in another directory
/// (a hand-made differencing disk over a template library) needs backing_dirs.
#[test]
fn hyperv_avhdx_beside_the_parent_opens_and_a_parent_elsewhere_needs_backing_dirs() {
    let sc = Scratch::new("policy-hyperv");
    let mut rng = Rng::new(8);
    let mut parent = Spec::new(4 * MIB, MIB as u32, 512);
    parent.blocks = (0..4)
        .map(|_| Block::Full(rng.bytes(MIB as usize)))
        .collect();
    let parent_path = sc.path("vm.vhdx");
    write(&parent_path, &build(&parent));
    let mut child = Spec::new(4 * MIB, MIB as u32, 512);
    child.data_write_guid = [9; 16];
    child.parent = Some(child_of(&parent_path, ".\\vm.vhdx"));
    child.blocks = vec![Block::Full(rng.bytes(MIB as usize)), Block::NotPresent];
    let avhdx = sc.path("vm_6A3C2E5B-4F7D-4E0C-9B1A-2D3E4F5A6B7C.avhdx");
    write(&avhdx, &build(&child));
    let view = open_view(&avhdx).unwrap();
    assert_eq!(view.layers().len(), 2);

    std::fs::create_dir(sc.path("vms")).unwrap();
    child.parent = Some(child_of(&parent_path, "..\\vm.vhdx"));
    let far = sc.path("vms/child.vhdx");
    write(&far, &build(&child));
    let msg = refusal(&far, &ctx()).to_string();
    assert!(
        msg.contains("parent") && msg.contains("backing_dirs="),
        "{msg}"
    );
    let allowed = with_policy(BackingPolicy::new().allow_dir(&sc.0).unwrap());
    assert_eq!(
        vmfs_mount::chain::open_chain(&far, None, &allowed)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn qcow2_external_data_files_follow_the_policy() {
    let sc = Scratch::new("policy-datafile");
    std::fs::create_dir(sc.path("img")).unwrap();
    std::fs::create_dir(sc.path("out")).unwrap();
    // qemu-img creates the data file relative to its working directory: give it absolute
    // names, one inside the image's directory and one outside
    for (name, data) in [("img/a.qcow2", "img/a.data"), ("img/b.qcow2", "out/b.data")] {
        let p = sc.path(name);
        let data = sc.path(data).display().to_string();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data}"),
            s(&p),
            "1M",
        ]);
        write_random("qcow2", &p, &mut Rng::new(9), 4096, 100_000);
    }
    let a = sc.path("img/a.qcow2");
    assert_same(
        "data file beside",
        &read_all(&open_view(&a).unwrap()),
        &qemu_raw(&a, Some("qcow2"), &[]),
    );
    let b = sc.path("img/b.qcow2");
    let e = vmfs_mount::format::open_detect(&b, None, &ctx()).unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    assert!(e.to_string().contains("external data file"), "{e}");
}

/// The command line: a mount that would serve a file outside fails in one line and mounts
/// nothing; --list shows the chain with each decision (text and JSON); backing_dirs and
/// an --overlay in another directory work.
#[test]
fn cli_refuses_lists_decisions_and_takes_the_options() {
    let sc = Scratch::new("policy-cli");
    std::fs::create_dir(sc.path("img")).unwrap();
    std::fs::create_dir(sc.path("out")).unwrap();
    std::fs::create_dir(sc.path("mnt")).unwrap();
    let base = random_raw(&sc.path("out/base.raw"), 10, MIB as usize);
    let top = sc.path("img/top.qcow2");
    qcow2_over(&top, "../out/base.raw", "raw");
    let mnt = sc.path("mnt");

    let out = vmfs(&[s(&top), s(&mnt)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("refused") && err.contains("backing_dirs="),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);

    let out = vmfs(&["--list", s(&top)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("policy:        allowed: named on the command line"),
        "{text}"
    );
    assert!(
        text.contains("[1] not opened:") && text.contains("refused"),
        "{text}"
    );

    let dirs = format!("backing_dirs={}", sc.path("out").display());
    let out = vmfs(&["--list", "--json", "-o", &dirs, s(&top)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let policy = &doc["layers"][1]["policy"][0];
    assert_eq!(policy["allowed"], true, "{doc}");
    assert_eq!(policy["role"], "backing file");
    assert_eq!(policy["stored"], "../out/base.raw");
    assert!(
        policy["reason"].as_str().unwrap().contains("backing_dirs="),
        "{policy}"
    );
    assert!(doc["stopped"].is_null());

    let out = vmfs(&["--list", "--trust-backing", s(&top)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("trust_backing is set"));

    let (guard, mnt) = mount(&top, &sc.0, &["-r", "--backing-dirs", s(&sc.path("out"))]);
    assert_same(
        "mounted with backing_dirs",
        &std::fs::read(mnt.join("disk.raw")).unwrap(),
        &base,
    );
    drop(guard);

    // --overlay in another directory: its backing file is IMAGE, named on the command line
    let ov = sc.path("img/overlay.qcow2");
    let (_guard, mnt) = mount(&sc.path("out/base.raw"), &sc.0, &["--overlay", s(&ov)]);
    assert_same(
        "overlay elsewhere",
        &std::fs::read(mnt.join("disk.raw")).unwrap(),
        &base,
    );
}
