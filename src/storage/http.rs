//! Ranged GETs over HTTP(S) (ureq with rustls), shared by the HTTP and S3 backends.
//!
//! Every reply is hostile: a ranged GET must come back as 206 with exactly the asked range of
//! an object of the pinned size and validator (ETag, else Last-Modified), or it is refused.
//! Timeouts, connection failures, 5xx and throttling are retried with bounded exponential
//! backoff. Request URLs may carry signatures, so no message here ever shows one: errors name
//! the object by its display URL and describe transport failures by kind.

use std::io::{self, Read};
use std::time::{Duration, Instant};
use ureq::Agent;
use ureq::http::{HeaderMap, Response, StatusCode};

/// What a ranged GET must match: the object as it was when we opened it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub size: u64,
    /// The ETag as the server sent it (quotes included).
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Pinned {
    /// A cache identity: size plus the strongest validator we have.
    pub fn validator(&self) -> String {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => format!("etag {e}"),
            (None, Some(m)) => format!("last-modified {m}"),
            (None, None) => "unvalidated".into(),
        }
    }
}

/// Why a request failed, in words safe to show.
#[derive(Debug)]
pub enum Failure {
    /// Worth retrying: timeouts, refused connections, 5xx, 429/503 throttling.
    Transient(String),
    /// The object is not the one we pinned (changed, replaced, shrunk).
    Changed(String),
    /// 404.
    Missing,
    /// Anything else: access denied, a reply that breaks the protocol.
    Fatal(String),
}

impl Failure {
    pub fn into_io(self) -> io::Error {
        match self {
            Failure::Transient(m) => io::Error::new(io::ErrorKind::TimedOut, m),
            Failure::Changed(m) => io::Error::other(m),
            Failure::Missing => io::Error::new(
                io::ErrorKind::NotFound,
                "the object no longer exists on the server",
            ),
            Failure::Fatal(m) => io::Error::other(m),
        }
    }
}

/// A buffer a GET reads a piece of the body into.
pub trait PieceBuf {
    fn zeroed(len: usize) -> Self;
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl PieceBuf for Vec<u8> {
    fn zeroed(len: usize) -> Self {
        vec![0; len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

pub struct Client {
    agent: Agent,
    retries: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client(retries {})", self.retries)
    }
}

/// The most a single GET may ask for (bounded buffers).
pub const MAX_GET: u64 = 64 << 20;

impl Client {
    pub fn new(timeout: Duration, retries: u32) -> Client {
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            .max_idle_connections_per_host(32)
            .max_idle_connections(64)
            .accept_encoding("identity")
            .user_agent(concat!("vmfs-mount/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { agent, retries }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries run out.
    pub fn with_retries<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let mut delay = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            match attempt() {
                Err(Failure::Transient(why)) if tries < self.retries => {
                    log::debug!("retrying in {delay:?}: {why}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                    tries += 1;
                }
                Err(Failure::Transient(why)) => {
                    return Err(Failure::Transient(format!(
                        "{why} (gave up after {} tries)",
                        tries + 1
                    )));
                }
                other => return other,
            }
        }
    }

    /// Finds the object's size and validators with a one-byte ranged GET, which also proves
    /// that the server serves ranges (a HEAD would not).
    pub fn probe(&self, url: &dyn Fn() -> String) -> Result<Pinned, Failure> {
        self.with_retries(|| {
            let resp = self
                .agent
                .get(url())
                .header("Range", "bytes=0-0")
                .call()
                .map_err(transport)?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let etag = header(&headers, "etag");
            let last_modified = header(&headers, "last-modified");
            match status.as_u16() {
                206 => {
                    let (start, end, total) = content_range(&headers)?;
                    if start != 0 || end != 0 {
                        return Err(Failure::Fatal(format!(
                            "asked for byte 0, the server sent bytes {start}-{end}"
                        )));
                    }
                    drain(resp, 1)?;
                    Ok(Pinned {
                        size: total,
                        etag,
                        last_modified,
                    })
                }
                // An empty object: no range of it can be satisfied.
                416 if content_range_total(&headers) == Some(0) => Ok(Pinned {
                    size: 0,
                    etag,
                    last_modified,
                }),
                200 => Err(Failure::Fatal(
                    "the server does not support range requests (it answered a ranged GET \
                     with the whole object), so it cannot be read lazily; download the image \
                     instead"
                        .into(),
                )),
                _ => Err(status_failure(status, resp)),
            }
        })
    }

    /// Reads `buf.len()` bytes at `off` of the pinned object.
    pub fn get_range(
        &self,
        url: &dyn Fn() -> String,
        pinned: &Pinned,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), Failure> {
        let end = off.saturating_add(buf.len() as u64);
        self.get_range_pieces(url, pinned, off, end, MAX_GET, &mut |at, piece: Vec<u8>| {
            let from = (at - off) as usize;
            buf[from..from + piece.len()].copy_from_slice(&piece);
        })
    }

    /// Streams bytes [off, end) of the pinned object to `on_piece` as they arrive, in order,
    /// in pieces that end at multiples of `piece` (or at `end`), so readers can use the
    /// start of a large GET before its end has arrived. A reply that breaks off is retried
    /// from where it broke, so every byte is delivered exactly once.
    pub fn get_range_pieces<P: PieceBuf>(
        &self,
        url: &dyn Fn() -> String,
        pinned: &Pinned,
        off: u64,
        end: u64,
        piece: u64,
        on_piece: &mut dyn FnMut(u64, P),
    ) -> Result<(), Failure> {
        if end <= off {
            return Ok(());
        }
        if end > pinned.size || end - off > MAX_GET || piece == 0 {
            return Err(Failure::Fatal(format!("bad range {off}-{end}")));
        }
        let mut pos = off;
        self.with_retries(|| {
            let started = Instant::now();
            let resp = self.ranged_get(url, pinned, pos, end)?;
            let mut body = resp.into_body();
            let mut reader = body.with_config().limit(end - pos + 1).reader();
            while pos < end {
                let stop = ((pos / piece).saturating_add(1).saturating_mul(piece)).min(end);
                let mut data = P::zeroed((stop - pos) as usize);
                read_exact_body(&mut reader, data.bytes_mut())?;
                on_piece(pos, data);
                pos = stop;
            }
            expect_body_end(&mut reader)?;
            log::trace!("GET to {end:#x} done in {:?}", started.elapsed());
            Ok(())
        })
    }

    /// Sends a ranged GET for [off, end) and checks that the reply is that range of the
    /// pinned object; gives the response, whose body is still to be read.
    fn ranged_get(
        &self,
        url: &dyn Fn() -> String,
        pinned: &Pinned,
        off: u64,
        end: u64,
    ) -> Result<Response<ureq::Body>, Failure> {
        let mut req = self
            .agent
            .get(url())
            .header("Range", format!("bytes={off}-{}", end - 1));
        // If-Match needs a strong ETag; weak ones are still compared below.
        if let Some(e) = pinned.etag.as_deref().filter(|e| !e.starts_with("W/")) {
            req = req.header("If-Match", e);
        } else if let Some(m) = &pinned.last_modified {
            req = req.header("If-Unmodified-Since", m);
        }
        let resp = req.call().map_err(transport)?;
        let status = resp.status();
        match status.as_u16() {
            206 => {}
            412 => {
                return Err(Failure::Changed(format!(
                    "the object changed since it was opened (the server refused {}: \
                     412 Precondition Failed)",
                    pinned.validator()
                )));
            }
            416 => {
                return Err(Failure::Changed(
                    "the object shrank since it was opened (416 Range Not Satisfiable)".into(),
                ));
            }
            200 => {
                return Err(Failure::Changed(
                    "the server sent the whole object instead of the asked range".into(),
                ));
            }
            _ => return Err(status_failure(status, resp)),
        }
        check_same_object(resp.headers(), pinned)?;
        let (start, last, total) = content_range(resp.headers())?;
        if total != pinned.size {
            return Err(Failure::Changed(format!(
                "the object is now {total} bytes, it was {} when opened",
                pinned.size
            )));
        }
        if start != off || last != end - 1 {
            return Err(Failure::Fatal(format!(
                "asked for bytes {off}-{}, the server sent {start}-{last}",
                end - 1
            )));
        }
        if let Some(enc) = header(resp.headers(), "content-encoding").filter(|e| e != "identity") {
            return Err(Failure::Fatal(format!(
                "the server sent a {enc}-encoded body for a byte range"
            )));
        }
        Ok(resp)
    }

    /// A small GET of a whole document (S3 listings), bounded by `limit` bytes.
    pub fn get_document(&self, url: &dyn Fn() -> String, limit: u64) -> Result<String, Failure> {
        self.with_retries(|| {
            let resp = self.agent.get(url()).call().map_err(transport)?;
            let status = resp.status();
            if status.as_u16() != 200 {
                return Err(status_failure(status, resp));
            }
            let mut body = resp.into_body();
            body.with_config()
                .limit(limit)
                .read_to_string()
                .map_err(transport)
        })
    }
}

/// Some servers ignore If-Match: compare what came back with what we pinned.
fn check_same_object(headers: &HeaderMap, pinned: &Pinned) -> Result<(), Failure> {
    let strip_weak = |e: &str| e.trim_start_matches("W/").to_string();
    if let Some(want) = &pinned.etag {
        match header(headers, "etag") {
            Some(got) if strip_weak(&got) == strip_weak(want) => {}
            Some(got) => {
                return Err(Failure::Changed(format!(
                    "the object changed since it was opened (ETag {want} is now {got})"
                )));
            }
            None => {
                return Err(Failure::Changed(format!(
                    "the server no longer sends the ETag {want} pinned when the object was opened"
                )));
            }
        }
    } else if let Some(want) = &pinned.last_modified
        && let Some(got) = header(headers, "last-modified")
        && &got != want
    {
        return Err(Failure::Changed(format!(
            "the object changed since it was opened (Last-Modified {want} is now {got})"
        )));
    }
    Ok(())
}

/// Fills `buf` from the body; a reply that ends early is worth retrying.
fn read_exact_body(reader: &mut impl Read, buf: &mut [u8]) -> Result<(), Failure> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(Failure::Transient(format!(
                    "the reply ended {} bytes short",
                    buf.len() - done
                )));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Failure::Transient(format!(
                    "reading the reply: {}",
                    io_kind(&e)
                )));
            }
        }
    }
    Ok(())
}

/// The body must end here (which also hands the connection back for reuse).
fn expect_body_end(reader: &mut impl Read) -> Result<(), Failure> {
    let mut extra = [0u8; 1];
    match reader.read(&mut extra) {
        Ok(0) => Ok(()),
        // Err: the limit (one byte past the range) tripped, also too long.
        Ok(_) | Err(_) => Err(Failure::Fatal(
            "the reply is longer than the asked range".into(),
        )),
    }
}

fn drain(resp: Response<ureq::Body>, limit: u64) -> Result<(), Failure> {
    let mut body = resp.into_body();
    body.with_config()
        .limit(limit)
        .read_to_vec()
        .map(|_| ())
        .map_err(transport)
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// `Content-Range: bytes START-END/TOTAL`.
fn content_range(h: &HeaderMap) -> Result<(u64, u64, u64), Failure> {
    let bad = || Failure::Fatal("a partial reply without a valid Content-Range".into());
    let v = header(h, "content-range").ok_or_else(bad)?;
    let rest = v.strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, total) = rest.split_once('/').ok_or_else(bad)?;
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let parse = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let (a, b, t) = (parse(a)?, parse(b)?, parse(total)?);
    if a > b || b >= t {
        return Err(bad());
    }
    Ok((a, b, t))
}

/// `Content-Range: bytes */TOTAL` (with 416).
fn content_range_total(h: &HeaderMap) -> Option<u64> {
    header(h, "content-range")?
        .strip_prefix("bytes */")?
        .trim()
        .parse()
        .ok()
}

fn status_failure(status: StatusCode, resp: Response<ureq::Body>) -> Failure {
    let code = status.as_u16();
    // S3 error documents name the problem (<Code>); nothing else of them is shown, since
    // some echo the request's credentials.
    let detail = s3_error_code(resp)
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let what = format!("the server answered {code}{detail}");
    match code {
        404 => Failure::Missing,
        408 | 429 | 500..=599 => Failure::Transient(what),
        // S3 throttling can come as 400 SlowDown on some stores.
        400 if detail.contains("SlowDown") => Failure::Transient(what),
        401 | 403 => Failure::Fatal(format!("{what}: access denied (check the credentials)")),
        _ => Failure::Fatal(what),
    }
}

fn s3_error_code(resp: Response<ureq::Body>) -> Option<String> {
    let mut body = resp.into_body();
    let text = body.with_config().limit(16 << 10).read_to_string().ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = &text[start..start + len];
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then(|| code.to_string())
        .filter(|c| !c.is_empty() && c.len() <= 64)
}

/// A transport error in words that never include the request URL.
fn transport(e: ureq::Error) -> Failure {
    use ureq::Error as E;
    let why = match &e {
        E::Timeout(t) => format!("timed out ({t:?})"),
        E::HostNotFound => "host not found".into(),
        E::ConnectionFailed => "connection failed".into(),
        E::Io(io) => io_kind(io),
        E::TooManyRedirects | E::RedirectFailed => {
            return Failure::Fatal("redirects failed".into());
        }
        E::BadUri(_) | E::Http(_) => return Failure::Fatal("malformed request URL".into()),
        E::BodyExceedsLimit(n) => {
            return Failure::Fatal(format!("the reply is longer than expected ({n} bytes)"));
        }
        E::Tls(m) => return Failure::Fatal(format!("TLS: {m}")),
        E::Rustls(r) => return Failure::Fatal(format!("TLS: {r}")),
        E::Protocol(_) => "HTTP protocol error".into(),
        _ => "transport error".into(),
    };
    Failure::Transient(why)
}

fn io_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(_) => e.to_string(),
        None => format!("{:?}", e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn content_ranges_are_checked() {
        let ok = headers(&[("content-range", "bytes 10-19/100")]);
        assert_eq!(content_range(&ok).unwrap(), (10, 19, 100));
        for bad in [
            "bytes 19-10/100",
            "bytes 0-100/100",
            "bytes 1-2",
            "items 1-2/3",
            "bytes a-2/3",
        ] {
            assert!(
                content_range(&headers(&[("content-range", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(content_range(&HeaderMap::new()).is_err());
        assert_eq!(
            content_range_total(&headers(&[("content-range", "bytes */0")])),
            Some(0)
        );
    }

    #[test]
    fn replies_for_another_version_are_refused() {
        let pinned = Pinned {
            size: 100,
            etag: Some("\"abc\"".into()),
            last_modified: None,
        };
        assert!(check_same_object(&headers(&[("etag", "\"abc\"")]), &pinned).is_ok());
        assert!(check_same_object(&headers(&[("etag", "W/\"abc\"")]), &pinned).is_ok());
        for h in [headers(&[("etag", "\"abd\"")]), HeaderMap::new()] {
            assert!(matches!(
                check_same_object(&h, &pinned),
                Err(Failure::Changed(_))
            ));
        }
        let by_date = Pinned {
            size: 1,
            etag: None,
            last_modified: Some("Wed, 21 Oct 2015 07:28:00 GMT".into()),
        };
        let newer = headers(&[("last-modified", "Wed, 21 Oct 2015 07:29:00 GMT")]);
        assert!(check_same_object(&newer, &by_date).is_err());
    }

    /// An HTTP server on 127.0.0.1 answering one request per connection with the next
    /// canned reply; gives its URL and the requests it saw (head only).
    fn canned(replies: Vec<Vec<u8>>) -> (String, std::sync::mpsc::Receiver<String>) {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/obj", l.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for reply in replies {
                let (mut c, _) = l.accept().unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let _ = tx.send(String::from_utf8_lossy(&head).to_ascii_lowercase());
                let _ = c.write_all(&reply);
            }
        });
        (url, rx)
    }

    fn reply(status: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            r.push_str(h);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        let mut r = r.into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn pinned_abc() -> Pinned {
        Pinned {
            size: 10,
            etag: Some("\"abc\"".into()),
            last_modified: None,
        }
    }

    fn next(rx: &std::sync::mpsc::Receiver<String>) -> String {
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn a_server_that_ignores_if_match_is_caught_by_its_etag() {
        let (url, rx) = canned(vec![reply(
            "206 Partial Content",
            &["ETag: \"new\"", "Content-Range: bytes 2-5/10"],
            b"WXYZ",
        )]);
        let c = Client::new(Duration::from_secs(5), 3);
        let mut buf = [0u8; 4];
        let r = c.get_range(&|| url.clone(), &pinned_abc(), 2, &mut buf);
        assert!(
            matches!(&r, Err(Failure::Changed(m)) if m.contains("\"new\"")),
            "{r:?}"
        );
        let req = next(&rx);
        assert!(req.contains("if-match: \"abc\""), "{req}");
        assert!(req.contains("range: bytes=2-5"), "{req}");
        assert_eq!(buf, [0; 4], "no bytes of another version");
    }

    #[test]
    fn throttling_and_5xx_are_retried_then_served() {
        let ok = reply(
            "206 Partial Content",
            &["ETag: \"abc\"", "Content-Range: bytes 0-3/10"],
            b"abcd",
        );
        let slow = reply(
            "503 Service Unavailable",
            &[],
            b"<Error><Code>SlowDown</Code></Error>",
        );
        let (url, rx) = canned(vec![slow, reply("429 Too Many Requests", &[], b""), ok]);
        let c = Client::new(Duration::from_secs(5), 3);
        let mut buf = [0u8; 4];
        c.get_range(&|| url.clone(), &pinned_abc(), 0, &mut buf)
            .unwrap();
        assert_eq!(&buf, b"abcd");
        for _ in 0..3 {
            next(&rx);
        }
        // With no retries left, the same failures are final.
        let (url, _rx) = canned(vec![reply("500 Internal Server Error", &[], b"")]);
        let c = Client::new(Duration::from_secs(5), 0);
        let r = c.get_range(&|| url.clone(), &pinned_abc(), 0, &mut buf);
        assert!(matches!(r, Err(Failure::Transient(m)) if m.contains("500")));
    }

    #[test]
    fn replies_of_another_size_or_without_ranges_are_refused() {
        let (url, _rx) = canned(vec![
            reply(
                "206 Partial Content",
                &["ETag: \"abc\"", "Content-Range: bytes 0-3/11"],
                b"abcd",
            ),
            reply("200 OK", &["ETag: \"abc\""], b"0123456789"),
            reply("200 OK", &["ETag: \"abc\""], b"0123456789"),
        ]);
        let c = Client::new(Duration::from_secs(5), 0);
        let mut buf = [0u8; 4];
        let r = c.get_range(&|| url.clone(), &pinned_abc(), 0, &mut buf);
        assert!(
            matches!(&r, Err(Failure::Changed(m)) if m.contains("11 bytes")),
            "{r:?}"
        );
        let r = c.get_range(&|| url.clone(), &pinned_abc(), 0, &mut buf);
        assert!(
            matches!(&r, Err(Failure::Changed(m)) if m.contains("whole object")),
            "{r:?}"
        );
        let r = c.probe(&|| url.clone());
        assert!(
            matches!(&r, Err(Failure::Fatal(m)) if m.contains("does not support range requests")),
            "{r:?}"
        );
    }

    #[test]
    fn a_broken_reply_is_resumed_where_it_broke_and_pieces_end_on_boundaries() {
        // Promises ten bytes, sends five, hangs up.
        let broken = b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Length: 10\r\n\
                       ETag: \"abc\"\r\nContent-Range: bytes 0-9/10\r\n\r\n01234"
            .to_vec();
        let (url, rx) = canned(vec![
            broken,
            reply(
                "206 Partial Content",
                &["ETag: \"abc\"", "Content-Range: bytes 4-9/10"],
                b"456789",
            ),
        ]);
        let c = Client::new(Duration::from_secs(5), 2);
        let mut got = Vec::new();
        c.get_range_pieces(&|| url.clone(), &pinned_abc(), 0, 10, 4, &mut |at,
                                                                           p: Vec<
            u8,
        >| {
            got.push((at, p))
        })
        .unwrap();
        assert_eq!(
            got,
            vec![
                (0, b"0123".to_vec()),
                (4, b"4567".to_vec()),
                (8, b"89".to_vec())
            ]
        );
        assert!(next(&rx).contains("range: bytes=0-9"));
        assert!(next(&rx).contains("range: bytes=4-9"));
    }

    #[test]
    fn retries_are_bounded() {
        let c = Client::new(Duration::from_secs(1), 2);
        let mut n = 0;
        let r: Result<(), Failure> = c.with_retries(|| {
            n += 1;
            Err(Failure::Transient("down".into()))
        });
        assert_eq!(n, 3);
        assert!(matches!(r, Err(Failure::Transient(m)) if m.contains("3 tries")));
        let mut n = 0;
        let r: Result<(), Failure> = c.with_retries(|| {
            n += 1;
            Err(Failure::Missing)
        });
        assert_eq!(n, 1);
        assert!(r.is_err());
    }
}
