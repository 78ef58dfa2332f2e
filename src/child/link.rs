//! conch's end of a tree's supervisor process ([`super::supervisor`]): learn the child from
//! it, keep it told of the deadline, read the child's exit, and take it down at the end.
//!
//! The supervisor is conch's own child; conch reaps it through a pidfd (never a catch-all
//! `waitpid`) when the tree is finished.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Signal, WaitId, WaitIdOptions};
use tokio::io::Interest;

use super::supervisor::proto::{self, Msg, Received};
use super::{Exit, sys};
use crate::hold::clock::BootInstant;

/// Longest conch waits for the supervisor to report the child: one exec of conch's own
/// binary plus one fork and exec, normally a few milliseconds; generous for a loaded host.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long finishing waits for the supervisor to exit once its socket is closed. After
/// `done` it exits at once; without it, it first kills the tree (the caller already did).
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Safety net under the socket wake-up: `readable` returns at least this often.
const RECHECK: Duration = Duration::from_millis(100);

/// `sent` before any deadline was sent.
const NEVER_SENT: u64 = u64::MAX;

/// The supervisor process and the socket to it.
#[derive(Debug)]
pub(crate) struct Link {
    /// `None` once closed by [`Link::finish`].
    sock: Option<OwnedFd>,
    /// A duplicate of `sock` registered with tokio, created on the first async wait.
    watch: Option<sys::Watched>,
    pid: i32,
    pidfd: Arc<OwnedFd>,
    /// The last deadline sent (ns since boot, 0 = none), to send only changes.
    sent: AtomicU64,
    reaped: bool,
}

/// How the start of the child went, as the supervisor tells it.
#[derive(Debug)]
pub(crate) enum Handshake {
    Spawned {
        pid: i32,
        pidfd: OwnedFd,
    },
    /// The supervisor could not start the child (exec, the pre-exec hook, or the cgroup).
    Refused(io::Error),
    /// The supervisor itself failed: died, hung, or spoke nonsense.
    Broken(io::Error),
}

/// What a non-blocking look at the socket found.
#[derive(Debug)]
pub(crate) enum Polled {
    Exit(Exit),
    Pending,
    /// The supervisor closed the socket (or broke the protocol) without reporting an exit.
    Closed,
}

impl Link {
    pub(crate) fn new(sock: OwnedFd, pid: i32, pidfd: Arc<OwnedFd>) -> Link {
        Link {
            sock: Some(sock),
            watch: None,
            pid,
            pidfd,
            sent: AtomicU64::new(NEVER_SENT),
            reaped: false,
        }
    }

    /// Block (up to [`HANDSHAKE_TIMEOUT`]) until the supervisor reports the child or failure.
    pub(crate) fn handshake(&mut self) -> Handshake {
        let Some(sock) = &self.sock else {
            return Handshake::Broken(io::Error::other("supervisor link closed"));
        };
        let until = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            match proto::recv(sock, false) {
                Ok(Received::Empty) => {}
                Ok(Received::Msg(Msg::Spawned { pid }, Some(pidfd))) => {
                    return Handshake::Spawned { pid, pidfd };
                }
                Ok(Received::Msg(Msg::SpawnFailed { errno }, _)) => {
                    return Handshake::Refused(io::Error::from_raw_os_error(errno));
                }
                Ok(Received::Msg(other, _)) => {
                    return Handshake::Broken(io::Error::other(format!(
                        "supervisor sent {other:?} before the child"
                    )));
                }
                Ok(Received::Closed) => {
                    return Handshake::Broken(io::Error::other(
                        "supervisor exited before starting the child",
                    ));
                }
                Err(e) => return Handshake::Broken(e),
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Handshake::Broken(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "supervisor did not start the child in time",
                ));
            }
            poll_one(sock, PollFlags::IN, left);
        }
    }

    /// Read what the supervisor sent so far, without blocking.
    pub(crate) fn poll(&mut self) -> Polled {
        let Some(sock) = &self.sock else {
            return Polled::Closed;
        };
        loop {
            return match proto::recv(sock, false) {
                Ok(Received::Empty) => Polled::Pending,
                Ok(Received::Msg(Msg::Exited { code }, _)) => Polled::Exit(Exit::Code(code)),
                Ok(Received::Msg(Msg::Signaled { signal }, _)) => {
                    Polled::Exit(Exit::Signal(signal))
                }
                // Nothing else is sent after the handshake.
                Ok(Received::Msg(..)) => continue,
                Ok(Received::Closed) | Err(_) => Polled::Closed,
            };
        }
    }

    /// Wait until the socket may have something to read, or [`RECHECK`] passes.
    /// Cancel-safe. Needs a tokio runtime with I/O enabled.
    pub(crate) async fn readable(&mut self) {
        if self.watch.is_none() {
            self.watch = self
                .sock
                .as_ref()
                .and_then(|s| s.try_clone().ok())
                .and_then(|fd| sys::Watched::new(fd, Interest::READABLE).ok());
        }
        match &self.watch {
            Some(watch) => {
                if let Ok(Ok(mut guard)) =
                    tokio::time::timeout(RECHECK, watch.ready(Interest::READABLE)).await
                {
                    guard.clear_ready();
                }
            }
            None => tokio::time::sleep(RECHECK).await,
        }
    }

    /// Block until the socket is readable or `timeout` passes (for `Drop`).
    pub(crate) fn wait_blocking(&self, timeout: Duration) {
        if let Some(sock) = &self.sock {
            poll_one(sock, PollFlags::IN, timeout);
        }
    }

    /// Tell a warm supervisor to start the child described in `spec` (a memfd). Fails if the
    /// supervisor is gone.
    pub(crate) fn go(&self, spec: BorrowedFd<'_>) -> io::Result<()> {
        let sock = self
            .sock
            .as_ref()
            .ok_or_else(|| io::Error::other("supervisor link closed"))?;
        proto::send(sock.as_fd(), Msg::Go, Some(spec))
    }

    /// Tell the supervisor the instant by which the tree must be dead (`None`: no deadline).
    /// Only changes are sent; never blocks; a supervisor that is gone is ignored here (its
    /// end-of-file is seen by [`Link::poll`]).
    pub(crate) fn set_deadline(&self, d: Option<BootInstant>) {
        let ns = d.map_or(0, |d| {
            u64::try_from(d.since_boot().as_nanos())
                .unwrap_or(u64::MAX - 1)
                .max(1)
        });
        if self.sent.swap(ns, Ordering::AcqRel) == ns {
            return;
        }
        if let Some(sock) = &self.sock {
            let msg = Msg::Deadline {
                boot_ns: (ns != 0).then_some(ns),
            };
            if let Err(e) = proto::send(sock.as_fd(), msg, None) {
                tracing::debug!(supervisor = self.pid, error = %e, "deadline-not-sent");
            }
        }
    }

    /// End the link: send `done` when `tree_empty` (else the supervisor kills the tree on
    /// end-of-file), close the socket, and reap the supervisor, waiting up to [`EXIT_WAIT`].
    /// Returns whether the supervisor is reaped. Idempotent.
    ///
    /// A supervisor that does not exit in time is left running: it is still the one killing
    /// the tree, and a pgroup sweep or init reaps it later.
    pub(crate) fn finish(&mut self, tree_empty: bool) -> bool {
        if let Some(sock) = self.sock.take() {
            if tree_empty {
                let _ = proto::send(sock.as_fd(), Msg::Done, None);
            }
            self.watch = None;
            drop(sock);
        }
        if !self.reaped {
            poll_one(&self.pidfd, PollFlags::IN, EXIT_WAIT);
            self.reaped = reap(&self.pidfd);
            if !self.reaped {
                tracing::warn!(supervisor = self.pid, "supervisor-still-running");
            }
        }
        self.reaped
    }

    /// The supervisor's pid.
    #[cfg(test)]
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Close conch's end without `done`: to the supervisor, exactly what conch's death
    /// looks like.
    #[cfg(test)]
    pub(crate) fn sever(&mut self) {
        self.sock = None;
        self.watch = None;
    }

    /// Kill the supervisor and reap it (its child's PDEATHSIG follows). For failed spawns.
    pub(crate) fn abort(&mut self) {
        self.sock = None;
        self.watch = None;
        let _ = rustix::process::pidfd_send_signal(&*self.pidfd, Signal::KILL);
        poll_one(&self.pidfd, PollFlags::IN, EXIT_WAIT);
        self.reaped = reap(&self.pidfd);
    }
}

/// Reap the process behind `pidfd` if it has exited (never blocks). `true` also when it is
/// not (or no longer) conch's child.
pub(crate) fn reap(pidfd: &OwnedFd) -> bool {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
    loop {
        return match rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), options) {
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => true,
        };
    }
}

/// Block until `fd` reports `flags` or `timeout` passes.
fn poll_one(fd: &OwnedFd, flags: PollFlags, timeout: Duration) {
    let Ok(ts) = rustix::time::Timespec::try_from(timeout) else {
        return;
    };
    let mut fds = [PollFd::new(fd, flags)];
    let _ = rustix::event::poll(&mut fds, Some(&ts));
}
