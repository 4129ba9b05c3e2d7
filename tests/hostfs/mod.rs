//! hostfs: a test-only FUSE passthrough file system that records the host I/O made through it
//! and fails it on demand. Mount it over a scratch directory, put the image files under it, point
//! the daemon (or the library) at them, and watch or break what reaches the "disk".
//!
//! ```ignore
//! mod hostfs;
//! use hostfs::{Fault, HostFs, Op};
//!
//! let s = Scratch::new("my-test");                    // declare before the HostFs: drops after it
//! let fs = HostFs::mount(&s.path("backing"), &s.path("host"));
//! let image = fs.path("top.qcow2");                   // a path under the mount
//! // ... create the image, mount the daemon on it ...
//!
//! // (a) Recording: every write, truncate, fallocate and fsync/fdatasync, in completion order.
//! fs.start_recording();
//! // ... write and flush through disk.raw ...
//! let events = fs.stop_recording();
//! for e in &events {
//!     match &e.op {
//!         Op::Write { off, data } => { /* e.file, *off, data */ }
//!         Op::Fsync { datasync } => { /* barrier for e.file */ }
//!         _ => {}
//!     }
//! }
//!
//! // (b) Faults: switchable at any moment, matched against every operation.
//! let id = fs.inject(Fault::write(libc::ENOSPC).file("top.qcow2").after(3).times(1));
//! // ... the 4th write to top.qcow2 from now fails with ENOSPC, later ones succeed ...
//! assert_eq!(fs.hits(id), 1);
//! fs.clear_faults();
//! ```
//!
//! Recording. [`Event::file`] is the path relative to the backing directory ("a/b.qcow2").
//! Each operation takes a sequence number when it starts (`started`) and another when it has
//! completed on the backing file (`completed`), both from one counter; events are listed in
//! completion order. So the barrier of a flush is well defined: [`Event::covered_by`] says
//! whether a write had completed before a flush of the same file started, i.e. whether it is
//! durable once the flush returns. Writes that overlap a flush in time are not covered.
//! Failed operations (injected or real errors) are recorded too, with `result: Err(errno)`.
//! [`Event::apply`] replays an event on a copy of the file, to build crash states.
//!
//! Every file is opened with `direct_io`: no page cache, each `pwrite` of the caller arrives
//! as one write here, except that a write spanning more pages of the caller's buffer than one
//! FUSE request takes (256 pages by default, `fs.fuse.max_pages_limit`: 1 MiB when the buffer
//! is page-aligned, less otherwise) arrives as consecutive pieces in order, each recorded (and
//! faultable) on its own. `O_DIRECT` from the caller is accepted (the backing file is opened without it).
//! Locks (`fcntl`, OFD) are handled by the kernel locally, so QEMU-style image locks work.
//!
//! Faults. A [`Fault`] matches operations by kind (write, fsync, truncate, fallocate, read),
//! optionally by file name and by byte range, or only writes that grow the file; of the
//! matching operations it lets the first `after` pass, then fails `times` of them (default:
//! all) with its errno, without touching the backing file. Rules are checked in the order they
//! were injected; the first that fires decides.

#![allow(dead_code)]

mod fs;

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A mounted hostfs; unmounts on drop.
pub struct HostFs {
    mnt: PathBuf,
    backing: PathBuf,
    state: Arc<fs::State>,
    session: Option<fuser::BackgroundSession>,
}

/// One recorded host operation.
#[derive(Clone, Debug)]
pub struct Event {
    /// Path relative to the backing directory, '/'-separated.
    pub file: String,
    pub op: Op,
    /// Sequence number taken when the operation arrived.
    pub started: u64,
    /// Sequence number taken when it had completed (same counter as `started`).
    pub completed: u64,
    /// Ok, or the errno the caller got.
    pub result: Result<(), i32>,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        off: u64,
        data: Vec<u8>,
    },
    /// fsync (`datasync: false`) or fdatasync.
    Fsync {
        datasync: bool,
    },
    /// truncate/ftruncate to this length.
    SetLen(u64),
    /// fallocate(2) with this mode (0, FALLOC_FL_PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, ...).
    Fallocate {
        mode: i32,
        off: u64,
        len: u64,
    },
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The bytes themselves would drown any assertion message.
            Op::Write { off, data } => write!(f, "Write({off}+{})", data.len()),
            Op::Fsync { datasync } => write!(f, "Fsync(datasync={datasync})"),
            Op::SetLen(n) => write!(f, "SetLen({n})"),
            Op::Fallocate { mode, off, len } => write!(f, "Fallocate({mode:#x}, {off}+{len})"),
        }
    }
}

impl Event {
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }

    pub fn is_fsync(&self) -> bool {
        matches!(self.op, Op::Fsync { .. })
    }

    /// Whether this operation is durable once `flush` (a successful fsync/fdatasync of the same
    /// file) has returned: it succeeded and completed before the flush started.
    pub fn covered_by(&self, flush: &Event) -> bool {
        flush.is_fsync()
            && flush.ok()
            && self.ok()
            && !self.is_fsync()
            && self.file == flush.file
            && self.completed < flush.started
    }

    /// Replays a successful write, truncate or fallocate on `file` (a copy of the backing file
    /// taken before recording started). Fsyncs and failed operations change nothing.
    pub fn apply(&self, file: &std::fs::File) -> std::io::Result<()> {
        if !self.ok() {
            return Ok(());
        }
        match &self.op {
            Op::Write { off, data } => file.write_all_at(data, *off),
            Op::Fsync { .. } => Ok(()),
            Op::SetLen(len) => file.set_len(*len),
            Op::Fallocate { mode, off, len } => fs::fallocate(file, *mode, *off, *len),
        }
    }
}

/// Kinds of operations a [`Fault`] can match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Write,
    Fsync,
    SetLen,
    Fallocate,
    Read,
}

/// A fault-injection rule; build with [`Fault::write`] etc., then narrow it down.
#[derive(Clone, Debug)]
pub struct Fault {
    kinds: Vec<Kind>,
    errno: i32,
    file: Option<String>,
    offsets: Option<Range<u64>>,
    growing: bool,
    after: u64,
    times: Option<u64>,
}

impl Fault {
    pub fn new(kinds: &[Kind], errno: i32) -> Fault {
        Fault {
            kinds: kinds.to_vec(),
            errno,
            file: None,
            offsets: None,
            growing: false,
            after: 0,
            times: None,
        }
    }

    /// Fails writes.
    pub fn write(errno: i32) -> Fault {
        Fault::new(&[Kind::Write], errno)
    }

    /// Fails fsync and fdatasync.
    pub fn fsync(errno: i32) -> Fault {
        Fault::new(&[Kind::Fsync], errno)
    }

    /// Fails everything that changes or syncs a file: writes, fsyncs, truncates, fallocates.
    pub fn any_update(errno: i32) -> Fault {
        Fault::new(
            &[Kind::Write, Kind::Fsync, Kind::SetLen, Kind::Fallocate],
            errno,
        )
    }

    /// Fails reads.
    pub fn read(errno: i32) -> Fault {
        Fault::new(&[Kind::Read], errno)
    }

    /// Only operations on this file: its relative path, or its last component.
    pub fn file(mut self, name: &str) -> Fault {
        self.file = Some(name.to_string());
        self
    }

    /// Only reads, writes and fallocates that touch these bytes (others always match).
    pub fn offsets(mut self, range: Range<u64>) -> Fault {
        self.offsets = Some(range);
        self
    }

    /// Only writes and fallocates that make the file longer, and truncates that grow it: a full
    /// disk that still lets allocated blocks be overwritten.
    pub fn growing(mut self) -> Fault {
        self.growing = true;
        self
    }

    /// Lets the first `n` matching operations pass.
    pub fn after(mut self, n: u64) -> Fault {
        self.after = n;
        self
    }

    /// Then fails `n` of them (default: every one from then on).
    pub fn times(mut self, n: u64) -> Fault {
        self.times = Some(n);
        self
    }
}

/// Identifies an injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultId(usize);

impl HostFs {
    /// Creates `backing` and `mnt` if needed and mounts a passthrough of `backing` on `mnt`.
    /// Panics when the mount fails (the tests need /dev/fuse and root or fusermount3).
    pub fn mount(backing: &Path, mnt: &Path) -> HostFs {
        std::fs::create_dir_all(backing).unwrap();
        std::fs::create_dir_all(mnt).unwrap();
        let backing = backing.canonicalize().unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let state = Arc::new(fs::State::new(backing.clone()));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("hostfs".into()),
            fuser::MountOption::Subtype("hostfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(4);
        config.clone_fd = true;
        let session = fuser::spawn_mount(fs::PassFs(state.clone()), &mnt, &config)
            .unwrap_or_else(|e| panic!("hostfs: mounting {}: {e}", mnt.display()));
        HostFs {
            mnt,
            backing,
            state,
            session: Some(session),
        }
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.mnt
    }

    /// `name` under the mount point (what the code under test should use).
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// `name` in the backing directory (bypasses recording and faults).
    pub fn backing_path(&self, name: &str) -> PathBuf {
        self.backing.join(name)
    }

    /// A fresh number from the counter that orders events (`started`/`completed`): taken
    /// before and after an operation of the caller, it places that operation among the host
    /// operations (e.g. a guest fsync that returned before a given host write started).
    pub fn mark(&self) -> u64 {
        self.state
            .seq
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Starts a fresh recording (dropping any earlier one).
    pub fn start_recording(&self) {
        self.state.log.lock().unwrap().events = Some(Vec::new());
    }

    /// Stops recording and returns the events in completion order.
    pub fn stop_recording(&self) -> Vec<Event> {
        self.state
            .log
            .lock()
            .unwrap()
            .events
            .take()
            .unwrap_or_default()
    }

    /// The events recorded so far (recording goes on).
    pub fn events(&self) -> Vec<Event> {
        self.state
            .log
            .lock()
            .unwrap()
            .events
            .clone()
            .unwrap_or_default()
    }

    /// Adds a rule; it applies to operations that arrive from now on.
    pub fn inject(&self, fault: Fault) -> FaultId {
        let mut rules = self.state.faults.lock().unwrap();
        rules.push(Some(fs::Rule::new(fault)));
        FaultId(rules.len() - 1)
    }

    /// Removes one rule (its counts stay readable through `hits`).
    pub fn remove(&self, id: FaultId) {
        if let Some(r) = self
            .state
            .faults
            .lock()
            .unwrap()
            .get_mut(id.0)
            .and_then(|r| r.as_mut())
        {
            r.removed = true;
        }
    }

    /// Removes every rule.
    pub fn clear_faults(&self) {
        for r in self.state.faults.lock().unwrap().iter_mut().flatten() {
            r.removed = true;
        }
    }

    /// How many operations rule `id` has failed so far.
    pub fn hits(&self, id: FaultId) -> u64 {
        self.rule_counts(id).1
    }

    /// How many operations rule `id` has matched so far (passed or failed).
    pub fn matched(&self, id: FaultId) -> u64 {
        self.rule_counts(id).0
    }

    fn rule_counts(&self, id: FaultId) -> (u64, u64) {
        let rules = self.state.faults.lock().unwrap();
        match rules.get(id.0).and_then(|r| r.as_ref()) {
            Some(r) => (r.matched, r.failed),
            None => (0, 0),
        }
    }
}

impl Drop for HostFs {
    fn drop(&mut self) {
        // Unmount ourselves, lazily if something still holds files open, then let the session
        // go (its own unmount attempt then finds nothing mounted).
        let quiet = |cmd: &mut Command| {
            cmd.stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // SAFETY: geteuid has no preconditions.
        let (cmd, plain, lazy) = if unsafe { libc::geteuid() } == 0 {
            ("umount", "--", "-l")
        } else {
            ("fusermount3", "-u", "-uz")
        };
        if !quiet(Command::new(cmd).arg(plain).arg(&self.mnt)) {
            quiet(Command::new(cmd).arg(lazy).arg(&self.mnt));
        }
        drop(self.session.take());
    }
}
