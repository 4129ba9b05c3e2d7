//! VirtualBox UUIDs (RTUUID). On disk they are little-endian GUIDs: the first three fields
//! (u32, u16, u16) are stored byte-swapped, the last eight bytes as they are. We keep them in
//! the canonical (RFC 4122) byte order so that printing the bytes in order gives the text
//! VirtualBox shows; conversions and text go through `uuid`.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// Converts the 16 bytes stored in a VDI header.
    pub fn from_disk(d: &[u8; 16]) -> Uuid {
        Uuid(uuid::Uuid::from_bytes_le(*d).into_bytes())
    }

    /// The 16 bytes as a VDI header stores them (inverse of `from_disk`).
    pub fn to_disk(self) -> [u8; 16] {
        uuid::Uuid::from_bytes(self.0).to_bytes_le()
    }

    pub fn is_nil(&self) -> bool {
        self.0 == [0u8; 16]
    }

    /// Parses "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", with or without surrounding braces
    /// (the .vbox files write "{...}"), in either case.
    pub fn parse(text: &str) -> Option<Uuid> {
        uuid::Uuid::try_parse(text.trim())
            .ok()
            .map(|u| Uuid(u.into_bytes()))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_bytes(self.0).hyphenated().fmt(f)
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
