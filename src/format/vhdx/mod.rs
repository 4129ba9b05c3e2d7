//! VHDX (MS-VHDX v1) read driver: headers, region table, metadata, BAT with sector bitmaps
//! for differencing disks, and in-memory replay of the metadata log.

pub mod bat;
pub mod crc32c;
pub mod guid;
pub mod header;
pub mod log;
pub mod metadata;
pub mod overlay;
pub mod parent;

use super::{Extent, Format, Identity, Layer, Mapping, OpenCtx, ParentRef};
use crate::cache::ByteCache;
use crate::error::{Error, Result};
use crate::storage::HostFile;
use bat::{Bat, Geometry};
use header::{Header, MIB};
use log::LogState;
use metadata::Metadata;
use overlay::Replayed;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The details() key carrying the logical sector size (a child checks its parent's).
pub const DETAIL_LOGICAL_SECTOR: &str = "logical sector size";

pub struct VhdxLayer {
    src: Replayed,
    header: Header,
    meta: Metadata,
    bat: Bat,
    log_state: LogState,
    creator: String,
    parent: ParentRef,
    linkage: Option<parent::Linkage>,
    tables: Arc<ByteCache>,
}

impl fmt::Debug for VhdxLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhdxLayer")
            .field("path", &self.src.file().path())
            .field("meta", &self.meta)
            .field("log", &self.log_state)
            .finish()
    }
}

impl VhdxLayer {
    /// Opens a VHDX read-only (this driver never writes; a dirty log is replayed in memory).
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Self::open_layer(path, ctx)?))
    }

    pub fn open_layer(path: &Path, ctx: &OpenCtx) -> Result<VhdxLayer> {
        let file = HostFile::open(path, false)?;
        let creator = header::read_identifier(&file)?;
        let header = header::current_header(&file)?;
        let replay = log::replay(&file, &header)?;
        let src = if replay.overlay.is_empty() && replay.min_len <= file.len() {
            Replayed::plain(file)
        } else {
            Replayed::new(file, replay.overlay, replay.min_len)?
        };
        let regions = header::read_regions(&src, &header)?;
        let meta = metadata::read_metadata(&src, &regions.metadata)?;
        let bat = Bat::new(
            &src,
            Geometry::new(&meta),
            regions.bat.offset,
            regions.bat.length,
        )?;
        let (parent, linkage) = if meta.has_parent {
            (
                parent::parent_ref(path, &meta)?,
                Some(parent::linkage(path, &meta)?),
            )
        } else {
            (ParentRef::None, None)
        };
        Ok(VhdxLayer {
            src,
            header,
            meta,
            bat,
            log_state: replay.state,
            creator,
            parent,
            linkage,
            tables: ctx.tables.clone(),
        })
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn log_state(&self) -> &LogState {
        &self.log_state
    }

    /// The longest run inside one payload block from `off` (at most `max` bytes) that maps
    /// the same way.
    fn block_piece(&self, off: u64, max: u64) -> Result<(Mapping, u64)> {
        let g = &self.bat.geometry;
        let block = off / g.block_size;
        let within = off % g.block_size;
        let max = max.min(g.block_size - within);
        let idx = g.payload_index(block);
        let entry = self.bat.entry(&self.src, &self.tables, idx)?;
        let differencing = self.meta.has_parent;
        match bat::state(entry) {
            bat::FULLY_PRESENT => self.block_data(block, idx, entry, within, max),
            bat::PARTIALLY_PRESENT if differencing => {
                let bits = self.bat.bitmap(&self.src, &self.tables, block)?;
                let lss = g.logical_sector;
                let skew = within % lss;
                let (present, sectors) =
                    bat::bit_run(&bits, within / lss, (skew + max).div_ceil(lss));
                let n = (sectors * lss - skew).min(max);
                if present {
                    self.block_data(block, idx, entry, within, n)
                } else {
                    Ok((Mapping::Unallocated, n))
                }
            }
            bat::ZERO => Ok((Mapping::Zero, max)),
            bat::NOT_PRESENT | bat::UNDEFINED | bat::UNMAPPED | bat::UNMAPPED_V095 => Ok((
                if differencing {
                    Mapping::Unallocated
                } else {
                    Mapping::Zero
                },
                max,
            )),
            s => Err(Error::corrupt(
                self.path(),
                &format!("payload BAT entry {idx}"),
                self.bat.entry_offset(idx),
                format!(
                    "state {s} is not valid in a {} disk",
                    if differencing {
                        "differencing"
                    } else {
                        "non-differencing"
                    }
                ),
            )),
        }
    }

    /// Maps `n` bytes at `within` of a present payload block; the block's part inside the
    /// virtual disk must lie inside the file.
    fn block_data(
        &self,
        block: u64,
        idx: u64,
        entry: u64,
        within: u64,
        n: u64,
    ) -> Result<(Mapping, u64)> {
        let g = &self.bat.geometry;
        let base = bat::file_offset(entry);
        let block_len = g
            .block_size
            .min(self.meta.virtual_size - block * g.block_size);
        if base < MIB
            || base
                .checked_add(block_len)
                .is_none_or(|end| end > self.src.size())
        {
            return Err(Error::corrupt(
                self.path(),
                &format!("payload BAT entry {idx}"),
                self.bat.entry_offset(idx),
                format!(
                    "block at {base:#x} of {block_len} bytes lies outside the file ({} bytes)",
                    self.src.size()
                ),
            ));
        }
        Ok(self.src.map_data(base + within, n))
    }
}

impl Layer for VhdxLayer {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn path(&self) -> &Path {
        self.src.file().path()
    }

    fn virtual_size(&self) -> u64 {
        self.meta.virtual_size
    }

    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let (map, mut done) = self.block_piece(off, len)?;
        let block_size = self.bat.geometry.block_size;
        // Bounded work per call (see MAX_ENTRIES_PER_MAP).
        let mut blocks = 1;
        while done < len
            && (off + done).is_multiple_of(block_size)
            && blocks < super::MAX_ENTRIES_PER_MAP
        {
            blocks += 1;
            let (next, n) = self.block_piece(off + done, len - done)?;
            if !map.continues(done, &next) {
                break;
            }
            done += n;
        }
        Ok(Extent { len: done, map })
    }

    fn parent(&self) -> ParentRef {
        self.parent.clone()
    }

    fn verify_parent(&self, parent: &dyn Layer) -> Result<()> {
        match &self.linkage {
            Some(link) => parent::verify(self.path(), link, self.meta.logical_sector, parent),
            None => Ok(()),
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            uuid: Some(self.header.data_write_guid.0),
            ..Identity::default()
        }
    }

    fn files(&self) -> Vec<Arc<HostFile>> {
        vec![self.src.file().clone()]
    }

    fn logical_sector_size(&self) -> Option<u32> {
        u32::try_from(self.meta.logical_sector).ok()
    }

    fn details(&self) -> Vec<(String, String)> {
        let m = &self.meta;
        let kind = if m.has_parent {
            "differencing"
        } else if m.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        let mut d = vec![
            ("subformat".to_string(), kind.to_string()),
            ("block size".to_string(), m.block_size.to_string()),
            (
                DETAIL_LOGICAL_SECTOR.to_string(),
                m.logical_sector.to_string(),
            ),
            (
                "physical sector size".to_string(),
                m.physical_sector.to_string(),
            ),
            ("has parent".to_string(), m.has_parent.to_string()),
            ("log".to_string(), self.log_state.to_string()),
            (
                "data write guid".to_string(),
                format!("{{{}}}", self.header.data_write_guid),
            ),
        ];
        if let Some(id) = m.disk_id {
            d.push(("virtual disk id".to_string(), format!("{{{id}}}")));
        }
        if let Some(link) = &self.linkage {
            d.push((
                "parent linkage".to_string(),
                format!("{{{}}}", link.primary),
            ));
        }
        if !self.creator.is_empty() {
            d.push(("creator".to_string(), self.creator.clone()));
        }
        d
    }
}
