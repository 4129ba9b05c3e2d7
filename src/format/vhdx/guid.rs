//! GUIDs as VHDX stores them: Data1 u32 LE, Data2 u16 LE, Data3 u16 LE, Data4 8 bytes as-is.
//! `Guid` keeps the 16 on-disk bytes; text (the usual registry form) goes through `uuid`.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    /// Builds the on-disk form of the GUID written as `d1-d2-d3-d4[0..2]-d4[2..8]`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: u64) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        let d = d4.to_be_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    pub fn from_slice(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        if let Some(s) = b.get(..16) {
            g.copy_from_slice(s);
        }
        Guid(g)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case).
    pub fn parse(s: &str) -> Option<Guid> {
        uuid::Uuid::try_parse(s.trim())
            .ok()
            .map(|u| Guid(u.to_bytes_le()))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_bytes_le(self.0).hyphenated().fmt(f)
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_and_mixed_endian_bytes() {
        let g = Guid::from_fields(0x2DC27766, 0xF623, 0x4200, 0x9D64_115E_9BFD_4A08);
        assert_eq!(&g.0[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(&g.0[8..], &[0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
        assert_eq!(g.to_string(), "2dc27766-f623-4200-9d64-115e9bfd4a08");
        assert_eq!(
            Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"),
            Some(g)
        );
        assert_eq!(Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"), Some(g));
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "{}",
            "{2DC27766-F623-4200-9D64-115E9BFD4A0}",
            "{2DC27766-F623-4200-9D64115E9BFD4A08}",
            "{+DC27766-F623-4200-9D64-115E9BFD4A08}",
        ] {
            assert_eq!(Guid::parse(bad), None, "{bad}");
        }
    }
}
