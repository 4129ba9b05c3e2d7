//! Helpers shared by the VHDX test files: what a generated image reads as, and small
//! conveniences around opening images and editing their bytes.

use super::{BAT_OFF, Block, LOG_OFF, MIB, Spec, build, log_entry, set_log_guid};
use crate::common::{Rng, ctx, open_view};
use std::path::Path;
use vmfs_mount::format::{Format, open_layer};

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// What a non-differencing `spec` reads as.
pub fn model(spec: &Spec) -> Vec<u8> {
    model_over(spec, &[])
}

/// What `spec` reads as over a parent that reads as `parent` (zeros past its end).
pub fn model_over(spec: &Spec, parent: &[u8]) -> Vec<u8> {
    let size = spec.virtual_size as usize;
    let mut out = vec![0u8; size];
    let n = parent.len().min(size);
    let differencing = spec.parent.is_some();
    if differencing {
        out[..n].copy_from_slice(&parent[..n]);
    }
    let bs = spec.block_size as usize;
    let lss = spec.logical_sector as usize;
    for (i, b) in spec.blocks.iter().enumerate() {
        let start = i * bs;
        let end = (start + bs).min(size);
        match b {
            Block::Full(d) => out[start..end].copy_from_slice(&d[..end - start]),
            Block::Zero => out[start..end].fill(0),
            Block::Partial(d, present) => {
                for (s, &p) in present.iter().enumerate() {
                    let (a, z) = (start + s * lss, (start + (s + 1) * lss).min(end));
                    if p && a < end {
                        out[a..z].copy_from_slice(&d[s * lss..s * lss + (z - a)]);
                    }
                }
            }
            _ if !differencing => out[start..end].fill(0),
            _ => {}
        }
    }
    out
}

pub fn open_err(path: &Path) -> vmfs_mount::error::Error {
    match open_view(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e,
    }
}

/// The DataWriteGuid of a VHDX as its driver reports it.
pub fn data_write_guid(path: &Path) -> [u8; 16] {
    open_layer(path, Format::Vhdx, &ctx())
        .unwrap()
        .identity()
        .uuid
        .unwrap()
}

pub fn child_of(parent: &Path, relative: &str) -> Vec<(String, String)> {
    vec![
        (
            "parent_linkage".into(),
            super::guid_text(&data_write_guid(parent)),
        ),
        ("relative_path".into(), relative.into()),
        (
            "absolute_win32_path".into(),
            "\\\\?\\C:\\images\\elsewhere.vhdx".into(),
        ),
    ]
}

pub fn random_present(rng: &mut Rng, sectors: usize) -> Vec<bool> {
    // runs of random length so that both long and one-sector runs occur
    let mut v = Vec::with_capacity(sectors);
    while v.len() < sectors {
        let bit = rng.below(2) == 1;
        let max = if rng.below(4) == 0 { 1 } else { 40 };
        let run = 1 + rng.below(max) as usize;
        v.extend(std::iter::repeat_n(bit, run));
    }
    v.truncate(sectors);
    v
}

pub fn set_u32(img: &mut [u8], off: u64, v: u32) {
    img[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn set_u64(img: &mut [u8], off: u64, v: u64) {
    img[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// The true image, then its BAT sector, one payload sector and one zeroed range made stale
/// on disk, with two log entries (in one sequence) that restore them.
pub fn dirty_image(rng: &mut Rng) -> (Vec<u8>, Spec) {
    let mut spec = Spec::new(6 << 20, 1 << 20, 512);
    let mut b2 = rng.bytes(1 << 20);
    b2[64 << 10..192 << 10].fill(0);
    spec.blocks = vec![
        Block::Full(rng.bytes(1 << 20)),
        Block::NotPresent,
        Block::Full(b2),
        Block::Full(rng.bytes(1 << 20)),
    ];
    let mut img = build(&spec);
    let log_guid = [0x4C; 16];
    let block2 = (BAT_OFF + MIB) + MIB; // the second block allocated
    let payload_sector = BAT_OFF + MIB + 4096 * 3;
    let zero_range = (block2 + (64 << 10), 128 << 10);
    // entry 1 (older) writes junk to the payload sector; entry 2 writes the truth
    let mut junk_img = img.clone();
    junk_img[payload_sector as usize..payload_sector as usize + 4096]
        .copy_from_slice(&rng.bytes(4096));
    let e1 = log_entry(&junk_img, 41, 0, log_guid, &[payload_sector], &[]);
    let e2 = log_entry(
        &img,
        42,
        0,
        log_guid,
        &[BAT_OFF, payload_sector],
        &[zero_range],
    );
    let mut pos = LOG_OFF as usize;
    for e in [&e1, &e2] {
        img[pos..pos + e.len()].copy_from_slice(e);
        pos += e.len();
    }
    // stale on disk: empty BAT, junk payload sector and junk in the zeroed range
    img[BAT_OFF as usize..BAT_OFF as usize + 4096].fill(0);
    img[payload_sector as usize..payload_sector as usize + 4096].copy_from_slice(&rng.bytes(4096));
    let (zo, zl) = (zero_range.0 as usize, zero_range.1 as usize);
    img[zo..zo + zl].copy_from_slice(&rng.bytes(zl));
    set_log_guid(&mut img, log_guid);
    (img, spec)
}
