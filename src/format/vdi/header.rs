//! The VDI pre-header and header (version 1.x, little-endian), decoded and validated.
//!
//! Layout (absolute offsets): 0x00 text (64 bytes, for eyes only), 0x40 signature, 0x44
//! version, then VDIHEADER1: 0x48 cbHeader, 0x4C type, 0x50 flags, 0x54 comment (256),
//! 0x154 offBlocks, 0x158 offData, 0x15C legacy geometry (C, H, S, cbSector), 0x16C dummy,
//! 0x170 cbDisk (u64), 0x178 cbBlock, 0x17C cbBlockExtra, 0x180 cBlocks, 0x184
//! cBlocksAllocated, 0x188 uuidCreate, 0x198 uuidModify, 0x1A8 uuidLinkage, 0x1B8
//! uuidParentModify; VDIHEADER1PLUS adds the LCHS geometry at 0x1C8 (cbHeader >= 0x190).

use super::uuid::Uuid;
use crate::endian::{le32, le64};
use crate::error::{Error, Result};
use std::path::Path;

pub const SIGNATURE: u32 = 0xbeda107f;
/// Pre-header (64 bytes of text, signature, version).
pub const PRE_HEADER_SIZE: u32 = 0x48;
/// sizeof(VDIHEADER1): what QEMU writes and the least VirtualBox accepts.
pub const HEADER1_SIZE: u32 = 0x180;
/// sizeof(VDIHEADER1PLUS): adds the LCHS geometry.
pub const HEADER1_PLUS_SIZE: u32 = 0x190;
/// Bytes to read to decode any header we accept.
pub const READ_SIZE: usize = 0x200;
const SECTOR: u64 = 512;
/// Block sizes we accept: VirtualBox allows any power of two, QEMU only 1 MiB.
pub const MIN_BLOCK: u32 = 512;
pub const MAX_BLOCK: u32 = 256 << 20;
/// QEMU's VDI_BLOCKS_IN_IMAGE_MAX: the block map stays below 2 GiB.
pub const MAX_BLOCKS: u32 = ((i32::MAX as u32) + 1 - 512) / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageType {
    /// Dynamically growing base image.
    Normal,
    /// Preallocated base image.
    Fixed,
    /// Old undo image (VirtualBox 1.x); reads like a differencing image.
    Undo,
    /// Differencing image (VirtualBox snapshots).
    Diff,
}

impl ImageType {
    fn from_u32(v: u32) -> Option<ImageType> {
        Some(match v {
            1 => ImageType::Normal,
            2 => ImageType::Fixed,
            3 => ImageType::Undo,
            4 => ImageType::Diff,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageType::Normal => "dynamic",
            ImageType::Fixed => "fixed",
            ImageType::Undo => "undo",
            ImageType::Diff => "differencing",
        }
    }

    /// Free blocks of these images are read from the parent.
    pub fn has_parent(self) -> bool {
        matches!(self, ImageType::Undo | ImageType::Diff)
    }
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub header_size: u32,
    pub image_type: ImageType,
    pub flags: u32,
    pub offset_blocks: u32,
    pub offset_data: u32,
    /// cbDisk as stored (may not be a multiple of 512).
    pub disk_size: u64,
    pub block_size: u32,
    pub block_extra: u32,
    pub blocks: u32,
    pub blocks_allocated: u32,
    pub uuid_create: Uuid,
    pub uuid_modify: Uuid,
    pub uuid_linkage: Uuid,
    pub uuid_parent_modify: Uuid,
}

fn uuid_at(b: &[u8], off: usize) -> Uuid {
    let mut raw = [0u8; 16];
    if let Some(s) = b.get(off..off + 16) {
        raw.copy_from_slice(s);
    }
    Uuid::from_disk(&raw)
}

impl Header {
    /// Decodes and validates the first bytes of `path` (`buf` holds up to `READ_SIZE` bytes).
    pub fn parse(buf: &[u8], path: &Path) -> Result<Header> {
        let corrupt = |field: &str, off: u64, what: String| Error::corrupt(path, field, off, what);
        if buf.len() < (PRE_HEADER_SIZE + HEADER1_SIZE) as usize {
            return Err(corrupt(
                "header",
                0,
                format!("file too short for a VDI header ({} bytes)", buf.len()),
            ));
        }
        let sig = le32(buf, 0x40);
        if sig != SIGNATURE {
            return Err(corrupt(
                "signature",
                0x40,
                format!("{sig:#010x} is not the VDI signature {SIGNATURE:#010x}"),
            ));
        }
        let version = le32(buf, 0x44);
        let (major, minor) = (version >> 16, version & 0xffff);
        if major != 1 || minor > 1 {
            return Err(Error::unsupported(
                path,
                format!("VDI version {major}.{minor} (only 1.0 and 1.1 are read)"),
            ));
        }
        let header_size = le32(buf, 0x48);
        let type_raw = le32(buf, 0x4c);
        let image_type = ImageType::from_u32(type_raw)
            .ok_or_else(|| corrupt("image type", 0x4c, format!("unknown image type {type_raw}")))?;
        let h = Header {
            version,
            header_size,
            image_type,
            flags: le32(buf, 0x50),
            offset_blocks: le32(buf, 0x154),
            offset_data: le32(buf, 0x158),
            disk_size: le64(buf, 0x170),
            block_size: le32(buf, 0x178),
            block_extra: le32(buf, 0x17c),
            blocks: le32(buf, 0x180),
            blocks_allocated: le32(buf, 0x184),
            uuid_create: uuid_at(buf, 0x188),
            uuid_modify: uuid_at(buf, 0x198),
            uuid_linkage: uuid_at(buf, 0x1a8),
            uuid_parent_modify: uuid_at(buf, 0x1b8),
        };
        h.validate(buf, path)?;
        Ok(h)
    }

    fn validate(&self, buf: &[u8], path: &Path) -> Result<()> {
        let corrupt =
            |field: &str, off: u64, what: String| Err(Error::corrupt(path, field, off, what));
        let header_end = PRE_HEADER_SIZE as u64 + self.header_size as u64;
        if self.header_size < HEADER1_SIZE || header_end > self.offset_blocks as u64 {
            return corrupt(
                "header size",
                0x48,
                format!(
                    "{} bytes: must be at least {HEADER1_SIZE} and end before the block map at {:#x}",
                    self.header_size, self.offset_blocks
                ),
            );
        }
        // Both geometries must say 512-byte sectors when set (QEMU checks the legacy one,
        // VirtualBox the LCHS one).
        let legacy_sector = le32(buf, 0x168);
        if legacy_sector != 0 && legacy_sector as u64 != SECTOR {
            return Err(Error::unsupported(
                path,
                format!("sector size {legacy_sector} (only 512 is read)"),
            ));
        }
        if self.header_size >= HEADER1_PLUS_SIZE {
            let lchs_sector = le32(buf, 0x1d4);
            if lchs_sector != 0 && lchs_sector as u64 != SECTOR {
                return Err(Error::unsupported(
                    path,
                    format!("LCHS sector size {lchs_sector} (only 512 is read)"),
                ));
            }
        }
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&bs) {
            return corrupt(
                "block size",
                0x178,
                format!("{bs} bytes: must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}"),
            );
        }
        if self.block_extra != 0 && !self.block_extra.is_power_of_two() {
            return corrupt(
                "block extra size",
                0x17c,
                format!("{} bytes is not a power of two", self.block_extra),
            );
        }
        if self.blocks > MAX_BLOCKS {
            return corrupt(
                "block count",
                0x180,
                format!("{} blocks exceed the limit of {MAX_BLOCKS}", self.blocks),
            );
        }
        let capacity = self.blocks as u64 * bs as u64;
        if self.virtual_size() > capacity {
            return corrupt(
                "disk size",
                0x170,
                format!(
                    "{} bytes, but {} blocks of {bs} bytes hold only {capacity} bytes",
                    self.disk_size, self.blocks
                ),
            );
        }
        if self.blocks_allocated > self.blocks {
            return corrupt(
                "allocated block count",
                0x184,
                format!(
                    "{} allocated blocks exceed the {} blocks of the image",
                    self.blocks_allocated, self.blocks
                ),
            );
        }
        let map_end = self.offset_blocks as u64 + self.blocks as u64 * 4;
        if (self.offset_data as u64) < map_end {
            return corrupt(
                "data offset",
                0x158,
                format!(
                    "{:#x} lies inside the block map ({:#x}..{map_end:#x})",
                    self.offset_data, self.offset_blocks
                ),
            );
        }
        if self.image_type.has_parent() && self.uuid_linkage.is_nil() {
            return corrupt(
                "parent UUID (uuidLinkage)",
                0x1a8,
                format!(
                    "a {} image must name its parent, but the UUID is null",
                    self.image_type.name()
                ),
            );
        }
        Ok(())
    }

    /// The guest-visible size: cbDisk rounded up to whole sectors, as QEMU does
    /// ('VBoxManage convertfromraw' can write odd sizes).
    pub fn virtual_size(&self) -> u64 {
        // disk_size <= u64::MAX - 511 is not guaranteed: saturate, then validation fails.
        self.disk_size
            .checked_next_multiple_of(SECTOR)
            .unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid QEMU-style 1.1 dynamic header for `size` bytes with 1 MiB blocks.
    pub fn sample(size: u64) -> Vec<u8> {
        let mut b = vec![0u8; READ_SIZE];
        b[..35].copy_from_slice(b"<<< QEMU VM Virtual Disk Image >>>\n");
        let put32 =
            |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut b, 0x40, SIGNATURE);
        put32(&mut b, 0x44, 0x0001_0001);
        put32(&mut b, 0x48, HEADER1_SIZE);
        put32(&mut b, 0x4c, 1);
        let blocks = size.div_ceil(1 << 20) as u32;
        put32(&mut b, 0x154, 0x200);
        put32(&mut b, 0x158, 0x200 + (blocks * 4).next_multiple_of(512));
        put32(&mut b, 0x168, 512);
        b[0x170..0x178].copy_from_slice(&size.to_le_bytes());
        put32(&mut b, 0x178, 1 << 20);
        put32(&mut b, 0x180, blocks);
        b[0x188] = 1;
        b[0x198] = 2;
        b
    }

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn err(b: &[u8]) -> String {
        Header::parse(b, Path::new("t.vdi"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn decodes_a_qemu_header() {
        let mut b = sample(5 << 20);
        b[0x188..0x198].copy_from_slice(&[
            0x33, 0x22, 0x11, 0, 0x55, 0x44, 0x77, 0x66, 8, 9, 10, 11, 12, 13, 14, 15,
        ]);
        let h = Header::parse(&b, Path::new("t.vdi")).unwrap();
        assert_eq!(h.image_type, ImageType::Normal);
        assert_eq!(
            (h.block_size, h.blocks, h.offset_blocks, h.offset_data),
            (1 << 20, 5, 0x200, 0x400)
        );
        assert_eq!(h.virtual_size(), 5 << 20);
        assert_eq!(
            h.uuid_create.to_string(),
            "00112233-4455-6677-0809-0a0b0c0d0e0f"
        );
        assert!(h.uuid_linkage.is_nil());
    }

    #[test]
    fn odd_disk_sizes_round_up_to_a_sector() {
        let mut b = sample(3 << 20);
        b[0x170..0x178].copy_from_slice(&((3u64 << 20) - 1000).to_le_bytes());
        let h = Header::parse(&b, Path::new("t.vdi")).unwrap();
        assert_eq!(h.virtual_size(), (3 << 20) - 512);
    }

    #[test]
    fn refuses_bad_signature_version_and_type() {
        let mut b = sample(1 << 20);
        put32(&mut b, 0x40, 0x12345678);
        assert!(err(&b).contains("signature at offset 0x40"), "{}", err(&b));
        let mut b = sample(1 << 20);
        put32(&mut b, 0x44, 0x0000_0002);
        assert!(
            err(&b).contains("unsupported: VDI version 0.2"),
            "{}",
            err(&b)
        );
        put32(&mut b, 0x44, 0x0001_0000);
        assert!(
            Header::parse(&b, Path::new("t.vdi")).is_ok(),
            "1.0 headers use the same layout"
        );
        put32(&mut b, 0x4c, 9);
        assert!(err(&b).contains("image type at offset 0x4c"), "{}", err(&b));
        assert!(err(&b[..100]).contains("too short"));
    }

    #[test]
    fn refuses_absurd_sizes() {
        let mut b = sample(1 << 20);
        put32(&mut b, 0x48, 0xffff_fff0);
        assert!(err(&b).contains("header size"), "{}", err(&b));
        let mut b = sample(1 << 20);
        put32(&mut b, 0x178, 3 << 19);
        assert!(err(&b).contains("block size"), "{}", err(&b));
        put32(&mut b, 0x178, 1 << 30);
        assert!(err(&b).contains("block size"), "{}", err(&b));
        let mut b = sample(1 << 20);
        b[0x170..0x178].copy_from_slice(&(5u64 << 20).to_le_bytes());
        assert!(err(&b).contains("disk size"), "{}", err(&b));
        b[0x170..0x178].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("disk size"), "{}", err(&b));
        let mut b = sample(1 << 20);
        put32(&mut b, 0x180, u32::MAX);
        assert!(err(&b).contains("block count"), "{}", err(&b));
        let mut b = sample(1 << 20);
        put32(&mut b, 0x184, 2);
        assert!(err(&b).contains("allocated block count"), "{}", err(&b));
        let mut b = sample(8 << 20);
        put32(&mut b, 0x158, 0x204);
        assert!(err(&b).contains("data offset"), "{}", err(&b));
        let mut b = sample(1 << 20);
        put32(&mut b, 0x17c, 3);
        assert!(err(&b).contains("block extra"), "{}", err(&b));
        let mut b = sample(1 << 20);
        put32(&mut b, 0x168, 4096);
        assert!(err(&b).contains("sector size 4096"), "{}", err(&b));
    }

    #[test]
    fn a_differencing_image_must_name_its_parent() {
        let mut b = sample(1 << 20);
        put32(&mut b, 0x4c, 4);
        assert!(err(&b).contains("uuidLinkage"), "{}", err(&b));
        b[0x1a8] = 7;
        let h = Header::parse(&b, Path::new("t.vdi")).unwrap();
        assert!(h.image_type.has_parent());
    }
}
