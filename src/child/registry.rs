//! Process-wide list of live trees, so a panic hook can kill them all and pgroup sweeps know
//! which of conch's children are the trees' supervisors (not orphans).
//!
//! The lock is held only for short, non-panicking work: registering, a `/proc` sweep, and
//! the spawn of a supervisor (so it is registered before any sweep can see it).

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::process::Signal;

use super::pgroup;
use crate::cgroup::{Cgroup, CgroupError};

/// Where a tree lives, which decides how it is killed.
#[derive(Debug, Clone)]
pub(crate) enum Scope {
    Cgroup(Cgroup),
    /// The direct child leads its own process group (pgid = its pid).
    Pgroup,
}

/// The direct child of a tree (the supervisor's child), as reported by the supervisor.
#[derive(Debug, Clone)]
pub(crate) struct Direct {
    pub pid: i32,
    pub pidfd: Arc<OwnedFd>,
}

/// What it takes to kill one tree without its `Tree`.
#[derive(Debug)]
pub(crate) struct Live {
    pub id: u64,
    /// The tree's supervisor: conch's own child, never an orphan for pgroup sweeps.
    pub supervisor: i32,
    pub supervisor_fd: Arc<OwnedFd>,
    /// `None` until the supervisor has reported the child.
    pub child: Option<Direct>,
    /// Set once the direct child is reaped (its pid, and so its pgid, may then be reused).
    pub reaped: Arc<AtomicBool>,
    /// `None` while the supervisor waits, warm, for a child to start ([`super::Warm`]).
    pub scope: Option<Scope>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());
/// `kill_all_live` tries the lock this often (yielding in between) before giving up; other
/// holders keep it for at most one `/proc` scan or one fork.
const LOCK_ATTEMPTS: usize = 100_000;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) type Guard = MutexGuard<'static, Vec<Live>>;

/// Lock the registry. A poisoned lock is still used: killing must work after a panic.
pub(crate) fn lock() -> Guard {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn unregister(id: u64) {
    lock().retain(|l| l.id != id);
}

/// Processes that belong to live trees as such, never orphans to claim or reap: every
/// supervisor (conch's own child) and every direct child (conch's child too, once re-parented
/// after its supervisor died).
pub(crate) fn directs(live: &[Live]) -> HashSet<i32> {
    live.iter()
        .flat_map(|l| [Some(l.supervisor), l.child.as_ref().map(|c| c.pid)])
        .flatten()
        .collect()
}

/// A warm supervisor (tree `id`) is about to start its child in `scope`.
pub(crate) fn set_scope(id: u64, scope: Scope) {
    if let Some(entry) = lock().iter_mut().find(|l| l.id == id) {
        entry.scope = Some(scope);
    }
}

/// Record the direct child the supervisor of tree `id` reported.
pub(crate) fn set_child(id: u64, child: Direct) {
    if let Some(entry) = lock().iter_mut().find(|l| l.id == id) {
        entry.child = Some(child);
    }
}

/// SIGKILL one tree: `cgroup.kill`, or the group plus a sweep; and the direct child through
/// its pidfd in either case (it may have left its cgroup or group). Before the supervisor has
/// reported the child, the supervisor itself is killed: the child's PDEATHSIG follows. Does
/// not wait.
pub(crate) fn kill(live: &[Live], entry: &Live) {
    match &entry.child {
        Some(child) => {
            let _ = rustix::process::pidfd_send_signal(&*child.pidfd, Signal::KILL);
        }
        None => {
            let _ = rustix::process::pidfd_send_signal(&*entry.supervisor_fd, Signal::KILL);
        }
    }
    match &entry.scope {
        None => {}
        Some(Scope::Cgroup(cg)) => {
            match cg.kill() {
                Ok(()) => {}
                // Already removed: the tree was emptied before.
                Err(CgroupError::Write { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(error = %e, "cgroup-kill-failed"),
            }
        }
        Some(Scope::Pgroup) => {
            if let Some(child) = &entry.child {
                let pinned = !entry.reaped.load(Ordering::Acquire);
                pgroup::sweep(
                    child.pid,
                    child.pid,
                    pinned,
                    &directs(live),
                    Some(Signal::KILL),
                );
            }
        }
    }
}

/// SIGKILL every live tree of this process, without waiting. For the panic hook and other
/// last-resort paths: synchronous, never panics, safe to call more than once.
///
/// If this very thread panicked while holding the registry lock, waiting for it would
/// deadlock: after a bounded number of attempts the call gives up.
pub fn kill_all_live() {
    let live = (0..LOCK_ATTEMPTS).find_map(|_| match LIVE.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => {
            std::thread::yield_now();
            None
        }
    });
    let Some(live) = live else {
        return;
    };
    for entry in live.iter() {
        kill(&live, entry);
    }
}
