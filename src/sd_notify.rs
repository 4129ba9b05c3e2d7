//! systemd's readiness protocol (sd_notify(3)): with `Type=notify`, systemd passes a datagram
//! socket in `$NOTIFY_SOCKET` and waits for `READY=1` before starting what depends on the unit;
//! `STOPPING=1` tells it the service is shutting down on its own (an unmount).
//!
//! Every failure is logged and swallowed: a mount that works must not fail because the
//! supervisor cannot be told about it.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// A full receive queue must not stall the mount or its unmount.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// The value of $NOTIFY_SOCKET, for log lines.
    shown: String,
    stopping_sent: bool,
}

impl Notifier {
    /// The notifier $NOTIFY_SOCKET asks for; None when it is unset or empty, or (logged) when
    /// it cannot be used.
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        if value.is_empty() {
            return None;
        }
        match Notifier::new(&value) {
            Ok(n) => Some(n),
            Err(e) => {
                log::warn!(
                    "NOTIFY_SOCKET={}: {e}; systemd will not be told when the mount is ready",
                    value.to_string_lossy()
                );
                None
            }
        }
    }

    pub fn new(value: &OsStr) -> io::Result<Notifier> {
        let addr = address(value)?;
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Notifier {
            socket,
            addr,
            shown: value.to_string_lossy().into_owned(),
            stopping_sent: false,
        })
    }

    /// `READY=1` and a status line. No MAINPID=: under `-f` systemd started us and knows our
    /// PID, and a $NOTIFY_SOCKET inherited from some other service (a script run by it) must
    /// not make us its main process.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// `STOPPING=1`, once however often it is called.
    pub fn stopping(&mut self, status: &str) {
        if !std::mem::replace(&mut self.stopping_sent, true) {
            self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
        }
    }

    fn send(&self, message: &str) {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(n) if n == message.len() => {
                log::debug!("NOTIFY_SOCKET={}: sent {message:?}", self.shown)
            }
            Ok(n) => log::warn!(
                "NOTIFY_SOCKET={}: sent {n} of {} bytes",
                self.shown,
                message.len()
            ),
            Err(e) => log::warn!("NOTIFY_SOCKET={}: {e}", self.shown),
        }
    }
}

/// `/path` is a socket file, `@name` an abstract socket (systemd's notation for a name that
/// starts with NUL).
fn address(value: &OsStr) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(Path::new(value)),
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute socket path nor an abstract name (@NAME)",
        )),
    }
}

/// A status is one `KEY=value` line: newlines in paths must not start new assignments.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    fn recv(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_ready_and_stopping_once_to_an_abstract_socket() {
        let name = format!("vmfs-mount-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let mut n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.ready("serving a\nb");
        let msg = recv(&server);
        assert_eq!(msg, "READY=1\nSTATUS=serving a b\n");
        n.stopping("bye");
        n.stopping("again");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=bye\n");
        server.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(server.recv(&mut buf).is_err(), "STOPPING=1 sent twice");
    }

    #[test]
    fn refuses_relative_and_unsupported_addresses_and_survives_a_missing_socket() {
        for bad in ["", "relative/sock", "vsock:2:1234"] {
            assert!(Notifier::new(OsStr::new(bad)).is_err(), "{bad}");
        }
        // Nobody listening: logged, not fatal.
        let n = Notifier::new(OsStr::new("/nonexistent/vmfs-mount-notify")).unwrap();
        n.ready("x");
    }
}
