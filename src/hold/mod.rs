//! The centre of conch: keep a hold, run a tree under it, kill the tree before the hold
//! could belong to anyone else (holds.md).
//!
//! - [`deadline`]: the pure maths of D and the renewal period P;
//! - [`clock`]: `CLOCK_BOOTTIME` and a timer on it;
//! - [`lease`]: the lease conch grants and renews itself, and the guard on its own key;
//! - [`loss`]: why a hold ended;
//! - [`signals`]: what conch does with the signals it receives;
//! - this file: [`supervise`], the run loop around a running tree, and [`release`].

#![forbid(unsafe_code)]

pub mod clock;
pub mod deadline;
pub mod lease;
pub mod loss;
pub mod signals;

use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::child::{Exit, Tree};
use crate::etcd::Etcd;
use crate::keys::{LeaseId, Revision};
use clock::{BootInstant, BootTimer};
use lease::{HoldView, Lease};
use loss::Loss;
use signals::{Sig, Signals};

/// SIGKILL goes out this long before D, so that the tree is dead *by* D: `cgroup.kill`
/// emptied trees in 1–2 ms here; 20 ms covers a loaded host. (δ in D is the further margin
/// between D and the earliest moment etcd could expire the lease.)
pub const KILL_LEAD: Duration = Duration::from_millis(20);

/// Longest the guarded delete of a release may take when the revoke (itself bounded by 1 s)
/// failed: release is best effort once the tree is dead.
pub const RELEASE_BOUND: Duration = Duration::from_secs(2);

/// Names a hold in log lines: the fixed vocabulary of holds.md §8.
#[derive(Debug, Clone)]
pub struct HoldCtx {
    pub name: String,
    pub key: String,
    pub rev: Revision,
    pub lease: LeaseId,
    /// When the campaign started, for `elapsed_ms`.
    pub since: BootInstant,
}

impl HoldCtx {
    pub fn elapsed_ms(&self) -> u64 {
        (BootInstant::now() - self.since).as_millis() as u64
    }

    /// Now on `CLOCK_BOOTTIME` in ms: lets a log line be compared with the deadline and with
    /// other processes' clocks on the same host.
    pub fn boot_ms() -> f64 {
        BootInstant::now().since_boot().as_secs_f64() * 1000.0
    }
}

/// Log one transition of the hold with the standard fields.
#[macro_export]
#[doc(hidden)]
macro_rules! hold_event {
    ($lvl:ident, $ctx:expr, $event:literal $(, $($rest:tt)*)?) => {
        tracing::$lvl!(
            name = %$ctx.name, key = %$ctx.key, rev = $ctx.rev.0, lease = %$ctx.lease,
            elapsed_ms = $ctx.elapsed_ms(), boot_ms = $crate::hold::HoldCtx::boot_ms(),
            $($($rest)*,)? "{}", $event
        )
    };
}

/// How a supervised tree's run ended. The tree is dead in every case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The direct child exited by itself (leftovers in its tree were killed).
    Exited(Exit),
    /// The hold was lost; the tree was killed.
    Lost(Loss, Exit),
    /// conch was told to stop by this signal; the tree was stopped.
    Stopped(i32, Exit),
    /// The run passed its time limit (a hook's `--hook-timeout`); the tree was killed.
    TimedOut(Exit),
}

/// Run the loop around a running `tree` until its direct child exits, the hold is lost,
/// conch is told to stop, or `limit` passes; then kill what is left of the tree on the kill
/// schedule (SIGTERM+SIGCONT, `cgroup.kill` at `min(now + G, D)`) and wait until it is empty.
///
/// The loop wakes at `D − G` on `CLOCK_BOOTTIME`, re-armed whenever a renewal moves D.
pub async fn supervise(
    lease: &mut HoldView,
    tree: &mut Tree,
    signals: &mut Signals,
    ctx: &HoldCtx,
    limit: Option<BootInstant>,
) -> RunEnd {
    let grace = lease.timing().grace;
    let mut timer = match BootTimer::new() {
        Ok(t) => t,
        Err(e) => {
            // Without a deadline timer the hold cannot be proven: fail closed.
            tracing::error!(error = %e, "cannot create the deadline timer");
            let exit = kill_tree(tree, BootInstant::now(), signals, ctx).await;
            return RunEnd::Lost(Loss::Deadline, exit);
        }
    };
    enum Why {
        Exited(Exit),
        Lost(Loss),
        Stopped(i32),
        TimedOut,
    }
    let unsafe_no_deadline = test_switch::no_deadline_kill();
    let why = loop {
        let st = lease.mark_seen();
        // The supervisor kills the tree on its own at D if conch stops getting here.
        tree.set_deadline((!unsafe_no_deadline).then(|| st.deadline.at()));
        if let Some(loss) = st.lost {
            break Why::Lost(loss);
        }
        let now = BootInstant::now();
        let term_at = if unsafe_no_deadline {
            now + Duration::from_secs(3600)
        } else {
            st.deadline.term_at(grace)
        };
        if now >= term_at {
            break Why::Lost(Loss::Deadline);
        }
        if limit.is_some_and(|l| now >= l) {
            break Why::TimedOut;
        }
        let wake = limit.map_or(term_at, |l| l.min(term_at));
        if let Err(e) = timer.set(wake) {
            tracing::error!(error = %e, "cannot arm the deadline timer");
            break Why::Lost(Loss::Deadline);
        }
        tokio::select! {
            biased;
            _ = timer.wait() => {}
            _ = lease.changed() => {}
            exit = tree.wait() => break Why::Exited(exit),
            sig = signals.recv() => match sig {
                Sig::Stop(n) => break Why::Stopped(n),
                Sig::Forward(n) => tree.forward(n),
            },
        }
    };
    let now = BootInstant::now();
    let d = lease.state().deadline;
    // From here D no longer moves for this tree, and the supervisor holds it to the last D.
    tree.set_deadline(Some(d.at()));
    // SIGKILL at min(now + G, D − KILL_LEAD): the tree is dead by D whatever happens.
    let kill_at = (now + grace).min(d.at().saturating_sub(KILL_LEAD));
    match why {
        Why::Exited(exit) => {
            hold_event!(info, ctx, "child-exit", exit = ?exit);
            // Whatever is left in its tree (a background grandchild) must not outlive the hold.
            kill_tree(tree, kill_at, signals, ctx).await;
            RunEnd::Exited(exit)
        }
        Why::Lost(loss) => {
            let deadline_ms = d.at().since_boot().as_secs_f64() * 1000.0;
            hold_event!(warn, ctx, "lost", reason = %loss, deadline_boot_ms = deadline_ms);
            let exit = kill_tree(tree, kill_at, signals, ctx).await;
            RunEnd::Lost(loss, exit)
        }
        Why::Stopped(n) => {
            hold_event!(info, ctx, "stop", signal = n);
            let exit = kill_tree(tree, kill_at, signals, ctx).await;
            RunEnd::Stopped(n, exit)
        }
        Why::TimedOut => {
            hold_event!(warn, ctx, "timeout");
            let exit = kill_tree(tree, kill_at, signals, ctx).await;
            RunEnd::TimedOut(exit)
        }
    }
}

/// A switch for the fault suite only: with it the deadline kill is off, so the suite can show
/// that its checker catches the overlap that follows. It exists only in debug builds (the
/// tests' binary); a release build cannot be talked out of its deadline.
mod test_switch {
    /// `CONCH_TEST_UNSAFE_NO_DEADLINE_KILL=1`, debug builds only.
    #[cfg(debug_assertions)]
    pub(super) fn no_deadline_kill() -> bool {
        let on = std::env::var_os("CONCH_TEST_UNSAFE_NO_DEADLINE_KILL").is_some_and(|v| v == "1");
        if on {
            tracing::error!(
                "TEST SWITCH: the deadline kill is disabled; this build is not safe to use"
            );
        }
        on
    }

    #[cfg(not(debug_assertions))]
    pub(super) fn no_deadline_kill() -> bool {
        false
    }
}

/// The kill schedule: SIGTERM+SIGCONT to the whole tree, SIGKILL (`cgroup.kill`) at
/// `kill_at` or on a second stop signal, then wait until the tree is empty. Returns the direct
/// child's exit.
pub async fn kill_tree(
    tree: &mut Tree,
    kill_at: BootInstant,
    signals: &mut Signals,
    ctx: &HoldCtx,
) -> Exit {
    tree.terminate();
    hold_event!(info, ctx, "term-sent");
    let emptied = match BootTimer::new().and_then(|mut t| t.set(kill_at).map(|_| t)) {
        Ok(mut timer) => loop {
            tokio::select! {
                biased;
                _ = tree.wait_empty() => break true,
                _ = timer.wait() => break false,
                sig = signals.recv() => match sig {
                    Sig::Stop(_) => break false,
                    Sig::Forward(n) => tree.forward(n),
                },
            }
        },
        Err(_) => false,
    };
    if !emptied {
        tree.kill();
        hold_event!(warn, ctx, "kill-sent");
        tree.wait_empty().await;
    }
    hold_event!(info, ctx, "tree-empty");
    tree.wait().await
}

/// Release a hold after its tree is dead: revoke the lease, which deletes the own key with
/// it (one round trip: the successor's watch sees the delete). If the revoke fails, delete
/// the own key only if its create revision is still ours. Best effort and bounded; if both
/// fail the lease simply expires.
pub async fn release(etcd: &Etcd, lease: Lease, ctx: &HoldCtx) {
    if !lease.revoke().await {
        let key = ctx.key.clone();
        let rev = ctx.rev.0;
        let guarded = etcd.retry("release", |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::delete(key.clone(), None)]);
            async move { c.txn(txn).await }
        });
        // Bounded: with etcd unreachable a stopping conch must not hang (the tree is dead).
        match tokio::time::timeout(RELEASE_BOUND, guarded).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(key = %ctx.key, error = %e, "guarded delete failed too"),
            Err(_) => tracing::warn!(key = %ctx.key, "guarded delete timed out too"),
        }
    }
    hold_event!(info, ctx, "released");
}
