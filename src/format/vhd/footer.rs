//! The VHD footer ("hard disk footer"): 512 big-endian bytes at the end of every VHD, with a
//! copy at offset 0 for dynamic and differencing disks. Images made before Virtual PC 2004
//! end in a 511-byte footer (the spec allows both).

use crate::endian::{be16, be32, be64};

pub const FOOTER_LEN: usize = 512;
/// The footer length of pre-2004 Virtual PC images.
pub const OLD_FOOTER_LEN: usize = 511;
pub const COOKIE: &[u8; 8] = b"conectix";
const CHECKSUM_AT: usize = 64;

/// 65535 cylinders x 16 heads x 255 sectors: "too big for CHS", so the size field rules.
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// QEMU refuses VHDs above 2040 GiB; so do we.
pub const MAX_SECTORS: u64 = 0xff00_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn from_raw(v: u32) -> Option<DiskType> {
        match v {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    /// Offset of the dynamic disk header (all ones for fixed disks).
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type_raw: u32,
    pub checksum: u32,
    pub uuid: [u8; 16],
    pub saved_state: u8,
}

/// One's complement of the byte sum, with the 4-byte checksum field at `field_at` counted as 0.
pub fn checksum(bytes: &[u8], field_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field_at..field_at + 4).contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    !sum
}

impl Footer {
    /// Decodes a 512- or 511-byte footer; the cookie and the checksum must be right.
    pub fn decode(b: &[u8]) -> Result<Footer, String> {
        if b.len() != FOOTER_LEN && b.len() != OLD_FOOTER_LEN {
            return Err(format!("footer is {} bytes, not 512 or 511", b.len()));
        }
        if !b.starts_with(COOKIE) {
            return Err("no \"conectix\" cookie".into());
        }
        let stored = be32(b, CHECKSUM_AT);
        let computed = checksum(b, CHECKSUM_AT);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        let mut creator_os = [0u8; 4];
        creator_os.copy_from_slice(&b[36..40]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app,
            creator_version: be32(b, 32),
            creator_os,
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            cylinders: be16(b, 56),
            heads: b[58],
            sectors_per_track: b[59],
            disk_type_raw: be32(b, 60),
            checksum: stored,
            uuid,
            saved_state: b[84],
        })
    }

    pub fn disk_type(&self) -> Option<DiskType> {
        DiskType::from_raw(self.disk_type_raw)
    }

    pub fn chs_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// The disk size in sectors, as QEMU computes it: Virtual PC ("vpc ") and old QEMU
    /// ("qemu") size disks by their CHS geometry, every other creator by current_size; a
    /// maximal geometry always means current_size.
    pub fn size_sectors(&self) -> u64 {
        let chs = self.chs_sectors();
        let uses_chs = &self.creator_app == b"vpc " || &self.creator_app == b"qemu";
        if uses_chs && chs != MAX_GEOMETRY_SECTORS {
            chs
        } else {
            self.current_size / 512
        }
    }

    /// "vpc 5.3" style text for listings.
    pub fn creator(&self) -> String {
        format!(
            "{} {}.{} on {}",
            printable(&self.creator_app),
            self.creator_version >> 16,
            self.creator_version & 0xffff,
            printable(&self.creator_os)
        )
    }

    pub fn geometry(&self) -> String {
        format!(
            "{}/{}/{}",
            self.cylinders, self.heads, self.sectors_per_track
        )
    }
}

/// A four-character code as text, with NULs and other non-printables shown as '.'.
pub fn printable(code: &[u8]) -> String {
    code.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '.'
            }
        })
        .collect::<String>()
}

/// A UUID in the usual 8-4-4-4-12 form (VHD stores them as big-endian bytes).
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A valid footer with the given fields (used by the other unit tests too).
    pub fn build(
        app: &[u8; 4],
        disk_type: u32,
        current_size: u64,
        chs: (u16, u8, u8),
        len: usize,
    ) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&2u32.to_be_bytes());
        b[12..16].copy_from_slice(&0x10000u32.to_be_bytes());
        let data_off: u64 = if disk_type == 2 { u64::MAX } else { 512 };
        b[16..24].copy_from_slice(&data_off.to_be_bytes());
        b[28..32].copy_from_slice(app);
        b[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes());
        b[36..40].copy_from_slice(b"Wi2k");
        b[40..48].copy_from_slice(&current_size.to_be_bytes());
        b[48..56].copy_from_slice(&current_size.to_be_bytes());
        b[56..58].copy_from_slice(&chs.0.to_be_bytes());
        b[58] = chs.1;
        b[59] = chs.2;
        b[60..64].copy_from_slice(&disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&[0xab; 16]);
        let c = checksum(&b, CHECKSUM_AT);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn decodes_fields_and_checks_the_checksum() {
        let b = build(b"win ", 3, 10 << 20, (301, 4, 17), 512);
        let f = Footer::decode(&b).unwrap();
        assert_eq!(f.disk_type(), Some(DiskType::Dynamic));
        assert_eq!(f.data_offset, 512);
        assert_eq!(f.current_size, 10 << 20);
        assert_eq!(f.geometry(), "301/4/17");
        assert_eq!(f.uuid, [0xab; 16]);
        assert_eq!(f.creator(), "win  5.3 on Wi2k");
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(
            Footer::decode(&bad)
                .unwrap_err()
                .contains("checksum mismatch")
        );
        let mut nocookie = b;
        nocookie[0] = b'C';
        assert!(Footer::decode(&nocookie).unwrap_err().contains("cookie"));
        assert!(Footer::decode(&[0u8; 100]).is_err());
    }

    #[test]
    fn old_511_byte_footers_decode() {
        let b = build(b"vpc ", 2, 1 << 20, (30, 4, 17), 511);
        assert_eq!(
            Footer::decode(&b).unwrap().disk_type(),
            Some(DiskType::Fixed)
        );
    }

    #[test]
    fn size_rule_follows_the_creator() {
        // CHS 301/4/17 = 20468 sectors, current_size 20480 sectors.
        for (app, want) in [
            (b"vpc ", 20468),
            (b"qemu", 20468),
            (b"qem2", 20480),
            (b"win ", 20480),
            (b"d2v\0", 20480),
            (b"xyz ", 20480),
        ] {
            let f = Footer::decode(&build(app, 3, 10 << 20, (301, 4, 17), 512)).unwrap();
            assert_eq!(f.size_sectors(), want, "{}", printable(app));
        }
        let f = Footer::decode(&build(b"vpc ", 3, 10 << 20, (65535, 16, 255), 512)).unwrap();
        assert_eq!(f.size_sectors(), 20480);
        let f = Footer::decode(&build(b"win ", 3, (10 << 20) + 100, (1, 1, 1), 512)).unwrap();
        assert_eq!(f.size_sectors(), 20480);
    }

    #[test]
    fn disk_types_and_text() {
        assert_eq!(DiskType::from_raw(4), Some(DiskType::Differencing));
        assert_eq!(DiskType::from_raw(5), None);
        assert_eq!(DiskType::from_raw(0), None);
        assert_eq!(
            uuid_text(&[0x11; 16]),
            "11111111-1111-1111-1111-111111111111"
        );
        assert_eq!(printable(b"tap\0"), "tap.");
    }
}
