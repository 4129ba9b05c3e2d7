//! The magic numbers that identify each format's files. Detection (`probe.rs`) and the
//! drivers both read them from here, so neither reaches into the other.

pub const QCOW2: &[u8; 4] = b"QFI\xfb";
/// A hosted sparse VMDK extent.
pub const VMDK_SPARSE: &[u8; 4] = b"KDMV";
/// An ESXi vmfsSparse (COWD) extent.
pub const VMDK_COWD: &[u8; 4] = b"COWD";
/// The first 8 bytes of a seSparse extent (0xcafebabe, little-endian u64).
pub const VMDK_SESPARSE: [u8; 8] = [0xbe, 0xba, 0xfe, 0xca, 0, 0, 0, 0];
pub const VHDX: &[u8; 8] = b"vhdxfile";
/// VHD footer cookie.
pub const VHD: &[u8; 8] = b"conectix";
/// VDI image signature at offset 0x40 (little-endian).
pub const VDI_SIGNATURE: u32 = 0xbeda107f;
pub const VDI_SIGNATURE_OFFSET: usize = 0x40;
