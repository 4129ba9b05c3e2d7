//! Real servers for the remote-layer tests, on 127.0.0.1 ports of their own, started here and
//! stopped by their PID: s3s-fs (an S3 server over a directory) and nginx (HTTP with ranges).
//! Objects are uploaded with signed PUTs, so the S3 server records their ETags as AWS would.
#![allow(dead_code)]

mod mounting;
pub use mounting::*;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "vmfstestaccess";
pub const SECRET_KEY: &str = "vmfs-test-secret-0123456789";
pub const BUCKET: &str = "images";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within 20 s");
}

fn stop_child(child: &mut Child) {
    // SIGTERM first: nginx's master then stops its workers.
    // SAFETY: kill(2) on the PID of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The s3s-fs binary: on PATH or in ~/.cargo/bin (`.ci/run` installs it).
fn s3s_fs() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = Path::new(&home).join(".cargo/bin/s3s-fs");
    if cargo_bin.exists() {
        return cargo_bin;
    }
    let found = Command::new("sh")
        .args(["-c", "command -v s3s-fs"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    found.unwrap_or_else(|| {
        panic!(
            "s3s-fs is not installed: cargo install s3s-fs --version 0.14.1 --features binary \
             (.ci/run does this)"
        )
    })
}

/// An s3s-fs server over `root`.
pub struct S3Server {
    pub port: u16,
    root: PathBuf,
    child: Option<Child>,
}

impl S3Server {
    pub fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root).unwrap();
        let mut s = S3Server {
            port: free_port(),
            root: root.to_path_buf(),
            child: None,
        };
        s.resume();
        s.client().create_bucket(BUCKET);
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server (the objects stay in its directory).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }

    /// Starts it again on the same port.
    pub fn resume(&mut self) {
        let mut child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(self.port, &mut child, "s3s-fs");
        self.child = Some(child);
    }

    pub fn client(&self) -> S3Client {
        S3Client::new(&self.endpoint(), ACCESS_KEY, SECRET_KEY)
    }
}

/// Signed requests to an S3 store: what the tests upload, replace and delete.
pub struct S3Client {
    pub endpoint: String,
    pub access: String,
    pub secret: String,
}

impl S3Client {
    pub fn new(endpoint: &str, access: &str, secret: &str) -> S3Client {
        S3Client {
            endpoint: endpoint.to_string(),
            access: access.to_string(),
            secret: secret.to_string(),
        }
    }

    fn bucket(&self, name: &str) -> Bucket {
        let region = std::env::var("VMFS_S3_REGION").unwrap_or_else(|_| "us-east-1".into());
        Bucket::new(
            self.endpoint.parse().unwrap(),
            UrlStyle::Path,
            name.to_string(),
            region,
        )
        .unwrap()
    }

    fn creds(&self) -> Credentials {
        Credentials::new(self.access.clone(), self.secret.clone())
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    pub fn create_bucket(&self, name: &str) {
        let bucket = self.bucket(name);
        let url = bucket
            .create_bucket(&self.creds())
            .sign(Duration::from_secs(600));
        // The first request may race the server's start under load: try a few times.
        let mut tries = 0;
        let resp = loop {
            match Self::agent().put(url.as_str()).send(&[][..]) {
                Ok(r) => break r,
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("create bucket: {e}; trying again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("create bucket: {e}"),
            }
        };
        assert!(
            resp.status().is_success() || resp.status().as_u16() == 409,
            "create bucket: {}",
            resp.status()
        );
    }

    /// Uploads `data` as `key` (replacing any object of that name).
    pub fn put(&self, key: &str, data: &[u8]) {
        let bucket = self.bucket(BUCKET);
        let creds = self.creds();
        let url = bucket
            .put_object(Some(&creds), key)
            .sign(Duration::from_secs(600));
        let resp = Self::agent().put(url.as_str()).send(data).unwrap();
        assert!(resp.status().is_success(), "PUT {key}: {}", resp.status());
    }

    pub fn get(&self, key: &str) -> Vec<u8> {
        let bucket = self.bucket(BUCKET);
        let creds = self.creds();
        let url = bucket
            .get_object(Some(&creds), key)
            .sign(Duration::from_secs(600));
        let mut resp = Self::agent().get(url.as_str()).call().unwrap();
        assert!(resp.status().is_success(), "GET {key}: {}", resp.status());
        resp.body_mut()
            .with_config()
            .limit(1 << 32)
            .read_to_vec()
            .unwrap()
    }

    /// Uploads every file of `dir` under `prefix/`.
    pub fn put_dir(&self, dir: &Path, prefix: &str) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let name = p.file_name().unwrap().to_str().unwrap();
                self.put(&format!("{prefix}/{name}"), &std::fs::read(&p).unwrap());
            }
        }
    }

    pub fn delete(&self, key: &str) {
        let bucket = self.bucket(BUCKET);
        let creds = self.creds();
        let url = bucket
            .delete_object(Some(&creds), key)
            .sign(Duration::from_secs(600));
        let resp = Self::agent().delete(url.as_str()).call().unwrap();
        assert!(
            resp.status().is_success(),
            "DELETE {key}: {}",
            resp.status()
        );
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// nginx serving `root` on a port of its own, with its own configuration and logs.
pub struct Nginx {
    pub port: u16,
    child: Child,
}

impl Nginx {
    /// `extra`: directives for the server block (e.g. "max_ranges 0;").
    pub fn start(root: &Path, work: &Path, extra: &str) -> Nginx {
        std::fs::create_dir_all(work).unwrap();
        let port = free_port();
        let w = work.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\npid {w}/nginx.pid;\n\
             error_log {w}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {w};\nproxy_temp_path {w};\n\
             fastcgi_temp_path {w};\nuwsgi_temp_path {w};\nscgi_temp_path {w};\n\
             server {{ listen 127.0.0.1:{port}; root {}; {extra} }}\n}}\n",
            root.display()
        );
        let conf_path = work.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new(nginx())
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(port, &mut child, "nginx");
        Nginx { port, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

fn nginx() -> &'static str {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("nginx is not installed: apt-get install nginx-light (.ci/run does this)")
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}
