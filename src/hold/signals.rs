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

/// Where run loops get their signals from: the process's handlers, or a channel (conchd
/// owns the process's signals and tells each job's run loop when to stop).
#[derive(Debug)]
pub struct Signals(Source);

#[derive(Debug)]
enum Source {
    Os {
        stop: [(i32, Signal); 3],
        forward: [(i32, Signal); 4],
    },
    Channel(tokio::sync::mpsc::UnboundedReceiver<Sig>),
    /// A stop level: each step up is one `Stop(SIGTERM)`; a receiver made after steps were
    /// taken sees them too.
    Level {
        rx: tokio::sync::watch::Receiver<u32>,
        seen: u32,
    },
}

impl Signals {
    /// Install the handlers. Needs a tokio runtime.
    pub fn install() -> io::Result<Signals> {
        use rustix::process::Signal as S;
        let s = |n: S| -> io::Result<(i32, Signal)> {
            Ok((n.as_raw(), signal(SignalKind::from_raw(n.as_raw()))?))
        };
        Ok(Signals(Source::Os {
            stop: [s(S::INT)?, s(S::TERM)?, s(S::QUIT)?],
            forward: [s(S::HUP)?, s(S::USR1)?, s(S::USR2)?, s(S::WINCH)?],
        }))
    }

    /// Signals that come only from the returned sender. Once every sender is dropped,
    /// [`Signals::recv`] pends forever.
    pub fn channel() -> (tokio::sync::mpsc::UnboundedSender<Sig>, Signals) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, Signals(Source::Channel(rx)))
    }

    /// Stops that come from a level conchd raises for every job at once: the first step
    /// asks the run to end (SIGTERM, then the kill schedule), the second kills at once. A
    /// `Signals` made after the level was raised still sees every step. Once the sender is
    /// dropped, [`Signals::recv`] pends forever after the last step.
    pub fn from_level(rx: tokio::sync::watch::Receiver<u32>) -> Signals {
        Signals(Source::Level { rx, seen: 0 })
    }

    /// The next signal. Cancel-safe.
    pub async fn recv(&mut self) -> Sig {
        let (stop, forward) = match &mut self.0 {
            Source::Os { stop, forward } => (stop, forward),
            Source::Channel(rx) => {
                return match rx.recv().await {
                    Some(sig) => sig,
                    None => std::future::pending().await,
                };
            }
            Source::Level { rx, seen } => loop {
                if *rx.borrow_and_update() > *seen {
                    *seen += 1;
                    return Sig::Stop(rustix::process::Signal::TERM.as_raw());
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
        };
        let [(i, si), (t, st), (q, sq)] = stop;
        let [(h, sh), (u1, su1), (u2, su2), (w, sw)] = forward;
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
