//! A small VHD writer for the tests, written from the spec: dynamic and differencing disks
//! (footer copy, dynamic header, BAT, parent locators, blocks with sector bitmaps, footer)
//! and fixed disks, plus the byte-patching helpers the hostile-image tests use.
#![allow(dead_code)]

use std::collections::BTreeMap;

pub const SECTOR: u64 = 512;

/// One's complement of the byte sum, the 4-byte field at `at` counted as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |a, (_, &x)| a.wrapping_add(x as u32));
    !sum
}

pub fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Recomputes the checksum of the footer at `at` (512 bytes).
pub fn fix_footer(img: &mut [u8], at: usize) {
    let c = checksum(&img[at..at + 512], 64);
    put_be32(img, at + 64, c);
}

/// Recomputes the checksum of the dynamic header at `at` (1024 bytes).
pub fn fix_dyn_header(img: &mut [u8], at: usize) {
    let c = checksum(&img[at..at + 1024], 36);
    put_be32(img, at + 36, c);
}

/// Fixes both footer copies and the dynamic header at 512 of a dynamic/differencing image.
pub fn fix_all(img: &mut [u8]) {
    let n = img.len();
    fix_footer(img, 0);
    fix_footer(img, n - 512);
    fix_dyn_header(img, 512);
}

/// The footer UUID of a VHD file's bytes (from the footer at the end).
pub fn footer_uuid(img: &[u8]) -> [u8; 16] {
    let f = &img[img.len() - 512..];
    f[68..84].try_into().unwrap()
}

pub struct Block {
    pub bitmap: Vec<u8>,
    pub data: Vec<u8>,
}

/// A dynamic (type 3) or differencing (type 4) disk under construction.
pub struct Sparse {
    pub size: u64,
    pub block_size: u64,
    pub disk_type: u32,
    pub creator: [u8; 4],
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
    pub parent_name: String,
    /// (platform code, stored bytes).
    pub locators: Vec<([u8; 4], Vec<u8>)>,
    pub blocks: BTreeMap<u64, Block>,
    /// Extra BAT entries past the virtual size (max_table_entries - needed).
    pub spare_entries: u32,
}

impl Sparse {
    pub fn new(size: u64, block_size: u64, disk_type: u32, uuid: [u8; 16]) -> Sparse {
        Sparse {
            size,
            block_size,
            disk_type,
            creator: *b"win ",
            uuid,
            parent_uuid: [0; 16],
            parent_name: String::new(),
            locators: Vec::new(),
            blocks: BTreeMap::new(),
            spare_entries: 0,
        }
    }

    pub fn bitmap_len(&self) -> usize {
        ((self.block_size / SECTOR / 8) as usize)
            .div_ceil(512)
            .max(1)
            * 512
    }

    /// Allocates block `idx` with `junk` in its data area and an all-clear bitmap.
    pub fn alloc(&mut self, idx: u64, junk: Vec<u8>) {
        assert_eq!(junk.len() as u64, self.block_size);
        let bitmap = vec![0u8; self.bitmap_len()];
        self.blocks
            .entry(idx)
            .or_insert(Block { bitmap, data: junk });
    }

    /// Stores whole sectors at `off` and marks them present; `junk` makes the data area of a
    /// newly allocated block (what a reader must not show where bits are clear).
    pub fn write(&mut self, off: u64, data: &[u8], junk: &mut impl FnMut(usize) -> Vec<u8>) {
        assert!(off.is_multiple_of(SECTOR) && (data.len() as u64).is_multiple_of(SECTOR));
        let mut pos = 0usize;
        while pos < data.len() {
            let g = off + pos as u64;
            let idx = g / self.block_size;
            let in_block = (g % self.block_size) as usize;
            let n = (self.block_size as usize - in_block).min(data.len() - pos);
            let bs = self.block_size as usize;
            self.alloc(idx, junk(bs));
            let b = self.blocks.get_mut(&idx).unwrap();
            b.data[in_block..in_block + n].copy_from_slice(&data[pos..pos + n]);
            for s in in_block / 512..(in_block + n) / 512 {
                b.bitmap[s / 8] |= 0x80 >> (s % 8);
            }
            pos += n;
        }
    }

    /// Applies the sectors this disk holds (bit set) onto `below` (the parent's bytes, already
    /// sized to this disk): the model of a differencing read.
    pub fn overlay(&self, below: &mut [u8]) {
        for (&idx, b) in &self.blocks {
            for s in 0..(self.block_size / SECTOR) as usize {
                let g = idx * self.block_size + s as u64 * SECTOR;
                if g >= self.size || b.bitmap[s / 8] & (0x80 >> (s % 8)) == 0 {
                    continue;
                }
                let g = g as usize;
                below[g..g + 512].copy_from_slice(&b.data[s * 512..s * 512 + 512]);
            }
        }
    }

    /// What QEMU shows for a dynamic disk: whole allocated blocks, bitmaps ignored.
    pub fn qemu_view(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        for (&idx, b) in &self.blocks {
            let start = (idx * self.block_size) as usize;
            let end = (start + b.data.len()).min(out.len());
            out[start..end].copy_from_slice(&b.data[..end - start]);
        }
        out
    }

    pub fn footer(&self) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        put_be32(&mut f, 8, 2);
        put_be32(&mut f, 12, 0x10000);
        put_be64(&mut f, 16, 512);
        put_be32(&mut f, 24, 0x2a00_0000);
        f[28..32].copy_from_slice(&self.creator);
        put_be32(&mut f, 32, 0x000a_0000);
        f[36..40].copy_from_slice(b"Wi2k");
        put_be64(&mut f, 40, self.size);
        put_be64(&mut f, 48, self.size);
        f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
        put_be32(&mut f, 60, self.disk_type);
        f[68..84].copy_from_slice(&self.uuid);
        fix_footer(&mut f, 0);
        f
    }

    /// The image bytes: [footer copy][dyn header][BAT][locator data][blocks][footer].
    pub fn build(&self) -> Vec<u8> {
        let needed = self.size.div_ceil(self.block_size) as usize;
        let entries = needed + self.spare_entries as usize;
        let bat_off = 1536usize;
        let mut pos = (bat_off + entries * 4).next_multiple_of(512);
        let mut loc_slots = Vec::new();
        for (code, data) in &self.locators {
            loc_slots.push((*code, data.len(), pos));
            pos += data.len().next_multiple_of(512).max(512);
        }
        let mut bat = vec![0xffu8; entries * 4];
        let block_span = self.bitmap_len() + self.block_size as usize;
        let mut block_pos = Vec::new();
        for &idx in self.blocks.keys() {
            put_be32(&mut bat, idx as usize * 4, (pos / 512) as u32);
            block_pos.push(pos);
            pos += block_span;
        }
        let mut img = vec![0u8; pos + 512];
        let footer = self.footer();
        img[0..512].copy_from_slice(&footer);
        let n = img.len();
        img[n - 512..].copy_from_slice(&footer);
        let h = &mut img[512..1536];
        h[0..8].copy_from_slice(b"cxsparse");
        put_be64(h, 8, u64::MAX);
        put_be64(h, 16, bat_off as u64);
        put_be32(h, 24, 0x10000);
        put_be32(h, 28, entries as u32);
        put_be32(h, 32, self.block_size as u32);
        h[40..56].copy_from_slice(&self.parent_uuid);
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            h[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, (code, len, off)) in loc_slots.iter().enumerate() {
            let at = 576 + 24 * i;
            h[at..at + 4].copy_from_slice(code);
            put_be32(h, at + 4, len.next_multiple_of(512).max(512) as u32);
            put_be32(h, at + 8, *len as u32);
            put_be64(h, at + 16, *off as u64);
        }
        fix_dyn_header(&mut img, 512);
        img[bat_off..bat_off + bat.len()].copy_from_slice(&bat);
        for ((_, data), (_, len, off)) in self.locators.iter().zip(&loc_slots) {
            img[*off..*off + len].copy_from_slice(data);
        }
        for (b, &at) in self.blocks.values().zip(&block_pos) {
            let bl = b.bitmap.len();
            img[at..at + bl].copy_from_slice(&b.bitmap);
            img[at + bl..at + bl + b.data.len()].copy_from_slice(&b.data);
        }
        img
    }
}

/// Offset of locator slot `i` in a dynamic header that starts at 512.
pub fn locator_at(i: usize) -> usize {
    512 + 576 + 24 * i
}
