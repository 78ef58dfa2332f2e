//! `--daemonize --pidfile`: for hosts with no supervisor at all. conchd re-executes itself
//! detached (new session, stdin from `/dev/null`, output to `--log-file` or `/dev/null`) and
//! the parent returns once the child has written its pidfile. A pidfile naming a live conchd
//! refuses the start.
//!
//! Re-exec instead of fork: conchd is multi-task tokio code; forking a process that may
//! already run threads is unsound, and a fresh exec starts clean.

#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the detached child so it does not detach again.
pub const DETACHED_ENV: &str = "CONCH_CONCHD_DETACHED";

/// How long the parent waits for the detached conchd to write its pidfile.
const START_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonizeError {
    #[error("{path}: conchd is already running as pid {pid}")]
    Running { path: PathBuf, pid: i32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the detached conchd: {0}")]
    Spawn(std::io::Error),
    #[error("the detached conchd did not write {0} within 10s (see --log-file)")]
    NoPidfile(PathBuf),
}

/// The pid in `path` if it names a live conchd process.
pub fn live_pid(path: &Path) -> Option<i32> {
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    let pid: i32 = s.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_conchd = cmdline.split(|b| *b == 0).any(|a| a == b"conchd");
    is_conchd.then_some(pid)
}

/// In the parent: refuse if the pidfile names a live conchd, else start `argv` detached and
/// wait until it has written the pidfile.
pub fn detach(pidfile: &Path, log_file: Option<&Path>) -> Result<i32, DaemonizeError> {
    if let Some(pid) = live_pid(pidfile) {
        return Err(DaemonizeError::Running {
            path: pidfile.into(),
            pid,
        });
    }
    let _ = std::fs::remove_file(pidfile);
    let (out, err) = match log_file {
        Some(p) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(p)
                .map_err(|e| DaemonizeError::Io {
                    path: p.into(),
                    source: e,
                })?;
            let f2 = f.try_clone().map_err(|e| DaemonizeError::Io {
                path: p.into(),
                source: e,
            })?;
            (Stdio::from(f), Stdio::from(f2))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("conch")
        .args(args)
        .env(DETACHED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = cmd.spawn().map_err(DaemonizeError::Spawn)?;
    let pid = child.id() as i32;
    let started = Instant::now();
    while started.elapsed() < START_WAIT {
        if live_pid(pidfile) == Some(pid) {
            return Ok(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(DaemonizeError::NoPidfile(pidfile.into()))
}

/// In the detached child: new session, then write the pidfile (exclusively, so two starts
/// racing cannot both win). Returns a guard that removes the pidfile when dropped.
pub fn write_pidfile(path: &Path) -> Result<PidFile, DaemonizeError> {
    // Only the detached child leaves its session (it is no group leader, so setsid works); a
    // foreground conchd with --pidfile stays where its supervisor or shell put it.
    if std::env::var_os(DETACHED_ENV).is_some() {
        let _ = rustix::process::setsid();
    }
    if let Some(pid) = live_pid(path)
        && pid != std::process::id() as i32
    {
        return Err(DaemonizeError::Running {
            path: path.into(),
            pid,
        });
    }
    let _ = std::fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| DaemonizeError::Io {
            path: path.into(),
            source: e,
        })?;
    writeln!(f, "{}", std::process::id()).map_err(|e| DaemonizeError::Io {
        path: path.into(),
        source: e,
    })?;
    Ok(PidFile(path.to_path_buf()))
}

/// Removes the pidfile on drop if it still names this process.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.0)
            .is_ok_and(|s| s.trim() == std::process::id().to_string())
        {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
