//! A small builder around the real `conch` binary.
//!
//! ```ignore
//! let out = ctx.elect("db").args(["--nonblock", "--"]).args(ctx.sh("true")).run();
//! out.expect_code(0);
//! let mut holder = ctx.elect("db").arg("--").args(ctx.sh("echo up > {dir}/up; exec sleep 1000")).spawn();
//! ctx.wait_file_of("up", SOON, &mut holder);
//! holder.signal(Signal::TERM);
//! let out = holder.wait_timeout(Duration::from_secs(5));
//! ```
//!
//! Every conch gets the test's endpoints, key prefix and cgroup root in its environment and
//! nothing else of the `CONCH_*` family from the outside world. A [`Running`] conch that the
//! test did not wait for is stopped when the handle drops (SIGTERM, then SIGKILL), and
//! gets SIGTERM (`PR_SET_PDEATHSIG`) should the test's thread die without dropping it.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::Ctx;
use super::proc::{self, wait_until};

/// Bound on a one-shot [`Conch::run`]: far above anything a passing test needs.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a dropped handle gives conch to end its child and release before SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(5);
/// After conch exited, how long to wait for its stdout/stderr to reach EOF (a leaked
/// descendant may hold them open; then we take what we have).
const EOF_GRACE: Duration = Duration::from_millis(500);

/// A conch command line being put together.
#[derive(Debug)]
pub struct Conch {
    cmd: Command,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
}

impl Conch {
    pub fn new(ctx: &Ctx) -> Self {
        let cmd = ctx.command(env!("CARGO_BIN_EXE_conch"));
        Conch {
            cmd,
            argv: Vec::new(),
            stdin: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.argv.push(arg.as_ref().to_string_lossy().into_owned());
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Feeds these bytes to conch's stdin, then closes it (default: stdin is /dev/null).
    pub fn stdin_bytes(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn spawn(mut self) -> Running {
        self.cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Should the test binary die, conch is told to end (it then ends its own tree).
        proc::die_with_parent(&mut self.cmd, Signal::TERM);
        let started = Instant::now();
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start conch {:?}: {e}", self.argv));
        if let (Some(bytes), Some(mut pipe)) = (self.stdin.take(), child.stdin.take()) {
            thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let out = Stream::read(child.stdout.take());
        let err = Stream::read(child.stderr.take());
        Running {
            pid: child.id() as i32,
            child,
            started,
            out,
            err,
            done: None,
            argv: self.argv,
        }
    }

    /// Runs conch to the end (bounded by [`RUN_TIMEOUT`]).
    pub fn run(self) -> Output {
        self.spawn().wait_timeout(RUN_TIMEOUT)
    }
}

/// One output pipe, collected by a thread as it arrives.
#[derive(Debug, Clone)]
struct Stream {
    buf: Arc<Mutex<Vec<u8>>>,
    eof: Arc<AtomicBool>,
}

impl Stream {
    fn read(pipe: Option<impl Read + Send + 'static>) -> Self {
        let s = Stream {
            buf: Arc::default(),
            eof: Arc::default(),
        };
        let (buf, eof) = (s.buf.clone(), s.eof.clone());
        match pipe {
            Some(mut pipe) => {
                thread::spawn(move || {
                    let mut chunk = [0u8; 4096];
                    loop {
                        match pipe.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
                        }
                    }
                    eof.store(true, Ordering::SeqCst);
                });
            }
            None => eof.store(true, Ordering::SeqCst),
        }
        s
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

/// How a conch run ended.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code; `None` when conch itself died of a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to the moment the exit was seen (10 ms resolution).
    pub elapsed: Duration,
    argv: Vec<String>,
}

impl Output {
    /// Asserts the exit code, showing what conch said when it is wrong.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "conch {:?} exited {:?} (signal {:?}) after {:?}, expected {code}\n--- stdout\n{}\n--- stderr\n{}",
            self.argv,
            self.code,
            self.signal,
            self.elapsed,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Non-empty stdout lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// conch's JSON log events (`--log-format json`) in a captured stderr, in order; lines that
/// are not JSON are skipped.
pub fn events(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

/// A conch process that is running (or has ended and not yet been looked at).
#[derive(Debug)]
pub struct Running {
    child: Child,
    pid: i32,
    started: Instant,
    out: Stream,
    err: Stream,
    done: Option<Output>,
    argv: Vec<String>,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn signal(&self, sig: Signal) {
        if self.done.is_none() {
            proc::signal(self.pid, sig);
        }
    }

    /// What conch has written to stdout so far.
    pub fn stdout(&self) -> String {
        self.out.text()
    }

    /// What conch has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.err.text()
    }

    /// The output if conch has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<Output> {
        if self.done.is_none() {
            let status = self.child.try_wait().expect("waitpid on conch failed")?;
            let elapsed = self.started.elapsed();
            wait_until(EOF_GRACE, || {
                self.out.eof.load(Ordering::SeqCst) && self.err.eof.load(Ordering::SeqCst)
            });
            use std::os::unix::process::ExitStatusExt;
            self.done = Some(Output {
                code: status.code(),
                signal: status.signal(),
                stdout: self.out.text(),
                stderr: self.err.text(),
                elapsed,
                argv: self.argv.clone(),
            });
        }
        self.done.clone()
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for conch to exit.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<Output> {
        wait_until(timeout, || self.try_wait().is_some());
        self.try_wait()
    }

    /// Waits up to `timeout` for conch to exit; panics (after killing it) if it does not.
    #[track_caller]
    pub fn wait_timeout(&mut self, timeout: Duration) -> Output {
        if let Some(out) = self.wait_for_exit(timeout) {
            return out;
        }
        self.stop();
        panic!(
            "conch {:?} still running after {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.argv,
            self.stdout(),
            self.stderr()
        );
    }

    /// Waits until conch's stdout holds at least `n` complete lines; returns all of them.
    #[track_caller]
    pub fn wait_lines(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let complete = |s: &Stream| -> Vec<String> {
            let text = s.text();
            let end = text.rfind('\n').map_or(0, |i| i + 1);
            text[..end]
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        };
        let deadline = Instant::now() + timeout;
        let got = loop {
            let lines = complete(&self.out);
            if lines.len() >= n {
                break Some(lines);
            }
            // Once conch is gone and its stdout closed, no more lines will come.
            if Instant::now() >= deadline
                || (self.try_wait().is_some() && self.out.eof.load(Ordering::SeqCst))
            {
                break None;
            }
            thread::sleep(Duration::from_millis(10));
        };
        got.unwrap_or_else(|| {
            panic!(
                "conch {:?}: wanted {n} lines on stdout within {timeout:?}, got\n{}\n--- stderr\n{}",
                self.argv,
                self.stdout(),
                self.stderr()
            )
        })
    }

    /// SIGTERM, a grace period, then SIGKILL; always reaps.
    fn stop(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        proc::signal(self.pid, Signal::TERM);
        if self.wait_for_exit(DROP_GRACE).is_none() {
            proc::signal(self.pid, Signal::KILL);
            let _ = self.child.wait();
            let _ = self.try_wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}
