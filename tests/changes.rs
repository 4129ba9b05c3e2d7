//! Changed blocks between views, checked against QEMU's bytes: every byte where two views'
//! `qemu-img convert` outputs differ must be reported (no false negatives), and what is
//! reported must lie inside the (sub)clusters written between the two views.

mod common;
mod qcow2_support;

use common::*;
use qcow2_support::*;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::changes::{Changes, ranges};
use vmfs_mount::format::{Layer, OpenCtx};
use vmfs_mount::plan::{self, Origin, ViewSpec};
use vmfs_mount::view::View;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// A chain built in phases: 0 writes the base, 1 the middle layer, 2 the top before
/// snapshot s1, 3 the top between s1 and s2, 4 the top after s2 (and 5 the live top through
/// the library's writer). Each view holds the phases up to its own.
struct Built {
    top: std::path::PathBuf,
    /// Ranges each phase wrote, rounded out to the cluster size of the layer written.
    touched: Vec<Vec<Range<u64>>>,
}

fn phase_of(name: &str) -> usize {
    match name {
        "base" => 0,
        "mid" => 1,
        "s1" => 2,
        "s2" => 3,
        "" => 4,
        other => panic!("unexpected view {other}"),
    }
}

fn round_out(r: Range<u64>, cs: u64) -> Range<u64> {
    r.start / cs * cs..r.end.div_ceil(cs) * cs
}

/// Random ops of every kind qemu-io has: compressed clusters first (qemu-io writes those
/// only where the layer holds nothing yet: never into `avoid`), then data and zeros.
fn mixed_ops(rng: &mut Rng, size: u64, cs: u64, count: usize, avoid: &[Range<u64>]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut taken: Vec<Range<u64>> = avoid.to_vec();
    for _ in 0..count / 4 {
        let c = rng.below(size / cs - 1) * cs;
        let r = c..c + cs;
        if taken.iter().all(|t| t.end <= r.start || r.end <= t.start) {
            taken.push(r);
            ops.push(Op::Compressed(c, cs));
        }
    }
    ops.extend(random_ops(rng, size, count, 150 * KIB));
    for _ in 0..count / 4 {
        let len = 1 + rng.below(200 * KIB);
        let off = rng.below(size - len);
        ops.push(if rng.below(2) == 0 {
            Op::Zero(off, len)
        } else {
            Op::ZeroUnmap(off / 512 * 512, len.div_ceil(512) * 512)
        });
    }
    ops
}

fn touched_by(ops: &[Op], cs: u64) -> Vec<Range<u64>> {
    let rs = ops
        .iter()
        .map(|op| match *op {
            Op::Data(o, l) | Op::Compressed(o, l) | Op::Zero(o, l) | Op::ZeroUnmap(o, l) => {
                round_out(o..o + l, cs)
            }
        })
        .collect();
    ranges::union(rs)
}

/// `top_cs` is the top's cluster size: changes are exact to a cluster (a cluster copied on
/// write moves, so all of it counts, even with subclusters).
fn build(d: &Scratch, seed: u64, top_opts: &str, top_cs: u64, raw_base: bool) -> Built {
    let size = 8 * MIB;
    let mut rng = Rng::new(seed);
    let mut touched = Vec::new();
    let base = if raw_base {
        let p = d.path("base.img");
        std::fs::write(&p, rng.bytes(size as usize)).unwrap();
        touched.push(std::iter::once(0..size).collect());
        p
    } else {
        let p = d.path("base.qcow2");
        create(&p, "", size);
        let ops = mixed_ops(&mut rng, size, 64 * KIB, 30, &[]);
        apply("qcow2", &p, &mut rng, &ops);
        touched.push(touched_by(&ops, 64 * KIB));
        p
    };
    let bfmt = if raw_base { "raw" } else { "qcow2" };
    let mid = d.path("mid.qcow2");
    overlay(&mid, base.to_str().unwrap(), bfmt, None, "cluster_size=32k");
    let ops = mixed_ops(&mut rng, size, 32 * KIB, 30, &[]);
    apply("qcow2", &mid, &mut rng, &ops);
    touched.push(touched_by(&ops, 32 * KIB));
    let top = d.path("top.qcow2");
    overlay(&top, "mid.qcow2", "qcow2", None, top_opts);
    let mut in_top: Vec<Range<u64>> = Vec::new();
    for tag in ["s1", "s2", ""] {
        let ops = mixed_ops(&mut rng, size, top_cs, 40, &in_top);
        in_top.extend(touched_by(&ops, top_cs));
        apply("qcow2", &top, &mut rng, &ops);
        touched.push(touched_by(&ops, top_cs));
        if !tag.is_empty() {
            qemu_img(&["snapshot", "-c", tag, top.to_str().unwrap()]);
        }
    }
    Built { top, touched }
}

/// QEMU's bytes of every view, by name ("" is the live view).
fn oracles(b: &Built, specs: &[ViewSpec], layers: &[Arc<dyn Layer>]) -> BTreeMap<String, Vec<u8>> {
    specs
        .iter()
        .map(|s| {
            let bytes = match s.origin {
                Origin::Live => oracle(&b.top, &[]),
                Origin::Layer { index } => oracle(layers[index].path(), &[]),
                Origin::Snapshot { .. } => snapshot_oracle(&b.top, &s.name, s.size),
            };
            (s.name.clone(), bytes)
        })
        .collect()
}

/// Asserts that `changed` covers every byte where `old` and `new` differ (and everything
/// past the old view's end): the bytes between the reported ranges must be equal.
fn assert_covers(what: &str, changed: &[Range<u64>], old: &[u8], new: &[u8]) {
    let mut pos = 0usize;
    let bounds = changed.iter().map(|r| (r.start as usize, r.end as usize));
    for (start, end) in bounds.chain([(new.len(), new.len())]) {
        let unchanged = pos..start;
        if !unchanged.is_empty() && old.get(unchanged.clone()) != Some(&new[unchanged.clone()]) {
            let at = (pos..start)
                .find(|&i| old.get(i) != Some(&new[i]))
                .unwrap_or(pos);
            panic!("{what}: byte {at:#x} differs but is not reported");
        }
        pos = end;
    }
}

/// Asserts that `changed` lies inside `allowed` (both sorted and merged).
fn assert_within(what: &str, changed: &[Range<u64>], allowed: &[Range<u64>]) {
    for r in changed {
        assert!(
            allowed.iter().any(|a| a.start <= r.start && r.end <= a.end),
            "{what}: {r:x?} reported, but nothing was written there between the views"
        );
    }
}

/// Every ordered pair of views of `b`: reported changes against QEMU's bytes.
fn check_pairs(b: &Built) -> usize {
    let layers = vmfs_mount::chain::open_chain(&b.top, None, &ctx()).unwrap();
    let (live, snaps) = plan::plan(&layers).unwrap();
    let mut specs = vec![live];
    specs.extend(snaps);
    let bytes = oracles(b, &specs, &layers);
    let mut pairs = 0;
    for old in &specs {
        for new in &specs {
            let what = format!("{:?} -> {:?}", old.name, new.name);
            let ch = Changes::between(&old.layers, old.size, &new.layers, new.size);
            let changed = ch.all().unwrap();
            assert_covers(&what, &changed, &bytes[&old.name], &bytes[&new.name]);
            let (a, z) = (phase_of(&old.name), phase_of(&new.name));
            let between = (a.min(z) + 1..=a.max(z))
                .flat_map(|p| b.touched[p].clone())
                .collect();
            assert_within(&what, &changed, &ranges::union(between));
            if old.name == new.name {
                assert!(changed.is_empty(), "{what}: {changed:x?}");
            }
            // Seeks agree with the list.
            let first = changed.first().map(|r| r.start);
            assert_eq!(ch.next_changed(0).unwrap(), first, "{what}");
            if let Some(r) = changed.first() {
                assert_eq!(ch.next_unchanged(r.start).unwrap(), r.end, "{what}");
            }
            pairs += 1;
        }
    }
    pairs
}

#[test]
fn layers_and_snapshots_64k() {
    let d = Scratch::new("changes-64k");
    let b = build(&d, 11, "", 64 * KIB, false);
    assert_eq!(check_pairs(&b), 25);
}

#[test]
fn extended_l2_subclusters() {
    let d = Scratch::new("changes-extl2");
    let b = build(&d, 12, "extended_l2=on,cluster_size=64k", 64 * KIB, false);
    assert_eq!(check_pairs(&b), 25);
}

#[test]
fn small_clusters_over_a_raw_base() {
    // 4 KiB clusters: one L2 table spans 2 MiB, so the disk crosses several L1 entries.
    let d = Scratch::new("changes-4k");
    let b = build(&d, 13, "cluster_size=4k", 4 * KIB, true);
    assert_eq!(check_pairs(&b), 25);
}

#[test]
fn live_writes_through_the_writer_count() {
    let d = Scratch::new("changes-live");
    let b = build(&d, 14, "", 64 * KIB, false);
    let size = 8 * MIB;
    let ctx = OpenCtx::new(Arc::new(ByteCache::new(16 << 20)), true);
    let layers = vmfs_mount::chain::open_chain(&b.top, None, &ctx).unwrap();
    let (live, snaps) = plan::plan(&layers).unwrap();
    let s2 = snaps.iter().find(|s| s.name == "s2").unwrap();
    let view = View::new(
        live.layers.clone(),
        live.size,
        Arc::new(ByteCache::new(8 << 20)),
        64,
    );
    let mut rng = Rng::new(99);
    let mut written = Vec::new();
    for i in 0..40 {
        let len = 1 + rng.below(100 * KIB);
        let off = rng.below(size - len);
        if i % 5 == 4 {
            view.discard(off, len).unwrap();
        } else {
            view.write(off, &rng.bytes(len as usize)).unwrap();
        }
        written.push(round_out(off..off + len, 64 * KIB));
    }
    view.flush().unwrap();
    // Computed while the writer owns the image: its current tables count.
    let changed = Changes::between(&s2.layers, s2.size, &live.layers, live.size)
        .all()
        .unwrap();
    drop((view, live, snaps, layers));
    let old = snapshot_oracle(&b.top, "s2", size);
    let new = oracle(&b.top, &[]);
    assert_covers("s2 -> live (written)", &changed, &old, &new);
    let mut allowed = b.touched[4].clone();
    allowed.extend(written);
    assert_within("s2 -> live (written)", &changed, &ranges::union(allowed));
    assert!(!changed.is_empty());
}

#[test]
fn a_resized_top_reports_its_new_tail() {
    let d = Scratch::new("changes-resize");
    let b = build(&d, 15, "", 64 * KIB, false);
    qemu_img(&["resize", "-q", b.top.to_str().unwrap(), "+1M"]);
    let layers = vmfs_mount::chain::open_chain(&b.top, None, &ctx()).unwrap();
    let (live, snaps) = plan::plan(&layers).unwrap();
    let mut specs = vec![live];
    specs.extend(snaps);
    let bytes = oracles(&b, &specs, &layers);
    for old in &specs[1..] {
        let new = &specs[0];
        let changed = Changes::between(&old.layers, old.size, &new.layers, new.size)
            .all()
            .unwrap();
        let what = format!("{} -> live", old.name);
        assert_covers(&what, &changed, &bytes[&old.name], &bytes[""]);
        // The grown part is past the end of every older view.
        let tail = 8 * MIB..9 * MIB;
        assert!(
            changed
                .iter()
                .any(|r| r.start <= tail.start && tail.end <= r.end),
            "{what}: {changed:x?}"
        );
    }
}

/// `--changes` through the binary: JSON records in `qemu-img map` shape that cover exactly
/// the library's ranges, with the same depth and host offsets as `qemu-img map` reports.
#[test]
fn cli_prints_qemu_img_map_records() {
    let d = Scratch::new("changes-cli");
    let b = build(&d, 16, "", 64 * KIB, false);
    let bin = env!("CARGO_BIN_EXE_vmfs-mount");
    let out = run(
        bin,
        &["--changes", "mid", "--json", b.top.to_str().unwrap()],
    );
    let recs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let layers = vmfs_mount::chain::open_chain(&b.top, None, &ctx()).unwrap();
    let (live, snaps) = plan::plan(&layers).unwrap();
    let mid = snaps.iter().find(|s| s.name == "mid").unwrap();
    let want = Changes::between(&mid.layers, mid.size, &live.layers, live.size)
        .all()
        .unwrap();
    let got = ranges::union(
        recs.iter()
            .map(|r| {
                let s = r["start"].as_u64().unwrap();
                s..s + r["length"].as_u64().unwrap()
            })
            .collect(),
    );
    assert_eq!(got, want);
    let qemu: Vec<serde_json::Value> = serde_json::from_str(&qemu_img(&[
        "map",
        "--output=json",
        b.top.to_str().unwrap(),
    ]))
    .unwrap();
    for r in &recs {
        let start = r["start"].as_u64().unwrap();
        let q = qemu
            .iter()
            .find(|q| {
                let s = q["start"].as_u64().unwrap();
                s <= start && start < s + q["length"].as_u64().unwrap()
            })
            .unwrap();
        for key in ["depth", "present", "zero", "data", "compressed"] {
            assert_eq!(r[key], q[key], "{key} at {start:#x}: {r} vs {q}");
        }
        if let Some(off) = q["offset"].as_u64().filter(|_| q["data"] == true) {
            let delta = start - q["start"].as_u64().unwrap();
            assert_eq!(r["offset"].as_u64(), Some(off + delta), "at {start:#x}");
        }
    }
    let text = run(bin, &["--changes", "s1..s2", b.top.to_str().unwrap()]);
    assert!(text.contains("may differ"), "{text}");
    let e = std::process::Command::new(bin)
        .args(["--changes", "nope", b.top.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("no view named \"nope\""),
        "{err}"
    );
}
