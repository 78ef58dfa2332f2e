//! One tick on this node: decide it (claim, or record it missed/skipped), and if this node
//! won, run the job under conchd's hold and write its result.
//!
//! The run is the hold loop of holds.md with conchd's lease as the hold: the job's tree is
//! killed by D if the lease can no longer be proven, at `--run-ttl`, or when conchd stops
//! (after `--drain-timeout`). `CONCH_REV` is the fire key's create revision.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::clock::WallClock;
use super::gate::{Gate, Priority};
use super::metrics::Metrics;
use super::session::Session;
use crate::child::{ChildCommand, Containment, Exit, SpawnError, Tree};
use crate::cron::job::{Job, Overlap};
use crate::cron::record::{Decision, FireRecord, ResultRecord, Status, fmt_secs};
use crate::cron::store::{Claim, Store};
use crate::etcd::CallError;
use crate::hold::clock::BootInstant;
use crate::hold::signals::Signals;
use crate::hold::{HoldCtx, RunEnd};
use crate::keys::{Revision, rfc3339_utc, rfc3339_utc_ms};

/// Results kept per job, and the oldest kept (primitives.md: retention).
pub const KEEP_RESULTS: i64 = 100;
pub const KEEP_FOR: Duration = Duration::from_secs(14 * 24 * 3600);

/// A winner's claim this far (ms) from the tick is worth a log line: clock skew or lag.
const SKEW_WORTH_LOGGING_MS: i64 = 500;

/// How often a tick waiting for a provable hold looks again (a hold whose D is too close
/// becomes usable again when renewals move D, which publishes no new session).
const HOLD_RECHECK: Duration = Duration::from_millis(200);

/// A node prunes a job's history on its first run of it and then after every this many.
const PRUNE_EVERY: u32 = 10;

/// Retries of a claim that failed on etcd, while the tick can still be claimed.
const CLAIM_RETRY_START: Duration = Duration::from_millis(200);
const CLAIM_RETRY_CAP: Duration = Duration::from_secs(2);

/// Pause between attempts to write a result, growing to the cap; conchd keeps trying until
/// it lands ("written when etcd is back"), and while stopping for at most
/// [`RESULT_BOUND_STOPPING`].
const RESULT_RETRY_CAP: Duration = Duration::from_secs(5);
const RESULT_BOUND_STOPPING: Duration = Duration::from_secs(5);

/// Claim transactions one conchd has in flight at most: enough to keep etcd's batching busy,
/// few enough that a burst of thousands of due ticks does not crowd out the lease's renewals
/// or time itself out (see [`super::gate`]).
pub const CLAIMS_IN_FLIGHT: usize = 32;

/// Supervisor spawns in progress at most: four per CPU. Each blocks a thread until its child
/// has exec'd, and most of that time is the new processes' own start-up on the CPUs, so more
/// at once only lengthens each; fewer left CPUs idle (measured in B8, issue 6).
pub fn spawns_in_progress() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get().saturating_mul(4))
}

/// What every tick task shares.
#[derive(Debug)]
pub struct Shared {
    pub store: Store,
    pub node: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub containment: Containment,
    /// `--kill-after`.
    pub grace: Duration,
    pub clock: WallClock,
    pub metrics: Arc<Metrics>,
    /// Raised by conchd to stop runs: see [`Signals::from_level`].
    pub stop_level: watch::Receiver<u32>,
    /// Set when conchd stops: result writes become bounded.
    pub stopping: CancellationToken,
    pub json_output: bool,
    /// Runs of each job on this node since its history was last pruned here.
    pub runs_since_prune: std::sync::Mutex<std::collections::HashMap<crate::keys::Name, u32>>,
    /// Admission to claiming and to spawning, most urgent tick first.
    pub claims: Arc<Gate>,
    pub spawns: Arc<Gate>,
    /// `--trust-key` (empty: every spec runs).
    pub trusted: crate::cron::sign::TrustedKeys,
}

/// A manual run's trigger: its key and create revision.
#[derive(Debug, Clone)]
pub struct TriggerRef {
    pub key: String,
    pub rev: i64,
}

/// How deciding a tick on this node ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickEnd {
    /// This node ran it (the result is written).
    Ran,
    /// Recorded skipped by this node.
    Skipped,
    /// Another node decided it (`fire_existed`), or the trigger was gone (`!fire_existed`).
    Taken { fire_existed: bool },
    /// Past its starting deadline: recorded missed (by this node or another).
    Missed,
    /// No provable hold, conchd stopping, or etcd failing: not claimed by this node.
    NotClaimed,
}

/// Decide `tick` of `job` on this node and run it if this node wins. Claims only under a
/// provable hold (`sessions`): without one it waits for the hold to come back until the
/// tick's starting deadline passes, and then records the tick missed if nobody decided it —
/// a tick that falls into a lease outage is never silently dropped. A manual run waits for
/// the hold as long as conchd runs.
pub async fn tick(
    sh: Arc<Shared>,
    mut sessions: watch::Receiver<Option<Session>>,
    job: Arc<Job>,
    tick: i64,
    trigger: Option<TriggerRef>,
) -> TickEnd {
    let manual = trigger.is_some();
    let name = &job.name;
    let priority = urgency(&job, tick, manual);
    let deadline_ms = (tick * 1000)
        .saturating_add(job.jitter_offset().as_millis() as i64)
        .saturating_add(job.starting_deadline.as_millis() as i64);
    let mut retry = CLAIM_RETRY_START;
    // The first attempt's claim time names every retry of this claim: an attempt that
    // committed but whose answer was lost is then recognised as ours (store::claim).
    let first_attempt_ms = sh.clock.now_ms();
    loop {
        let now_ms = sh.clock.now_ms();
        if !manual && now_ms > deadline_ms {
            Box::pin(record_missed(&sh, &job, tick, now_ms, false)).await;
            return TickEnd::Missed;
        }
        if sh.stopping.is_cancelled() {
            return TickEnd::NotClaimed;
        }
        let current = sessions.borrow_and_update().clone();
        let Some(session) = current.as_ref().filter(|s| fits(s, sh.grace)) else {
            // No provable hold: wait for one (a new lease, or renewals moving D) until the
            // tick's deadline, then decide again at the top.
            tracing::debug!(name = %name, tick, "no provable hold; waiting before claiming");
            let left = if manual {
                HOLD_RECHECK
            } else {
                Duration::from_millis((deadline_ms - now_ms).max(0) as u64 + 1).min(HOLD_RECHECK)
            };
            tokio::select! {
                _ = sh.stopping.cancelled() => return TickEnd::NotClaimed,
                r = sessions.changed() => if r.is_err() { return TickEnd::NotClaimed },
                _ = tokio::time::sleep(left) => {}
            }
            continue;
        };
        let session = session.clone();
        let session = &session;
        let fire = FireRecord {
            node: sh.node.clone(),
            lease: session.lease.to_string(),
            decision: Decision::Run,
            claimed: rfc3339_utc_ms(first_attempt_ms),
            manual,
        };
        let skipped = ResultRecord {
            reason: Some("the previous run of this job is still running (--overlap forbid)".into()),
            ..ResultRecord::new(tick, &sh.node, Status::Skipped, manual)
        };
        let running = serde_json::json!({"node": sh.node, "tick": rfc3339_utc(tick as u64), "lease": session.lease.to_string()}).to_string();
        let permit = sh.claims.enter(priority).await;
        // The wait at the gate may have been long: look again at what was checked before it.
        if sh.stopping.is_cancelled() {
            return TickEnd::NotClaimed;
        }
        let same_hold = sessions
            .borrow()
            .as_ref()
            .is_some_and(|s| s.lease == session.lease)
            && fits(session, sh.grace);
        if !same_hold || (!manual && sh.clock.now_ms() > deadline_ms) {
            // Past the deadline, or the hold changed meanwhile: decide it at the top.
            continue;
        }
        let sent = BootInstant::now();
        let claimed = Box::pin(sh.store.claim(
            name,
            tick,
            job.spec.overlap,
            &fire,
            &running,
            session.lease.0,
            &skipped,
            trigger.as_ref().map(|t| (t.key.as_str(), t.rev)),
        ))
        .await;
        drop(permit);
        sh.metrics
            .claim_latency
            .observe_ms((BootInstant::now() - sent).as_millis() as u64);
        match claimed {
            Ok(Claim::Won { rev }) => {
                sh.metrics.claimed.fetch_add(1, Relaxed);
                Box::pin(run(&sh, session, &job, tick, rev, manual)).await;
                return TickEnd::Ran;
            }
            Ok(Claim::WonUnderOldLease { rev }) => {
                // The claim landed while conchd's previous lease was being lost. Nobody else
                // can run this tick; with overlap=allow this node runs it now, under the new
                // hold. With overlap=forbid the `running` key went with the old lease, so a
                // run now could overlap one elsewhere: the tick is recorded missed instead.
                sh.metrics.claimed.fetch_add(1, Relaxed);
                if job.spec.overlap == Overlap::Allow {
                    Box::pin(run(&sh, session, &job, tick, rev, manual)).await;
                    return TickEnd::Ran;
                }
                let now_ms = sh.clock.now_ms();
                let mut result = missed_result(&sh, &job, tick, now_ms, false);
                result.rev = Some(rev);
                result.reason = Some("claimed while conchd's lease was being lost; not run, since the overlap guard went with that lease (--overlap forbid)".into());
                Box::pin(write_result(&sh, &job, tick, &result)).await;
                return TickEnd::Missed;
            }
            Ok(Claim::Skipped) => {
                sh.metrics.skipped.fetch_add(1, Relaxed);
                tracing::info!(name = %name, tick, "skipped: the previous run still runs (--overlap forbid)");
                return TickEnd::Skipped;
            }
            Ok(Claim::Taken { existed, winner }) => {
                let fire_existed = existed;
                if fire_existed {
                    sh.metrics.lost_race.fetch_add(1, Relaxed);
                }
                if let Some(w) = winner
                    && let Some(claimed_s) = crate::keys::parse_rfc3339_utc(&w.claimed)
                {
                    let frac = w
                        .claimed
                        .rsplit('.')
                        .next()
                        .and_then(|f| f.trim_end_matches('Z').parse::<i64>().ok())
                        .unwrap_or(0);
                    let offset = claimed_s * 1000 + frac
                        - tick * 1000
                        - job.jitter_offset().as_millis() as i64;
                    sh.metrics.observed_claim_offset_ms.store(offset, Relaxed);
                    tracing::debug!(name = %name, tick, winner = %w.node, claim_offset_ms = offset, "tick taken by another node");
                    // A winner claiming far from the tick means clock skew (or a slow node):
                    // say so, at most once a minute.
                    let now = sh.clock.now_ms();
                    let last = sh.metrics.skew_logged_ms.load(Relaxed);
                    if offset.abs() >= SKEW_WORTH_LOGGING_MS
                        && now - last >= 60_000
                        && sh
                            .metrics
                            .skew_logged_ms
                            .compare_exchange(last, now, Relaxed, Relaxed)
                            .is_ok()
                    {
                        tracing::info!(name = %name, tick, winner = %w.node, claim_offset_ms = offset, "skew: the winner claimed this far from the tick (its clock, or its lag)");
                    }
                }
                return TickEnd::Taken { fire_existed };
            }
            Err(e) => {
                sh.metrics.etcd_errors.fetch_add(1, Relaxed);
                tracing::warn!(name = %name, tick, error = %e, "claim failed; retrying while the tick may still start");
                if manual {
                    // The trigger stays; the watch brings it back after reconnecting.
                    return TickEnd::NotClaimed;
                }
                tokio::select! {
                    _ = sh.stopping.cancelled() => return TickEnd::NotClaimed,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(CLAIM_RETRY_CAP);
            }
        }
    }
}

/// How urgent a tick is (smaller first): manual runs, then the job with the shorter period
/// (the gap to its next tick), then the older tick. See [`super::gate`].
fn urgency(job: &Job, tick: i64, manual: bool) -> Priority {
    if manual {
        return (0, tick);
    }
    let period_ms = job.schedule.next_after(tick).map_or(u64::MAX, |next| {
        (next - tick).unsigned_abs().saturating_mul(1000)
    });
    (period_ms, tick)
}

/// The hold is alive and leaves room for a run: `D − now ≥ G + 1 s` (holds.md §4).
fn fits(s: &Session, grace: Duration) -> bool {
    let st = s.view.state();
    st.lost.is_none() && st.deadline.fits_run(BootInstant::now(), grace)
}

/// Record `tick` missed, once, if nobody decided it. `superseded`: a newer tick of the job
/// was due too, and only the newest runs.
pub async fn record_missed(sh: &Shared, job: &Job, tick: i64, now_ms: i64, superseded: bool) {
    // A restart can find thousands of these at once: they queue with the claims.
    let _permit = sh.claims.enter(urgency(job, tick, false)).await;
    Box::pin(record_missed_now(sh, job, tick, now_ms, superseded)).await;
}

async fn record_missed_now(sh: &Shared, job: &Job, tick: i64, now_ms: i64, superseded: bool) {
    let fire = FireRecord {
        node: sh.node.clone(),
        lease: String::new(),
        decision: Decision::Missed,
        claimed: rfc3339_utc_ms(now_ms),
        manual: false,
    };
    let result = missed_result(sh, job, tick, now_ms, superseded);
    match sh.store.record_unrun(&job.name, tick, &fire, &result).await {
        Ok(true) => {
            sh.metrics.missed.fetch_add(1, Relaxed);
            tracing::warn!(name = %job.name, tick, "missed: nobody started this tick within its starting deadline");
        }
        Ok(false) => {}
        Err(e) => {
            sh.metrics.etcd_errors.fetch_add(1, Relaxed);
            tracing::warn!(name = %job.name, tick, error = %e, "cannot record a missed tick");
        }
    }
}

/// The result of a tick nobody started in time.
fn missed_result(sh: &Shared, job: &Job, tick: i64, now_ms: i64, superseded: bool) -> ResultRecord {
    let late = Duration::from_millis((now_ms - tick * 1000).max(0) as u64);
    ResultRecord {
        reason: Some(if superseded {
            format!(
                "not started before a newer tick was due (noticed {} after the tick; only the newest runs)",
                fmt_secs(late)
            )
        } else {
            format!(
                "not started within --starting-deadline {} (noticed {} after the tick)",
                humantime::format_duration(job.starting_deadline),
                fmt_secs(late)
            )
        }),
        ..ResultRecord::new(tick, &sh.node, Status::Missed, false)
    }
}

/// Run a won tick and write its result.
async fn run(sh: &Shared, session: &Session, job: &Job, tick: i64, rev: i64, manual: bool) {
    let name = &job.name;
    let fire_key = sh.store.prefix.cron_fire(name, tick);
    let ctx = HoldCtx {
        name: name.to_string(),
        key: fire_key,
        rev: Revision(rev),
        lease: session.lease,
        since: BootInstant::now(),
    };
    let tick_text = rfc3339_utc(tick as u64);
    let mut result = ResultRecord {
        rev: Some(rev),
        ..ResultRecord::new(tick, &sh.node, Status::Failed, manual)
    };
    // With --trust-key, a spec that is not signed by a trusted key is decided (the tick is
    // claimed, so no other node runs it either) but never run.
    match sh.trusted.admit(name.as_str(), &job.spec) {
        Err(refusal) => {
            tracing::warn!(name = %name, tick = %tick_text, reason = %refusal, "refused");
            result.status = Status::Refused;
            result.reason = Some(refusal.to_string());
        }
        Ok(()) => {
            sh.metrics.running.fetch_add(1, Relaxed);
            execute(sh, session, job, tick, &ctx, &mut result).await;
            sh.metrics.running.fetch_sub(1, Relaxed);
            let counter = match result.status {
                Status::Ok => &sh.metrics.runs_ok,
                Status::Killed => &sh.metrics.runs_killed,
                _ => &sh.metrics.runs_failed,
            };
            counter.fetch_add(1, Relaxed);
        }
    }
    tracing::info!(name = %name, tick = %tick_text, rev, status = result.status.as_str(), exit = ?result.exit, duration = ?result.duration, "result");
    write_result(sh, job, tick, &result).await;
    if job.spec.overlap == Overlap::Forbid
        // Created in the same transaction as the fire key: the same create revision.
        && let Err(e) = sh.store.release_running(name, rev).await
    {
        // It is on conchd's lease: it goes when the lease does.
        tracing::warn!(name = %name, error = %e, "cannot remove the running key");
    }
    // Retention: on this node's first run of the job, then every PRUNE_EVERY-th — each
    // node prunes the jobs it runs, no coordination needed (range deletes are idempotent).
    let due = {
        let mut counts = sh
            .runs_since_prune
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let c = counts.entry(name.clone()).or_insert(0);
        let due = (*c).is_multiple_of(PRUNE_EVERY);
        *c += 1;
        due
    };
    if due {
        let now_s = sh.clock.now_ms() / 1000;
        let min_tick = now_s - KEEP_FOR.as_secs() as i64;
        let floor = now_s - job.starting_deadline.as_secs() as i64 - 60;
        if let Err(e) = sh.store.prune(name, KEEP_RESULTS, min_tick, floor).await {
            tracing::debug!(name = %name, error = %e, "retention prune failed");
        }
    }
}

/// Spawn, supervise, and fill in `result`.
async fn execute(
    sh: &Shared,
    session: &Session,
    job: &Job,
    tick: i64,
    ctx: &HoldCtx,
    result: &mut ResultRecord,
) {
    // Its turn to spawn first, then the hold: a wait at the gate must not outlast the proof.
    let permit = sh.spawns.enter(urgency(job, tick, result.manual)).await;
    if !fits(session, sh.grace) {
        result.status = Status::Killed;
        result.reason =
            Some("conchd's hold could not be proven when the run was to start; not started".into());
        return;
    }
    let (read, write) = match super::output::pipe() {
        Ok(p) => p,
        Err(e) => {
            result.reason = Some(format!("cannot make the output pipe: {e}"));
            return;
        }
    };
    let mut env = crate::recipes::child_env(&sh.node, ctx);
    env.push(("CONCH_TICK".into(), rfc3339_utc(tick as u64).into()));
    let cmd = ChildCommand {
        argv: job.spec.cmd.iter().map(OsString::from).collect(),
        env,
        cgroup_leaf: format!("cron-{}-{}", job.name, crate::keys::tick_key(tick)),
        output: Some(Arc::new(write)),
    };
    let containment = sh.containment.clone();
    let started_ms = sh.clock.now_ms();
    let started = BootInstant::now();
    // Spawning blocks until the child has exec'd: keep it off the scheduler's thread.
    let spawn_began = BootInstant::now();
    let spawned = tokio::task::spawn_blocking(move || Tree::spawn(&containment, &cmd)).await;
    drop(permit);
    sh.metrics
        .spawn_latency
        .observe_ms((BootInstant::now() - spawn_began).as_millis() as u64);
    // Tick lag: from the tick (plus jitter) to the child having exec'd.
    let lag = sh.clock.now_ms() - tick * 1000 - job.jitter_offset().as_millis() as i64;
    sh.metrics.tick_lag.observe_ms(lag.max(0) as u64);
    result.started = Some(rfc3339_utc_ms(started_ms));
    let mut tree = match spawned {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            result.exit = Some(match e {
                SpawnError::NotFound(_) => 127,
                _ => 126,
            });
            result.reason = Some(e.to_string());
            result.duration = Some(fmt_secs(Duration::ZERO));
            return;
        }
        Err(e) => {
            result.reason = Some(format!("spawn task failed: {e}"));
            return;
        }
    };
    crate::hold_event!(
        info,
        ctx,
        "child-start",
        pid = tree.pid(),
        tick_lag_ms = lag
    );
    let pump = tokio::spawn(super::output::pump(
        read,
        job.name.to_string(),
        sh.json_output,
    ));
    let mut view = session.view.clone();
    let mut signals = Signals::from_level(sh.stop_level.clone());
    let limit = started + job.run_ttl;
    let end = crate::hold::supervise(&mut view, &mut tree, &mut signals, ctx, Some(limit)).await;
    result.cpu = tree.cpu_usage().map(fmt_secs);
    tree.shutdown(sh.grace).await;
    drop(tree);
    let elapsed = BootInstant::now() - started;
    result.duration = Some(fmt_secs(elapsed));
    sh.metrics
        .run_duration
        .observe_ms(elapsed.as_millis() as u64);
    // The pipe ends when the last process holding it is gone; the tree is.
    let _ = tokio::time::timeout(Duration::from_secs(1), pump).await;
    let exit_fields = |r: &mut ResultRecord, e: Exit| match e {
        Exit::Code(c) => r.exit = Some(c),
        Exit::Signal(s) => r.signal = Some(s),
    };
    match end {
        RunEnd::Exited(e) => {
            exit_fields(result, e);
            result.status = if e == Exit::Code(0) {
                Status::Ok
            } else {
                Status::Failed
            };
        }
        RunEnd::TimedOut(e) => {
            exit_fields(result, e);
            result.status = Status::Killed;
            result.reason = Some(format!(
                "still running after --run-ttl {}",
                humantime::format_duration(job.run_ttl)
            ));
        }
        RunEnd::Lost(loss, e) => {
            exit_fields(result, e);
            result.status = Status::Killed;
            result.reason = Some(format!("conchd's hold was lost ({loss})"));
        }
        RunEnd::Stopped(_, e) => {
            exit_fields(result, e);
            result.status = Status::Killed;
            result.reason = Some("conchd stopped and the run outlasted --drain-timeout".into());
        }
    }
}

/// Write a result until it lands; while conchd stops, give up after a bound.
async fn write_result(sh: &Shared, job: &Job, tick: i64, result: &ResultRecord) {
    let mut pause = Duration::from_millis(200);
    let mut stopping_since: Option<BootInstant> = None;
    loop {
        match sh.store.write_result(&job.name, tick, result).await {
            Ok(()) => return,
            Err(e) => {
                sh.metrics.etcd_errors.fetch_add(1, Relaxed);
                log_result_retry(&job.name, tick, &e);
            }
        }
        if sh.stopping.is_cancelled() {
            let since = *stopping_since.get_or_insert_with(BootInstant::now);
            if BootInstant::now() - since >= RESULT_BOUND_STOPPING {
                tracing::error!(name = %job.name, tick, result = %result.to_json(), "giving up writing a result: conchd is stopping and etcd does not answer");
                return;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RESULT_RETRY_CAP);
    }
}

fn log_result_retry(name: &crate::keys::Name, tick: i64, e: &CallError) {
    tracing::warn!(name = %name, tick, error = %e, "cannot write the result yet; retrying");
}
