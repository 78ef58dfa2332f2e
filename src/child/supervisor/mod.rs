//! The supervisor: a tiny synchronous process between conch and the child, so the tree dies
//! when conch dies or is stopped (holds.md §6).
//!
//! ```text
//!   conch ──socketpair (SEQPACKET)── supervisor ──fork/exec── child ── grandchildren …
//!   (tokio, etcd)                    (`conch __supervise`,     (in its own cgroup, or
//!                                     own session, 1 thread)    leading its own group)
//! ```
//!
//! conch starts `/proc/self/exe __supervise` (the running binary, even if its file has been
//! replaced by an upgrade). `main.rs` hands over to [`run_if_requested`] before clap, logging
//! or tokio exist, so the supervisor is a plain loop over `poll(2)` with a few small
//! allocations at start. It:
//!
//! 1. calls `setsid()`: terminal job control (Ctrl-C, Ctrl-Z) aimed at conch's foreground
//!    group never reaches it or the child. The child inherits this session, so it has **no
//!    controlling terminal**; its stdin, stdout and stderr are still conch's.
//! 2. forks the child with the same pre-exec containment conch used to apply (PDEATHSIG =
//!    SIGKILL — sound here, the supervisor has one thread —, the parent re-check, `0` into
//!    the cgroup's `cgroup.procs`, or `setpgid(0, 0)` in pgroup mode), default signal
//!    dispositions and an empty signal mask;
//! 3. sends conch the child's pid and a pidfd for it (`SCM_RIGHTS`), so conch signals the
//!    child without ever racing a recycled pid; or the spawn errno;
//! 4. loops: it reports the child's exit status (read with `WNOWAIT`), re-arms a
//!    `CLOCK_BOOTTIME` timerfd whenever conch sends a new deadline D, and
//!    - on end-of-file from conch (conch died: SIGKILL, OOM killer, abort) kills the tree at
//!      once — `cgroup.kill`, or SIGKILL to the process group —, waits a bounded time for it
//!      to go, and exits;
//!    - when D passes with no newer deadline (conch is stopped or frozen), does the same;
//!    - after `done` (conch saw the tree empty) exits quietly once the socket closes.
//!
//! **Warm start** (`--fd N --warm`): conch may start the supervisor ahead of time, while it is
//! still acquiring the hold, to take the supervisor's own start-up off the path between
//! "acquired" and "the child runs". A warm supervisor does steps 1 and nothing else, then
//! blocks until conch sends `go` with a memfd holding the child's spec (the arguments above
//! and the child's whole environment, [`proto::encode_spec`]), and goes on with step 2. If
//! conch's end closes first, it exits: it has started nothing.
//!
//! The supervisor is conch's direct child and stays in conch's cgroup, so "the child's cgroup
//! is empty" still means the real tree is gone. It never exits while conch is alive and the
//! tree may live, except by killing the tree first. Its own signals keep their defaults: if
//! someone kills it, the child's PDEATHSIG fires and conch, seeing end-of-file, kills the
//! rest (fail closed).
//!
//! **Pgroup mode is weaker**: the supervisor can only SIGKILL the process group. A descendant
//! that left the group is found only by conch's own subreaper sweep, which does not run once
//! conch is dead or stopped. To keep the group id from being reused, the supervisor never
//! reaps the child in this mode: the zombie pins pid and pgid, and when the supervisor exits
//! it is re-parented to conch (the subreaper), which reaps it.

pub(crate) mod proto;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use rustix::time::{
    ClockId, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec,
};

use super::sys;
use proto::{Msg, Received};

/// argv[1] that turns the conch binary into a supervisor.
pub(crate) const SUBCOMMAND: &str = "__supervise";

/// The program conch starts: the running binary itself, through the kernel's link, so an
/// upgrade that replaced the file on disk cannot make conch start a different version.
pub(crate) const SELF_EXE: &str = "/proc/self/exe";

/// After killing the tree, how long the supervisor waits for it to be gone before exiting:
/// SIGKILLed processes vanish in milliseconds; one stuck in uninterruptible sleep can take
/// longer, and nothing more can be done for it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Exit codes of the supervisor (only conch reads them, for its log).
const EXIT_DONE: u8 = 0;
const EXIT_KILLED: u8 = 1;
const EXIT_USAGE: u8 = 64;

/// If argv[1] is `__supervise`, run as the supervisor and return its exit code; otherwise
/// `None` and the caller goes on as conch. Call first thing in `main`, before any thread,
/// runtime or logging exists.
pub fn run_if_requested() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != SUBCOMMAND {
        return None;
    }
    Some(ExitCode::from(run(args.collect())))
}

/// The supervisor's arguments: `--fd N (--cgroup DIR | --pgroup) -- PROGRAM ARGV0 [ARGS…]`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Args {
    pub fd: i32,
    /// The child's cgroup directory; `None` in pgroup mode.
    pub cgroup: Option<PathBuf>,
    /// The resolved program to execute.
    pub program: OsString,
    /// The child's argv, argv[0] as the user wrote it.
    pub argv: Vec<OsString>,
}

impl Args {
    /// The arguments after `__supervise`, as conch writes them.
    pub(crate) fn to_os_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec!["--fd".into(), self.fd.to_string().into()];
        match &self.cgroup {
            Some(dir) => out.extend(["--cgroup".into(), dir.clone().into_os_string()]),
            None => out.push("--pgroup".into()),
        }
        out.push("--".into());
        out.push(self.program.clone());
        out.extend(self.argv.iter().cloned());
        out
    }

    /// Parse what [`Args::to_os_args`] wrote; anything else is `None`.
    pub(crate) fn parse(args: Vec<OsString>) -> Option<Args> {
        let mut it = args.into_iter();
        if it.next()? != "--fd" {
            return None;
        }
        let fd = it.next()?.to_str()?.parse().ok()?;
        let cgroup = match it.next()?.to_str()? {
            "--cgroup" => Some(PathBuf::from(it.next()?)),
            "--pgroup" => None,
            _ => return None,
        };
        if it.next()? != "--" {
            return None;
        }
        let program = it.next()?;
        let argv: Vec<OsString> = it.collect();
        if argv.is_empty() {
            return None;
        }
        Some(Args {
            fd,
            cgroup,
            program,
            argv,
        })
    }
}

/// `--warm`, after `--fd N`: wait for conch's `go` before starting anything.
pub(crate) const WARM: &str = "--warm";

/// Run as the supervisor with the arguments after `__supervise`; returns the exit code.
pub(crate) fn run(args: Vec<OsString>) -> u8 {
    if let [flag, fd, warm] = args.as_slice()
        && flag == "--fd"
        && warm == WARM
    {
        let Some(sock) = fd
            .to_str()
            .and_then(|f| f.parse().ok())
            .and_then(take_socket)
        else {
            eprintln!("conch {SUBCOMMAND}: fd {fd:?} is not a socket");
            return EXIT_USAGE;
        };
        return run_warm(sock);
    }
    let Some(args) = Args::parse(args) else {
        eprintln!("conch {SUBCOMMAND}: internal command started with bad arguments");
        return EXIT_USAGE;
    };
    let Some(sock) = take_socket(args.fd) else {
        eprintln!("conch {SUBCOMMAND}: fd {} is not a socket", args.fd);
        return EXIT_USAGE;
    };
    start_and_run(sock, &args, None)
}

/// Adopt the socket conch passed as fd `raw`, and detach from conch's session.
fn take_socket(raw: i32) -> Option<OwnedFd> {
    let sock = sys::adopt_socket(raw)?;
    // Not inherited by the child: conch must see end-of-file when this process dies.
    let _ = rustix::io::fcntl_setfd(&sock, rustix::io::FdFlags::CLOEXEC);
    // Fails only for a group leader, which a freshly spawned process is not.
    let _ = rustix::process::setsid();
    // Its command name would be `exe` (from `/proc/self/exe`); `ps`, `top` and `pgrep conch`
    // should show what it is.
    let _ = rustix::thread::set_name(c"conch");
    Some(sock)
}

/// A warm supervisor: wait for `go` and the child's spec, then start it.
fn run_warm(sock: OwnedFd) -> u8 {
    let spec = loop {
        match proto::recv(&sock, true) {
            Ok(Received::Msg(Msg::Go, Some(memfd))) => break read_spec(memfd),
            Ok(Received::Empty) => continue,
            // conch went away (or spoke out of turn) before `go`: nothing was started.
            _ => return EXIT_DONE,
        }
    };
    let Some((args, env)) = spec.and_then(|(args, env)| Some((Args::parse(args)?, env))) else {
        let errno = rustix::io::Errno::INVAL.raw_os_error();
        let _ = proto::send(sock.as_fd(), Msg::SpawnFailed { errno }, None);
        return EXIT_USAGE;
    };
    start_and_run(sock, &args, Some(&env))
}

/// The spec conch wrote into `memfd` (from its start: the offset is shared with conch's copy).
fn read_spec(memfd: OwnedFd) -> Option<(Vec<OsString>, Vec<OsString>)> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(memfd);
    let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
    if len > proto::SPEC_MAX {
        return None;
    }
    let mut bytes = vec![0; len];
    file.read_exact_at(&mut bytes, 0).ok()?;
    proto::decode_spec(&bytes)
}

/// Start the child (`env`: its whole environment; `None`: this process's own) and supervise it.
fn start_and_run(sock: OwnedFd, args: &Args, env: Option<&[OsString]>) -> u8 {
    match Supervisor::start(sock, args, env) {
        Ok(sup) => {
            // Start-up is over; keep only what the poll loop touches resident.
            sys::shed_clean_file_pages();
            sup.run()
        }
        Err((sock, e)) => {
            let errno = e
                .raw_os_error()
                .unwrap_or(rustix::io::Errno::INVAL.raw_os_error());
            let _ = proto::send(sock.as_fd(), Msg::SpawnFailed { errno }, None);
            EXIT_DONE
        }
    }
}

/// `KEY=value` as (`KEY`, `value`); no `=`: the whole as the key, empty value.
fn split_env(kv: &OsString) -> (OsString, OsString) {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = kv.as_bytes();
    match bytes.iter().position(|b| *b == b'=') {
        Some(i) => (
            OsString::from_vec(bytes[..i].to_vec()),
            OsString::from_vec(bytes[i + 1..].to_vec()),
        ),
        None => (kv.clone(), OsString::new()),
    }
}

/// How the tree is killed.
enum Scope {
    /// Pre-opened `cgroup.kill` and `cgroup.events` of the child's cgroup.
    Cgroup { kill: OwnedFd, events: OwnedFd },
    /// The child leads process group `pgid` (= its pid).
    Pgroup,
}

struct Supervisor {
    sock: OwnedFd,
    pid: i32,
    pidfd: OwnedFd,
    scope: Scope,
    /// `CLOCK_BOOTTIME` timerfd, armed for D.
    timer: OwnedFd,
    /// D in ns since boot, once conch sent one.
    deadline: Option<u64>,
    /// The child's exit was sent to conch.
    reported: bool,
    /// conch said `done`.
    done: bool,
}

/// `clone3` errors that mean "this kernel cannot spawn into a cgroup that way" (too old, or
/// seccomp): fall back to writing `cgroup.procs`.
const CLONE3_UNSUPPORTED: [i32; 4] = [libc::ENOSYS, libc::EINVAL, libc::E2BIG, libc::EPERM];

/// `CONCH_TEST_NO_CLONE3=1` (debug builds, i.e. the tests' binary): take the fallback
/// spawn path, so the tests cover it on kernels where clone3 works.
#[cfg(debug_assertions)]
fn test_no_clone3() -> bool {
    std::env::var_os("CONCH_TEST_NO_CLONE3").is_some_and(|v| v == "1")
}

#[cfg(not(debug_assertions))]
fn test_no_clone3() -> bool {
    false
}

impl Supervisor {
    /// Open the cgroup files, fork the child, and tell conch its pid and pidfd. On failure
    /// the socket comes back to report the error on.
    fn start(
        sock: OwnedFd,
        args: &Args,
        env: Option<&[OsString]>,
    ) -> Result<Supervisor, (OwnedFd, io::Error)> {
        let prepared = (|| -> io::Result<_> {
            let timer = rustix::time::timerfd_create(
                TimerfdClockId::Boottime,
                TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
            )?;
            let (scope, procs, dir_fd) = match &args.cgroup {
                Some(dir) => {
                    let open = |name: &str, flags: OFlags| {
                        rustix::fs::open(dir.join(name), flags | OFlags::CLOEXEC, Mode::empty())
                    };
                    let procs = open("cgroup.procs", OFlags::WRONLY)?;
                    let kill = open("cgroup.kill", OFlags::WRONLY)?;
                    let events = open("cgroup.events", OFlags::RDONLY)?;
                    let dir_fd = open(".", OFlags::RDONLY | OFlags::DIRECTORY)?;
                    (Scope::Cgroup { kill, events }, Some(procs), Some(dir_fd))
                }
                None => (Scope::Pgroup, None, None),
            };
            Ok((timer, scope, procs, dir_fd))
        })();
        let (timer, scope, procs, dir_fd) = match prepared {
            Ok(p) => p,
            Err(e) => return Err((sock, e)),
        };
        let me = rustix::process::getpid();
        // Born in the cgroup (clone3 with CLONE_INTO_CGROUP) where the kernel can; else the
        // child writes itself into cgroup.procs before exec.
        let exec = (!test_no_clone3()).then(|| sys::Exec::new(&args.program, &args.argv, env));
        let cloned = match (&dir_fd, exec.flatten()) {
            (Some(dir), Some(exec)) => match sys::spawn_into_cgroup(&exec, dir.as_fd(), me) {
                Ok(spawned) => Some(Ok(spawned)),
                Err(e) if CLONE3_UNSUPPORTED.contains(&e.raw_os_error().unwrap_or(0)) => None,
                Err(e) => Some(Err(e)),
            },
            _ => None,
        };
        let (pid, pidfd) = match cloned {
            Some(Ok(spawned)) => spawned,
            Some(Err(e)) => return Err((sock, e)),
            None => match Self::spawn_with_command(args, env, &scope, procs, me) {
                Ok(spawned) => spawned,
                Err(e) => return Err((sock, e)),
            },
        };
        let sup = Supervisor {
            sock,
            pid,
            pidfd,
            scope,
            timer,
            deadline: None,
            reported: false,
            done: false,
        };
        Ok(sup)
    }

    /// The fallback spawn: std's `Command`, the child entering its cgroup (if any) by writing
    /// `procs` before exec; the pidfd opened afterwards (the child is unreaped, so its pid
    /// cannot have been reused).
    fn spawn_with_command(
        args: &Args,
        env: Option<&[OsString]>,
        scope: &Scope,
        procs: Option<OwnedFd>,
        me: Pid,
    ) -> io::Result<(i32, OwnedFd)> {
        let mut cmd = Command::new(&args.program);
        cmd.arg0(&args.argv[0]).args(&args.argv[1..]);
        if let Some(env) = env {
            cmd.env_clear();
            for kv in env {
                let (k, v) = split_env(kv);
                cmd.env(k, v);
            }
        }
        if matches!(scope, Scope::Pgroup) {
            cmd.process_group(0);
        }
        sys::contain_before_exec(&mut cmd, me, procs);
        let child = cmd.spawn()?;
        drop(cmd); // closes the cgroup.procs fd
        // std's `Child` is dropped without waiting: the pidfd owns the child's status.
        let pid = child.id() as i32;
        drop(child);
        match Pid::from_raw(pid).map(|p| rustix::process::pidfd_open(p, PidfdFlags::empty())) {
            Some(Ok(fd)) => Ok((pid, fd)),
            failed => {
                // Unreaped, so the pid cannot have been reused: kill and reap it by pid.
                if let Some(p) = Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, Signal::KILL);
                    let _ =
                        rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
                }
                Err(match failed {
                    Some(Err(e)) => e.into(),
                    _ => io::Error::from_raw_os_error(rustix::io::Errno::SRCH.raw_os_error()),
                })
            }
        }
    }

    /// Tell conch about the child, then watch conch, the deadline and the child until one of
    /// the endings in the module docs. Returns the exit code.
    fn run(mut self) -> u8 {
        if proto::send(
            self.sock.as_fd(),
            Msg::Spawned { pid: self.pid },
            Some(self.pidfd.as_fd()),
        )
        .is_err()
        {
            return self.kill_tree("conch is gone");
        }
        loop {
            if !self.done && self.deadline.is_some_and(|d| boot_ns() >= d) {
                return self.kill_tree("the hold deadline passed while conch did not respond");
            }
            self.arm_timer();
            let watch_child = !self.reported;
            let mut fds = [
                PollFd::new(&self.sock, PollFlags::IN),
                PollFd::new(&self.timer, PollFlags::IN),
                PollFd::new(&self.pidfd, PollFlags::IN),
            ];
            let n = if watch_child { 3 } else { 2 };
            match rustix::event::poll(&mut fds[..n], None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return self.kill_tree("cannot poll"),
            }
            let child_ready = watch_child && !fds[2].revents().is_empty();
            let sock_ready = !fds[0].revents().is_empty();
            if !fds[1].revents().is_empty() {
                let mut ticks = [0u8; 8];
                let _ = rustix::io::read(&self.timer, &mut ticks);
            }
            if child_ready {
                self.report_exit();
            }
            if sock_ready && let Some(code) = self.read_conch() {
                return code;
            }
        }
    }

    /// Read every pending message from conch; `Some(exit code)` when the supervisor is done.
    fn read_conch(&mut self) -> Option<u8> {
        loop {
            match proto::recv(&self.sock, false) {
                Ok(Received::Empty) => return None,
                Ok(Received::Msg(Msg::Deadline { boot_ns }, _)) => self.deadline = boot_ns,
                Ok(Received::Msg(Msg::Done, _)) => self.done = true,
                Ok(Received::Closed) if self.done => return Some(self.finish_quietly()),
                // End-of-file, a message conch never sends, or a broken socket: conch is gone.
                Ok(Received::Closed | Received::Msg(..)) | Err(_) => {
                    return Some(self.kill_tree("conch is gone"));
                }
            }
        }
    }

    /// Arm the timerfd for D (absolute, `CLOCK_BOOTTIME`), or disarm it.
    fn arm_timer(&self) {
        let at = match self.deadline {
            Some(ns) if !self.done => ns.max(1),
            _ => 0,
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: (at / 1_000_000_000) as i64,
                tv_nsec: (at % 1_000_000_000) as i64,
            },
        };
        let _ = rustix::time::timerfd_settime(&self.timer, TimerfdTimerFlags::ABSTIME, &spec);
    }

    /// Send the child's exit to conch if it has exited; the child stays unreaped (`WNOWAIT`).
    fn report_exit(&mut self) {
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        let msg = loop {
            match rustix::process::waitid(WaitId::PidFd(self.pidfd.as_fd()), options) {
                Ok(Some(status)) => match (status.exit_status(), status.terminating_signal()) {
                    (Some(code), _) => break Msg::Exited { code },
                    (None, Some(signal)) => break Msg::Signaled { signal },
                    (None, None) => return,
                },
                Ok(None) => return,
                Err(rustix::io::Errno::INTR) => continue,
                // Cannot happen for our own unreaped child; report it as lost.
                Err(_) => {
                    break Msg::Exited {
                        code: super::tree::STATUS_LOST,
                    };
                }
            }
        };
        self.reported = true;
        let _ = proto::send(self.sock.as_fd(), msg, None);
    }

    /// SIGKILL the whole tree, wait (bounded) for it to go, report the child's exit if conch
    /// can still read it, and return the exit code.
    fn kill_tree(&mut self, why: &str) -> u8 {
        match &self.scope {
            Scope::Cgroup { kill, .. } => {
                let _ = rustix::io::write(kill, b"1");
            }
            Scope::Pgroup => {
                // The unreaped child pins the group id: this cannot hit a recycled group.
                if let Some(pg) = Pid::from_raw(self.pid) {
                    let _ = rustix::process::kill_process_group(pg, Signal::KILL);
                }
            }
        }
        // The direct child too, in case it left its cgroup or group.
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, Signal::KILL);
        let until = mono_now() + KILL_WAIT;
        if !self.reported {
            wait_fd(&self.pidfd, PollFlags::IN, until);
            self.report_exit();
        }
        if let Scope::Cgroup { events, .. } = &self.scope {
            while populated(events) && mono_now() < until {
                wait_fd(events, PollFlags::PRI, until);
            }
        }
        eprintln!(
            "conch: {why}; the child tree was killed (supervisor {})",
            std::process::id()
        );
        self.reap();
        EXIT_KILLED
    }

    /// `done` and end-of-file: the tree is empty and conch finishes normally.
    fn finish_quietly(&self) -> u8 {
        self.reap();
        EXIT_DONE
    }

    /// Reap the child before exiting, in cgroup mode only (see the module docs on pgroup).
    fn reap(&self) {
        if matches!(self.scope, Scope::Cgroup { .. }) {
            let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
            let _ = rustix::process::waitid(WaitId::PidFd(self.pidfd.as_fd()), options);
        }
    }
}

/// `populated 1` in an open `cgroup.events` (re-read from the start, which re-arms POLLPRI).
/// Unreadable counts as empty: the cgroup is gone.
fn populated(events: &OwnedFd) -> bool {
    let mut buf = [0u8; 128];
    match rustix::io::pread(events, &mut buf, 0) {
        Ok(n) => buf[..n]
            .split(|b| *b == b'\n')
            .any(|line| line == b"populated 1"),
        Err(_) => false,
    }
}

/// Block until `fd` reports `flags` or `until` (monotonic) passes.
fn wait_fd(fd: &OwnedFd, flags: PollFlags, until: Duration) {
    let left = until.saturating_sub(mono_now());
    let Ok(ts) = Timespec::try_from(left) else {
        return;
    };
    let mut fds = [PollFd::new(fd, flags)];
    let _ = rustix::event::poll(&mut fds, Some(&ts));
}

/// `CLOCK_BOOTTIME` now, in ns: the clock conch's deadlines are on.
fn boot_ns() -> u64 {
    let ts = rustix::time::clock_gettime(ClockId::Boottime);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC` now, for the supervisor's own bounded waits.
fn mono_now() -> Duration {
    let ts = rustix::time::clock_gettime(ClockId::Monotonic);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests;
