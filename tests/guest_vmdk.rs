//! A real guest on `disk.vmdk` (`-o vmdk`): Linux under TCG boots from a qcow2 chain with QEMU's
//! vmdk driver reading the mount's descriptor and opening its FLAT extent, `disk.raw`, through
//! the mount. The guest reads the base files, writes files with syncs and records checksums.
//! Then the image is `qemu-img check` clean, `disk.raw` as last mounted is what `qemu-img
//! convert` of the image gives, `e2fsck -fn` of it is clean, and every checksum matches. QEMU
//! rewrote the descriptor's CID on its first write; the extent stays `disk.raw`.

mod common;
mod guest;
mod mount_support;

use common::*;
use guest::ext4;
use mount_support::*;
use std::collections::BTreeMap;

const DISK: u64 = 48 << 20;

const SCRIPT: &str = r#"
for f in big small; do echo "BASE $f $(sha256sum < /base/$f | cut -d' ' -f1)"; done
mkdir -p /new
for i in 1 2 3; do
  dd if=/dev/urandom of=/new/f$i bs=64k count=$((i * 4)) 2>/dev/null
  sync /new/f$i
done
sync /new
rm /base/small
sync
for i in 1 2 3; do echo "SUM f$i $(sha256sum < /new/f$i | cut -d' ' -f1)"; done
"#;

fn extent_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("RW ") || l.starts_with("RDONLY "))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_guest_boots_from_disk_vmdk_and_its_writes_reach_the_image() {
    let s = Scratch::new("guest-vmdk");
    let tree = s.path("tree");
    guest::root_tree(&tree);
    std::fs::create_dir_all(tree.join("base")).unwrap();
    let mut rng = Rng::new(0x76d6);
    let mut base_sums = BTreeMap::new();
    for (name, len) in [("big", 1 << 20), ("small", 5000)] {
        let data = rng.bytes(len);
        std::fs::write(tree.join("base").join(name), &data).unwrap();
        base_sums.insert(name.to_string(), ext4::sha256(&data));
    }
    let ext4_img = s.path("base.ext4");
    ext4::mkfs(&tree, DISK, &ext4_img);
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        ext4_img.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    std::fs::remove_file(&ext4_img).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);

    let mut daemon = mount_foreground(&top, &s.0, &["-o", "vmdk"]);
    let vmdk = daemon.mnt.join("disk.vmdk");
    let before = std::fs::read_to_string(&vmdk).unwrap();
    let spec = format!(
        "file={},format=vmdk,if=virtio,cache=none,aio=native,discard=unmap",
        vmdk.to_str().unwrap().replace(',', ",,")
    );
    let out = guest::Boot::new(&s.0, SCRIPT)
        .drive(&spec)
        .root("/dev/vda")
        .run();
    out.assert_ok();
    let what = |x: &str| format!("{x}\n{}", out.describe());

    // QEMU set a new CID on its first write; the descriptor still names disk.raw, whole.
    let after = std::fs::read(&vmdk).unwrap();
    let text = String::from_utf8_lossy(&after);
    let text = text.split('\0').next().unwrap();
    assert_eq!(extent_lines(text), extent_lines(&before), "{}", what(text));
    let live = std::fs::read(daemon.mnt.join("disk.raw")).unwrap();
    assert_eq!(daemon.unmount(), Some(0), "{}", daemon.log());

    for (name, sum) in &base_sums {
        assert!(
            out.values("BASE ").contains(&format!("{name} {sum}")),
            "{}",
            what(&format!("base file {name}"))
        );
    }
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        what(&String::from_utf8_lossy(&check.stdout))
    );
    let raw = s.path("converted.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "raw",
        top.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert_same(
        "disk.raw vs qemu-img convert",
        &live,
        &std::fs::read(&raw).unwrap(),
    );
    if let Err(e) = ext4::fsck(&raw) {
        panic!("{}", what(&e));
    }
    let sums = out.values("SUM ");
    assert_eq!(sums.len(), 3, "{}", what("checksums"));
    for line in sums {
        let (name, sum) = line.split_once(' ').unwrap();
        let got = ext4::read_file(&raw, &format!("/new/{name}"))
            .unwrap_or_else(|| panic!("{}", what(&format!("/new/{name} is missing"))));
        assert_eq!(ext4::sha256(&got), sum, "{}", what(&format!("/new/{name}")));
    }
    assert!(
        ext4::read_file(&raw, "/base/small").is_none(),
        "{}",
        what("deleted /base/small is back")
    );
    let big = ext4::read_file(&raw, "/base/big").unwrap();
    assert_eq!(
        ext4::sha256(&big),
        base_sums["big"],
        "{}",
        what("/base/big")
    );

    // The next mount starts from the descriptor it derives, not from what QEMU wrote.
    let mut again = mount_foreground(&top, &s.0, &["-r", "-o", "vmdk"]);
    let fresh = std::fs::read_to_string(again.mnt.join("disk.vmdk")).unwrap();
    assert_eq!(fresh.trim_end_matches('\0'), before.trim_end_matches('\0'));
    assert_eq!(again.unmount(), Some(0), "{}", again.log());
}
