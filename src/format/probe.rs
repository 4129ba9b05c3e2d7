//! Format detection by content, never by file name.

use super::Format;
use super::magic;
use crate::error::{Error, Kind, Result};
use crate::storage::HostFile;
use std::path::Path;

/// Guesses the format of `path` from its bytes.
pub fn detect(path: &Path) -> Result<Format> {
    let file = HostFile::open(path, false)?;
    let mut head = vec![0u8; 1024.min(file.len()) as usize];
    file.read_exact_at(&mut head, 0, "header")?;
    let mut tail = [0u8; 512];
    let has_tail = file.len() >= 512
        && file
            .read_exact_at(&mut tail, file.len() - 512, "footer")
            .is_ok();
    if let Some(name) = unsupported_format(&head) {
        return Err(Error::unsupported(
            path,
            format!("{name} images are not supported (use --format raw to read the file as it is)"),
        ));
    }
    Ok(detect_bytes(&head, has_tail.then_some(&tail[..])))
}

/// Formats we recognise but do not read: serving them as raw would show wrong bytes.
fn unsupported_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt") {
        Some("Parallels")
    } else if head.starts_with(b"QED\0") {
        Some("QED")
    } else if head.starts_with(b"cloop") || head.starts_with(b"#!/bin/sh\n#V2.0 Format") {
        Some("cloop")
    } else {
        None
    }
}

/// The pure part of `detect`: `head` is up to the first 1 KiB, `tail` the last 512 bytes.
pub fn detect_bytes(head: &[u8], tail: Option<&[u8]>) -> Format {
    let starts = |m: &[u8]| head.starts_with(m);
    if starts(magic::QCOW2) {
        Format::Qcow2
    } else if starts(magic::VMDK_SPARSE)
        || starts(magic::VMDK_COWD)
        || starts(&magic::VMDK_SESPARSE)
        || is_vmdk_descriptor(head)
    {
        Format::Vmdk
    } else if starts(magic::VHDX) {
        Format::Vhdx
    } else if head.len() >= magic::VDI_SIGNATURE_OFFSET + 4
        && head[magic::VDI_SIGNATURE_OFFSET..magic::VDI_SIGNATURE_OFFSET + 4]
            == magic::VDI_SIGNATURE.to_le_bytes()
    {
        Format::Vdi
    } else if starts(magic::VHD)
        || tail.is_some_and(|t| {
            t.starts_with(magic::VHD) || t.get(1..).is_some_and(|r| r.starts_with(magic::VHD))
        })
    {
        Format::Vpc
    } else {
        Format::Raw
    }
}

/// A text descriptor: "# Disk DescriptorFile" near the start, or the keys it must contain.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    text.contains("# Disk DescriptorFile")
        || (text.contains("createType") && text.contains("version=") && text.contains("CID"))
}

/// Errors a user can act on when a file is plainly not an image.
pub fn require_nonempty(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
    if meta.is_dir() {
        return Err(Error::new(
            Kind::InvalidInput,
            format!("{}: is a directory", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_magic() {
        assert_eq!(detect_bytes(b"QFI\xfb\0\0\0\x03", None), Format::Qcow2);
        assert_eq!(detect_bytes(b"KDMV", None), Format::Vmdk);
        assert_eq!(
            detect_bytes(b"# Disk DescriptorFile\nversion=1\n", None),
            Format::Vmdk
        );
        assert_eq!(detect_bytes(b"vhdxfile", None), Format::Vhdx);
        assert_eq!(detect_bytes(b"conectix", None), Format::Vpc);
        let mut vdi = vec![0u8; 0x200];
        vdi[0x40..0x44].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        assert_eq!(detect_bytes(&vdi, None), Format::Vdi);
        assert_eq!(
            detect_bytes(&[0u8; 512], Some(b"conectix\0\0")),
            Format::Vpc
        );
        assert_eq!(detect_bytes(&[0u8; 512], Some(&[0u8; 512])), Format::Raw);
        assert_eq!(
            unsupported_format(b"WithoutFreeSpace\0\0"),
            Some("Parallels")
        );
        assert_eq!(unsupported_format(b"QED\0"), Some("QED"));
        assert_eq!(unsupported_format(&[0u8; 64]), None);
        // Pre-2004 Virtual PC images end in a 511-byte footer.
        assert_eq!(
            detect_bytes(&[0u8; 512], Some(b"\0conectix\0")),
            Format::Vpc
        );
    }
}
