//! cgroup v2 by direct file I/O: detect the hierarchy, create, kill, wait until empty, remove.
//!
//! Why not cgroups-rs: it hard-codes `/sys/fs/cgroup`, treats hybrid hosts (v2 at
//! `/sys/fs/cgroup/unified`) as v1 where `kill()` fails, and cannot wait for `populated 0`.
//! Everything conch needs is a handful of files: `cgroup.procs`, `cgroup.kill`,
//! `cgroup.events`, `cpu.stat`; none of them needs a controller enabled.

mod detect;

pub use detect::{DEFAULT_SLICE, Hierarchy, parse_mountinfo, parse_own_cgroup};

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::Interest;

use crate::child::sys::Watched;

/// How often `wait_empty` re-reads `cgroup.events` even without a notification: a safety net
/// under the POLLPRI wake-up, cheap enough (one small read) to never matter.
const EVENTS_RECHECK: Duration = Duration::from_millis(100);

/// How long `remove` retries `EBUSY`: after `populated 0` the kernel may still be releasing
/// exiting tasks for a few milliseconds.
const REMOVE_RETRY: Duration = Duration::from_secs(1);

/// Pause between `rmdir` attempts while the kernel finishes tearing the cgroup down.
const REMOVE_BACKOFF: Duration = Duration::from_millis(5);

/// A cgroup younger than this is never treated as stale: another conch may have just created
/// it and be about to move its child in.
pub const STALE_MIN_AGE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy found in {path}")]
    NoHierarchy { path: PathBuf },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot create cgroup {path}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cgroup {path} already holds processes")]
    Busy { path: PathBuf },
    #[error("cannot remove cgroup {path}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot watch {path}")]
    Watch { path: PathBuf, source: io::Error },
    #[error("unexpected contents in {path}")]
    Parse { path: PathBuf },
}

/// One cgroup directory in the v2 hierarchy. A plain path: dropping it changes nothing on the
/// system (removal is explicit, see [`Cgroup::remove`]).
#[derive(Debug, Clone)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// Refer to an existing cgroup directory (nothing is checked or created).
    pub fn at(dir: impl Into<PathBuf>) -> Cgroup {
        Cgroup { dir: dir.into() }
    }

    /// Create the leaf cgroup `dir` (and its parents). An existing *empty* cgroup is reused
    /// (a stale one left by a crash with the same name); one holding processes is
    /// [`CgroupError::Busy`].
    pub fn create(dir: impl Into<PathBuf>) -> Result<Cgroup, CgroupError> {
        let cg = Cgroup { dir: dir.into() };
        if let Some(parent) = cg.dir.parent() {
            std::fs::create_dir_all(parent).map_err(|source| CgroupError::Create {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        match std::fs::create_dir(&cg.dir) {
            Ok(()) => Ok(cg),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if cg.populated()? {
                    Err(CgroupError::Busy { path: cg.dir })
                } else {
                    Ok(cg)
                }
            }
            Err(source) => Err(CgroupError::Create {
                path: cg.dir,
                source,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Open `cgroup.procs` for writing (close-on-exec), to be written by a forked child
    /// before exec: writing `0` moves the writer in.
    pub fn open_procs(&self) -> Result<OwnedFd, CgroupError> {
        let path = self.file("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| CgroupError::Write { path, source })?;
        Ok(OwnedFd::from(f))
    }

    /// pids of the processes directly in this cgroup (not in sub-cgroups a child created).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let path = self.file("cgroup.procs");
        let text = read(&path)?;
        text.lines()
            .map(|l| {
                l.trim()
                    .parse()
                    .map_err(|_| CgroupError::Parse { path: path.clone() })
            })
            .collect()
    }

    /// pids of every process in this cgroup and its sub-cgroups.
    pub fn pids_recursive(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = self.pids()?;
        for sub in self.children()? {
            match sub.pids_recursive() {
                Ok(more) => pids.extend(more),
                // A sub-cgroup removed under us held nothing worth signalling.
                Err(CgroupError::Read { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(pids)
    }

    /// SIGKILL every process in the cgroup and its descendants, atomically with respect to
    /// forks (`cgroup.kill`). Returns at once; use [`Cgroup::wait_empty`] to see them gone.
    pub fn kill(&self) -> Result<(), CgroupError> {
        let path = self.file("cgroup.kill");
        std::fs::write(&path, b"1").map_err(|source| CgroupError::Write { path, source })
    }

    /// `populated` from `cgroup.events`: true while any process is in the cgroup's subtree.
    pub fn populated(&self) -> Result<bool, CgroupError> {
        let path = self.file("cgroup.events");
        parse_populated(&read(&path)?).ok_or(CgroupError::Parse { path })
    }

    /// Resolve when the subtree holds no process (`populated 0`).
    ///
    /// Wakes on the kernel's POLLPRI notification on `cgroup.events` and re-reads the file
    /// every [`EVENTS_RECHECK`] in any case, so a transition cannot be missed. Cancel-safe:
    /// all state is local; dropping the future just stops watching.
    pub async fn wait_empty(&self) -> Result<(), CgroupError> {
        let path = self.file("cgroup.events");
        let file = File::open(&path).map_err(|source| CgroupError::Read {
            path: path.clone(),
            source,
        })?;
        // Registration happens before the first read, so a change after that read wakes us.
        let watch = file
            .try_clone()
            .and_then(|dup| Watched::new(OwnedFd::from(dup), Interest::PRIORITY))
            .ok();
        loop {
            if !populated_at(&file, &path)? {
                return Ok(());
            }
            match &watch {
                Some(watch) => {
                    if let Ok(ready) =
                        tokio::time::timeout(EVENTS_RECHECK, watch.ready(Interest::PRIORITY)).await
                    {
                        let mut guard = ready.map_err(|source| CgroupError::Watch {
                            path: path.clone(),
                            source,
                        })?;
                        guard.clear_ready();
                    }
                }
                None => tokio::time::sleep(EVENTS_RECHECK).await,
            }
        }
    }

    /// Blocking form of [`Cgroup::wait_empty`] for `Drop` and panic paths: waits at most
    /// `timeout` with `poll(2)`; `Ok(true)` when the cgroup is empty.
    pub fn wait_empty_blocking(&self, timeout: Duration) -> Result<bool, CgroupError> {
        let path = self.file("cgroup.events");
        let file = File::open(&path).map_err(|source| CgroupError::Read {
            path: path.clone(),
            source,
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            if !populated_at(&file, &path)? {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let wait = left.min(EVENTS_RECHECK);
            let ts = rustix::time::Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let mut fds = [rustix::event::PollFd::new(
                &file,
                rustix::event::PollFlags::PRI,
            )];
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(CgroupError::Watch {
                        path,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// CPU time used by the subtree so far (`usage_usec` in `cpu.stat`).
    pub fn cpu_usage(&self) -> Result<Duration, CgroupError> {
        let path = self.file("cpu.stat");
        let text = read(&path)?;
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_micros)
            .ok_or(CgroupError::Parse { path })
    }

    /// Sub-cgroups (a contained process running as root may create its own).
    fn children(&self) -> Result<Vec<Cgroup>, CgroupError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| CgroupError::Read {
            path: self.dir.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| Cgroup { dir: e.path() })
            .collect())
    }

    /// Remove the cgroup and any sub-cgroups, depth first. The subtree must be empty; `EBUSY`
    /// right after `populated 0` is retried for up to [`REMOVE_RETRY`]. An already removed
    /// cgroup is success. Blocks (briefly sleeping between retries): for `Drop`; async code
    /// uses [`Cgroup::remove`].
    pub fn remove_blocking(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + REMOVE_RETRY;
        loop {
            match self.try_remove() {
                Err(CgroupError::Remove { source, .. })
                    if busy(&source) && Instant::now() < deadline =>
                {
                    std::thread::sleep(REMOVE_BACKOFF);
                }
                other => return other,
            }
        }
    }

    /// Async form of [`Cgroup::remove_blocking`]; cancel-safe (removal is idempotent).
    pub async fn remove(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + REMOVE_RETRY;
        loop {
            match self.try_remove() {
                Err(CgroupError::Remove { source, .. })
                    if busy(&source) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(REMOVE_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    fn try_remove(&self) -> Result<(), CgroupError> {
        match self.children() {
            Ok(children) => {
                for child in children {
                    child.try_remove()?;
                }
            }
            Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CgroupError::Remove {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

/// Remove the stale cgroups directly under `root`: empty, and older than `min_age` (see
/// [`STALE_MIN_AGE`]) so one another conch just created is left alone. Returns the paths
/// removed; a cgroup that cannot be removed is skipped. Blocks on filesystem calls only.
pub fn remove_stale(root: &Path, min_age: Duration) -> Result<Vec<PathBuf>, CgroupError> {
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for cg in Cgroup::at(root).children()? {
        let old_enough = std::fs::metadata(&cg.dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= min_age);
        if old_enough && matches!(cg.populated(), Ok(false)) && cg.try_remove().is_ok() {
            removed.push(cg.dir);
        }
    }
    Ok(removed)
}

fn busy(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Re-read an open `cgroup.events` from offset 0 (which also re-arms its POLLPRI).
fn populated_at(file: &File, path: &Path) -> Result<bool, CgroupError> {
    let mut buf = [0u8; 256];
    let n = file
        .read_at(&mut buf, 0)
        .map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(parse_populated)
        .ok_or_else(|| CgroupError::Parse {
            path: path.to_path_buf(),
        })
}

fn parse_populated(events: &str) -> Option<bool> {
    events
        .lines()
        .find_map(|l| match l.strip_prefix("populated ")?.trim() {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        })
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
