//! A tiny Linux guest for the tests: the host's kernel (linux-image-amd64) and a static busybox
//! in an initramfs built here, booted with qemu-system-x86_64 under TCG. A test gives it disks
//! and a shell script; the script's output streams back line by line.
//!
//! ```ignore
//! mod guest;
//! let out = guest::Boot::new(&scratch_dir, "mkfs.ext4 -q /dev/vda || true; echo hello")
//!     .raw_disk(&mnt.join("disk.raw"))     // virtio, cache=none, aio=native, discard=unmap
//!     .run();                              // boots, runs the script, powers off
//! out.assert_ok();
//! assert_eq!(out.lines, ["hello"]);
//!
//! // Or watch it while it runs:
//! let mut vm = guest::Boot::new(&dir, script).raw_disk(&disk).spawn();
//! let line = vm.wait_for("SYNCED 3");      // panics at the boot's deadline
//! // ... kill something under the guest ...
//! let out = vm.finish();
//! ```
//!
//! The guest: `/init` mounts proc, sys and devtmpfs, loads virtio_blk and ext4 (with their
//! dependencies, decompressed on the host), switches to the root disk if [`Boot::root`] names
//! one (an ext4 made from [`root_tree`]), runs the script with `sh -e` with stdout and stderr
//! on the second serial port (the kernel's console goes to the first, kept in
//! `console.log` beside the initramfs for failure messages), prints `@@ JOB-EXIT <status>` and
//! powers off. Disks are `/dev/vda`, `/dev/vdb`, ... in the order given. Busybox provides the
//! usual tools (dd, sync FILE, sha256sum, fstrim, mount, ...); there is no e2fsck in the guest.
//! Needs qemu-system-x86_64, a kernel in /boot (readable: root) with modules in /lib/modules,
//! busybox-static, and xz for `.ko.xz` modules: `.ci/guest-deps.sh` installs them.

#![allow(dead_code)]

mod cpio;
pub mod ext4;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// What every boot shares: the kernel and the base initramfs (busybox, modules, /init).
pub struct Kit {
    pub kernel: PathBuf,
    pub release: String,
    base: Vec<u8>,
}

/// Modules the guest loads, in dependency order, unless built in. Optional ones may be absent.
const MODULES: &[(&str, bool)] = &[
    ("virtio_pci", true),
    ("virtio_blk", true),
    ("crc32c_generic", false),
    ("ext4", true),
];

/// First stage: modules, then either switch to the root disk or stay in the initramfs.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
  insmod /modules/$m.ko || echo "insmod $m failed"
done
if [ -f /rootdev ]; then
  mkdir -p /newroot
  if ! mount -t ext4 "$(cat /rootdev)" /newroot; then
    echo "@@ JOB-EXIT root-mount-failed" >/dev/ttyS1
    poweroff -f
  fi
  mount -t tmpfs run /newroot/run
  cp /job.sh /stage2 /newroot/run/
  mount --move /dev /newroot/dev
  mount --move /proc /newroot/proc
  mount --move /sys /newroot/sys
  exec switch_root /newroot /bin/sh /run/stage2 /run/job.sh
fi
exec /bin/sh /stage2 /job.sh
"#;

/// Second stage: the job, its exit status, a clean shutdown.
const STAGE2: &str = r#"export PATH=/bin
exec >/dev/ttyS1 2>&1
stty -F /dev/ttyS1 raw -echo 2>/dev/null
cd /tmp
sh -e "$1"
echo "@@ JOB-EXIT $?"
sync
mount -o remount,ro / 2>/dev/null
poweroff -f
"#;

/// Fills `dir` with a root file system the guest can boot into (`Boot::root`): busybox with
/// every applet linked in /bin and the directories the boot needs. Build an ext4 image of it
/// with `mkfs.ext4 -d dir`.
pub fn root_tree(dir: &Path) {
    for d in ["bin", "dev", "proc", "sys", "run", "tmp", "mnt"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
}

/// The kit, built once per test process.
pub fn kit() -> &'static Kit {
    static KIT: OnceLock<Kit> = OnceLock::new();
    KIT.get_or_init(|| {
        Kit::build().unwrap_or_else(|e| panic!("guest kit: {e}; run .ci/guest-deps.sh"))
    })
}

impl Kit {
    fn build() -> Result<Kit, String> {
        let (kernel, release) = newest_kernel()?;
        let modules = Path::new("/lib/modules").join(&release);
        let mut c = cpio::Cpio::default();
        for d in ["bin", "dev", "proc", "sys", "tmp", "mnt", "modules"] {
            c.dir(d);
        }
        c.char_dev("dev/console", 5, 1);
        let busybox = std::fs::read("/bin/busybox").map_err(|e| format!("/bin/busybox: {e}"))?;
        c.file("bin/busybox", 0o755, &busybox);
        c.symlink("bin/sh", "busybox");
        let mut order = Vec::new();
        for (path, name) in load_order(&modules)? {
            c.file(&format!("modules/{name}.ko"), 0o644, &decompress(&path)?);
            order.push(name);
        }
        c.file("modules/order", 0o644, order.join("\n").as_bytes());
        c.file("init", 0o755, INIT.as_bytes());
        c.file("stage2", 0o755, STAGE2.as_bytes());
        Ok(Kit {
            kernel,
            release,
            base: c.finish(),
        })
    }
}

/// The newest /boot/vmlinuz-* that has a module directory.
fn newest_kernel() -> Result<(PathBuf, String), String> {
    let mut found: Vec<(Vec<u64>, String)> = std::fs::read_dir("/boot")
        .map_err(|e| format!("/boot: {e}"))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            Path::new("/lib/modules")
                .join(&release)
                .join("modules.dep")
                .exists()
                .then(|| (version_key(&release), release))
        })
        .collect();
    found.sort();
    let (_, release) = found
        .pop()
        .ok_or("no /boot/vmlinuz-* with /lib/modules/<release>/modules.dep")?;
    Ok((
        Path::new("/boot").join(format!("vmlinuz-{release}")),
        release,
    ))
}

fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// "kernel/fs/ext4/ext4.ko.xz" -> "ext4" (dashes and underscores are the same to the kernel).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The module files to load, dependencies first, skipping built-in modules.
fn load_order(dir: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{}/{f}: {e}", dir.display()))
    };
    let builtin: HashSet<String> = read("modules.builtin")
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in read("modules.dep")?.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let list = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(path), (path.to_string(), list));
    }
    let mut order = Vec::new();
    let mut done = HashSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !done.insert(name.to_string()) {
            return;
        }
        if let Some((_, list)) = deps.get(name) {
            for d in list {
                visit(d, deps, done, order);
            }
            order.push(name.to_string());
        }
    }
    for &(name, required) in MODULES {
        if builtin.contains(name) {
            continue;
        }
        if !deps.contains_key(name) {
            if required {
                return Err(format!(
                    "module {name} is neither built in nor in modules.dep"
                ));
            }
            continue;
        }
        visit(name, &deps, &mut done, &mut order);
    }
    Ok(order
        .into_iter()
        .filter(|n| !builtin.contains(n))
        .map(|n| (dir.join(&deps[&n].0), n))
        .collect())
}

/// A module file's bytes, decompressed (busybox insmod hands the kernel the raw buffer).
fn decompress(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".zst") {
        return zstd::decode_all(&bytes[..]).map_err(|e| format!("{name}: {e}"));
    }
    if name.ends_with(".gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
            .map_err(|e| format!("{name}: {e}"))?;
        return Ok(out);
    }
    if name.ends_with(".xz") {
        let out = Command::new("xz")
            .args(["-dc", "--"])
            .arg(path)
            .output()
            .map_err(|e| format!("xz: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "xz -dc {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        return Ok(out.stdout);
    }
    Ok(bytes)
}

/// One boot: disks, a script, extra QEMU arguments.
pub struct Boot {
    dir: PathBuf,
    script: String,
    drives: Vec<String>,
    args: Vec<String>,
    root: Option<String>,
    mem_mib: u32,
    timeout: Duration,
}

/// Escapes a path for a QEMU option value.
fn qemu_path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").replace(',', ",,")
}

impl Boot {
    /// `dir` holds the initramfs and the console log of this boot (it must exist).
    pub fn new(dir: &Path, script: &str) -> Boot {
        Boot {
            dir: dir.to_path_buf(),
            script: script.to_string(),
            drives: Vec::new(),
            args: Vec::new(),
            root: None,
            mem_mib: 256,
            timeout: Duration::from_secs(300),
        }
    }

    /// A raw disk as a hypervisor would use `disk.raw`: virtio, cache=none, aio=native,
    /// discard=unmap.
    pub fn raw_disk(self, path: &Path) -> Boot {
        let spec = format!(
            "file={},format=raw,if=virtio,cache=none,aio=native,discard=unmap",
            qemu_path(path)
        );
        self.drive(&spec)
    }

    /// Any `-drive` specification (e.g. `file=...,format=vmdk,if=virtio`).
    pub fn drive(mut self, spec: &str) -> Boot {
        self.drives.push(spec.to_string());
        self
    }

    /// More QEMU arguments (a monitor socket, -incoming, ...).
    pub fn qemu_args(mut self, args: &[&str]) -> Boot {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Boots into the ext4 file system on `dev` (e.g. "/dev/vda", made from [`root_tree`]):
    /// the script runs there, and the root is remounted read-only before power-off.
    pub fn root(mut self, dev: &str) -> Boot {
        self.root = Some(dev.to_string());
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Boot {
        self.mem_mib = mib;
        self
    }

    /// Deadline for the whole boot (default 300 s): waits panic after it and QEMU is killed.
    pub fn timeout(mut self, t: Duration) -> Boot {
        self.timeout = t;
        self
    }

    /// Starts QEMU.
    pub fn spawn(self) -> Running {
        let kit = kit();
        let mut job = cpio::Cpio::default();
        job.file("job.sh", 0o755, self.script.as_bytes());
        if let Some(dev) = &self.root {
            job.file("rootdev", 0o644, dev.as_bytes());
        }
        let initrd = self.dir.join("initramfs.cpio");
        let mut bytes = kit.base.clone();
        bytes.extend_from_slice(&job.finish());
        std::fs::write(&initrd, bytes).unwrap();
        let console = self.dir.join("console.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-smp",
            "1",
            "-nodefaults",
            "-no-reboot",
        ])
        .args(["-display", "none", "-m", &self.mem_mib.to_string()])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .args([
            "-chardev",
            &format!("file,id=con,path={}", qemu_path(&console)),
        ])
        .args(["-serial", "chardev:con", "-serial", "stdio"]);
        for d in &self.drives {
            cmd.args(["-drive", d]);
        }
        cmd.args(&self.args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-system-x86_64: {e}; run .ci/guest-deps.sh"));
        let (tx, rx) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            rx,
            lines: Vec::new(),
            console,
            deadline: Instant::now() + self.timeout,
            exit: None,
        }
    }

    /// Boots, waits until the guest has powered off, and returns what the script printed.
    pub fn run(self) -> Output {
        self.spawn().finish()
    }
}

/// A running guest.
pub struct Running {
    child: Child,
    rx: Receiver<String>,
    lines: Vec<String>,
    console: PathBuf,
    deadline: Instant,
    exit: Option<i32>,
}

/// What a finished boot printed.
#[derive(Debug)]
pub struct Output {
    /// The script's output lines (without the final `@@ JOB-EXIT` line).
    pub lines: Vec<String>,
    /// The script's exit status, None when the guest never got to the end.
    pub exit: Option<i32>,
    /// The kernel console.
    pub console: String,
}

impl Output {
    /// Panics (showing the output and the console's end) unless the script exited with 0.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.exit,
            Some(0),
            "guest script failed:\n{}",
            self.describe()
        );
    }

    /// The lines starting with `prefix`, with the prefix removed.
    pub fn values(&self, prefix: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_string))
            .collect()
    }

    pub fn describe(&self) -> String {
        describe(&self.lines, &self.console)
    }
}

fn describe(lines: &[String], console: &str) -> String {
    let tail: Vec<&str> = console.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "--- script output ---\n{}\n--- end of the kernel console ---\n{}",
        lines.join("\n"),
        tail.join("\n")
    )
}

impl Running {
    /// The next line of the script's output, None once QEMU has closed it.
    pub fn next_line(&mut self) -> Option<String> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.fail("the guest's deadline passed");
            }
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(code) = line.strip_prefix("@@ JOB-EXIT ") {
                        self.exit = code.trim().parse().ok();
                        continue;
                    }
                    self.lines.push(line.clone());
                    return Some(line);
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits for an output line containing `pat` and returns it; panics if the guest ends first
    /// or the deadline passes.
    pub fn wait_for(&mut self, pat: &str) -> String {
        while let Some(line) = self.next_line() {
            if line.contains(pat) {
                return line;
            }
        }
        self.fail(&format!("the guest ended before printing {pat:?}"))
    }

    /// Every line so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Waits for the guest to power off (or QEMU to exit) and returns its output.
    pub fn finish(mut self) -> Output {
        while self.next_line().is_some() {}
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= self.deadline {
                self.fail("QEMU did not exit by the deadline");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        assert!(
            status.success(),
            "qemu-system-x86_64 failed ({status}): {stderr}\n{}",
            describe(&self.lines, &console)
        );
        Output {
            lines: std::mem::take(&mut self.lines),
            exit: self.exit,
            console,
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        panic!("{why}\n{}", describe(&self.lines, &console));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that panicked while the guest ran must not leave QEMU behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
