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
use super::{
    ChildCommand, Containment, ContainmentMode, Exit, SpawnError, Tree, Warm, WarmParts, pgroup,
    spawn,
};
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
        let cgroup = contain(containment, cmd).map_err(other)?;
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

        let registered = register(launch, Some(scope.clone()));
        drop(theirs); // the supervisor holds the only other end now
        let (id, supervisor_pid, supervisor_fd, reaped) = match registered {
            Ok(r) => r,
            Err(e) => {
                discard(cgroup.as_ref());
                return Err(other(e));
            }
        };
        let link = Link::new(ours, supervisor_pid, supervisor_fd);
        Tree::handshake(id, link, reaped, scope, cgroup, argv0)
    }

    /// Wait for the supervisor behind `link` (registered as `id`) to report the child, and
    /// make the `Tree`; on failure kill what was started and remove the cgroup.
    fn handshake(
        id: u64,
        mut link: Link,
        reaped: Arc<AtomicBool>,
        scope: Scope,
        cgroup: Option<Cgroup>,
        argv0: &std::ffi::OsStr,
    ) -> Result<Tree, SpawnError> {
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
            Handshake::Broken(e) => SpawnError::Other {
                cmd: spawn::display(argv0),
                source: e,
            },
        };
        link.abort();
        discard(cgroup.as_ref());
        registry::unregister(id);
        Err(failure)
    }

    /// Start a warm supervisor: see [`Warm`].
    pub(super) fn prepare_impl() -> io::Result<Warm> {
        let (ours, theirs) = proto::pair()?;
        let fd = crate::child::sys::passed_fd_number(theirs.as_fd());
        let launch = spawn::warm_command(theirs.as_fd())?;
        let registered = register(launch, None);
        drop(theirs); // the supervisor holds the only other end now
        let (id, pid, pidfd, reaped) = registered?;
        Ok(Warm {
            parts: Some(WarmParts {
                id,
                pid,
                pidfd,
                sock: ours,
                fd,
                reaped,
            }),
        })
    }

    /// Start `cmd` through the warm supervisor `parts`. If that supervisor is gone (killed,
    /// say), start a fresh one instead.
    pub(super) fn start_warm(
        parts: WarmParts,
        containment: &Containment,
        cmd: &ChildCommand,
    ) -> Result<Tree, SpawnError> {
        let WarmParts {
            id,
            pid,
            pidfd,
            sock,
            fd,
            reaped,
        } = parts;
        let link = Link::new(sock, pid, Arc::clone(&pidfd));
        let abandon_warm = |mut link: Link| {
            link.abort();
            registry::unregister(id);
        };
        let Some(argv0) = cmd.argv.first() else {
            abandon_warm(link);
            return Err(SpawnError::NotFound(String::new()));
        };
        let other = |source: io::Error| SpawnError::Other {
            cmd: spawn::display(argv0),
            source,
        };
        let prepared = spawn::resolve_program(argv0, spawn::child_path(cmd).map(|p| p.as_os_str()))
            .and_then(|program| Ok((program, contain(containment, cmd).map_err(other)?)));
        let (program, cgroup) = match prepared {
            Ok(p) => p,
            Err(e) => {
                abandon_warm(link);
                return Err(e);
            }
        };
        let scope = match &cgroup {
            Some(cg) => Scope::Cgroup(cg.clone()),
            None => Scope::Pgroup,
        };
        let args = spawn::supervisor_args(cmd, &program, fd, cgroup.as_ref().map(Cgroup::path));
        let env: Vec<std::ffi::OsString> = spawn::child_env(cmd)
            .into_iter()
            .map(|(mut k, v)| {
                k.push("=");
                k.push(v);
                k
            })
            .collect();
        let spec = proto::encode_spec(&args.to_os_args(), &env);
        registry::set_scope(id, scope.clone());
        let sent = spec_memfd(&spec).and_then(|memfd| link.go(memfd.as_fd()));
        if let Err(e) = sent {
            tracing::debug!(error = %e, "warm supervisor gone; starting a fresh one");
            abandon_warm(link);
            discard(cgroup.as_ref());
            return Tree::spawn_impl(containment, cmd);
        }
        Tree::handshake(id, link, reaped, scope, cgroup, argv0)
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

/// Start a supervisor with `launch` and register it in the live-tree registry with `scope`:
/// its id, pid, pidfd and reaped flag. The registry stays locked across the spawn, so no
/// pgroup sweep sees the supervisor unregistered. The caller closes its copy of the
/// supervisor's end of the socket afterwards.
fn register(
    launch: crate::child::sys::Launch<'_>,
    scope: Option<Scope>,
) -> io::Result<(u64, i32, Arc<OwnedFd>, Arc<AtomicBool>)> {
    let mut live = registry::lock();
    let spawned = launch.spawn();
    drop(launch);
    let pid = spawned?;
    let pidfd =
        match Pid::from_raw(pid).map(|p| rustix::process::pidfd_open(p, PidfdFlags::empty())) {
            Some(Ok(fd)) => Arc::new(fd),
            failed => {
                drop(live);
                abandon(pid);
                return Err(match failed {
                    Some(Err(e)) => e.into(),
                    _ => io::Error::other("invalid pid"),
                });
            }
        };
    let reaped = Arc::new(AtomicBool::new(false));
    let id = registry::next_id();
    live.push(Live {
        id,
        supervisor: pid,
        supervisor_fd: Arc::clone(&pidfd),
        child: None,
        reaped: Arc::clone(&reaped),
        scope,
    });
    Ok((id, pid, pidfd, reaped))
}

/// Make the tree's containment: create its cgroup (cgroup mode), or make conch the child
/// subreaper (pgroup mode).
fn contain(containment: &Containment, cmd: &ChildCommand) -> io::Result<Option<Cgroup>> {
    match containment.mode {
        ContainmentMode::Cgroup => {
            let leaf = &cmd.cgroup_leaf;
            if leaf.is_empty() || leaf.contains('/') || leaf == "." || leaf == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid cgroup name {leaf:?}"),
                ));
            }
            let root = containment.cgroup_root.as_ref().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "cgroup containment without a cgroup root",
                )
            })?;
            Ok(Some(
                Cgroup::create(root.join(leaf)).map_err(io::Error::other)?,
            ))
        }
        ContainmentMode::Pgroup => {
            rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
            Ok(None)
        }
    }
}

/// A memfd holding `spec`, for a warm supervisor.
fn spec_memfd(spec: &[u8]) -> io::Result<OwnedFd> {
    let memfd = rustix::fs::memfd_create(c"conch-spec", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut written = 0;
    while written < spec.len() {
        written += rustix::io::write(&memfd, &spec[written..])?;
    }
    Ok(memfd)
}

/// Kill whatever a failed spawn left in its cgroup and remove the cgroup.
fn discard(cgroup: Option<&Cgroup>) {
    if let Some(cg) = cgroup {
        let _ = cg.kill();
        let _ = cg.wait_empty_blocking(DROP_WAIT);
        let _ = cg.remove_blocking();
    }
}
