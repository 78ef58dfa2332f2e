//! `conch elect`: run a command while holding a leader office (primitives.md, elect).
//!
//! Each candidate creates `<prefix>/v1/elect/<office>/<lease-hex>` only if absent, bound to its
//! own lease. The holder is the candidate with the lowest create revision; a waiter watches
//! only the candidate just ahead of it (no herd).
//!
//! The candidate ahead is read in the same transaction that proves the own key is still ours
//! (holds.md §4): in the creating transaction itself, then in a read guarded by the key's
//! create revision. So "nobody ahead" and "the key is ours" are one read, whose revision the
//! own-key guard starts from; the remaining time is checked before anything runs.

use std::ffi::OsString;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use super::backoff::Backoff;
use super::{NotAcquired, Outcome, Queued, child_env, leaf, queue_timer, wait_queued};
use super::{acquired, holder_record};
use crate::child::{ChildCommand, Containment, Exit, SpawnError, Tree};
use crate::etcd::{CallError, Etcd};
use crate::hold::clock::BootInstant;
use crate::hold::lease::{GrantError, Lease};
use crate::hold::loss::Loss;
use crate::hold::signals::{Sig, Signals};
use crate::hold::{self, HoldCtx, RunEnd};
use crate::hold_event;
use crate::keys::{Name, Prefix, Revision};

/// Everything `conch elect … -- cmd` needs, validated.
#[derive(Debug, Clone)]
pub struct ElectConfig {
    pub office: Name,
    pub prefix: Prefix,
    pub node: String,
    pub ttl: Duration,
    pub grace: Duration,
    /// `None`: wait forever; `Some(0)`: `--nonblock`.
    pub wait: Option<Duration>,
    pub restart: bool,
    pub on_acquire: Option<String>,
    pub on_lose: Option<String>,
    pub hook_timeout: Duration,
    pub cmd: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum ElectError {
    #[error(transparent)]
    Etcd(#[from] CallError),
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("etcd holds {0} under another lease")]
    Foreign(String),
}

/// The result of one campaign.
enum Campaign {
    Won(Lease, HoldCtx),
    NotAcquired(NotAcquired),
    Stopped(i32),
}

/// Run `conch elect`: campaign, run, and with `--restart` do it again, forever.
pub async fn run(
    etcd: &Etcd,
    cfg: &ElectConfig,
    containment: &Containment,
    signals: &mut Signals,
) -> Result<Outcome, ElectError> {
    let mut backoff = Backoff::new(fastrand::Rng::new());
    loop {
        let give_up_at = cfg.wait.map(|w| BootInstant::now() + w);
        let (outcome, ran) = match round(etcd, cfg, containment, signals, give_up_at).await {
            Ok(r) => r,
            Err(e) if cfg.restart => {
                tracing::warn!(name = %cfg.office, error = %e, "campaign failed; retrying");
                (None, Duration::ZERO)
            }
            Err(e) => return Err(e),
        };
        match outcome {
            Some(
                o @ (Outcome::Stopped { .. }
                | Outcome::NotAcquired(NotAcquired::Held | NotAcquired::WaitExpired)),
            ) => {
                return Ok(o);
            }
            Some(o) if !cfg.restart => return Ok(o),
            _ => {}
        }
        let pause = backoff.next(ran);
        tracing::info!(name = %cfg.office, pause_ms = pause.as_millis() as u64, "restart");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            sig = stop_signal(signals) => return Ok(Outcome::Stopped { signal: sig, child: None }),
        }
    }
}

/// One campaign and one run. Returns the outcome (None: nothing to report, campaign again)
/// and how long the child ran.
async fn round(
    etcd: &Etcd,
    cfg: &ElectConfig,
    containment: &Containment,
    signals: &mut Signals,
    give_up_at: Option<BootInstant>,
) -> Result<(Option<Outcome>, Duration), ElectError> {
    // The child's supervisor starts while the campaign runs, so its start-up is not paid
    // between winning and the child running. It starts nothing before `start`.
    let warm = Tree::prepare().ok();
    let (mut lease, ctx) = match campaign(etcd, cfg, containment, signals, give_up_at).await? {
        Campaign::Won(lease, ctx) => (lease, ctx),
        Campaign::NotAcquired(n) => return Ok((Some(Outcome::NotAcquired(n)), Duration::ZERO)),
        Campaign::Stopped(sig) => {
            return Ok((
                Some(Outcome::Stopped {
                    signal: sig,
                    child: None,
                }),
                Duration::ZERO,
            ));
        }
    };
    let env = child_env(&cfg.node, &ctx);

    if let Some(hook) = &cfg.on_acquire {
        let end = run_hook_held(
            hook,
            "on-acquire",
            &env,
            &ctx,
            containment,
            &mut lease,
            signals,
            cfg.hook_timeout,
        )
        .await;
        match end {
            Ok(RunEnd::Exited(Exit::Code(0))) => {}
            Ok(RunEnd::Lost(loss, _)) => {
                lease.revoke().await;
                return Ok((Some(Outcome::Lost(loss)), Duration::ZERO));
            }
            Ok(RunEnd::Stopped(sig, _)) => {
                hold::release(etcd, lease, &ctx).await;
                return Ok((
                    Some(Outcome::Stopped {
                        signal: sig,
                        child: None,
                    }),
                    Duration::ZERO,
                ));
            }
            Ok(other) => {
                let why = match other {
                    RunEnd::TimedOut(_) => format!(
                        "--on-acquire timed out after {}",
                        humantime::format_duration(cfg.hook_timeout)
                    ),
                    RunEnd::Exited(e) => format!("--on-acquire failed ({})", describe_exit(e)),
                    _ => unreachable!("handled above"),
                };
                tracing::warn!(name = %ctx.name, reason = %why, "not acquired");
                hold::release(etcd, lease, &ctx).await;
                return Ok((
                    Some(Outcome::NotAcquired(NotAcquired::HookFailed(why))),
                    Duration::ZERO,
                ));
            }
            Err(e) => {
                tracing::warn!(name = %ctx.name, error = %e, "--on-acquire could not start");
                hold::release(etcd, lease, &ctx).await;
                return Ok((
                    Some(Outcome::NotAcquired(NotAcquired::HookFailed(e.to_string()))),
                    Duration::ZERO,
                ));
            }
        }
    }

    // The hold may have been lost during the hook: never start the child without it.
    let st = lease.state();
    if let Some(loss) = st.lost.clone() {
        hold_event!(warn, ctx, "lost", reason = %loss);
        lease.revoke().await;
        return Ok((Some(Outcome::Lost(loss)), Duration::ZERO));
    }
    if st.deadline.term_at(cfg.grace) <= BootInstant::now() {
        hold_event!(warn, ctx, "lost", reason = %Loss::Deadline);
        lease.revoke().await;
        return Ok((Some(Outcome::Lost(Loss::Deadline)), Duration::ZERO));
    }

    let cmd = ChildCommand {
        argv: cfg.cmd.clone(),
        env: env.clone(),
        cgroup_leaf: leaf("elect", &ctx),
        output: None,
    };
    let spawned = match warm {
        Some(warm) => warm.start(containment, &cmd),
        None => Tree::spawn(containment, &cmd),
    };
    let mut tree = match spawned {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(name = %ctx.name, error = %e, "child could not start");
            run_on_lose(cfg, &env, &ctx, containment, Some(&mut lease), signals).await;
            hold::release(etcd, lease, &ctx).await;
            return Ok((Some(Outcome::SpawnFailed(e)), Duration::ZERO));
        }
    };
    let started = BootInstant::now();
    hold_event!(info, ctx, "child-start", pid = tree.pid());
    let end = hold::supervise(&mut lease.view(), &mut tree, signals, &ctx, None).await;
    drop(tree);
    let ran = BootInstant::now() - started;
    let outcome = match end {
        RunEnd::Lost(loss, _) => {
            lease.revoke().await;
            run_on_lose(cfg, &env, &ctx, containment, None, signals).await;
            Outcome::Lost(loss)
        }
        RunEnd::Exited(exit) => {
            run_on_lose(cfg, &env, &ctx, containment, Some(&mut lease), signals).await;
            hold::release(etcd, lease, &ctx).await;
            Outcome::Exited(exit)
        }
        RunEnd::Stopped(signal, exit) => {
            run_on_lose(cfg, &env, &ctx, containment, Some(&mut lease), signals).await;
            hold::release(etcd, lease, &ctx).await;
            Outcome::Stopped {
                signal,
                child: Some(exit),
            }
        }
        RunEnd::TimedOut(exit) => {
            // The child has no time limit; treat like an exit.
            hold::release(etcd, lease, &ctx).await;
            Outcome::Exited(exit)
        }
    };
    Ok((Some(outcome), ran))
}

/// Campaign until this candidate holds the office, gives up, or is told to stop.
async fn campaign(
    etcd: &Etcd,
    cfg: &ElectConfig,
    containment: &Containment,
    signals: &mut Signals,
    give_up_at: Option<BootInstant>,
) -> Result<Campaign, ElectError> {
    let since = BootInstant::now();
    let office = cfg.prefix.elect_office(&cfg.office);
    loop {
        let mut lease = Lease::grant(etcd, cfg.ttl, cfg.grace).await?;
        let key = cfg.prefix.elect_candidate(&cfg.office, lease.id());
        let record = holder_record(&cfg.node, &cfg.cmd, &lease, containment);
        let (rev, first) = match create_key(etcd, &key, &office, &record.to_json(), &lease).await {
            Ok(created) => created,
            Err(e) => {
                lease.revoke().await;
                return Err(e);
            }
        };
        let ctx = HoldCtx {
            name: cfg.office.to_string(),
            key: key.clone(),
            rev,
            lease: lease.id(),
            since,
        };
        hold_event!(info, ctx, "campaign");

        let at = match wait_for_turn(
            etcd,
            &office,
            &mut lease,
            &ctx,
            signals,
            give_up_at,
            cfg.wait == Some(Duration::ZERO),
            first,
        )
        .await?
        {
            Turn::Ours(at) => at,
            Turn::GiveUp(n) => {
                hold::release(etcd, lease, &ctx).await;
                return Ok(Campaign::NotAcquired(n));
            }
            Turn::Stopped(sig) => {
                hold::release(etcd, lease, &ctx).await;
                return Ok(Campaign::Stopped(sig));
            }
            Turn::LostWaiting(loss) => {
                hold_event!(warn, ctx, "lost", reason = %loss, waiting = true);
                lease.revoke().await;
                if give_up_at.is_some_and(|g| BootInstant::now() >= g) {
                    return Ok(Campaign::NotAcquired(NotAcquired::WaitExpired));
                }
                continue;
            }
        };

        if !acquired(&mut lease, &ctx, cfg.grace, at) {
            lease.revoke().await;
            continue;
        }
        return Ok(Campaign::Won(lease, ctx));
    }
}

enum Turn {
    /// Nobody is ahead, proven at this revision together with the own key.
    Ours(i64),
    GiveUp(NotAcquired),
    Stopped(i32),
    LostWaiting(Loss),
}

/// Wait until no candidate with a lower create revision is left. Watches only the candidate
/// just ahead; on any watch trouble it reads again. The own key no longer ours counts as lost.
/// `first`: what the creating transaction read, if it read.
#[allow(clippy::too_many_arguments)]
async fn wait_for_turn(
    etcd: &Etcd,
    office: &str,
    lease: &mut Lease,
    ctx: &HoldCtx,
    signals: &mut Signals,
    give_up_at: Option<BootInstant>,
    nonblock: bool,
    first: Option<Ahead>,
) -> Result<Turn, ElectError> {
    let mut timer = queue_timer()?;
    let mut next = first;
    loop {
        let ahead = match next.take() {
            Some(a) => a,
            None => match predecessor(etcd, office, ctx).await? {
                Some(a) => a,
                None => return Ok(Turn::LostWaiting(Loss::NotOwner)),
            },
        };
        let Some(pred) = ahead.key else {
            return Ok(Turn::Ours(ahead.at));
        };
        if give_up_at.is_some_and(|g| BootInstant::now() >= g) {
            return Ok(Turn::GiveUp(give_up_reason(nonblock)));
        }
        tracing::debug!(name = %ctx.name, ahead = %pred, "waiting");
        let opts = WatchOptions::new().with_start_revision(ahead.at + 1);
        match wait_queued(
            etcd, lease, &mut timer, signals, give_up_at, pred, opts, false,
        )
        .await?
        {
            Queued::Moved => {}
            Queued::GiveUp => return Ok(Turn::GiveUp(give_up_reason(nonblock))),
            Queued::Stopped(n) => return Ok(Turn::Stopped(n)),
            Queued::Lost(loss) => return Ok(Turn::LostWaiting(loss)),
        }
    }
}

fn give_up_reason(nonblock: bool) -> NotAcquired {
    if nonblock {
        NotAcquired::Held
    } else {
        NotAcquired::WaitExpired
    }
}

/// The candidate just ahead of the own key (`None`: nobody), read at revision `at`.
struct Ahead {
    key: Option<String>,
    at: i64,
}

/// The first candidate of `kvs` (newest first) that is not `own`.
fn first_other(kvs: &[KeyValue], own: &str) -> Option<String> {
    kvs.iter()
        .find(|kv| kv.key() != own.as_bytes())
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
}

/// Create the own key only if absent, bound to the lease, in one transaction that also reads
/// the candidate ahead (the new key is the newest, so the next newest). Safe to repeat: a
/// repeat finds the key already there on our own lease, reads its create revision, and
/// leaves the read of the candidate ahead to the caller.
async fn create_key(
    etcd: &Etcd,
    key: &str,
    office: &str,
    value: &str,
    lease: &Lease,
) -> Result<(Revision, Option<Ahead>), ElectError> {
    let id = lease.id().0;
    let resp = etcd
        .retry("create candidate key", |mut c| {
            let newest_two = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(2)
                .with_keys_only();
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(key, value, Some(PutOptions::new().with_lease(id))),
                    TxnOp::get(office, Some(newest_two)),
                ])
                .or_else([TxnOp::get(key, None)]);
            async move { c.txn(txn).await }
        })
        .await?;
    if resp.succeeded() {
        let at = resp.header().map(|h| h.revision()).unwrap_or(0);
        let ahead = resp.op_responses().iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(Ahead {
                key: first_other(g.kvs(), key),
                at,
            }),
            _ => None,
        });
        return Ok((Revision(at), ahead));
    }
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(g) = op
            && let Some(kv) = g.kvs().first()
            && kv.lease() == id
        {
            return Ok((Revision(kv.create_revision()), None));
        }
    }
    Err(ElectError::Foreign(key.to_string()))
}

/// The candidate just ahead of the own key (highest create revision below it), read in one
/// transaction guarded by the own key's create revision: `None` when the key is no longer
/// ours.
async fn predecessor(
    etcd: &Etcd,
    office: &str,
    ctx: &HoldCtx,
) -> Result<Option<Ahead>, ElectError> {
    let key = ctx.key.as_str();
    let rev = ctx.rev.0;
    let resp = etcd
        .retry("read candidates", |mut c| {
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(rev - 1)
                .with_limit(1)
                .with_keys_only();
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, rev)])
                .and_then([TxnOp::get(office, Some(opts))]);
            async move { c.txn(txn).await }
        })
        .await?;
    if !resp.succeeded() {
        return Ok(None);
    }
    let at = resp.header().map(|h| h.revision()).unwrap_or(0);
    let key = match resp.op_responses().first() {
        Some(TxnOpResponse::Get(g)) => first_other(g.kvs(), key),
        _ => None,
    };
    Ok(Some(Ahead { key, at }))
}

fn describe_exit(e: Exit) -> String {
    match e {
        Exit::Code(c) => format!("exit {c}"),
        Exit::Signal(s) => format!("killed by signal {s}"),
    }
}

/// Run a hook (`sh -c`) in its own cgroup under the hold, bounded by `--hook-timeout`.
#[allow(clippy::too_many_arguments)]
async fn run_hook_held(
    hook: &str,
    kind: &str,
    env: &[(OsString, OsString)],
    ctx: &HoldCtx,
    containment: &Containment,
    lease: &mut Lease,
    signals: &mut Signals,
    timeout: Duration,
) -> Result<RunEnd, SpawnError> {
    let cmd = hook_command(hook, kind, env, ctx);
    let mut tree = Tree::spawn(containment, &cmd)?;
    tracing::info!(name = %ctx.name, hook = kind, pid = tree.pid(), "hook-start");
    let end = hold::supervise(
        &mut lease.view(),
        &mut tree,
        signals,
        ctx,
        Some(BootInstant::now() + timeout),
    )
    .await;
    tracing::info!(name = %ctx.name, hook = kind, end = ?end, "hook-end");
    Ok(end)
}

fn hook_command(
    hook: &str,
    kind: &str,
    env: &[(OsString, OsString)],
    ctx: &HoldCtx,
) -> ChildCommand {
    ChildCommand {
        argv: vec!["sh".into(), "-c".into(), hook.into()],
        env: env.to_vec(),
        cgroup_leaf: format!("{}-{kind}", leaf("elect", ctx)),
        output: None,
    }
}

/// `--on-lose`: after the child tree is dead, before release or re-campaign; best effort.
/// Runs under the hold when it is still held, else on its own, bounded by `--hook-timeout`.
async fn run_on_lose(
    cfg: &ElectConfig,
    env: &[(OsString, OsString)],
    ctx: &HoldCtx,
    containment: &Containment,
    lease: Option<&mut Lease>,
    signals: &mut Signals,
) {
    let Some(hook) = &cfg.on_lose else { return };
    match lease {
        Some(lease) => {
            if let Err(e) = run_hook_held(
                hook,
                "on-lose",
                env,
                ctx,
                containment,
                lease,
                signals,
                cfg.hook_timeout,
            )
            .await
            {
                tracing::warn!(name = %ctx.name, error = %e, "--on-lose could not start");
            }
        }
        None => {
            let cmd = hook_command(hook, "on-lose", env, ctx);
            let mut tree = match Tree::spawn(containment, &cmd) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(name = %ctx.name, error = %e, "--on-lose could not start");
                    return;
                }
            };
            let done = tokio::time::timeout(cfg.hook_timeout, tree.wait()).await;
            if done.is_err() {
                tracing::warn!(name = %ctx.name, "--on-lose timed out");
            }
            tree.shutdown(cfg.grace).await;
        }
    }
}

/// Wait for a stop signal (forwardable signals are ignored: no child runs now).
async fn stop_signal(signals: &mut Signals) -> i32 {
    loop {
        if let Sig::Stop(n) = signals.recv().await {
            return n;
        }
    }
}
