//! The recipes: conch's own transactions for each primitive, on top of the hold loop.
//!
//! etcd's server-side Lock and Election services are not used (holds.md §1): their recipes
//! have known holes, and they cannot do a non-blocking try.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod elect;
pub mod query;
pub mod sema;
pub mod sema_query;

use std::ffi::OsString;

use etcd_client::{EventType, WatchOptions};

use crate::child::{Exit, SpawnError};
use crate::etcd::{CallError, CallErrorKind, Etcd};
use crate::hold::HoldCtx;
use crate::hold::clock::{BootInstant, BootTimer};
use crate::hold::lease::Lease;
use crate::hold::loss::Loss;
use crate::hold::signals::{Sig, Signals};

/// How a run of `elect` or `sema` ended: expected endings are values; the CLI maps them to
/// exit codes.
#[derive(Debug)]
pub enum Outcome {
    /// The child ran under the hold and exited like this.
    Exited(Exit),
    /// The child could not be started (126/127).
    SpawnFailed(SpawnError),
    /// The hold was lost while the child ran; the tree was killed.
    Lost(Loss),
    /// Not acquired: `--nonblock`, `--wait` expired, or `--on-acquire` failed.
    NotAcquired(NotAcquired),
    /// conch was told to stop by `signal`; `child` is the child's exit if one ran.
    Stopped { signal: i32, child: Option<Exit> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAcquired {
    Held,
    WaitExpired,
    HookFailed(String),
}

/// The acquisition epilogue (holds.md §4). The primitive decided "ours" in a read that also
/// proved, at revision `at`, that the own key still had our create revision (one transaction:
/// the creating one, or a read guarded by the create revision). Now: the hold is not lost,
/// and at least `grace + 1 s` is left before D. Then the own-key guard starts from `at + 1`
/// (so nothing after the proof goes unseen) and `true` comes back; on `false` the hold
/// counts as lost while waiting (logged) and the caller revokes and queues again.
pub(crate) fn acquired(
    lease: &mut Lease,
    ctx: &HoldCtx,
    grace: std::time::Duration,
    at: i64,
) -> bool {
    let st = lease.state();
    if st.lost.is_some() || !st.deadline.fits_run(BootInstant::now(), grace) {
        crate::hold_event!(warn, ctx, "lost", reason = %Loss::Deadline, waiting = true);
        return false;
    }
    lease.guard_key(ctx.key.clone(), ctx.rev, at + 1);
    crate::hold_event!(info, ctx, "acquired");
    true
}

/// The record a participant writes into its key before anything runs.
pub(crate) fn holder_record(
    node: &str,
    cmd: &[OsString],
    lease: &Lease,
    containment: &crate::child::Containment,
) -> crate::keys::HolderRecord {
    crate::keys::HolderRecord {
        node: node.to_string(),
        pid: std::process::id(),
        started: crate::keys::now_rfc3339(),
        cmd: Some(crate::keys::cmd_summary(cmd)),
        lease: lease.id().to_string(),
        containment: containment.mode.as_str().to_string(),
    }
}

/// The child's environment (cli.md): name, fencing token, key, lease, node.
pub(crate) fn child_env(node: &str, ctx: &HoldCtx) -> Vec<(OsString, OsString)> {
    [
        ("CONCH_NAME", ctx.name.clone()),
        ("CONCH_REV", ctx.rev.to_string()),
        ("CONCH_KEY", ctx.key.clone()),
        ("CONCH_LEASE", ctx.lease.to_string()),
        ("CONCH_NODE", node.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
    .collect()
}

/// The cgroup leaf: `<kind>-<name>-<lease-hex>` (names are already safe path components).
pub(crate) fn leaf(kind: &str, ctx: &HoldCtx) -> String {
    format!("{kind}-{}-{}", ctx.name, ctx.lease)
}

/// How one wait of a queued participant ended.
pub(crate) enum Queued {
    /// What it watched changed (or the watch ended): read where it stands again.
    Moved,
    /// `--wait` ran out.
    GiveUp,
    /// conch was told to stop by this signal.
    Stopped(i32),
    /// The lease was lost while queued (at D itself: a waiter has no child to kill).
    Lost(Loss),
}

/// A `CLOCK_BOOTTIME` timer for a queued wait; failing to make one is an internal error.
pub(crate) fn queue_timer() -> Result<BootTimer, CallError> {
    BootTimer::new().map_err(|e| CallError {
        what: "deadline timer",
        detail: e.to_string(),
        kind: CallErrorKind::Other,
    })
}

/// Watch `key` with `opts` and wait as a queued participant until an event of interest (a
/// delete; also a put with `wake_on_put`) or the watch ends, `give_up_at` passes, a stop
/// signal arrives, or the lease is lost. Forwardable signals are ignored: no child runs yet.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn wait_queued(
    etcd: &Etcd,
    lease: &mut Lease,
    timer: &mut BootTimer,
    signals: &mut Signals,
    give_up_at: Option<BootInstant>,
    key: String,
    opts: WatchOptions,
    wake_on_put: bool,
) -> Result<Queued, CallError> {
    let (idx, mut client) = etcd.client();
    let opened = etcd
        .bounded(
            "watch queue",
            async move { client.watch(key, Some(opts)).await },
        )
        .await;
    let mut events = match opened {
        Ok(w) => w,
        Err(e) => {
            etcd.rotate(idx);
            return Err(e);
        }
    };
    loop {
        let st = lease.mark_seen();
        if let Some(loss) = st.lost {
            return Ok(Queued::Lost(loss));
        }
        let now = BootInstant::now();
        if now >= st.deadline.at() {
            return Ok(Queued::Lost(Loss::Deadline));
        }
        if give_up_at.is_some_and(|g| now >= g) {
            return Ok(Queued::GiveUp);
        }
        let _ = timer.set(give_up_at.map_or(st.deadline.at(), |g| g.min(st.deadline.at())));
        tokio::select! {
            biased;
            _ = timer.wait() => {}
            _ = lease.changed() => {}
            sig = signals.recv() => if let Sig::Stop(n) = sig { return Ok(Queued::Stopped(n)) },
            msg = events.message() => match msg {
                Ok(Some(resp)) => {
                    let moved = resp.events().iter().any(|e| {
                        e.event_type() == EventType::Delete || (wake_on_put && e.event_type() == EventType::Put)
                    });
                    if moved || resp.canceled() {
                        return Ok(Queued::Moved);
                    }
                }
                // The watch ended (etcd restart, failover): read again.
                _ => return Ok(Queued::Moved),
            },
        }
    }
}
