//! The `-o` options of remote layers (S3 and HTTP(S) images, the chunk cache), kept apart
//! from the generic ones in `cli.rs`.

use crate::cli::{UsageError, parse_bytes};
use std::path::PathBuf;
use std::time::Duration;
use vmfs_mount::storage::config::RemoteOptions;

/// Applies `key[=value]` if it is a remote option; `Ok(false)` when it is not one.
pub fn apply(o: &mut RemoteOptions, key: &str, value: Option<&str>) -> Result<bool, UsageError> {
    let need = || -> Result<String, UsageError> {
        match value {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(UsageError(format!(
                "mount option {key} needs a value ({key}=...)"
            ))),
        }
    };
    let flag = || -> Result<(), UsageError> {
        match value {
            None => Ok(()),
            Some(_) => Err(UsageError(format!("mount option {key} takes no value"))),
        }
    };
    match key {
        "cache_dir" => o.cache_dir = Some(PathBuf::from(need()?)),
        "cache_max" => o.cache_max = Some(parse_bytes(&need()?)?),
        "aws_profile" => o.s3_profile = Some(need()?),
        "aws_region" => o.s3_region = Some(need()?),
        "aws_endpoint_url" => o.s3_endpoint = Some(need()?),
        "aws_shared_credentials_file" => o.s3_credentials_file = Some(PathBuf::from(need()?)),
        "cache_direct" => {
            flag()?;
            o.cache_direct = Some(true);
        }
        "s3_path_style" => {
            flag()?;
            o.s3_path_style = Some(true);
        }
        "s3_virtual_hosted" => {
            flag()?;
            o.s3_path_style = Some(false);
        }
        "remote_timeout" => {
            let v = need()?;
            let secs = v
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .ok_or_else(|| {
                    UsageError(format!(
                        "remote_timeout={v}: expected seconds from 1 to 3600"
                    ))
                })?;
            o.timeout = Some(Duration::from_secs(secs));
        }
        "remote_retries" => {
            let v = need()?;
            o.retries = Some(v.parse::<u32>().ok().filter(|n| *n <= 100).ok_or_else(|| {
                UsageError(format!(
                    "remote_retries={v}: expected a number from 0 to 100"
                ))
            })?);
        }
        "aws_access_key_id" | "aws_secret_access_key" | "aws_session_token" => {
            return Err(UsageError(format!(
                "{key} is not taken as a mount option (it would be visible to every user in \
                 ps and /proc/mounts); use the environment (AWS_ACCESS_KEY_ID, ...) or a \
                 credentials file (aws_shared_credentials_file=FILE, aws_profile=NAME)"
            )));
        }
        _ => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_options_parse() {
        let mut o = RemoteOptions::default();
        for (k, v) in [
            ("cache_dir", Some("/c")),
            ("cache_max", Some("2G")),
            ("aws_profile", Some("ci")),
            ("aws_region", Some("eu-west-1")),
            ("aws_endpoint_url", Some("http://127.0.0.1:9000")),
            ("aws_shared_credentials_file", Some("/k")),
            ("s3_path_style", None),
            ("remote_timeout", Some("7")),
            ("remote_retries", Some("0")),
        ] {
            assert!(apply(&mut o, k, v).unwrap(), "{k}");
        }
        assert_eq!(o.cache_max, Some(2 << 30));
        assert_eq!(o.s3_path_style, Some(true));
        assert_eq!(o.timeout, Some(Duration::from_secs(7)));
        assert_eq!(o.retries, Some(0));
        assert!(!apply(&mut o, "ro", None).unwrap());
        assert!(apply(&mut o, "cache_max", Some("0")).is_ok());
        for (k, v) in [
            ("remote_timeout", Some("0")),
            ("remote_retries", Some("x")),
            ("s3_path_style", Some("1")),
            ("cache_dir", None),
        ] {
            assert!(apply(&mut o, k, v).is_err(), "{k}");
        }
        let e = apply(&mut o, "aws_secret_access_key", Some("hunter2")).unwrap_err();
        assert!(!e.0.contains("hunter2"));
    }
}
