//! A real guest on `disk.raw`: Linux under TCG boots from a qcow2 chain over a base of each
//! format (qcow2, raw, VMDK, VHD, VHDX, VDI), one mount per chain, all six disks in one boot
//! (the first is the root file system). On each it reads the base files, writes files with
//! syncs, deletes some, runs fstrim and records checksums. Then every image is `qemu-img
//! check` clean, `e2fsck -fn` of its conversion is clean, and every checksum matches.

mod common;
mod guest;
mod mount_support;

use common::*;
use guest::ext4;
use mount_support::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

const DISK: u64 = 64 << 20;
/// (qemu-img format, extra convert options, guest name).
const FORMATS: &[(&str, &[&str])] = &[
    ("qcow2", &[]),
    ("raw", &[]),
    ("vmdk", &[]),
    ("vpc", &["-o", "force_size=on"]),
    ("vhdx", &[]),
    ("vdi", &[]),
];

/// A bootable ext4 image with seeded base files; returns it with the files' checksums.
fn base_ext4(s: &Scratch) -> (PathBuf, BTreeMap<String, String>) {
    let tree = s.path("tree");
    guest::root_tree(&tree);
    std::fs::create_dir_all(tree.join("base")).unwrap();
    let mut rng = Rng::new(0x6e57);
    let mut sums = BTreeMap::new();
    for (name, len) in [("big", 2 << 20), ("mid", 300_000), ("small", 1000)] {
        let data = rng.bytes(len);
        std::fs::write(tree.join("base").join(name), &data).unwrap();
        sums.insert(name.to_string(), ext4::sha256(&data));
    }
    let img = s.path("base.ext4");
    ext4::mkfs(&tree, DISK, &img);
    (img, sums)
}

/// The guest's work on the file system mounted at `$2` (named `$1` in the output).
const EXERCISE: &str = r#"
exercise() {
  n=$1; m=$2
  for f in big mid small; do echo "BASE $n $f $(sha256sum < $m/base/$f | cut -d' ' -f1)"; done
  mkdir -p $m/new
  for i in 1 2 3 4; do
    dd if=/dev/urandom of=$m/new/f$i bs=64k count=$((i * 5)) 2>/dev/null
    sync $m/new/f$i
  done
  sync $m/new
  rm $m/new/f2 $m/base/big
  sync
  echo "TRIM $n $(fstrim -v $m)"
  for i in 1 3 4; do echo "SUM $n f$i $(sha256sum < $m/new/f$i | cut -d' ' -f1)"; done
}
"#;

#[test]
fn a_guest_boots_and_writes_on_a_chain_over_each_format() {
    let s = Scratch::new("guest-chain");
    let (ext4_img, base_sums) = base_ext4(&s);
    let mut mounts = Vec::new();
    let mut script = EXERCISE.to_string();
    for (i, (fmt, opts)) in FORMATS.iter().enumerate() {
        let dir = s.path(fmt);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join(format!("base.{fmt}"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.extend([ext4_img.to_str().unwrap(), base.to_str().unwrap()]);
        qemu_img(&args);
        let top = dir.join("top.qcow2");
        let base_name = format!("base.{fmt}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &base_name,
            "-F",
            fmt,
            top.to_str().unwrap(),
        ]);
        let daemon = mount_foreground(&top, &dir, &[]);
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        if i == 0 {
            script += &format!("exercise {fmt} /\n");
        } else {
            script += &format!(
                "mkdir -p /mnt/{fmt}; mount {dev} /mnt/{fmt}; exercise {fmt} /mnt/{fmt}; umount /mnt/{fmt}\n"
            );
        }
        mounts.push((fmt.to_string(), top, daemon));
    }
    let mut boot = guest::Boot::new(&s.0, &script).root("/dev/vda");
    for (_, _, daemon) in &mounts {
        boot = boot.raw_disk(&daemon.mnt.join("disk.raw"));
    }
    let out = boot.run();
    out.assert_ok();

    for (fmt, top, mut daemon) in mounts {
        assert_eq!(daemon.unmount(), Some(0), "{fmt}: {}", daemon.log());
        let what = |x: &str| format!("{fmt}: {x}\n{}", out.describe());
        // Each base file read as written, on every format.
        for (name, sum) in &base_sums {
            let want = format!("{fmt} {name} {sum}");
            assert!(
                out.values("BASE ").contains(&want),
                "{}",
                what(&format!("base file {name}"))
            );
        }
        let trim = out.values(&format!("TRIM {fmt} "));
        assert!(
            trim.len() == 1 && !trim[0].contains(" 0 bytes"),
            "{}",
            what("fstrim trimmed nothing")
        );
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&top)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            what(&format!(
                "qemu-img check: {}",
                String::from_utf8_lossy(&check.stdout)
            ))
        );
        // The discards reached the top image: the deleted base file's clusters read as zero there.
        let map = qemu_img(&["map", "--output=json", top.to_str().unwrap()]);
        assert!(
            map.lines()
                .any(|l| l.contains("\"depth\": 0") && l.contains("\"zero\": true")),
            "{}",
            what(&format!("no zero clusters in the top image: {map}"))
        );
        let raw = top.with_extension("converted.raw");
        qemu_img(&[
            "convert",
            "-q",
            "-O",
            "raw",
            top.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        if let Err(e) = ext4::fsck(&raw) {
            panic!("{}", what(&e));
        }
        for line in out.values(&format!("SUM {fmt} ")) {
            let (name, sum) = line.split_once(' ').unwrap();
            let got = ext4::read_file(&raw, &format!("/new/{name}"))
                .unwrap_or_else(|| panic!("{}", what(&format!("/new/{name} is missing"))));
            assert_eq!(ext4::sha256(&got), sum, "{}", what(&format!("/new/{name}")));
        }
        assert_eq!(
            out.values(&format!("SUM {fmt} ")).len(),
            3,
            "{}",
            what("checksums")
        );
        assert!(
            ext4::read_file(&raw, "/new/f2").is_none(),
            "{}",
            what("deleted /new/f2 is back")
        );
        assert!(
            ext4::read_file(&raw, "/base/big").is_none(),
            "{}",
            what("deleted /base/big is back")
        );
        let mid = ext4::read_file(&raw, "/base/mid").unwrap();
        assert_eq!(
            ext4::sha256(&mid),
            base_sums["mid"],
            "{}",
            what("/base/mid")
        );
        std::fs::remove_file(&raw).unwrap();
    }
}
