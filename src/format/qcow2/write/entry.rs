//! L1/L2 entry and refcount-block entry encoding: pure functions.

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
pub const REFTABLE_MASK: u64 = !0x1ff;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;
pub const ALL_ALLOC: u64 = 0xffff_ffff;
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// What a standard (or the descriptor of an extended) L2 entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Nothing here (the subcluster bitmap may still say zero).
    Unallocated,
    /// Reads as zeros; `host` is preallocated space (0 if none). Standard entries only.
    Zero {
        host: u64,
    },
    Normal {
        host: u64,
        copied: bool,
    },
    /// `off` is a byte offset, `len` the bytes stored (sector-rounded).
    Compressed {
        off: u64,
        len: u64,
    },
}

/// Decodes an L2 descriptor. `data_file`: with an external data file an entry with offset 0
/// and COPIED maps guest cluster 0 to host offset 0.
pub fn decode(e: u64, cluster_bits: u32, extended: bool, data_file: bool) -> Kind {
    if e & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let off = e & ((1u64 << x) - 1);
        let nsect = ((e >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        return Kind::Compressed {
            off,
            len: nsect * 512 - (off & 511),
        };
    }
    let host = e & OFFSET_MASK;
    let copied = e & COPIED != 0;
    if !extended && e & ZERO != 0 {
        return Kind::Zero { host };
    }
    if host == 0 && !(data_file && copied) {
        return Kind::Unallocated;
    }
    Kind::Normal { host, copied }
}

/// Host clusters a compressed run touches (each holds one reference for it).
pub fn compressed_clusters(off: u64, len: u64, cluster_size: u64) -> std::ops::RangeInclusive<u64> {
    let start = off & !511;
    let end = start + ((off & 511) + len).div_ceil(512) * 512 - 1;
    (start / cluster_size)..=(end / cluster_size)
}

/// Bits wasted or reserved that a valid descriptor never sets.
pub fn reserved_bits(e: u64, extended: bool) -> u64 {
    if e & COMPRESSED != 0 {
        return 0;
    }
    let mut r = e & !(OFFSET_MASK | COPIED | ZERO);
    if extended {
        r |= e & ZERO;
    }
    r
}

/// Refcount of entry `i` in a refcount block of `1 << order`-bit entries.
pub fn get_refcount(block: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        block
            .get(at..at + w)
            .map_or(0, |s| s.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)))
    } else {
        let bit = i * bits;
        let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Largest refcount an entry can hold.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

/// Stores `v` (<= max_refcount) in entry `i`; returns the byte range that changed.
pub fn set_refcount(block: &mut [u8], order: u32, i: u64, v: u64) -> std::ops::Range<usize> {
    let bits = 1u64 << order;
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        let be = v.to_be_bytes();
        block[at..at + w].copy_from_slice(&be[8 - w..]);
        at..at + w
    } else {
        let bit = i * bits;
        let at = (bit / 8) as usize;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        block[at] = (block[at] & !mask) | (((v as u8) << (bit % 8)) & mask);
        at..at + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_kind() {
        assert_eq!(decode(0, 16, false, false), Kind::Unallocated);
        assert_eq!(
            decode(COPIED, 16, false, true),
            Kind::Normal {
                host: 0,
                copied: true
            }
        );
        assert_eq!(
            decode(0x30000 | COPIED, 16, false, false),
            Kind::Normal {
                host: 0x30000,
                copied: true
            }
        );
        assert_eq!(
            decode(0x30000 | ZERO, 16, false, false),
            Kind::Zero { host: 0x30000 }
        );
        assert_eq!(decode(ZERO, 16, true, false), Kind::Unallocated);
        // cluster_bits 16: x = 54; 2 extra sectors at byte offset 0x10123.
        let e = COMPRESSED | (2u64 << 54) | 0x10123;
        assert_eq!(
            decode(e, 16, false, false),
            Kind::Compressed {
                off: 0x10123,
                len: 3 * 512 - 0x123
            }
        );
        assert_eq!(compressed_clusters(0x1ff00, 0x200, 0x10000), 1..=2);
        assert_eq!(reserved_bits(0x30000 | 0x100, false), 0x100);
    }

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let max = max_refcount(order);
            let n = (512 * 8) >> order;
            for i in 0..n {
                set_refcount(&mut b, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&b, order, i),
                    (i * 7 + 3) & max,
                    "order {order} entry {i}"
                );
            }
            let r = set_refcount(&mut b, order, 5, max);
            assert!(!r.is_empty() && r.len() <= 8);
            assert_eq!(get_refcount(&b, order, 5), max);
            assert_eq!(get_refcount(&b, order, 4), (4 * 7 + 3) & max);
        }
        // Sub-byte widths: bit 0 is the least significant bit.
        let mut b = [0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set_refcount(&mut b, 1, 3, 2);
        assert_eq!(b[0], 0b1000_0001);
    }
}
