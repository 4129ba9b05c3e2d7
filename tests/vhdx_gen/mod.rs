//! A small VHDX writer for the tests, written from MS-VHDX: images QEMU cannot make
//! (differencing disks, 4 KiB logical sectors, dirty logs, hostile fields).
#![allow(dead_code)]

pub mod model;

use crc32c::crc32c;
use std::collections::HashMap;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const LOG_OFF: u64 = MIB;
pub const LOG_LEN: u64 = MIB;
pub const META_OFF: u64 = 2 * MIB;
pub const BAT_OFF: u64 = 3 * MIB;
pub const HEADER_OFFS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_OFFS: [u64; 2] = [192 * KIB, 256 * KIB];

const BAT_GUID: [u8; 16] = guid(0x2DC27766, 0xF623, 0x4200, 0x9D64_115E_9BFD_4A08);
const META_GUID: [u8; 16] = guid(0x8B7CA206, 0x4790, 0x4B9A, 0xB8FE_575F_050F_886E);
pub const FILE_PARAMS: [u8; 16] = guid(0xCAA16737, 0xFA36, 0x4D43, 0xB3B6_33F0_AA44_E76B);
pub const VDISK_SIZE: [u8; 16] = guid(0x2FA54224, 0xCD1B, 0x4876, 0xB211_5DBE_D83B_F4B8);
const PAGE83: [u8; 16] = guid(0xBECA12AB, 0xB2E6, 0x4523, 0x93EF_C309_E000_C746);
const LSS: [u8; 16] = guid(0x8141BF1D, 0xA96F, 0x4709, 0xBA47_F233_A8FA_AB5F);
const PSS: [u8; 16] = guid(0xCDA348C7, 0x445D, 0x4471, 0x9CC9_E988_5251_C556);
const LOCATOR: [u8; 16] = guid(0xA8D35F2D, 0xB30B, 0x454D, 0xABF7_D3D8_4834_AB0C);
const LOCATOR_TYPE: [u8; 16] = guid(0xB04AEFB7, 0xD19E, 0x4A81, 0xB789_25B8_E944_5913);

/// The on-disk (mixed-endian) bytes of a GUID.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: u64) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    let d = d4.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` for on-disk GUID bytes.
pub fn guid_text(g: &[u8; 16]) -> String {
    format!(
        "{{{:08x}-{:04x}-{:04x}-{}-{}}}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8..10]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        g[10..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

#[derive(Clone, Debug)]
pub enum Block {
    NotPresent,
    Undefined,
    Zero,
    Unmapped,
    /// `block_size` bytes stored in this file.
    Full(Vec<u8>),
    /// `block_size` bytes stored, but only sectors whose flag is set are this file's.
    Partial(Vec<u8>, Vec<bool>),
    /// A raw BAT entry (hostile tests).
    Raw(u64),
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub data_write_guid: [u8; 16],
    pub leave_allocated: bool,
    /// Parent locator pairs; Some makes a differencing disk.
    pub parent: Option<Vec<(String, String)>>,
    /// One per payload block (missing ones are NOT_PRESENT).
    pub blocks: Vec<Block>,
}

impl Spec {
    pub fn new(virtual_size: u64, block_size: u32, logical_sector: u32) -> Spec {
        Spec {
            virtual_size,
            block_size,
            logical_sector,
            physical_sector: 4096,
            data_write_guid: guid(0x11223344, 0x5566, 0x7788, 0x99AA_BBCC_DDEE_FF00),
            leave_allocated: false,
            parent: None,
            blocks: Vec::new(),
        }
    }

    pub fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.logical_sector as u64 / self.block_size as u64
    }

    pub fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size as u64)
    }

    pub fn bat_entries(&self) -> u64 {
        let (n, cr) = (self.data_blocks(), self.chunk_ratio());
        if self.parent.is_some() {
            n.div_ceil(cr) * (cr + 1)
        } else {
            n + n.saturating_sub(1) / cr
        }
    }
}

fn put(img: &mut Vec<u8>, off: u64, bytes: &[u8]) {
    let end = off as usize + bytes.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[off as usize..end].copy_from_slice(bytes);
}

/// Recomputes the CRC-32C at `off + 4` of the `len`-byte structure at `off`.
pub fn fix_crc(img: &mut [u8], off: u64, len: usize) {
    let s = &mut img[off as usize..off as usize + len];
    s[4..8].fill(0);
    let c = crc32c(s);
    s[4..8].copy_from_slice(&c.to_le_bytes());
}

fn header(seq: u64, data_write: [u8; 16], log_guid: [u8; 16]) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[0..4].copy_from_slice(b"head");
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..32].copy_from_slice(&[0x5A; 16]);
    h[32..48].copy_from_slice(&data_write);
    h[48..64].copy_from_slice(&log_guid);
    h[66..68].copy_from_slice(&1u16.to_le_bytes());
    h[68..72].copy_from_slice(&(LOG_LEN as u32).to_le_bytes());
    h[72..80].copy_from_slice(&LOG_OFF.to_le_bytes());
    fix_crc(&mut h, 0, 4096);
    h
}

/// Sets the LogGuid of both headers (re-checksummed).
pub fn set_log_guid(img: &mut [u8], log_guid: [u8; 16]) {
    for off in HEADER_OFFS {
        img[off as usize + 48..off as usize + 64].copy_from_slice(&log_guid);
        fix_crc(img, off, 4096);
    }
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

fn locator(pairs: &[(String, String)]) -> Vec<u8> {
    let mut b = LOCATOR_TYPE.to_vec();
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
    let base = 20 + 12 * pairs.len();
    let mut strings = Vec::new();
    for (k, v) in pairs {
        let (k, v) = (utf16(k), utf16(v));
        let ko = base + strings.len();
        strings.extend_from_slice(&k);
        let vo = base + strings.len();
        strings.extend_from_slice(&v);
        for x in [ko as u32, vo as u32] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b.extend_from_slice(&(k.len() as u16).to_le_bytes());
        b.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    b.extend_from_slice(&strings);
    b
}

/// Where the metadata table entry of `item` lives (for hostile edits), if present.
pub fn metadata_entry(img: &[u8], item: [u8; 16]) -> Option<u64> {
    let count =
        u16::from_le_bytes([img[META_OFF as usize + 10], img[META_OFF as usize + 11]]) as u64;
    (0..count)
        .map(|i| META_OFF + 32 + 32 * i)
        .find(|&e| img[e as usize..e as usize + 16] == item)
}

/// The file offset of metadata item `item`'s value.
pub fn metadata_item(img: &[u8], item: [u8; 16]) -> u64 {
    let e = metadata_entry(img, item).unwrap() as usize;
    META_OFF + u32::from_le_bytes(img[e + 16..e + 20].try_into().unwrap()) as u64
}

/// Writes the image for `spec`.
pub fn build(spec: &Spec) -> Vec<u8> {
    let mut img = Vec::new();
    let mut ident = b"vhdxfile".to_vec();
    ident.extend_from_slice(&utf16("vmfs-mount test generator"));
    put(&mut img, 0, &ident);
    // header 1 is older and names another DataWriteGuid: readers must pick header 2
    put(&mut img, HEADER_OFFS[0], &header(1, [0xEE; 16], [0; 16]));
    put(
        &mut img,
        HEADER_OFFS[1],
        &header(2, spec.data_write_guid, [0; 16]),
    );

    let entries = spec.bat_entries();
    let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
    let mut regions = vec![0u8; 64 * 1024];
    regions[0..4].copy_from_slice(b"regi");
    regions[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (g, off, len)) in [(BAT_GUID, BAT_OFF, bat_len), (META_GUID, META_OFF, MIB)]
        .iter()
        .enumerate()
    {
        let e = &mut regions[16 + 32 * i..48 + 32 * i];
        e[0..16].copy_from_slice(g);
        e[16..24].copy_from_slice(&off.to_le_bytes());
        e[24..28].copy_from_slice(&(*len as u32).to_le_bytes());
        e[28..32].copy_from_slice(&1u32.to_le_bytes());
    }
    fix_crc(&mut regions, 0, 64 * 1024);
    for off in REGION_OFFS {
        put(&mut img, off, &regions);
    }
    img.resize(LOG_OFF as usize + LOG_LEN as usize, 0);

    // metadata region: table, then items from 64 KiB
    let flags = (spec.leave_allocated as u32) | ((spec.parent.is_some() as u32) << 1);
    let mut params = spec.block_size.to_le_bytes().to_vec();
    params.extend_from_slice(&flags.to_le_bytes());
    let mut items: Vec<([u8; 16], Vec<u8>, u32)> = vec![
        (FILE_PARAMS, params, 4),
        (VDISK_SIZE, spec.virtual_size.to_le_bytes().to_vec(), 6),
        (PAGE83, [0x83; 16].to_vec(), 6),
        (LSS, spec.logical_sector.to_le_bytes().to_vec(), 6),
        (PSS, spec.physical_sector.to_le_bytes().to_vec(), 6),
    ];
    if let Some(pairs) = &spec.parent {
        items.push((LOCATOR, locator(pairs), 4));
    }
    let mut table = vec![0u8; 64 * 1024];
    table[0..8].copy_from_slice(b"metadata");
    table[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut at = 64 * 1024u32;
    for (i, (id, value, fl)) in items.iter().enumerate() {
        let e = &mut table[32 + 32 * i..64 + 32 * i];
        e[0..16].copy_from_slice(id);
        e[16..20].copy_from_slice(&at.to_le_bytes());
        e[20..24].copy_from_slice(&(value.len() as u32).to_le_bytes());
        e[24..28].copy_from_slice(&fl.to_le_bytes());
        put(&mut img, META_OFF + at as u64, value);
        at += value.len().div_ceil(8) as u32 * 8;
    }
    put(&mut img, META_OFF, &table);
    img.resize((META_OFF + MIB) as usize, 0);

    // BAT, then payload and sector-bitmap blocks in allocation order
    let block = spec.block_size as u64;
    let cr = spec.chunk_ratio();
    let lss = spec.logical_sector as u64;
    let mut bat = vec![0u64; entries as usize];
    let mut cursor = BAT_OFF + bat_len;
    let mut bitmaps: HashMap<u64, u64> = HashMap::new();
    for (i, b) in spec.blocks.iter().enumerate() {
        let i = i as u64;
        let idx = (i + i / cr) as usize;
        bat[idx] = match b {
            Block::NotPresent => 0,
            Block::Undefined => 1,
            Block::Zero => 2,
            Block::Unmapped => 3,
            Block::Raw(e) => *e,
            Block::Full(data) | Block::Partial(data, _) => {
                assert_eq!(data.len() as u64, block);
                let off = cursor;
                put(&mut img, off, data);
                cursor += block;
                if let Block::Partial(_, present) = b {
                    let chunk = i / cr;
                    let bm = *bitmaps.entry(chunk).or_insert_with(|| {
                        let at = cursor;
                        img.resize((at + MIB) as usize, 0);
                        cursor += MIB;
                        at
                    });
                    bat[(chunk * (cr + 1) + cr) as usize] = bm | 6;
                    let first_bit = (i % cr) * (block / lss);
                    for (s, &p) in present.iter().enumerate() {
                        if p {
                            let bit = first_bit + s as u64;
                            img[(bm + bit / 8) as usize] |= 1 << (bit % 8);
                        }
                    }
                    off | 7
                } else {
                    off | 6
                }
            }
        };
    }
    let bat_bytes: Vec<u8> = bat.iter().flat_map(|e| e.to_le_bytes()).collect();
    put(&mut img, BAT_OFF, &bat_bytes);
    img.resize(cursor as usize, 0);
    img
}

/// The BAT entry `idx` of an image made by `build`.
pub fn bat_entry_offset(idx: u64) -> u64 {
    BAT_OFF + 8 * idx
}

/// One log entry made of the current contents of `sectors` (4 KiB-aligned file offsets)
/// and `zeros` (offset, length) ranges. Returns the entry bytes.
pub fn log_entry(
    img: &[u8],
    seq: u64,
    tail: u32,
    log_guid: [u8; 16],
    sectors: &[u64],
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    let count = sectors.len() + zeros.len();
    let desc_sectors = (64 + 32 * count).div_ceil(4096);
    let mut e = vec![0u8; (desc_sectors + sectors.len()) * 4096];
    let len = e.len() as u32;
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&len.to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(&log_guid);
    e[48..56].copy_from_slice(&(img.len() as u64).to_le_bytes());
    e[56..64].copy_from_slice(&(img.len() as u64).to_le_bytes());
    let mut d = 64;
    for (off, l) in zeros {
        e[d..d + 4].copy_from_slice(b"zero");
        e[d + 8..d + 16].copy_from_slice(&l.to_le_bytes());
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        d += 32;
    }
    for (i, off) in sectors.iter().enumerate() {
        let sector = &img[*off as usize..*off as usize + 4096];
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&sector[4092..]);
        e[d + 8..d + 16].copy_from_slice(&sector[..8]);
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        d += 32;
        let s = (desc_sectors + i) * 4096;
        e[s..s + 4096].copy_from_slice(sector);
        e[s..s + 4].copy_from_slice(b"data");
        e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    let n = e.len();
    fix_crc(&mut e, 0, n);
    e
}
