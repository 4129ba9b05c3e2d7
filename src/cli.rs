//! Command line: clap arguments plus mount(8)-style `-o` options, folded into one `Settings`.
//!
//! The `-o` parser is pure so that every option mount.fuse3 or an fstab line may pass is unit
//! tested here rather than discovered at mount time.

use clap::{ArgAction, Parser};
use std::path::PathBuf;
use vmfs_mount::expose::FileOptions;
use vmfs_mount::format::Format;
use vmfs_mount::storage::config::RemoteOptions;

const ABOUT: &str = "Mount a virtual-machine disk image chain as raw files";

const LONG_ABOUT: &str = "\
Mount a virtual-machine disk image (with its whole backing chain) so that every view of it \
appears as a raw disk file:

  MOUNTPOINT/disk.raw                    the live disk (whole chain)
  MOUNTPOINT/snapshots/<name>/disk.raw   one per backing layer and per internal snapshot
  MOUNTPOINT/snapshots/<tag>/vmstate     the VM state a running VM saved with a snapshot (savevm)
  MOUNTPOINT/changes/<view>.raw          the live bytes where they may differ from a view;
  MOUNTPOINT/changes/bitmap-<name>.raw   ... where a QEMU dirty bitmap has bits set

Reading any of these files gives the bytes `qemu-img convert -O raw` gives for that view. \
Snapshot files are read-only. Writes through a writable disk.raw keep the image's enabled QEMU \
dirty bitmaps up to date (in use while mounted, consistent again after a clean unmount). The \
command returns once the mount answers; unmount with `umount MOUNTPOINT` or \
`fusermount3 -u MOUNTPOINT` (or send SIGTERM to the daemon).";

const AFTER_HELP: &str = "\
Mount options (-o, comma-separated, repeatable):
  ro, rw                  read-only / read-write (rw, the default, falls back to read-only
                          with a warning when the image is write-protected)
  allow_other, allow_root let other users / root access the mount
  default_permissions     let the kernel check permissions
  auto_unmount            unmount when the daemon dies (needs allow_other or allow_root)
  overlay=FILE            write changes to FILE instead of the image (created if missing)
  clones=DIR              add clones/: writable clones of the image (mounted read-only), one
                          qcow2 overlay DIR/NAME.qcow2 each (mkdir clones/NAME makes one)
  vmdk                    add disk.vmdk beside every disk.raw: a VMDK descriptor whose one
                          FLAT extent is disk.raw (VirtualBox, VMware); writable with its
                          disk.raw, rewrites (a new CID) kept in memory until unmount
  vhd                     add disk.vhd beside every disk.raw: disk.raw's bytes plus a fixed-VHD
                          footer (Hyper-V, Azure tools); writes go to disk.raw, footer read-only
  force_share             with ro: share the image with a QEMU that is writing it (qemu-img -U)
  format=FMT              force the top image's format (qcow2, raw, vmdk, vpc, vhdx, vdi)
  cache_size=SIZE         metadata cache size, e.g. 256M (default 256M)
  threads=N               FUSE worker threads
  nopassthrough           serve raw-identical files through the daemon too (by default the
                          kernel reads them directly when running as root on Linux 6.9+)
  log=FILE                daemon log file
  backing_dirs=DIR[:DIR]  images may also name backing/parent/extent/data files in DIR and below
                          (by default only the directories of the files named here are allowed)
  trust_backing           images may name such files anywhere (still only regular files and
                          block devices)
  fsname=NAME, subtype=NAME
Remote images (IMAGE is s3://BUCKET/KEY, https://HOST/PATH or http://HOST/PATH; read-only,
writable with overlay=FILE; credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/
AWS_SESSION_TOKEN or the shared credentials file, never from the command line):
  cache_dir=DIR           chunk cache (--cache-dir; default $XDG_CACHE_HOME/vmfs-mount,
                          /var/cache/vmfs-mount as root), shared by every mount on the host
  cache_max=SIZE          chunk cache limit, least recently used evicted (--cache-max;
                          default 4G; 0: no persistent cache)
  cache_direct            write chunk cache entries with O_DIRECT: faster cold streaming
                          where page-cache writes are the bottleneck; later reads of them
                          come from the disk, not the page cache
  aws_profile=NAME        profile in the shared credentials/config files (AWS_PROFILE)
  aws_shared_credentials_file=FILE   (AWS_SHARED_CREDENTIALS_FILE; default ~/.aws/credentials)
  aws_region=REGION       (AWS_REGION; default us-east-1)
  aws_endpoint_url=URL    S3-compatible store (AWS_ENDPOINT_URL), e.g. MinIO, Garage, Ceph
  s3_path_style, s3_virtual_hosted   addressing (default: path-style with a custom endpoint)
  remote_timeout=SECS     connect/read stall before a retry (default 20)
  remote_retries=N        retries of timeouts, 5xx and throttling before EIO (default 5)
Generic mount(8)/fstab options are accepted and ignored (nodev, nosuid, noexec and noatime are
applied): dev, nodev, suid, nosuid, exec, noexec, atime, noatime, relatime, auto, noauto,
user, users, nouser, _netdev, nofail, defaults, x-*, comment=*.

Examples:
  vmfs-mount disk.qcow2 /mnt/vm
  vmfs-mount -r -o allow_other disk.vmdk /mnt/vm
  vmfs-mount --list --json disk.qcow2
  AWS_PROFILE=ci vmfs-mount s3://golden/ubuntu/top.qcow2 /mnt/vm
  vmfs-mount --overlay /var/tmp/vm.qcow2 https://images.example/vm/disk.vmdk /mnt/vm
  vmfs-mount --changes nightly --json disk.qcow2   # what changed since snapshot nightly
  mount -t fuse.vmfs-mount /images/disk.qcow2 /mnt/vm -o ro";

#[derive(Parser, Debug)]
#[command(name = "vmfs-mount", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
#[command(group(clap::ArgGroup::new("report").args(["list", "changes"])))]
pub struct Args {
    /// Disk image to mount (the top of its backing chain): a file, or s3://BUCKET/KEY,
    /// https://HOST/PATH, http://HOST/PATH
    pub image: PathBuf,

    /// Directory to mount on (not needed with --list or --changes)
    #[arg(required_unless_present_any = ["list", "changes"])]
    pub mountpoint: Option<PathBuf>,

    /// Stay in the foreground and log to stderr
    ///
    /// With $NOTIFY_SOCKET (systemd Type=notify), send READY=1 once the mount answers and
    /// STOPPING=1 on unmount.
    #[arg(short = 'f', long)]
    pub foreground: bool,

    /// Mount read-only (same as -o ro)
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,

    /// Force the top image's format instead of detecting it by content
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,

    /// Write changes to this overlay file instead of the image
    #[arg(long, value_name = "FILE")]
    pub overlay: Option<PathBuf>,

    /// Add clones/: writable qcow2 clones of the image (then mounted read-only) in DIR
    #[arg(long, value_name = "DIR")]
    pub clones: Option<PathBuf>,

    /// Let images name backing, parent, extent and data files in these directories too
    #[arg(long, value_name = "DIR[:DIR...]")]
    pub backing_dirs: Option<String>,

    /// Let images name backing, parent, extent and data files anywhere
    #[arg(long)]
    pub trust_backing: bool,

    /// Metadata cache size (K, M, G suffixes); decompressed data gets an eighth of it extra
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,

    /// FUSE worker threads [default: twice the CPUs, at most 8]
    #[arg(long, value_name = "N")]
    pub threads: Option<String>,

    /// Read-only mounts only: share the image with a QEMU that is writing it (like qemu-img -U)
    #[arg(long)]
    pub force_share: bool,

    /// Remote images (s3://, http://, https://): the chunk cache directory [default:
    /// $XDG_CACHE_HOME/vmfs-mount, or /var/cache/vmfs-mount as root]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Remote images: the chunk cache's size limit, least recently used chunks evicted
    /// first; 0 keeps no cache [default: 4G]
    #[arg(long, value_name = "SIZE")]
    pub cache_max: Option<String>,

    /// Write the daemon's log to FILE instead of discarding it
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Mount options, comma-separated (see below)
    #[arg(short = 'o', value_name = "OPTS", action = ArgAction::Append)]
    pub options: Vec<String>,

    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG also works
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,

    /// Print the chain and the views that would be mounted, then exit
    #[arg(long)]
    pub list: bool,

    /// Print the extents where view NEW (default: the live disk) may differ from view OLD,
    /// found from metadata only (names as under snapshots/), then exit
    #[arg(long, value_name = "OLD[..NEW]")]
    pub changes: Option<String>,

    /// With --list or --changes: print JSON
    #[arg(long, requires = "report")]
    pub json: bool,
}

/// Whether the user asked for read-only or read-write, or left it to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read-write when the image can be opened for writing, read-only otherwise (like mount(8)
    /// with a write-protected device). `rw` means this too: mount(8) passes it by default.
    Auto,
    ReadOnly,
}

/// Everything the program does, after the command line and `-o` options are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub image: PathBuf,
    pub mountpoint: Option<PathBuf>,
    pub foreground: bool,
    pub access: Access,
    pub format: Option<Format>,
    pub overlay: Option<PathBuf>,
    pub force_share: bool,
    pub table_cache: usize,
    pub cluster_cache: usize,
    pub threads: usize,
    pub log_file: Option<PathBuf>,
    pub verbose: u8,
    pub list: bool,
    /// `--changes OLD[..NEW]`, as given (names are resolved against the opened views).
    pub changes: Option<String>,
    pub json: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: bool,
    pub auto_unmount: bool,
    pub fsname: Option<String>,
    pub subtype: Option<String>,
    /// Restrictive kernel flags we honour: nodev, nosuid, noexec, noatime.
    pub kernel_flags: Vec<&'static str>,
    /// Let the kernel read raw-identical files directly (off with `-o nopassthrough`).
    pub passthrough: bool,
    /// Remote layers: chunk cache, S3 settings, timeouts.
    pub remote: RemoteOptions,
    /// `backing_dirs`: more directories images may name files in.
    pub backing_dirs: Vec<PathBuf>,
    /// `trust_backing`: images may name files anywhere.
    pub trust_backing: bool,
    /// Which optional files each view's directory shows.
    pub files: FileOptions,
    /// `clones=DIR`: writable clones of the read-only image.
    pub clones: Option<PathBuf>,
}

pub const DEFAULT_TABLE_CACHE: usize = 256 << 20;

/// A command-line problem: printed as one line, exit status 2.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl Settings {
    pub fn from_args(a: Args) -> Result<Settings, UsageError> {
        let mut s = Settings {
            image: a.image,
            mountpoint: a.mountpoint,
            foreground: a.foreground,
            access: if a.read_only {
                Access::ReadOnly
            } else {
                Access::Auto
            },
            format: None,
            overlay: a.overlay,
            force_share: a.force_share,
            table_cache: DEFAULT_TABLE_CACHE,
            cluster_cache: DEFAULT_TABLE_CACHE / 8,
            threads: default_threads(),
            log_file: a.log_file,
            verbose: a.verbose,
            list: a.list,
            changes: a.changes,
            json: a.json,
            allow_other: false,
            allow_root: false,
            default_permissions: false,
            auto_unmount: false,
            fsname: None,
            subtype: None,
            kernel_flags: Vec::new(),
            passthrough: true,
            remote: RemoteOptions::default(),
            backing_dirs: Vec::new(),
            trust_backing: a.trust_backing,
            files: FileOptions::default(),
            clones: a.clones,
        };
        if let Some(d) = &a.backing_dirs {
            s.apply_one(&format!("backing_dirs={d}"))?;
        }
        if let Some(f) = &a.format {
            s.apply_one(&format!("format={f}"))?;
        }
        if let Some(c) = &a.cache_size {
            s.apply_one(&format!("cache_size={c}"))?;
        }
        if let Some(t) = &a.threads {
            s.apply_one(&format!("threads={t}"))?;
        }
        if let Some(d) = &a.cache_dir {
            s.remote.cache_dir = Some(d.clone());
        }
        if let Some(m) = &a.cache_max {
            s.apply_one(&format!("cache_max={m}"))?;
        }
        for group in &a.options {
            s.apply_options(group)?;
        }
        if s.allow_other && s.allow_root {
            return Err(UsageError(
                "allow_other and allow_root are mutually exclusive".into(),
            ));
        }
        if s.force_share && s.access != Access::ReadOnly {
            return Err(UsageError(
                "force_share only works with a read-only mount (add -o ro)".into(),
            ));
        }
        if s.clones.is_some() {
            if s.overlay.is_some() || s.force_share {
                return Err(UsageError(
                    "clones need an image nothing else changes: not with overlay or force_share"
                        .into(),
                ));
            }
            // The clones' base must not change under them.
            s.access = Access::ReadOnly;
        }
        if s.auto_unmount && !(s.allow_other || s.allow_root) {
            return Err(UsageError(
                "auto_unmount needs allow_other or allow_root as well".into(),
            ));
        }
        Ok(s)
    }

    /// Applies one `-o` argument: options separated by commas.
    pub fn apply_options(&mut self, group: &str) -> Result<(), UsageError> {
        for opt in group.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            self.apply_one(opt)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, opt: &str) -> Result<(), UsageError> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = |v: Option<&str>| -> Result<String, UsageError> {
            match v {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(UsageError(format!(
                    "mount option {key} needs a value ({key}=...)"
                ))),
            }
        };
        match (key, value) {
            ("ro", None) => self.access = Access::ReadOnly,
            ("rw", None) => self.access = Access::Auto,
            ("allow_other", None) => self.allow_other = true,
            ("allow_root", None) => self.allow_root = true,
            ("default_permissions", None) => self.default_permissions = true,
            ("auto_unmount", None) => self.auto_unmount = true,
            ("nopassthrough", None) => self.passthrough = false,
            ("force_share", None) => self.force_share = true,
            ("trust_backing", None) => self.trust_backing = true,
            ("vmdk", None) => self.files.wrappers.vmdk = true,
            ("vhd", None) => self.files.wrappers.vhd = true,
            ("backing_dirs", v) => {
                let list = need(v)?;
                self.backing_dirs
                    .extend(list.split(':').filter(|d| !d.is_empty()).map(PathBuf::from));
            }
            ("overlay", v) => self.overlay = Some(PathBuf::from(need(v)?)),
            ("clones", v) => self.clones = Some(PathBuf::from(need(v)?)),
            ("format", v) => {
                let name = need(v)?;
                self.format = Some(Format::parse(&name).map_err(|e| UsageError(e.to_string()))?);
            }
            ("cache_size", v) => {
                let bytes = parse_size(&need(v)?)?;
                self.table_cache = bytes;
                self.cluster_cache = (bytes / 8).max(4 << 20);
            }
            ("threads", v) => {
                let text = need(v)?;
                self.threads = match text.parse::<usize>() {
                    Ok(n) if (1..=256).contains(&n) => n,
                    _ => {
                        return Err(UsageError(format!(
                            "threads={text}: expected a number from 1 to 256"
                        )));
                    }
                };
            }
            ("log", v) => self.log_file = Some(PathBuf::from(need(v)?)),
            ("fsname", v) => self.fsname = Some(need(v)?),
            ("subtype", v) => self.subtype = Some(need(v)?),
            ("nodev" | "nosuid" | "noexec" | "noatime", None) => {
                let flag = match key {
                    "nodev" => "nodev",
                    "nosuid" => "nosuid",
                    "noexec" => "noexec",
                    _ => "noatime",
                };
                if !self.kernel_flags.contains(&flag) {
                    self.kernel_flags.push(flag);
                }
            }
            (k, v) if crate::remote_opts::apply(&mut self.remote, k, v)? => {}
            (k, None) if IGNORED.contains(&k) => {}
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            _ => {
                return Err(UsageError(format!(
                    "unknown mount option {opt:?} (see --help for the list)"
                )));
            }
        }
        Ok(())
    }
}

/// Options that mount(8), fstab or mount.fuse3 may pass and that mean nothing here.
const IGNORED: &[&str] = &[
    "dev",
    "suid",
    "exec",
    "atime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "defaults",
    "async",
    "sync",
    "dirsync",
    "silent",
    "loud",
];

/// FUSE worker threads: twice the CPUs, between 2 and 8.
fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (cpus * 2).clamp(2, 8)
}

/// Parses a metadata cache size: `parse_bytes`, at least 1M.
pub fn parse_size(text: &str) -> Result<usize, UsageError> {
    let bytes = parse_bytes(text)?;
    let bytes = usize::try_from(bytes)
        .map_err(|_| UsageError(format!("bad size {text:?} (expected e.g. 256M or 1G)")))?;
    if bytes < (1 << 20) {
        return Err(UsageError(format!(
            "cache size {text:?} is too small (at least 1M)"
        )));
    }
    Ok(bytes)
}

/// Parses `0`, `123`, `64K`, `256M`, `1G`, `2GiB`, `512MB` (binary units).
pub fn parse_bytes(text: &str) -> Result<u64, UsageError> {
    let t = text.trim();
    let bad = || UsageError(format!("bad size {text:?} (expected e.g. 256M or 1G)"));
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let number: u64 = t[..digits].parse().map_err(|_| bad())?;
    let shift = match t[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(argv: &[&str]) -> Result<Settings, UsageError> {
        let mut full = vec!["vmfs-mount"];
        full.extend_from_slice(argv);
        Settings::from_args(Args::try_parse_from(full).expect("clap accepts"))
    }

    #[test]
    fn defaults() {
        let s = settings(&["img", "mnt"]).unwrap();
        assert_eq!(s.access, Access::Auto);
        assert_eq!(s.table_cache, 256 << 20);
        assert_eq!(s.cluster_cache, 32 << 20);
        assert!((2..=8).contains(&s.threads));
        assert!(!s.foreground && !s.list && s.overlay.is_none() && s.format.is_none());
    }

    #[test]
    fn mount_options_parse_and_last_access_wins() {
        let s = settings(&[
            "-o",
            "ro,allow_other",
            "-o",
            "threads=3,cache_size=64M,format=raw",
            "img",
            "mnt",
        ])
        .unwrap();
        assert_eq!(s.access, Access::ReadOnly);
        assert!(s.allow_other);
        assert_eq!(s.threads, 3);
        assert_eq!(s.table_cache, 64 << 20);
        assert_eq!(s.cluster_cache, 8 << 20);
        assert_eq!(s.format, Some(Format::Raw));
        assert!(s.passthrough);
        assert!(
            !settings(&["-o", "nopassthrough", "img", "mnt"])
                .unwrap()
                .passthrough
        );
        let s = settings(&["-r", "-o", "rw", "img", "mnt"]).unwrap();
        assert_eq!(s.access, Access::Auto);
    }

    #[test]
    fn generic_mount_options_are_ignored_or_applied() {
        let s = settings(&[
            "-o",
            "defaults,nodev,nosuid,noexec,noatime,relatime,auto,noauto,user,users,nouser,_netdev,nofail",
            "-o",
            "dev,suid,exec,atime,x-systemd.automount,comment=hello=world,fsname=vm,subtype=vmfs-mount",
            "img",
            "mnt",
        ])
        .unwrap();
        assert_eq!(s.kernel_flags, vec!["nodev", "nosuid", "noexec", "noatime"]);
        assert_eq!(s.fsname.as_deref(), Some("vm"));
    }

    #[test]
    fn wrappers_are_opt_in() {
        let s = settings(&["img", "mnt"]).unwrap();
        assert!(!s.files.wrappers.vmdk && !s.files.wrappers.vhd);
        let s = settings(&["-o", "vmdk", "-o", "ro,vhd", "img", "mnt"]).unwrap();
        assert!(s.files.wrappers.vmdk && s.files.wrappers.vhd);
        assert!(settings(&["-o", "vhd=1", "img", "mnt"]).is_err());
    }

    #[test]
    fn overlay_and_log_take_values() {
        let s = settings(&["-o", "overlay=/tmp/o.qcow2,log=/tmp/l", "img", "mnt"]).unwrap();
        assert_eq!(s.overlay, Some(PathBuf::from("/tmp/o.qcow2")));
        assert_eq!(s.log_file, Some(PathBuf::from("/tmp/l")));
        let s = settings(&["--overlay", "o", "img", "mnt"]).unwrap();
        assert_eq!(s.overlay, Some(PathBuf::from("o")));
        let s = settings(&["-o", "clones=/srv/c", "img", "mnt"]).unwrap();
        assert_eq!(s.clones, Some(PathBuf::from("/srv/c")));
        assert_eq!(
            s.access,
            Access::ReadOnly,
            "clones make the image read-only"
        );
        assert!(settings(&["--clones", "c", "--overlay", "o", "img", "mnt"]).is_err());
        assert!(settings(&["--clones", "c", "-o", "ro,force_share", "img", "mnt"]).is_err());
    }

    #[test]
    fn backing_policy_options() {
        let s = settings(&["img", "mnt"]).unwrap();
        assert!(s.backing_dirs.is_empty() && !s.trust_backing);
        let s = settings(&["-o", "backing_dirs=/a:/b/c,trust_backing", "img", "mnt"]).unwrap();
        assert_eq!(s.backing_dirs, [PathBuf::from("/a"), PathBuf::from("/b/c")]);
        assert!(s.trust_backing);
        let s = settings(&[
            "--backing-dirs",
            "/x",
            "--trust-backing",
            "-o",
            "backing_dirs=/y",
            "img",
            "mnt",
        ])
        .unwrap();
        assert_eq!(s.backing_dirs, [PathBuf::from("/x"), PathBuf::from("/y")]);
        assert!(s.trust_backing);
        assert!(settings(&["-o", "backing_dirs", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "trust_backing=1", "img", "mnt"]).is_err());
    }

    #[test]
    fn bad_options_are_usage_errors() {
        let e = settings(&["-o", "ro,bogus", "img", "mnt"]).unwrap_err();
        assert!(e.0.contains("unknown mount option \"bogus\""), "{e:?}");
        assert!(settings(&["-o", "threads=0", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "threads", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "overlay=", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "format=floppy", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "ro=1", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "allow_other,allow_root", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "auto_unmount", "img", "mnt"]).is_err());
        assert!(settings(&["-o", "auto_unmount,allow_root", "img", "mnt"]).is_ok());
    }

    #[test]
    fn list_needs_no_mountpoint_but_mount_does() {
        assert!(settings(&["--list", "img"]).unwrap().list);
        assert!(settings(&["--list", "--json", "img"]).unwrap().json);
        assert!(Args::try_parse_from(["vmfs-mount", "img"]).is_err());
        assert!(Args::try_parse_from(["vmfs-mount", "--json", "img", "mnt"]).is_err());
        let s = settings(&["--changes", "base..s1", "--json", "img"]).unwrap();
        assert_eq!(s.changes.as_deref(), Some("base..s1"));
        assert!(Args::try_parse_from(["vmfs-mount", "--list", "--changes", "a", "img"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
        assert!(parse_size("12").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("5Q").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }
}
