//! Crash safety: a child process (this test binary, re-executed) writes and flushes through
//! the library and reports each acknowledged flush; the parent kills it with SIGKILL at an
//! arbitrary point, then `qemu-img check` must find no corruption (leaks are allowed) and
//! every write acknowledged by a flush must read back.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "VMFS_CRASH_CHILD";
const SIZE: u64 = 1 << 20;
const CS: u64 = 4096;
const MAX_OPS: u64 = 20_000;

enum Op {
    Write(u64, Vec<u8>),
    Discard(u64, u64),
}

/// The deterministic workload of round `seed`: (op, flush after it?).
fn next_op(rng: &mut Rng) -> (Op, bool) {
    let mut off = rng.below(SIZE);
    if rng.below(2) == 0 {
        off = off / CS * CS;
    }
    let len = (1 + rng.below(3 * CS)).min(SIZE - off);
    let op = if rng.below(6) == 0 {
        Op::Discard(off, len)
    } else {
        Op::Write(off, rng.bytes(len as usize))
    };
    (op, rng.below(5) == 0)
}

/// The child: runs the workload until killed, printing "S i" before op i and "F i" once a
/// flush after op i returned.
#[test]
fn crash_child() {
    let Ok(image) = std::env::var(CHILD_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("VMFS_CRASH_SEED").unwrap().parse().unwrap();
    let view = open_rw(Path::new(&image));
    let mut rng = Rng::new(seed);
    let mut out = std::io::stdout().lock();
    for i in 0..MAX_OPS {
        let (op, flush) = next_op(&mut rng);
        writeln!(out, "S {i}").unwrap();
        out.flush().unwrap();
        match op {
            Op::Write(off, data) => view.write(off, &data).unwrap(),
            Op::Discard(off, len) => view.discard(off, len).unwrap(),
        }
        if flush {
            view.flush().unwrap();
            writeln!(out, "F {i}").unwrap();
            out.flush().unwrap();
        }
    }
}

fn qemu_check_no_corruption(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // Exit status 0: clean; 3: leaked clusters only. 2 would be corruption.
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check after crash: {text}"
    );
    assert!(
        !text.contains("ERROR"),
        "qemu-img check after crash: {text}"
    );
}

/// One crash round; returns whether the refcount table moved (grew) during it.
fn round(s: &Scratch, r: u64, opts: &str) -> bool {
    let mut rng = Rng::new(1000 + r);
    let base = s.path("base.raw");
    let top = s.path(&format!("top{r}.qcow2"));
    std::fs::write(&base, rng.bytes(SIZE as usize)).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    // Tiny clusters: prefill the whole disk so copy-on-write soon outgrows the refcount table.
    let tiny = opts.contains("cluster_size=512");
    let with_snapshot = r % 2 == 1 || tiny;
    if tiny {
        // Fill the file to just below what one refcount table cluster covers (2 MiB).
        write_random("qcow2", &top, &mut rng, 0, SIZE as usize);
        qemu_img(&["snapshot", "-c", "s0", top.to_str().unwrap()]);
        write_random("qcow2", &top, &mut rng, 0, (SIZE * 7 / 8) as usize);
    }
    if with_snapshot {
        write_random("qcow2", &top, &mut rng, 0, 64 * 1024);
        qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
    }
    let start = qemu_raw(&top, Some("qcow2"), &[]);
    let snap_before =
        with_snapshot.then(|| qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]));
    let reftable_before = std::fs::read(&top).unwrap()[48..60].to_vec();

    let seed = 5000 + r;
    let kill_after_flushes = 1 + rng.below(30);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &top)
        .env("VMFS_CRASH_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut flushed, mut started, mut seen_flushes) = (None::<u64>, None::<u64>, 0);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(i) = line.strip_prefix("S ") {
            started = Some(i.parse().unwrap());
        } else if let Some(i) = line.strip_prefix("F ") {
            flushed = Some(i.parse().unwrap());
            seen_flushes += 1;
            if seen_flushes == kill_after_flushes {
                // SIGKILL while the child is already busy with the next ops.
                child.kill().unwrap();
                break;
            }
        }
    }
    // Whatever the child printed before dying is still in the pipe.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(i) = line.strip_prefix("S ") {
            started = Some(i.parse().unwrap());
        } else if let Some(i) = line.strip_prefix("F ") {
            flushed = Some(i.parse().unwrap());
        }
    }
    child.wait().unwrap();

    qemu_check_no_corruption(&top);
    // Replay: the model after the last acknowledged flush, and which bytes later ops may
    // have changed (those may hold either value).
    let mut model = start;
    let mut unsure = vec![false; SIZE as usize];
    let mut rng = Rng::new(seed);
    for i in 0..=started.unwrap_or(0) {
        let (op, _) = next_op(&mut rng);
        let durable = flushed.is_some_and(|f| i <= f);
        let (off, len) = match &op {
            Op::Write(o, d) => (*o as usize, d.len()),
            Op::Discard(o, l) => (*o as usize, *l as usize),
        };
        if durable {
            match op {
                Op::Write(_, d) => model[off..off + len].copy_from_slice(&d),
                Op::Discard(..) => model[off..off + len].fill(0),
            }
        } else {
            unsure[off..off + len].fill(true);
        }
    }
    let got = qemu_raw(&top, Some("qcow2"), &[]);
    let lost = got
        .iter()
        .zip(&model)
        .zip(&unsure)
        .position(|((g, m), u)| !u && g != m);
    if let Some(i) = lost {
        panic!(
            "round {r}: flushed data lost at {i:#x} (flushed up to op {flushed:?}, started {started:?})"
        );
    }
    if let Some(before) = snap_before {
        assert_same(
            "snapshot after crash",
            &qemu_raw(&top, Some("qcow2"), &["-l", "snapshot.name=s1"]),
            &before,
        );
    }
    let moved = std::fs::read(&top).unwrap()[48..60] != reftable_before[..];
    std::fs::remove_file(&top).unwrap();
    moved
}

#[test]
fn kill_9_at_random_moments_never_corrupts() {
    let s = Scratch::new("crash");
    let mut grown = 0;
    for r in 0..20 {
        let opts = match r % 5 {
            0 => "cluster_size=4096",
            1 => "cluster_size=4096,refcount_bits=8",
            2 => "cluster_size=16384,extended_l2=on",
            3 => "cluster_size=4096,compat=0.10",
            _ => "cluster_size=512,refcount_bits=64",
        };
        grown += u32::from(round(&s, r, opts));
    }
    assert!(grown > 0, "no round grew the refcount table");
}
