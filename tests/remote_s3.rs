//! Images in S3, mounted by `s3://` URL from a real S3 server (s3s-fs on 127.0.0.1, started
//! here): every view of chains of every format reads as the same chain mounted from local
//! files (and as `qemu-img convert`); a changed object gives EIO, never new bytes; a server
//! that goes away gives EIO and then recovers; the chunk cache keeps to --cache-max and is
//! shared by concurrent daemons; credentials stay out of logs and `--list`.
//!
//! `VMFS_S3_ENDPOINT` (with `VMFS_S3_ACCESS_KEY`, `VMFS_S3_SECRET_KEY`) runs these against
//! another S3 store instead (mount-scripts/garage-s3-tests.sh does that with Garage).

mod common;
mod mount_support;
mod remote_support;

use common::*;
use mount_support::*;
use remote_support::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const M: u64 = 1 << 20;

/// The S3 store under test: an s3s-fs started here, or the one `VMFS_S3_ENDPOINT` names.
struct Store {
    server: Option<S3Server>,
    remote: Option<Remote>,
}

struct Remote {
    endpoint: String,
    access: String,
    secret: String,
}

impl Store {
    fn start(root: &Path) -> Store {
        match std::env::var("VMFS_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => Store {
                server: None,
                remote: Some(Remote {
                    endpoint,
                    access: std::env::var("VMFS_S3_ACCESS_KEY").unwrap_or_default(),
                    secret: std::env::var("VMFS_S3_SECRET_KEY").unwrap_or_default(),
                }),
            },
            _ => Store {
                server: Some(S3Server::start(root)),
                remote: None,
            },
        }
    }

    fn server(&self) -> S3Client {
        match (&self.server, &self.remote) {
            (Some(s), _) => S3Client::new(&s.endpoint(), ACCESS_KEY, SECRET_KEY),
            (None, Some(r)) => S3Client::new(&r.endpoint, &r.access, &r.secret),
            _ => unreachable!(),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let c = self.server();
        vec![
            ("AWS_ACCESS_KEY_ID", c.access.clone()),
            ("AWS_SECRET_ACCESS_KEY", c.secret.clone()),
            ("AWS_ENDPOINT_URL", c.endpoint.clone()),
            (
                "AWS_REGION",
                std::env::var("VMFS_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
            ),
        ]
    }

    fn local_server(&mut self) -> Option<&mut S3Server> {
        self.server.as_mut()
    }
}

/// Writes `n` random runs into `image` (format `fmt`).
fn scribble(fmt: &str, image: &Path, rng: &mut Rng, size: u64, n: usize) {
    for _ in 0..n {
        let len = (rng.below(48) + 1) as usize * 16 * 1024;
        let off = rng.below((size - len as u64) / 512) * 512;
        write_random(fmt, image, rng, off, len);
    }
}

/// One chain per format, each in its own directory: (directory name, top file name).
fn make_chains(root: &Path, rng: &mut Rng) -> Vec<(String, String)> {
    let size = 24 * M;
    let s = size.to_string();
    let mut chains = Vec::new();
    // qcow2: compressed base, a middle layer, a top with an internal snapshot.
    let d = root.join("qcow2");
    std::fs::create_dir_all(&d).unwrap();
    let raw = d.join("seed.raw");
    std::fs::write(&raw, rng.bytes(size as usize)).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        d.join("base.qcow2").to_str().unwrap(),
    ]);
    std::fs::remove_file(&raw).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        d.join("mid.qcow2").to_str().unwrap(),
    ]);
    scribble("qcow2", &d.join("mid.qcow2"), rng, size, 6);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        d.join("top.qcow2").to_str().unwrap(),
    ]);
    scribble("qcow2", &d.join("top.qcow2"), rng, size, 4);
    qemu_img(&[
        "snapshot",
        "-c",
        "before",
        d.join("top.qcow2").to_str().unwrap(),
    ]);
    scribble("qcow2", &d.join("top.qcow2"), rng, size, 4);
    chains.push(("qcow2".into(), "top.qcow2".into()));
    // VMDK: a split sparse base (descriptor plus extent files) under a monolithic child.
    let d = root.join("vmdk");
    std::fs::create_dir_all(&d).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        d.join("base.vmdk").to_str().unwrap(),
        &s,
    ]);
    scribble("vmdk", &d.join("base.vmdk"), rng, size, 6);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        d.join("child.vmdk").to_str().unwrap(),
    ]);
    scribble("vmdk", &d.join("child.vmdk"), rng, size, 4);
    chains.push(("vmdk".into(), "child.vmdk".into()));
    // One dynamic image each of VHD, VHDX and VDI, and a raw one.
    for (fmt, file) in [
        ("vpc", "disk.vhd"),
        ("vhdx", "disk.vhdx"),
        ("vdi", "disk.vdi"),
        ("raw", "disk.img"),
    ] {
        let d = root.join(fmt);
        std::fs::create_dir_all(&d).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            fmt,
            d.join(file).to_str().unwrap(),
            &s,
        ]);
        scribble(fmt, &d.join(file), rng, size, 5);
        chains.push((fmt.into(), file.into()));
    }
    chains
}

#[test]
fn chains_of_every_format_read_like_their_local_copies() {
    let scratch = Scratch::new("s3-formats");
    let store = Store::start(&scratch.path("s3"));
    let client = store.server();
    let mut rng = Rng::new(0x5e3);
    let local = scratch.path("local");
    let chains = make_chains(&local, &mut rng);
    let cache = scratch.path("cache");
    for (dir, top) in &chains {
        client.put_dir(&local.join(dir), dir);
        let local_top = local.join(dir).join(top);
        let (_lg, lmnt) = mount_url(
            local_top.to_str().unwrap(),
            &scratch.path(&format!("l-{dir}")),
            &[],
            &["-r"],
        );
        let want = views(&lmnt);
        let url = format!("s3://{BUCKET}/{dir}/{top}");
        let cache_arg = format!("cache_dir={}", cache.display());
        let (_rg, rmnt) = mount_url(
            &url,
            &scratch.path(&format!("r-{dir}")),
            &store.env(),
            &["-o", &cache_arg],
        );
        assert_trees_equal(&url, &views(&rmnt), &want);
        let fmt = if dir == "vpc" { "vpc" } else { dir.as_str() };
        assert_same(
            &format!("{url} vs qemu-img"),
            &want["disk.raw"],
            &qemu_raw(&local_top, Some(fmt), &[]),
        );
    }
    // The qcow2 chain: two backing layers and the internal snapshot, all through S3.
    let (_g, mnt) = mount_url(
        &format!("s3://{BUCKET}/qcow2/top.qcow2"),
        &scratch.path("again"),
        &store.env(),
        &["-o", &format!("cache_dir={}", cache.display())],
    );
    assert_eq!(names_in(&mnt.join("snapshots")), ["base", "before", "mid"]);
}

/// A raw image of `size` random bytes uploaded as `key`; returns the bytes.
fn upload_raw(client: &S3Client, key: &str, rng: &mut Rng, size: usize) -> Vec<u8> {
    let data = rng.bytes(size);
    client.put(key, &data);
    data
}

#[test]
fn an_overwritten_object_gives_eio_and_never_new_bytes() {
    let scratch = Scratch::new("s3-changed");
    let store = Store::start(&scratch.path("s3"));
    let client = store.server();
    let mut rng = Rng::new(77);
    let old = upload_raw(&client, "vm/disk.img", &mut rng, (64 * M) as usize);
    let log = scratch.path("daemon.log");
    let opts = format!(
        "cache_dir={},remote_retries=1",
        scratch.path("cache").display()
    );
    let (_g, mnt) = mount_url(
        &format!("s3://{BUCKET}/vm/disk.img"),
        &scratch.path("mnt"),
        &store.env(),
        &["-v", "--log-file", log.to_str().unwrap(), "-o", &opts],
    );
    let disk = mnt.join("disk.raw");
    assert_eq!(read_at(&disk, 0, M as usize).unwrap(), old[..M as usize]);
    let new = rng.bytes(old.len());
    client.put("vm/disk.img", &new);
    // Far from what was read, so read-ahead has not fetched it yet.
    let e = read_at(&disk, 60 * M, 4096).unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
    // What was read before the change still reads as the version that was opened.
    assert_eq!(read_at(&disk, 4096, 4096).unwrap(), old[4096..8192]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("s3://{BUCKET}/vm/disk.img")) && text.contains("changed"),
        "the log names the object and says it changed:\n{text}"
    );
    // A missing object: EIO as well.
    client.delete("vm/disk.img");
    let e = read_at(&disk, 50 * M, 4096).unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
}

#[test]
fn a_server_that_goes_away_gives_eio_then_reads_recover() {
    let scratch = Scratch::new("s3-down");
    let mut store = Store::start(&scratch.path("s3"));
    if store.local_server().is_none() {
        return; // An external store cannot be stopped from here.
    }
    let client = store.server();
    let mut rng = Rng::new(78);
    let data = upload_raw(&client, "vm/disk.img", &mut rng, (16 * M) as usize);
    let opts = format!(
        "cache_dir={},remote_retries=2,remote_timeout=2",
        scratch.path("cache").display()
    );
    let (_g, mnt) = mount_url(
        &format!("s3://{BUCKET}/vm/disk.img"),
        &scratch.path("mnt"),
        &store.env(),
        &["-o", &opts],
    );
    let disk = mnt.join("disk.raw");
    assert_eq!(read_at(&disk, 0, 4096).unwrap(), data[..4096]);
    store.local_server().unwrap().stop();
    let started = Instant::now();
    let e = read_at(&disk, 9 * M, 65536).unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retries are bounded"
    );
    store.local_server().unwrap().resume();
    assert_eq!(
        read_at(&disk, 9 * M, 65536).unwrap(),
        data[(9 * M) as usize..(9 * M) as usize + 65536]
    );
    assert_same(
        "whole disk after recovery",
        &std::fs::read(&disk).unwrap(),
        &data,
    );
}

/// Bytes in the entries under a cache directory.
fn cache_usage(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| {
                        let m = e.metadata().unwrap();
                        if m.is_dir() { walk(&e.path()) } else { m.len() }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir)
}

#[test]
fn the_cache_keeps_to_its_limit_and_concurrent_daemons_share_it() {
    let scratch = Scratch::new("s3-cache");
    let store = Store::start(&scratch.path("s3"));
    let client = store.server();
    let mut rng = Rng::new(79);
    let data = upload_raw(&client, "vm/disk.img", &mut rng, (24 * M) as usize);
    let url = format!("s3://{BUCKET}/vm/disk.img");
    // A small cache: reading 24 MiB through it keeps it near 6 MiB.
    let small = scratch.path("small");
    {
        let opts = format!("cache_dir={},cache_max=6M", small.display());
        let (_g, mnt) = mount_url(&url, &scratch.path("m0"), &store.env(), &["-o", &opts]);
        assert_same(
            "through a small cache",
            &std::fs::read(mnt.join("disk.raw")).unwrap(),
            &data,
        );
        let used = cache_usage(&small);
        assert!(
            used > 0 && used <= 6 * M + M,
            "cache holds {used} bytes, limit 6 MiB"
        );
    }
    // Two daemons on one cache directory, reading at the same time, then one more after.
    let shared = scratch.path("shared");
    let opts = format!("cache_dir={}", shared.display());
    let logs: Vec<PathBuf> = (0..3).map(|i| scratch.path(&format!("d{i}.log"))).collect();
    {
        let mounts: Vec<_> = (0..2)
            .map(|i| {
                mount_url(
                    &url,
                    &scratch.path(&format!("m{}", i + 1)),
                    &store.env(),
                    &["-v", "--log-file", logs[i].to_str().unwrap(), "-o", &opts],
                )
            })
            .collect();
        std::thread::scope(|s| {
            for (_, mnt) in &mounts {
                let data = &data;
                s.spawn(move || {
                    assert_same(
                        "concurrent daemon",
                        &std::fs::read(mnt.join("disk.raw")).unwrap(),
                        data,
                    )
                });
            }
        });
    }
    let (g, mnt) = mount_url(
        &url,
        &scratch.path("m3"),
        &store.env(),
        &["-v", "--log-file", logs[2].to_str().unwrap(), "-o", &opts],
    );
    assert_same(
        "from the shared cache",
        &std::fs::read(mnt.join("disk.raw")).unwrap(),
        &data,
    );
    unmount(&mnt);
    drop(g);
    let first_two = fetched_from_log(&logs[0], &url) + fetched_from_log(&logs[1], &url);
    assert!(
        first_two >= data.len() as u64,
        "the first two fetched the object: {first_two}"
    );
    let third = fetched_from_log(&logs[2], &url);
    assert!(
        third < M,
        "a daemon after them fetched {third} bytes instead of reading the cache"
    );
    // --list shows what is cached.
    let out = Command::new(BIN)
        .args(["--list", "--json", "-o", &opts, &url])
        .envs(store.env().iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("\"cached_bytes\":{}", data.len())),
        "{text}"
    );
}

#[test]
fn credentials_stay_out_of_logs_errors_and_list() {
    let scratch = Scratch::new("s3-secrets");
    let store = Store::start(&scratch.path("s3"));
    let client = store.server();
    let mut rng = Rng::new(80);
    upload_raw(&client, "vm/disk.img", &mut rng, (2 * M) as usize);
    let log = scratch.path("trace.log");
    let opts = format!("cache_dir={}", scratch.path("cache").display());
    let url = format!("s3://{BUCKET}/vm/disk.img");
    {
        let mut env = store.env();
        env.push(("RUST_LOG", "trace".into()));
        let (_g, mnt) = mount_url(
            &url,
            &scratch.path("mnt"),
            &env,
            &["-vvv", "--log-file", log.to_str().unwrap(), "-o", &opts],
        );
        std::fs::read(mnt.join("disk.raw")).unwrap();
    }
    let list = Command::new(BIN)
        .args(["--list", "-vvv", "-o", &opts, &url])
        .envs(store.env().iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    // Wrong credentials: the error says so without showing them.
    let mut bad = store.env();
    bad.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    bad.push(("AWS_SECRET_ACCESS_KEY", "wrong-secret-4242".into()));
    let denied = Command::new(BIN)
        .args(["--list", "-o", &opts, &url])
        .envs(bad.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!denied.status.success());
    let denied_text = String::from_utf8_lossy(&denied.stderr).to_string();
    assert!(denied_text.contains("403"), "{denied_text}");
    let secret = store
        .env()
        .iter()
        .find(|(k, _)| *k == "AWS_SECRET_ACCESS_KEY")
        .unwrap()
        .1
        .clone();
    let access = store
        .env()
        .iter()
        .find(|(k, _)| *k == "AWS_ACCESS_KEY_ID")
        .unwrap()
        .1
        .clone();
    for (what, text) in [
        ("the trace log", std::fs::read_to_string(&log).unwrap()),
        (
            "--list",
            String::from_utf8_lossy(&list.stdout).to_string()
                + &String::from_utf8_lossy(&list.stderr),
        ),
        ("the error", denied_text),
    ] {
        for s in [
            secret.as_str(),
            access.as_str(),
            "wrong-secret-4242",
            "X-Amz-Signature",
            "X-Amz-Credential",
        ] {
            assert!(!text.contains(s), "{what} shows {s:?}:\n{text}");
        }
    }
}

#[test]
fn references_that_leave_the_bucket_are_refused() {
    let scratch = Scratch::new("s3-refs");
    let store = Store::start(&scratch.path("s3"));
    let client = store.server();
    let local = scratch.path("l");
    std::fs::create_dir_all(&local).unwrap();
    let secret_file = scratch.path("secret.raw");
    std::fs::write(&secret_file, vec![0x5a; 1 << 20]).unwrap();
    for (name, backing) in [
        ("abs.qcow2", secret_file.to_str().unwrap().to_string()),
        ("up.qcow2", "../../../x.raw".to_string()),
        ("other.qcow2", "s3://other-bucket/x.raw".to_string()),
        ("http.qcow2", "http://127.0.0.1:9/x.raw".to_string()),
    ] {
        let p = local.join(name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &backing,
            "-F",
            "raw",
            p.to_str().unwrap(),
            "1M",
        ]);
        client.put(&format!("vm/{name}"), &std::fs::read(&p).unwrap());
        let out = Command::new(BIN)
            .args(["--list", &format!("s3://{BUCKET}/vm/{name}")])
            .envs(store.env().iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {err}");
        assert!(
            err.contains("refused") || err.contains("outside"),
            "{name}: {err}"
        );
    }
    // A local image naming a URL nobody named on the command line is refused too.
    let local_top = local.join("local.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &format!("s3://{BUCKET}/vm/abs.qcow2"),
        "-F",
        "qcow2",
        local_top.to_str().unwrap(),
        "1M",
    ]);
    let out = Command::new(BIN)
        .args(["--list", local_top.to_str().unwrap()])
        .envs(store.env().iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("named on the command line"));
}

#[test]
fn an_overlay_makes_a_remote_chain_writable_without_touching_it() {
    let scratch = Scratch::new("s3-overlay");
    let store = Store::start(&scratch.path("s3"));
    let client = store.server();
    let mut rng = Rng::new(81);
    let local = scratch.path("l");
    std::fs::create_dir_all(&local).unwrap();
    let base = local.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    let mut model = vec![0u8; (8 * M) as usize];
    let d = write_random("qcow2", &base, &mut rng, 0, (3 * M) as usize);
    model[..d.len()].copy_from_slice(&d);
    client.put("vm/base.qcow2", &std::fs::read(&base).unwrap());
    let url = format!("s3://{BUCKET}/vm/base.qcow2");
    let overlay = scratch.path("over.qcow2");
    let opts = format!("cache_dir={}", scratch.path("cache").display());
    // Without --overlay the mount is read-only, and says why.
    let out = Command::new(BIN)
        .args(["--list", "--json", "-o", &opts, &url])
        .envs(store.env().iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"writable\":false"));
    for round in 0..2 {
        let (g, mnt) = mount_url(
            &url,
            &scratch.path("mnt"),
            &store.env(),
            &["--overlay", overlay.to_str().unwrap(), "-o", &opts],
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("disk.raw"))
            .unwrap();
        let patch = rng.bytes(100_000);
        let at = M + 12345 + round * 3 * M;
        f.write_all_at(&patch, at).unwrap();
        f.sync_all().unwrap();
        drop(f);
        model[at as usize..at as usize + patch.len()].copy_from_slice(&patch);
        assert_same(
            "overlay over S3",
            &std::fs::read(mnt.join("disk.raw")).unwrap(),
            &model,
        );
        unmount(&mnt);
        drop(g);
    }
    let info = qemu_img(&["info", "--output=json", "-U", overlay.to_str().unwrap()]);
    assert!(
        info.contains(&format!("\"backing-filename\": \"{url}\"")),
        "{info}"
    );
    assert_same(
        "the object is untouched",
        &read_back(&client, "vm/base.qcow2"),
        &std::fs::read(&base).unwrap(),
    );
}

fn read_back(client: &S3Client, key: &str) -> Vec<u8> {
    client.get(key)
}
