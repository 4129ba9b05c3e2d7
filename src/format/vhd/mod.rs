//! VHD (Microsoft Virtual Hard Disk v1, QEMU's "vpc"): fixed, dynamic and differencing disks,
//! read-only.
//!
//! Sizes and dynamic-disk reads follow `qemu-img convert`. Differencing disks follow the
//! spec (QEMU ignores their parent): the sector bitmap in front of each block says, sector by
//! sector, whether the data is here or in the parent.
//!
//! Where we differ from QEMU on damaged images: the dynamic header checksum is checked
//! (QEMU ignores it), a damaged footer copy is replaced by the other copy (QEMU only reads
//! the one at offset 0), and a block reaching past the end of the file fails the reads that
//! need it (QEMU refuses to open the image).

mod bitmap;
mod dynamic;
mod footer;
mod locator;

pub use dynamic::DynHeader;
pub use footer::{DiskType, Footer};

use super::{Extent, Format, Identity, Layer, Mapping, OpenCtx, ParentRef};
use crate::cache::{ByteCache, Key};
use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use footer::{printable, uuid_text};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Cache tag of sector bitmaps in `OpenCtx::tables`.
const BITMAP_TAG: u8 = 0x56;
/// Largest block allocation table we load (16 M blocks: 32 TiB with 2 MiB blocks).
const MAX_BAT_BYTES: u64 = 64 << 20;
const UNALLOCATED: u32 = 0xffff_ffff;

pub struct VhdLayer {
    file: Arc<HostFile>,
    footer: Footer,
    footer_offset: u64,
    disk_type: DiskType,
    size: u64,
    sparse: Option<Sparse>,
    /// Differencing disks: (stored path, host path) candidates for the parent, best first.
    parents: Vec<(String, PathBuf)>,
    tables: Arc<ByteCache>,
}

/// The block structure of a dynamic or differencing disk.
struct Sparse {
    header: DynHeader,
    header_offset: u64,
    /// One entry per block of the virtual size: sector offset of the block's bitmap.
    bat: Arc<[u32]>,
    block_size: u64,
    bitmap_size: u64,
}

/// One stretch of guest bytes inside a single block.
enum Piece {
    Data(u64),
    Hole,
}

impl VhdLayer {
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
        // No writer yet: even a top layer is only read.
        let file = HostFile::open(path, false)?;
        let (footer, footer_offset) = read_footer(&file)?;
        let disk_type = footer.disk_type().ok_or_else(|| {
            Error::corrupt(
                path,
                "footer disk type",
                footer_offset + 60,
                format!(
                    "{} is not fixed (2), dynamic (3) or differencing (4)",
                    footer.disk_type_raw
                ),
            )
        })?;
        let sectors = footer.size_sectors();
        if sectors > footer::MAX_SECTORS {
            return Err(Error::unsupported(
                path,
                format!("virtual size of {sectors} sectors is above the 2040 GiB VHD limit"),
            ));
        }
        let size = sectors * 512;
        let sparse = match disk_type {
            DiskType::Fixed => None,
            _ => Some(Sparse::open(&file, &footer, size)?),
        };
        let parents = match (&sparse, disk_type) {
            (Some(sp), DiskType::Differencing) => {
                let found = parent_candidates(&file, sp)?;
                if found.is_empty() {
                    return Err(Error::corrupt(
                        path,
                        "dynamic disk header",
                        sp.header_offset,
                        "differencing disk names no parent (no parent locator and no parent name)",
                    ));
                }
                found
            }
            _ => Vec::new(),
        };
        Ok(Arc::new(VhdLayer {
            file,
            footer,
            footer_offset,
            disk_type,
            size,
            sparse,
            parents,
            tables: ctx.tables.clone(),
        }))
    }

    pub fn disk_type(&self) -> DiskType {
        self.disk_type
    }

    /// The part of [off, off+len) inside one block that has one state.
    fn block_piece(&self, sp: &Sparse, off: u64, len: u64) -> Result<(Piece, u64)> {
        let bs = sp.block_size;
        let idx = off / bs;
        let in_block = off % bs;
        let avail = len.min(bs - in_block);
        let entry = usize::try_from(idx)
            .ok()
            .and_then(|i| sp.bat.get(i))
            .copied()
            .unwrap_or(UNALLOCATED);
        if entry == UNALLOCATED {
            return Ok((Piece::Hole, avail));
        }
        // entry < 2^32, so none of these sums can overflow.
        let block_start = u64::from(entry) * 512;
        let data_start = block_start + sp.bitmap_size;
        if data_start + bs > self.file.len() {
            return Err(Error::corrupt(
                self.file.path(),
                &format!("BAT entry {idx}"),
                sp.header.table_offset + idx * 4,
                format!(
                    "block at {block_start:#x} ({} bytes with its bitmap) reaches past the end of the file ({} bytes)",
                    sp.bitmap_size + bs,
                    self.file.len()
                ),
            ));
        }
        if self.disk_type != DiskType::Differencing {
            // Like QEMU: the bitmap of a dynamic disk is not consulted.
            return Ok((Piece::Data(data_start + in_block), avail));
        }
        let file = &self.file;
        let bm = self
            .tables
            .get_or_load(Key::new(file.id(), block_start, BITMAP_TAG), || {
                file.read_table(block_start, sp.bitmap_size, sp.bitmap_size, "sector bitmap")
            })?;
        let within = in_block % 512;
        let sectors = (within + avail).div_ceil(512);
        let (present, n) = bitmap::run(&bm, in_block / 512, sectors);
        let run = (n * 512 - within).min(avail);
        Ok((
            if present {
                Piece::Data(data_start + in_block)
            } else {
                Piece::Hole
            },
            run,
        ))
    }

    fn hole(&self) -> Mapping {
        if self.disk_type == DiskType::Differencing {
            Mapping::Unallocated
        } else {
            Mapping::Zero
        }
    }
}

impl Sparse {
    fn open(file: &HostFile, footer: &Footer, size: u64) -> Result<Sparse> {
        let path = file.path();
        let header_offset = footer.data_offset;
        let mut raw = vec![0u8; dynamic::HEADER_LEN];
        file.read_exact_at(&mut raw, header_offset, "dynamic disk header")?;
        let header = DynHeader::decode(&raw).map_err(|(at, e)| {
            Error::corrupt(
                path,
                "dynamic disk header",
                header_offset.saturating_add(at as u64),
                e,
            )
        })?;
        let block_size = u64::from(header.block_size);
        let blocks = size.div_ceil(block_size);
        if u64::from(header.max_table_entries) < blocks {
            return Err(Error::corrupt(
                path,
                "dynamic disk header max table entries",
                header_offset + 28,
                format!(
                    "{} blocks of {block_size} bytes do not cover the virtual size of {size} bytes",
                    header.max_table_entries
                ),
            ));
        }
        let table = file.read_table(
            header.table_offset,
            blocks * 4,
            MAX_BAT_BYTES,
            "block allocation table",
        )?;
        let bat: Arc<[u32]> = table
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bitmap_size = header.bitmap_size();
        Ok(Sparse {
            header,
            header_offset,
            bat,
            block_size,
            bitmap_size,
        })
    }
}

/// Reads the footer: the copy at offset 0 of a dynamic/differencing disk (what QEMU uses),
/// else the one at the end (512 bytes, or 511 for old images). A damaged copy is tolerated,
/// with a warning, when the other one is good. Returns the footer and its offset.
fn read_footer(file: &HostFile) -> Result<(Footer, u64)> {
    let path = file.path();
    let len = file.len();
    if len < footer::OLD_FOOTER_LEN as u64 {
        return Err(Error::corrupt(
            path,
            "footer",
            0,
            format!("file of {len} bytes is too small for a VHD"),
        ));
    }
    let mut head = [0u8; footer::FOOTER_LEN];
    let head = if len >= head.len() as u64 {
        file.read_exact_at(&mut head, 0, "footer copy")?;
        head.starts_with(footer::COOKIE)
            .then(|| Footer::decode(&head))
    } else {
        None
    };
    let is_sparse = |f: &Footer| {
        matches!(
            f.disk_type(),
            Some(DiskType::Dynamic | DiskType::Differencing)
        )
    };
    let (tail_off, tail) = read_tail_footer(file)?;
    match (head, tail) {
        (Some(Ok(h)), tail) if is_sparse(&h) => {
            if let Err(e) = tail {
                log::warn!(
                    "{}: footer at {tail_off:#x}: {e}; using the copy at offset 0",
                    path.display()
                );
            }
            Ok((h, 0))
        }
        (head, Ok(t)) => {
            if let (Some(Err(e)), true) = (&head, is_sparse(&t)) {
                log::warn!(
                    "{}: footer copy at offset 0: {e}; using the footer at {tail_off:#x}",
                    path.display()
                );
            }
            Ok((t, tail_off))
        }
        (Some(Err(h)), Err(t)) => Err(Error::corrupt(
            path,
            "footer",
            0,
            format!("copy at offset 0: {h}; footer at {tail_off:#x}: {t}"),
        )),
        // A good copy at 0 with an unknown disk type: let the type check name it.
        (Some(Ok(h)), Err(_)) if h.disk_type().is_none() => Ok((h, 0)),
        (_, Err(t)) => Err(Error::corrupt(path, "footer", tail_off, t)),
    }
}

/// The footer at the end of the file: 512 bytes, or the 511 bytes of pre-2004 images.
fn read_tail_footer(file: &HostFile) -> Result<(u64, std::result::Result<Footer, String>)> {
    let len = file.len();
    let mut buf = [0u8; footer::FOOTER_LEN];
    for flen in [footer::FOOTER_LEN, footer::OLD_FOOTER_LEN] {
        if len < flen as u64 {
            continue;
        }
        let off = len - flen as u64;
        file.read_exact_at(&mut buf[..flen], off, "footer")?;
        if buf.starts_with(footer::COOKIE) {
            return Ok((off, Footer::decode(&buf[..flen])));
        }
    }
    Ok((
        len.saturating_sub(footer::FOOTER_LEN as u64),
        Err("no \"conectix\" cookie".to_string()),
    ))
}

/// Every place the parent may be, from the locators (best platform first), then the name.
fn parent_candidates(file: &HostFile, sp: &Sparse) -> Result<Vec<(String, PathBuf)>> {
    let mut stored = Vec::new();
    for code in locator::PREFERRED {
        for (slot, loc) in sp
            .header
            .locators
            .iter()
            .enumerate()
            .filter(|(_, l)| &l.code == code)
        {
            if loc.length == 0 {
                continue;
            }
            let field = format!("parent locator {}", printable(code));
            if loc.length > locator::MAX_LOCATOR_LEN {
                return Err(Error::corrupt(
                    file.path(),
                    &field,
                    sp.header_offset + dynamic::locator_field_offset(slot),
                    format!(
                        "length {} exceeds the limit of {} bytes",
                        loc.length,
                        locator::MAX_LOCATOR_LEN
                    ),
                ));
            }
            let mut data = vec![0u8; loc.length as usize];
            file.read_exact_at(&mut data, loc.offset, &field)?;
            stored.extend(locator::decode(code, &data));
        }
    }
    if !sp.header.parent_name.is_empty() {
        stored.push(sp.header.parent_name.clone());
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for raw in stored {
        for p in locator::candidates(file.path(), &raw) {
            if !out.iter().any(|(_, q)| *q == p) {
                out.push((raw.clone(), p));
            }
        }
    }
    Ok(out)
}

impl Layer for VhdLayer {
    fn format(&self) -> Format {
        Format::Vpc
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let Some(sp) = &self.sparse else {
            // Fixed: guest offset = file offset, as QEMU reads it (zeros past the end).
            let map = if off < self.file.len() {
                Mapping::Data {
                    file: self.file.clone(),
                    host_off: off,
                }
            } else {
                Mapping::Zero
            };
            return Ok(Extent { len, map });
        };
        let (piece, mut done) = self.block_piece(sp, off, len)?;
        if let Piece::Data(host_off) = piece {
            return Ok(Extent {
                len: done,
                map: Mapping::Data {
                    file: self.file.clone(),
                    host_off,
                },
            });
        }
        // Merge the following holes; an error there is reported by the call that starts there.
        // Bounded work per call (see MAX_ENTRIES_PER_MAP).
        let mut pieces = 1;
        while done < len && pieces < super::MAX_ENTRIES_PER_MAP {
            pieces += 1;
            match self.block_piece(sp, off + done, len - done) {
                Ok((Piece::Hole, n)) => done += n,
                _ => break,
            }
        }
        Ok(Extent {
            len: done,
            map: self.hole(),
        })
    }

    fn parent(&self) -> ParentRef {
        let allowed = |p: &Path| crate::paths::stays_within(self.path(), p);
        let best = self
            .parents
            .iter()
            .find(|(_, p)| allowed(p) && crate::storage::location::exists(p))
            .or_else(|| self.parents.iter().find(|(_, p)| allowed(p)))
            .or(self.parents.first());
        match best {
            Some((raw, path)) => ParentRef::Path {
                raw: raw.clone(),
                path: path.clone(),
                format: Some(Format::Vpc),
            },
            None => ParentRef::None,
        }
    }

    fn verify_parent(&self, parent: &dyn Layer) -> Result<()> {
        let Some(sp) = self
            .sparse
            .as_ref()
            .filter(|_| self.disk_type == DiskType::Differencing)
        else {
            return Ok(());
        };
        let want = sp.header.parent_uuid;
        match parent.identity().uuid {
            Some(got) if got == want => Ok(()),
            got => Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: parent {} has unique id {}, but the differencing disk was made against {}",
                    self.file.path().display(),
                    parent.path().display(),
                    got.map_or("(none)".to_string(), |u| uuid_text(&u)),
                    uuid_text(&want)
                ),
            )),
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            uuid: Some(self.footer.uuid),
            ..Identity::default()
        }
    }

    fn files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }

    fn details(&self) -> Vec<(String, String)> {
        let f = &self.footer;
        let mut d = vec![
            ("disk type".to_string(), self.disk_type.name().to_string()),
            ("creator".to_string(), f.creator()),
            ("geometry (C/H/S)".to_string(), f.geometry()),
            ("current size".to_string(), f.current_size.to_string()),
            ("uuid".to_string(), uuid_text(&f.uuid)),
        ];
        if let Some(sp) = &self.sparse {
            d.push(("block size".to_string(), sp.block_size.to_string()));
        }
        if self.disk_type == DiskType::Differencing
            && let Some(sp) = &self.sparse
        {
            d.push(("parent name".to_string(), sp.header.parent_name.clone()));
            d.push(("parent uuid".to_string(), uuid_text(&sp.header.parent_uuid)));
        }
        d
    }
}

impl fmt::Debug for VhdLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhdLayer")
            .field("path", &self.file.path())
            .field("disk_type", &self.disk_type)
            .field("size", &self.size)
            .field("footer_offset", &self.footer_offset)
            .finish_non_exhaustive()
    }
}
