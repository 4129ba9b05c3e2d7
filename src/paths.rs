//! Paths stored inside images (backing files, parents, extents, data files): how they resolve
//! against the image that names them, and which references are followed at all. Shared by
//! the chain opener and the format drivers.
//!
//! Locations are local paths or URLs (`s3://`, `http://`, `https://`, see `storage::url`).
//! A remote image's references resolve against its URL and must stay on its host or bucket;
//! a local image may refer to a URL only on a host or bucket the user named (IMAGE itself, or
//! the image under `--overlay`), so a downloaded image cannot make the daemon fetch from
//! arbitrary servers (cloud metadata endpoints, intranet hosts).

use crate::error::{Error, Kind, Result};
use crate::storage::RemoteUrl;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};

/// Resolves a path stored in `child_path`'s image: absolute paths stay, relative ones are
/// relative to the child's directory (not the working directory). For a remote child, a
/// relative name is an object beside it (a refused reference keeps its stored text, and
/// `check_reference` says why).
pub fn resolve_relative(child_path: &Path, stored: &str) -> PathBuf {
    if let Ok(Some(url)) = RemoteUrl::from_path(child_path) {
        return match url.resolve(stored) {
            Ok(target) => PathBuf::from(target.to_string()),
            Err(_) => PathBuf::from(stored),
        };
    }
    let p = Path::new(stored);
    if p.is_absolute() || crate::storage::is_remote(p) {
        p.to_path_buf()
    } else {
        child_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Remote origins (scheme plus host or bucket) the user named on the command line.
static NAMED_ORIGINS: Mutex<Vec<RemoteUrl>> = Mutex::new(Vec::new());

/// Records a location the user named: local images may refer to URLs on its host/bucket.
pub fn trust_named(location: &Path) {
    if let Ok(Some(url)) = RemoteUrl::from_path(location) {
        let mut named = NAMED_ORIGINS.lock();
        if !named.iter().any(|n| n.same_origin(&url)) {
            named.push(url);
        }
    }
}

/// Whether the image at `requester` may make us open `target` (its backing file, parent,
/// extent or data file, already resolved). `stored` is the name as the image stores it.
pub fn check_reference(requester: &Path, stored: &str, target: &Path) -> Result<()> {
    let from = RemoteUrl::from_path(requester)?;
    let to = RemoteUrl::from_path(target)?;
    match (from, to) {
        (None, None) => Ok(()),
        (Some(from), to) => match to {
            Some(to) if from.same_origin(&to) => Ok(()),
            _ => Err(Error::new(
                Kind::InvalidInput,
                format!(
                    "{from}: refers to {stored:?} ({}), outside its {}; refused",
                    crate::storage::url::shown(&target.to_string_lossy()),
                    if from.scheme == crate::storage::url::Scheme::S3 {
                        "bucket"
                    } else {
                        "host"
                    }
                ),
            )),
        },
        (None, Some(to)) => {
            if NAMED_ORIGINS.lock().iter().any(|n| n.same_origin(&to)) {
                Ok(())
            } else {
                Err(Error::new(
                    Kind::InvalidInput,
                    format!(
                        "{}: refers to the remote object {to}; a local image may only refer to \
                         objects on a host or bucket named on the command line (mount the URL \
                         itself, or use it as IMAGE with --overlay)",
                        requester.display()
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_paths_follow_the_child() {
        assert_eq!(
            resolve_relative(Path::new("/a/b/top.qcow2"), "base.qcow2"),
            PathBuf::from("/a/b/base.qcow2")
        );
        assert_eq!(
            resolve_relative(Path::new("/a/b/top.qcow2"), "/x/base"),
            PathBuf::from("/x/base")
        );
        assert_eq!(
            resolve_relative(Path::new("top.qcow2"), "base"),
            PathBuf::from("base")
        );
        assert_eq!(
            resolve_relative(Path::new("/a/top.qcow2"), "s3://bucket/base"),
            PathBuf::from("s3://bucket/base")
        );
    }

    #[test]
    fn remote_references_stay_on_their_bucket_or_host() {
        let top = Path::new("s3://bucket/vm/top.qcow2");
        let base = resolve_relative(top, "../base.qcow2");
        assert_eq!(base, PathBuf::from("s3://bucket/base.qcow2"));
        assert!(check_reference(top, "../base.qcow2", &base).is_ok());
        for stored in [
            "/etc/passwd",
            "../../x",
            "s3://other/x",
            "http://127.0.0.1/x",
        ] {
            let target = resolve_relative(top, stored);
            let e = check_reference(top, stored, &target).unwrap_err();
            assert_eq!(e.kind(), Kind::InvalidInput, "{stored}: {e}");
        }
        // A locator computed by a driver (joined to the parent directory) is checked too.
        let outside = Path::new("/srv/base.vhd");
        assert!(check_reference(top, "base.vhd", outside).is_err());
    }

    #[test]
    fn local_images_refer_to_urls_only_on_named_origins() {
        let local = Path::new("/srv/overlay.qcow2");
        let target = Path::new("https://images.example/vm/base.qcow2");
        assert!(check_reference(local, "https://images.example/vm/base.qcow2", target).is_err());
        trust_named(Path::new("https://images.example/vm/top.qcow2"));
        assert!(check_reference(local, "https://images.example/vm/base.qcow2", target).is_ok());
        let other = Path::new("https://169.254.169.254/latest");
        assert!(check_reference(local, "https://169.254.169.254/latest", other).is_err());
        assert!(check_reference(local, "base", Path::new("/srv/base")).is_ok());
    }
}
