//! Changed extents described as `qemu-img map --output=json` describes a disk: one record
//! per run that one layer of the new view holds in one state.

use crate::error::{Error, Kind, Result};
use crate::format::{Layer, Mapping};
use serde::Serialize;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// One record, with QEMU's field names and meanings: `depth` is the layer (0 = top) that
/// decides the bytes (the lowest one when none holds them), `present` whether one does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapRecord {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The host file holding the data (for the text output; QEMU's JSON has no such field).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// The records of `layers` (top first) covering `ranges` (sorted, inside the view).
pub fn map_records(layers: &[Arc<dyn Layer>], ranges: &[Range<u64>]) -> Result<Vec<MapRecord>> {
    let mut out: Vec<MapRecord> = Vec::new();
    for r in ranges {
        let mut pos = r.start;
        while pos < r.end {
            let rec = record_at(layers, pos, r.end)?;
            pos += rec.length;
            match out.last_mut() {
                Some(last) if continues(last, &rec) => last.length += rec.length,
                _ => out.push(rec),
            }
        }
    }
    Ok(out)
}

/// Whether `next` carries on `last` (adjacent, same layer and state, contiguous data).
fn continues(last: &MapRecord, next: &MapRecord) -> bool {
    let same = MapRecord {
        start: last.start + last.length,
        length: next.length,
        offset: last.offset.map(|o| o + last.length),
        ..last.clone()
    };
    same == *next
}

/// The record starting at `pos` (before `end`): walks the layers as a read does.
fn record_at(layers: &[Arc<dyn Layer>], pos: u64, end: u64) -> Result<MapRecord> {
    let mut len = end - pos;
    let mut rec = MapRecord {
        start: pos,
        length: 0,
        depth: layers.len().saturating_sub(1),
        present: false,
        zero: true,
        data: false,
        compressed: false,
        offset: None,
        file: None,
    };
    for (depth, layer) in layers.iter().enumerate() {
        // Past a layer's end it reads as zeros and hides the layers below.
        let vsize = layer.virtual_size();
        if pos >= vsize {
            rec.depth = depth;
            break;
        }
        len = len.min(vsize - pos);
        let e = layer.map(pos, len)?;
        if e.len == 0 || e.len > len {
            return Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: translation of {pos:#x} returned a bad length {}",
                    layer.path().display(),
                    e.len
                ),
            ));
        }
        len = e.len;
        let holds = |r: &mut MapRecord, zero, data, compressed| {
            r.depth = depth;
            r.present = true;
            r.zero = zero;
            r.data = data;
            r.compressed = compressed;
        };
        match e.map {
            Mapping::Unallocated => continue,
            Mapping::Zero => holds(&mut rec, true, false, false),
            Mapping::Data { file, host_off } => {
                holds(&mut rec, false, true, false);
                rec.offset = Some(host_off);
                rec.file = Some(file.path().to_path_buf());
            }
            Mapping::Compressed { file, .. } => {
                holds(&mut rec, false, true, true);
                rec.file = Some(file.path().to_path_buf());
            }
        }
        break;
    }
    rec.length = len;
    Ok(rec)
}

/// The records as `qemu-img map --output=json` prints them: one object per line.
pub fn to_json(records: &[MapRecord]) -> String {
    let lines: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
        .collect();
    format!("[{}]\n", lines.join(",\n"))
}

/// A human-readable table: offset, length and what the new view holds there.
pub fn to_text(records: &[MapRecord]) -> String {
    let mut out = format!("{:<20}{:<20}{}\n", "Offset", "Length", "New contents");
    for r in records {
        let what = match (&r.file, r.offset) {
            (Some(f), Some(o)) => format!("data at {o:#x} in {}", f.display()),
            (Some(f), None) => format!("compressed data in {}", f.display()),
            _ if r.present => format!("zeros (layer {})", r.depth),
            _ => "zeros (nothing below)".to_string(),
        };
        out.push_str(&format!(
            "{:<20}{:<20}{what}\n",
            format!("{:#x}", r.start),
            format!("{:#x}", r.length)
        ));
    }
    out
}
