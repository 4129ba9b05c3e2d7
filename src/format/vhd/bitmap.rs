//! Sector bitmaps of differencing VHD blocks: bit set = the sector is in this file, clear =
//! ask the parent. Sector 0 of the block is the most significant bit of byte 0.

/// Whether sector `s` is present. Bits beyond the bitmap read as clear.
pub fn bit(bitmap: &[u8], s: u64) -> bool {
    usize::try_from(s / 8)
        .ok()
        .and_then(|i| bitmap.get(i))
        .is_some_and(|b| b & (0x80 >> (s % 8)) != 0)
}

/// The state of sector `first` and how many sectors from it (at most `max`, at least 1
/// when `max` >= 1) share that state.
pub fn run(bitmap: &[u8], first: u64, max: u64) -> (bool, u64) {
    let state = bit(bitmap, first);
    let whole = if state { 0xff } else { 0x00 };
    let mut n = 0u64;
    while n < max {
        let s = first + n;
        // Skip whole bytes of the same state.
        if s.is_multiple_of(8) && max - n >= 8 {
            let byte = usize::try_from(s / 8)
                .ok()
                .and_then(|i| bitmap.get(i))
                .copied()
                .unwrap_or(0);
            if byte == whole {
                n += 8;
                continue;
            }
        }
        if bit(bitmap, s) != state {
            break;
        }
        n += 1;
    }
    (state, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_is_the_first_sector() {
        let bm = [0x80, 0x01];
        assert!(bit(&bm, 0));
        assert!(!bit(&bm, 1));
        assert!(bit(&bm, 15));
        assert!(!bit(&bm, 16));
        assert!(!bit(&bm, u64::MAX));
    }

    #[test]
    fn runs_stop_at_a_change_or_at_max() {
        let bm = [0xff, 0xff, 0xf0, 0x00, 0x00, 0x0f];
        assert_eq!(run(&bm, 0, 100), (true, 20));
        assert_eq!(run(&bm, 3, 100), (true, 17));
        assert_eq!(run(&bm, 0, 5), (true, 5));
        assert_eq!(run(&bm, 20, 100), (false, 24));
        assert_eq!(run(&bm, 44, 100), (true, 4));
        assert_eq!(run(&bm, 48, 100), (false, 100));
        assert_eq!(run(&bm, 19, 1), (true, 1));
    }

    #[test]
    fn runs_match_a_bit_by_bit_model() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let bm: Vec<u8> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                [0x00, 0xff, x as u8][(x % 3) as usize]
            })
            .collect();
        for first in 0..512u64 {
            for max in [1, 7, 8, 9, 64, 600] {
                let (st, n) = run(&bm, first, max);
                let want = (first..first + max)
                    .take_while(|&s| bit(&bm, s) == st)
                    .count() as u64;
                assert_eq!((st, n), (bit(&bm, first), want), "first {first} max {max}");
            }
        }
    }
}
