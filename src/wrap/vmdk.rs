//! `disk.vmdk`: a monolithicFlat descriptor with one FLAT extent, the `disk.raw` beside it.

use super::geometry::ide_geometry;
use super::whole_sectors;
use std::fmt::Write;

/// The descriptor text for a disk of `size` bytes stored in `extent` (a file name in the same
/// directory). The extent is always declared RW: QEMU ignores extents declared otherwise, and
/// whether writes succeed is the extent file's business (a read-only `disk.raw` refuses them).
pub fn flat_descriptor(size: u64, extent: &str, uuid: &[u8; 16]) -> Result<String, String> {
    let sectors = whole_sectors(size)?;
    if extent.is_empty() || extent.contains(['"', '\n', '\r', '/']) {
        return Err(format!(
            "extent name {extent:?} cannot be written in a descriptor"
        ));
    }
    let chs = ide_geometry(sectors);
    let u = uuid::Uuid::from_bytes(*uuid);
    let mut d = String::new();
    let _ = writeln!(d, "# Disk DescriptorFile");
    let _ = writeln!(d, "version=1");
    let _ = writeln!(d, "CID={:08x}", cid(uuid));
    let _ = writeln!(d, "parentCID=ffffffff");
    let _ = writeln!(d, "createType=\"monolithicFlat\"");
    let _ = writeln!(d);
    let _ = writeln!(d, "# Extent description");
    let _ = writeln!(d, "RW {sectors} FLAT \"{extent}\" 0");
    let _ = writeln!(d);
    let _ = writeln!(d, "# The Disk Data Base");
    let _ = writeln!(d, "#DDB");
    let _ = writeln!(d);
    let _ = writeln!(d, "ddb.virtualHWVersion = \"4\"");
    let _ = writeln!(d, "ddb.adapterType = \"ide\"");
    let _ = writeln!(d, "ddb.geometry.cylinders = \"{}\"", chs.cylinders);
    let _ = writeln!(d, "ddb.geometry.heads = \"{}\"", chs.heads);
    let _ = writeln!(d, "ddb.geometry.sectors = \"{}\"", chs.sectors);
    // VirtualBox identifies disks by these; present, it never needs to write them itself.
    let _ = writeln!(d, "ddb.uuid.image = \"{u}\"");
    let _ = writeln!(d, "ddb.uuid.parent = \"{}\"", uuid::Uuid::nil());
    let _ = writeln!(d, "ddb.uuid.modification = \"{}\"", uuid::Uuid::nil());
    let _ = writeln!(d, "ddb.uuid.parentmodification = \"{}\"", uuid::Uuid::nil());
    Ok(d)
}

/// A content ID from the UUID, never one of the values that mean "no parent".
fn cid(uuid: &[u8; 16]) -> u32 {
    let c = u32::from_be_bytes([uuid[0], uuid[1], uuid[2], uuid[3]])
        ^ u32::from_be_bytes([uuid[12], uuid[13], uuid[14], uuid[15]]);
    if c >= 0xffff_fffe { c & 0x7fff_ffff } else { c }
}
