//! Opening an image for mounting: the chain, the views it exposes and the caches they share.
//! Everything here happens before the daemon forks, so that every error reaches the user.

use crate::cli::Access;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;
use vmfs_mount::backing_policy::{BackingPolicy, Decision};
use vmfs_mount::cache::ByteCache;
use vmfs_mount::clones::{CloneDir, CloneSet, OpenClone};
use vmfs_mount::error::{Error, Kind, Result};
use vmfs_mount::expose::{DISK_FILE_NAME, DiskFile, ExposedFile, FileOptions, ViewFiles};
use vmfs_mount::format::qcow2::Qcow2Layer;
use vmfs_mount::format::qcow2::bitmap::Bits;
use vmfs_mount::format::{Format, Layer, OpenCtx};
use vmfs_mount::lock::{self, LockGuard};
use vmfs_mount::manage::snapshots::SnapshotSet;
use vmfs_mount::plan::{self, Origin, ViewSpec};
use vmfs_mount::view::View;

/// Resolved-extent cache entries per view (64 KiB each): 4 GiB of a disk stays resolved.
const CHUNK_ENTRIES: usize = 65536;

#[derive(Clone, Debug)]
pub struct MountRequest {
    pub image: PathBuf,
    pub format: Option<Format>,
    pub access: Access,
    pub overlay: Option<PathBuf>,
    /// Read-only mounts: do not refuse a QEMU that writes the image.
    pub force_share: bool,
    /// `--list`: show what would be mounted, create nothing.
    pub listing: bool,
    pub table_cache: usize,
    pub cluster_cache: usize,
    /// `-o backing_dirs=`: more directories images may name files in.
    pub backing_dirs: Vec<PathBuf>,
    /// `-o trust_backing`: images may name files anywhere.
    pub trust_backing: bool,
    /// `--clones DIR`: writable clones of the (read-only) image live in DIR.
    pub clones: Option<PathBuf>,
}

/// Resolved-extent cache entries of a saved VM state (64 KiB each): it is read once, in order.
const VM_STATE_CHUNK_ENTRIES: usize = 256;
/// The file of a snapshot directory holding the VM state `savevm` saved with the snapshot.
pub const VM_STATE_FILE_NAME: &str = "vmstate";

/// One exposed file: what it shows and whether writes reach it.
pub struct Exposed {
    pub spec: ViewSpec,
    pub view: Arc<View>,
    pub writable: bool,
    /// The saved VM state of a snapshot taken by a running VM (`savevm`), if it has one.
    pub vm_state: Option<Arc<View>>,
}

impl Exposed {
    /// The files of this view's directory, which the mount shows at `dir_path` ("" for the
    /// root): disk.raw over the view, and what `options` and the disk's contents add.
    pub fn files(&self, options: &FileOptions, dir_path: &str) -> ViewFiles {
        let disk = Arc::new(DiskFile::new(
            self.view.clone(),
            self.writable,
            self.spec.mtime,
        ));
        let label = if dir_path.is_empty() {
            DISK_FILE_NAME.to_string()
        } else {
            format!("{dir_path}/{DISK_FILE_NAME}")
        };
        let mut extras: Vec<(String, Arc<dyn ExposedFile>)> = Vec::new();
        if let Some(state) = &self.vm_state {
            // Read-only, dated like the snapshot: the bytes QEMU saved, nothing else.
            let file = DiskFile::new(state.clone(), false, self.spec.mtime);
            extras.push((VM_STATE_FILE_NAME.to_string(), Arc::new(file)));
        }
        ViewFiles::new(disk, label, options, extras)
    }
}

/// The saved VM state of a snapshot view, if its top layer has one. A state the image
/// describes but that cannot be read is left out with a log line, never a failed mount.
fn vm_state_view(spec: &ViewSpec, clusters: &Arc<ByteCache>) -> Option<Arc<View>> {
    if !matches!(spec.origin, Origin::Snapshot { .. }) {
        return None;
    }
    match spec.layers.first()?.vm_state()? {
        Ok(layer) => {
            let size = layer.virtual_size();
            Some(Arc::new(View::new(
                vec![layer],
                size,
                clusters.clone(),
                VM_STATE_CHUNK_ENTRIES,
            )))
        }
        Err(e) => {
            log::warn!("snapshots/{}: no {VM_STATE_FILE_NAME} file: {e}", spec.name);
            None
        }
    }
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
    /// Set when a writable mount was asked for but the top layer cannot be written in place.
    pub not_writable: Option<String>,
    /// QEMU-compatible image locks, held for the life of the mount.
    pub locks: Option<LockGuard>,
    /// What the backing-file policy decided for every file the chain named.
    pub decisions: Vec<Decision>,
    /// `--list` only: the error that stopped the chain below the layers shown.
    pub stopped: Option<Error>,
    /// `--clones DIR`: how to make clones, and those found in DIR at mount.
    pub clones: Option<MountedClones>,
    /// The image's consistent QEMU dirty bitmaps by name (on a writable mount the enabled
    /// ones follow every write).
    pub bitmaps: Vec<(String, Arc<Bits>)>,
    /// Live snapshots (`mkdir snapshots/NAME`), when the top is a writable qcow2 image.
    pub live_snapshots: Option<Arc<SnapshotSet>>,
}

pub struct MountedClones {
    pub set: Arc<CloneSet>,
    /// Opened at mount (so errors reach the user before the daemon forks); the tree takes
    /// them over.
    pub found: Mutex<Vec<OpenClone>>,
    /// `--list`: the clones that would be shown (found, not opened).
    pub listed: Vec<String>,
}

/// Opens the chain of `req.image` and builds every view the mount will show.
pub fn open_for_mount(req: &MountRequest) -> Result<Opened> {
    // With --overlay the chain to mount is the overlay's: it sits on top of the image.
    let (top, top_format) = match &req.overlay {
        Some(overlay) if !req.listing || overlay.exists() => {
            let image_format = match req.format {
                Some(f) => f,
                None => vmfs_mount::format::probe::detect(&req.image)?,
            };
            if !req.listing {
                let policy = policy(req)?;
                vmfs_mount::overlay::prepare_overlay(&req.image, overlay, image_format, &policy)?;
            }
            (overlay.clone(), Some(Format::Qcow2))
        }
        _ => (req.image.clone(), req.format),
    };
    let policy = policy(req)?;
    let tables = Arc::new(ByteCache::new(req.table_cache));
    let clusters = Arc::new(ByteCache::new(req.cluster_cache));
    let open = |writable: bool| {
        let ctx = OpenCtx::new(tables.clone(), writable).with_policy(policy.clone());
        if req.listing {
            // --list shows a chain the policy cut short (with the refusal); other errors are
            // errors, as for a mount.
            match vmfs_mount::chain::open_chain_partial(&top, top_format, &ctx)? {
                (_, Some(e)) if e.kind() != Kind::Refused => Err(e),
                partial => Ok(partial),
            }
        } else {
            vmfs_mount::chain::open_chain(&top, top_format, &ctx).map(|l| (l, None))
        }
    };
    let mut fell_back = None;
    let (layers, stopped) = match req.access {
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
    opened.decisions = policy.decisions();
    opened.stopped = stopped;
    if !read_only && !opened.live.writable && opened.fell_back_to_read_only.is_none() {
        opened.not_writable = Some(format!(
            "{} ({}) cannot be written in place; use --overlay FILE to make disk.raw writable",
            vmfs_mount::storage::show_path(opened.layers[0].path()),
            opened.layers[0].format()
        ));
    }
    if !req.listing {
        opened.locks = Some(lock_chain(&opened, req.force_share)?);
    }
    opened.bitmaps = bitmaps(&opened.layers[0], opened.live.writable);
    if let Some(dir) = &req.clones {
        let ctx = OpenCtx::new(tables.clone(), false).with_policy(policy.clone());
        opened.clones = Some(open_clones(dir, &opened, ctx, &clusters, req.listing)?);
    }
    Ok(opened)
}

/// Plans the views of an open chain (top first) and makes each one a `View`. Only the live
/// view can be writable, and only if the top layer can write and `read_only` is not set.
pub fn expose(
    layers: Vec<Arc<dyn Layer>>,
    read_only: bool,
    clusters: &Arc<ByteCache>,
) -> Result<Opened> {
    let (live, snaps) = plan::plan(&layers)?;
    let make = |spec: ViewSpec, live: bool| {
        let view = Arc::new(View::new(
            spec.layers.clone(),
            spec.size,
            clusters.clone(),
            CHUNK_ENTRIES,
        ));
        let writable = live && !read_only && view.is_writable();
        Exposed {
            vm_state: vm_state_view(&spec, clusters),
            spec,
            view,
            writable,
        }
    };
    let live = make(live, true);
    let live_snapshots = if live.writable {
        SnapshotSet::new(&layers, &live.view, clusters).map(Arc::new)
    } else {
        None
    };
    Ok(Opened {
        live_snapshots,
        live,
        snapshots: snaps.into_iter().map(|s| make(s, false)).collect(),
        layers,
        fell_back_to_read_only: None,
        not_writable: None,
        locks: None,
        decisions: Vec::new(),
        stopped: None,
        clones: None,
        bitmaps: Vec::new(),
    })
}

/// The clones of the live view (a read-only image) in `dir`: those found there are opened
/// unless only listing.
fn open_clones(
    dir: &std::path::Path,
    opened: &Opened,
    ctx: OpenCtx,
    clusters: &Arc<ByteCache>,
    listing: bool,
) -> Result<MountedClones> {
    let live = &opened.live;
    if live.writable {
        return Err(Error::invalid(
            "--clones needs a read-only mount: the clones' base must not change",
        ));
    }
    let top = &live.spec.layers[0];
    let dir = CloneDir::new(dir, top.path(), top.format(), live.spec.size)?;
    let set = Arc::new(CloneSet::new(dir, live.view.clone(), ctx, clusters.clone()));
    let (found, listed) = if listing {
        let names = set.dir().discover()?.into_iter().map(|f| f.name);
        (Vec::new(), names.collect())
    } else {
        (set.open_existing()?, Vec::new())
    };
    Ok(MountedClones {
        set,
        found: Mutex::new(found),
        listed,
    })
}

/// The dirty bitmaps of a qcow2 top layer that hold a consistent record (not in use). When
/// disk.raw is writable, the writer's: it keeps them up to date.
fn bitmaps(top: &Arc<dyn Layer>, writable: bool) -> Vec<(String, Arc<Bits>)> {
    let Some(q) = (&**top as &dyn std::any::Any).downcast_ref::<Qcow2Layer>() else {
        return Vec::new();
    };
    if writable {
        return q
            .writer
            .as_ref()
            .map_or_else(Vec::new, |w| w.dirty_bitmaps());
    }
    let img = &q.image;
    let found = match img.bitmaps() {
        Ok(Some(b)) => b.entries,
        Ok(None) => return Vec::new(),
        Err(e) => {
            log::warn!("{e}; no dirty bitmap is shown");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for e in found {
        if e.in_use() {
            log::info!(
                "{}: bitmap {:?} is in use (not saved consistently); not shown",
                vmfs_mount::storage::show_path(&img.path),
                e.name
            );
            continue;
        }
        match img.bitmap_table(&e).and_then(|t| img.bitmap_bits(&e, &t)) {
            Ok(bits) => out.push((e.name.clone(), Arc::new(bits))),
            Err(err) => log::warn!("{err}; bitmap {:?} is not shown", e.name),
        }
    }
    out
}

/// The backing-file policy of a mount: the files the user named are trusted roots.
fn policy(req: &MountRequest) -> Result<BackingPolicy> {
    let mut p = BackingPolicy::new().trust_any(req.trust_backing);
    for dir in &req.backing_dirs {
        p = p.allow_dir(dir)?;
    }
    p = p.trust_named(&req.image);
    if let Some(overlay) = &req.overlay {
        p = p.trust_named(overlay);
    }
    Ok(p)
}

/// Takes QEMU's image locks: the top as a writer when disk.raw is writable, everything else
/// as a reader, so QEMU can neither write what we read nor open what we write.
fn lock_chain(opened: &Opened, force_share: bool) -> Result<LockGuard> {
    let (top, lower) = opened.layers.split_at(1);
    let lower_files: Vec<_> = lower.iter().flat_map(|l| l.files()).collect();
    let top_files = top[0].files();
    if force_share {
        let all: Vec<_> = top_files.into_iter().chain(lower_files).collect();
        return lock::lock_for_mount_shared(&all);
    }
    if opened.live.writable {
        lock::lock_for_mount(&top_files, &lower_files)
    } else {
        let all: Vec<_> = top_files.into_iter().chain(lower_files).collect();
        lock::lock_for_mount(&[], &all)
    }
}

/// Errors that mean "you may read this but not write it".
fn is_write_protected(e: &Error) -> bool {
    if e.kind() == Kind::Refused {
        return false;
    }
    e.kind() == Kind::ReadOnly || matches!(e.errno(), libc::EACCES | libc::EPERM | libc::EROFS)
}
