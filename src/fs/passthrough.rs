//! Kernel passthrough (Linux 6.9+, root only): a read-only disk file whose bytes are exactly
//! one host file, offset for offset (a raw image, or a raw backing layer), is served by the
//! kernel from that file directly, without a round trip through this daemon.

use std::sync::Arc;
use vmfs_mount::format::Mapping;
use vmfs_mount::storage::HostFile;
use vmfs_mount::view::View;

/// The host file `view` is identical to, if any: its top layer maps the whole disk to offset 0
/// of one file of exactly the disk's size (a longer file, such as a fixed VHD with its footer,
/// would let reads past the end see the footer).
pub(super) fn identity_file(view: &View) -> Option<Arc<HostFile>> {
    let top = view.layers().first()?;
    let size = view.size();
    if size == 0 || top.virtual_size() != size {
        return None;
    }
    let extent = top.map(0, size).ok()?;
    match extent.map {
        // Only a local file has a descriptor the kernel can read from.
        Mapping::Data { file, host_off: 0 }
            if extent.len == size && file.len() == size && file.as_local_file().is_some() =>
        {
            Some(file)
        }
        _ => None,
    }
}
