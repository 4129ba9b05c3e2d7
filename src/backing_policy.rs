//! Which files an image may make us open. Backing files, parents, extents and external data
//! files are named by the image, and images come from downloads, tickets and backups: a qcow2
//! whose backing file is `/etc/shadow` must not serve it. By default a named file must be a
//! regular file or a block device and lie inside an allowed directory: the directory of a file
//! the user named (and below), the VirtualBox VM folder above a `Snapshots/` directory, or one
//! given with `backing_dirs`. `trust_backing` lifts the directory rule. Symlinks and `..` are
//! resolved before deciding, and the opened file must be the one that was checked.

use crate::error::{Error, Kind, Result};
use crate::storage::{FileKey, HostFile};
use parking_lot::Mutex;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What an image asks us to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The top image (or another file the user named).
    Image,
    /// A qcow2 backing file.
    BackingFile,
    /// A VMDK/VHD/VHDX/VDI parent.
    Parent,
    /// A VMDK extent.
    Extent,
    /// A qcow2 external data file.
    DataFile,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Image => "image",
            Role::BackingFile => "backing file",
            Role::Parent => "parent",
            Role::Extent => "extent",
            Role::DataFile => "external data file",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One decision, kept for `--list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The layer whose image named the file (the file itself for `Role::Image`).
    pub requester: PathBuf,
    pub role: Role,
    /// The path as the image stores it.
    pub stored: String,
    /// The path after resolving symlinks and `..` (as given when that failed).
    pub path: PathBuf,
    pub allowed: bool,
    /// Why: "named on the command line", "inside DIR (...)", or the refusal.
    pub reason: String,
}

#[derive(Clone, Debug)]
struct AllowedDir {
    /// Canonical.
    dir: PathBuf,
    why: String,
}

/// The rules for one mount. Cheap to clone; clones share the decision log.
#[derive(Clone, Debug, Default)]
pub struct BackingPolicy {
    trust_any: bool,
    dirs: Vec<AllowedDir>,
    /// (st_dev, st_ino) of files the user named.
    named: Vec<(u64, u64)>,
    log: Arc<Mutex<Vec<Decision>>>,
}

/// How a path fares under the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed(String),
    /// A regular file or block device outside the allowed directories.
    Outside(String),
    /// A directory, device, FIFO, socket or pseudo-file-system file: never a layer.
    NotAnImage(String),
    /// It could not be resolved or stat'ed.
    Unreadable(String),
}

/// A checked file: whatever is opened for it must still be this file.
#[derive(Clone, Copy, Debug)]
pub struct Admitted {
    dev_ino: (u64, u64),
}

/// The exact option spellings, for messages and `--help`.
pub const OPT_DIRS: &str = "backing_dirs";
pub const OPT_TRUST: &str = "trust_backing";

impl BackingPolicy {
    /// The default rules: only files the user names and what lies beside them.
    pub fn new() -> BackingPolicy {
        BackingPolicy::default()
    }

    /// `-o trust_backing`: accept files anywhere (the file-type rule still holds).
    pub fn trust_any(mut self, yes: bool) -> BackingPolicy {
        self.trust_any = yes;
        self
    }

    /// `-o backing_dirs=DIR`: images may name files in `dir` and below.
    pub fn allow_dir(mut self, dir: &Path) -> Result<BackingPolicy> {
        let canon = dir
            .canonicalize()
            .map_err(|e| Error::io(dir, OPT_DIRS, e))?;
        if !canon.is_dir() {
            return Err(Error::invalid(format!(
                "{OPT_DIRS}: {} is not a directory",
                dir.display()
            )));
        }
        self.push_dir(canon, format!("{OPT_DIRS}={}", dir.display()));
        Ok(self)
    }

    /// A file the user named (IMAGE, `--overlay FILE`, a clone): trusted itself, and its
    /// directory (as given and after resolving symlinks) holds what its chain may name.
    /// A file that cannot be stat'ed is skipped: opening it fails with its own error.
    pub fn trust_named(mut self, file: &Path) -> BackingPolicy {
        let Ok(meta) = std::fs::metadata(file) else {
            return self;
        };
        if !self.named.contains(&(meta.dev(), meta.ino())) {
            self.named.push((meta.dev(), meta.ino()));
        }
        let given_dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let why = format!("the directory of {}", file.display());
        let mut dirs = Vec::new();
        if let Ok(d) = given_dir.canonicalize() {
            dirs.push(d);
        }
        if let Some(d) = file
            .canonicalize()
            .ok()
            .and_then(|f| f.parent().map(Path::to_path_buf))
        {
            dirs.push(d);
        }
        for d in dirs {
            // VirtualBox keeps differencing images in `<VM folder>/Snapshots/` and the base in
            // the VM folder (or below it).
            if d.file_name().is_some_and(|n| n == "Snapshots")
                && let Some(vm) = d.parent()
            {
                self.push_dir(
                    vm.to_path_buf(),
                    format!("the VirtualBox VM folder above {}", d.display()),
                );
            }
            // `/` and below would be everything: a file named there only trusts itself.
            if d.parent().is_some() {
                self.push_dir(d, why.clone());
            }
        }
        self.record(Decision {
            requester: file.to_path_buf(),
            role: Role::Image,
            stored: file.display().to_string(),
            path: file.canonicalize().unwrap_or_else(|_| file.to_path_buf()),
            allowed: true,
            reason: "named on the command line".into(),
        });
        self
    }

    /// A policy rooted at `file` unless something was named already.
    pub fn rooted_at(&self, file: &Path) -> BackingPolicy {
        if self.named.is_empty() {
            self.clone().trust_named(file)
        } else {
            self.clone()
        }
    }

    /// Whether a file was named yet.
    pub fn is_rooted(&self) -> bool {
        !self.named.is_empty()
    }

    fn push_dir(&mut self, dir: PathBuf, why: String) {
        if !self.dirs.iter().any(|d| d.dir == dir) {
            self.dirs.push(AllowedDir { dir, why });
        }
    }

    /// How `path` fares, without recording anything (for searches over many candidates).
    pub fn verdict(&self, path: &Path) -> Verdict {
        match self.evaluate(path) {
            Ok((_, _, v)) => v,
            Err(e) => Verdict::Unreadable(e.to_string()),
        }
    }

    fn evaluate(&self, path: &Path) -> Result<(PathBuf, (u64, u64), Verdict)> {
        let canon = path
            .canonicalize()
            .map_err(|e| Error::io(path, "resolve path", e))?;
        let meta = std::fs::metadata(&canon).map_err(|e| Error::io(&canon, "stat", e))?;
        let dev_ino = (meta.dev(), meta.ino());
        let verdict = self.judge(&canon, &meta, dev_ino);
        Ok((canon, dev_ino, verdict))
    }

    /// Decides whether the layer at `requester` may open `path` (stored in its image as
    /// `stored`) as its `role`, and records the decision. Refusals are `Kind::Refused` and
    /// name the path, the layer and the option that would allow it.
    /// A policy nothing was named to yet (a library caller opening one image directly) takes
    /// `requester` as named.
    pub fn check(
        &self,
        requester: &Path,
        role: Role,
        stored: &str,
        path: &Path,
    ) -> Result<Admitted> {
        if !self.is_rooted() {
            return self
                .rooted_at(requester)
                .check(requester, role, stored, path);
        }
        let (canon, dev_ino, verdict) = self.evaluate(path)?;
        let (allowed, reason) = match &verdict {
            Verdict::Allowed(why) => (true, why.clone()),
            Verdict::Outside(why) | Verdict::NotAnImage(why) | Verdict::Unreadable(why) => {
                (false, why.clone())
            }
        };
        self.record(Decision {
            requester: requester.to_path_buf(),
            role,
            stored: stored.to_string(),
            path: canon.clone(),
            allowed,
            reason: reason.clone(),
        });
        if allowed {
            return Ok(Admitted { dev_ino });
        }
        let resolved = if canon.as_os_str() == stored {
            String::new()
        } else {
            format!("{} ", canon.display())
        };
        Err(Error::new(
            Kind::Refused,
            format!(
                "{}: {role} {stored:?} refused: {resolved}{reason}",
                requester.display()
            ),
        ))
    }

    fn judge(&self, canon: &Path, meta: &std::fs::Metadata, dev_ino: (u64, u64)) -> Verdict {
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            let what = if ft.is_dir() {
                "a directory"
            } else if ft.is_char_device() {
                "a character device"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            return Verdict::NotAnImage(format!(
                "is {what}; only regular files and block devices can be layers"
            ));
        }
        if let Some(fs) = pseudo_fs(canon) {
            return Verdict::NotAnImage(format!("lies on {fs}, whose files are not disk images"));
        }
        if self.named.contains(&dev_ino) {
            return Verdict::Allowed("named on the command line".into());
        }
        if let Some(d) = self.dirs.iter().find(|d| canon.starts_with(&d.dir)) {
            return Verdict::Allowed(format!("inside {} ({})", d.dir.display(), d.why));
        }
        if self.trust_any {
            return Verdict::Allowed(format!("{OPT_TRUST} is set"));
        }
        let dirs: Vec<String> = self
            .dirs
            .iter()
            .map(|d| d.dir.display().to_string())
            .collect();
        let suggest = canon.parent().unwrap_or(Path::new("/"));
        Verdict::Outside(format!(
            "is outside the directories the chain may use ({}); allow it with -o {OPT_DIRS}={} \
             (or --backing-dirs), or accept any path with -o {OPT_TRUST}",
            if dirs.is_empty() {
                "none".to_string()
            } else {
                dirs.join(", ")
            },
            suggest.display()
        ))
    }

    /// Checks, then opens read-only (unless `writable`) and confirms the opened file is the
    /// checked one (a symlink swapped in between is caught).
    pub fn open(
        &self,
        requester: &Path,
        role: Role,
        stored: &str,
        path: &Path,
        writable: bool,
    ) -> Result<Arc<HostFile>> {
        let admitted = self.check(requester, role, stored, path)?;
        let file = HostFile::open(path, writable)?;
        admitted.confirm(&file)?;
        Ok(file)
    }

    fn record(&self, d: Decision) {
        let mut log = self.log.lock();
        if !log.contains(&d) {
            log.push(d);
        }
    }

    /// Every decision so far, in order.
    pub fn decisions(&self) -> Vec<Decision> {
        self.log.lock().clone()
    }
}

impl Admitted {
    /// Fails unless `file` is the file that was checked.
    pub fn confirm(&self, file: &HostFile) -> Result<()> {
        let (dev, ino) = self.dev_ino;
        if file.key() == (FileKey::Local { dev, ino }) {
            Ok(())
        } else {
            Err(Error::new(
                Kind::Refused,
                format!(
                    "{}: changed between the backing-file check and opening it",
                    file.path().display()
                ),
            ))
        }
    }
}

/// Kernel file systems whose "regular files" are not data (procfs, sysfs and kin).
fn pseudo_fs(path: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a properly sized out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    const PROC: i64 = 0x9fa0;
    const SYSFS: i64 = 0x6265_6572;
    const DEBUGFS: i64 = 0x6462_6720;
    const TRACEFS: i64 = 0x7472_6163;
    const SECURITYFS: i64 = 0x7365_6375;
    const CONFIGFS: i64 = 0x6265_6570;
    const EFIVARFS: i64 = 0xde5e_81e4;
    const CGROUP2: i64 = 0x6367_7270;
    #[allow(clippy::unnecessary_cast)]
    match st.f_type as i64 {
        PROC => Some("procfs"),
        SYSFS => Some("sysfs"),
        DEBUGFS => Some("debugfs"),
        TRACEFS => Some("tracefs"),
        SECURITYFS => Some("securityfs"),
        CONFIGFS => Some("configfs"),
        EFIVARFS => Some("efivarfs"),
        CGROUP2 => Some("cgroup2"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(name: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("vmfs-policy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p.canonicalize().unwrap())
    }
    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn named_files_and_their_directories_are_trusted() {
        let t = tmp("named");
        let (top, beside, below, above) = (
            t.0.join("vm/top"),
            t.0.join("vm/base"),
            t.0.join("vm/sub/b"),
            t.0.join("other"),
        );
        for p in [&top, &beside, &below, &above] {
            touch(p);
        }
        let p = BackingPolicy::new().trust_named(&top);
        assert!(matches!(p.verdict(&beside), Verdict::Allowed(_)));
        assert!(matches!(p.verdict(&below), Verdict::Allowed(_)));
        assert!(matches!(p.verdict(&above), Verdict::Outside(_)));
        // a second named file is trusted wherever it is, its directory too
        let p = p.trust_named(&above);
        assert_eq!(
            p.verdict(&above),
            Verdict::Allowed("named on the command line".into())
        );
        assert!(p.check(&top, Role::BackingFile, "x", &above).is_ok());
        let d = p.decisions();
        assert_eq!(d.last().unwrap().role, Role::BackingFile);
        assert!(d.last().unwrap().allowed);
    }

    #[test]
    fn the_virtualbox_vm_folder_above_snapshots_is_allowed() {
        let t = tmp("vbox");
        let (snap, base, sibling) = (
            t.0.join("vm/Snapshots/{u}.vdi"),
            t.0.join("vm/disk.vdi"),
            t.0.join("elsewhere/disk.vdi"),
        );
        for p in [&snap, &base, &sibling] {
            touch(p);
        }
        let p = BackingPolicy::new().trust_named(&snap);
        assert!(matches!(p.verdict(&base), Verdict::Allowed(r) if r.contains("VirtualBox")));
        assert!(matches!(p.verdict(&sibling), Verdict::Outside(_)));
        // not for any other directory name
        let other = t.0.join("vm/snapshots-old/x.vdi");
        touch(&other);
        let p = BackingPolicy::new().trust_named(&other);
        assert!(matches!(p.verdict(&base), Verdict::Outside(_)));
    }

    #[test]
    fn symlinks_are_judged_by_their_target_and_swaps_are_caught() {
        let t = tmp("link");
        let (top, out, inside) = (t.0.join("vm/top"), t.0.join("out/f"), t.0.join("vm/g"));
        for p in [&top, &out, &inside] {
            touch(p);
        }
        let link = t.0.join("vm/link");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        let p = BackingPolicy::new().trust_named(&top);
        let e = p.check(&top, Role::Extent, "link", &link).unwrap_err();
        assert_eq!(e.kind(), Kind::Refused);
        let msg = e.to_string();
        assert!(msg.contains("extent \"link\" refused"), "{msg}");
        assert!(
            msg.contains(&format!("backing_dirs={}", t.0.join("out").display())),
            "{msg}"
        );
        // admitted for one file, confirmed against another: refused
        let admitted = p.check(&top, Role::Extent, "g", &inside).unwrap();
        let other = HostFile::open(&top, false).unwrap();
        assert_eq!(admitted.confirm(&other).unwrap_err().kind(), Kind::Refused);
        let same = HostFile::open(&inside, false).unwrap();
        assert!(admitted.confirm(&same).is_ok());
        // trust_backing accepts the outside file; backing_dirs too
        assert!(
            p.clone()
                .trust_any(true)
                .check(&top, Role::Extent, "l", &link)
                .is_ok()
        );
        let p = p.allow_dir(&t.0.join("out")).unwrap();
        assert!(matches!(p.verdict(&link), Verdict::Allowed(r) if r.contains("backing_dirs")));
    }

    #[test]
    fn devices_fifos_and_proc_are_never_layers() {
        let t = tmp("types");
        let top = t.0.join("top");
        touch(&top);
        let fifo = t.0.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let p = BackingPolicy::new().trust_named(&top).trust_any(true);
        for (path, what) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/null"), "character device"),
            (Path::new("/proc/self/status"), "procfs"),
            (t.0.as_path(), "directory"),
        ] {
            match p.verdict(path) {
                Verdict::NotAnImage(r) => assert!(r.contains(what), "{r}"),
                v => panic!("{}: {v:?}", path.display()),
            }
        }
        assert!(matches!(
            p.verdict(&t.0.join("missing")),
            Verdict::Unreadable(_)
        ));
    }

    #[test]
    fn an_unrooted_policy_trusts_the_requesters_directory() {
        let t = tmp("unrooted");
        let (top, beside, out) = (t.0.join("a/top"), t.0.join("a/ext"), t.0.join("b/ext"));
        for p in [&top, &beside, &out] {
            touch(p);
        }
        let p = BackingPolicy::new();
        assert!(!p.is_rooted());
        assert!(p.check(&top, Role::Extent, "ext", &beside).is_ok());
        assert!(p.check(&top, Role::Extent, "../b/ext", &out).is_err());
        assert!(BackingPolicy::new().allow_dir(&t.0.join("nope")).is_err());
    }
}
