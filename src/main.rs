//! vmfs-mount: the command line, the mount and the daemon around the vmfs_mount library.

mod changes_report;
mod cli;
mod daemon;
mod fs;
mod list;
mod mount;
mod mountpoint;
mod remote_opts;
mod sd_notify;

use clap::Parser;
use cli::{Access, Settings, UsageError};
use mount::{MountRequest, open_for_mount};

fn main() {
    let args = cli::Args::try_parse().unwrap_or_else(|e| e.exit());
    let settings = match Settings::from_args(args) {
        Ok(s) => s,
        Err(UsageError(msg)) => {
            eprintln!("vmfs-mount: {msg}");
            std::process::exit(2);
        }
    };
    if !settings.foreground && !settings.list && settings.changes.is_none() {
        daemon::close_inherited_fds();
    }
    init_logging(settings.verbose);
    std::process::exit(run(&settings));
}

/// Quiet by default; -v info, -vv debug, -vvv trace; RUST_LOG overrides.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,fuser=error",
        1 => "info,fuser=warn",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        // The HTTP stack logs request URLs, and S3 request URLs carry signatures: never let
        // its records through, whatever RUST_LOG says.
        .filter_module("ureq", log::LevelFilter::Off)
        .filter_module("ureq_proto", log::LevelFilter::Off)
        .filter_module("rustls", log::LevelFilter::Off)
        .format_timestamp_millis()
        .init();
}

fn run(s: &Settings) -> i32 {
    // The daemon works from `/`: a relative cache directory must be resolved here.
    let mut remote = s.remote.clone();
    remote.cache_dir = remote.cache_dir.as_deref().map(absolute);
    if let Err(e) = vmfs_mount::storage::registry::configure(&remote) {
        return fail(&e.to_string());
    }
    let mut req = MountRequest {
        image: absolute(&s.image),
        format: s.format,
        access: s.access,
        overlay: s.overlay.as_deref().map(absolute),
        force_share: s.force_share,
        listing: s.list || s.changes.is_some(),
        table_cache: s.table_cache,
        cluster_cache: s.cluster_cache,
        backing_dirs: s.backing_dirs.iter().map(|d| absolute(d)).collect(),
        trust_backing: s.trust_backing,
        clones: s.clones.as_deref().map(absolute),
    };
    if s.list {
        req.access = Access::ReadOnly;
        return match open_for_mount(&req) {
            Ok(opened) => {
                let out = if s.json {
                    list::json(&s.image, &opened, &s.files)
                } else {
                    list::text(&s.image, &opened, &s.files)
                };
                print!("{out}");
                match &opened.stopped {
                    Some(e) => fail(&e.to_string()),
                    None => 0,
                }
            }
            Err(e) => fail(&e.to_string()),
        };
    }
    if let Some(spec) = &s.changes {
        req.access = Access::ReadOnly;
        return match open_for_mount(&req).and_then(|o| changes_report::report(&o, spec, s.json)) {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e) => fail(&e.to_string()),
        };
    }
    let Some(mnt) = &s.mountpoint else {
        return fail("a mount point is needed (or use --list)");
    };
    let mountpoint = match mountpoint::check(mnt) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let opened = match open_for_mount(&req) {
        Ok(o) => o,
        Err(e) => return fail(&e.to_string()),
    };
    if let Some(why) = &opened.fell_back_to_read_only {
        eprintln!("vmfs-mount: warning: {why}; mounting read-only");
    }
    if let Some(why) = &opened.not_writable {
        eprintln!("vmfs-mount: note: disk.raw is read-only: {why}");
    }
    daemon::run(s, mountpoint, opened)
}

/// The daemon works from `/`, so paths the user gave relative to the working directory are
/// made absolute first (a missing file keeps its name, for the error message).
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    if vmfs_mount::storage::is_remote(path) {
        return path.to_path_buf();
    }
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn fail(msg: &str) -> i32 {
    eprintln!("vmfs-mount: {msg}");
    1
}
