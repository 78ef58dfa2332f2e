//! Building the `Command`: PATH lookup, environment, containment hooks, error mapping.
//!
//! The program is looked up in PATH here, before fork, so "not found" and "not executable"
//! are decided by conch and not guessed from an errno that the pre-exec hook (writing
//! `cgroup.procs`) could also produce.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{ChildCommand, SpawnError, supervisor, sys};

/// Variables conch never passes on: systemd's notify/watchdog protocol belongs to conch, not
/// to its child, and the etcd password is conch's secret.
pub(crate) const STRIPPED_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "CONCH_PASSWORD",
];

/// `name` or `name:password` (cli.md): the child gets the name only, never the password.
const USER_ENV: &str = "CONCH_USER";

fn user_name_only(v: OsString) -> OsString {
    match v.as_bytes().iter().position(|b| *b == b':') {
        Some(i) => OsStr::from_bytes(&v.as_bytes()[..i]).to_owned(),
        None => v,
    }
}

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

/// What starts `cmd`'s supervisor: `/proc/self/exe __supervise …` with the resolved program
/// and the original argv, the supervisor's end of the socket `sock` passed through exec, stdio
/// inherited (or, with `cmd.output`, stdout and stderr to it and stdin from `/dev/null`), and
/// the environment the child will have (conch's minus [`STRIPPED_ENV`], then `cmd.env`; the
/// supervisor passes it on untouched). `cgroup` is the child's cgroup, `None` in pgroup mode
/// (the child then leads a new process group). Keep `sock` open until it has been spawned.
pub(crate) fn command<'a>(
    cmd: &'a ChildCommand,
    program: &Path,
    sock: BorrowedFd<'a>,
    cgroup: Option<&Path>,
) -> io::Result<sys::Launch<'a>> {
    let args = supervisor_args(cmd, program, sys::passed_fd_number(sock), cgroup);
    let argv = [OsString::from("conch"), supervisor::SUBCOMMAND.into()]
        .into_iter()
        .chain(args.to_os_args());
    launch(
        argv,
        child_env(cmd),
        cmd.output.as_ref().map(|o| o.as_fd()),
        sock,
    )
}

/// What starts a *warm* supervisor ([`super::Warm`]): `/proc/self/exe __supervise --fd N
/// --warm`, stdio inherited, conch's environment minus [`STRIPPED_ENV`] (the child's comes
/// with `go`).
pub(crate) fn warm_command(sock: BorrowedFd<'_>) -> io::Result<sys::Launch<'_>> {
    let argv = [
        OsString::from("conch"),
        supervisor::SUBCOMMAND.into(),
        "--fd".into(),
        sys::passed_fd_number(sock).to_string().into(),
        supervisor::WARM.into(),
    ];
    launch(argv, child_env_from(std::iter::empty()), None, sock)
}

/// The supervisor's arguments for `cmd`; `fd` is the number its socket has in it.
pub(crate) fn supervisor_args(
    cmd: &ChildCommand,
    program: &Path,
    fd: i32,
    cgroup: Option<&Path>,
) -> supervisor::Args {
    supervisor::Args {
        fd,
        cgroup: cgroup.map(Path::to_path_buf),
        program: program.as_os_str().to_owned(),
        argv: cmd.argv.clone(),
    }
}

/// The child's environment: conch's minus [`STRIPPED_ENV`], then `cmd.env`.
pub(crate) fn child_env(cmd: &ChildCommand) -> Vec<(OsString, OsString)> {
    child_env_from(cmd.env.iter().cloned())
}

fn child_env_from(extra: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !STRIPPED_ENV.iter().any(|s| k == s))
        .map(|(k, v)| {
            let v = if k == USER_ENV { user_name_only(v) } else { v };
            (k, v)
        })
        .collect();
    for (k, v) in extra {
        env.retain(|(old, _)| *old != k);
        env.push((k, v));
    }
    env
}

fn launch<'a>(
    argv: impl IntoIterator<Item = OsString>,
    env: Vec<(OsString, OsString)>,
    output: Option<BorrowedFd<'a>>,
    sock: BorrowedFd<'a>,
) -> io::Result<sys::Launch<'a>> {
    sys::Launch::new(OsStr::new(supervisor::SELF_EXE), argv, env, output, sock).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
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
