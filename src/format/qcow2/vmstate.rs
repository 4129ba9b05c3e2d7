//! The saved VM state of an internal snapshot (`savevm`): QEMU writes the migration stream
//! into the snapshot's own guest address space, past the end of the disk, starting at the
//! first L1 entry the disk does not need (QEMU `qcow2_vm_state_offset`: `l1_vm_state_index`
//! = `size_to_l1(disk size)`, shifted by the bytes one L1 entry covers). This translator shows
//! those `vm_state_size` bytes as a layer of their own, through the snapshot's L1.

use super::entry::Geometry;
use super::snapshot::Snapshot;
use super::{Qcow2Image, map};
use crate::error::{Error, Result};
use crate::format::{Extent, Format, Layer};
use crate::storage::HostFile;
use std::path::Path;
use std::sync::Arc;

/// Where the VM state of a snapshot starts in its guest address space. `header_size` is the
/// image's size field, `rounded_size` the virtual size shown (rounded down to 512 bytes).
/// A snapshot taken at another disk size saved its state after that size (QEMU moves
/// `l1_vm_state_index` on every resize); otherwise QEMU uses the header's size.
pub fn vm_state_offset(
    g: &Geometry,
    header_size: u64,
    rounded_size: u64,
    disk_size: Option<u64>,
) -> Option<u64> {
    let size = match disk_size {
        Some(d) if d != rounded_size => d,
        _ => header_size,
    };
    g.l1_entries_for(size)
        .checked_mul(1u64 << g.l1_span_bits())
        .filter(|&o| o <= i64::MAX as u64)
}

/// The `vm_state_size` bytes a snapshot saved, mapped through its L1 from `start`.
#[derive(Debug)]
pub struct VmStateLayer {
    image: Arc<Qcow2Image>,
    l1: Arc<[u64]>,
    l1_offset: u64,
    start: u64,
    size: u64,
}

impl VmStateLayer {
    /// The VM state of snapshot `sn`, whose L1 is `l1`; `None` when it saved none. A state
    /// that QEMU could not have written (past the addressable range or past the snapshot's
    /// L1 table, which QEMU grows before it writes there) is an error, never a file of zeros.
    pub fn new(
        image: &Arc<Qcow2Image>,
        sn: &Snapshot,
        l1: Arc<[u64]>,
        field: &str,
    ) -> Option<Result<VmStateLayer>> {
        if sn.vm_state_size == 0 {
            return None;
        }
        let g = &image.geometry;
        let bad = |what: String| Error::corrupt(&image.path, field, sn.entry_offset, what);
        let Some(start) = vm_state_offset(g, image.header.size, image.size, sn.disk_size) else {
            return Some(Err(bad("the VM state would start past 2^63 bytes".into())));
        };
        let end = start
            .checked_add(sn.vm_state_size)
            .filter(|&e| e <= i64::MAX as u64);
        let Some(end) = end else {
            return Some(Err(bad(format!(
                "vm_state_size {} from guest offset {start:#x} overflows",
                sn.vm_state_size
            ))));
        };
        let covered = (l1.len() as u64).saturating_mul(1u64 << g.l1_span_bits());
        if end > covered {
            return Some(Err(bad(format!(
                "the VM state ({} bytes from guest offset {start:#x}) runs past the snapshot's \
                 L1 table ({} entries cover {covered:#x} bytes)",
                sn.vm_state_size,
                l1.len()
            ))));
        }
        Some(Ok(VmStateLayer {
            image: image.clone(),
            l1,
            l1_offset: sn.l1_table_offset,
            start,
            size: sn.vm_state_size,
        }))
    }

    /// Where byte 0 of the state is in the snapshot's guest address space.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl Layer for VmStateLayer {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn path(&self) -> &Path {
        &self.image.path
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        // `new` checked that start + size fits, and callers stay inside the size.
        let guest = self
            .start
            .checked_add(off)
            .ok_or_else(|| Error::invalid(format!("VM state offset {off:#x} overflows")))?;
        map::map(&self.image, &self.l1, self.l1_offset, guest, len)
    }
    fn files(&self) -> Vec<Arc<HostFile>> {
        vec![self.image.file.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, extended_l2: bool) -> Geometry {
        Geometry {
            cluster_bits,
            version: 3,
            extended_l2,
            has_data_file: false,
        }
    }

    #[test]
    fn state_starts_at_the_first_l1_entry_past_the_disk() {
        // 64 KiB clusters: one L1 entry covers 512 MiB (256 MiB with extended L2).
        let g = geo(16, false);
        assert_eq!(
            vm_state_offset(&g, 64 << 20, 64 << 20, None),
            Some(512 << 20)
        );
        assert_eq!(
            vm_state_offset(&g, 512 << 20, 512 << 20, None),
            Some(512 << 20)
        );
        assert_eq!(
            vm_state_offset(&g, (512 << 20) + 512, (512 << 20) + 512, None),
            Some(1 << 30)
        );
        assert_eq!(
            vm_state_offset(&geo(16, true), 64 << 20, 64 << 20, None),
            Some(256 << 20)
        );
        // 512-byte clusters: 32 KiB per L1 entry.
        assert_eq!(
            vm_state_offset(&geo(9, false), 40_000, 39_936, None),
            Some(64 << 10)
        );
        // A disk of size 0 keeps its state from guest offset 0.
        assert_eq!(vm_state_offset(&g, 0, 0, None), Some(0));
    }

    #[test]
    fn a_snapshot_of_another_disk_size_saved_after_that_size() {
        let g = geo(16, false);
        assert_eq!(
            vm_state_offset(&g, 64 << 20, 64 << 20, Some(600 << 20)),
            Some(1 << 30)
        );
        // Same size as now: the header's own size decides, as in QEMU.
        assert_eq!(
            vm_state_offset(&g, (512 << 20) + 100, 512 << 20, Some(512 << 20)),
            Some(1 << 30)
        );
    }

    #[test]
    fn offsets_past_the_addressable_range_are_refused() {
        let g = geo(21, false);
        assert_eq!(vm_state_offset(&g, u64::MAX, !511, None), None);
        assert_eq!(vm_state_offset(&g, i64::MAX as u64, 0, None), None);
    }
}
