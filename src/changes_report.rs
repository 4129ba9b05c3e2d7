//! `--changes OLD[..NEW]`: the extents where view NEW (the live disk by default) may differ
//! from view OLD, as `qemu-img map` records (text or JSON).

use crate::mount::{Exposed, Opened};
use vmfs_mount::changes::{Changes, ranges, records};
use vmfs_mount::error::{Error, Result};

/// The report for `spec` over the views of `opened`.
pub fn report(opened: &Opened, spec: &str, json: bool) -> Result<String> {
    let (old, new) = resolve(opened, spec)?;
    let changes = Changes::between(
        &old.spec.layers,
        old.spec.size,
        &new.spec.layers,
        new.spec.size,
    );
    let changed = changes.all()?;
    let recs = records::map_records(&new.spec.layers, &changed)?;
    Ok(if json {
        records::to_json(&recs)
    } else {
        format!(
            "{}{} bytes in {} extents may differ (of {} bytes)\n",
            records::to_text(&recs),
            ranges::total(&changed),
            changed.len(),
            changes.size()
        )
    })
}

/// `OLD` or `OLD..NEW`: views by their name under snapshots/; NEW defaults to the live disk.
/// A name that itself contains `..` is taken whole when a view has it.
fn resolve<'a>(opened: &'a Opened, spec: &str) -> Result<(&'a Exposed, &'a Exposed)> {
    let by_name = |name: &str| opened.snapshots.iter().find(|s| s.spec.name == name);
    if let Some(old) = by_name(spec) {
        return Ok((old, &opened.live));
    }
    let Some((old, new)) = spec.split_once("..") else {
        return Err(unknown(opened, spec));
    };
    let old = by_name(old).ok_or_else(|| unknown(opened, old))?;
    let new = match new {
        "" => &opened.live,
        n => by_name(n).ok_or_else(|| unknown(opened, n))?,
    };
    Ok((old, new))
}

fn unknown(opened: &Opened, name: &str) -> Error {
    let names: Vec<&str> = opened
        .snapshots
        .iter()
        .map(|s| s.spec.name.as_str())
        .collect();
    let known = if names.is_empty() {
        "this image has none".to_string()
    } else {
        format!("known: {}", names.join(", "))
    };
    Error::invalid(format!("--changes: no view named {name:?} ({known})"))
}
