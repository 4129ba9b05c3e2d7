//! Cylinder/head/sector geometries the wrappers declare. Nothing reads data through them; they
//! only have to be what the hypervisors expect for a disk of the given size.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chs {
    pub cylinders: u32,
    pub heads: u32,
    pub sectors: u32,
}

/// The VHD specification's geometry for `total_sectors` (its "CHS calculation" appendix):
/// the largest geometry not above the disk, capped at 65535/16/255.
pub fn vhd_geometry(total_sectors: u64) -> Chs {
    let total = total_sectors.min(65535 * 16 * 255);
    let (sectors, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut spt = 17u64;
        let mut cth = total / spt;
        let mut heads = (cth.div_ceil(1024)).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    Chs {
        cylinders: (cyl_times_heads / heads) as u32,
        heads: heads as u32,
        sectors: sectors as u32,
    }
}

/// The geometry of an IDE disk in a VMDK descriptor: 16 heads, 63 sectors, cylinders rounded
/// up and capped at 16383 as ATA does (larger disks are addressed by LBA).
pub fn ide_geometry(total_sectors: u64) -> Chs {
    Chs {
        cylinders: total_sectors.div_ceil(16 * 63).clamp(1, 16383) as u32,
        heads: 16,
        sectors: 63,
    }
}
