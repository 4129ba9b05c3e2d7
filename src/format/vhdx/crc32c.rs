//! CRC-32C (Castagnoli), the checksum of every VHDX structure, from the `crc32c` crate
//! (SSE 4.2 / ARMv8 instructions when the CPU has them).

/// The checksum of a structure whose own 4-byte checksum field sits at `field`: computed as
/// if that field were zero, without copying the structure.
pub fn crc32c_with_zeroed_field(bytes: &[u8], field: usize) -> u32 {
    let field = field.min(bytes.len());
    let field_end = field.saturating_add(4).min(bytes.len());
    let crc = crc32c::crc32c(&bytes[..field]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4][..field_end - field]);
    crc32c::crc32c_append(crc, &bytes[field_end..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crc32c::crc32c;

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
        assert_eq!(
            crc32c_with_zeroed_field(&[1, 2, 3, 4, 5, 6], 4),
            crc32c(&[1, 2, 3, 4, 0, 0])
        );
        assert_eq!(
            crc32c_with_zeroed_field(&[1, 2], usize::MAX),
            crc32c(&[1, 2])
        );
    }
}
