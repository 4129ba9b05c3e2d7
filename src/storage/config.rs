//! Settings for remote layers: the chunk cache, timeouts and retries, and S3 (endpoint,
//! region, addressing style, credentials), from the usual AWS environment and the shared
//! credentials/config files, overridden by mount options.
//!
//! Secrets are read here and handed only to the request signer: `Debug` and every message
//! show where a secret came from, never the secret.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default size limit of the chunk cache.
pub const DEFAULT_CACHE_MAX: u64 = 4 << 30;

/// What the user chose (options); unset fields come from the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteOptions {
    pub cache_dir: Option<PathBuf>,
    pub cache_max: Option<u64>,
    /// Write cache entries with O_DIRECT.
    pub cache_direct: Option<bool>,
    /// Per connect/read stall, before a retry.
    pub timeout: Option<Duration>,
    /// Retries of a failed request (timeouts, 5xx, throttling) before EIO.
    pub retries: Option<u32>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_profile: Option<String>,
    pub s3_credentials_file: Option<PathBuf>,
    /// `Some(true)`: path-style (`ENDPOINT/BUCKET/KEY`); `Some(false)`: virtual-hosted.
    pub s3_path_style: Option<bool>,
}

/// S3 access keys. Never printed.
#[derive(Clone)]
pub struct Secret {
    pub access_key: String,
    pub secret_key: String,
    pub token: Option<String>,
    /// Where they came from, for messages ("AWS_ACCESS_KEY_ID", "profile ci in FILE").
    pub source: String,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(from {})", self.source)
    }
}

/// Everything resolved, as the remote backends use it.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `None`: no persistent cache (`--cache-max 0`).
    pub cache_dir: Option<PathBuf>,
    pub cache_max: u64,
    pub cache_direct: bool,
    pub timeout: Duration,
    pub retries: u32,
    pub s3: S3Config,
}

#[derive(Clone, Debug)]
pub struct S3Config {
    pub endpoint: String,
    /// Whether the endpoint was chosen by the user (AWS_ENDPOINT_URL, aws_endpoint_url=).
    pub custom_endpoint: bool,
    pub region: String,
    pub path_style: bool,
    /// `None`: anonymous requests (public buckets).
    pub credentials: Option<Secret>,
}

/// Where environment variables come from (a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| v.to_string())
    }
}

impl RemoteConfig {
    pub fn resolve(opts: &RemoteOptions, env: &dyn Env) -> Result<RemoteConfig> {
        let cache_max = opts.cache_max.unwrap_or(DEFAULT_CACHE_MAX);
        let cache_dir = match (cache_max, &opts.cache_dir) {
            (0, _) => None,
            (_, Some(d)) => Some(d.clone()),
            (_, None) => default_cache_dir(env),
        };
        Ok(RemoteConfig {
            cache_dir,
            cache_max,
            cache_direct: opts.cache_direct.unwrap_or(false),
            timeout: opts.timeout.unwrap_or(Duration::from_secs(20)),
            retries: opts.retries.unwrap_or(5),
            s3: S3Config::resolve(opts, env)?,
        })
    }
}

/// `$XDG_CACHE_HOME/vmfs-mount`, `~/.cache/vmfs-mount`, or `/var/cache/vmfs-mount` for root.
pub fn default_cache_dir(env: &dyn Env) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/cache/vmfs-mount"));
    }
    if let Some(x) = env.var("XDG_CACHE_HOME").filter(|x| x.starts_with('/')) {
        return Some(Path::new(&x).join("vmfs-mount"));
    }
    env.var("HOME")
        .map(|h| Path::new(&h).join(".cache").join("vmfs-mount"))
}

impl S3Config {
    fn resolve(opts: &RemoteOptions, env: &dyn Env) -> Result<S3Config> {
        let profile_name = opts
            .s3_profile
            .clone()
            .or_else(|| env.var("AWS_PROFILE"))
            .unwrap_or_else(|| "default".into());
        let home = env.var("HOME");
        let aws_file = |var: &str, name: &str| {
            env.var(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| Path::new(h).join(".aws").join(name)))
        };
        let config_file = aws_file("AWS_CONFIG_FILE", "config");
        let config_profile = config_file
            .as_deref()
            .and_then(|f| read_ini(f).ok())
            .and_then(|ini| {
                let section = if profile_name == "default" {
                    "default".to_string()
                } else {
                    format!("profile {profile_name}")
                };
                ini.get(&section).cloned()
            })
            .unwrap_or_default();
        let endpoint_opt = opts
            .s3_endpoint
            .clone()
            .or_else(|| env.var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env.var("AWS_ENDPOINT_URL"))
            .or_else(|| config_profile.get("endpoint_url").cloned());
        let region = opts
            .s3_region
            .clone()
            .or_else(|| env.var("AWS_REGION"))
            .or_else(|| env.var("AWS_DEFAULT_REGION"))
            .or_else(|| config_profile.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let custom_endpoint = endpoint_opt.is_some();
        let endpoint = match endpoint_opt {
            Some(e) => {
                let e = e.trim_end_matches('/').to_string();
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(Error::invalid(format!(
                        "S3 endpoint {e:?} must start with http:// or https://"
                    )));
                }
                e
            }
            None => format!("https://s3.{region}.amazonaws.com"),
        };
        // S3-compatible stores (MinIO, Garage, Ceph RGW) are usually reached path-style;
        // AWS itself virtual-hosted.
        let path_style = opts.s3_path_style.unwrap_or(custom_endpoint);
        let credentials = credentials(
            opts,
            env,
            &profile_name,
            aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        )?;
        Ok(S3Config {
            endpoint,
            custom_endpoint,
            region,
            path_style,
            credentials,
        })
    }
}

/// As the AWS CLI: an explicitly chosen profile wins; then the environment's keys; then the
/// profile (`AWS_PROFILE` or `default`) in the shared credentials file; else anonymous.
fn credentials(
    opts: &RemoteOptions,
    env: &dyn Env,
    profile: &str,
    default_file: Option<PathBuf>,
) -> Result<Option<Secret>> {
    let explicit_profile = opts.s3_profile.is_some() || opts.s3_credentials_file.is_some();
    if !explicit_profile
        && let (Some(access_key), Some(secret_key)) = (
            env.var("AWS_ACCESS_KEY_ID"),
            env.var("AWS_SECRET_ACCESS_KEY"),
        )
    {
        return Ok(Some(Secret {
            access_key,
            secret_key,
            token: env.var("AWS_SESSION_TOKEN"),
            source: "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".into(),
        }));
    }
    let file = opts.s3_credentials_file.clone().or(default_file);
    let Some(file) = file else {
        return Ok(None);
    };
    let ini = match read_ini(&file) {
        Ok(ini) => ini,
        // No credentials file: anonymous, unless the user pointed at one.
        Err(_) if !explicit_profile => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(section) = ini.get(profile) else {
        if explicit_profile {
            return Err(Error::invalid(format!(
                "{}: no profile [{profile}]",
                file.display()
            )));
        }
        return Ok(None);
    };
    let key = |k: &str| section.get(k).cloned();
    match (key("aws_access_key_id"), key("aws_secret_access_key")) {
        (Some(access_key), Some(secret_key)) => Ok(Some(Secret {
            access_key,
            secret_key,
            token: key("aws_session_token"),
            source: format!("profile {profile} in {}", file.display()),
        })),
        _ => Err(Error::invalid(format!(
            "{}: profile [{profile}] lacks aws_access_key_id or aws_secret_access_key",
            file.display()
        ))),
    }
}

/// Sections of an INI file (AWS shared credentials/config syntax): `[name]`, `key = value`,
/// `#`/`;` comments. Bounded: these files are small.
fn read_ini(path: &Path) -> Result<HashMap<String, HashMap<String, String>>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
    if meta.len() > 1 << 20 {
        return Err(Error::invalid(format!(
            "{}: too large for a credentials file",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    Ok(parse_ini(&text))
}

fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(sec), Some((k, v))) = (&current, line.split_once('=')) {
            out.entry(sec.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &[(&'a str, &'a str)]) -> HashMap<&'a str, &'a str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn environment_keys_endpoint_and_region() {
        let e = env(&[
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI"),
            ("AWS_SESSION_TOKEN", "tok"),
            ("AWS_REGION", "eu-west-3"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/"),
        ]);
        let c = RemoteConfig::resolve(&RemoteOptions::default(), &e).unwrap();
        assert_eq!(c.s3.endpoint, "http://127.0.0.1:9000");
        assert_eq!(c.s3.region, "eu-west-3");
        assert!(c.s3.path_style, "custom endpoints default to path-style");
        let s = c.s3.credentials.clone().unwrap();
        assert_eq!(
            (s.access_key.as_str(), s.token.as_deref()),
            ("AKIDEXAMPLE", Some("tok"))
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("wJalrXUtnFEMI") && !shown.contains("tok\""),
            "{shown}"
        );
        let aws = RemoteConfig::resolve(&RemoteOptions::default(), &env(&[])).unwrap();
        assert_eq!(aws.s3.endpoint, "https://s3.us-east-1.amazonaws.com");
        assert!(!aws.s3.path_style && aws.s3.credentials.is_none());
    }

    #[test]
    fn profiles_from_the_shared_credentials_file() {
        let dir = std::env::temp_dir().join(format!("vmfs-s3cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".aws")).unwrap();
        std::fs::write(
            dir.join(".aws/credentials"),
            "# keys\n[default]\naws_access_key_id = AK1\naws_secret_access_key = S1\n\n\
             [ci]\naws_access_key_id=AK2\naws_secret_access_key=S2\naws_session_token=T2\n[broken]\naws_access_key_id=x\n",
        )
        .unwrap();
        std::fs::write(
            dir.join(".aws/config"),
            "[profile ci]\nregion = ap-south-1\n",
        )
        .unwrap();
        let home = dir.to_str().unwrap();
        let c = RemoteConfig::resolve(&RemoteOptions::default(), &env(&[("HOME", home)])).unwrap();
        assert_eq!(c.s3.credentials.unwrap().access_key, "AK1");
        let e = env(&[("HOME", home), ("AWS_PROFILE", "ci")]);
        let c = RemoteConfig::resolve(&RemoteOptions::default(), &e).unwrap();
        let s = c.s3.credentials.unwrap();
        assert_eq!(
            (s.access_key.as_str(), c.s3.region.as_str()),
            ("AK2", "ap-south-1")
        );
        // An explicitly chosen profile wins over keys in the environment.
        let e = env(&[
            ("HOME", home),
            ("AWS_ACCESS_KEY_ID", "ENV"),
            ("AWS_SECRET_ACCESS_KEY", "E"),
        ]);
        let o = RemoteOptions {
            s3_profile: Some("ci".into()),
            ..Default::default()
        };
        assert_eq!(
            RemoteConfig::resolve(&o, &e)
                .unwrap()
                .s3
                .credentials
                .unwrap()
                .access_key,
            "AK2"
        );
        for bad in ["broken", "missing"] {
            let o = RemoteOptions {
                s3_profile: Some(bad.into()),
                ..Default::default()
            };
            let err = RemoteConfig::resolve(&o, &e).unwrap_err().to_string();
            assert!(err.contains(bad) && !err.contains("S2"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
