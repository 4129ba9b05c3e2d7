//! Opening an image for mounting: the chain, the views it exposes and the caches they share.
//! Everything here happens before the daemon forks, so that every error reaches the user.

use crate::cli::Access;
use std::path::PathBuf;
use std::sync::Arc;
use vmfs_mount::cache::ByteCache;
use vmfs_mount::error::{Error, Kind, Result};
use vmfs_mount::format::{Format, Layer, OpenCtx};
use vmfs_mount::tree::{self, ViewSpec};
use vmfs_mount::view::View;

/// Resolved-extent cache entries per view (64 KiB each): 4 GiB of a disk stays resolved.
const CHUNK_ENTRIES: usize = 65536;

#[derive(Clone, Debug)]
pub struct MountRequest {
    pub image: PathBuf,
    pub format: Option<Format>,
    pub access: Access,
    pub overlay: Option<PathBuf>,
    pub table_cache: usize,
    pub cluster_cache: usize,
}

/// One exposed file: what it shows and whether writes reach it.
pub struct Exposed {
    pub spec: ViewSpec,
    pub view: Arc<View>,
    pub writable: bool,
}

pub struct Opened {
    /// The chain, top first.
    pub layers: Vec<Arc<dyn Layer>>,
    /// MOUNTPOINT/disk.raw.
    pub live: Exposed,
    /// MOUNTPOINT/snapshots/<name>/disk.raw, in plan order.
    pub snapshots: Vec<Exposed>,
    /// Set when the image could not be opened for writing and we fell back to read-only.
    pub fell_back_to_read_only: Option<String>,
}

/// Opens the chain of `req.image` and builds every view the mount will show.
pub fn open_for_mount(req: &MountRequest) -> Result<Opened> {
    if let Some(overlay) = &req.overlay {
        return Err(Error::new(
            Kind::Unsupported,
            format!("{}: overlay files are not supported yet", overlay.display()),
        ));
    }
    let tables = Arc::new(ByteCache::new(req.table_cache));
    let clusters = Arc::new(ByteCache::new(req.cluster_cache));
    let open = |writable: bool| {
        let ctx = OpenCtx {
            tables: tables.clone(),
            writable,
        };
        vmfs_mount::chain::open_chain(&req.image, req.format, &ctx)
    };
    let mut fell_back = None;
    let layers = match req.access {
        Access::ReadOnly => open(false)?,
        Access::Auto => match open(true) {
            Ok(l) => l,
            Err(e) if is_write_protected(&e) => {
                fell_back = Some(e.to_string());
                open(false)?
            }
            Err(e) => return Err(e),
        },
    };
    let read_only = req.access == Access::ReadOnly;
    let mut opened = expose(layers, read_only, &clusters)?;
    opened.fell_back_to_read_only = fell_back;
    Ok(opened)
}

/// Plans the views of an open chain (top first) and makes each one a `View`. Only the live
/// view can be writable, and only if the top layer can write and `read_only` is not set.
pub fn expose(
    layers: Vec<Arc<dyn Layer>>,
    read_only: bool,
    clusters: &Arc<ByteCache>,
) -> Result<Opened> {
    let (live, snaps) = tree::plan(&layers)?;
    let make = |spec: ViewSpec, live: bool| {
        let view = Arc::new(View::new(
            spec.layers.clone(),
            spec.size,
            clusters.clone(),
            CHUNK_ENTRIES,
        ));
        let writable = live && !read_only && view.is_writable();
        Exposed {
            spec,
            view,
            writable,
        }
    };
    Ok(Opened {
        live: make(live, true),
        snapshots: snaps.into_iter().map(|s| make(s, false)).collect(),
        layers,
        fell_back_to_read_only: None,
    })
}

/// Errors that mean "you may read this but not write it".
fn is_write_protected(e: &Error) -> bool {
    e.kind() == Kind::ReadOnly || matches!(e.errno(), libc::EACCES | libc::EPERM | libc::EROFS)
}
