//! Images served over HTTP by a real nginx (on 127.0.0.1, started here), mounted by URL:
//! every view reads as the same chain mounted from local files and as `qemu-img convert`; a
//! replaced file gives EIO; a server without range support is refused at mount time; a
//! reference that would leave the host is refused.

mod common;
mod mount_support;
mod remote_support;

use common::*;
use mount_support::*;
use remote_support::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;

const M: u64 = 1 << 20;

#[test]
fn chains_over_http_read_like_their_local_copies() {
    let scratch = Scratch::new("http-chains");
    let www = scratch.path("www");
    // Made in "vm", then renamed to a name with a space (qemu-io takes no such paths).
    let vm = www.join("vm");
    std::fs::create_dir_all(&vm).unwrap();
    let mut rng = Rng::new(0x477);
    let size = 20 * M;
    // qcow2: base <- top, and a VMDK whose sparse extents are separate files.
    let base = vm.join("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        &size.to_string(),
    ]);
    for _ in 0..5 {
        let off = rng.below(size / M - 2) * M + rng.below(1000) * 512;
        let len = (rng.below(900) + 1) as usize * 1024;
        write_random("qcow2", &base, &mut rng, off, len);
    }
    let top = vm.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    for _ in 0..4 {
        let off = rng.below(size / M - 2) * M;
        let len = (rng.below(300) + 1) as usize * 4096;
        write_random("qcow2", &top, &mut rng, off, len);
    }
    let vmdk = vm.join("split.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentFlat",
        vmdk.to_str().unwrap(),
        &size.to_string(),
    ]);
    write_random("vmdk", &vmdk, &mut rng, 3 * M + 512, (2 * M) as usize);
    let vm = www.join("vm images");
    std::fs::rename(www.join("vm"), &vm).unwrap();
    let server = Nginx::start(&www, &scratch.path("nginx"), "");
    let cache = format!("cache_dir={}", scratch.path("cache").display());
    for (file, fmt) in [("top.qcow2", "qcow2"), ("split.vmdk", "vmdk")] {
        let local = vm.join(file);
        let (_l, lmnt) = mount_url(
            local.to_str().unwrap(),
            &scratch.path(&format!("l-{file}")),
            &[],
            &["-r"],
        );
        let want = views(&lmnt);
        // The space in the directory name travels percent-encoded.
        let url = server.url(&format!("vm%20images/{file}"));
        let (_r, rmnt) = mount_url(
            &url,
            &scratch.path(&format!("r-{file}")),
            &[],
            &["-o", &cache],
        );
        let got = views(&rmnt);
        assert_trees_equal(&url, &got, &want);
        assert_same(
            &format!("{url} vs qemu-img"),
            &want["disk.raw"],
            &qemu_raw(&local, Some(fmt), &[]),
        );
    }
}

#[test]
fn a_replaced_file_gives_eio() {
    let scratch = Scratch::new("http-replaced");
    let www = scratch.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let mut rng = Rng::new(0x478);
    let old = rng.bytes((40 * M) as usize);
    std::fs::write(www.join("disk.img"), &old).unwrap();
    let server = Nginx::start(&www, &scratch.path("nginx"), "");
    let cache = format!(
        "cache_dir={},remote_retries=0",
        scratch.path("cache").display()
    );
    let (_g, mnt) = mount_url(
        &server.url("disk.img"),
        &scratch.path("mnt"),
        &[],
        &["-o", &cache],
    );
    let f = File::open(mnt.join("disk.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, old[..4096]);
    // Replace the file (a new inode and mtime: nginx's ETag changes).
    let tmp = www.join("disk.img.new");
    std::fs::write(&tmp, rng.bytes(old.len())).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(later)
        .unwrap();
    std::fs::rename(&tmp, www.join("disk.img")).unwrap();
    let e = f.read_exact_at(&mut buf, 30 * M).unwrap_err();
    assert_eq!(errno_of(&e), libc::EIO, "{e}");
}

#[test]
fn servers_without_ranges_and_references_off_the_host_are_refused() {
    let scratch = Scratch::new("http-refused");
    let www = scratch.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = www.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    // max_ranges 0: nginx answers every ranged GET with the whole file.
    let plain = Nginx::start(&www, &scratch.path("nginx-plain"), "max_ranges 0;");
    let out = list(&plain.url("disk.qcow2"), &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("does not support range requests"), "{err}");
    let mnt = scratch.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let status = Command::new(BIN)
        .arg(plain.url("disk.qcow2"))
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(!status.success() && !is_mounted(&mnt));
    drop(plain);
    let server = Nginx::start(&www, &scratch.path("nginx"), "");
    // Missing objects name the URL.
    let out = list(&server.url("nope.qcow2"), &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&server.url("nope.qcow2")) && err.contains("no such object"),
        "{err}"
    );
    for (name, backing) in [
        (
            "other-host.qcow2",
            "http://127.0.0.2:1/base.qcow2".to_string(),
        ),
        ("local-file.qcow2", img.to_str().unwrap().to_string()),
        ("parent-dir.qcow2", "../base.qcow2".to_string()),
    ] {
        let p = www.join(name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &backing,
            "-F",
            "qcow2",
            p.to_str().unwrap(),
            "4M",
        ]);
        let out = list(&server.url(name), &[], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}");
        assert!(
            err.contains("refused") || err.contains("outside"),
            "{name}: {err}"
        );
    }
    // The same backing name relative to the URL is fine.
    let ok = www.join("beside.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk.qcow2",
        "-F",
        "qcow2",
        ok.to_str().unwrap(),
    ]);
    let out = list(&server.url("beside.qcow2"), &[], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&server.url("disk.qcow2")));
}

#[test]
fn query_strings_are_sent_never_shown_and_key_the_cache_without_their_signature() {
    let scratch = Scratch::new("http-query");
    let www = scratch.path("www");
    std::fs::create_dir_all(&www).unwrap();
    let mut rng = Rng::new(0x479);
    let data = rng.bytes((4 * M) as usize);
    std::fs::write(www.join("disk.img"), &data).unwrap();
    let server = Nginx::start(&www, &scratch.path("nginx"), "");
    let cache = scratch.path("cache");
    let opts = format!("cache_dir={}", cache.display());
    let secret = "Sig0123456789secret";
    let base = server.url("disk.img");
    // Mounts base?QUERY, reads it all, unmounts; gives the bytes fetched.
    let read_all = |query: &str, name: &str| -> u64 {
        let url = format!("{base}?{query}");
        let log = scratch.path(&format!("{name}.log"));
        let (g, mnt) = mount_url(
            &url,
            &scratch.path("mnt"),
            &[],
            &["-v", "--log-file", log.to_str().unwrap(), "-o", &opts],
        );
        assert_same(name, &std::fs::read(mnt.join("disk.raw")).unwrap(), &data);
        unmount(&mnt);
        drop(g);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains(secret),
            "{name}: the log shows the query:\n{text}"
        );
        fetched_from_log(&log, &format!("{base}?..."))
    };
    let first = read_all(&format!("versionId=1&X-Amz-Signature={secret}1"), "first");
    assert!(first >= data.len() as u64, "fetched {first}");
    // Signed again: the same object, read from the cache.
    let resigned = read_all(
        &format!("X-Amz-Date=20260101T000000Z&versionId=1&X-Amz-Signature={secret}2"),
        "resigned",
    );
    assert_eq!(resigned, 0, "a re-signed URL reuses the cache");
    // Another query may be another object: nothing is shared.
    let other = read_all(&format!("versionId=2&X-Amz-Signature={secret}3"), "other");
    assert!(other >= data.len() as u64, "fetched {other}");
    let out = list(
        &format!("{base}?versionId=1&X-Amz-Signature={secret}4"),
        &[],
        &["-o", &opts],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("{base}?...")), "{text}");
    assert!(!text.contains(secret), "--list shows the query:\n{text}");
    // Nor does the cache keep it in the clear.
    let out = Command::new("grep")
        .args(["-r", "-l", secret])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
