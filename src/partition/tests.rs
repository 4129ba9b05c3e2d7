//! Tables built byte by byte: every branch of the parsers, and hostile variants of each.

use super::*;
use crate::error::{Error, Kind};

const MIB: u64 = 1 << 20;

fn scan_bytes(disk: &[u8], declared: Option<u32>) -> Table {
    let read = |off: u64, buf: &mut [u8]| -> Result<()> {
        let start = off as usize;
        buf.copy_from_slice(&disk[start..start + buf.len()]);
        Ok(())
    };
    scan(&read, disk.len() as u64, declared)
}

fn put_entry(sector: &mut [u8], slot: usize, boot: u8, kind: u8, start: u32, sectors: u32) {
    let e = &mut sector[446 + 16 * slot..462 + 16 * slot];
    e[0] = boot;
    e[4] = kind;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
}

fn sign(sector: &mut [u8]) {
    sector[510] = 0x55;
    sector[511] = 0xAA;
}

fn numbers(t: &Table) -> Vec<(u32, u64, u64)> {
    t.partitions
        .iter()
        .map(|p| (p.number, p.start, p.size))
        .collect()
}

/// A disk of `size` bytes with an MBR holding `entries` (boot, kind, start, sectors).
fn mbr_disk(size: u64, entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (i, (b, k, s, n)) in entries.iter().enumerate() {
        put_entry(&mut d[..512], i, *b, *k, *s, *n);
    }
    d[440..444].copy_from_slice(&0xDEADBEEFu32.to_le_bytes());
    sign(&mut d[..512]);
    d
}

/// Writes an EBR at byte `at`: a logical partition relative to it, and a link relative to
/// the extended partition's start.
fn ebr(d: &mut [u8], at: u64, logical: (u32, u32), link: Option<(u32, u32)>) {
    let s = &mut d[at as usize..at as usize + 512];
    put_entry(s, 0, 0, 0x83, logical.0, logical.1);
    if let Some((start, n)) = link {
        put_entry(s, 1, 0, 0x05, start, n);
    }
    sign(s);
}

#[test]
fn mbr_primaries_keep_their_slot_numbers() {
    let d = mbr_disk(
        16 * MIB,
        &[
            (0x80, 0x83, 2048, 4096),
            (0, 0, 0, 0),
            (0, 0x07, 8192, 2048),
        ],
    );
    let t = scan_bytes(&d, None);
    assert_eq!(
        t.scheme,
        Scheme::Mbr {
            disk_id: 0xDEADBEEF
        }
    );
    assert_eq!(t.sector_size, 512);
    assert_eq!(numbers(&t), [(1, MIB, 2 * MIB), (3, 4 * MIB, MIB)]);
    assert_eq!(t.partitions[1].kind, PartType::Mbr(0x07));
    assert_eq!(t.partitions[1].file_name(), "p3.raw");
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    assert!(
        t.watched
            .iter()
            .any(|r| r.contains(&0) && r.contains(&4096))
    );
}

#[test]
fn logical_partitions_follow_the_ebr_chain_from_5() {
    // Extended partition: sectors 4096..20480; three logicals.
    let mut d = mbr_disk(16 * MIB, &[(0, 0x83, 2048, 2048), (0, 0x0F, 4096, 16384)]);
    ebr(&mut d, 4096 * 512, (2048, 2048), Some((6144, 4096)));
    ebr(
        &mut d,
        (4096 + 6144) * 512,
        (2048, 1024),
        Some((10240, 4096)),
    );
    ebr(&mut d, (4096 + 10240) * 512, (1, 2047), None);
    let t = scan_bytes(&d, None);
    assert_eq!(
        numbers(&t),
        [
            (1, MIB, MIB),
            (5, (4096 + 2048) * 512, MIB),
            (6, (4096 + 6144 + 2048) * 512, MIB / 2),
            (7, (4096 + 10240 + 1) * 512, 2047 * 512),
        ]
    );
    assert!(
        t.watched
            .iter()
            .any(|r| r.contains(&((4096 + 10240) * 512)))
    );
}

#[test]
fn an_ebr_loop_ends_the_chain() {
    let mut d = mbr_disk(16 * MIB, &[(0, 0x05, 4096, 16384)]);
    ebr(&mut d, 4096 * 512, (2048, 100), Some((4096, 4096)));
    ebr(&mut d, 8192 * 512, (2048, 100), Some((0, 4096)));
    let t = scan_bytes(&d, None);
    assert_eq!(t.partitions.len(), 2);
    assert!(t.notes.iter().any(|n| n.contains("loops")), "{:?}", t.notes);
}

#[test]
fn logicals_outside_their_container_and_ebrs_past_the_disk_are_skipped() {
    let mut d = mbr_disk(16 * MIB, &[(0, 0x05, 4096, 8192)]);
    // The logical runs past the end of its 4 MiB container; the link points past the disk.
    ebr(&mut d, 4096 * 512, (2048, 100_000), Some((1 << 30, 10)));
    let t = scan_bytes(&d, None);
    assert!(t.partitions.is_empty());
    assert!(
        t.notes.iter().any(|n| n.contains("outside its extended")),
        "{:?}",
        t.notes
    );
    assert!(
        t.notes.iter().any(|n| n.contains("outside the disk")),
        "{:?}",
        t.notes
    );
}

#[test]
fn overlapping_and_too_long_partitions_are_skipped() {
    let d = mbr_disk(
        16 * MIB,
        &[
            (0, 0x83, 2048, 8192),
            (0, 0x83, 4096, 2048),
            (0, 0x83, 30000, 10000),
            (0, 0x83, u32::MAX, u32::MAX),
        ],
    );
    let t = scan_bytes(&d, None);
    assert_eq!(numbers(&t), [(1, MIB, 4 * MIB)]);
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("partition 2") && n.contains("overlaps partition 1"))
    );
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("partition 3") && n.contains("past the end"))
    );
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("partition 4") && n.contains("past the end"))
    );
}

#[test]
fn boot_sectors_and_blank_disks_are_not_tables() {
    assert_eq!(scan_bytes(&vec![0; 4096], None).scheme, Scheme::None);
    // A FAT boot sector ends in 55 AA but holds code where the boot flags would be.
    let mut d = mbr_disk(MIB, &[(0x33, 0x83, 1, 100)]);
    d[446] = 0x33;
    let t = scan_bytes(&d, None);
    assert_eq!((t.scheme, t.partitions.len()), (Scheme::None, 0));
    // Tiny disks never read past their end.
    assert_eq!(scan_bytes(&[0x55; 100], None).partitions.len(), 0);
    assert_eq!(scan_bytes(&[], None).partitions.len(), 0);
}

#[test]
fn read_errors_give_no_partitions_and_a_note() {
    let read = |_off: u64, _buf: &mut [u8]| -> Result<()> { Err(Error::new(Kind::Io, "boom")) };
    let t = scan(&read, 16 * MIB, None);
    assert!(t.partitions.is_empty());
    assert!(t.notes.iter().any(|n| n.contains("boom")), "{:?}", t.notes);
}

// --- GPT ---

const LINUX_FS: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";
const ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";

struct Gpt {
    ss: u64,
    size: u64,
    /// (entry index, type, first LBA, last LBA, name)
    parts: Vec<(usize, &'static str, u64, u64, &'static str)>,
    entries: u32,
}

impl Gpt {
    fn new(ss: u64, size: u64) -> Gpt {
        Gpt {
            ss,
            size,
            parts: Vec::new(),
            entries: 128,
        }
    }

    fn entry_array(&self) -> Vec<u8> {
        let mut a = vec![0u8; self.entries as usize * 128];
        for (i, kind, first, last, name) in &self.parts {
            let e = &mut a[i * 128..(i + 1) * 128];
            e[..16].copy_from_slice(&Uuid::parse_str(kind).unwrap().to_bytes_le());
            e[16..32].copy_from_slice(&[*i as u8 + 1; 16]);
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (j, c) in name.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
            }
        }
        a
    }

    fn header(&self, my: u64, alt: u64, entries_lba: u64, array: &[u8]) -> Vec<u8> {
        let last = self.size / self.ss - 1;
        let mut h = vec![0u8; self.ss as usize];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
        h[56..72].copy_from_slice(&[0xAB; 16]);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&self.entries.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(array).to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The disk with protective MBR, primary and backup.
    fn build(&self) -> Vec<u8> {
        let ss = self.ss as usize;
        let last = self.size / self.ss - 1;
        let mut d = vec![0u8; self.size as usize];
        let sectors = u32::try_from(last).unwrap_or(u32::MAX);
        put_entry(&mut d[..512], 0, 0, 0xEE, 1, sectors);
        sign(&mut d[..512]);
        let array = self.entry_array();
        let array_sectors = (array.len() as u64).div_ceil(self.ss);
        d[ss..2 * ss].copy_from_slice(&self.header(1, last, 2, &array));
        d[2 * ss..2 * ss + array.len()].copy_from_slice(&array);
        let backup_entries = last - array_sectors;
        let at = (backup_entries * self.ss) as usize;
        d[at..at + array.len()].copy_from_slice(&array);
        d[last as usize * ss..].copy_from_slice(&self.header(last, 1, backup_entries, &array));
        d
    }
}

fn sample(ss: u64) -> Gpt {
    let mut g = Gpt::new(ss, 64 * MIB);
    let lba = |bytes: u64| bytes / ss;
    g.parts
        .push((0, ESP, lba(MIB), lba(9 * MIB) - 1, "EFI system"));
    g.parts
        .push((2, LINUX_FS, lba(9 * MIB), lba(40 * MIB) - 1, "root ✓"));
    g
}

#[test]
fn gpt_entries_are_numbered_by_index_with_names_and_guids() {
    let t = scan_bytes(&sample(512).build(), None);
    let Scheme::Gpt {
        disk_guid,
        from_backup,
        hybrid,
    } = t.scheme
    else {
        panic!("{:?}", t.scheme);
    };
    assert_eq!(
        (disk_guid, from_backup, hybrid),
        (Uuid::from_bytes_le([0xAB; 16]), false, false)
    );
    assert_eq!(numbers(&t), [(1, MIB, 8 * MIB), (3, 9 * MIB, 31 * MIB)]);
    assert_eq!(t.partitions[0].name, "EFI system");
    assert_eq!(t.partitions[1].name, "root ✓");
    assert_eq!(
        t.partitions[1].kind,
        PartType::Gpt(Uuid::parse_str(LINUX_FS).unwrap())
    );
    assert_eq!(t.partitions[1].guid, Some(Uuid::from_bytes_le([3; 16])));
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    // Both headers and both arrays are watched.
    for off in [512, 1024, 64 * MIB - 512, 64 * MIB - 512 - 16384] {
        assert!(
            t.watched.iter().any(|r| r.contains(&off)),
            "{off} not watched"
        );
    }
}

#[test]
fn four_kib_sectors_are_found_or_taken_as_declared() {
    let d = sample(4096).build();
    let t = scan_bytes(&d, None);
    assert_eq!(t.sector_size, 4096);
    assert_eq!(numbers(&t), [(1, MIB, 8 * MIB), (3, 9 * MIB, 31 * MIB)]);
    assert!(
        t.notes.is_empty(),
        "the failed 512-byte try leaves no notes: {:?}",
        t.notes
    );
    assert_eq!(scan_bytes(&d, Some(4096)).partitions.len(), 2);
    // Declared 512 means LBA 1 is at 512: nothing there.
    assert!(scan_bytes(&d, Some(512)).partitions.is_empty());
}

#[test]
fn a_damaged_primary_falls_back_to_the_backup() {
    let good = sample(512).build();
    // Header CRC, then the entry array's CRC, then the signature.
    for (what, off) in [
        ("header", 512 + 40),
        ("entries", 1024 + 32),
        ("signature", 512),
    ] {
        let mut d = good.clone();
        d[off] ^= 0x40;
        let t = scan_bytes(&d, None);
        assert!(
            matches!(
                t.scheme,
                Scheme::Gpt {
                    from_backup: true,
                    ..
                }
            ),
            "{what}: {:?}",
            t.scheme
        );
        assert_eq!(t.partitions.len(), 2, "{what}");
        assert!(
            t.notes.iter().any(|n| n.contains("using the backup")),
            "{what}: {:?}",
            t.notes
        );
    }
    // A bad backup is noted and the primary serves.
    let mut d = good.clone();
    let n = d.len();
    d[n - 512 + 20] ^= 1;
    let t = scan_bytes(&d, None);
    assert!(matches!(
        t.scheme,
        Scheme::Gpt {
            from_backup: false,
            ..
        }
    ));
    assert!(
        t.notes.iter().any(|n| n.contains("backup GPT is damaged")),
        "{:?}",
        t.notes
    );
    // Both damaged: no partitions, never a guess from the protective MBR.
    let mut d = good;
    d[512 + 40] ^= 1;
    d[n - 512 + 40] ^= 1;
    let t = scan_bytes(&d, None);
    assert_eq!((t.scheme.clone(), t.partitions.len()), (Scheme::None, 0));
    assert!(
        t.notes.iter().any(|n| n.contains("without a usable GPT")),
        "{:?}",
        t.notes
    );
}

#[test]
fn hybrid_mbrs_use_the_gpt_and_stray_gpt_entries_give_nothing() {
    let mut d = sample(512).build();
    put_entry(&mut d[..512], 1, 0x80, 0x0C, 2048, 16384);
    let t = scan_bytes(&d, None);
    assert!(
        matches!(t.scheme, Scheme::Gpt { hybrid: true, .. }),
        "{:?}",
        t.scheme
    );
    assert_eq!(t.partitions.len(), 2);
    // 0xEE that does not start at LBA 1: Linux refuses the disk's tables altogether.
    let d = mbr_disk(16 * MIB, &[(0, 0xEE, 2, 100), (0, 0x83, 2048, 2048)]);
    assert!(scan_bytes(&d, None).partitions.is_empty());
}

#[test]
fn hostile_gpt_headers_are_refused_with_a_reason() {
    let mut g = sample(512);
    g.entries = 1 << 30;
    let t = scan_bytes(&g.build_small_array(), None);
    assert!(t.partitions.is_empty());
    assert!(
        t.notes.iter().any(|n| n.contains("too many")),
        "{:?}",
        t.notes
    );

    let mut g = sample(512);
    g.parts.push((5, LINUX_FS, 100, 50, "backwards"));
    g.parts.push((6, LINUX_FS, 100, 1 << 40, "huge"));
    let t = scan_bytes(&g.build(), None);
    assert_eq!(t.partitions.len(), 2);
    assert_eq!(
        t.notes.iter().filter(|n| n.contains("do not fit")).count(),
        2,
        "{:?}",
        t.notes
    );

    // Overlapping entries: the lower number stays.
    let mut g = sample(512);
    g.parts.push((1, LINUX_FS, 4096, 8191, "inside p1"));
    let t = scan_bytes(&g.build(), None);
    assert_eq!(
        t.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 3]
    );
}

impl Gpt {
    /// Like `build`, but the headers claim `self.entries` while the array holds 128.
    fn build_small_array(&self) -> Vec<u8> {
        let claimed = self.entries;
        let small = Gpt {
            ss: self.ss,
            size: self.size,
            parts: self.parts.clone(),
            entries: 128,
        };
        let mut d = small.build();
        let ss = self.ss as usize;
        let last = self.size / self.ss - 1;
        for at in [ss, last as usize * ss] {
            let h = &mut d[at..at + ss];
            h[80..84].copy_from_slice(&claimed.to_le_bytes());
            h[16..20].fill(0);
            let crc = crc32fast::hash(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
        }
        d
    }
}

#[test]
fn every_truncation_and_bit_flip_of_a_table_is_survived() {
    // Not a fuzzer, just a sweep: each prefix length and each single-byte flip in the first
    // sectors must scan without panicking and never yield a partition outside the disk.
    let good = sample(512).build();
    for cut in (0..good.len())
        .step_by(good.len() / 64)
        .chain([511, 512, 1023, 1024])
    {
        let t = scan_bytes(&good[..cut], None);
        assert!(
            t.partitions.iter().all(|p| p.end() <= cut as u64),
            "cut {cut}"
        );
    }
    let mut mbr = mbr_disk(4 * MIB, &[(0, 0x05, 2048, 4096)]);
    ebr(&mut mbr, 2048 * 512, (1, 100), Some((200, 100)));
    for i in (0..1024).chain(2048 * 512..2048 * 512 + 512) {
        for bit in [0x01, 0x80] {
            let mut d = mbr.clone();
            d[i] ^= bit;
            let t = scan_bytes(&d, None);
            assert!(t.partitions.iter().all(|p| p.end() <= d.len() as u64));
        }
    }
}
