//! L1 and L2 entry decoding (standard 64-bit and extended 128-bit L2 entries), following
//! QEMU's classification (`qcow2_get_cluster_type`, `qcow2_get_subcluster_type` and the
//! checks of `qcow2_get_host_offset`). Pure: errors are the "what" of a Corrupt error that
//! the caller completes with the file and the entry's offset.

/// Host offset bits of L1 and standard L2 entries (bits 9..55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
/// Extended L2: 32 subclusters per cluster.
pub const SUBCLUSTERS: u32 = 32;
const ALL_ALLOC: u64 = 0xffff_ffff;

/// What the image says about one cluster or subcluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Not here: the backing file (or zeros) shows through.
    Unallocated,
    /// Reads as zeros, whatever lies below.
    Zero,
    /// Stored uncompressed at this cluster-aligned host offset (in the data file, if any).
    Normal { host: u64 },
    /// A compressed cluster: `stored_len` bytes from byte `offset` of the image file.
    Compressed { offset: u64, stored_len: u64 },
}

/// The image properties that change how entries decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub version: u32,
    pub extended_l2: bool,
    pub has_data_file: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes per L2 entry.
    pub fn entry_len(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }
    /// log2 of the entries in one L2 table (one cluster).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }
    /// Guest bytes covered by one L1 entry (one L2 table), as a power of two.
    pub fn l1_span_bits(&self) -> u32 {
        self.cluster_bits + self.l2_bits()
    }
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }
    /// L1 entries needed for `size` guest bytes (QEMU `size_to_l1`).
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(1u64 << self.l1_span_bits())
    }
}

/// The L2 table offset of an L1 entry (`None`: the whole range is unallocated).
pub fn l2_offset(geo: &Geometry, l1_entry: u64) -> Result<Option<u64>, String> {
    let off = l1_entry & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if off & (geo.cluster_size() - 1) != 0 {
        return Err(format!("L2 table offset {off:#x} is not cluster-aligned"));
    }
    Ok(Some(off))
}

/// Decodes the L2 entry of the cluster at guest offset `guest_cluster` for subcluster
/// `sub` (always 0 without extended L2). `bitmap` is the second word of an extended entry.
pub fn decode(
    geo: &Geometry,
    entry: u64,
    bitmap: u64,
    sub: u32,
    guest_cluster: u64,
) -> Result<Cluster, String> {
    if entry & OFLAG_COMPRESSED != 0 {
        if geo.has_data_file {
            return Err("compressed cluster in an image with an external data file".into());
        }
        // Subclusters do not apply to compressed clusters; QEMU ignores their bitmap.
        let shift = 62 - (geo.cluster_bits - 8);
        let offset = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (geo.cluster_bits - 8)) - 1)) + 1;
        return Ok(Cluster::Compressed {
            offset,
            stored_len: sectors * 512 - (offset & 511),
        });
    }
    let off = entry & OFFSET_MASK;
    let check_host = |host: u64| -> Result<u64, String> {
        if host & (geo.cluster_size() - 1) != 0 {
            return Err(format!("cluster offset {host:#x} is not cluster-aligned"));
        }
        if geo.has_data_file && host != guest_cluster {
            return Err(format!(
                "external data file offset {host:#x} differs from the guest offset {guest_cluster:#x}"
            ));
        }
        Ok(host)
    };
    // Offset 0 is a valid data file offset; COPIED (refcount 1) tells it from "unallocated".
    let allocated = off != 0 || (geo.has_data_file && entry & OFLAG_COPIED != 0);
    if !geo.extended_l2 {
        if entry & OFLAG_ZERO != 0 {
            if geo.version < 3 {
                return Err("zero flag in a version 2 image".into());
            }
            if off != 0 {
                check_host(off)?;
            }
            return Ok(Cluster::Zero);
        }
        return Ok(if allocated {
            Cluster::Normal {
                host: check_host(off)?,
            }
        } else {
            Cluster::Unallocated
        });
    }
    let zero = bitmap >> 32 & 1 << sub != 0;
    let alloc = bitmap & 1 << sub != 0;
    if allocated {
        if (bitmap >> 32) & bitmap != 0 {
            return Err(format!(
                "subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero"
            ));
        }
        let host = check_host(off)?;
        Ok(if zero {
            Cluster::Zero
        } else if alloc {
            Cluster::Normal { host }
        } else {
            Cluster::Unallocated
        })
    } else if bitmap & ALL_ALLOC != 0 {
        Err(format!(
            "subcluster bitmap {bitmap:#018x} allocates subclusters of an unallocated cluster"
        ))
    } else if zero {
        Ok(Cluster::Zero)
    } else {
        Ok(Cluster::Unallocated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G16: Geometry = Geometry {
        cluster_bits: 16,
        version: 3,
        extended_l2: false,
        has_data_file: false,
    };

    #[test]
    fn standard_entries() {
        assert_eq!(decode(&G16, 0, 0, 0, 0), Ok(Cluster::Unallocated));
        assert_eq!(
            decode(&G16, OFLAG_COPIED | 0x50000, 0, 0, 0),
            Ok(Cluster::Normal { host: 0x50000 })
        );
        // Reserved bits 1..8 and 56..61 are ignored, as QEMU does.
        assert_eq!(
            decode(&G16, 0x0100_0000_0005_0002, 0, 0, 0),
            Ok(Cluster::Normal { host: 0x50000 })
        );
        assert_eq!(decode(&G16, OFLAG_ZERO, 0, 0, 0), Ok(Cluster::Zero));
        assert_eq!(
            decode(&G16, OFLAG_ZERO | 0x70000, 0, 0, 0),
            Ok(Cluster::Zero)
        );
        assert!(
            decode(&G16, 0x50200, 0, 0, 0)
                .unwrap_err()
                .contains("aligned")
        );
        assert!(decode(&G16, OFLAG_ZERO | 0x70200, 0, 0, 0).is_err());
        let v2 = Geometry { version: 2, ..G16 };
        assert!(
            decode(&v2, OFLAG_ZERO, 0, 0, 0)
                .unwrap_err()
                .contains("version 2")
        );
    }

    #[test]
    fn compressed_descriptor_split_depends_on_cluster_bits() {
        // 64 KiB clusters: offset in bits 0..53, sector count in 54..61.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x12345;
        let want = Cluster::Compressed {
            offset: 0x12345,
            stored_len: 4 * 512 - 0x145,
        };
        assert_eq!(decode(&G16, e, 0, 0, 0), Ok(want));
        // 512-byte clusters: offset in bits 0..60, one count bit (61).
        let g9 = Geometry {
            cluster_bits: 9,
            ..G16
        };
        let e = OFLAG_COMPRESSED | (1u64 << 61) | 0x1000;
        assert_eq!(
            decode(&g9, e, 0, 0, 0),
            Ok(Cluster::Compressed {
                offset: 0x1000,
                stored_len: 1024
            })
        );
        // 2 MiB clusters: offset in bits 0..48, count in 49..61.
        let g21 = Geometry {
            cluster_bits: 21,
            ..G16
        };
        let e = OFLAG_COMPRESSED | (0x1fffu64 << 49) | 0x200;
        assert_eq!(
            decode(&g21, e, 0, 0, 0),
            Ok(Cluster::Compressed {
                offset: 0x200,
                stored_len: 0x2000 * 512
            })
        );
        let df = Geometry {
            has_data_file: true,
            ..G16
        };
        assert!(decode(&df, e, 0, 0, 0).is_err());
    }

    #[test]
    fn data_file_offsets() {
        let df = Geometry {
            has_data_file: true,
            ..G16
        };
        assert_eq!(
            decode(&df, OFLAG_COPIED, 0, 0, 0),
            Ok(Cluster::Normal { host: 0 })
        );
        assert_eq!(decode(&df, 0, 0, 0, 0), Ok(Cluster::Unallocated));
        assert_eq!(
            decode(&df, 0x30000, 0, 0, 0x30000),
            Ok(Cluster::Normal { host: 0x30000 })
        );
        assert!(
            decode(&df, 0x30000, 0, 0, 0x40000)
                .unwrap_err()
                .contains("differs")
        );
    }

    #[test]
    fn extended_entries() {
        let g = Geometry {
            extended_l2: true,
            ..G16
        };
        let bitmap = 0b0101 | (0b1000u64 << 32);
        let e = 0x80000;
        let states: Vec<_> = (0..5)
            .map(|s| decode(&g, e, bitmap, s, 0).unwrap())
            .collect();
        use Cluster::*;
        let n = Normal { host: 0x80000 };
        assert_eq!(states, vec![n, Unallocated, n, Zero, Unallocated]);
        // The ZERO flag of the descriptor is not used with extended L2.
        assert_eq!(decode(&g, OFLAG_ZERO, 0, 0, 0), Ok(Unallocated));
        assert_eq!(decode(&g, 0, 1 << 33, 1, 0), Ok(Zero));
        assert!(decode(&g, 0, 1, 0, 0).is_err());
        assert!(decode(&g, e, 1 | 1 << 32, 5, 0).is_err());
        assert!(decode(&g, 0x80200, 1, 0, 0).is_err());
    }

    #[test]
    fn l1_entries() {
        assert_eq!(l2_offset(&G16, 0), Ok(None));
        assert_eq!(l2_offset(&G16, OFLAG_COPIED | 0x20000), Ok(Some(0x20000)));
        assert!(l2_offset(&G16, 0x20200).is_err());
        assert_eq!(G16.l1_entries_for((1 << 29) + 1), 2);
        let g = Geometry {
            extended_l2: true,
            ..G16
        };
        assert_eq!(g.l1_span_bits(), 28);
        assert_eq!(g.subcluster_bits(), 11);
    }
}
