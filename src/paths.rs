//! Paths stored inside images (backing files, parents, extents, data files): how they resolve
//! against the image that names them, and which references are followed at all. Shared by
//! the chain opener and the format drivers.
//!
//! Locations are local paths or URLs (`s3://`, `http://`, `https://`, see `storage::url`).
//! A remote image's references resolve against its URL and must stay on its host or bucket;
//! a local image may refer to a URL only on a host or bucket the user named (IMAGE itself, or
//! the image under `--overlay`), so a downloaded image cannot make the daemon fetch from
//! arbitrary servers (cloud metadata endpoints, intranet hosts).

use crate::storage::RemoteUrl;
use std::path::{Path, PathBuf};

/// Resolves a path stored in `child_path`'s image: absolute paths stay, relative ones are
/// relative to the child's directory (not the working directory). For a remote child, a
/// relative name is an object beside it (a reference that cannot be resolved keeps its
/// stored text, which `remote_rule` then refuses).
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

/// Whether an image at `requester` may refer to `target` at all as far as locations go: a
/// remote image only to objects on its own host or bucket (the rest of the rules, for local
/// files, are the backing-file policy's).
pub fn stays_within(requester: &Path, target: &Path) -> bool {
    match RemoteUrl::from_path(requester) {
        Ok(Some(from)) => {
            matches!(RemoteUrl::from_path(target), Ok(Some(to)) if from.same_origin(&to))
        }
        Ok(None) => true,
        Err(_) => false,
    }
}

/// The rule for references from or to remote objects, beside the backing-file policy's
/// rules for local files: `None` when neither side is remote, else why it is allowed or
/// refused. `named`: the remote locations the user named; `trust_any`: `-o trust_backing`
/// (which lets local images name any URL, but never lets a remote image leave its origin).
pub fn remote_rule(
    requester: &Path,
    target: &Path,
    named: &[RemoteUrl],
    trust_any: bool,
) -> Option<std::result::Result<String, String>> {
    let from = RemoteUrl::from_path(requester);
    let to = RemoteUrl::from_path(target);
    match (from, to) {
        (Ok(None), Ok(None)) => None,
        (Err(e), _) | (_, Err(e)) => Some(Err(e.to_string())),
        (Ok(Some(from)), to) => Some(match to {
            Ok(Some(to)) if from.same_origin(&to) => Ok(format!(
                "on {}://{}, beside the image",
                from.scheme.name(),
                from.authority
            )),
            _ => Err(format!(
                "is outside {}://{}: a remote image may only refer to objects on its own {}",
                from.scheme.name(),
                from.authority,
                if from.scheme == crate::storage::url::Scheme::S3 {
                    "bucket"
                } else {
                    "host"
                }
            )),
        }),
        (Ok(None), Ok(Some(to))) => Some(remote_verdict(&to, named, trust_any)),
    }
}

/// Whether a remote object may be opened for a local image: only on an origin the user
/// named, unless `trust_any`.
pub fn remote_verdict(
    to: &RemoteUrl,
    named: &[RemoteUrl],
    trust_any: bool,
) -> std::result::Result<String, String> {
    if let Some(n) = named.iter().find(|n| n.same_origin(to)) {
        return Ok(format!(
            "on {}://{}, named on the command line",
            n.scheme.name(),
            n.authority
        ));
    }
    if trust_any {
        return Ok("trust_backing is set".into());
    }
    Err(format!(
        "is a remote object on a {} not named on the command line (mount the URL itself, use it \
         as IMAGE with --overlay, or accept any location with -o trust_backing)",
        if to.scheme == crate::storage::url::Scheme::S3 {
            "bucket"
        } else {
            "host"
        }
    ))
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
        assert!(matches!(remote_rule(top, &base, &[], false), Some(Ok(_))));
        for stored in [
            "/etc/passwd",
            "../../x",
            "s3://other/x",
            "http://127.0.0.1/x",
        ] {
            let target = resolve_relative(top, stored);
            assert!(
                matches!(remote_rule(top, &target, &[], true), Some(Err(_))),
                "{stored}"
            );
            assert!(!stays_within(top, &target), "{stored}");
        }
        assert!(remote_rule(Path::new("/a"), Path::new("/b"), &[], false).is_none());
    }

    #[test]
    fn local_images_refer_to_urls_only_on_named_origins() {
        let local = Path::new("/srv/overlay.qcow2");
        let target = Path::new("https://images.example/vm/base.qcow2");
        assert!(matches!(
            remote_rule(local, target, &[], false),
            Some(Err(_))
        ));
        assert!(matches!(remote_rule(local, target, &[], true), Some(Ok(_))));
        let named = [RemoteUrl::parse("https://images.example/vm/top.qcow2").unwrap()];
        assert!(matches!(
            remote_rule(local, target, &named, false),
            Some(Ok(_))
        ));
        let other = Path::new("https://169.254.169.254/latest");
        assert!(matches!(
            remote_rule(local, other, &named, false),
            Some(Err(_))
        ));
    }
}
