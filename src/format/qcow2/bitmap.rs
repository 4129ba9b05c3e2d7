//! QEMU persistent dirty bitmaps: the bitmaps header extension, the bitmap directory and
//! each bitmap's table and data clusters (docs/interop/qcow2.txt, "Bitmaps"), decoded with
//! the checks QEMU makes when it loads them, so a hostile image gets an error naming the
//! field, never a panic or an allocation it chose.
//!
//! A bitmap covers the virtual disk at its granularity: bit `i` stands for guest bytes
//! `[i << granularity_bits, (i + 1) << granularity_bits)`. Its serialized form is a byte
//! string (bit `i` is bit `i % 8` of byte `i / 8`) cut into clusters; the table maps each
//! cluster to a host cluster or says it reads as all zeros or all ones.

use super::Qcow2Image;
use super::header::AUTOCLEAR_BITMAPS;
use crate::changes::ranges::push_range;
use crate::endian::{be16, be32, be64};
use crate::error::{Error, Result};
use crate::storage::HostFile;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
/// QEMU's limits (block/qcow2-bitmap.c, block/qcow2.h).
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
const MAX_TABLE_SIZE: u32 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME_SIZE: usize = 1023;
pub const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
const ENTRY_FIXED_LEN: usize = 24;
const TYPE_DIRTY_TRACKING: u8 = 1;
pub const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const TABLE_ALL_ONES: u64 = 1;

/// The bitmaps header extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Decodes the extension data found at file offset `at` (its header).
    pub fn parse(data: &[u8], at: u64, cs: u64, file: &Path) -> Result<BitmapsExt> {
        let bad = |what: String| Error::corrupt(file, "bitmaps extension", at, what);
        if data.len() < 24 {
            return Err(bad(format!("{} bytes, it has 24", data.len())));
        }
        let ext = BitmapsExt {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        };
        if be32(data, 4) != 0 {
            return Err(bad("the reserved field is not zero".into()));
        }
        if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
            return Err(bad(format!(
                "nb_bitmaps {} is outside 1..={MAX_BITMAPS}",
                ext.nb_bitmaps
            )));
        }
        if ext.directory_size == 0 || ext.directory_size > MAX_DIRECTORY_SIZE {
            return Err(bad(format!(
                "bitmap_directory_size {} is outside 1..={MAX_DIRECTORY_SIZE}",
                ext.directory_size
            )));
        }
        if ext.directory_offset == 0 || !ext.directory_offset.is_multiple_of(cs) {
            return Err(bad(format!(
                "bitmap_directory_offset {:#x} is not a cluster-aligned offset",
                ext.directory_offset
            )));
        }
        Ok(ext)
    }
}

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Where the entry starts in the file (its flags are at +12).
    pub entry_offset: u64,
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    pub name: String,
}

impl BitmapEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    /// Enabled: every write to the disk must set its bits.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }
    /// File offset of the 32-bit flags field.
    pub fn flags_offset(&self) -> u64 {
        self.entry_offset + 12
    }
    /// The bytes the bitmap serializes to for a disk of `disk_size` bytes.
    pub fn serialized_len(&self, disk_size: u64) -> u64 {
        disk_size.div_ceil(self.granularity()).div_ceil(8)
    }
}

/// Decodes the directory (`dir`, read from `ext.directory_offset`) as QEMU's
/// `bitmap_list_load` and `check_dir_entry` do.
pub fn parse_directory(
    dir: &[u8],
    ext: &BitmapsExt,
    cs: u64,
    disk_size: u64,
    file: &Path,
) -> Result<Vec<BitmapEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let at = ext.directory_offset + pos as u64;
        let bad = |what: String| Error::corrupt(file, "bitmap directory entry", at, what);
        if out.len() as u32 >= ext.nb_bitmaps {
            return Err(bad(format!(
                "more entries than the {} the extension declares",
                ext.nb_bitmaps
            )));
        }
        let h = dir
            .get(pos..pos + ENTRY_FIXED_LEN)
            .ok_or_else(|| bad("runs past the end of the directory".into()))?;
        let name_size = usize::from(be16(h, 18));
        let extra = be32(h, 20);
        if extra != 0 {
            return Err(bad(format!(
                "{extra} bytes of extra data (QEMU supports none)"
            )));
        }
        let len = (ENTRY_FIXED_LEN + name_size).next_multiple_of(8);
        let name = dir
            .get(pos + ENTRY_FIXED_LEN..pos + ENTRY_FIXED_LEN + name_size)
            .filter(|_| pos + len <= dir.len())
            .ok_or_else(|| bad("runs past the end of the directory".into()))?;
        let e = BitmapEntry {
            entry_offset: at,
            table_offset: be64(h, 0),
            table_size: be32(h, 8),
            flags: be32(h, 12),
            granularity_bits: h[17],
            name: String::from_utf8_lossy(name).into_owned(),
        };
        check_entry(&e, h[16], name_size, cs, disk_size).map_err(bad)?;
        out.push(e);
        pos += len;
    }
    if out.len() as u32 != ext.nb_bitmaps {
        return Err(Error::corrupt(
            file,
            "bitmap directory",
            ext.directory_offset,
            format!(
                "{} entries, the extension declares {}",
                out.len(),
                ext.nb_bitmaps
            ),
        ));
    }
    Ok(out)
}

fn check_entry(
    e: &BitmapEntry,
    kind: u8,
    name_size: usize,
    cs: u64,
    disk_size: u64,
) -> std::result::Result<(), String> {
    if e.table_size == 0 || e.table_size > MAX_TABLE_SIZE {
        return Err(format!(
            "bitmap_table_size {} is outside 1..={MAX_TABLE_SIZE}",
            e.table_size
        ));
    }
    if e.table_offset == 0 || !e.table_offset.is_multiple_of(cs) {
        return Err(format!(
            "bitmap_table_offset {:#x} is not a cluster-aligned offset",
            e.table_offset
        ));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
        return Err(format!(
            "granularity_bits {} is outside {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}",
            e.granularity_bits
        ));
    }
    if e.flags & RESERVED_FLAGS != 0 {
        return Err(format!("reserved flags are set ({:#x})", e.flags));
    }
    if name_size == 0 || name_size > MAX_NAME_SIZE {
        return Err(format!(
            "name_size {name_size} is outside 1..={MAX_NAME_SIZE}"
        ));
    }
    if kind != TYPE_DIRTY_TRACKING {
        return Err(format!("type {kind} (only 1, dirty tracking, exists)"));
    }
    let phys = u64::from(e.table_size) * cs;
    if phys > MAX_PHYS_SIZE {
        return Err(format!(
            "{phys} bytes of bitmap data exceed the limit of {MAX_PHYS_SIZE}"
        ));
    }
    // An in-use bitmap may be outdated (not saved after a resize); a valid one must fit.
    if !e.in_use() && e.serialized_len(disk_size) > phys {
        return Err(format!(
            "its {} table entries cannot hold a bitmap of a {disk_size}-byte disk",
            e.table_size
        ));
    }
    Ok(())
}

/// Checks one table entry as QEMU's `check_table_entry` does.
pub fn check_table_entry(entry: u64, cs: u64) -> std::result::Result<(), String> {
    if entry & TABLE_RESERVED != 0 {
        return Err(format!("reserved bits are set in {entry:#018x}"));
    }
    let off = entry & TABLE_OFFSET_MASK;
    if off != 0 && (entry & TABLE_ALL_ONES != 0 || !off.is_multiple_of(cs)) {
        return Err(format!("{entry:#018x} is not a valid cluster reference"));
    }
    Ok(())
}

/// The bitmaps of an image, as its header and directory say.
#[derive(Clone, Debug)]
pub struct Bitmaps {
    pub ext: BitmapsExt,
    /// Where the extension's header lies in cluster 0.
    pub ext_offset: u64,
    pub entries: Vec<BitmapEntry>,
}

impl Qcow2Image {
    /// The image's bitmaps. None when it has none, or when the autoclear bit says the
    /// extension is stale (a program that did not know bitmaps wrote the image: QEMU then
    /// ignores them too).
    pub fn bitmaps(&self) -> Result<Option<Bitmaps>> {
        let Some((at, data)) = &self.extensions.bitmaps else {
            return Ok(None);
        };
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(None);
        }
        let cs = self.geometry.cluster_size();
        let ext = BitmapsExt::parse(data, *at, cs, &self.path)?;
        let dir = self.file.read_table(
            ext.directory_offset,
            ext.directory_size,
            MAX_DIRECTORY_SIZE,
            "bitmap directory",
        )?;
        let entries = parse_directory(&dir, &ext, cs, self.size, &self.path)?;
        Ok(Some(Bitmaps {
            ext,
            ext_offset: *at,
            entries,
        }))
    }

    /// The table of bitmap `e`, each entry checked.
    pub fn bitmap_table(&self, e: &BitmapEntry) -> Result<Vec<u64>> {
        let bytes = u64::from(e.table_size) * 8;
        let field = format!("bitmap {:?} table", e.name);
        let raw =
            self.file
                .read_table(e.table_offset, bytes, u64::from(MAX_TABLE_SIZE) * 8, &field)?;
        let cs = self.geometry.cluster_size();
        raw.chunks_exact(8)
            .enumerate()
            .map(|(i, c)| {
                let v = be64(c, 0);
                check_table_entry(v, cs).map(|_| v).map_err(|w| {
                    Error::corrupt(&self.path, &field, e.table_offset + 8 * i as u64, w)
                })
            })
            .collect()
    }

    /// The bits of bitmap `e` (which must not be in use: its data would be meaningless).
    pub fn bitmap_bits(&self, e: &BitmapEntry, table: &[u64]) -> Result<Bits> {
        let cs = self.geometry.cluster_size();
        let bits = Bits::new(self.size, e.granularity_bits);
        let need = e.serialized_len(self.size).div_ceil(cs);
        if need != table.len() as u64 {
            return Err(Error::corrupt(
                &self.path,
                &format!("bitmap {:?} table", e.name),
                e.table_offset,
                format!(
                    "{} entries, a {}-byte disk needs {need}",
                    table.len(),
                    self.size
                ),
            ));
        }
        let mut buf = vec![0u8; cs as usize];
        for (i, &t) in table.iter().enumerate() {
            let host = t & TABLE_OFFSET_MASK;
            if host != 0 {
                read_cluster(&self.file, host, &mut buf, &e.name)?;
                bits.load_cluster(i as u64, cs, &buf);
            } else if t & TABLE_ALL_ONES != 0 {
                buf.fill(0xff);
                bits.load_cluster(i as u64, cs, &buf);
            }
        }
        Ok(bits)
    }
}

fn read_cluster(file: &HostFile, host: u64, buf: &mut [u8], name: &str) -> Result<()> {
    file.read_exact_at(buf, host, &format!("bitmap {name:?} data cluster"))
}

/// A bitmap in memory: bits that writers set concurrently without a lock.
pub struct Bits {
    words: Box<[AtomicU64]>,
    /// Number of meaningful bits (the disk size over the granularity, rounded up).
    count: u64,
    granularity_bits: u8,
}

impl Bits {
    pub fn new(disk_size: u64, granularity_bits: u8) -> Bits {
        let count = disk_size.div_ceil(1 << granularity_bits);
        Bits {
            words: (0..count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            count,
            granularity_bits,
        }
    }

    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Sets the bits of every granule that [off, off+len) touches.
    pub fn mark(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.granularity_bits;
        let last = ((off.saturating_add(len) - 1) >> self.granularity_bits)
            .min(self.count.saturating_sub(1));
        let mut bit = first;
        while bit <= last && bit < self.count {
            let w = (bit / 64) as usize;
            let from = bit % 64;
            let to = (last - bit + from).min(63);
            let mask = (u64::MAX >> (63 - to)) & (u64::MAX << from);
            self.words[w].fetch_or(mask, Ordering::AcqRel);
            bit += to - from + 1;
        }
    }

    pub fn get(&self, bit: u64) -> bool {
        bit < self.count
            && self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Guest ranges inside [off, end) whose bits are set, sorted and merged.
    pub fn ranges(&self, off: u64, end: u64) -> Vec<Range<u64>> {
        let g = self.granularity_bits;
        let mut out = Vec::new();
        if off >= end {
            return out;
        }
        let mut bit = off >> g;
        let last = ((end - 1) >> g).min(self.count.saturating_sub(1));
        while bit <= last && bit < self.count {
            let word = self.words[(bit / 64) as usize].load(Ordering::Acquire) >> (bit % 64);
            if word == 0 {
                bit = (bit / 64 + 1) * 64;
                continue;
            }
            let skip = word.trailing_zeros();
            bit += u64::from(skip);
            if bit > last {
                break;
            }
            // The run of set bits from here to the end of this word at most.
            let ones = u64::from((!(word >> skip)).trailing_zeros());
            let run_end = (bit + ones).min(last + 1);
            push_range(&mut out, (bit << g).max(off)..(run_end << g).min(end));
            bit = run_end;
        }
        out
    }

    /// The serialized bytes of cluster `index` (of `cs` bytes): tail bits past the disk are 0.
    pub fn cluster_bytes(&self, index: u64, cs: u64) -> Vec<u8> {
        let mut out = vec![0u8; cs as usize];
        let first_word = index * cs / 8;
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            if let Some(w) = self.words.get((first_word + i as u64) as usize) {
                chunk.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
            }
        }
        out
    }

    /// ORs serialized cluster `index` into the bits (bits past the disk are ignored).
    fn load_cluster(&self, index: u64, cs: u64, buf: &[u8]) {
        let first_word = index * cs / 8;
        for (i, chunk) in buf.chunks_exact(8).enumerate() {
            let wi = first_word + i as u64;
            let Some(w) = self.words.get(wi as usize) else {
                break;
            };
            let mut v = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            let valid = self.count.saturating_sub(wi * 64);
            if valid < 64 {
                v &= (1u64 << valid) - 1;
            }
            w.fetch_or(v, Ordering::AcqRel);
        }
    }

    /// Whether any bit is set.
    pub fn any(&self) -> bool {
        self.words.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    fn entry(table: u64, size: u32, flags: u32, gran: u8, name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(table.to_be_bytes());
        v.extend(size.to_be_bytes());
        v.extend(flags.to_be_bytes());
        v.push(1);
        v.push(gran);
        v.extend((name.len() as u16).to_be_bytes());
        v.extend(0u32.to_be_bytes());
        v.extend(name.as_bytes());
        v.resize(v.len().next_multiple_of(8), 0);
        v
    }

    fn ext(nb: u32, size: u64) -> BitmapsExt {
        BitmapsExt {
            nb_bitmaps: nb,
            directory_size: size,
            directory_offset: 0x50000,
        }
    }

    #[test]
    fn directory_entries_decode() {
        let mut dir = entry(0x60000, 1, FLAG_AUTO, 16, "backup-1");
        dir.extend(entry(0x70000, 1, FLAG_IN_USE, 9, "b2"));
        let p = Path::new("b.qcow2");
        let e = parse_directory(&dir, &ext(2, dir.len() as u64), CS, 1 << 30, p).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, "backup-1");
        assert!(e[0].auto() && !e[0].in_use());
        assert_eq!(e[0].granularity(), 65536);
        assert_eq!(e[1].entry_offset, 0x50000 + 32);
        assert!(e[1].in_use());
    }

    #[test]
    fn hostile_directories_are_refused() {
        let p = Path::new("b.qcow2");
        let ok = entry(0x60000, 1, FLAG_AUTO, 16, "x");
        let err = |dir: &[u8], nb: u32, size: u64| {
            parse_directory(dir, &ext(nb, dir.len() as u64), CS, size, p)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&ok, 2, 1 << 20).contains("declares 2"));
        let two = [ok.clone(), ok.clone()].concat();
        assert!(err(&two, 1, 1 << 20).contains("more entries"));
        assert!(err(&ok[..20], 1, 1 << 20).contains("past the end"));
        type Patch = fn(&mut Vec<u8>);
        let cases: [(Patch, &str); 8] = [
            (
                |e| e[8..12].copy_from_slice(&0u32.to_be_bytes()),
                "bitmap_table_size",
            ),
            (
                |e| e[0..8].copy_from_slice(&0x60200u64.to_be_bytes()),
                "bitmap_table_offset",
            ),
            (|e| e[17] = 8, "granularity_bits"),
            (|e| e[17] = 32, "granularity_bits"),
            (
                |e| e[12..16].copy_from_slice(&8u32.to_be_bytes()),
                "reserved flags",
            ),
            (|e| e[16] = 2, "type 2"),
            (
                |e| e[20..24].copy_from_slice(&4u32.to_be_bytes()),
                "extra data",
            ),
            (
                |e| e[18..20].copy_from_slice(&0u16.to_be_bytes()),
                "name_size",
            ),
        ];
        for (patch, want) in cases {
            let mut e = ok.clone();
            patch(&mut e);
            let msg = err(&e, 1, 1 << 20);
            assert!(msg.contains(want), "{msg} should mention {want}");
        }
        // One 64 KiB cluster of bits at 64 KiB granularity covers 32 GiB, not more.
        assert!(err(&ok, 1, (32 << 30) + 1).contains("cannot hold"));
        assert!(parse_directory(&ok, &ext(1, 32), CS, 32 << 30, p).is_ok());
        // ... unless the bitmap is in use (left inconsistent by a resize).
        let mut used = ok.clone();
        used[12..16].copy_from_slice(&(FLAG_IN_USE | FLAG_AUTO).to_be_bytes());
        assert!(parse_directory(&used, &ext(1, 32), CS, 64 << 30, p).is_ok());
    }

    #[test]
    fn extension_and_table_entries_are_checked() {
        let p = Path::new("b.qcow2");
        let mut d = vec![0u8; 24];
        d[0..4].copy_from_slice(&1u32.to_be_bytes());
        d[8..16].copy_from_slice(&32u64.to_be_bytes());
        d[16..24].copy_from_slice(&0x50000u64.to_be_bytes());
        assert_eq!(BitmapsExt::parse(&d, 0x70, CS, p).unwrap(), ext(1, 32));
        let mut bad = d.clone();
        bad[16..24].copy_from_slice(&0x50001u64.to_be_bytes());
        assert!(BitmapsExt::parse(&bad, 0x70, CS, p).is_err());
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(BitmapsExt::parse(&bad, 0x70, CS, p).is_err());
        assert!(BitmapsExt::parse(&d[..20], 0x70, CS, p).is_err());
        assert!(check_table_entry(0, CS).is_ok());
        assert!(check_table_entry(TABLE_ALL_ONES, CS).is_ok());
        assert!(check_table_entry(0x60000, CS).is_ok());
        assert!(check_table_entry(0x60000 | TABLE_ALL_ONES, CS).is_err());
        assert!(check_table_entry(0x60200, CS).is_err());
        assert!(check_table_entry(1 << 60, CS).is_err());
    }

    #[test]
    fn bits_mark_and_enumerate_ranges() {
        // 1 MiB + 1 byte at 64 KiB granularity: 17 bits.
        let b = Bits::new((1 << 20) + 1, 16);
        b.mark(5, 1);
        b.mark(0x30000 - 1, 2);
        b.mark(1 << 20, 1);
        b.mark(1 << 40, 1 << 20); // past the disk: ignored
        assert_eq!(
            b.ranges(0, 2 << 20),
            vec![0..0x10000, 0x20000..0x40000, 0x100000..0x110000]
        );
        assert_eq!(b.ranges(7, 0x25000), vec![7..0x10000, 0x20000..0x25000]);
        assert!(b.get(16) && !b.get(17) && !b.get(15));
        // A long run crosses words.
        let b = Bits::new(1 << 30, 9);
        b.mark(1000, 300_000);
        assert_eq!(
            b.ranges(0, 1 << 30),
            vec![512..(1000 + 300_000u64).next_multiple_of(512)]
        );
    }

    #[test]
    fn serialization_round_trips_and_keeps_tail_bits_clear() {
        let b = Bits::new(100 << 16, 16);
        b.mark(0, 1);
        b.mark(9 << 16, 1);
        b.mark(99 << 16, 1);
        let c = b.cluster_bytes(0, 512);
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 2);
        assert_eq!(c[12], 8);
        let copy = Bits::new(100 << 16, 16);
        let ones = vec![0xffu8; 512];
        copy.load_cluster(0, 512, &ones);
        assert_eq!(copy.ranges(0, u64::MAX), vec![0..100 << 16]);
        assert_eq!(copy.cluster_bytes(0, 512)[12], 0x0f);
        let back = Bits::new(100 << 16, 16);
        back.load_cluster(0, 512, &c);
        assert_eq!(back.ranges(0, u64::MAX), b.ranges(0, u64::MAX));
    }
}
