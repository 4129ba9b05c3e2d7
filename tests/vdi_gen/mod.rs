//! VDI images QEMU will not make (differencing images: QEMU refuses a parent UUID), built
//! from the format description: header, block map with data, free and zero blocks, data
//! blocks in shuffled order. Shared by the VDI chain tests and the fuzz seed writer.
#![allow(dead_code)]

use super::common::Rng;
use std::path::Path;

const MB: u64 = 1 << 20;

#[derive(Clone)]
pub enum Block {
    Free,
    Zero,
    Data(Vec<u8>),
}

pub struct Spec {
    pub size: u64,
    pub block_size: u64,
    pub block_extra: u64,
    pub image_type: u32,
    pub header_size: u32,
    pub version: u32,
    /// All four UUIDs in on-disk byte order.
    pub uuid: [u8; 16],
    pub modify: [u8; 16],
    pub linkage: [u8; 16],
    pub parent_modify: [u8; 16],
    pub blocks: Vec<Block>,
}

impl Spec {
    /// A VirtualBox-style differencing image (1.1+ header) over the VDI at `parent`.
    pub fn child_of(parent: &Path, rng: &mut Rng, blocks: Vec<Block>) -> Spec {
        let (uuid, modify) = uuids_of(parent);
        Spec {
            size: blocks.len() as u64 * MB,
            block_size: MB,
            block_extra: 0,
            image_type: 4,
            header_size: 0x190,
            version: 0x0001_0001,
            uuid: rng.bytes(16).try_into().unwrap(),
            modify: rng.bytes(16).try_into().unwrap(),
            linkage: uuid,
            parent_modify: modify,
            blocks,
        }
    }

    /// Writes the image; data blocks go to the data area in a random order, each with
    /// `block_extra` bytes of noise in front.
    pub fn write(&self, path: &Path, rng: &mut Rng) {
        let n = self.blocks.len();
        let off_blocks = 0x200u64;
        let off_data = (off_blocks + 4 * n as u64).next_multiple_of(512);
        let data: Vec<usize> = (0..n)
            .filter(|&i| matches!(self.blocks[i], Block::Data(_)))
            .collect();
        let mut slots: Vec<u32> = (0..data.len() as u32).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let stride = self.block_size + self.block_extra;
        let mut file = vec![0u8; (off_data + data.len() as u64 * stride) as usize];
        let h = &mut file[..0x200];
        h[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        put32(h, 0x40, 0xbeda107f);
        put32(h, 0x44, self.version);
        put32(h, 0x48, self.header_size);
        put32(h, 0x4c, self.image_type);
        put32(h, 0x154, off_blocks as u32);
        put32(h, 0x158, off_data as u32);
        put32(h, 0x168, 512);
        h[0x170..0x178].copy_from_slice(&self.size.to_le_bytes());
        put32(h, 0x178, self.block_size as u32);
        put32(h, 0x17c, self.block_extra as u32);
        put32(h, 0x180, n as u32);
        put32(h, 0x184, data.len() as u32);
        h[0x188..0x198].copy_from_slice(&self.uuid);
        h[0x198..0x1a8].copy_from_slice(&self.modify);
        h[0x1a8..0x1b8].copy_from_slice(&self.linkage);
        h[0x1b8..0x1c8].copy_from_slice(&self.parent_modify);
        if self.header_size >= 0x190 {
            put32(h, 0x1d4, 512);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let entry = match b {
                Block::Free => 0xffff_ffff,
                Block::Zero => 0xffff_fffe,
                Block::Data(_) => slots[data.iter().position(|&d| d == i).unwrap()],
            };
            put32(&mut file, (off_blocks + 4 * i as u64) as usize, entry);
        }
        for (k, &i) in data.iter().enumerate() {
            let Block::Data(bytes) = &self.blocks[i] else {
                unreachable!()
            };
            let start = (off_data + slots[k] as u64 * stride) as usize;
            let extra = self.block_extra as usize;
            file[start..start + extra].copy_from_slice(&rng.bytes(extra));
            file[start + extra..start + extra + bytes.len()].copy_from_slice(bytes);
        }
        std::fs::write(path, file).unwrap();
    }

    /// What the image shows over a parent that shows `below`.
    pub fn model(&self, below: &[u8]) -> Vec<u8> {
        let mut out = below.to_vec();
        out.resize(self.size as usize, 0);
        let bs = self.block_size as usize;
        for (i, b) in self.blocks.iter().enumerate() {
            let start = (i * bs).min(out.len());
            let end = (start + bs).min(out.len());
            match b {
                Block::Free => {}
                Block::Zero => out[start..end].fill(0),
                Block::Data(d) => out[start..end].copy_from_slice(&d[..end - start]),
            }
        }
        out
    }
}

pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// (uuidCreate, uuidModify) of a VDI file, in on-disk byte order.
pub fn uuids_of(path: &Path) -> ([u8; 16], [u8; 16]) {
    let b = std::fs::read(path).unwrap();
    (
        b[0x188..0x198].try_into().unwrap(),
        b[0x198..0x1a8].try_into().unwrap(),
    )
}

/// The text VirtualBox shows for an on-disk UUID.
pub fn uuid_text(d: &[u8; 16]) -> String {
    let h = |r: &[u8]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let rev = |r: &[u8]| h(&r.iter().rev().copied().collect::<Vec<_>>());
    format!(
        "{}-{}-{}-{}-{}",
        rev(&d[0..4]),
        rev(&d[4..6]),
        rev(&d[6..8]),
        h(&d[8..10]),
        h(&d[10..16])
    )
}
