//! The only `unsafe` in conch: starting a supervisor with `posix_spawn`, the code between fork
//! (or clone3) and exec, taking over the fd the supervisor inherits, registering owned fds
//! with tokio's reactor, and (in test builds) the hook that lets the test binary act as a
//! supervisor.
//!
//! Between fork and exec only async-signal-safe calls are allowed: raw syscalls through rustix
//! or libc (no allocation, no locks, no logging). Errors become `io::Error::from_raw_os_error`,
//! which does not allocate; std reports them to the parent as the spawn error.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::{Pid, Signal};
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

/// Make the child, before it executes anything: ask for SIGKILL when its parent (the
/// supervisor, `parent`) dies, verify the parent has not already died (fail if it has), move
/// itself into the cgroup whose `cgroup.procs` is `procs` (when given) so every later
/// descendant is born inside, and start from default signal dispositions and an empty mask.
///
/// PDEATHSIG follows the forking *thread*: call this only in a process whose forking thread
/// lives as long as the child (the single-threaded supervisor).
pub(crate) fn contain_before_exec(cmd: &mut Command, parent: Pid, procs: Option<OwnedFd>) {
    let hook = move || -> io::Result<()> {
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        if rustix::process::getppid() != Some(parent) {
            // The parent died between fork and prctl: PDEATHSIG will never fire, so do not run.
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::SRCH.raw_os_error(),
            ));
        }
        if let Some(procs) = &procs {
            rustix::io::write(procs, b"0")?;
        }
        default_signals();
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec. It only makes raw syscalls
    // (prctl, getppid, write, sigaction, sigprocmask) through rustix and libc and builds
    // errors from errno values, none of which allocates, takes a lock or touches state another
    // thread could have left inconsistent at fork; it borrows only the fd it owns.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Every catchable signal back to `SIG_DFL` and nothing blocked: ignored signals survive
/// `exec`, so without this a child would inherit whatever its ancestors ignored. Async-signal
/// safe.
///
/// The raw `rt_sigaction` syscall is used because glibc's wrappers refuse signals 32 and 33
/// (reserved for its own threads), which a parent may still have left ignored. An all-zero
/// kernel `struct sigaction` means `SIG_DFL`, no flags, empty mask, whatever the field order.
fn default_signals() {
    const KERNEL_SIGSET_BYTES: usize = 8;
    let dfl = [0u64; 4];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `rt_sigaction` reads a zeroed `struct sigaction` (no larger than 32 bytes on
        // any Linux target) from `dfl`, installs no handler, and writes nothing back (null old
        // action); an invalid number only returns an error.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                KERNEL_SIGSET_BYTES,
            );
        }
    }
    let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigemptyset` initialises the set it is given; `sigprocmask` only reads it.
    // Both are async-signal-safe.
    unsafe {
        if libc::sigemptyset(empty.as_mut_ptr()) == 0 {
            libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
        }
    }
}

/// Take ownership of the socket conch passed to the supervisor as fd `raw`. `None` if `raw`
/// is a standard stream, not open, or not a socket.
///
/// Call once, at the supervisor's start: nothing else in the process owns a descriptor above 2
/// yet.
pub(crate) fn adopt_socket(raw: RawFd) -> Option<OwnedFd> {
    if raw <= 2 {
        return None;
    }
    // SAFETY: F_GETFD only queries the descriptor table; an unused number gives EBADF.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: `raw` is open (checked above) and, at the supervisor's start, owned by nothing
    // else in this process: std opens no descriptor above 2 before `main`.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let stat = rustix::fs::fstat(&fd).ok()?;
    (rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Socket)
        .then_some(fd)
}

/// An owned fd registered with the tokio reactor. Wrapping `AsyncFd` keeps the fd out of
/// reach: nothing can close or replace it while it is registered, which is what tokio's
/// registration requires. Dropping it deregisters and then closes the fd.
#[derive(Debug)]
pub(crate) struct Watched(AsyncFd<OwnedFd>);

impl Watched {
    /// Register `fd` for `interest`. Must be called inside a tokio runtime (panics otherwise).
    pub(crate) fn new(fd: OwnedFd, interest: Interest) -> io::Result<Watched> {
        // SAFETY: `fd` is a valid open fd owned by the `AsyncFd` for its whole life; `Watched`
        // never exposes `&mut OwnedFd`, so it cannot be closed, swapped or replaced while
        // registered, and `as_raw_fd` keeps returning the same number.
        let afd =
            unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)?;
        Ok(Watched(afd))
    }

    /// Wait for `interest` readiness. Cancel-safe. Call `clear_ready` on the guard after
    /// observing that the condition does not (yet) hold.
    pub(crate) async fn ready(
        &self,
        interest: Interest,
    ) -> io::Result<AsyncFdReadyGuard<'_, OwnedFd>> {
        self.0.ready(interest).await
    }
}

impl Watched {
    /// Poll for read readiness (for hand-written futures). Same contract as [`Watched::ready`].
    pub(crate) fn poll_read_ready<'a>(
        &'a self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<AsyncFdReadyGuard<'a, OwnedFd>>> {
        self.0.poll_read_ready(cx)
    }
}

impl AsFd for Watched {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

/// Ignore `sig` in this whole (test) process, as a parent of conch might have: children must
/// still start with the default action.
#[cfg(test)]
pub(crate) fn ignore_signal(sig: i32) {
    // SAFETY: installing `SIG_IGN` runs no code in the process; tests choose a signal nothing
    // else in the test binary handles.
    unsafe {
        libc::signal(sig, libc::SIG_IGN);
    }
}

/// Drop this process's resident copies of file pages it never wrote (conch's own code and
/// read-only data, libc's, the loader's). Used once by the supervisor after it started the
/// child: its start-up touched code all over the binary (and the kernel maps 64 KiB around
/// every fault), while its poll loop needs a few pages, which come back on demand.
///
/// Only private file mappings holding no anonymous (copied-on-write) page are dropped: every
/// resident page there is a clean copy of the file, so nothing can be lost. The process is
/// single-threaded here, so nothing writes between reading `smaps` and `madvise`.
pub(crate) fn shed_clean_file_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            // A mapping header: `lo-hi perms offset dev inode path`.
            let perms = f.next().unwrap_or("");
            let path = f.nth(3).unwrap_or("");
            current = (perms.ends_with('p') && path.starts_with('/')).then_some((lo, hi));
            continue;
        }
        if first == "Anonymous:"
            && let Some((lo, hi)) = current.take()
            && f.next() == Some("0")
        {
            // SAFETY: [lo, hi) is a whole private, file-backed mapping the kernel lists with
            // no anonymous page: every resident page is an unmodified copy of the file, which
            // MADV_DONTNEED discards and the next access reads back unchanged. No memory this
            // process relies on changes.
            let _ = unsafe {
                rustix::mm::madvise(lo as *mut _, hi - lo, rustix::mm::Advice::LinuxDontNeed)
            };
        }
    }
}

/// The number `fd` gets in a process [`Launch`] starts: any number above stdio works; 3 unless
/// that is `fd` itself (dup2 onto itself would leave it close-on-exec).
pub(crate) fn passed_fd_number(fd: BorrowedFd<'_>) -> RawFd {
    if fd.as_raw_fd() == 3 { 4 } else { 3 }
}

/// A supervisor to start: everything [`Launch::spawn`] needs, prepared (allocated) before the
/// spawn. Build it with [`Launch::new`].
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    program: std::ffi::CString,
    argv: Vec<std::ffi::CString>,
    env: Vec<std::ffi::CString>,
    /// The job's output (stdout and stderr), with stdin from `/dev/null`; `None`: inherit all
    /// three.
    output: Option<BorrowedFd<'a>>,
    /// The fd to pass, and the number it gets in the supervisor.
    pass: (BorrowedFd<'a>, RawFd),
}

impl<'a> Launch<'a> {
    /// `program` with `argv` (argv[0] included) and exactly the environment `env`, stdio
    /// inherited or (`output`) stdout and stderr to `output` and stdin from `/dev/null`, and
    /// `pass` open as fd [`passed_fd_number`] — every other fd of conch is close-on-exec.
    /// `None` if a string contains a NUL byte.
    pub(crate) fn new(
        program: &std::ffi::OsStr,
        argv: impl IntoIterator<Item = std::ffi::OsString>,
        env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
        output: Option<BorrowedFd<'a>>,
        pass: BorrowedFd<'a>,
    ) -> Option<Launch<'a>> {
        use std::os::unix::ffi::OsStrExt;
        let c = |s: &std::ffi::OsStr| std::ffi::CString::new(s.as_bytes()).ok();
        let target = passed_fd_number(pass);
        Some(Launch {
            program: c(program)?,
            argv: argv.into_iter().map(|a| c(&a)).collect::<Option<_>>()?,
            env: env
                .into_iter()
                .map(|(mut k, v)| {
                    k.push("=");
                    k.push(v);
                    c(&k)
                })
                .collect::<Option<_>>()?,
            output,
            pass: (pass, target),
        })
    }

    /// The environment, `KEY=value`, as the process will get it.
    #[cfg(test)]
    pub(crate) fn env(&self) -> impl Iterator<Item = &std::ffi::CStr> {
        self.env.iter().map(|s| s.as_c_str())
    }

    /// Start it with `posix_spawn`: glibc's vfork-style clone shares conch's memory until the
    /// exec instead of copying its page tables, so the cost does not grow with conchd's size
    /// or thread count (a fork of a busy conchd cost milliseconds of system time per run).
    /// The process starts with default signal dispositions and an empty signal mask. Returns
    /// its pid.
    pub(crate) fn spawn(&self) -> io::Result<i32> {
        let nul_terminated = |v: &[std::ffi::CString]| {
            v.iter()
                .map(|s| s.as_ptr().cast_mut())
                .chain(std::iter::once(std::ptr::null_mut()))
                .collect::<Vec<*mut libc::c_char>>()
        };
        let argv = nul_terminated(&self.argv);
        let envp = nul_terminated(&self.env);
        let mut actions = SpawnActions::new()?;
        if let Some(out) = self.output {
            actions.open_null_stdin()?;
            actions.dup2(out.as_raw_fd(), 1)?;
            actions.dup2(out.as_raw_fd(), 2)?;
        }
        // Last: `pass.1` may be the number `output` had, which is copied by now.
        actions.dup2(self.pass.0.as_raw_fd(), self.pass.1)?;
        let attr = SpawnAttr::new()?;
        let mut pid: libc::pid_t = 0;
        // SAFETY: every pointer is valid for the call: `program`, `argv` and `envp` point to
        // NUL-terminated strings owned by `self` and NULL-terminated arrays alive until the
        // end of this function; `actions` and `attr` are initialised and destroyed only on
        // drop. The fds the actions name are borrowed by `self`, so open. posix_spawn does
        // not keep any pointer after it returns.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                self.program.as_ptr(),
                &actions.0,
                &attr.0,
                argv.as_ptr(),
                envp.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(pid)
    }
}

/// `posix_spawn_file_actions_t`, destroyed on drop.
struct SpawnActions(libc::posix_spawn_file_actions_t);

impl SpawnActions {
    fn new() -> io::Result<SpawnActions> {
        // SAFETY: all-zero is a valid bit pattern for this plain C struct, and `_init`
        // initialises it before any other use.
        let mut a = SpawnActions(unsafe { std::mem::zeroed() });
        // SAFETY: `a.0` is writable memory for the struct.
        errno(unsafe { libc::posix_spawn_file_actions_init(&mut a.0) })?;
        Ok(a)
    }

    fn dup2(&mut self, fd: RawFd, to: RawFd) -> io::Result<()> {
        // SAFETY: `self.0` was initialised by `_init`; the call only records the action.
        errno(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, to) })
    }

    fn open_null_stdin(&mut self) -> io::Result<()> {
        // SAFETY: `self.0` was initialised by `_init`; glibc copies the path string.
        errno(unsafe {
            libc::posix_spawn_file_actions_addopen(
                &mut self.0,
                0,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
                0,
            )
        })
    }
}

impl Drop for SpawnActions {
    fn drop(&mut self) {
        // SAFETY: initialised by `_init` in `new`, destroyed exactly once here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// `posix_spawnattr_t` asking for an empty signal mask and default dispositions, destroyed
/// on drop.
struct SpawnAttr(libc::posix_spawnattr_t);

impl SpawnAttr {
    fn new() -> io::Result<SpawnAttr> {
        // SAFETY: as for `SpawnActions::new`: zeroed, then initialised by `_init`.
        let mut a = SpawnAttr(unsafe { std::mem::zeroed() });
        // SAFETY: `a.0` is writable memory for the struct.
        errno(unsafe { libc::posix_spawnattr_init(&mut a.0) })?;
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `sigemptyset`/`sigfillset` initialise the sets they are given; the
        // `posix_spawnattr_set*` calls copy them into the initialised attribute.
        unsafe {
            libc::sigemptyset(empty.as_mut_ptr());
            libc::sigfillset(all.as_mut_ptr());
            errno(libc::posix_spawnattr_setsigmask(&mut a.0, empty.as_ptr()))?;
            errno(libc::posix_spawnattr_setsigdefault(&mut a.0, all.as_ptr()))?;
            errno(libc::posix_spawnattr_setflags(
                &mut a.0,
                (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
            ))?;
        }
        Ok(a)
    }
}

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialised by `_init` in `new`, destroyed exactly once here.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// The posix_spawn family returns an errno value instead of setting `errno`.
fn errno(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// `CLONE_INTO_CGROUP` (Linux 5.7): libc does not export it.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What [`spawn_into_cgroup`] needs, prepared (allocated) before the clone: nothing may be
/// allocated in the child.
pub(crate) struct Exec {
    program: std::ffi::CString,
    _argv: Vec<std::ffi::CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<std::ffi::CString>,
    envp_ptrs: Vec<*const libc::c_char>,
}

impl Exec {
    /// `program` (a path: no PATH search), `argv` (argv[0] included) and the environment
    /// `env` (`KEY=value` each), or this process's when `None`. `None` if any of them
    /// contains a NUL byte.
    pub(crate) fn new(
        program: &std::ffi::OsStr,
        argv: &[std::ffi::OsString],
        env: Option<&[std::ffi::OsString]>,
    ) -> Option<Exec> {
        use std::os::unix::ffi::OsStrExt;
        let c = |s: &std::ffi::OsStr| std::ffi::CString::new(s.as_bytes()).ok();
        let program = c(program)?;
        let argv: Vec<_> = argv.iter().map(|a| c(a)).collect::<Option<_>>()?;
        let envp: Vec<_> = match env {
            Some(env) => env.iter().map(|kv| c(kv)).collect::<Option<_>>()?,
            None => std::env::vars_os()
                .map(|(k, v)| {
                    let mut kv = k;
                    kv.push("=");
                    kv.push(v);
                    c(&kv)
                })
                .collect::<Option<_>>()?,
        };
        let ptrs = |v: &[std::ffi::CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Some(Exec {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            program,
            _argv: argv,
            _envp: envp,
        })
    }
}

/// Fork and exec `exec` born inside the cgroup `cgroup` (an open directory fd of a cgroup v2
/// directory) with `clone3(CLONE_INTO_CGROUP | CLONE_PIDFD)`: no descendant ever exists
/// outside it, and — unlike writing `cgroup.procs` between fork and exec — no task migration
/// (which serialises on the cgroup rwsem and took 10–18 ms per spawn on these machines).
/// The child gets the same preparation as [`contain_before_exec`]: PDEATHSIG, the parent
/// check, default signals. Returns the child's pid and pidfd once it has exec'd.
///
/// `Err` with `ENOSYS`/`EINVAL`/`E2BIG` means the kernel cannot do this: use the
/// `cgroup.procs` path. Call only from a single-threaded process (the supervisor).
pub(crate) fn spawn_into_cgroup(
    exec: &Exec,
    cgroup: BorrowedFd<'_>,
    parent: Pid,
) -> io::Result<(i32, OwnedFd)> {
    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let mut pidfd: libc::c_int = -1;
    // SAFETY: all-zero is a valid `clone_args` (no flags, no stack, no tid pointers).
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONE_INTO_CGROUP | libc::CLONE_PIDFD as u64;
    args.pidfd = &mut pidfd as *mut libc::c_int as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = cgroup.as_raw_fd() as u64;
    // SAFETY: `clone3` with no stack given behaves like fork: the child gets a copy of this
    // single-threaded process. `args` and `pidfd` outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if ret == 0 {
        // The child: only async-signal-safe raw syscalls from here to exec or _exit.
        let fail = |errno: i32| -> ! {
            let bytes = errno.to_ne_bytes();
            // SAFETY: write(2) and _exit(2) are async-signal-safe; `bytes` lives on this stack.
            unsafe {
                libc::write(err_w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127);
            }
        };
        if rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).is_err() {
            fail(libc::EPERM);
        }
        if rustix::process::getppid() != Some(parent) {
            // The parent died before PDEATHSIG was set: it would never fire, so do not run.
            fail(libc::ESRCH);
        }
        default_signals();
        // SAFETY: the pointers come from `exec`, prepared before the clone: NUL-terminated
        // strings and NULL-terminated arrays, alive in this copy of the address space.
        unsafe {
            libc::execve(
                exec.program.as_ptr(),
                exec.argv_ptrs.as_ptr(),
                exec.envp_ptrs.as_ptr(),
            );
        }
        fail(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        );
    }
    let pid = ret as i32;
    drop(err_w);
    // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd, owned by nobody else, in `pidfd`.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // End-of-file: the exec closed the pipe (close-on-exec). Four bytes: the child's errno.
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(&err_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got == 0 {
        return Ok((pid, pidfd));
    }
    // It failed and exits 127: reap it so no zombie is left, then report why.
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
    }
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)))
}

/// Test binaries start in libtest's `main`, which knows nothing of `__supervise`. This runs
/// before it (an `.init_array` entry) and turns the test binary into a supervisor when started
/// as one, as `main.rs` does for the real binary: `Tree::spawn` starts `/proc/self/exe`.
#[cfg(test)]
mod test_hook {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    // SAFETY: a function pointer in `.init_array` is called once by the C runtime before
    // `main` with the usual (argc, argv, envp) arguments, which this function ignores; it is a
    // plain `extern "C" fn` with no preconditions.
    #[used]
    #[unsafe(link_section = ".init_array")]
    static INTERCEPT: extern "C" fn() = intercept;

    extern "C" fn intercept() {
        // Cheap check first: every test binary runs this at start.
        let Ok(mut cmdline) = std::fs::read("/proc/self/cmdline") else {
            return;
        };
        // Every argument ends with a NUL; drop the last so splitting yields no extra item.
        cmdline.pop();
        let mut args = cmdline
            .split(|b| *b == 0)
            .map(|a| OsString::from_vec(a.to_vec()));
        if args
            .nth(1)
            .is_none_or(|a| a != crate::child::supervisor::SUBCOMMAND)
        {
            return;
        }
        let code = crate::child::supervisor::run(args.collect());
        std::process::exit(i32::from(code));
    }
}
