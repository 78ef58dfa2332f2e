//! Signals sent to conch while it holds or waits (holds.md §6).
//!
//! SIGINT, SIGTERM and SIGQUIT end the run cleanly (the tree is stopped, the hold released);
//! SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH are forwarded unchanged to the child. Handlers are
//! installed once, before any child exists, so no signal can kill conch with its default
//! action and leave a child behind.

#![forbid(unsafe_code)]

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// End the run (INT, TERM, QUIT); the number is the signal's.
    Stop(i32),
    /// Pass on to the child (HUP, USR1, USR2, WINCH).
    Forward(i32),
}

/// The installed handlers.
#[derive(Debug)]
pub struct Signals {
    stop: [(i32, Signal); 3],
    forward: [(i32, Signal); 4],
}

impl Signals {
    /// Install the handlers. Needs a tokio runtime.
    pub fn install() -> io::Result<Signals> {
        use rustix::process::Signal as S;
        let s = |n: S| -> io::Result<(i32, Signal)> {
            Ok((n.as_raw(), signal(SignalKind::from_raw(n.as_raw()))?))
        };
        Ok(Signals {
            stop: [s(S::INT)?, s(S::TERM)?, s(S::QUIT)?],
            forward: [s(S::HUP)?, s(S::USR1)?, s(S::USR2)?, s(S::WINCH)?],
        })
    }

    /// The next signal. Cancel-safe.
    pub async fn recv(&mut self) -> Sig {
        let [(i, si), (t, st), (q, sq)] = &mut self.stop;
        let [(h, sh), (u1, su1), (u2, su2), (w, sw)] = &mut self.forward;
        tokio::select! {
            _ = si.recv() => Sig::Stop(*i),
            _ = st.recv() => Sig::Stop(*t),
            _ = sq.recv() => Sig::Stop(*q),
            _ = sh.recv() => Sig::Forward(*h),
            _ = su1.recv() => Sig::Forward(*u1),
            _ = su2.recv() => Sig::Forward(*u2),
            _ = sw.recv() => Sig::Forward(*w),
        }
    }
}
