//! The process's remote settings and the remote objects it opened. Opening a URL twice (the
//! format probe, then the driver) gives the same pinned object, so it is asked for once and
//! its statistics add up.

use super::chunk_cache::DiskCache;
use super::config::{ProcessEnv, RemoteConfig, RemoteOptions};
use super::http::{Client, Failure};
use super::remote::{RemoteObject, RemoteStats, UrlFn};
use super::url::{RemoteUrl, Scheme};
use crate::error::{Error, Kind, Result};
use parking_lot::Mutex;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

struct State {
    config: RemoteConfig,
    client: Arc<Client>,
    /// `None` without a persistent cache, or when its directory cannot be made.
    cache: Option<Arc<DiskCache>>,
    objects: Mutex<HashMap<String, RemoteObject>>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Sets the remote settings for this process; call before opening anything remote. Without
/// it, the first remote open takes the settings from the environment alone.
pub fn configure(opts: &RemoteOptions) -> Result<()> {
    let config = RemoteConfig::resolve(opts, &ProcessEnv)?;
    if STATE.set(State::new(config)).is_err() {
        return Err(Error::invalid("remote settings were already in use"));
    }
    Ok(())
}

fn state() -> Result<&'static State> {
    if let Some(s) = STATE.get() {
        return Ok(s);
    }
    let config = RemoteConfig::resolve(&RemoteOptions::default(), &ProcessEnv)?;
    Ok(STATE.get_or_init(|| State::new(config)))
}

impl State {
    fn new(config: RemoteConfig) -> State {
        let cache = config.cache_dir.as_ref().and_then(|dir| {
            DiskCache::open(dir, config.cache_max)
                .inspect(|c| c.write_direct(config.cache_direct))
                .map_err(|e| {
                    log::warn!(
                        "chunk cache {}: {e}; remote layers are read without a persistent cache",
                        dir.display()
                    )
                })
                .ok()
        });
        State {
            client: Arc::new(Client::new(config.timeout, config.retries)),
            config,
            cache,
            objects: Mutex::new(HashMap::new()),
        }
    }
}

/// Opens (or finds) the remote object at `url`, pinning its size and validator.
pub fn open(url: &RemoteUrl) -> Result<RemoteObject> {
    let st = state()?;
    let (request_url, identity) = request_builder(st, url)?;
    // By identity, not by the shown URL: two query strings may name two objects.
    let key = identity.clone();
    if let Some(o) = st.objects.lock().get(&key) {
        return Ok(o.clone());
    }
    let pinned = st
        .client
        .probe(&*request_url)
        .map_err(|f| open_error(url, f))?;
    let cache = st.cache.as_ref().map(|c| {
        c.object(
            &identity,
            &url.to_string(),
            pinned.size,
            &pinned.validator(),
        )
    });
    if pinned.etag.is_none() {
        log::warn!(
            "{url}: the server sends no ETag; changes to the object are detected by {}",
            if pinned.last_modified.is_some() {
                "Last-Modified only"
            } else {
                "size only"
            }
        );
    }
    log::info!("{url}: {} bytes, {}", pinned.size, pinned.validator());
    let obj = RemoteObject::new(url.clone(), request_url, st.client.clone(), pinned, cache);
    Ok(st.objects.lock().entry(key).or_insert(obj).clone())
}

fn open_error(url: &RemoteUrl, f: Failure) -> Error {
    match f {
        Failure::Missing => Error::new(Kind::NotFound, format!("{url}: no such object")),
        Failure::Fatal(m) if m.contains("range") => {
            Error::new(Kind::Unsupported, format!("{url}: {m}"))
        }
        Failure::Transient(m) | Failure::Changed(m) | Failure::Fatal(m) => {
            Error::new(Kind::Io, format!("{url}: {m}"))
        }
    }
}

/// How to address `url`: a function giving each request's URL (signed afresh for S3) and
/// the identity the cache keys it by (never including credentials).
fn request_builder(st: &State, url: &RemoteUrl) -> Result<(UrlFn, String)> {
    match url.scheme {
        Scheme::Http | Scheme::Https => {
            let u = url.request_url();
            Ok((Box::new(move || u.clone()), url.cache_identity()))
        }
        Scheme::S3 => {
            let (bucket, creds) = s3_bucket(st, url)?;
            let key = url.key();
            let identity = format!("{} at {}", url, st.config.s3.endpoint);
            Ok((
                Box::new(move || {
                    bucket
                        .get_object(creds.as_ref(), &key)
                        .sign(Duration::from_secs(900))
                        .to_string()
                }),
                identity,
            ))
        }
    }
}

fn s3_bucket(st: &State, url: &RemoteUrl) -> Result<(Bucket, Option<Credentials>)> {
    let s3 = &st.config.s3;
    let endpoint = s3
        .endpoint
        .parse()
        .map_err(|_| Error::invalid(format!("S3 endpoint {}: not a URL", s3.endpoint)))?;
    let style = if s3.path_style {
        UrlStyle::Path
    } else {
        UrlStyle::VirtualHost
    };
    let bucket =
        Bucket::new(endpoint, style, url.authority.clone(), s3.region.clone()).map_err(|e| {
            Error::invalid(format!(
                "{url}: cannot address bucket {} at {} ({e}; path-style addressing, \
                 -o s3_path_style, may help)",
                url.authority, s3.endpoint
            ))
        })?;
    let creds = s3.credentials.as_ref().map(|s| match &s.token {
        Some(t) => {
            Credentials::new_with_token(s.access_key.clone(), s.secret_key.clone(), t.clone())
        }
        None => Credentials::new(s.access_key.clone(), s.secret_key.clone()),
    });
    Ok((bucket, creds))
}

/// The objects directly "in" the S3 prefix `dir` (`s3://bucket/some/dir`), as locations;
/// at most `limit`. HTTP servers cannot list: an empty list.
pub fn list(dir: &str, limit: usize) -> Result<Vec<String>> {
    let probe = format!("{}/x", dir.trim_end_matches('/'));
    let url = RemoteUrl::parse(&probe)?;
    if url.scheme != Scheme::S3 {
        return Ok(Vec::new());
    }
    let st = state()?;
    let (bucket, creds) = s3_bucket(st, &url)?;
    let mut prefix = url.parent_prefix();
    prefix = prefix[format!("s3://{}/", url.authority).len()..].to_string();
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut action = bucket.list_objects_v2(creds.as_ref());
        action.with_prefix(prefix.clone());
        action.with_delimiter("/");
        if let Some(t) = &token {
            action.with_continuation_token(t.clone());
        }
        let signed = action.sign(Duration::from_secs(900)).to_string();
        let doc = st
            .client
            .get_document(&move || signed.clone(), 8 << 20)
            .map_err(|f| open_error(&url, f).context("listing"))?;
        let parsed = rusty_s3::actions::ListObjectsV2::parse_response(&doc)
            .map_err(|_| Error::new(Kind::Io, format!("{dir}: unreadable S3 listing")))?;
        for c in parsed.contents {
            out.push(format!("s3://{}/{}", url.authority, c.key));
            if out.len() >= limit {
                return Ok(out);
            }
        }
        match parsed.next_continuation_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(out),
        }
    }
}

/// Statistics of every remote object this process opened.
pub fn all_stats(with_cached_bytes: bool) -> Vec<RemoteStats> {
    let Some(st) = STATE.get() else {
        return Vec::new();
    };
    let mut v: Vec<_> = st
        .objects
        .lock()
        .values()
        .map(|o| o.stats(with_cached_bytes))
        .collect();
    v.sort_by(|a, b| a.url.cmp(&b.url));
    v
}

/// One `-v` log line per remote object: reads, cache hits, bytes fetched.
pub fn log_stats() {
    for o in all_stats(false) {
        log::info!(
            "{}: {} reads, {} bytes read: {} bytes from the cache, {} bytes fetched in {} GETs, {} failed GETs",
            o.url,
            o.reads,
            o.bytes_read,
            o.bytes_from_cache,
            o.bytes_fetched,
            o.gets,
            o.failures
        );
    }
}

/// Starts the background work of remote objects: read-ahead threads and a `log_stats` line
/// every minute while something changes. Call it in the process that serves (threads do
/// not survive the daemon's fork); until then reads work without read-ahead.
pub fn start_background() {
    super::remote::enable_read_ahead();
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("vmfs-remote-stats".into())
            .spawn(|| {
                let mut last = 0;
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                    let now: u64 = all_stats(false).iter().map(|o| o.reads + o.failures).sum();
                    if now != last {
                        log_stats();
                        last = now;
                    }
                }
            });
    });
}

/// The chunk cache directory in use, if any.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    STATE.get()?.cache.as_ref().map(|c| c.root().to_path_buf())
}
