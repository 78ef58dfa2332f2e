//! One command tree: spawn it contained, wait on it through a pidfd, kill all of it.
//!
//! API CONTRACT (fixed; the hold loop in `hold/` and the recipes code against it).
//!
//! How it fits together:
//! - `containment`: cgroup v2 when this host allows it, else a process group + subreaper.
//! - `spawn` + `sys`: PATH lookup, environment, and the pre-exec hook that sets PDEATHSIG,
//!   re-checks the parent and writes the child into its cgroup before anything executes.
//! - `tree`: the pidfd (the one owner of the direct child's exit status), signalling, the kill
//!   schedule. Nothing in conch uses `tokio::process` or a catch-all `waitpid`.
//! - `pgroup`: the `/proc` sweep for the fallback mode; `registry`: live trees for the panic
//!   hook ([`kill_all_live`]).
//!
//! PDEATHSIG follows the forking *thread*: spawn from the thread that outlives the child
//! (conch's current-thread runtime on the main thread), never from a short-lived thread.

mod containment;
mod pgroup;
mod registry;
mod spawn;
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
/// Reaping: the direct child's status is consumed only through its pidfd (`waitid(P_PIDFD)`);
/// in pgroup mode inherited orphans are reaped one pid at a time by the sweep.
#[derive(Debug)]
pub struct Tree {
    /// Key in the live-tree registry.
    id: u64,
    pid: i32,
    /// Shared with the registry so the panic hook can signal the child without the `Tree`.
    pidfd: Arc<OwnedFd>,
    /// The direct child has been reaped (its pid and pgid may be reused from then on).
    reaped: Arc<AtomicBool>,
    /// The pidfd registered with tokio, created on the first `wait`.
    watch: Option<sys::Watched>,
    exit: Option<Exit>,
    scope: registry::Scope,
    /// `kill` was called: pgroup sweeps keep SIGKILLing whatever they find.
    killed: AtomicBool,
    /// `shutdown` completed: the tree is dead and the cgroup removed; `Drop` has nothing to kill.
    finished: bool,
}

impl Tree {
    /// Spawn `cmd` so that it and every descendant is inside the containment before it
    /// executes anything; stdin/stdout/stderr inherited.
    ///
    /// argv[0] is looked up in PATH (the child's, if `cmd.env` sets one) before forking.
    /// `NOTIFY_SOCKET`, `WATCHDOG_PID`, `WATCHDOG_USEC` and `CONCH_PASSWORD` are removed from
    /// the environment, then `cmd.env` is applied. The child gets PDEATHSIG=SIGKILL bound to
    /// the calling thread, so call this from a thread that outlives the child. Blocks until
    /// the child has exec'd (or failed to). In pgroup mode this marks conch as child
    /// subreaper.
    pub fn spawn(containment: &Containment, cmd: &ChildCommand) -> Result<Tree, SpawnError> {
        Tree::spawn_impl(containment, cmd)
    }

    /// pid of the direct child.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The containment mode this tree runs under.
    pub fn mode(&self) -> ContainmentMode {
        match self.scope {
            registry::Scope::Cgroup(_) => ContainmentMode::Cgroup,
            registry::Scope::Pgroup { .. } => ContainmentMode::Pgroup,
        }
    }

    /// The tree's cgroup directory (cgroup mode).
    pub fn cgroup_path(&self) -> Option<&Path> {
        match &self.scope {
            registry::Scope::Cgroup(cg) => Some(cg.path()),
            registry::Scope::Pgroup { .. } => None,
        }
    }

    /// CPU time used by the whole tree so far (`cpu.stat`), in cgroup mode while the cgroup
    /// exists; `None` otherwise.
    pub fn cpu_usage(&self) -> Option<Duration> {
        match &self.scope {
            registry::Scope::Cgroup(cg) => cg.cpu_usage().ok(),
            registry::Scope::Pgroup { .. } => None,
        }
    }

    /// Wait for the direct child to exit (pidfd). Cancel-safe; returns the same value again
    /// once it has exited.
    ///
    /// Needs a tokio runtime with I/O enabled. If something else in the process stole the
    /// child's status (a catch-all `waitpid`), the exit is reported as `Code(-1)`.
    pub async fn wait(&mut self) -> Exit {
        self.wait_impl().await
    }

    /// The direct child's exit if it has already been reaped or can be reaped now; never
    /// blocks.
    pub fn try_wait(&mut self) -> Option<Exit> {
        self.try_reap()
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

impl Drop for Tree {
    /// Kill the whole tree synchronously, block up to 1 s for it to empty and for the direct
    /// child to be reaped, remove the cgroup (best effort) and leave the live-tree registry.
    fn drop(&mut self) {
        self.drop_impl();
    }
}
