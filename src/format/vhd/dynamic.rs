//! The dynamic disk header ("cxsparse", 1024 big-endian bytes at footer.data_offset) of
//! dynamic and differencing VHDs, with the parent identity and the parent locators.

use super::footer::checksum;
use crate::endian::{be32, be64};

pub const HEADER_LEN: usize = 1024;
pub const COOKIE: &[u8; 8] = b"cxsparse";
const CHECKSUM_AT: usize = 36;
const LOCATORS_AT: usize = 576;
const LOCATOR_LEN: usize = 24;
const LOCATOR_COUNT: usize = 8;
/// QEMU's bound on max_table_entries (INT_MAX / 4).
pub const MAX_TABLE_ENTRIES: u32 = (i32::MAX / 4) as u32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// Platform code: W2ru, W2ku, Wi2r, Wi2k, Mac , MacX.
    pub code: [u8; 4],
    /// Documented as sectors, but Windows stores bytes: informational only.
    pub space: u32,
    /// Bytes of locator data.
    pub length: u32,
    /// Absolute file offset of the locator data.
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's file name (UTF-16 BE in the file), up to the first NUL.
    pub parent_name: String,
    /// All eight locator slots in header order (unused ones have a zero platform code).
    pub locators: Vec<Locator>,
}

impl DynHeader {
    /// Decodes and checks the header: cookie, checksum and a block size QEMU accepts
    /// (a power of two, at least one sector). Errors give the offset of the bad field in the
    /// header and say what is wrong.
    pub fn decode(b: &[u8]) -> Result<DynHeader, (usize, String)> {
        if b.len() != HEADER_LEN {
            return Err((0, format!("header is {} bytes, not {HEADER_LEN}", b.len())));
        }
        if !b.starts_with(COOKIE) {
            return Err((0, "no \"cxsparse\" cookie".into()));
        }
        let stored = be32(b, CHECKSUM_AT);
        let computed = checksum(b, CHECKSUM_AT);
        if stored != computed {
            return Err((
                CHECKSUM_AT,
                format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
            ));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err((
                32,
                format!("block size {block_size} is not a power of two of at least 512 bytes"),
            ));
        }
        let max_table_entries = be32(b, 28);
        if max_table_entries > MAX_TABLE_ENTRIES {
            return Err((
                28,
                format!(
                    "max table entries {max_table_entries} is too large (limit {MAX_TABLE_ENTRIES})"
                ),
            ));
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[40..56]);
        let locators = (0..LOCATOR_COUNT)
            .map(|i| {
                let at = LOCATORS_AT + i * LOCATOR_LEN;
                let mut code = [0u8; 4];
                code.copy_from_slice(&b[at..at + 4]);
                Locator {
                    code,
                    space: be32(b, at + 4),
                    length: be32(b, at + 8),
                    offset: be64(b, at + 16),
                }
            })
            .collect();
        Ok(DynHeader {
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries,
            block_size,
            parent_uuid,
            parent_timestamp: be32(b, 56),
            parent_name: utf16_until_nul(&b[64..576], u16::from_be_bytes),
            locators,
        })
    }

    /// Bytes of the sector bitmap in front of each block: one bit per sector, whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        let bytes = u64::from(self.block_size) / 512 / 8;
        bytes.div_ceil(512).max(1) * 512
    }
}

/// Decodes UTF-16 (with the given byte order) up to the first NUL; invalid sequences become
/// U+FFFD (the result names a file that will not be found, which is the right outcome).
pub fn utf16_until_nul(b: &[u8], unit: fn([u8; 2]) -> u16) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| unit([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Byte offset of locator slot `index` within the header, for error messages.
pub fn locator_field_offset(index: usize) -> u64 {
    (LOCATORS_AT + index * LOCATOR_LEN) as u64
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A valid header (used by the other unit tests too).
    pub fn build(
        bat_off: u64,
        entries: u32,
        block_size: u32,
        parent_name: &str,
        locs: &[([u8; 4], u32, u64)],
    ) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&bat_off.to_be_bytes());
        b[24..28].copy_from_slice(&0x10000u32.to_be_bytes());
        b[28..32].copy_from_slice(&entries.to_be_bytes());
        b[32..36].copy_from_slice(&block_size.to_be_bytes());
        b[40..56].copy_from_slice(&[0xcd; 16]);
        for (i, u) in parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, (code, len, off)) in locs.iter().enumerate() {
            let at = LOCATORS_AT + i * LOCATOR_LEN;
            b[at..at + 4].copy_from_slice(code);
            b[at + 4..at + 8].copy_from_slice(&512u32.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&len.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&off.to_be_bytes());
        }
        let c = checksum(&b, CHECKSUM_AT);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn decodes_fields_locators_and_parent_name() {
        let b = build(
            1536,
            5,
            2 << 20,
            "parent.vhd",
            &[(*b"W2ru", 28, 0x3000), (*b"W2ku", 60, 0x3200)],
        );
        let h = DynHeader::decode(&b).unwrap();
        assert_eq!(h.table_offset, 1536);
        assert_eq!(h.max_table_entries, 5);
        assert_eq!(h.block_size, 2 << 20);
        assert_eq!(h.bitmap_size(), 512);
        assert_eq!(h.parent_name, "parent.vhd");
        assert_eq!(h.parent_uuid, [0xcd; 16]);
        assert_eq!(h.locators.len(), 8);
        assert_eq!(h.locators[2].code, [0; 4]);
        assert_eq!(
            h.locators[1],
            Locator {
                code: *b"W2ku",
                space: 512,
                length: 60,
                offset: 0x3200
            }
        );
    }

    #[test]
    fn bitmap_size_rounds_up_to_sectors() {
        let h = |bs| {
            DynHeader::decode(&build(1536, 1, bs, "", &[]))
                .unwrap()
                .bitmap_size()
        };
        assert_eq!(h(512), 512);
        assert_eq!(h(4096), 512);
        assert_eq!(h(2 << 20), 512);
        assert_eq!(h(4 << 20), 1024);
        assert_eq!(h(1 << 31), 512 * 1024);
    }

    #[test]
    fn rejects_bad_cookie_checksum_block_size_and_table_size() {
        let mut b = build(1536, 5, 2 << 20, "", &[]);
        b[100] ^= 1;
        assert!(DynHeader::decode(&b).unwrap_err().1.contains("checksum"));
        let mut b = build(1536, 5, 2 << 20, "", &[]);
        b[0] = b'X';
        assert!(DynHeader::decode(&b).unwrap_err().1.contains("cookie"));
        for bs in [0, 256, 3 << 20, 1000] {
            assert!(
                DynHeader::decode(&build(1536, 5, bs, "", &[]))
                    .unwrap_err()
                    .1
                    .contains("block size")
            );
        }
        assert!(
            DynHeader::decode(&build(1536, 0x4000_0001, 4096, "", &[]))
                .unwrap_err()
                .1
                .contains("too large")
        );
        assert!(DynHeader::decode(&[0u8; 512]).is_err());
    }

    #[test]
    fn utf16_decoding_stops_at_nul_and_survives_bad_surrogates() {
        assert_eq!(
            utf16_until_nul(&[0, b'a', 0, b'b', 0, 0, 0, b'c'], u16::from_be_bytes),
            "ab"
        );
        assert_eq!(
            utf16_until_nul(&[b'a', 0, b'b', 0], u16::from_le_bytes),
            "ab"
        );
        assert_eq!(
            utf16_until_nul(&[0x00, 0xd8, b'x', 0], u16::from_le_bytes),
            "\u{fffd}x"
        );
        assert_eq!(utf16_until_nul(b"a", u16::from_le_bytes), "");
    }
}
