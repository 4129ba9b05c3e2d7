//! Big- and little-endian field readers over a byte slice. Out-of-range reads yield 0 rather
//! than panic; callers validate lengths before decoding.

fn get<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = off.checked_add(N).and_then(|end| b.get(off..end)) {
        a.copy_from_slice(s);
    }
    a
}
pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(get(b, off))
}
pub fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(get(b, off))
}
pub fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(get(b, off))
}
pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(get(b, off))
}
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(get(b, off))
}
pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(get(b, off))
}

#[cfg(test)]
mod tests {
    #[test]
    fn endian_helpers_never_panic() {
        assert_eq!(super::be32(&[0, 0, 1, 0], 0), 256);
        assert_eq!(super::le32(&[0, 1], 0), 0);
        assert_eq!(super::be64(&[], usize::MAX), 0);
    }
}
