//! A minimal QMP client for tests that drive qemu-system-x86_64: the test listens on a unix
//! socket and QEMU connects to it (`-qmp unix:PATH`), so there is no wait for a socket to
//! appear. Every wait has a deadline.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

/// A socket QEMU will connect to.
pub struct QmpListener {
    path: PathBuf,
    listener: UnixListener,
}

impl QmpListener {
    pub fn bind(path: &Path) -> QmpListener {
        let _ = std::fs::remove_file(path);
        QmpListener {
            path: path.to_path_buf(),
            listener: UnixListener::bind(path).unwrap(),
        }
    }

    /// The QEMU arguments that make it connect here.
    pub fn qemu_args(&self) -> Vec<String> {
        vec!["-qmp".into(), format!("unix:{}", self.path.display())]
    }

    /// Waits (at most two minutes) for QEMU to connect, and negotiates capabilities.
    pub fn accept(self) -> Qmp {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(self.listener.accept().map(|(s, _)| s));
        });
        let stream = rx
            .recv_timeout(TIMEOUT)
            .expect("QEMU did not connect to the QMP socket")
            .unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
            events: Vec::new(),
        };
        let greeting = q.read();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        q.execute("qmp_capabilities", json!({}));
        q
    }
}

pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events received so far.
    pub events: Vec<Value>,
}

impl Qmp {
    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("no answer from QEMU in time");
        assert!(n > 0, "QEMU closed the QMP connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` value; panics on an error reply.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.stream, "{msg}").unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            panic!("QMP {cmd} failed: {v}");
        }
    }

    /// Waits for an event named `name` for which `pick` holds (including events that came
    /// while a command ran), and returns it; panics at the deadline.
    pub fn wait_event(&mut self, name: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let wanted = |v: &Value| v["event"] == name && pick(v);
        if let Some(i) = self.events.iter().position(wanted) {
            return self.events.remove(i);
        }
        loop {
            let v = self.read();
            if wanted(&v) {
                return v;
            }
            self.events.push(v);
        }
    }

    /// Runs a human monitor command and returns its output.
    pub fn hmp(&mut self, line: &str) -> String {
        let r = self.execute("human-monitor-command", json!({"command-line": line}));
        r.as_str().unwrap_or_default().to_string()
    }

    /// Asks QEMU to quit (the reply may race with the connection closing).
    pub fn quit(mut self) {
        let _ = writeln!(self.stream, "{}", json!({"execute": "quit"}));
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.reader, &mut rest);
    }
}
