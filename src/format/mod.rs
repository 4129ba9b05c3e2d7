//! Format drivers. Each one answers, for its own layer only, "where do guest bytes
//! [off, off+len) live?" with plain data (`Extent`). Drivers do no FUSE work and hold no
//! lock across I/O; the chain walk and the data reads live in `view.rs`.
//!
//! Every folder has the same roles: `header.rs` (on-disk structures), table decoding, and
//! a translator implementing `Layer`.

pub mod compress;
pub mod magic;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod raw_write;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use crate::backing_policy::{BackingPolicy, Role};
use crate::cache::ByteCache;
use crate::error::{Error, Result};
use crate::storage::HostFile;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Qcow2,
    Raw,
    Vmdk,
    Vpc,
    Vhdx,
    Vdi,
}

impl Format {
    /// QEMU's name for the format (what `-f`/`backing_fmt` use).
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
        }
    }

    pub fn parse(s: &str) -> Result<Format> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "qcow2" => Format::Qcow2,
            "raw" => Format::Raw,
            "vmdk" => Format::Vmdk,
            "vpc" | "vhd" => Format::Vpc,
            "vhdx" => Format::Vhdx,
            "vdi" => Format::Vdi,
            other => {
                return Err(Error::invalid(format!(
                    "unknown format {other:?} (known: qcow2, raw, vmdk, vpc, vhdx, vdi)"
                )));
            }
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a compressed cluster/grain is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate without a zlib header (qcow2 "zlib").
    Deflate,
    /// zlib-wrapped deflate (VMDK streamOptimized grains).
    Zlib,
    Zstd,
}

/// Where one run of guest bytes lives in one layer.
#[derive(Clone, Debug)]
pub enum Mapping {
    /// Stored uncompressed in `file` at `host_off`.
    Data { file: Arc<HostFile>, host_off: u64 },
    /// Reads as zeros; lower layers are not consulted.
    Zero,
    /// Inside a compressed cluster: decompress `stored_len` bytes at `host_off` into a
    /// `cluster_len`-byte cluster, then skip `skip` bytes into it.
    Compressed {
        file: Arc<HostFile>,
        host_off: u64,
        stored_len: u64,
        codec: Codec,
        cluster_len: u64,
        skip: u64,
    },
    /// This layer holds nothing here: ask the layer below (zeros if there is none).
    Unallocated,
}

impl Mapping {
    /// Whether `next` carries on where `self` ends after `len` bytes, so the two extents can
    /// be merged: both zeros, both unallocated, or the same host file with no gap.
    pub fn continues(&self, len: u64, next: &Mapping) -> bool {
        match (self, next) {
            (Mapping::Zero, Mapping::Zero) | (Mapping::Unallocated, Mapping::Unallocated) => true,
            (
                Mapping::Data {
                    file: f1,
                    host_off: h1,
                },
                Mapping::Data {
                    file: f2,
                    host_off: h2,
                },
            ) => f1.id() == f2.id() && h1.checked_add(len) == Some(*h2),
            _ => false,
        }
    }
}

/// Most table entries (clusters, blocks) one `map` call walks after the first: a longer run
/// is answered in pieces (a shorter extent is always a valid answer), so one call costs
/// bounded work whatever the image says. Runs of empty entries of a table held in memory
/// (qcow2 L1, VMDK grain directory, VDI block map) are skipped whole and do not count.
pub const MAX_ENTRIES_PER_MAP: u32 = 4096;

/// `map` answers with the mapping of [off, off+len) for some 1 <= len <= the asked length.
#[derive(Clone, Debug)]
pub struct Extent {
    pub len: u64,
    pub map: Mapping,
}

/// How a layer names its parent. The chain opener resolves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentRef {
    None,
    /// A path as stored in the image (`raw`), already resolved against the layer's directory
    /// (`path`), and the format the image declares for it, if any.
    Path {
        raw: String,
        path: PathBuf,
        format: Option<Format>,
    },
    /// Only an identity is stored (VDI): look for a file in `dir` whose `identity()` matches
    /// what `verify_parent` wants. `hints` are tried first.
    Search {
        dir: PathBuf,
        hints: Vec<PathBuf>,
        wanted: String,
    },
}

/// What a child may check about its parent (VMDK CID, VHD/VHDX/VDI UUIDs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub uuid: Option<[u8; 16]>,
    pub modify_uuid: Option<[u8; 16]>,
    pub cid: Option<u32>,
}

/// A qcow2 internal snapshot (or any format's equivalent).
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    /// Index into the layer's snapshot table, passed back to `open_snapshot`.
    pub index: usize,
    pub id: String,
    pub name: String,
    pub virtual_size: u64,
    /// Seconds and nanoseconds since the epoch.
    pub date: (u64, u32),
}

/// One layer of a chain: a format driver instance, or one internal snapshot of it.
pub trait Layer: std::any::Any + Send + Sync + fmt::Debug {
    fn format(&self) -> Format;
    /// The file the user would name for this layer (the descriptor for VMDK).
    fn path(&self) -> &Path;
    fn virtual_size(&self) -> u64;
    /// Maps guest [off, off+len): called with len >= 1 and off + len <= virtual_size().
    fn map(&self, off: u64, len: u64) -> Result<Extent>;

    fn parent(&self) -> ParentRef {
        ParentRef::None
    }
    /// Checks that `parent` is the image this child was made against (UUID, CID).
    fn verify_parent(&self, _parent: &dyn Layer) -> Result<()> {
        Ok(())
    }
    fn identity(&self) -> Identity {
        Identity::default()
    }
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }
    /// A read-only layer showing internal snapshot `index` (same parent as this layer).
    fn open_snapshot(&self, index: usize) -> Result<Arc<dyn Layer>> {
        Err(Error::unsupported(self.path(), format!("snapshot {index}")))
    }
    /// The VM state saved with this snapshot layer (qcow2 `savevm`) as a layer of its own,
    /// if it saved one; an error when the image describes a state that cannot be read.
    fn vm_state(&self) -> Option<Result<Arc<dyn Layer>>> {
        None
    }
    /// Every host file this layer reads (for locking and fsync).
    fn files(&self) -> Vec<Arc<HostFile>>;
    /// Extra facts for `--list` (cluster size, subformat, ...).
    fn details(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// A name for this layer's snapshot directory from the hypervisor's own snapshot list
    /// (VMware .vmsd), if one names it.
    fn display_name(&self) -> Option<String> {
        None
    }
    /// The logical sector size the image declares for its disk (VHDX), if it declares one:
    /// partition tables are read in these sectors.
    fn logical_sector_size(&self) -> Option<u32> {
        None
    }
    /// In-place writing, for the top layer only.
    fn writer(&self) -> Option<&dyn crate::write::LayerWriter> {
        None
    }
    /// When `older` is another table of the same file (an internal snapshot of it, or the
    /// live image), the guest ranges inside [off, end) where the two may map differently,
    /// found from their tables alone; `None` when the two do not share a file this way.
    /// Both must sit on the same layers below.
    fn changed_since(
        &self,
        _older: &dyn Layer,
        _off: u64,
        _end: u64,
    ) -> Option<Result<Vec<Range<u64>>>> {
        None
    }
}

/// Everything a driver needs when opening a layer.
#[derive(Clone)]
pub struct OpenCtx {
    /// Decoded tables, shared by every layer and snapshot.
    pub tables: Arc<ByteCache>,
    /// Open the top file for writing (lower layers never are).
    pub writable: bool,
    /// Which files an image may name (extents, data files, parents).
    pub policy: BackingPolicy,
}

impl OpenCtx {
    /// A context with the default backing-file policy.
    pub fn new(tables: Arc<ByteCache>, writable: bool) -> OpenCtx {
        OpenCtx {
            tables,
            writable,
            policy: BackingPolicy::new(),
        }
    }

    /// The same context with another policy.
    pub fn with_policy(mut self, policy: BackingPolicy) -> OpenCtx {
        self.policy = policy;
        self
    }

    /// Opens a file the image at `requester` names, if the policy allows it.
    pub fn open_named(
        &self,
        requester: &Path,
        role: Role,
        stored: &str,
        path: &Path,
        writable: bool,
    ) -> Result<Arc<HostFile>> {
        self.policy.open(requester, role, stored, path, writable)
    }
}

/// Opens one layer of `format` from `path`.
pub fn open_layer(path: &Path, format: Format, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
    match format {
        Format::Raw => raw::RawLayer::open(path, ctx),
        Format::Vdi => vdi::VdiLayer::open(path, ctx),
        Format::Vmdk => vmdk::VmdkLayer::open(path, ctx),
        Format::Vpc => vhd::VhdLayer::open(path, ctx),
        Format::Qcow2 => qcow2::Qcow2Layer::open(path, ctx),
        Format::Vhdx => vhdx::VhdxLayer::open(path, ctx),
    }
}

/// Opens `path`, detecting its format by content unless `forced`.
pub fn open_detect(path: &Path, forced: Option<Format>, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
    let format = match forced {
        Some(f) => f,
        None => probe::detect(path)?,
    };
    open_layer(path, format, ctx)
}
