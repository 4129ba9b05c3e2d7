//! `--list`: the chain and the tree a mount would show, as text or JSON.

use crate::fs::changesdir::{BITMAP_PREFIX, CHANGES_DIR_NAME, RAW_SUFFIX};
use crate::fs::clonedir::CLONES_DIR_NAME;
use crate::mount::{Exposed, Opened};
use serde_json::{Map, Value, json};
use std::fmt::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use vmfs_mount::backing_policy::Decision;
use vmfs_mount::expose::{DISK_FILE_NAME, FileOptions};
use vmfs_mount::format::{Layer, ParentRef};
use vmfs_mount::partition::{Scheme, Table};
use vmfs_mount::plan::{Origin, sanitize};
use vmfs_mount::storage::registry;
use vmfs_mount::storage::show_path;

struct LayerRow {
    file: String,
    format: String,
    virtual_size: u64,
    backing: Option<(String, String)>,
    mtime: i64,
    details: Vec<(String, String)>,
    /// The policy's decision for each file of the layer that it checked.
    policy: Vec<Decision>,
}

struct ViewRow {
    path: String,
    name: String,
    kind: &'static str,
    size: u64,
    date: i64,
    writable: bool,
    /// The other files of the view's directory (partitions, wrappers), by path and size.
    files: Vec<(String, u64)>,
    /// Why files asked for are missing (a disk no VHD can hold).
    notes: Vec<String>,
    table: Table,
}

fn layer_row(layer: &dyn Layer, decisions: &[Decision]) -> LayerRow {
    let backing = match layer.parent() {
        ParentRef::None => None,
        ParentRef::Path { raw, path, .. } => Some((show_path(Path::new(&raw)), show_path(&path))),
        ParentRef::Search { dir, wanted, .. } => Some((wanted, show_path(&dir))),
    };
    let mtime = vmfs_mount::storage::location::modified(layer.path())
        .map(secs)
        .unwrap_or(0);
    LayerRow {
        file: show_path(layer.path()),
        format: layer.format().name().to_string(),
        virtual_size: layer.virtual_size(),
        backing,
        mtime,
        details: layer.details(),
        policy: layer_decisions(layer, decisions),
    }
}

/// The last decision about each file the layer reads (a file named on the command line that
/// is also a backing file shows how it was admitted as the backing file).
fn layer_decisions(layer: &dyn Layer, decisions: &[Decision]) -> Vec<Decision> {
    let mut out: Vec<Decision> = Vec::new();
    for f in layer.files() {
        let canon = f
            .path()
            .canonicalize()
            .unwrap_or_else(|_| f.path().to_path_buf());
        if let Some(d) = decisions.iter().rev().find(|d| d.path == canon)
            && !out.contains(d)
        {
            out.push(d.clone());
        }
    }
    out
}

fn decision_text(d: &Decision, main: bool) -> String {
    let verdict = if d.allowed { "allowed" } else { "refused" };
    if main {
        format!("{verdict}: {}", d.reason)
    } else {
        format!("{} {:?}: {verdict}: {}", d.role, d.stored, d.reason)
    }
}

fn view_row(e: &Exposed, live: bool, options: &FileOptions) -> ViewRow {
    let kind = match e.spec.origin {
        Origin::Live => "live",
        Origin::Layer { .. } => "layer",
        Origin::Snapshot { .. } => "snapshot",
    };
    let dir = if live {
        String::new()
    } else {
        format!("snapshots/{}/", e.spec.name)
    };
    let view_files = e.files(options, dir.trim_end_matches('/'));
    let files = view_files
        .current()
        .into_iter()
        .skip(1)
        .map(|f| (format!("{dir}{}", f.name), f.file.size()))
        .collect();
    ViewRow {
        path: format!("{dir}disk.raw"),
        files,
        notes: view_files.notes().to_vec(),
        table: view_files.table(),
        name: e.spec.name.clone(),
        kind,
        size: e.spec.size,
        date: secs(e.spec.mtime),
        writable: e.writable,
    }
}

fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn rows(opened: &Opened, options: &FileOptions) -> (Vec<LayerRow>, Vec<ViewRow>) {
    let layers = opened
        .layers
        .iter()
        .map(|l| layer_row(&**l, &opened.decisions))
        .collect();
    let mut views = vec![view_row(&opened.live, true, options)];
    views.extend(opened.snapshots.iter().map(|s| view_row(s, false, options)));
    views.extend(extra_rows(opened));
    (layers, views)
}

/// The files beside the views: changes/ (per view and per dirty bitmap) and clones/.
fn extra_rows(opened: &Opened) -> Vec<ViewRow> {
    let live = &opened.live;
    let row = |path: String, name: &str, kind, date, writable| ViewRow {
        path,
        name: name.to_string(),
        kind,
        size: live.spec.size,
        date,
        writable,
        files: Vec::new(),
        notes: Vec::new(),
        table: Table {
            scheme: Scheme::None,
            sector_size: 512,
            partitions: Vec::new(),
            notes: Vec::new(),
            watched: Vec::new(),
        },
    };
    let mut out = Vec::new();
    for s in &opened.snapshots {
        let path = format!("{CHANGES_DIR_NAME}/{}{RAW_SUFFIX}", s.spec.name);
        let date = secs(s.spec.mtime);
        out.push(row(path, &s.spec.name, "changes", date, false));
    }
    for (name, _) in &opened.bitmaps {
        let file = format!("{BITMAP_PREFIX}{}{RAW_SUFFIX}", sanitize(name));
        let path = format!("{CHANGES_DIR_NAME}/{file}");
        out.push(row(path, name, "bitmap", secs(live.spec.mtime), false));
    }
    if let Some(c) = &opened.clones {
        for name in &c.listed {
            let path = format!("{CLONES_DIR_NAME}/{name}/{DISK_FILE_NAME}");
            let date = std::fs::metadata(c.set.dir().path_of(name).unwrap_or_default())
                .and_then(|m| m.modified())
                .map(secs)
                .unwrap_or(0);
            out.push(row(path, name, "clone", date, true));
        }
    }
    out
}

/// "gpt, 512-byte sectors" and the like.
fn scheme_text(t: &Table) -> Option<String> {
    let what = match &t.scheme {
        Scheme::None => return None,
        Scheme::Mbr { disk_id } => format!("MBR (disk id {disk_id:08x})"),
        Scheme::Gpt {
            disk_guid,
            from_backup,
            hybrid,
        } => format!(
            "GPT {disk_guid}{}{}",
            if *from_backup {
                ", from the backup header"
            } else {
                ""
            },
            if *hybrid { ", hybrid MBR" } else { "" }
        ),
    };
    Some(format!("{what}, {}-byte sectors", t.sector_size))
}

pub fn text(image: &Path, opened: &Opened, options: &FileOptions) -> String {
    let (layers, views) = rows(opened, options);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Image {} ({} layer{}, top first):",
        show_path(image),
        layers.len(),
        plural(layers.len())
    );
    for (i, l) in layers.iter().enumerate() {
        let _ = writeln!(out, "  [{i}] {}", l.file);
        let _ = writeln!(out, "      format:        {}", l.format);
        let _ = writeln!(
            out,
            "      virtual size:  {} ({} bytes)",
            human(l.virtual_size),
            l.virtual_size
        );
        if let Some((raw, resolved)) = &l.backing {
            let _ = writeln!(out, "      backing file:  {raw} ({resolved})");
        }
        let _ = writeln!(out, "      modified:      {}", iso8601(l.mtime));
        for (k, v) in &l.details {
            let _ = writeln!(out, "      {:<14} {v}", format!("{k}:"));
        }
        for (j, d) in l.policy.iter().enumerate() {
            let _ = writeln!(out, "      policy:        {}", decision_text(d, j == 0));
        }
    }
    if let Some(e) = &opened.stopped {
        let _ = writeln!(out, "  [{}] not opened: {e}", layers.len());
        let _ = writeln!(out, "Not mountable: the chain is incomplete.");
        return out;
    }
    let files = views.iter().map(|v| 1 + v.files.len()).sum::<usize>();
    let _ = writeln!(out, "Mounted tree ({files} file{}):", plural(files));
    let width = views
        .iter()
        .flat_map(|v| std::iter::once(v.path.len()).chain(v.files.iter().map(|f| f.0.len())))
        .max()
        .unwrap_or(0);
    for v in &views {
        let access = if v.writable { "rw" } else { "ro" };
        let _ = writeln!(
            out,
            "  {:<width$}  {:>10}  {}  {access}  {}",
            v.path,
            human(v.size),
            iso8601(v.date),
            v.kind
        );
        if let Some(scheme) = scheme_text(&v.table) {
            let _ = writeln!(out, "    partition table: {scheme}");
        }
        for p in &v.table.partitions {
            let name = if p.name.is_empty() {
                String::new()
            } else {
                format!("  {:?}", p.name)
            };
            let _ = writeln!(
                out,
                "    {:<8} start {:>12}  size {:>10}  type {}{name}",
                p.file_name(),
                p.start,
                human(p.size),
                p.kind
            );
        }
        for note in &v.table.notes {
            let _ = writeln!(out, "    note: {note}");
        }
        for (path, size) in v.files.iter().filter(|f| !f.0.ends_with(".raw")) {
            let _ = writeln!(out, "  {path:<width$}  {:>10}", human(*size));
        }
        for note in &v.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    remote_text(&mut out);
    out
}

/// Remote objects of the chain: what is cached, and what this run read and fetched.
fn remote_text(out: &mut String) {
    let objects = registry::all_stats(true);
    if objects.is_empty() {
        return;
    }
    let cache = registry::cache_dir()
        .map(|d| format!("chunk cache {}", d.display()))
        .unwrap_or_else(|| "no chunk cache".into());
    let _ = writeln!(out, "Remote objects ({cache}):");
    for o in objects {
        let _ = writeln!(out, "  {}", o.url);
        let _ = writeln!(
            out,
            "      size:          {} ({} bytes), {}",
            human(o.size),
            o.size,
            o.validator
        );
        let _ = writeln!(
            out,
            "      cached:        {}",
            human(o.cached_bytes.unwrap_or(0))
        );
        let _ = writeln!(
            out,
            "      this run:      read {}: {} from the cache, {} fetched in {} GET{}",
            human(o.bytes_read),
            human(o.bytes_from_cache),
            human(o.bytes_fetched),
            o.gets,
            plural(o.gets as usize)
        );
    }
}

fn remote_json() -> Value {
    let objects: Vec<Value> = registry::all_stats(true)
        .into_iter()
        .map(|o| {
            json!({
                "url": o.url,
                "size": o.size,
                "validator": o.validator,
                "cached_bytes": o.cached_bytes,
                "bytes_read": o.bytes_read,
                "bytes_from_cache": o.bytes_from_cache,
                "bytes_fetched": o.bytes_fetched,
                "gets": o.gets,
            })
        })
        .collect();
    json!({
        "cache_dir": registry::cache_dir().map(|d| d.display().to_string()),
        "objects": objects,
    })
}

pub fn json(image: &Path, opened: &Opened, options: &FileOptions) -> String {
    let (layers, views) = rows(opened, options);
    let layers: Vec<Value> = layers
        .iter()
        .map(|l| {
            let (backing_file, backing_path) = match &l.backing {
                Some((raw, resolved)) => (json!(raw), json!(resolved)),
                None => (Value::Null, Value::Null),
            };
            let details: Map<String, Value> = l
                .details
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            let policy: Vec<Value> = l
                .policy
                .iter()
                .map(|d| {
                    json!({
                        "file": show_path(&d.path),
                        "role": d.role.name(),
                        "stored": d.stored,
                        "requested_by": show_path(&d.requester),
                        "allowed": d.allowed,
                        "reason": d.reason,
                    })
                })
                .collect();
            json!({
                "file": l.file,
                "format": l.format,
                "virtual_size": l.virtual_size,
                "backing_file": backing_file,
                "backing_path": backing_path,
                "mtime": l.mtime,
                "mtime_iso": iso8601(l.mtime),
                "details": details,
                "policy": policy,
            })
        })
        .collect();
    let views: Vec<Value> = views
        .iter()
        .map(|v| {
            json!({
                "path": v.path,
                "name": v.name,
                "kind": v.kind,
                "size": v.size,
                "date": v.date,
                "date_iso": iso8601(v.date),
                "writable": v.writable,
                "partition_table": table_json(&v.table),
                "files": v.files.iter().map(|(path, size)| json!({"path": path, "size": size})).collect::<Vec<_>>(),
                "notes": v.notes,
            })
        })
        .collect();
    let (stopped, views) = match &opened.stopped {
        Some(e) => (json!(e.to_string()), Vec::new()),
        None => (Value::Null, views),
    };
    let doc = json!({
        "image": show_path(image),
        "layers": layers,
        "views": views,
        "remote": remote_json(),
        "stopped": stopped,
    });
    format!("{doc}\n")
}

fn table_json(t: &Table) -> Value {
    let (scheme, id, from_backup, hybrid) = match &t.scheme {
        Scheme::None => ("none", Value::Null, false, false),
        Scheme::Mbr { disk_id } => ("mbr", json!(format!("{disk_id:08x}")), false, false),
        Scheme::Gpt {
            disk_guid,
            from_backup,
            hybrid,
        } => ("gpt", json!(disk_guid.to_string()), *from_backup, *hybrid),
    };
    let partitions: Vec<Value> = t
        .partitions
        .iter()
        .map(|p| {
            json!({
                "number": p.number,
                "file": p.file_name(),
                "start": p.start,
                "size": p.size,
                "type": p.kind.to_string(),
                "name": p.name,
                "guid": p.guid.map(|g| g.to_string()),
            })
        })
        .collect();
    json!({
        "scheme": scheme,
        "id": id,
        "sector_size": t.sector_size,
        "from_backup": from_backup,
        "hybrid": hybrid,
        "partitions": partitions,
        "notes": t.notes,
    })
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `1.5 GiB`-style sizes for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC, proleptic Gregorian).
pub fn iso8601(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
