//! Which qcow2 metadata a host byte range belongs to, read from the image bytes themselves
//! (the tests' own parser, independent of the daemon's): header, L1, L2 tables, refcount table
//! and blocks, snapshot table and snapshot L1 tables. Data clusters have no role.

use std::collections::BTreeSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Header,
    L1,
    L2,
    RefTable,
    RefBlock,
    SnapTable,
    SnapL1,
}

impl Role {
    pub fn is_refcount(self) -> bool {
        matches!(self, Role::RefTable | Role::RefBlock)
    }
    /// Tables that point at clusters (or at tables): their writes must follow durable refcounts.
    pub fn is_table(self) -> bool {
        !self.is_refcount()
    }
    /// Structures whose change moves other structures (so the roles must be read again).
    fn is_root(self) -> bool {
        matches!(
            self,
            Role::Header | Role::L1 | Role::RefTable | Role::SnapTable | Role::SnapL1
        )
    }
}

const L1_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const RT_MASK: u64 = !0x1ff;
/// Bounds for a parse of possibly half-written metadata.
const MAX_ENTRIES: u64 = 1 << 22;

fn be(img: &[u8], off: u64, n: usize) -> u64 {
    let Ok(o) = usize::try_from(off) else {
        return 0;
    };
    match img.get(o..o.saturating_add(n)) {
        Some(b) => b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)),
        None => 0,
    }
}

/// The metadata map of one image state: sorted (start, end, role) byte ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub cluster_size: u64,
    pub refcount_table_clusters: u64,
    ranges: Vec<(u64, u64, Role)>,
}

impl Layout {
    pub fn parse(img: &[u8]) -> Layout {
        let bits = be(img, 20, 4);
        let cs = if (9..=21).contains(&bits) {
            1u64 << bits
        } else {
            65536
        };
        let mut ranges = vec![(0, cs, Role::Header)];
        let mut table = |off: u64, entries: u64, role: Role, child: Option<Role>| {
            if off == 0 || entries > MAX_ENTRIES {
                return;
            }
            let bytes = (entries * 8).div_ceil(cs) * cs;
            ranges.push((off, off + bytes.max(cs), role));
            if let Some(child) = child {
                let mask = if role == Role::RefTable {
                    RT_MASK
                } else {
                    L1_MASK
                };
                for i in 0..entries {
                    let e = be(img, off + i * 8, 8) & mask;
                    if e != 0 {
                        ranges.push((e, e + cs, child));
                    }
                }
            }
        };
        let rt_clusters = be(img, 56, 4);
        table(be(img, 40, 8), be(img, 36, 4), Role::L1, Some(Role::L2));
        table(
            be(img, 48, 8),
            rt_clusters * cs / 8,
            Role::RefTable,
            Some(Role::RefBlock),
        );
        let (nb, mut at) = (be(img, 60, 4), be(img, 64, 8));
        let start = at;
        for _ in 0..nb.min(65536) {
            let (l1, l1_size) = (be(img, at, 8), be(img, at + 8, 4));
            table(l1, l1_size, Role::SnapL1, Some(Role::L2));
            let (id, name, extra) = (
                be(img, at + 12, 2),
                be(img, at + 14, 2),
                be(img, at + 36, 4),
            );
            at += (40 + extra + id + name).div_ceil(8) * 8;
        }
        if nb > 0 {
            table(start, (at - start).div_ceil(8), Role::SnapTable, None);
        }
        ranges.sort();
        Layout {
            cluster_size: cs,
            refcount_table_clusters: rt_clusters,
            ranges,
        }
    }

    /// The roles of the metadata that `off..off+len` overlaps.
    pub fn roles_of(&self, off: u64, len: u64) -> BTreeSet<Role> {
        let end = off.saturating_add(len);
        self.ranges
            .iter()
            .filter(|&&(s, e, _)| s < end && off < e)
            .map(|&(_, _, r)| r)
            .collect()
    }

    /// Whether a write to these bytes may move metadata (so the map must be rebuilt).
    pub fn touches_root(&self, off: u64, len: u64) -> bool {
        self.roles_of(off, len).iter().any(|r| r.is_root())
    }
}
