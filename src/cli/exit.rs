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
