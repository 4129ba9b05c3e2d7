//! Open-time validation and the names an image refers to (backing file, data file), with
//! QEMU's limits and checks (`qcow2_do_open`, `qcow2_validate_table`).

use super::entry::Geometry;
use super::header::{Extensions, Header};
use super::snapshot::{self, Snapshot};
use super::{MAX_BACKING_NAME, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use crate::backing_policy::Role;
use crate::error::{Error, Result};
use crate::format::{Format, OpenCtx, ParentRef};
use crate::paths::resolve_relative;
use crate::storage::HostFile;
use std::path::Path;
use std::sync::Arc;

/// Checks the refcount table, snapshot table and active L1 placement as QEMU does at open.
pub(super) fn check_tables(h: &Header, g: &Geometry, file: &HostFile) -> Result<()> {
    let path = file.path();
    let cs = g.cluster_size();
    if h.refcount_table_clusters == 0 {
        return Err(Error::corrupt(
            path,
            "refcount_table_clusters",
            56,
            "the image has no refcount table",
        ));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) << g.cluster_bits;
    check_table(
        path,
        "refcount table",
        h.refcount_table_offset,
        rt_bytes,
        MAX_REFTABLE_BYTES,
        cs,
    )?;
    if h.nb_snapshots > snapshot::MAX_SNAPSHOTS {
        return Err(Error::corrupt(
            path,
            "nb_snapshots",
            60,
            format!(
                "{} exceeds the limit of {}",
                h.nb_snapshots,
                snapshot::MAX_SNAPSHOTS
            ),
        ));
    }
    check_table(
        path,
        "snapshot table",
        h.snapshots_offset,
        u64::from(h.nb_snapshots) * 40,
        u64::MAX,
        cs,
    )?;
    check_l1_placement(file, g, h.l1_table_offset, h.l1_size, "L1 table")?;
    let needed = g.l1_entries_for(h.size);
    if u64::from(h.l1_size) < needed {
        return Err(Error::corrupt(
            path,
            "l1_size",
            36,
            format!(
                "{} entries cannot cover the virtual size {} (needs {needed})",
                h.l1_size, h.size
            ),
        ));
    }
    Ok(())
}

/// QEMU `qcow2_validate_table`: bounded size, no overflow, cluster-aligned offset.
fn check_table(path: &Path, field: &str, off: u64, bytes: u64, limit: u64, cs: u64) -> Result<()> {
    if bytes > limit {
        return Err(Error::corrupt(
            path,
            field,
            off,
            format!("size {bytes} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    if off
        .checked_add(bytes)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(Error::corrupt(
            path,
            field,
            off,
            format!("{bytes} bytes from here overflow"),
        ));
    }
    if off & (cs - 1) != 0 {
        return Err(Error::corrupt(
            path,
            field,
            off,
            "offset is not cluster-aligned",
        ));
    }
    Ok(())
}

/// An L1 table (active or snapshot) must be bounded, aligned and inside the file.
pub(super) fn check_l1_placement(
    file: &HostFile,
    g: &Geometry,
    off: u64,
    entries: u32,
    field: &str,
) -> Result<()> {
    let bytes = u64::from(entries) * 8;
    check_table(
        file.path(),
        field,
        off,
        bytes,
        MAX_L1_BYTES,
        g.cluster_size(),
    )?;
    // An empty table is never read, wherever it claims to be.
    if bytes == 0 {
        return Ok(());
    }
    file.check_range(field, off, bytes)
}

pub(super) fn load_l1(file: &HostFile, off: u64, entries: u32, field: &str) -> Result<Arc<[u64]>> {
    if entries == 0 {
        return Ok(Arc::from(Vec::new()));
    }
    let raw = file.read_table(off, u64::from(entries) * 8, MAX_L1_BYTES, field)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// QEMU treats `proto:...` (a colon before any slash) as a protocol, `json:{...}` included.
fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

pub(super) fn open_data_file(
    h: &Header,
    ext: &Extensions,
    file: &HostFile,
    ctx: &OpenCtx,
) -> Result<Option<Arc<HostFile>>> {
    let path = file.path();
    if !h.has_data_file() {
        if h.data_file_raw() {
            return Err(Error::corrupt(
                path,
                "autoclear_features",
                88,
                "data_file_raw (bit 1) is set without a data file",
            ));
        }
        return Ok(None);
    }
    let Some(name) = ext.data_file.as_deref().filter(|n| !n.is_empty()) else {
        return Err(Error::corrupt(
            path,
            "incompatible_features",
            72,
            "an external data file is required (bit 2) but the header names none",
        ));
    };
    if has_protocol(name) {
        return Err(Error::unsupported(
            path,
            format!("data file {name:?} uses a protocol prefix"),
        ));
    }
    let data_path = resolve_relative(path, name);
    let data = ctx
        .open_named(path, Role::DataFile, name, &data_path, file.writable())
        .map_err(|e| e.context(format!("external data file {name:?} of {}", path.display())))?;
    Ok(Some(data))
}

pub(super) fn backing_ref(h: &Header, ext: &Extensions, file: &HostFile) -> Result<ParentRef> {
    let path = file.path();
    if h.backing_file_offset == 0 {
        return Ok(ParentRef::None);
    }
    if h.data_file_raw() {
        return Err(Error::corrupt(
            path,
            "autoclear_features",
            88,
            "data_file_raw (bit 1) cannot be set with a backing file",
        ));
    }
    let len = u64::from(h.backing_file_size);
    let room = h.cluster_size() - h.backing_file_offset;
    if len > MAX_BACKING_NAME.min(room) {
        return Err(Error::corrupt(
            path,
            "backing_file_size",
            16,
            format!(
                "{len} bytes is too long (at most {} here)",
                MAX_BACKING_NAME.min(room)
            ),
        ));
    }
    let mut raw = vec![0u8; len as usize];
    file.read_exact_at(&mut raw, h.backing_file_offset, "backing file name")?;
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    if end == 0 {
        return Ok(ParentRef::None);
    }
    let Ok(name) = String::from_utf8(raw[..end].to_vec()) else {
        return Err(Error::unsupported(
            path,
            "a backing file name that is not UTF-8",
        ));
    };
    if has_protocol(&name) {
        return Err(Error::unsupported(
            path,
            format!("backing file {name:?} uses a protocol prefix"),
        ));
    }
    let format = match ext.backing_format.as_deref() {
        None | Some("") => None,
        Some(f) => Some(
            Format::parse(f)
                .map_err(|_| Error::unsupported(path, format!("backing file format {f:?}")))?,
        ),
    };
    Ok(ParentRef::Path {
        path: resolve_relative(path, &name),
        raw: name,
        format,
    })
}

pub(super) fn read_snapshots(h: &Header, file: &HostFile) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let off = h.snapshots_offset;
    if off >= file.len() {
        return Err(Error::corrupt(
            file.path(),
            "snapshot table",
            off,
            "starts past the end of the file",
        ));
    }
    let avail = file.len() - off;
    let span = avail.min(snapshot::MAX_TABLE_BYTES);
    let buf = file.read_table(off, span, snapshot::MAX_TABLE_BYTES, "snapshot table")?;
    snapshot::parse_table(&buf, off, h.nb_snapshots, span == avail, file.path())
}

#[cfg(test)]
mod tests {
    use super::has_protocol;

    #[test]
    fn protocol_prefixes_are_recognised_as_qemu_does() {
        assert!(has_protocol("json:{\"file\":{}}"));
        assert!(has_protocol("nbd://host/x"));
        assert!(has_protocol("file:/etc/passwd"));
        assert!(!has_protocol("base.qcow2"));
        assert!(!has_protocol("dir/a:b.qcow2"));
        assert!(!has_protocol("/abs/a:b"));
    }
}
