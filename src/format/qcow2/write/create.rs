//! A fresh, empty qcow2 v3 image (64 KiB clusters, 16-bit refcounts), written from scratch:
//! cluster 0 header (+ backing format extension + backing file name), cluster 1 refcount
//! table, cluster 2 refcount block, then the L1 table. This is what `qemu-img create -f
//! qcow2 -b BACKING -F FMT` makes, minus the optional feature-name table.

use super::super::header::{EXT_BACKING_FORMAT, MAGIC};
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
const HEADER_LEN: usize = 112;
/// QEMU refuses longer backing file names.
const MAX_BACKING_NAME: usize = 1023;

/// The bytes of an empty image of `size` guest bytes over `backing` (stored as given).
pub fn image_bytes(size: u64, backing: Option<(&str, &str)>) -> Result<Vec<u8>> {
    let l2_span = CS * (CS / 8);
    let l1_entries = size.div_ceil(l2_span).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(CS);
    let total = 3 + l1_clusters;
    // One 16-bit refcount block counts 32768 clusters: 2^63-byte disks fit easily.
    if total > CS / 2 || l1_entries > u64::from(u32::MAX) || size > i64::MAX as u64 {
        return Err(Error::invalid(format!(
            "cannot create a qcow2 image of {size} bytes"
        )));
    }
    let mut img = vec![0u8; (total * CS) as usize];
    let h = &mut img[..CS as usize];
    put(h, 0, MAGIC);
    put(h, 4, &3u32.to_be_bytes());
    put(h, 20, &CLUSTER_BITS.to_be_bytes());
    put(h, 24, &size.to_be_bytes());
    put(h, 36, &(l1_entries as u32).to_be_bytes());
    put(h, 40, &(3 * CS).to_be_bytes());
    put(h, 48, &CS.to_be_bytes());
    put(h, 56, &1u32.to_be_bytes());
    put(h, 96, &4u32.to_be_bytes());
    put(h, 100, &(HEADER_LEN as u32).to_be_bytes());
    let mut pos = HEADER_LEN;
    if let Some((name, fmt)) = backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME || name.contains('\0') {
            return Err(Error::invalid(format!(
                "backing file name {name:?} cannot be stored"
            )));
        }
        put(h, pos, &EXT_BACKING_FORMAT.to_be_bytes());
        put(h, pos + 4, &(fmt.len() as u32).to_be_bytes());
        put(h, pos + 8, fmt.as_bytes());
        pos += 8 + fmt.len().div_ceil(8) * 8;
        pos += 8; // end-of-extensions marker (zeros)
        put(h, 8, &(pos as u64).to_be_bytes());
        put(h, 16, &(name.len() as u32).to_be_bytes());
        put(h, pos, name.as_bytes());
    }
    put(&mut img, CS as usize, &(2 * CS).to_be_bytes());
    for c in 0..total as usize {
        put(&mut img, 2 * CS as usize + 2 * c, &1u16.to_be_bytes());
    }
    Ok(img)
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Creates `path` (which must not exist) holding an empty image; written to a temporary
/// name first and renamed, so a crash never leaves a half-written image under `path`.
pub fn create(path: &Path, size: u64, backing: Option<(&str, &str)>) -> Result<()> {
    let bytes = image_bytes(size, backing)?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, "create overlay", e));
    }
    // hard_link + unlink: fails instead of replacing a file that appeared meanwhile.
    let r = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    r.map_err(|e| Error::io(path, "create overlay", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::super::{Qcow2Image, header};
    use super::*;
    use crate::format::{OpenCtx, ParentRef};

    #[test]
    fn fresh_image_opens_and_names_its_backing_file() {
        let img = image_bytes(10 << 30, Some(("base.raw", "raw"))).unwrap();
        let h = header::Header::parse(&img, Path::new("t")).unwrap();
        assert_eq!((h.version, h.size, h.l1_size), (3, 10 << 30, 20));
        assert_eq!(img.len() as u64, 4 * CS);
        let dir = std::env::temp_dir().join(format!("vmfs-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("o.qcow2");
        create(&p, 1 << 20, Some(("base.raw", "raw"))).unwrap();
        assert!(
            create(&p, 1 << 20, None).is_err(),
            "an existing file must not be replaced"
        );
        let ctx = OpenCtx::new(
            std::sync::Arc::new(crate::cache::ByteCache::new(1 << 20)),
            false,
        );
        let q = Qcow2Image::open(&p, &ctx).unwrap();
        assert_eq!(q.extensions.backing_format.as_deref(), Some("raw"));
        assert!(matches!(&q.parent, ParentRef::Path { raw, .. } if raw == "base.raw"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(image_bytes(1, Some(("", "raw"))).is_err());
        assert!(image_bytes(1 << 62, None).is_err());
    }
}
