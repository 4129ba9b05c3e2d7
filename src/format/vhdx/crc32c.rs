//! CRC-32C (Castagnoli), the checksum of every VHDX structure: reflected polynomial
//! 0x82F63B78, initial value and final xor 0xFFFFFFFF.

const POLY: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Continues a running CRC (start with 0xFFFFFFFF, finish with `!crc`).
pub fn update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

pub fn crc32c(bytes: &[u8]) -> u32 {
    !update(0xFFFF_FFFF, bytes)
}

/// The checksum of a structure whose own 4-byte checksum field sits at `field`: computed as
/// if that field were zero, without copying the structure.
pub fn crc32c_with_zeroed_field(bytes: &[u8], field: usize) -> u32 {
    let field_end = (field + 4).min(bytes.len());
    let field = field.min(bytes.len());
    let mut crc = update(0xFFFF_FFFF, &bytes[..field]);
    crc = update(crc, &[0u8; 4][..field_end - field]);
    !update(crc, &bytes[field_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn zeroed_field_equals_copy_with_zeros() {
        let mut data: Vec<u8> = (0..100u8).collect();
        let got = crc32c_with_zeroed_field(&data, 4);
        data[4..8].fill(0);
        assert_eq!(got, crc32c(&data));
        assert_eq!(crc32c_with_zeroed_field(&[1, 2], 4), crc32c(&[1, 2]));
    }
}
