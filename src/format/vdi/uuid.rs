//! VirtualBox UUIDs (RTUUID). On disk they are little-endian GUIDs: the first three fields
//! (u32, u16, u16) are stored byte-swapped, the last eight bytes as they are. We keep them in
//! the canonical (RFC 4122) byte order so that printing the bytes in order gives the text
//! VirtualBox shows.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// Converts the 16 bytes stored in a VDI header.
    pub fn from_disk(d: &[u8; 16]) -> Uuid {
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&[d[3], d[2], d[1], d[0]]);
        c[4..6].copy_from_slice(&[d[5], d[4]]);
        c[6..8].copy_from_slice(&[d[7], d[6]]);
        c[8..16].copy_from_slice(&d[8..16]);
        Uuid(c)
    }

    /// The 16 bytes as a VDI header stores them (inverse of `from_disk`).
    pub fn to_disk(self) -> [u8; 16] {
        // The swap is its own inverse.
        Uuid::from_disk(&self.0).0
    }

    pub fn is_nil(&self) -> bool {
        self.0 == [0u8; 16]
    }

    /// Parses "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", with or without surrounding braces
    /// (the .vbox files write "{...}"), in either case.
    pub fn parse(text: &str) -> Option<Uuid> {
        let t = text.trim();
        let t = t
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(t);
        let b = t.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
        if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(Uuid(out))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_three_fields_are_little_endian_on_disk() {
        let disk = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        let u = Uuid::from_disk(&disk);
        assert_eq!(u.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(u.to_disk(), disk);
    }

    #[test]
    fn parses_braced_and_bare_text() {
        let u = Uuid::parse("{00112233-4455-6677-8899-AABBCCDDEEFF}").unwrap();
        assert_eq!(u.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(Uuid::parse("00112233-4455-6677-8899-aabbccddeeff"), Some(u));
        assert_eq!(format!("{u:?}"), "{00112233-4455-6677-8899-aabbccddeeff}");
        assert!(Uuid::parse("00112233-4455-6677-8899-aabbccddeef").is_none());
        assert!(Uuid::parse("0011223344-55-6677-8899-aabbccddeeff").is_none());
        assert!(Uuid::parse("00112233-4455-6677-8899-aabbccddeefg").is_none());
        assert!(Uuid::parse("").is_none());
        assert!(Uuid::parse("+0112233-4455-6677-8899-aabbccddeeff").is_none());
        assert!(Uuid::default().is_nil());
    }
}
