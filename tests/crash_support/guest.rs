//! The guest side: every 512-byte sector a guest writes carries its own disk offset and a
//! generation (the rest of the sector derives from both), so a sector read back names
//! the write it came from and misplaced, stale or torn bytes are caught. The log of guest
//! operations, placed among the host operations by hostfs marks, says which versions of a
//! sector a crash at a given instant may show.

pub const SECTOR: u64 = 512;
const MAGIC: &[u8; 8] = b"VMFSCRSH";

/// Generation 0 means "all zeros" (never written, or discarded).
pub fn tagged(off: u64, generation: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SECTOR as usize);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&off.to_le_bytes());
    v.extend_from_slice(&generation.to_le_bytes());
    let mut x = (off.rotate_left(17) ^ generation.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    while v.len() < SECTOR as usize {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v
}

/// Sectors `off..off+len` written at generation `generation`.
pub fn tagged_range(off: u64, len: u64, generation: u64) -> Vec<u8> {
    (0..len / SECTOR)
        .flat_map(|i| tagged(off + i * SECTOR, generation))
        .collect()
}

/// What a sector read back holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Generation (0: zeros).
    Gen(u64),
    /// A whole tagged sector of another offset.
    Misplaced { from: u64, generation: u64 },
    /// Anything else (torn, garbage, a metadata cluster).
    Garbage,
}

pub fn identify(off: u64, bytes: &[u8]) -> Seen {
    if bytes.iter().all(|&b| b == 0) {
        return Seen::Gen(0);
    }
    if bytes.len() != SECTOR as usize || &bytes[..8] != MAGIC {
        return Seen::Garbage;
    }
    let from = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let generation = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    if tagged(from, generation) != bytes {
        Seen::Garbage
    } else if from != off {
        Seen::Misplaced { from, generation }
    } else {
        Seen::Gen(generation)
    }
}

/// One guest write or discard (a discard is generation 0), placed by hostfs marks.
#[derive(Clone, Debug)]
pub struct GuestOp {
    pub off: u64,
    pub len: u64,
    pub generation: u64,
    pub start: u64,
    pub end: u64,
}

/// The guest's history: the initial content, then writes/discards and fsyncs in order.
#[derive(Default)]
pub struct GuestLog {
    /// Generation of every sector before the workload.
    pub initial: Vec<u64>,
    pub ops: Vec<GuestOp>,
    /// (start, end) marks of each fsync/fdatasync that returned success.
    pub fsyncs: Vec<(u64, u64)>,
    /// Per sector: indexes into `ops`, in order.
    by_sector: Vec<Vec<u32>>,
}

impl GuestLog {
    pub fn new(initial: Vec<u64>) -> GuestLog {
        let n = initial.len();
        GuestLog {
            initial,
            by_sector: vec![Vec::new(); n],
            ..Default::default()
        }
    }

    pub fn push(&mut self, op: GuestOp) {
        let i = self.ops.len() as u32;
        for s in op.off / SECTOR..(op.off + op.len) / SECTOR {
            self.by_sector[s as usize].push(i);
        }
        self.ops.push(op);
    }

    /// The generation of every sector once everything has been written.
    pub fn last(&self) -> Vec<u64> {
        (0..self.initial.len())
            .map(|s| match self.by_sector[s].last() {
                Some(&i) => self.ops[i as usize].generation,
                None => self.initial[s],
            })
            .collect()
    }

    /// The generations sector `s` may show after a crash at `tc` (host sequence number):
    /// the last version an fsync that returned before the crash covers (or the initial
    /// content), and every version written after it whose write had begun.
    pub fn allowed(&self, s: usize, tc: u64) -> Vec<u64> {
        let acked_before = self
            .fsyncs
            .iter()
            .filter(|f| f.1 <= tc)
            .map(|f| f.0)
            .max()
            .unwrap_or(0);
        let mut allowed = vec![self.initial[s]];
        for &i in &self.by_sector[s] {
            let op = &self.ops[i as usize];
            if op.start > tc {
                break;
            }
            if op.end < acked_before {
                allowed.clear();
            }
            allowed.push(op.generation);
        }
        allowed
    }

    /// Checks a disk read back after a crash at `tc`; the first problems, described.
    pub fn check(&self, disk: &[u8], tc: u64) -> Vec<String> {
        let mut bad = Vec::new();
        for (s, bytes) in disk.chunks(SECTOR as usize).enumerate() {
            let off = s as u64 * SECTOR;
            let seen = identify(off, bytes);
            let allowed = self.allowed(s, tc);
            if matches!(seen, Seen::Gen(g) if allowed.contains(&g)) {
                continue;
            }
            let what = match seen {
                Seen::Gen(0) => "zeros".to_string(),
                Seen::Gen(g) => format!("generation {g}"),
                Seen::Misplaced { from, generation } => {
                    format!("the sector of offset {from:#x} generation {generation}")
                }
                Seen::Garbage => "bytes the guest never wrote".to_string(),
            };
            bad.push(format!(
                "guest sector {off:#x}: {what}, allowed generations {allowed:?}"
            ));
            if bad.len() >= 8 {
                break;
            }
        }
        if disk.len() as u64 != self.initial.len() as u64 * SECTOR {
            bad.push(format!("disk is {} bytes", disk.len()));
        }
        bad
    }
}
