//! conch's exit codes: a public API (cli.md). The only place that names them.

/// Success; the child exited 0.
pub const OK: u8 = 0;
/// `--who`: vacant; `--assert`: not held by this node (or rev below `--min-rev`).
pub const NO: u8 = 1;
/// Usage error (sysexits `EX_USAGE`).
pub const USAGE: u8 = 64;
/// etcd unreachable or refused us before anything ran (`EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;
/// The hold was lost while the child ran; the tree was killed (`EX_SOFTWARE`).
pub const LOST: u8 = 70;
/// Not acquired: `--nonblock`, `--wait` expired (`EX_TEMPFAIL`, as `flock -n` uses it).
pub const NOT_ACQUIRED: u8 = 75;
/// The child command exists but cannot be executed (as a shell reports).
pub const NOT_EXECUTABLE: u8 = 126;
/// The child command was not found (as a shell reports).
pub const NOT_FOUND: u8 = 127;

/// The exit code for a child that ended like this: its own code, or 128+N for signal N.
pub fn of_child(exit: crate::child::Exit) -> u8 {
    match exit {
        crate::child::Exit::Code(c) => (c & 0xff) as u8,
        crate::child::Exit::Signal(n) => (128 + n).min(255) as u8,
    }
}

/// The one table from a run's outcome to conch's exit code (no catch-all arm), saying on
/// stderr why when it was not the child's own code. `held` completes "`<name>` …" for
/// `--nonblock` on a full office or semaphore.
pub fn of_outcome(name: &str, held: &str, outcome: crate::recipes::Outcome) -> u8 {
    use crate::child::SpawnError;
    use crate::recipes::{NotAcquired, Outcome};
    match outcome {
        Outcome::Exited(e) => {
            let code = of_child(e);
            if matches!(code, USAGE | UNAVAILABLE | LOST | NOT_ACQUIRED) {
                tracing::info!(name, code, "the child itself exited with this code");
            }
            code
        }
        Outcome::SpawnFailed(e) => {
            eprintln!("conch: {e}");
            match e {
                SpawnError::NotFound(_) => NOT_FOUND,
                SpawnError::NotExecutable(_) | SpawnError::Other { .. } => NOT_EXECUTABLE,
            }
        }
        Outcome::Lost(loss) => {
            eprintln!("conch: hold on {name} lost ({loss}); the child tree was killed");
            LOST
        }
        Outcome::NotAcquired(n) => {
            match n {
                NotAcquired::Held => eprintln!("conch: {name} {held}"),
                NotAcquired::WaitExpired => eprintln!("conch: gave up waiting for {name} (--wait)"),
                NotAcquired::HookFailed(why) => eprintln!("conch: {name} not acquired: {why}"),
            }
            NOT_ACQUIRED
        }
        Outcome::Stopped { child: Some(e), .. } => of_child(e),
        Outcome::Stopped {
            signal,
            child: None,
        } => (128 + signal).min(255) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child::Exit;

    #[test]
    fn child_exits_map_like_a_shell() {
        assert_eq!(of_child(Exit::Code(0)), 0);
        assert_eq!(of_child(Exit::Code(3)), 3);
        assert_eq!(of_child(Exit::Signal(9)), 137);
        assert_eq!(of_child(Exit::Signal(15)), 143);
    }
}
