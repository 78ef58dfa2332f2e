//! Building the `Command`: PATH lookup, environment, containment hooks, error mapping.
//!
//! The program is looked up in PATH here, before fork, so "not found" and "not executable"
//! are decided by conch and not guessed from an errno that the pre-exec hook (writing
//! `cgroup.procs`) could also produce.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ChildCommand, SpawnError, supervisor, sys};

/// Variables conch never passes on: systemd's notify/watchdog protocol belongs to conch, not
/// to its child, and the etcd password is conch's secret.
pub(crate) const STRIPPED_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "CONCH_PASSWORD",
];

/// PATH when neither the child's environment nor conch's has one (glibc's default).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub(crate) fn display(argv0: &OsStr) -> String {
    argv0.to_string_lossy().into_owned()
}

/// Find `argv0` as `execvp` would: a name with a `/` is used as is; otherwise the first
/// executable regular file in PATH (`path_var`, else conch's, else [`DEFAULT_PATH`]).
pub(crate) fn resolve_program(
    argv0: &OsStr,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, SpawnError> {
    let name = display(argv0);
    if argv0.is_empty() {
        return Err(SpawnError::NotFound(name));
    }
    if argv0.as_bytes().contains(&b'/') {
        let path = PathBuf::from(argv0);
        return match candidate(&path) {
            Candidate::Executable => Ok(path),
            Candidate::NotExecutable => Err(SpawnError::NotExecutable(name)),
            Candidate::Missing => Err(SpawnError::NotFound(name)),
        };
    }
    let from_env = std::env::var_os("PATH");
    let path_var = path_var
        .or(from_env.as_deref())
        .unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut saw_non_executable = false;
    for dir in path_var.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let path = dir.join(argv0);
        match candidate(&path) {
            Candidate::Executable => return Ok(path),
            Candidate::NotExecutable => saw_non_executable = true,
            Candidate::Missing => {}
        }
    }
    Err(if saw_non_executable {
        SpawnError::NotExecutable(name)
    } else {
        SpawnError::NotFound(name)
    })
}

enum Candidate {
    Executable,
    NotExecutable,
    Missing,
}

fn candidate(path: &Path) -> Candidate {
    match std::fs::metadata(path) {
        Err(_) => Candidate::Missing,
        Ok(m) if !m.is_file() => Candidate::NotExecutable,
        Ok(_) => {
            let x = rustix::fs::accessat(
                rustix::fs::CWD,
                path,
                rustix::fs::Access::EXEC_OK,
                rustix::fs::AtFlags::EACCESS,
            );
            if x.is_ok() {
                Candidate::Executable
            } else {
                Candidate::NotExecutable
            }
        }
    }
}

/// The `Command` that starts `cmd`'s supervisor: `/proc/self/exe __supervise …` with the
/// resolved program and the original argv, the supervisor's end of the socket `sock` passed
/// through exec, stdio inherited, and the environment the child will have (filtered, then
/// extended; the supervisor passes it on untouched). `cgroup` is the child's cgroup, `None`
/// in pgroup mode (the child then leads a new process group). Keep `sock` open until the
/// command has been spawned.
pub(crate) fn command(
    cmd: &ChildCommand,
    program: &Path,
    sock: BorrowedFd<'_>,
    cgroup: Option<&Path>,
) -> Command {
    let args = supervisor::Args {
        fd: sock.as_raw_fd(),
        cgroup: cgroup.map(Path::to_path_buf),
        program: program.as_os_str().to_owned(),
        argv: cmd.argv.clone(),
    };
    let mut c = Command::new(supervisor::SELF_EXE);
    c.arg0("conch")
        .arg(supervisor::SUBCOMMAND)
        .args(args.to_os_args());
    for key in STRIPPED_ENV {
        c.env_remove(key);
    }
    c.envs(cmd.env.iter().map(|(k, v)| (k, v)));
    if let Some(out) = &cmd.output {
        // A failed dup leaves that stream inherited: output then reaches conch's own stderr
        // unprefixed, which is better than not running the job.
        c.stdin(std::process::Stdio::null());
        if let Ok(fd) = out.try_clone() {
            c.stdout(fd);
        }
        if let Ok(fd) = out.try_clone() {
            c.stderr(fd);
        }
    }
    sys::pass_fd(&mut c, sock);
    c
}

/// PATH as the child will see it, when `cmd.env` sets one.
pub(crate) fn child_path(cmd: &ChildCommand) -> Option<&OsString> {
    cmd.env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v)
}

pub(crate) fn map_error(argv0: &OsStr, e: io::Error) -> SpawnError {
    match e.kind() {
        io::ErrorKind::NotFound => SpawnError::NotFound(display(argv0)),
        io::ErrorKind::PermissionDenied => SpawnError::NotExecutable(display(argv0)),
        _ => SpawnError::Other {
            cmd: display(argv0),
            source: e,
        },
    }
}
