//! The systemd notification protocol, only where `NOTIFY_SOCKET` is set: `READY=1` once
//! conchd watches its jobs and holds its lease, `WATCHDOG=1` at half of `WATCHDOG_USEC`,
//! `STOPPING=1` when it drains. conchd needs no systemd; without the variable this is a no-op.

#![forbid(unsafe_code)]

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// `None` when `NOTIFY_SOCKET` is unset or unusable (said once in the log).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.first() {
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..])
            }
            Some(b'/') => SocketAddr::from_pathname(&path),
            _ => {
                tracing::warn!(socket = ?path, "NOTIFY_SOCKET is neither a path nor an abstract socket; not notifying");
                return None;
            }
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(socket = ?path, error = %e, "bad NOTIFY_SOCKET; not notifying");
                return None;
            }
        };
        let sock = UnixDatagram::unbound().ok()?;
        // Only for the process systemd meant (WATCHDOG_PID, when set, must be ours).
        let pid_ok =
            std::env::var("WATCHDOG_PID").map_or(true, |p| p == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && pid_ok)
            .map(|u| Duration::from_micros(u / 2));
        Some(Notifier {
            sock,
            addr,
            watchdog,
        })
    }

    /// How often to send `WATCHDOG=1`, if systemd asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Send one notification; failures are logged, never fatal.
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, msg, "cannot notify the service manager");
        }
    }
}
