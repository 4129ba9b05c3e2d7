//! Remote locations: `s3://BUCKET/KEY`, `http://HOST[:PORT]/PATH`, `https://...`.
//!
//! A remote location travels through the chain code as a `Path` holding the URL text (that is
//! what the user typed and what images store), and is parsed here wherever it is opened or
//! compared. Paths stored inside a remote image resolve against its URL like file names in a
//! directory; a reference that would leave the URL's host (HTTP) or bucket (S3) is refused.

use crate::error::{Error, Kind, Result};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use std::fmt;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
    S3,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::S3 => "s3",
        }
    }
}

/// A parsed remote location. `authority` is the host[:port] for HTTP, the bucket for S3;
/// `segments` are the decoded path segments (the S3 key is their `/`-join).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteUrl {
    pub scheme: Scheme,
    pub authority: String,
    pub segments: Vec<String>,
    /// An HTTP query string (e.g. a pre-signed URL's signature), sent but never shown.
    query: Option<String>,
}

/// Characters escaped in an HTTP path segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Whether `path` is a remote location (by its scheme; the rest may still be malformed).
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|s| scheme_of(s).is_some())
}

fn scheme_of(s: &str) -> Option<(Scheme, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        "s3" => Scheme::S3,
        _ => return None,
    };
    Some((scheme, rest))
}

impl RemoteUrl {
    /// Parses a remote location; `Ok(None)` for a local path.
    pub fn from_path(path: &Path) -> Result<Option<RemoteUrl>> {
        match path.to_str() {
            Some(s) if scheme_of(s).is_some() => RemoteUrl::parse(s).map(Some),
            _ => Ok(None),
        }
    }

    pub fn parse(s: &str) -> Result<RemoteUrl> {
        let bad = |why: &str| Error::invalid(format!("{}: {why}", shown(s)));
        let (scheme, rest) =
            scheme_of(s).ok_or_else(|| bad("not an s3://, http:// or https:// URL"))?;
        let rest = rest.split('#').next().unwrap_or_default();
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) if scheme != Scheme::S3 => (r, Some(q.to_string())),
            Some(_) => return Err(bad("an s3:// URL takes no query string")),
            None => (rest, None),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(bad(
                "credentials in the URL are refused (they would show in logs and `ps`); \
                 use the environment or a credentials file",
            ));
        }
        if authority.is_empty() {
            return Err(bad(match scheme {
                Scheme::S3 => "no bucket",
                _ => "no host",
            }));
        }
        if scheme == Scheme::S3 && !valid_bucket(authority) {
            return Err(bad("not a valid S3 bucket name"));
        }
        if scheme != Scheme::S3 && !valid_authority(authority) {
            return Err(bad("not a valid host[:port]"));
        }
        let mut segments = Vec::new();
        for raw in path.split('/') {
            let seg = if scheme == Scheme::S3 {
                raw.to_string()
            } else {
                percent_decode_str(raw)
                    .decode_utf8()
                    .map_err(|_| bad("path is not UTF-8 once decoded"))?
                    .into_owned()
            };
            push_segment(&mut segments, &seg).map_err(|_| bad("`..` leaves the URL's root"))?;
        }
        if segments.is_empty() || path.ends_with('/') {
            return Err(bad("names a directory, not an object"));
        }
        Ok(RemoteUrl {
            scheme,
            authority: authority.to_ascii_lowercase(),
            segments,
            query,
        })
    }

    /// The S3 object key.
    pub fn key(&self) -> String {
        self.segments.join("/")
    }

    /// The URL to send to an HTTP server (with its query string, if any).
    pub fn request_url(&self) -> String {
        let mut s = format!("{}://{}", self.scheme.name(), self.authority);
        for seg in &self.segments {
            s.push('/');
            s.extend(utf8_percent_encode(seg, SEGMENT));
        }
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        s
    }

    /// What the chunk cache keys this object by (hashed, never shown): the URL with its
    /// query string, since a query may select the object (`?versionId=`, `download?id=`),
    /// but without the parameters that only sign or date a pre-signed URL, which change each
    /// time it is signed again while the object does not (its ETag and size are in the key
    /// too, so a re-signed URL for another version still shares nothing).
    pub fn cache_identity(&self) -> String {
        let mut s = self.request_url();
        if let Some(q) = &self.query {
            s.truncate(s.len() - q.len() - 1);
            let kept: Vec<&str> = q
                .split('&')
                .filter(|p| !p.is_empty() && !is_signing_param(p.split('=').next().unwrap_or("")))
                .collect();
            if !kept.is_empty() {
                s.push('?');
                s.push_str(&kept.join("&"));
            }
        }
        s
    }

    /// The same scheme and host or bucket: what a remote image may refer to (an https
    /// image may not send us to plain http).
    pub fn same_origin(&self, other: &RemoteUrl) -> bool {
        self.scheme == other.scheme && self.authority == other.authority
    }

    /// Resolves a name stored in this object's image (a backing file, parent, extent) as a
    /// file name relative to the object's "directory". Absolute URLs must stay on the same
    /// host or bucket; absolute local paths are refused.
    pub fn resolve(&self, stored: &str) -> Result<RemoteUrl> {
        let refuse = |why: String| {
            Error::new(
                Kind::InvalidInput,
                format!("{self}: refers to {stored:?}, {why}"),
            )
        };
        if scheme_of(stored).is_some() {
            let target = RemoteUrl::parse(stored)?;
            if !self.same_origin(&target) {
                return Err(refuse(format!(
                    "which is outside {}://{}: a remote image may only refer to objects \
                     on its own {}",
                    self.scheme.name(),
                    self.authority,
                    if self.scheme == Scheme::S3 {
                        "bucket"
                    } else {
                        "host"
                    }
                )));
            }
            return Ok(target);
        }
        if stored.starts_with('/') {
            return Err(refuse(
                "an absolute local path; a remote image may only refer to objects beside it \
                 (make the reference relative, e.g. with `qemu-img rebase -u -b NAME`)"
                    .into(),
            ));
        }
        let mut segments = self.segments.clone();
        segments.pop();
        for seg in stored.split('/') {
            push_segment(&mut segments, seg)
                .map_err(|_| refuse(format!("which leaves the root of {self}")))?;
        }
        if segments.is_empty() || stored.is_empty() || stored.ends_with('/') {
            return Err(refuse("which names a directory".into()));
        }
        Ok(RemoteUrl {
            scheme: self.scheme,
            authority: self.authority.clone(),
            segments,
            query: None,
        })
    }

    /// The "directory" holding this object, as a location string ending in `/`.
    pub fn parent_prefix(&self) -> String {
        let dir = &self.segments[..self.segments.len().saturating_sub(1)];
        let mut s = format!("{}://{}/", self.scheme.name(), self.authority);
        for seg in dir {
            s.push_str(seg);
            s.push('/');
        }
        s
    }
}

/// Query parameters of pre-signed URLs (AWS SigV2/V4, Google Cloud Storage, Azure SAS) that
/// authenticate the request without choosing what it reads.
fn is_signing_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    (n.starts_with("x-amz-")
        && !matches!(n.as_str(), "x-amz-request-payer" | "x-amz-checksum-mode"))
        || n.starts_with("x-goog-")
        || matches!(
            n.as_str(),
            "awsaccesskeyid" | "signature" | "expires" | "sig" | "se" | "st" | "sv" | "sp" | "spr"
        )
}

fn push_segment(segments: &mut Vec<String>, seg: &str) -> std::result::Result<(), ()> {
    match seg {
        "" | "." => {}
        ".." => {
            segments.pop().ok_or(())?;
        }
        s => segments.push(s.to_string()),
    }
    Ok(())
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
}

fn valid_authority(a: &str) -> bool {
    let (host, port) = match a.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, rest)) => (h, rest.strip_prefix(':')),
            None => return false,
        },
        None => match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        },
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b':'))
        && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

/// A file name as it may be shown in logs, errors and `--list`: local paths as they are,
/// URLs through `shown`.
pub fn show_path(p: &Path) -> String {
    match p.to_str() {
        Some(s) if scheme_of(s).is_some() => shown(s),
        _ => p.display().to_string(),
    }
}

/// A location as it may be shown: without a query string (it may carry a signature; `?...`
/// says there was one) or user information (a password).
pub fn shown(s: &str) -> String {
    let had_query = s.split('#').next().unwrap_or_default().contains('?');
    let s = s.split(['?', '#']).next().unwrap_or_default();
    let q = if had_query { "?..." } else { "" };
    match s.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority.rsplit('@').next().unwrap_or_default();
            let hidden = if host.len() < authority.len() {
                "...@"
            } else {
                ""
            };
            format!("{scheme}://{hidden}{host}/{path}{q}")
        }
        None => format!("{s}{q}"),
    }
}

impl fmt::Display for RemoteUrl {
    /// What logs and errors show: the scheme, host or bucket and path, never a query string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}/{}",
            self.scheme.name(),
            self.authority,
            self.segments.join("/")
        )?;
        if self.query.is_some() {
            f.write_str("?...")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> RemoteUrl {
        RemoteUrl::parse(s).unwrap()
    }

    #[test]
    fn parses_s3_and_http() {
        let u = url("s3://my-bucket/images/a b/top.qcow2");
        assert_eq!(u.scheme, Scheme::S3);
        assert_eq!(u.authority, "my-bucket");
        assert_eq!(u.key(), "images/a b/top.qcow2");
        let h = url("HTTPS://Example.COM:8443/x/disk%20one.vmdk?X-Amz-Signature=secret");
        assert_eq!(h.segments, vec!["x", "disk one.vmdk"]);
        assert_eq!(
            h.request_url(),
            "https://example.com:8443/x/disk%20one.vmdk?X-Amz-Signature=secret"
        );
        assert_eq!(
            h.to_string(),
            "https://example.com:8443/x/disk one.vmdk?..."
        );
        assert!(!h.to_string().contains("secret"));
        assert_eq!(
            show_path(Path::new("http://h/d.img?sig=secret")),
            "http://h/d.img?..."
        );
        assert_eq!(show_path(Path::new("/srv/a?b")), "/srv/a?b");
        assert!(is_remote(Path::new("http://h/x")));
        assert!(!is_remote(Path::new("/srv/s3://x")));
        assert!(!is_remote(Path::new("file.qcow2")));
    }

    #[test]
    fn cache_identities_keep_the_query_but_not_its_signature() {
        let a = url("https://h/x/d.img?versionId=7&X-Amz-Signature=aaa&X-Amz-Date=1&Expires=5");
        let b = url("https://h/x/d.img?X-Amz-Date=2&versionId=7&X-Amz-Signature=bbb");
        let c = url("https://h/x/d.img?versionId=8&X-Amz-Signature=aaa");
        assert_eq!(a.cache_identity(), "https://h/x/d.img?versionId=7");
        assert_eq!(
            a.cache_identity(),
            b.cache_identity(),
            "re-signed: the same object"
        );
        assert_ne!(a.cache_identity(), c.cache_identity(), "another version");
        assert_eq!(
            url("http://h/get?id=5&sig=s").cache_identity(),
            "http://h/get?id=5"
        );
        assert_ne!(
            url("http://h/get?id=5").cache_identity(),
            url("http://h/get?id=6").cache_identity()
        );
        assert_eq!(url("http://h/a%20b").cache_identity(), "http://h/a%20b");
        assert_eq!(url("http://h/a?Signature=x").cache_identity(), "http://h/a");
    }

    #[test]
    fn refuses_malformed_urls() {
        for bad in [
            "s3://",
            "s3://b/x",
            "s3://Bucket/x",
            "s3://bucket/",
            "s3://bucket/x?y",
            "s3://bucket/dir/",
            "http://user:pw@host/x",
            "http://host:99999/x",
            "http:///x",
            "http://host/../x",
        ] {
            let e = RemoteUrl::parse(bad).unwrap_err();
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }

    #[test]
    fn stored_names_resolve_beside_the_object() {
        let top = url("s3://bucket/vm/snap/top.qcow2");
        assert_eq!(
            top.resolve("base.qcow2").unwrap().to_string(),
            "s3://bucket/vm/snap/base.qcow2"
        );
        assert_eq!(
            top.resolve("../base.qcow2").unwrap().to_string(),
            "s3://bucket/vm/base.qcow2"
        );
        assert_eq!(
            top.resolve("s3://bucket/other/base.qcow2").unwrap().key(),
            "other/base.qcow2"
        );
        let h = url("http://h:8080/a/top.vmdk");
        assert_eq!(
            h.resolve("disk 1#?.vmdk").unwrap().request_url(),
            "http://h:8080/a/disk%201%23%3F.vmdk"
        );
    }

    #[test]
    fn stored_names_may_not_leave_the_bucket_or_host() {
        let top = url("s3://bucket/vm/top.qcow2");
        for bad in [
            "../../x.qcow2",
            "/etc/passwd",
            "s3://other-bucket/vm/base.qcow2",
            "http://bucket/vm/base.qcow2",
            "https://169.254.169.254/latest/meta-data",
            "..",
            "dir/",
        ] {
            assert!(top.resolve(bad).is_err(), "{bad}");
        }
        let h = url("https://h/a/top.vmdk");
        assert!(h.resolve("https://other/a/x").is_err());
        assert!(
            h.resolve("http://h/a/x").is_err(),
            "no downgrade to plain http"
        );
        assert!(h.resolve("https://h/b/x").is_ok());
    }
}
