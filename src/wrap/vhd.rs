//! `disk.vhd`: the footer that turns the disk's bytes into a fixed VHD.

use super::geometry::vhd_geometry;
use super::whole_sectors;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const FOOTER_LEN: usize = 512;
/// QEMU and Hyper-V take VHDs up to 2040 GiB.
const MAX_SECTORS: u64 = 0xff00_0000;
/// VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
const VHD_EPOCH: Duration = Duration::from_secs(946_684_800);

/// The 512-byte footer of a fixed VHD holding a disk of `size` bytes.
///
/// The creator application is "qem2": QEMU then takes the size from `current_size`, as
/// Hyper-V and Azure do, instead of from the CHS geometry, which cannot express most sizes
/// exactly (with "vpc " or an unknown creator, QEMU would round the disk down to the geometry).
pub fn fixed_footer(
    size: u64,
    uuid: &[u8; 16],
    mtime: SystemTime,
) -> Result<[u8; FOOTER_LEN], String> {
    let sectors = whole_sectors(size)?;
    if sectors > MAX_SECTORS {
        return Err(format!(
            "the disk ({size} bytes) is larger than a VHD can be (2040 GiB)"
        ));
    }
    let chs = vhd_geometry(sectors);
    let stamp = mtime
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| d.checked_sub(VHD_EPOCH))
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0);
    let mut f = [0u8; FOOTER_LEN];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit, always set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // no dynamic header: fixed disk
    f[24..28].copy_from_slice(&stamp.to_be_bytes());
    f[28..32].copy_from_slice(b"qem2");
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
    f[56..58].copy_from_slice(&(chs.cylinders as u16).to_be_bytes());
    f[58] = chs.heads as u8;
    f[59] = chs.sectors as u8;
    f[60..64].copy_from_slice(&2u32.to_be_bytes()); // disk type: fixed
    f[68..84].copy_from_slice(uuid);
    let sum = f
        .iter()
        .fold(0u32, |acc, b| acc.wrapping_add(u32::from(*b)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    Ok(f)
}
