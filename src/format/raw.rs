//! Raw images: guest offset = host offset.

use super::raw_write::RawWriter;
use super::{Extent, Format, Layer, Mapping, OpenCtx};
use crate::error::Result;
use crate::storage::HostFile;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug)]
pub struct RawLayer {
    file: Arc<HostFile>,
    size: u64,
    writer: Option<RawWriter>,
}

impl RawLayer {
    pub fn open(path: &Path, ctx: &OpenCtx) -> Result<Arc<dyn Layer>> {
        let file = HostFile::open(path, ctx.writable)?;
        // Like QEMU, a raw image's size is rounded up to whole sectors; the tail reads as zeros.
        let size = file.len().div_ceil(512) * 512;
        let writer = ctx.writable.then(|| RawWriter::new(file.clone()));
        Ok(Arc::new(RawLayer { file, size, writer }))
    }
}

impl Layer for RawLayer {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn path(&self) -> &Path {
        self.file.path()
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        let file_len = self.file.len();
        if off >= file_len {
            return Ok(Extent {
                len,
                map: Mapping::Zero,
            });
        }
        Ok(Extent {
            len: len.min(file_len - off),
            map: Mapping::Data {
                file: self.file.clone(),
                host_off: off,
            },
        })
    }
    fn files(&self) -> Vec<Arc<HostFile>> {
        vec![self.file.clone()]
    }
    fn writer(&self) -> Option<&dyn crate::write::LayerWriter> {
        self.writer.as_ref().map(|w| w as _)
    }
}
