//! The bodies behind `Tree`'s public methods: start the supervisor, read the child's exit
//! from it, signal, sweep.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal};

use super::link::{self, Handshake, Link, Polled};
use super::registry::{self, Direct, Live, Scope};
use super::supervisor::proto;
use super::{ChildCommand, Containment, ContainmentMode, Exit, SpawnError, Tree, pgroup, spawn};
use crate::cgroup::{Cgroup, CgroupError};

/// How often pgroup mode re-scans `/proc` while waiting for the tree to empty: short enough
/// to notice a quick exit, long enough that a scan (~1 ms) stays a small share of a core.
const PGROUP_POLL: Duration = Duration::from_millis(10);

/// Retry interval when `cgroup.events` cannot be watched (should not happen; fail closed by
/// waiting on rather than claiming the tree is empty).
const EVENTS_RETRY: Duration = Duration::from_millis(100);

/// How long `Drop` blocks for a killed tree to empty and the child's exit to be reported: the
/// spec's "dead within 1 s" budget.
const DROP_WAIT: Duration = Duration::from_secs(1);

/// Reported when the direct child's status could not be read by the supervisor: outside
/// 0..=255, so it cannot pass as a real code.
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

        let cgroup = match containment.mode {
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
                Some(Cgroup::create(root.join(leaf)).map_err(|e| other(io::Error::other(e)))?)
            }
            ContainmentMode::Pgroup => {
                rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
                    .map_err(|e| other(e.into()))?;
                None
            }
        };
        let scope = match &cgroup {
            Some(cg) => Scope::Cgroup(cg.clone()),
            None => Scope::Pgroup,
        };
        let (ours, theirs) = match proto::pair() {
            Ok(pair) => pair,
            Err(e) => {
                discard(cgroup.as_ref());
                return Err(other(e));
            }
        };
        let launch = match spawn::command(
            cmd,
            &program,
            theirs.as_fd(),
            cgroup.as_ref().map(Cgroup::path),
        ) {
            Ok(launch) => launch,
            Err(e) => {
                discard(cgroup.as_ref());
                return Err(other(e));
            }
        };

        // Spawn with the registry locked, so no pgroup sweep sees the supervisor unregistered.
        let mut live = registry::lock();
        let spawned = launch.spawn();
        drop(launch);
        drop(theirs); // the supervisor holds the only other end now
        let supervisor_pid = match spawned {
            Ok(pid) => pid,
            Err(e) => {
                drop(live);
                discard(cgroup.as_ref());
                return Err(other(e));
            }
        };
        let supervisor_fd = match Pid::from_raw(supervisor_pid)
            .map(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()))
        {
            Some(Ok(fd)) => Arc::new(fd),
            failed => {
                drop(live);
                abandon(supervisor_pid);
                discard(cgroup.as_ref());
                return Err(other(match failed {
                    Some(Err(e)) => e.into(),
                    _ => io::Error::other("invalid pid"),
                }));
            }
        };
        let reaped = Arc::new(AtomicBool::new(false));
        let id = registry::next_id();
        live.push(Live {
            id,
            supervisor: supervisor_pid,
            supervisor_fd: Arc::clone(&supervisor_fd),
            child: None,
            reaped: Arc::clone(&reaped),
            scope: scope.clone(),
        });
        drop(live);

        let mut link = Link::new(ours, supervisor_pid, supervisor_fd);
        let failure = match link.handshake() {
            Handshake::Spawned { pid, pidfd } => {
                let pidfd = Arc::new(pidfd);
                registry::set_child(
                    id,
                    Direct {
                        pid,
                        pidfd: Arc::clone(&pidfd),
                    },
                );
                return Ok(Tree {
                    id,
                    pid,
                    pidfd,
                    reaped,
                    link,
                    exit: None,
                    scope,
                    killed: AtomicBool::new(false),
                    finished: false,
                });
            }
            Handshake::Refused(e) => spawn::map_error(argv0, e),
            Handshake::Broken(e) => other(e),
        };
        link.abort();
        discard(cgroup.as_ref());
        registry::unregister(id);
        Err(failure)
    }

    /// The direct child's exit, once the supervisor has reported it (never blocks).
    ///
    /// A supervisor gone without reporting it fails closed: the tree is killed and the child
    /// counts as killed by SIGKILL (its PDEATHSIG fired with the supervisor's death).
    pub(super) fn poll_exit(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            match self.link.poll() {
                Polled::Exit(exit) => self.exit = Some(exit),
                Polled::Pending => {}
                Polled::Closed => {
                    tracing::warn!(pid = self.pid, "supervisor-lost");
                    self.kill_impl();
                    self.exit = Some(Exit::Signal(Signal::KILL.as_raw()));
                }
            }
        }
        self.exit
    }

    pub(super) async fn wait_impl(&mut self) -> Exit {
        loop {
            if let Some(exit) = self.poll_exit() {
                return exit;
            }
            self.link.readable().await;
        }
    }

    /// Send `signals`, in order, to every process of the tree.
    pub(super) fn signal_tree(&self, signals: &[Signal]) {
        match &self.scope {
            Scope::Cgroup(cg) => signal_cgroup(cg, signals),
            Scope::Pgroup => {
                let live = registry::lock();
                let pinned = !self.reaped.load(Ordering::Acquire);
                for sig in signals {
                    pgroup::sweep(
                        self.pid,
                        self.pid,
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
    fn pgroup_sweep(&self) -> usize {
        let live = registry::lock();
        let pinned = !self.reaped.load(Ordering::Acquire);
        let signal = self.killed.load(Ordering::Acquire).then_some(Signal::KILL);
        pgroup::sweep(
            self.pid,
            self.pid,
            pinned,
            &registry::directs(&live),
            signal,
        )
        .alive
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
            Scope::Pgroup => {
                while self.pgroup_sweep() > 0 {
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
        self.finish_link(true);
        self.finished = true;
        tracing::debug!(
            pid = self.pid,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "tree-empty"
        );
        exit
    }

    /// Tell the supervisor the instant by which the tree must be dead.
    pub(super) fn set_deadline_impl(&self, d: Option<crate::hold::clock::BootInstant>) {
        self.link.set_deadline(d);
    }

    /// Close the link and reap the supervisor; then the direct child, which in pgroup mode
    /// the supervisor leaves unreaped (pinning its pgid) for conch, the subreaper, to reap.
    fn finish_link(&mut self, tree_empty: bool) {
        if self.link.finish(tree_empty) && link::reap(&self.pidfd) {
            self.reaped.store(true, Ordering::Release);
        }
    }

    /// `Drop`: kill, block up to [`DROP_WAIT`] for the tree to empty and the child's exit to
    /// be reported, remove the cgroup, end the link, unregister.
    pub(super) fn drop_impl(&mut self) {
        if !self.finished {
            self.kill_impl();
            let deadline = Instant::now() + DROP_WAIT;
            let empty = match &self.scope {
                Scope::Cgroup(cg) => matches!(cg.wait_empty_blocking(DROP_WAIT), Ok(true)),
                Scope::Pgroup => loop {
                    let alive = self.pgroup_sweep();
                    if alive == 0 || Instant::now() >= deadline {
                        break alive == 0;
                    }
                    std::thread::sleep(PGROUP_POLL);
                },
            };
            if self.poll_exit().is_none() {
                self.link
                    .wait_blocking(deadline.saturating_duration_since(Instant::now()));
                self.poll_exit();
            }
            if let Scope::Cgroup(cg) = &self.scope
                && let Err(e) = cg.remove_blocking()
            {
                tracing::warn!(error = %e, "cgroup-remove-failed");
            }
            self.finish_link(empty);
        }
        registry::unregister(self.id);
    }
}

#[cfg(test)]
impl Tree {
    /// Make the supervisor see what conch's death looks like (see `Link::sever`).
    pub(crate) fn sever_link(&mut self) {
        self.link.sever();
    }

    pub(crate) fn supervisor_pid(&self) -> i32 {
        self.link.pid()
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

/// A supervisor whose pidfd could not be opened: kill it and reap it by pid (its pid cannot
/// be reused before that); its child's PDEATHSIG follows.
fn abandon(pid: i32) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, Signal::KILL);
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
    }
}

/// Kill whatever a failed spawn left in its cgroup and remove the cgroup.
fn discard(cgroup: Option<&Cgroup>) {
    if let Some(cg) = cgroup {
        let _ = cg.kill();
        let _ = cg.wait_empty_blocking(DROP_WAIT);
        let _ = cg.remove_blocking();
    }
}
