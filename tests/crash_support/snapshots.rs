//! Crash states of live snapshot changes (issue 8): the chain of `workload`, mounted while
//! hostfs records; one guest thread writes, discards and fsyncs through disk.raw, and between
//! its operations takes (`mkdir snapshots/NAME`), renames (`mv`) and deletes (`rmdir`)
//! internal snapshots, the snapshot it found at mount included. The mount is the library's
//! `SnapshotSet` behind the tree, so these are the writer's snapshot operations as a user
//! makes them. A crash state must show the snapshot table before or after the operation in
//! flight (never a mix), and every snapshot in it must read as the disk did when it was taken.

use super::check::Bench;
use super::guest::{GuestLog, GuestOp, SECTOR, tagged_range};
use super::workload::{Aligned, BASE, Config, Run, SNAP, TOP, build_chain};
use crate::common::*;
use crate::hostfs::HostFs;
use crate::mount_support::*;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

/// A snapshot table as the guest knows it: snapshot name -> sector generations of its disk.
pub type Table = BTreeMap<String, Vec<u64>>;

/// One snapshot change, placed among the host events by marks taken around it.
#[derive(Clone, Debug)]
pub struct SnapChange {
    pub what: String,
    pub start: u64,
    pub end: u64,
    /// The table once it is done.
    pub after: Table,
}

/// A recorded run with snapshot changes.
pub struct SnapRun {
    pub run: Run,
    /// The table at mount.
    pub initial: Table,
    pub changes: Vec<SnapChange>,
}

impl SnapRun {
    /// The tables a crash at `tc` may leave: the one after every change that returned by
    /// then, or after any later one that had begun (changes run one at a time).
    pub fn allowed(&self, tc: u64) -> Vec<&Table> {
        let done = self.changes.iter().filter(|c| c.end <= tc).count();
        let begun = self.changes.iter().filter(|c| c.start <= tc).count();
        (done..=begun)
            .map(|i| match i {
                0 => &self.initial,
                i => &self.changes[i - 1].after,
            })
            .collect()
    }

    /// The (start, end) marks of every snapshot change.
    pub fn windows(&self) -> Vec<(u64, u64)> {
        self.changes.iter().map(|c| (c.start, c.end)).collect()
    }
}

/// Builds the chain, mounts it and records a single-threaded workload of `cfg.ops` guest
/// operations with a snapshot change after every `every` of them.
pub fn record_with_snapshots(
    s: &Scratch,
    fs: &HostFs,
    cfg: &Config,
    seed: u64,
    every: usize,
) -> SnapRun {
    let mut rng = Rng::new(seed);
    let (gens, snapshot) = build_chain(s, fs, cfg, &mut rng);
    let pre = std::fs::read(fs.backing_path(TOP)).unwrap();
    let base = std::fs::read(fs.backing_path(BASE)).unwrap();
    let mut log = GuestLog::new(gens);
    let initial: Table = [(SNAP.to_string(), snapshot.clone())].into();
    let mut table = initial.clone();
    let mut changes = Vec::new();
    // Taken and renamed snapshots, oldest first (the one found at mount is the oldest).
    let mut order = vec![SNAP.to_string()];

    fs.start_recording();
    let (guard, mnt) = mount(&fs.path(TOP), &s.0, &[]);
    let snaps = mnt.join("snapshots");
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(mnt.join("disk.raw"))
        .unwrap();
    for i in 0..cfg.ops {
        guest_step(cfg, &mut rng, &disk, fs, 10 + i as u64, &mut log);
        if i % every != every - 1 {
            continue;
        }
        let k = changes.len();
        let start = fs.mark();
        let what = match k % 4 {
            0 | 2 => {
                let name = format!("s{k}");
                std::fs::create_dir(snaps.join(&name)).unwrap();
                table.insert(name.clone(), log.last());
                order.push(name.clone());
                format!("mkdir {name}")
            }
            1 => {
                let (old, new) = (order.pop().unwrap(), format!("r{k}"));
                std::fs::rename(snaps.join(&old), snaps.join(&new)).unwrap();
                let gens = table.remove(&old).unwrap();
                table.insert(new.clone(), gens);
                order.push(new.clone());
                format!("mv {old} {new}")
            }
            _ => {
                let name = order.remove(0);
                std::fs::remove_dir(snaps.join(&name)).unwrap();
                table.remove(&name);
                format!("rmdir {name}")
            }
        };
        changes.push(SnapChange {
            what,
            start,
            end: fs.mark(),
            after: table.clone(),
        });
    }
    let start = fs.mark();
    disk.sync_all().unwrap();
    log.fsyncs.push((start, fs.mark()));
    drop(disk);
    unmount(&mnt);
    drop(guard);
    let events = fs.stop_recording();
    SnapRun {
        run: Run {
            pre,
            base,
            events,
            log,
            snapshot,
        },
        initial,
        changes,
    }
}

/// One guest operation anywhere on the disk: an fsync (1 in 10), a discard (1 in 10) or an
/// O_DIRECT write of generation `generation`.
fn guest_step(
    cfg: &Config,
    rng: &mut Rng,
    disk: &std::fs::File,
    fs: &HostFs,
    generation: u64,
    log: &mut GuestLog,
) {
    let r = rng.below(10);
    if r == 0 {
        let start = fs.mark();
        disk.sync_data().unwrap();
        log.fsyncs.push((start, fs.mark()));
        return;
    }
    let len = match rng.below(4) {
        0 => (1 + rng.below(8)) * SECTOR,
        _ => (1 + rng.below(16)) * 4096,
    };
    let unit = if len % 4096 == 0 { 4096 } else { SECTOR };
    let off = rng.below((cfg.size - len) / unit + 1) * unit;
    let start = fs.mark();
    let generation = if r == 1 {
        // SAFETY: fallocate on an open descriptor with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                disk.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        assert_eq!(rc, 0, "discard: {}", std::io::Error::last_os_error());
        0
    } else {
        let buf = Aligned::new(&tagged_range(off, len, generation));
        disk.write_all_at(buf.bytes(), off).unwrap();
        generation
    };
    log.push(GuestOp {
        off,
        len,
        generation,
        start,
        end: fs.mark(),
    });
}

/// The snapshot names `qemu-img snapshot -l` lists for `image`.
fn listed_names(image: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "qemu-img snapshot -l: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // "Snapshot list:", a header line, then "ID TAG VM-SIZE DATE ..." rows (empty: no list).
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect())
}

/// Problems of `state`, a crash at `tc` (empty: it passes): `qemu-img check` errors, guest
/// writes lost or misplaced, a table that is neither before nor after the change in flight,
/// a snapshot whose disk is not the disk at its creation.
pub fn check_state(bench: &Bench, state: &[u8], run: &SnapRun, tc: u64) -> Vec<String> {
    let image = bench.image();
    std::fs::write(&image, state).unwrap();
    if let Some(problem) = qemu_check(&image) {
        return vec![problem];
    }
    let mut bad = match bench.convert(&image, &[]) {
        Ok(disk) => run.run.log.check(&disk, tc),
        Err(e) => vec![e],
    };
    let mut names = match listed_names(&image) {
        Ok(n) => n,
        Err(e) => {
            bad.push(e);
            return bad;
        }
    };
    names.sort();
    let allowed = run.allowed(tc);
    let Some(table) = allowed.iter().find(|t| t.keys().eq(names.iter())).copied() else {
        let want: Vec<Vec<&String>> = allowed.iter().map(|t| t.keys().collect()).collect();
        bad.push(format!(
            "snapshot table: {names:?}, neither of the allowed tables {want:?}"
        ));
        return bad;
    };
    for (name, gens) in table {
        let opt = format!("snapshot.name={name}");
        match bench.convert(&image, &["-l", &opt]) {
            Ok(disk) => {
                for b in GuestLog::new(gens.clone()).check(&disk, 0) {
                    bad.push(format!("snapshot {name}: {b}"));
                }
            }
            Err(e) => bad.push(format!("snapshot {name}: {e}")),
        }
    }
    bad
}

/// `qemu-img check` of `image`: None when it finds no errors (leaks are allowed), else its
/// error lines, counted by kind ("OFLAG_COPIED data cluster", "refcount=0 reference=1", ...).
fn qemu_check(image: &Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // 0: clean, 3: leaked clusters only; 1: not checkable, 2: corruption.
    let code = out.status.code();
    if (code == Some(0) || code == Some(3)) && !text.contains("ERROR") {
        return None;
    }
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
    let mut kinds = BTreeMap::<String, usize>::new();
    for e in &errors {
        *kinds.entry(error_kind(e)).or_default() += 1;
    }
    Some(format!(
        "qemu-img check exit {code:?}: {kinds:?}; first: {}",
        if errors.is_empty() {
            text.lines().take(6).collect::<Vec<_>>().join(" | ")
        } else {
            errors
                .iter()
                .take(4)
                .copied()
                .collect::<Vec<_>>()
                .join(" | ")
        }
    ))
}

/// "ERROR OFLAG_COPIED data cluster: l2_entry=.. refcount=2" -> "OFLAG_COPIED data cluster
/// refcount=2"; "ERROR cluster 171 refcount=0 reference=1" -> "refcount=0 reference=1".
pub fn error_kind(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    if line.contains("OFLAG_COPIED") {
        let what = line
            .split(':')
            .next()
            .unwrap_or(line)
            .trim_start_matches("ERROR ");
        let rc = words
            .iter()
            .rfind(|w| w.starts_with("refcount="))
            .unwrap_or(&"");
        format!("{what} {rc}")
    } else if let [_, "cluster", _, rc, r] = words.as_slice() {
        format!("{rc} {r}")
    } else {
        line.split(':').next().unwrap_or(line).to_string()
    }
}
