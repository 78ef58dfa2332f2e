//! The bodies behind `Tree`'s public methods: spawn, reap through the pidfd, signal, sweep.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use tokio::io::Interest;

use super::registry::{self, Live, Scope};
use super::{
    ChildCommand, Containment, ContainmentMode, Exit, SpawnError, Tree, pgroup, spawn, sys,
};
use crate::cgroup::{Cgroup, CgroupError};

/// Safety net under the pidfd wake-up: `wait` re-checks the child this often regardless.
const PIDFD_RECHECK: Duration = Duration::from_millis(100);

/// How often pgroup mode re-scans `/proc` while waiting for the tree to empty: short enough
/// to notice a quick exit, long enough that a scan (~1 ms) stays a small share of a core.
const PGROUP_POLL: Duration = Duration::from_millis(10);

/// Retry interval when `cgroup.events` cannot be watched (should not happen; fail closed by
/// waiting on rather than claiming the tree is empty).
const EVENTS_RETRY: Duration = Duration::from_millis(100);

/// How long `Drop` blocks for a killed tree to empty and the child to be reaped: the spec's
/// "dead within 1 s" budget.
const DROP_WAIT: Duration = Duration::from_secs(1);

/// Reported when the direct child's status was consumed by someone else (a catch-all
/// `waitpid` elsewhere in the process): outside 0..=255, so it cannot pass as a real code.
pub(crate) const STATUS_LOST: i32 = -1;

impl Tree {
    pub(super) fn spawn_impl(
        containment: &Containment,
        cmd: &ChildCommand,
    ) -> Result<Tree, SpawnError> {
        let argv0 = cmd
            .argv
            .first()
            .ok_or_else(|| SpawnError::NotFound(String::new()))?;
        let other = |source: io::Error| SpawnError::Other {
            cmd: spawn::display(argv0),
            source,
        };
        let program = spawn::resolve_program(argv0, spawn::child_path(cmd).map(|p| p.as_os_str()))?;

        let (cgroup, procs) = match containment.mode {
            ContainmentMode::Cgroup => {
                let leaf = &cmd.cgroup_leaf;
                if leaf.is_empty() || leaf.contains('/') || leaf == "." || leaf == ".." {
                    return Err(other(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid cgroup name {leaf:?}"),
                    )));
                }
                let root = containment.cgroup_root.as_ref().ok_or_else(|| {
                    other(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "cgroup containment without a cgroup root",
                    ))
                })?;
                let cg = Cgroup::create(root.join(leaf)).map_err(|e| other(io::Error::other(e)))?;
                let procs = cg.open_procs().map_err(|e| other(io::Error::other(e)))?;
                (Some(cg), Some(procs))
            }
            ContainmentMode::Pgroup => {
                rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
                    .map_err(|e| other(e.into()))?;
                (None, None)
            }
        };
        let mut command = spawn::command(cmd, &program, procs, cgroup.is_none());

        // Fork with the registry locked, so no pgroup sweep sees the child unregistered.
        let mut live = registry::lock();
        let spawned = command.spawn();
        drop(command); // closes conch's copy of the cgroup.procs fd
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                drop(live);
                if let Some(cg) = &cgroup {
                    let _ = cg.remove_blocking();
                }
                return Err(spawn::map_error(argv0, e));
            }
        };
        // std's `Child` is dropped without waiting: the pidfd below owns the child's status.
        let pid = child.id() as i32;
        drop(child);
        let pidfd =
            match Pid::from_raw(pid).map(|p| rustix::process::pidfd_open(p, PidfdFlags::empty())) {
                Some(Ok(fd)) => Arc::new(fd),
                failed => {
                    drop(live);
                    abandon(pid, cgroup.as_ref());
                    let e = match failed {
                        Some(Err(e)) => e.into(),
                        _ => io::Error::other("invalid pid"),
                    };
                    return Err(other(e));
                }
            };
        let scope = match cgroup {
            Some(cg) => Scope::Cgroup(cg),
            None => Scope::Pgroup { pgid: pid },
        };
        let reaped = Arc::new(AtomicBool::new(false));
        let id = registry::next_id();
        live.push(Live {
            id,
            pid,
            pidfd: Arc::clone(&pidfd),
            reaped: Arc::clone(&reaped),
            scope: scope.clone(),
        });
        drop(live);
        Ok(Tree {
            id,
            pid,
            pidfd,
            reaped,
            watch: None,
            exit: None,
            scope,
            killed: AtomicBool::new(false),
            finished: false,
        })
    }

    /// Reap the direct child if it has exited (never blocks).
    pub(super) fn try_reap(&mut self) -> Option<Exit> {
        if self.exit.is_some() {
            return self.exit;
        }
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
        let exit = loop {
            match rustix::process::waitid(WaitId::PidFd(self.pidfd.as_fd()), options) {
                Ok(Some(status)) => match (status.exit_status(), status.terminating_signal()) {
                    (Some(code), _) => break Exit::Code(code),
                    (None, Some(signal)) => break Exit::Signal(signal),
                    (None, None) => return None,
                },
                Ok(None) => return None,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "child-status-lost");
                    break Exit::Code(STATUS_LOST);
                }
            }
        };
        self.reaped.store(true, Ordering::Release);
        self.exit = Some(exit);
        Some(exit)
    }

    pub(super) async fn wait_impl(&mut self) -> Exit {
        loop {
            if let Some(exit) = self.try_reap() {
                return exit;
            }
            if self.watch.is_none() {
                self.watch = self
                    .pidfd
                    .try_clone()
                    .and_then(|fd| sys::Watched::new(fd, Interest::READABLE))
                    .ok();
            }
            match &self.watch {
                Some(watch) => {
                    if let Ok(Ok(mut guard)) =
                        tokio::time::timeout(PIDFD_RECHECK, watch.ready(Interest::READABLE)).await
                    {
                        guard.clear_ready();
                    }
                }
                None => tokio::time::sleep(PIDFD_RECHECK).await,
            }
        }
    }

    /// Send `signals`, in order, to every process of the tree.
    pub(super) fn signal_tree(&self, signals: &[Signal]) {
        match &self.scope {
            Scope::Cgroup(cg) => signal_cgroup(cg, signals),
            Scope::Pgroup { pgid } => {
                let live = registry::lock();
                let pinned = !self.reaped.load(Ordering::Acquire);
                for sig in signals {
                    pgroup::sweep(
                        self.pid,
                        *pgid,
                        pinned,
                        &registry::directs(&live),
                        Some(*sig),
                    );
                }
            }
        }
    }

    pub(super) fn kill_impl(&self) {
        self.killed.store(true, Ordering::Release);
        let live = registry::lock();
        if let Some(entry) = live.iter().find(|l| l.id == self.id) {
            registry::kill(&live, entry);
        }
    }

    /// One pgroup sweep: reap inherited zombies, keep killing once `kill` was called; returns
    /// how many processes of the tree are still alive.
    fn pgroup_sweep(&self, pgid: i32) -> usize {
        let live = registry::lock();
        let pinned = !self.reaped.load(Ordering::Acquire);
        let signal = self.killed.load(Ordering::Acquire).then_some(Signal::KILL);
        pgroup::sweep(self.pid, pgid, pinned, &registry::directs(&live), signal).alive
    }

    pub(super) async fn wait_empty_impl(&mut self) {
        match &self.scope {
            Scope::Cgroup(cg) => loop {
                match cg.wait_empty().await {
                    Ok(()) => return,
                    Err(CgroupError::Read { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cgroup-watch-failed");
                        tokio::time::sleep(EVENTS_RETRY).await;
                    }
                }
            },
            Scope::Pgroup { pgid } => {
                let pgid = *pgid;
                while self.pgroup_sweep(pgid) > 0 {
                    tokio::time::sleep(PGROUP_POLL).await;
                }
            }
        }
    }

    pub(super) async fn shutdown_impl(&mut self, grace: Duration) -> Exit {
        let started = Instant::now();
        self.signal_tree(&[Signal::TERM, Signal::CONT]);
        tracing::debug!(pid = self.pid, "term-sent");
        if tokio::time::timeout(grace, self.wait_empty_impl())
            .await
            .is_err()
        {
            self.kill_impl();
            tracing::debug!(
                pid = self.pid,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "kill-sent"
            );
            self.wait_empty_impl().await;
        }
        // The tree is empty; a direct child that moved itself out of it must not survive.
        let _ = rustix::process::pidfd_send_signal(&*self.pidfd, Signal::KILL);
        let exit = self.wait_impl().await;
        if let Scope::Cgroup(cg) = &self.scope
            && let Err(e) = cg.remove().await
        {
            tracing::warn!(error = %e, "cgroup-remove-failed");
        }
        self.finished = true;
        tracing::debug!(
            pid = self.pid,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "tree-empty"
        );
        exit
    }

    /// `Drop`: kill, block up to [`DROP_WAIT`] for the tree to empty and the child to be
    /// reaped, remove the cgroup, unregister.
    pub(super) fn drop_impl(&mut self) {
        if !self.finished {
            self.kill_impl();
            let deadline = Instant::now() + DROP_WAIT;
            match &self.scope {
                Scope::Cgroup(cg) => {
                    let _ = cg.wait_empty_blocking(DROP_WAIT);
                }
                Scope::Pgroup { pgid } => {
                    let pgid = *pgid;
                    while self.pgroup_sweep(pgid) > 0 && Instant::now() < deadline {
                        std::thread::sleep(PGROUP_POLL);
                    }
                }
            }
            if self.try_reap().is_none() {
                wait_readable(
                    &self.pidfd,
                    deadline.saturating_duration_since(Instant::now()),
                );
                self.try_reap();
            }
            if let Scope::Cgroup(cg) = &self.scope
                && let Err(e) = cg.remove_blocking()
            {
                tracing::warn!(error = %e, "cgroup-remove-failed");
            }
        }
        registry::unregister(self.id);
    }
}

/// Signal every process in the cgroup without hitting a recycled pid: pin each listed pid
/// with a pidfd, re-list, and signal only those still in the cgroup.
fn signal_cgroup(cg: &Cgroup, signals: &[Signal]) {
    let Ok(pids) = cg.pids_recursive() else {
        return;
    };
    let pinned: Vec<(i32, OwnedFd)> = pids
        .into_iter()
        .filter_map(|p| {
            Some((
                p,
                rustix::process::pidfd_open(Pid::from_raw(p)?, PidfdFlags::empty()).ok()?,
            ))
        })
        .collect();
    let Ok(still) = cg.pids_recursive() else {
        return;
    };
    let still: HashSet<i32> = still.into_iter().collect();
    for sig in signals {
        for (_, fd) in pinned.iter().filter(|(p, _)| still.contains(p)) {
            let _ = rustix::process::pidfd_send_signal(fd, *sig);
        }
    }
}

/// Block until the pidfd is readable (the child exited) or `timeout` passes.
fn wait_readable(pidfd: &OwnedFd, timeout: Duration) {
    let Ok(ts) = rustix::time::Timespec::try_from(timeout) else {
        return;
    };
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let _ = rustix::event::poll(&mut fds, Some(&ts));
}

/// A child whose pidfd could not be opened: kill it and reap it by pid (its pid cannot be
/// reused before that), then drop its cgroup.
fn abandon(pid: i32, cgroup: Option<&Cgroup>) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, Signal::KILL);
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
    }
    if let Some(cg) = cgroup {
        let _ = cg.kill();
        let _ = cg.wait_empty_blocking(DROP_WAIT);
        let _ = cg.remove_blocking();
    }
}
