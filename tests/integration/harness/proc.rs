//! Processes as the tests see them: alive or not, waited for with a deadline, and found by
//! the tag every conch a test starts passes on to its whole tree.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// How often [`wait_until`] looks again.
const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Polls `f` until it returns `Some`, or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let mut out = None;
    wait_until(timeout, || {
        out = f();
        out.is_some()
    });
    out
}

/// Whether `pid` is a live process. A zombie (`Z`) or dying (`X`) one counts as dead: it
/// runs nothing any more, it only waits for its parent to reap it.
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain anything.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    !matches!(rest.split_whitespace().next(), Some("Z" | "X") | None)
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Reads a pid a child script wrote into a marker file.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Every live process whose environment carries `NAME=value` (the per-test tag).
pub fn tagged(name: &str, value: &str) -> Vec<i32> {
    let needle = format!("{name}={value}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// Makes the process `cmd` starts receive `sig` when the thread spawning it exits
/// (`PR_SET_PDEATHSIG`): for a test thread, when the test ends; for the etcd keeper thread,
/// when the test binary ends, however it ends.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command, sig: Signal) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs between fork and exec and only makes two raw syscalls
    // (prctl, getppid) through rustix: no allocation, no locks, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(sig))?;
            // The parent may have died between fork and prctl: then nobody would signal us.
            if rustix::process::getppid() != Some(parent) {
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}
