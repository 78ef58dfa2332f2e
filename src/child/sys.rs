//! The only `unsafe` in conch: the code that runs between fork and exec, and registering
//! owned fds with tokio's reactor.
//!
//! Between fork and exec only async-signal-safe calls are allowed: raw syscalls through rustix
//! (no allocation, no locks, no logging). Errors become `io::Error::from_raw_os_error`, which
//! does not allocate; std reports them to the parent as the spawn error.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::{Pid, Signal};
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

/// Make the child, before it executes anything: ask for SIGKILL when conch dies, verify conch
/// (`parent`) has not already died (exit if it has), then move itself into the cgroup whose
/// `cgroup.procs` is `procs` (when given) so every later descendant is born inside.
pub(crate) fn contain_before_exec(cmd: &mut Command, parent: Pid, procs: Option<OwnedFd>) {
    let hook = move || -> io::Result<()> {
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        if rustix::process::getppid() != Some(parent) {
            // conch died between fork and prctl: PDEATHSIG will never fire, so do not run.
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::SRCH.raw_os_error(),
            ));
        }
        if let Some(procs) = &procs {
            rustix::io::write(procs, b"0")?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec. It only makes raw syscalls
    // (prctl, getppid, write) through rustix and builds errors from errno values, none of
    // which allocates, takes a lock or touches state another thread could have left
    // inconsistent at fork; it borrows only the fd it owns.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// An owned fd registered with the tokio reactor. Wrapping `AsyncFd` keeps the fd out of
/// reach: nothing can close or replace it while it is registered, which is what tokio's
/// registration requires. Dropping it deregisters and then closes the fd.
#[derive(Debug)]
pub(crate) struct Watched(AsyncFd<OwnedFd>);

impl Watched {
    /// Register `fd` for `interest`. Must be called inside a tokio runtime (panics otherwise).
    pub(crate) fn new(fd: OwnedFd, interest: Interest) -> io::Result<Watched> {
        // SAFETY: `fd` is a valid open fd owned by the `AsyncFd` for its whole life; `Watched`
        // never exposes `&mut OwnedFd`, so it cannot be closed, swapped or replaced while
        // registered, and `as_raw_fd` keeps returning the same number.
        let afd =
            unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)?;
        Ok(Watched(afd))
    }

    /// Wait for `interest` readiness. Cancel-safe. Call `clear_ready` on the guard after
    /// observing that the condition does not (yet) hold.
    pub(crate) async fn ready(
        &self,
        interest: Interest,
    ) -> io::Result<AsyncFdReadyGuard<'_, OwnedFd>> {
        self.0.ready(interest).await
    }
}

impl AsFd for Watched {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}
