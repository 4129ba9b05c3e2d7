//! The daemon killed under a running guest: Linux under TCG boots from one chain and writes
//! files with syncs on three more disks, each served by its own daemon; each daemon gets
//! SIGKILL at a different point while its disk is being written (early, during deletes and
//! fstrim, later). Then everything is mounted again and the guest boots again: ext4 recovers
//! every disk, `e2fsck -fn` of each image is clean afterwards, `qemu-img check` finds no
//! corruption, and every file the guest had synced reads back intact.

mod common;
mod guest;
mod mount_support;

use common::*;
use guest::ext4;
use mount_support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const DISK: u64 = 64 << 20;

/// Data disks: (name in the guest, base format, the output line after which its daemon dies).
const DISKS: &[(&str, &str, &str)] = &[
    ("b", "qcow2", "SYNCED b f2 "),
    ("c", "vmdk", "TRIM c"),
    ("d", "vhdx", "SYNCED d f12 "),
];

/// Writes files with syncs until the disk fails; deletes two and trims after the sixth.
const WRITER: &str = r#"
writer() {
  n=$1; m=$2; i=0
  while [ $i -lt 40 ]; do
    i=$((i + 1))
    dd if=/dev/urandom of=$m/new/f$i bs=64k count=8 2>/dev/null || break
    sync $m/new/f$i $m/new || break
    echo "SYNCED $n f$i $(sha256sum < $m/new/f$i | cut -d' ' -f1)"
    if [ $i -eq 6 ]; then
      rm -f $m/new/f2 $m/new/f3
      echo "TRIM $n"
      fstrim $m || break
    fi
  done
  echo "STOPPED $n $i"
}
"#;

/// Converts the bootable ext4 image to `fmt` in `dir` and puts a qcow2 top over it.
fn chain(ext4_img: &Path, dir: &Path, fmt: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let base = format!("base.{fmt}");
    let base_path = dir.join(&base);
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        fmt,
        ext4_img.to_str().unwrap(),
        base_path.to_str().unwrap(),
    ]);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &base,
        "-F",
        fmt,
        top.to_str().unwrap(),
    ]);
    top
}

fn boot(s: &Scratch, daemons: &[Daemon], script: &str) -> guest::Running {
    let mut b = guest::Boot::new(&s.0, script).root("/dev/vda");
    for d in daemons {
        b = b.raw_disk(&d.mnt.join("disk.raw"));
    }
    b.spawn()
}

#[test]
fn ext4_recovers_and_synced_files_survive_daemon_kills_under_a_guest() {
    let s = Scratch::new("guest-kill");
    let tree = s.path("tree");
    guest::root_tree(&tree);
    std::fs::create_dir_all(tree.join("new")).unwrap();
    let ext4_img = s.path("base.ext4");
    ext4::mkfs(&tree, DISK, &ext4_img);

    let mut tops = vec![chain(&ext4_img, &s.path("root"), "raw")];
    for (name, fmt, _) in DISKS {
        tops.push(chain(&ext4_img, &s.path(name), fmt));
    }
    let dirs: Vec<PathBuf> = tops
        .iter()
        .map(|t| t.parent().unwrap().to_path_buf())
        .collect();
    let mut daemons: Vec<Daemon> = tops
        .iter()
        .zip(&dirs)
        .map(|(t, d)| mount_foreground(t, d, &[]))
        .collect();

    // First boot: write on b, c and d at once; kill each daemon at its point.
    let mut script = WRITER.to_string();
    for (n, _, _) in DISKS {
        script += &format!("mkdir -p /mnt/{n}; mount /dev/vd{n} /mnt/{n}\n");
    }
    for (n, _, _) in DISKS {
        script += &format!("writer {n} /mnt/{n} &\n");
    }
    script +=
        "wait\nfor d in b c d; do umount /mnt/$d 2>/dev/null || echo \"UMOUNT-FAILED $d\"; done\n";
    let mut vm = boot(&s, &daemons, &script);
    let mut killed = vec![false; DISKS.len()];
    while let Some(line) = vm.next_line() {
        for (i, (_, _, trigger)) in DISKS.iter().enumerate() {
            if !killed[i] && line.starts_with(trigger) {
                daemons[i + 1].kill();
                killed[i] = true;
            }
        }
    }
    let first = vm.finish();
    first.assert_ok();
    for (i, (n, _, trigger)) in DISKS.iter().enumerate() {
        assert!(
            killed[i],
            "disk {n}: the guest never printed {trigger:?}\n{}",
            first.describe()
        );
        assert!(
            first.values(&format!("STOPPED {n} ")).len() == 1,
            "{}",
            first.describe()
        );
    }
    // Every file the guest synced (f2 and f3 were deleted later: they may or may not be there).
    let mut synced: BTreeMap<(String, String), String> = BTreeMap::new();
    for l in first.values("SYNCED ") {
        let v: Vec<&str> = l.split(' ').collect();
        synced.insert((v[0].to_string(), v[1].to_string()), v[2].to_string());
    }

    // Everything mounted again (the dead mounts detached first); the guest boots again and
    // mounts each disk, which replays its journal.
    for d in daemons.iter_mut() {
        d.unmount();
    }
    drop(daemons);
    let mut daemons: Vec<Daemon> = tops
        .iter()
        .zip(&dirs)
        .map(|(t, d)| mount_foreground(t, d, &[]))
        .collect();
    let mut script = String::new();
    for (n, _, _) in DISKS {
        script += &format!(
            "mkdir -p /mnt/{n}; mount /dev/vd{n} /mnt/{n}\n\
             for f in /mnt/{n}/new/*; do echo \"HAS {n} $(basename $f) $(sha256sum < $f | cut -d' ' -f1)\"; done\n\
             umount /mnt/{n}\n"
        );
    }
    script += "dmesg | grep 'EXT4-fs (vd' | sed 's/^/DMESG /'\n";
    let second = boot(&s, &daemons, &script).finish();
    second.assert_ok();
    let dmesg = second.values("DMESG ").join("\n");
    for (n, _, _) in DISKS {
        assert!(
            dmesg.contains(&format!("(vd{n}): recovery complete")),
            "vd{n} was not recovered:\n{}",
            second.describe()
        );
    }
    for d in daemons.iter_mut() {
        assert_eq!(d.unmount(), Some(0), "{}", d.log());
    }

    for (i, (n, _, _)) in DISKS.iter().enumerate() {
        let top = &tops[i + 1];
        let what = |x: &str| format!("disk {n}: {x}\n{}\n{}", first.describe(), second.describe());
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(top)
            .output()
            .unwrap();
        // 0: clean; 3: leaked clusters only (allowed after a crash).
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "{}",
            what(&String::from_utf8_lossy(&check.stdout))
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
        let has: BTreeMap<String, String> = second
            .values(&format!("HAS {n} "))
            .iter()
            .filter_map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let mut count = 0;
        for ((disk, file), sum) in &synced {
            if disk != n {
                continue;
            }
            let deleted = file == "f2" || file == "f3";
            let got = ext4::read_file(&raw, &format!("/new/{file}"));
            match got {
                None if deleted => continue,
                None => panic!("{}", what(&format!("synced /new/{file} is missing"))),
                Some(bytes) => assert_eq!(
                    &ext4::sha256(&bytes),
                    sum,
                    "{}",
                    what(&format!("/new/{file}"))
                ),
            }
            assert_eq!(
                has.get(file),
                Some(sum),
                "{}",
                what(&format!("the guest's /new/{file}"))
            );
            count += 1;
        }
        assert!(count >= 1, "{}", what("no synced file to check"));
        std::fs::remove_file(&raw).unwrap();
    }
}
