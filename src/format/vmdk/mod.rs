//! VMDK: a text descriptor and its extents (FLAT/VMFS, SPARSE, ZERO, VMFSSPARSE, SESPARSE),
//! or a hosted sparse file (monolithicSparse, streamOptimized) carrying its descriptor.
//!
//! The layer is read-only. Extents are concatenated; `map` answers within one extent and
//! the view loop asks again for the next.

pub mod descriptor;
pub mod header;
mod sesparse;
mod sparse;
pub mod vmsd;

use super::{Extent, Format, Identity, Layer, Mapping, OpenCtx, ParentRef};
use crate::backing_policy::Role;
use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use descriptor::{Access, Descriptor, ExtentLine, ExtentType, MAX_DESCRIPTOR};
use header::SECTOR;
use sesparse::SeSparseExtent;
use sparse::SparseExtent;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug)]
enum Backing {
    Flat { file: Arc<HostFile>, start: u64 },
    Zero,
    Sparse(SparseExtent),
    SeSparse(SeSparseExtent),
}

#[derive(Debug)]
struct Slot {
    /// Guest offset of the extent's first byte.
    start: u64,
    len: u64,
    backing: Backing,
}

#[derive(Debug)]
pub struct VmdkLayer {
    path: PathBuf,
    desc: Descriptor,
    slots: Vec<Slot>,
    size: u64,
    files: Vec<Arc<HostFile>>,
    display_name: Option<String>,
    /// The embedded descriptor named its extent `""` (mkimg), read as this file.
    empty_extent_name: bool,
}

impl VmdkLayer {
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Self::open_layer(path, ctx)?))
    }

    pub fn open_layer(path: &Path, ctx: &OpenCtx) -> Result<VmdkLayer> {
        // Read-only: this driver has no writer, so even the top file is never written.
        let file = HostFile::open(path, false)?;
        let mut magic = [0u8; 8];
        if file.len() >= 8 {
            file.read_exact_at(&mut magic, 0, "magic")?;
        }
        let mut layer = match &magic[..4] {
            b"KDMV" => Self::open_hosted(file, ctx)?,
            b"COWD" => {
                let h = header::read(&file)?;
                let len = h.capacity * SECTOR;
                let ext = SparseExtent::open(file.clone(), h, len, ctx.tables.clone())?;
                Self::assemble(
                    path,
                    Descriptor::default(),
                    vec![(len, Backing::Sparse(ext))],
                    vec![file],
                )?
            }
            // A bare ESXi seSparse extent opened without its descriptor: a standalone disk.
            _ if magic == crate::format::magic::VMDK_SESPARSE => {
                let ext = SeSparseExtent::open(file.clone(), ctx.tables.clone())?;
                let len = ext.capacity * SECTOR;
                Self::assemble(
                    path,
                    Descriptor::default(),
                    vec![(len, Backing::SeSparse(ext))],
                    vec![file],
                )?
            }
            _ => {
                let len = file.len().min(MAX_DESCRIPTOR);
                let text = file.read_table(0, len, MAX_DESCRIPTOR, "descriptor")?;
                let desc = Descriptor::parse(&text, path, 0)?;
                Self::open_extents(path, desc, file, ctx)?
            }
        };
        layer.display_name = vmsd::display_name(path);
        Ok(layer)
    }

    /// A hosted sparse file: one extent (this file) plus its embedded descriptor, or a
    /// descriptor wrapped in a KDMV header (capacity 0).
    fn open_hosted(file: Arc<HostFile>, ctx: &OpenCtx) -> Result<VmdkLayer> {
        let mut first = [0u8; 512];
        file.read_exact_at(&mut first, 0, "sparse extent header")?;
        let raw = header::decode_kdmv(&first, &file, 0)?;
        let desc = match raw.desc_offset {
            0 => Descriptor::default(),
            off => {
                let field = "embedded descriptor";
                let at = off
                    .checked_mul(SECTOR)
                    .ok_or_else(|| Error::corrupt(file.path(), field, 28, "offset overflows"))?;
                let len = raw.desc_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
                let text = file.read_table(at, len, MAX_DESCRIPTOR, field)?;
                Descriptor::parse(&text, file.path(), at)?
            }
        };
        let path = file.path().to_path_buf();
        if raw.capacity == 0 && raw.desc_offset != 0 {
            return Self::open_extents(&path, desc, file, ctx);
        }
        let h = header::read(&file)?;
        let len = h.capacity * SECTOR;
        let ext = SparseExtent::open(file.clone(), h, len, ctx.tables.clone())?;
        // As in QEMU, the extent of a sparse file is the file itself whatever its embedded
        // descriptor names (FreeBSD's mkimg names it "").
        let empty_extent_name = desc.extents.iter().any(ExtentLine::has_empty_name);
        let mut layer = Self::assemble(&path, desc, vec![(len, Backing::Sparse(ext))], vec![file])?;
        layer.empty_extent_name = empty_extent_name;
        Ok(layer)
    }

    /// Opens every extent a descriptor lists.
    fn open_extents(
        path: &Path,
        desc: Descriptor,
        desc_file: Arc<HostFile>,
        ctx: &OpenCtx,
    ) -> Result<VmdkLayer> {
        if desc.extents.is_empty() {
            return Err(Error::corrupt(path, "descriptor", 0, "lists no extents"));
        }
        let mut files = vec![desc_file];
        let mut parts = Vec::with_capacity(desc.extents.len());
        for line in &desc.extents {
            let backing = open_extent(path, line, ctx, &mut files)?;
            parts.push((line.sectors * SECTOR, backing));
        }
        Self::assemble(path, desc, parts, files)
    }

    fn assemble(
        path: &Path,
        desc: Descriptor,
        parts: Vec<(u64, Backing)>,
        files: Vec<Arc<HostFile>>,
    ) -> Result<VmdkLayer> {
        let mut slots = Vec::with_capacity(parts.len());
        let mut size = 0u64;
        for (len, backing) in parts {
            let start = size;
            size = size
                .checked_add(len)
                .filter(|&s| s <= i64::MAX as u64)
                .ok_or_else(|| Error::corrupt(path, "extent sizes", 0, "their sum overflows"))?;
            if len > 0 {
                slots.push(Slot {
                    start,
                    len,
                    backing,
                });
            }
        }
        Ok(VmdkLayer {
            path: path.to_path_buf(),
            desc,
            slots,
            size,
            files,
            display_name: None,
            empty_extent_name: false,
        })
    }

    /// The name VMware's `.vmsd` gives the snapshot that froze this layer.
    pub fn vmsd_name(&self) -> Option<&str> {
        self.display_name.as_deref()
    }

    fn grain_bytes(&self) -> Option<u64> {
        self.slots.iter().find_map(|s| match &s.backing {
            Backing::Sparse(e) => Some(e.header().grain_bytes()),
            Backing::SeSparse(_) => Some(4096),
            _ => None,
        })
    }
}

fn open_extent(
    desc_path: &Path,
    line: &ExtentLine,
    ctx: &OpenCtx,
    files: &mut Vec<Arc<HostFile>>,
) -> Result<Backing> {
    let what = || {
        format!(
            "{}: extent on line {} ({})",
            desc_path.display(),
            line.line,
            line.summary()
        )
    };
    if line.access == Access::NoAccess {
        return Err(Error::unsupported(
            desc_path,
            format!("NOACCESS extent on line {}", line.line),
        ));
    }
    match line.kind {
        ExtentType::Zero => return Ok(Backing::Zero),
        ExtentType::Device => {
            return Err(Error::unsupported(
                desc_path,
                format!("device-backed extent on line {}", line.line),
            ));
        }
        _ => {}
    }
    let Some(name) = &line.file else {
        return Err(Error::corrupt(
            desc_path,
            "extent",
            0,
            format!("line {} has no file name", line.line),
        ));
    };
    if name.is_empty() {
        return Err(Error::corrupt(
            desc_path,
            &format!("descriptor extent line {}", line.line),
            line.offset,
            "empty file name (only the descriptor embedded in a sparse extent may leave it \
             empty, meaning that file itself)",
        ));
    }
    let ext_path = descriptor::extent_path(desc_path, name);
    let stored = String::from_utf8_lossy(name);
    let file = ctx
        .open_named(desc_path, Role::Extent, &stored, &ext_path, false)
        .map_err(|e| {
            if e.kind() == Kind::NotFound {
                Error::new(
                    Kind::NotFound,
                    format!("{}: file not found (tried {})", what(), ext_path.display()),
                )
            } else {
                e.context(what())
            }
        })?;
    files.push(file.clone());
    let len = line.sectors * SECTOR;
    let backing = match line.kind {
        ExtentType::Flat | ExtentType::Vmfs => {
            let start = line
                .start
                .checked_mul(SECTOR)
                .filter(|s| s.checked_add(len).is_some())
                .ok_or_else(|| {
                    Error::corrupt(
                        desc_path,
                        "extent start sector",
                        0,
                        format!("line {}: overflows", line.line),
                    )
                })?;
            Backing::Flat { file, start }
        }
        ExtentType::Sparse | ExtentType::VmfsSparse => {
            let h = header::read(&file).map_err(|e| e.context(what()))?;
            if h.capacity != line.sectors {
                log::warn!(
                    "{}: header capacity {} sectors, descriptor says {}",
                    what(),
                    h.capacity,
                    line.sectors
                );
            }
            Backing::Sparse(
                SparseExtent::open(file, h, len, ctx.tables.clone())
                    .map_err(|e| e.context(what()))?,
            )
        }
        ExtentType::SeSparse => {
            let e =
                SeSparseExtent::open(file, ctx.tables.clone()).map_err(|e| e.context(what()))?;
            if e.capacity != line.sectors {
                log::warn!(
                    "{}: header capacity {} sectors, descriptor says {}",
                    what(),
                    e.capacity,
                    line.sectors
                );
            }
            Backing::SeSparse(e)
        }
        ExtentType::Zero | ExtentType::Device => {
            return Err(Error::invalid("unreachable extent type"));
        }
    };
    Ok(backing)
}

/// A parent hint may be a Windows path: absolute Windows paths keep only their file name
/// (looked up beside the child), relative ones get `/` separators.
fn hint_path(child: &Path, hint: &[u8]) -> PathBuf {
    let s = String::from_utf8_lossy(hint).into_owned();
    if !s.contains('\\') && s.get(1..2).is_none_or(|c| c != ":") {
        return crate::paths::resolve_relative(child, &s);
    }
    let unix = s.replace('\\', "/");
    let drive = unix.len() >= 2 && unix.as_bytes()[1] == b':';
    if drive || unix.starts_with("//") {
        let base = unix.rsplit('/').next().unwrap_or(&unix);
        return crate::paths::resolve_relative(child, base);
    }
    crate::paths::resolve_relative(child, &unix)
}

impl Layer for VmdkLayer {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let i = self.slots.partition_point(|s| s.start + s.len <= off);
        let Some(slot) = self.slots.get(i) else {
            return Err(Error::invalid(format!(
                "{}: offset {off:#x} is past the disk end",
                self.path.display()
            )));
        };
        let rel = off - slot.start;
        let len = len.min(slot.len - rel);
        match &slot.backing {
            Backing::Zero => Ok(Extent {
                len,
                map: Mapping::Zero,
            }),
            Backing::Flat { file, start } => {
                let host = start + rel;
                // Bytes past the end of a short flat file read as zeros, as in QEMU.
                match file.len().checked_sub(host) {
                    Some(avail) if avail > 0 => Ok(Extent {
                        len: len.min(avail),
                        map: Mapping::Data {
                            file: file.clone(),
                            host_off: host,
                        },
                    }),
                    _ => Ok(Extent {
                        len,
                        map: Mapping::Zero,
                    }),
                }
            }
            Backing::Sparse(e) => e.map(rel, len),
            Backing::SeSparse(e) => e.map(rel, len),
        }
    }

    fn parent(&self) -> ParentRef {
        match self.desc.parent() {
            Some((hint, _)) => ParentRef::Path {
                raw: String::from_utf8_lossy(hint).into_owned(),
                path: hint_path(&self.path, hint),
                // QEMU opens the parent as VMDK too; never probe a parent as something else.
                format: Some(Format::Vmdk),
            },
            None => ParentRef::None,
        }
    }

    fn verify_parent(&self, parent: &dyn Layer) -> Result<()> {
        let Some((_, want)) = self.desc.parent() else {
            return Ok(());
        };
        let fail = |what: String| {
            Err(Error::new(
                Kind::Corrupt,
                format!(
                    "{}: parent {}: {what}",
                    self.path.display(),
                    parent.path().display()
                ),
            ))
        };
        if parent.format() != Format::Vmdk {
            return fail(format!(
                "is {}, not VMDK, so parentCID {want:08x} cannot match",
                parent.format()
            ));
        }
        match parent.identity().cid {
            Some(cid) if cid == want => Ok(()),
            Some(cid) => fail(format!(
                "its CID {cid:08x} differs from the child's parentCID {want:08x} (the parent was modified after the child was made)"
            )),
            None => fail(format!(
                "has no CID to match the child's parentCID {want:08x}"
            )),
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            cid: self.desc.cid,
            ..Identity::default()
        }
    }

    fn files(&self) -> Vec<Arc<HostFile>> {
        self.files.clone()
    }

    fn details(&self) -> Vec<(String, String)> {
        let mut d = Vec::new();
        let create_type = self.desc.create_type.clone().unwrap_or_else(|| {
            match self.slots.first().map(|s| &s.backing) {
                Some(Backing::Sparse(e)) if e.header().cowd => "vmfsSparse (bare COWD)".into(),
                Some(Backing::Sparse(e)) if e.header().compressed => "streamOptimized".into(),
                _ => "monolithicSparse".into(),
            }
        });
        d.push(("createType".into(), create_type));
        if !self.desc.extents.is_empty() {
            let ext: Vec<String> = self.desc.extents.iter().map(|e| e.summary()).collect();
            d.push(("extents".into(), ext.join("; ")));
        }
        if let Some(c) = self.desc.cid {
            d.push(("CID".into(), format!("{c:08x}")));
        }
        if let Some(c) = self.desc.parent_cid {
            d.push(("parentCID".into(), format!("{c:08x}")));
        }
        if let Some(g) = self.grain_bytes() {
            d.push(("grain size".into(), g.to_string()));
        }
        if let Some(n) = &self.display_name {
            d.push(("vmsd display name".into(), n.clone()));
        }
        if self.empty_extent_name {
            d.push((
                "extent name".into(),
                "empty in the embedded descriptor (as FreeBSD mkimg writes it): read as this \
                 file, as QEMU does"
                    .into(),
            ));
        }
        d
    }

    fn display_name(&self) -> Option<String> {
        self.display_name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parent_hints_resolve_beside_the_child() {
        let child = Path::new("/vm/disk-000001.vmdk");
        assert_eq!(hint_path(child, b"disk.vmdk"), Path::new("/vm/disk.vmdk"));
        assert_eq!(
            hint_path(child, b"C:\\VMs\\x\\disk.vmdk"),
            Path::new("/vm/disk.vmdk")
        );
        assert_eq!(
            hint_path(child, b"..\\base\\disk.vmdk"),
            Path::new("/vm/../base/disk.vmdk")
        );
        assert_eq!(
            hint_path(child, b"/abs/disk.vmdk"),
            Path::new("/abs/disk.vmdk")
        );
        assert_eq!(
            hint_path(child, b"\\\\srv\\share\\d.vmdk"),
            Path::new("/vm/d.vmdk")
        );
    }
}
