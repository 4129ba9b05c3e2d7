//! Helpers shared by the VHDX test files: what a generated image reads as, and small
//! conveniences around opening images and editing their bytes.

use super::{Block, Spec};
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
