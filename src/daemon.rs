//! Mounting and serving: daemonizing after readiness, signals, and a clean unmount.
//!
//! Without -f the parent forks once everything that can fail early has succeeded; the child
//! mounts, starts the FUSE workers, checks that the mount answers, and only then sends one
//! readiness byte (or an error message) through a pipe. The parent exits 0 on that byte, so
//! `vmfs-mount img mnt && ls mnt` never races.

use crate::cli::Settings;
use crate::fs::DiskFs;
use crate::mount::Opened;
use crate::sd_notify::Notifier;
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};

/// What the main thread of the daemon waits for.
enum Event {
    Signal(i32),
    /// The session ended (unmounted); `Some` carries the error it ended with.
    Ended(Option<String>),
}

const SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Mounts `opened` on `mountpoint` (canonical) and serves until unmounted. Returns the exit code.
pub fn run(settings: &Settings, mountpoint: PathBuf, opened: Opened) -> i32 {
    let log = match &settings.log_file {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!(
                    "vmfs-mount: log file {}: {e}",
                    vmfs_mount::storage::show_path(path)
                );
                return 1;
            }
        },
        None => None,
    };
    let config = fuse_config(settings, &opened);
    if settings.foreground {
        if let Some(f) = &log {
            redirect_output(f);
        }
        // Under systemd (Type=notify) the foreground process is the service's main process.
        let notifier = Notifier::from_env();
        return match serve(
            &mountpoint,
            &opened,
            &config,
            settings,
            notifier,
            |_| Ok(()),
        ) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vmfs-mount: {e}");
                1
            }
        };
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty()) {
        // The parent we are would exit and the readiness would come from another process.
        eprintln!(
            "vmfs-mount: warning: NOTIFY_SOCKET is set but -f is not: systemd Type=notify \
             services must run vmfs-mount -f to be told when the mount is ready"
        );
    }
    let (read_end, write_end) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmfs-mount: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: the process is single-threaded here (nothing has spawned a thread yet), so the
    // child may do anything.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("vmfs-mount: fork: {}", std::io::Error::last_os_error());
            1
        }
        0 => {
            drop(read_end);
            daemon_child(&mountpoint, &opened, &config, settings, write_end, log)
        }
        child => {
            drop(write_end);
            // The image locks live on open file descriptions shared with the daemon: unlocking
            // them here (by dropping) would unlock the daemon's too.
            std::mem::forget(opened);
            wait_for_readiness(read_end, child)
        }
    }
}

/// The parent: exits 0 once the child says the mount answers, else prints the child's error.
fn wait_for_readiness(read_end: File, child: libc::pid_t) -> i32 {
    let mut msg = Vec::new();
    let mut r = read_end;
    let _ = r.read_to_end(&mut msg);
    match msg.first() {
        Some(0) => 0,
        Some(_) => {
            eprintln!("vmfs-mount: {}", String::from_utf8_lossy(&msg).trim_end());
            1
        }
        None => {
            let mut status = 0;
            // SAFETY: plain waitpid on our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            eprintln!(
                "vmfs-mount: the daemon exited before the mount was ready (status {status:#x})"
            );
            1
        }
    }
}

fn daemon_child(
    mountpoint: &Path,
    opened: &Opened,
    config: &Config,
    settings: &Settings,
    ready: File,
    log: Option<File>,
) -> i32 {
    // SAFETY: setsid and chdir have no memory-safety preconditions.
    unsafe {
        libc::setsid();
        libc::chdir(c"/".as_ptr());
    }
    let mut ready = Some(ready);
    let result = serve(mountpoint, opened, config, settings, None, |_| {
        // Detach from the caller's terminal and pipes before saying we are ready, so that a
        // caller reading our output to EOF returns as soon as the parent exits.
        match &log {
            Some(f) => redirect_output(f),
            None => redirect_output(
                &File::options()
                    .write(true)
                    .open("/dev/null")
                    .map_err(|e| format!("/dev/null: {e}"))?,
            ),
        }
        if let Some(mut pipe) = ready.take() {
            let _ = pipe.write_all(&[0]);
        }
        Ok(())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            // Before readiness the parent prints the message (one line, on the caller's
            // stderr); after it, only the log can tell.
            match ready.take() {
                Some(mut pipe) => {
                    let _ = pipe.write_all(e.as_bytes());
                }
                None => log::error!("{e}"),
            }
            1
        }
    }
}

/// Mounts, starts the workers, checks the mount answers, calls `on_ready` (and tells systemd
/// through `notifier`), then waits for a signal or an unmount. Errors are one-line messages.
fn serve(
    mountpoint: &Path,
    opened: &Opened,
    config: &Config,
    settings: &Settings,
    mut notifier: Option<Notifier>,
    on_ready: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let (tx, rx) = channel();
    block_signals_and_watch(tx.clone())?;
    vmfs_mount::storage::registry::start_background();
    let mut fs = DiskFs::new(opened, &settings.files);
    if !settings.passthrough {
        fs = fs.without_passthrough();
    }
    let tree = fs.shared();
    let mut session = Session::new(fs, mountpoint, config)
        .map_err(|e| format!("cannot mount on {}: {e}", mountpoint.display()))?;
    tree.attach(session.notifier());
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            let result = session.run();
            let _ = tx.send(Event::Ended(result.err().map(|e| e.to_string())));
        })
        .map_err(|e| format!("cannot start the FUSE session: {e}"))?;
    // The root answers from the tree alone (disk.raw would count its allocated blocks first).
    if let Err(e) = std::fs::metadata(mountpoint) {
        unmount(&mut unmounter, mountpoint);
        return Err(format!(
            "{} was mounted but does not answer: {e}",
            mountpoint.display()
        ));
    }
    let image = vmfs_mount::storage::show_path(opened.live.spec.layers[0].path());
    log::info!("mounted {image} on {}", mountpoint.display());
    if let Err(e) = on_ready(mountpoint) {
        unmount(&mut unmounter, mountpoint);
        return Err(e);
    }
    if let Some(n) = &notifier {
        n.ready(&format!("serving {image} on {}", mountpoint.display()));
    }
    let mut stopping = |why: &str| {
        if let Some(n) = &mut notifier {
            n.stopping(&format!("{why}: {}", mountpoint.display()));
        }
    };
    let mut signalled = false;
    loop {
        match rx.recv() {
            Ok(Event::Signal(sig)) if !signalled => {
                log::info!(
                    "signal {sig}: flushing and unmounting {}",
                    mountpoint.display()
                );
                stopping("signal received, flushing and unmounting");
                signalled = true;
                tree.flush_all();
                unmount(&mut unmounter, mountpoint);
            }
            Ok(Event::Signal(sig)) => {
                log::warn!(
                    "signal {sig} again: exiting while {} is still busy",
                    mountpoint.display()
                );
                tree.flush_all();
                return Ok(());
            }
            Ok(Event::Ended(None)) | Err(_) => {
                // The session is over, so no write is in flight or can start.
                tree.close_all();
                stopping("unmounted");
                vmfs_mount::storage::registry::log_stats();
                log::info!("{} unmounted", mountpoint.display());
                return Ok(());
            }
            Ok(Event::Ended(Some(e))) => {
                stopping("FUSE session failed");
                return Err(format!("FUSE session failed: {e}"));
            }
        }
    }
}

/// Unmounts; if the mount is busy, detaches it lazily (the session then ends when the last
/// open file is closed).
fn unmount(unmounter: &mut SessionUnmounter, mountpoint: &Path) {
    if let Err(e) = unmounter.unmount() {
        log::warn!("unmount {}: {e}; detaching it lazily", mountpoint.display());
        lazy_detach(mountpoint);
    }
}

fn lazy_detach(mountpoint: &Path) {
    if let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let status = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        log::error!("could not detach {}", mountpoint.display());
    }
}

/// Blocks the termination signals in this thread (and so in every thread spawned after) and
/// starts a thread that turns them into events.
fn block_signals_and_watch(tx: Sender<Event>) -> Result<(), String> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: set is a valid sigset_t; sig is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0
                    && tx.send(Event::Signal(sig)).is_err()
                {
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

fn fuse_config(s: &Settings, opened: &Opened) -> Config {
    let mut options = vec![
        MountOption::FSName(s.fsname.clone().unwrap_or_else(|| source_name(opened))),
        MountOption::CUSTOM(format!(
            "subtype={}",
            s.subtype.as_deref().unwrap_or("vmfs-mount")
        )),
    ];
    // A read-only image with clones still takes writes: to the clones.
    if !opened.live.writable && opened.clones.is_none() {
        options.push(MountOption::RO);
    }
    if s.default_permissions {
        options.push(MountOption::DefaultPermissions);
    }
    if s.auto_unmount {
        options.push(MountOption::AutoUnmount);
    }
    for flag in &s.kernel_flags {
        options.push(match *flag {
            "nodev" => MountOption::NoDev,
            "nosuid" => MountOption::NoSuid,
            "noexec" => MountOption::NoExec,
            _ => MountOption::NoAtime,
        });
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if s.allow_other {
        SessionACL::All
    } else if s.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(s.threads);
    config.clone_fd = true;
    config
}

/// The image's absolute path, shown as the mount's source (commas would split option lists).
fn source_name(opened: &Opened) -> String {
    let path = opened.live.spec.layers[0].path();
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    abs.display().to_string().replace(',', "_")
}

/// Closes every descriptor above stderr that the caller left open to us, so that the daemon
/// holds none of the caller's pipes. Called first thing, before we open anything ourselves.
pub fn close_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: nothing in this process owns these descriptors yet (the one read_dir used is
        // already closed, and closing it again just fails with EBADF).
        unsafe { libc::close(fd) };
    }
}

/// Points stdin at /dev/null and stdout/stderr at `out`.
fn redirect_output(out: &File) {
    // SAFETY: dup2 onto the standard descriptors; the sources are open files.
    unsafe {
        if let Ok(null) = File::open("/dev/null") {
            libc::dup2(null.as_raw_fd(), 0);
        }
        libc::dup2(out.as_raw_fd(), 1);
        libc::dup2(out.as_raw_fd(), 2);
    }
}

/// A close-on-exec pipe as (read end, write end).
fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe {
        Ok((
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        ))
    }
}
