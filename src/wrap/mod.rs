//! Hypervisor wrappers: files beside a `disk.raw` that show the same disk in a container format
//! a hypervisor accepts where it takes no bare raw file. Both are views over the disk file, never
//! copies: `disk.vmdk` is a small VMDK descriptor whose one FLAT extent is `disk.raw` itself,
//! `disk.vhd` is the disk's bytes followed by a fixed-VHD footer (writes to the data part go to
//! the disk). Opt-in (`-o vmdk`, `-o vhd`).

mod geometry;
mod vhd;
mod vmdk;

pub use geometry::{Chs, ide_geometry, vhd_geometry};
pub use vhd::{FOOTER_LEN, fixed_footer};
pub use vmdk::flat_descriptor;

use crate::expose::{BytesFile, ConcatFile, ExposedFile, MemoryFile};
use std::sync::Arc;
use std::time::SystemTime;

pub const VMDK_FILE_NAME: &str = "disk.vmdk";
pub const VHD_FILE_NAME: &str = "disk.vhd";
/// The descriptor of a writable disk is this long (its text, then NULs). QEMU's vmdk driver
/// rewrites 20 sectors at offset 0 (its DESC_SIZE) to set a new CID on the first write to the
/// disk; with O_DIRECT (cache=none) it rounds that up to the 4096-byte alignment it probes, so
/// the file holds three such blocks. QEMU and VirtualBox stop reading the text at the first NUL.
pub const WRITABLE_DESCRIPTOR_LEN: usize = 3 * 4096;

/// Which wrappers a view's directory gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wrappers {
    pub vmdk: bool,
    pub vhd: bool,
}

/// A wrapper file and whether byte 0 of it is byte 0 of the disk.
pub struct Wrapped {
    pub name: &'static str,
    pub file: Arc<dyn ExposedFile>,
    pub shows_disk: bool,
}

/// The wrappers `want` asks for over `disk` (shown as `disk_name` in the same directory),
/// plus a note for each one the disk cannot have. `identity` names the disk stably across
/// mounts (image path and view); UUIDs and the VMDK CID are derived from it.
pub fn wrappers(
    disk: &Arc<dyn ExposedFile>,
    disk_name: &str,
    identity: &str,
    want: Wrappers,
    mtime: SystemTime,
) -> (Vec<Wrapped>, Vec<String>) {
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let size = disk.size();
    let uuid = disk_uuid(identity);
    if want.vmdk {
        match flat_descriptor(size, disk_name, &uuid) {
            Ok(text) => files.push(Wrapped {
                name: VMDK_FILE_NAME,
                file: descriptor_file(text, disk.writable(), mtime),
                shows_disk: false,
            }),
            Err(why) => notes.push(format!("no {VMDK_FILE_NAME}: {why}")),
        }
    }
    if want.vhd {
        let made = fixed_footer(size, &uuid, mtime).and_then(|footer| {
            let footer: Arc<dyn ExposedFile> = Arc::new(BytesFile::new(footer.to_vec(), mtime));
            ConcatFile::new(vec![disk.clone(), footer]).map_err(|e| e.to_string())
        });
        match made {
            Ok(file) => files.push(Wrapped {
                name: VHD_FILE_NAME,
                file: Arc::new(file),
                shows_disk: true,
            }),
            Err(why) => notes.push(format!("no {VHD_FILE_NAME}: {why}")),
        }
    }
    (files, notes)
}

/// The descriptor as a file: fixed text beside a read-only disk; beside a writable one, a
/// file in memory that hypervisors may rewrite (their changes last until unmount and never
/// change which bytes the disk has).
fn descriptor_file(text: String, writable: bool, mtime: SystemTime) -> Arc<dyn ExposedFile> {
    let mut bytes = text.into_bytes();
    if !writable {
        return Arc::new(BytesFile::new(bytes, mtime));
    }
    bytes.resize(bytes.len().max(WRITABLE_DESCRIPTOR_LEN), 0);
    Arc::new(MemoryFile::new(bytes, mtime))
}

/// A name-based (v5) UUID of `identity`: the same image and view give the same UUID on every
/// mount, different views (snapshots of one image) different ones.
pub fn disk_uuid(identity: &str) -> [u8; 16] {
    // A namespace of our own, so these never collide with v5 UUIDs others derive from paths.
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5d8f_3c1e_7a40_4b6e_9f21_0c7d_e4a9_b318);
    *uuid::Uuid::new_v5(&NAMESPACE, identity.as_bytes()).as_bytes()
}

/// Fails unless the disk can be described in 512-byte sectors.
fn whole_sectors(size: u64) -> Result<u64, String> {
    if size == 0 {
        return Err("the disk is empty".into());
    }
    if !size.is_multiple_of(512) {
        return Err(format!(
            "the disk's size ({size} bytes) is not a multiple of 512 bytes"
        ));
    }
    Ok(size / 512)
}

#[cfg(test)]
mod tests;
