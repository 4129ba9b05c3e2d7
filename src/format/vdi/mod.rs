//! VDI (VirtualBox Disk Image): a header, one block map loaded at open, and data blocks.
//! Differencing images name their parent only by UUID (see `vbox.rs` for where we look).

mod blockmap;
mod header;
pub mod uuid;
mod vbox;

use super::{Extent, Format, Identity, Layer, Mapping, OpenCtx, ParentRef};
use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use blockmap::{BlockMap, Run};
use header::{Header, MAX_BLOCKS};
use std::path::Path;
use std::sync::Arc;
use uuid::Uuid;

pub use header::SIGNATURE;

#[derive(Debug)]
pub struct VdiLayer {
    file: Arc<HostFile>,
    header: Header,
    size: u64,
    map: BlockMap,
}

impl VdiLayer {
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Self::open_vdi(path, ctx)?))
    }

    /// The block map is small (4 bytes per block, 4 MiB for 1 TiB) and loaded whole.
    /// There is no writer yet, so even the top layer is opened read-only.
    pub fn open_vdi(path: &Path, _ctx: &OpenCtx) -> Result<VdiLayer> {
        let file = HostFile::open(path, false)?;
        let mut buf = vec![0u8; header::READ_SIZE.min(file.len() as usize)];
        file.read_exact_at(&mut buf, 0, "header")?;
        let header = Header::parse(&buf, path)?;
        let raw = file.read_table(
            header.offset_blocks as u64,
            header.blocks as u64 * 4,
            MAX_BLOCKS as u64 * 4,
            "block map",
        )?;
        let map = BlockMap {
            entries: BlockMap::decode(&raw),
            block_size: header.block_size as u64,
            block_extra: header.block_extra as u64,
            offset_data: header.offset_data as u64,
            offset_blocks: header.offset_blocks as u64,
            has_parent: header.image_type.has_parent(),
        };
        Ok(VdiLayer {
            size: header.virtual_size(),
            file,
            header,
            map,
        })
    }

    /// The UUID this image was created with (what children store as uuidLinkage).
    pub fn uuid(&self) -> Uuid {
        self.header.uuid_create
    }
}

fn identity_uuid(id: Option<[u8; 16]>) -> Option<Uuid> {
    id.map(Uuid)
}

impl Layer for VdiLayer {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let (len, run) = self.map.run(off, len, self.file.len(), self.file.path())?;
        let map = match run {
            Run::Data { host_off } => Mapping::Data {
                file: self.file.clone(),
                host_off,
            },
            Run::Zero => Mapping::Zero,
            Run::Unallocated => Mapping::Unallocated,
        };
        Ok(Extent { len, map })
    }

    fn parent(&self) -> ParentRef {
        if !self.header.image_type.has_parent() {
            return ParentRef::None;
        }
        let wanted = self.header.uuid_linkage;
        let dir = match self.path().parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => ".".into(),
        };
        ParentRef::Search {
            dir,
            hints: vbox::parent_hints(self.path(), &wanted),
            wanted: format!(
                "uuid {{{wanted}}} (the directory above and .vbox media registries were searched too)"
            ),
        }
    }

    /// VirtualBox links a differencing image to its parent by uuidLinkage == the parent's
    /// uuidCreate (Main refuses a mismatch). uuidParentModify records the parent's
    /// uuidModify when the child was made; VirtualBox does not check it (its VD API does
    /// not even expose it), and any write to the parent changes uuidModify, so a mismatch
    /// is only worth a warning.
    fn verify_parent(&self, parent: &dyn Layer) -> Result<()> {
        let wanted = self.header.uuid_linkage;
        if parent.format() != Format::Vdi {
            return Err(Error::new(
                Kind::NotFound,
                format!(
                    "{}: parent {} is a {} image; a VDI differencing image needs the VDI with uuid {{{wanted}}}",
                    self.path().display(),
                    parent.path().display(),
                    parent.format()
                ),
            ));
        }
        let id = parent.identity();
        let found = identity_uuid(id.uuid).unwrap_or_default();
        if found != wanted {
            return Err(Error::new(
                Kind::NotFound,
                format!(
                    "{}: looked for the parent with uuid {{{wanted}}}, but {} has uuid {{{found}}}",
                    self.path().display(),
                    parent.path().display()
                ),
            ));
        }
        let expected_modify = self.header.uuid_parent_modify;
        let modify = identity_uuid(id.modify_uuid).unwrap_or_default();
        if !expected_modify.is_nil() && modify != expected_modify {
            log::warn!(
                "{}: parent {} was modified after this image was made (its uuidModify is {{{modify}}}, \
                 this image expects {{{expected_modify}}}); VirtualBox accepts this, reading anyway",
                self.path().display(),
                parent.path().display()
            );
        }
        Ok(())
    }

    fn identity(&self) -> Identity {
        Identity {
            uuid: Some(self.header.uuid_create.0),
            modify_uuid: Some(self.header.uuid_modify.0),
            cid: None,
        }
    }

    fn files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }

    fn details(&self) -> Vec<(String, String)> {
        let h = &self.header;
        let mut d = vec![
            ("image type".to_string(), h.image_type.name().to_string()),
            (
                "version".into(),
                format!("{}.{}", h.version >> 16, h.version & 0xffff),
            ),
            ("block size".into(), h.block_size.to_string()),
            ("blocks".into(), h.blocks.to_string()),
            ("blocks allocated".into(), h.blocks_allocated.to_string()),
            ("uuid".into(), format!("{{{}}}", h.uuid_create)),
            ("modify uuid".into(), format!("{{{}}}", h.uuid_modify)),
        ];
        if h.flags != 0 {
            d.push(("flags".into(), format!("{:#x}", h.flags)));
        }
        if h.block_extra != 0 {
            d.push(("block extra".into(), h.block_extra.to_string()));
        }
        if !h.uuid_linkage.is_nil() {
            d.push(("parent uuid".into(), format!("{{{}}}", h.uuid_linkage)));
            d.push((
                "parent modify uuid".into(),
                format!("{{{}}}", h.uuid_parent_modify),
            ));
        }
        d
    }
}
