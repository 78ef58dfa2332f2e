//! One command tree: spawn it contained, learn its exit, kill all of it.
//!
//! API CONTRACT (fixed; the hold loop in `hold/` and the recipes code against it).
//!
//! How it fits together:
//! - `containment`: cgroup v2 when this host allows it, else a process group + subreaper.
//! - `supervisor`: the small process (`conch __supervise`, a re-exec of this binary) that
//!   sits between conch and the child. It forks the child with the pre-exec containment of
//!   `sys` (PDEATHSIG, parent re-check, into the cgroup before anything executes), reports its
//!   exit, and kills the whole tree when conch dies (end-of-file on their socket) or stops
//!   renewing the deadline D ([`Tree::set_deadline`]). `link` is conch's end of it.
//! - `spawn`: PATH lookup and environment, decided in conch before the supervisor starts.
//! - `tree`: signalling (through the child's pidfd, received from the supervisor), the kill
//!   schedule. Nothing in conch uses `tokio::process` or a catch-all `waitpid`.
//! - `pgroup`: the `/proc` sweep for the fallback mode; `registry`: live trees for the panic
//!   hook ([`kill_all_live`]) and for the sweeps.
//!
//! Only the supervisor forks the child, and it is single-threaded, so PDEATHSIG is sound and
//! conch may spawn trees from any thread. The child runs in the supervisor's new session: it
//! has no controlling terminal (its stdin, stdout and stderr are conch's), and terminal
//! job-control signals reach conch only, which ends or forwards as holds.md §6 says.

mod containment;
mod link;
mod pgroup;
mod registry;
mod spawn;
pub mod supervisor;
pub(crate) mod sys;
#[cfg(test)]
mod tests;
mod tree;

pub use registry::kill_all_live;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// What the operator asked for with `--containment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainmentRequest {
    Auto,
    Cgroup,
    Pgroup,
}

/// The mode actually in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainmentMode {
    Cgroup,
    Pgroup,
}

impl ContainmentMode {
    /// `"cgroup"` or `"pgroup"`, as stored in holder records.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainmentMode::Cgroup => "cgroup",
            ContainmentMode::Pgroup => "pgroup",
        }
    }
}

/// Containment resolved for this host.
#[derive(Debug, Clone)]
pub struct Containment {
    pub mode: ContainmentMode,
    /// Where children's cgroups are created (`<v2 mount>/conch.slice` by default); `None` in pgroup mode.
    pub cgroup_root: Option<PathBuf>,
    /// Why this mode: shown by `conch version` and in the pgroup warning.
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainmentError {
    /// `--containment cgroup` was demanded but cgroups cannot be used here.
    #[error("cannot contain children in a cgroup: {0}")]
    CgroupUnavailable(String),
}

impl Containment {
    /// Decide the mode: find the v2 hierarchy, check it is writable (and capabilities with
    /// `caps`), create `cgroup_root` if needed and remove stale child cgroups there.
    /// `Auto` falls back to `Pgroup` (the caller logs `reason` as a warning); `Cgroup` errors.
    ///
    /// A relative `cgroup_root` is taken below the v2 mount. Blocks on filesystem calls only.
    pub fn resolve(
        request: ContainmentRequest,
        cgroup_root: Option<PathBuf>,
    ) -> Result<Containment, ContainmentError> {
        containment::decide(request, cgroup_root, true)
    }

    /// Like `resolve` but creates and removes nothing (for `conch version`).
    pub fn probe(
        request: ContainmentRequest,
        cgroup_root: Option<PathBuf>,
    ) -> Result<Containment, ContainmentError> {
        containment::decide(request, cgroup_root, false)
    }
}

/// A command to run as a contained tree.
#[derive(Debug, Clone)]
pub struct ChildCommand {
    /// argv[0] is looked up in PATH.
    pub argv: Vec<OsString>,
    /// Variables added to (or replacing in) conch's own environment.
    pub env: Vec<(OsString, OsString)>,
    /// Leaf name of the child's cgroup, e.g. `elect-api-694d7b5c1e2a3f01` (already safe for a path).
    pub cgroup_leaf: String,
    /// `None`: stdin, stdout and stderr are conch's. `Some(w)`: stdout and stderr go to `w`
    /// (the write end of a pipe, say) and stdin is `/dev/null` (conchd's jobs).
    pub output: Option<Arc<OwnedFd>>,
}

/// How the direct child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("{0}: permission denied")]
    NotExecutable(String),
    #[error("cannot start {cmd}: {source}")]
    Other { cmd: String, source: std::io::Error },
}

/// A running (or finished) child tree. Dropping it kills the whole tree synchronously and
/// removes its cgroup (best effort): no child outlives its `Tree`.
///
/// The direct child is the child of the tree's supervisor process, which reports its exit
/// status to conch; conch reaps the supervisor (and, in pgroup mode, the direct child it
/// leaves behind) when the tree is finished.
#[derive(Debug)]
pub struct Tree {
    /// Key in the live-tree registry.
    id: u64,
    pid: i32,
    /// The direct child's pidfd, sent by the supervisor. Shared with the registry so the
    /// panic hook can signal the child without the `Tree`.
    pidfd: Arc<OwnedFd>,
    /// The direct child has been reaped (its pid and pgid may be reused from then on).
    reaped: Arc<AtomicBool>,
    /// The supervisor and the socket to it.
    link: link::Link,
    exit: Option<Exit>,
    scope: registry::Scope,
    /// `kill` was called: pgroup sweeps keep SIGKILLing whatever they find.
    killed: AtomicBool,
    /// `shutdown` completed: the tree is dead and the cgroup removed; `Drop` has nothing to kill.
    finished: bool,
}

impl Tree {
    /// Spawn `cmd` so that it and every descendant is inside the containment before it
    /// executes anything; stdin/stdout/stderr inherited, no controlling terminal.
    ///
    /// argv[0] is looked up in PATH (the child's, if `cmd.env` sets one) before anything is
    /// started. `NOTIFY_SOCKET`, `WATCHDOG_PID`, `WATCHDOG_USEC` and `CONCH_PASSWORD` are
    /// removed from the environment, then `cmd.env` is applied. Starts the tree's supervisor
    /// (`/proc/self/exe __supervise`), which forks the child with PDEATHSIG=SIGKILL, default
    /// signal dispositions and an empty signal mask; may be called from any thread. Blocks
    /// until the child has exec'd (or failed to). Until the first [`Tree::set_deadline`] the
    /// supervisor enforces no deadline, only conch's death. In pgroup mode this marks conch as
    /// child subreaper.
    pub fn spawn(containment: &Containment, cmd: &ChildCommand) -> Result<Tree, SpawnError> {
        Tree::spawn_impl(containment, cmd)
    }

    /// Start a supervisor ahead of its child, to take its start-up off the path between
    /// "the hold is ours" and "the child runs": call while acquiring, then [`Warm::start`].
    /// The warm supervisor starts nothing until then; dropped unused, it is killed and reaped.
    pub fn prepare() -> std::io::Result<Warm> {
        Tree::prepare_impl()
    }

    /// Tell the supervisor the instant D by which the whole tree must be dead (`None`: no
    /// deadline). If D passes without a newer one — conch is stopped, frozen or wedged — the
    /// supervisor kills the tree on its own and exits; [`Tree::wait`] then reports the kill.
    /// Never blocks; repeating the same D sends nothing.
    pub fn set_deadline(&self, d: Option<crate::hold::clock::BootInstant>) {
        self.set_deadline_impl(d);
    }

    /// pid of the direct child.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The containment mode this tree runs under.
    pub fn mode(&self) -> ContainmentMode {
        match self.scope {
            registry::Scope::Cgroup(_) => ContainmentMode::Cgroup,
            registry::Scope::Pgroup => ContainmentMode::Pgroup,
        }
    }

    /// The tree's cgroup directory (cgroup mode).
    pub fn cgroup_path(&self) -> Option<&Path> {
        match &self.scope {
            registry::Scope::Cgroup(cg) => Some(cg.path()),
            registry::Scope::Pgroup => None,
        }
    }

    /// CPU time used by the whole tree so far (`cpu.stat`), in cgroup mode while the cgroup
    /// exists; `None` otherwise.
    pub fn cpu_usage(&self) -> Option<Duration> {
        match &self.scope {
            registry::Scope::Cgroup(cg) => cg.cpu_usage().ok(),
            registry::Scope::Pgroup => None,
        }
    }

    /// Wait for the direct child to exit, as its supervisor reports it. Cancel-safe; returns
    /// the same value again once it has exited.
    ///
    /// Needs a tokio runtime with I/O enabled. If the supervisor dies without reporting, the
    /// tree is killed at once (fail closed) and the exit is `Signal(9)`; a status the
    /// supervisor could not read is `Code(-1)`.
    pub async fn wait(&mut self) -> Exit {
        self.wait_impl().await
    }

    /// The direct child's exit if the supervisor has reported it; never blocks.
    pub fn try_wait(&mut self) -> Option<Exit> {
        self.poll_exit()
    }

    /// Forward a signal (HUP, USR1, …) to the direct child through its pidfd.
    ///
    /// Signals without a name (real-time signals) are not forwarded. Never blocks; a child
    /// that has already exited is ignored.
    pub fn forward(&self, signal: i32) {
        match rustix::process::Signal::from_named_raw(signal) {
            Some(sig) => {
                let _ = rustix::process::pidfd_send_signal(&*self.pidfd, sig);
            }
            None => tracing::warn!(pid = self.pid, signal, "signal-not-forwarded"),
        }
    }

    /// SIGTERM and SIGCONT to every process of the tree.
    ///
    /// Cgroup mode: every pid in the cgroup (and any sub-cgroup), pinned with a pidfd so a
    /// recycled pid is never hit. Pgroup mode: the process group plus every swept
    /// descendant. Never blocks beyond reading `/proc` or `cgroup.procs`.
    pub fn terminate(&self) {
        self.signal_tree(&[rustix::process::Signal::TERM, rustix::process::Signal::CONT]);
    }

    /// SIGKILL the whole tree (`cgroup.kill`, or the process group plus a sweep).
    ///
    /// Does not wait; [`Tree::wait_empty`] observes the result (and, in pgroup mode, keeps
    /// killing descendants that were forked during the sweep).
    pub fn kill(&self) {
        self.kill_impl();
    }

    /// Resolve when no process of the tree is left (`populated 0`). Cancel-safe.
    ///
    /// Cgroup mode wakes on `cgroup.events` notifications; pgroup mode re-scans `/proc` every
    /// 10 ms, reaping inherited zombies. Zombies do not count; the direct child's own status
    /// stays for [`Tree::wait`].
    pub async fn wait_empty(&mut self) {
        self.wait_empty_impl().await
    }

    /// The kill schedule: `terminate`, wait up to `grace` for the tree to empty, `kill`,
    /// wait until empty, remove the cgroup. Returns the direct child's exit.
    ///
    /// After the tree is empty the direct child is also SIGKILLed through its pidfd (in case
    /// it moved itself out of its cgroup or group) before being reaped. Blocks (asynchronously)
    /// until every process is gone, however long SIGKILL takes. Cancelling it leaves the tree
    /// partly signalled; calling `shutdown` again, or dropping the `Tree`, finishes the job.
    pub async fn shutdown(&mut self, grace: Duration) -> Exit {
        self.shutdown_impl(grace).await
    }
}

/// A supervisor started by [`Tree::prepare`], waiting to start a child.
#[derive(Debug)]
pub struct Warm {
    /// `None` once started.
    parts: Option<WarmParts>,
}

#[derive(Debug)]
pub(crate) struct WarmParts {
    id: u64,
    pid: i32,
    pidfd: Arc<OwnedFd>,
    sock: OwnedFd,
    /// The number of the supervisor's end of the socket in the supervisor.
    fd: i32,
    reaped: Arc<AtomicBool>,
}

impl Warm {
    /// [`Tree::spawn`] through this supervisor: the same containment, environment, errors and
    /// blocking. A job whose output goes to a pipe (`cmd.output`), or a supervisor that died
    /// while it waited, gets a freshly started supervisor instead.
    pub fn start(
        mut self,
        containment: &Containment,
        cmd: &ChildCommand,
    ) -> Result<Tree, SpawnError> {
        match self.parts.take() {
            Some(parts) if cmd.output.is_none() => Tree::start_warm(parts, containment, cmd),
            other => {
                drop(Warm { parts: other });
                Tree::spawn_impl(containment, cmd)
            }
        }
    }
}

impl Drop for Warm {
    /// Close the socket (the supervisor exits on end-of-file), kill it to be sure, reap it.
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            link::Link::new(parts.sock, parts.pid, parts.pidfd).abort();
            registry::unregister(parts.id);
        }
    }
}

impl Drop for Tree {
    /// Kill the whole tree synchronously, block up to 1 s for it to empty and for the direct
    /// child to be reaped, remove the cgroup (best effort) and leave the live-tree registry.
    fn drop(&mut self) {
        self.drop_impl();
    }
}
