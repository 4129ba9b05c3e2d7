//! One small error type for the whole daemon. Kinds become errno only at the FUSE boundary.

use std::fmt;
use std::io;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The host file system failed (the source io::Error says how).
    Io,
    /// A file the chain needs is missing.
    NotFound,
    /// The image contradicts its own format (hostile or damaged input).
    Corrupt,
    /// A valid image uses something vmfs-mount does not implement.
    Unsupported,
    /// The caller asked for something that makes no sense (bad option, bad range).
    InvalidInput,
    /// A write was aimed at something read-only.
    ReadOnly,
    /// Someone else holds the image (locks).
    Busy,
    /// An earlier write failure made this view refuse further writes.
    Failed,
    /// The backing-file policy refused a file an image names (see `backing_policy`).
    Refused,
    /// A name that must be new is taken (mkdir, rename onto an existing snapshot).
    Exists,
    /// A directory to remove still holds something that cannot go with it.
    NotEmpty,
    /// The operation is not allowed on this object (rmdir of the live view, mkdir where no
    /// directory can be made).
    NotPermitted,
}

pub struct Error {
    kind: Kind,
    msg: String,
    source: Option<io::Error>,
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a user must do once a writer has latched after a failed host write or flush: the
/// in-memory state may no longer match the file, so only a fresh open is trusted.
pub const LATCHED_HINT: &str = "writes and flushes fail with EIO until then; free space or fix \
the host, then unmount and mount again (data flushed before the failure is intact)";

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// A format violation: names the file, the field and where it was found.
    pub fn corrupt(file: &Path, field: &str, offset: u64, what: impl fmt::Display) -> Self {
        Self::new(
            Kind::Corrupt,
            format!(
                "{}: {field} at offset {offset:#x}: {what}",
                crate::storage::show_path(file)
            ),
        )
    }

    pub fn unsupported(file: &Path, what: impl fmt::Display) -> Self {
        Self::new(
            Kind::Unsupported,
            format!("{}: unsupported: {what}", crate::storage::show_path(file)),
        )
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(Kind::InvalidInput, msg)
    }

    /// A host I/O failure on `file`; `op` says what was being done ("read L2 table").
    pub fn io(file: &Path, op: &str, e: io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => Kind::NotFound,
            io::ErrorKind::ReadOnlyFilesystem => Kind::ReadOnly,
            _ => Kind::Io,
        };
        Error {
            kind,
            msg: format!("{}: {op}: {e}", crate::storage::show_path(file)),
            source: Some(e),
        }
    }

    /// Prefixes the message with where it happened ("opening backing file of top.qcow2").
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            Kind::Io => self
                .source
                .as_ref()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
            Kind::NotFound => libc::ENOENT,
            Kind::Corrupt | Kind::Failed => libc::EIO,
            Kind::Unsupported => libc::EOPNOTSUPP,
            Kind::InvalidInput => libc::EINVAL,
            Kind::ReadOnly => libc::EROFS,
            Kind::Busy => libc::EBUSY,
            Kind::Refused => libc::EACCES,
            Kind::Exists => libc::EEXIST,
            Kind::NotEmpty => libc::ENOTEMPTY,
            Kind::NotPermitted => libc::EPERM,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.msg)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Bails out with a Corrupt error unless `cond` holds.
#[macro_export]
macro_rules! ensure_corrupt {
    ($cond:expr, $file:expr, $field:expr, $off:expr, $($what:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::corrupt($file, $field, $off, format!($($what)+)));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_names_file_field_and_offset() {
        let e = Error::corrupt(
            Path::new("a.qcow2"),
            "L1 table",
            0x30000,
            "past end of file",
        );
        assert_eq!(
            e.to_string(),
            "a.qcow2: L1 table at offset 0x30000: past end of file"
        );
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let e = Error::io(
            Path::new("x"),
            "read",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.errno(), libc::ENOSPC);
    }
}
