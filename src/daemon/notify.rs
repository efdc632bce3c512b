//! systemd's notify protocol: datagrams of `KEY=value` lines to the socket in `NOTIFY_SOCKET`
//! (a path, or an abstract address written with a leading `@`). Without `NOTIFY_SOCKET` every
//! send is a no-op, so the daemon runs the same under systemd, in a shell and in tests.
//!
//! Hand-written rather than `sd-notify`: that crate reads `NOTIFY_SOCKET` from the environment
//! at each call, and a notifier aimed at a socket of our choosing is what the in-process
//! watchdog test needs; the protocol is one datagram.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Nothing to notify.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// From `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when `WATCHDOG_PID` is unset or this process.
    pub fn from_env() -> Notifier {
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0)
            .filter(|_| match std::env::var("WATCHDOG_PID") {
                Ok(pid) => pid.parse::<u32>().ok() == Some(std::process::id()),
                Err(_) => true,
            })
            .map(Duration::from_micros);
        match std::env::var("NOTIFY_SOCKET") {
            Ok(path) => match Notifier::to_socket(&path, watchdog) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("NOTIFY_SOCKET={path}: {e}; not notifying systemd");
                    Notifier::disabled()
                }
            },
            Err(_) => Notifier::disabled(),
        }
    }

    /// Notifies the socket at `path` (`@name` for an abstract one).
    pub fn to_socket(path: &str, watchdog: Option<Duration>) -> std::io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some((sock, addr)),
            watchdog,
        })
    }

    /// The watchdog interval systemd expects pings within, when it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (`"READY=1"`, `"STATUS=…"`, several lines joined by `\n`).
    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!("sd_notify {state:?}: {e}");
            }
        }
    }
}
