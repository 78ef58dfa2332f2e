//! conchd: the per-node cron daemon (primitives.md, "cron and conchd").
//!
//! Every node runs the same daemon; there is no scheduler node. The task tree:
//!
//! ```text
//!   run() — the scheduler loop: job table, due ticks, triggers, signals, drain
//!    ├── session   one lease for the daemon + node/<node> on it   (session.rs)
//!    ├── watch     cron/job/ and cron/trigger/, re-read on every reconnect (watch.rs)
//!    ├── ticks     one task per due tick: claim, run under the hold, result (run.rs)
//!    ├── aux       lookbacks (misses while nobody ran), history clean-up
//!    └── status    the read-only HTTP API and page, if --status-addr (status/)
//! ```
//!
//! The loop itself never awaits etcd: everything that talks to etcd is a task it owns, and
//! shutdown cancels and awaits every one of them. On SIGTERM (or INT, QUIT) conchd stops
//! claiming, lets runs finish for `--drain-timeout`, then stops them (SIGTERM, then the kill
//! schedule; a second signal kills at once), writes their results, revokes its lease and
//! returns.

#![forbid(unsafe_code)]

pub mod clock;
pub mod daemonize;
pub mod gate;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod run;
pub mod session;
pub mod table;
pub mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::{mpsc, watch as tokio_watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::child::Containment;
use crate::cron::job::JobSpec;
use crate::cron::record::Trigger;
use crate::cron::store::Store;
use crate::etcd::Etcd;
use crate::hold::signals::{Sig, Signals};
use crate::keys::{Name, Prefix};
use clock::WallClock;
use metrics::Metrics;
use run::{Shared, TickEnd, TriggerRef};
use session::Session;
use table::{Table, Upserted};
use watch::DirEvent;

/// Longest the loop sleeps without looking at the wall clock again: a clock step (NTP, a
/// resumed VM) is noticed within this long.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Ticks looked back at for misses per job: at most this many are recorded per lookback.
const LOOKBACK_MAX: usize = 100;

/// Tries of a manual run whose tick second is already taken by a scheduled tick.
const MANUAL_TICK_TRIES: i64 = 5;

#[derive(Debug)]
pub struct Config {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub prefix: Prefix,
    pub ttl: Duration,
    pub grace: Duration,
    pub drain_timeout: Duration,
    pub containment: Containment,
    pub json_output: bool,
    pub status: Option<crate::status::server::Listener>,
    /// `--trust-key`: when not empty, only specs signed by one of these keys run; the others'
    /// ticks are recorded `refused`.
    pub trusted: crate::cron::sign::TrustedKeys,
}

/// Run conchd until a stop signal; then drain, revoke and return.
pub async fn run(etcd: Etcd, cfg: Config, mut signals: Signals) {
    let metrics = Arc::new(Metrics::default());
    let store = Store::new(etcd.clone(), cfg.prefix.clone());
    let clock = WallClock::system();
    let stopping = CancellationToken::new();
    let (stop_tx, stop_rx) = tokio_watch::channel(0u32);
    let sh = Arc::new(Shared {
        store: store.clone(),
        node: cfg.node.clone(),
        labels: cfg.labels.clone(),
        containment: cfg.containment.clone(),
        grace: cfg.grace,
        clock,
        metrics: metrics.clone(),
        stop_level: stop_rx,
        stopping: stopping.clone(),
        json_output: cfg.json_output,
        runs_since_prune: Default::default(),
        claims: gate::Gate::new(run::CLAIMS_IN_FLIGHT),
        spawns: gate::Gate::new(run::spawns_in_progress()),
        trusted: cfg.trusted.clone(),
    });

    // The owned background tasks.
    let background = CancellationToken::new();
    let session_cancel = CancellationToken::new();
    let (session_tx, mut session_rx) = tokio_watch::channel::<Option<Session>>(None);
    let session_task = tokio::spawn(session::keep(
        session::SessionConfig {
            store: store.clone(),
            node: cfg.node.clone(),
            labels: cfg.labels.clone(),
            ttl: cfg.ttl,
            grace: cfg.grace,
            metrics: metrics.clone(),
        },
        session_tx,
        session_cancel.clone(),
    ));
    let watching = metrics.jobs_watching.clone();
    let (jobs_tx, mut jobs_rx) = mpsc::channel(1024);
    let (trig_tx, mut trig_rx) = mpsc::channel(1024);
    let mut watchers = JoinSet::new();
    watchers.spawn(watch::watch_dir(
        etcd.clone(),
        cfg.prefix.cron_jobs(),
        jobs_tx,
        Some(watching.clone()),
        background.clone(),
    ));
    watchers.spawn(watch::watch_dir(
        etcd.clone(),
        cfg.prefix.cron_triggers(),
        trig_tx,
        None,
        background.clone(),
    ));
    if let Some(listener) = cfg.status {
        let model = crate::status::server::Source {
            store: store.clone(),
            node: cfg.node.clone(),
            metrics: metrics.clone(),
        };
        watchers.spawn(crate::status::server::serve(
            listener,
            model,
            background.clone(),
        ));
    }
    let notify = notify::Notifier::from_env();
    let mut watchdog = notify
        .as_ref()
        .and_then(|n| n.watchdog_interval())
        .map(tokio::time::interval);
    let mut ready_sent = false;

    let mut table = Table::new();
    let mut ticks: JoinSet<(Name, TickEnd, Option<String>)> = JoinSet::new();
    let mut aux: JoinSet<()> = JoinSet::new();
    let mut pending_triggers: HashMap<Name, Vec<TriggerRef>> = HashMap::new();
    let mut triggers_in_flight: HashSet<String> = HashSet::new();
    let mut had_session = false;

    let stop_signal = loop {
        metrics.jobs.store(table.len() as u64, Relaxed);
        if !ready_sent && watching.load(Relaxed) && session_rx.borrow().is_some() {
            ready_sent = true;
            tracing::info!(node = %cfg.node, jobs = table.len(), "ready");
            if let Some(n) = &notify {
                n.send("READY=1");
            }
        }
        let now = clock.now_ms();
        let sleep_ms = table
            .next_wake_ms()
            .map_or(MAX_SLEEP.as_millis() as i64, |w| {
                (w - now).clamp(0, MAX_SLEEP.as_millis() as i64)
            });
        tokio::select! {
            biased;
            sig = signals.recv() => match sig {
                Sig::Stop(n) => break n,
                Sig::Forward(n) => tracing::info!(signal = n, "signal ignored (conchd forwards no signals to jobs)"),
            },
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms as u64)) => {
                let due = table.pop_due(clock.now_ms());
                // Several ticks of one job due at once (conchd started, or fell behind): run
                // only the newest; the older ones are recorded missed unless someone decided
                // them. A burst of stale runs helps nobody.
                let mut newest: HashMap<&Name, i64> = HashMap::new();
                for d in &due {
                    newest.insert(&d.job.name, d.tick);
                }
                let newest: HashMap<Name, i64> = newest.into_iter().map(|(n, t)| (n.clone(), t)).collect();
                for d in due {
                    if d.job.spec.paused || !d.job.selects(&cfg.labels) {
                        continue;
                    }
                    let name = d.job.name.clone();
                    if newest.get(&name) != Some(&d.tick) {
                        let (sh, job) = (sh.clone(), d.job);
                        aux.spawn(async move {
                            let now = sh.clock.now_ms();
                            run::record_missed(&sh, &job, d.tick, now, true).await;
                        });
                        continue;
                    }
                    let t = run::tick(sh.clone(), session_rx.clone(), d.job, d.tick, None);
                    ticks.spawn(async move { (name, t.await, None) });
                }
            }
            ev = jobs_rx.recv() => {
                let Some(ev) = ev else { continue };
                let now = clock.now_ms();
                let mut new = vec![];
                match ev {
                    DirEvent::Snapshot(entries) => {
                        let present: HashSet<String> = entries.iter().map(|e| e.name.clone()).collect();
                        let gone: Vec<Name> = table.names().filter(|n| !present.contains(n.as_str())).cloned().collect();
                        for n in gone {
                            table.remove(&n);
                        }
                        for e in entries {
                            if let Some(j) = load_job(&mut table, &e, now) {
                                new.push(j);
                            }
                        }
                        // After (re)connecting: every job may have ticks nobody decided.
                        new = table.names().cloned().collect();
                    }
                    DirEvent::Put(e) => {
                        if let Some(j) = load_job(&mut table, &e, now) {
                            new.push(j);
                        }
                    }
                    DirEvent::Delete(n) => {
                        if let Ok(n) = Name::parse(&n) {
                            table.remove(&n);
                            tracing::info!(name = %n, "job removed");
                        }
                    }
                }
                let jobs = lookback_set(&table, new.iter());
                if !jobs.is_empty() {
                    let sh = sh.clone();
                    aux.spawn(async move {
                        for (job, below) in jobs {
                            lookback(&sh, &job, below).await;
                        }
                    });
                }
                for n in new {
                    if let Some(trs) = pending_triggers.remove(&n) {
                        for tr in trs {
                            start_manual(&sh, &table, &session_rx, &cfg.labels, &mut ticks, &mut triggers_in_flight, n.clone(), tr);
                        }
                    }
                }
            }
            ev = trig_rx.recv() => {
                let Some(ev) = ev else { continue };
                let entries = match ev {
                    DirEvent::Snapshot(es) => es,
                    DirEvent::Put(e) => vec![e],
                    DirEvent::Delete(_) => vec![],
                };
                for e in entries {
                    // <name>/<id>
                    let Some(name) = e.name.split_once('/').and_then(|(n, _)| Name::parse(n).ok()) else { continue };
                    if Trigger::parse(&e.value).is_none() {
                        tracing::warn!(key = %e.name, "ignoring a trigger conch did not write");
                        continue;
                    }
                    let tr = TriggerRef { key: format!("{}{}", cfg.prefix.cron_triggers(), e.name), rev: e.create_rev };
                    if table.get(&name).is_none() {
                        pending_triggers.entry(name).or_default().push(tr);
                        continue;
                    }
                    start_manual(&sh, &table, &session_rx, &cfg.labels, &mut ticks, &mut triggers_in_flight, name, tr);
                }
            }
            Some(done) = ticks.join_next(), if !ticks.is_empty() => {
                if let Ok((_, _, Some(trigger))) = &done {
                    triggers_in_flight.remove(trigger);
                }
                if let Ok((name, _, _)) = done
                    && table.get(&name).is_none()
                {
                    // Removed while it ran: its last result is written; clear its history.
                    let store = store.clone();
                    aux.spawn(async move {
                        let _ = store.clear_history(&name).await;
                    });
                }
            }
            Some(_) = aux.join_next(), if !aux.is_empty() => {}
            _ = session_rx.changed() => {
                // Back from a time without a provable hold: ticks this node could not claim
                // meanwhile may be undecided. Look back (misses are recorded once).
                let back = session_rx.borrow_and_update().is_some();
                if back && had_session {
                    let jobs = lookback_set(&table, table.names());
                    let sh = sh.clone();
                    aux.spawn(async move {
                        for (job, below) in jobs {
                            lookback(&sh, &job, below).await;
                        }
                    });
                }
                had_session |= back;
            }
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                if let Some(n) = &notify {
                    n.send("WATCHDOG=1");
                }
            }
        }
    };

    // Drain.
    tracing::info!(signal = stop_signal, running = metrics.running.load(Relaxed), drain_timeout = %humantime::format_duration(cfg.drain_timeout), "stopping: no new claims; draining runs");
    if let Some(n) = &notify {
        n.send("STOPPING=1");
    }
    stopping.cancel();
    background.cancel();
    aux.abort_all();
    let drain_until = tokio::time::Instant::now() + cfg.drain_timeout;
    let mut level = 0u32;
    while !ticks.is_empty() {
        tokio::select! {
            biased;
            sig = signals.recv() => if let Sig::Stop(_) = sig {
                level += 1;
                tracing::warn!(level, "stop signal while draining: stopping runs now");
                let _ = stop_tx.send(level);
            },
            _ = tokio::time::sleep_until(drain_until), if level == 0 => {
                level = 1;
                tracing::warn!(running = metrics.running.load(Relaxed), "drain timeout: stopping runs");
                let _ = stop_tx.send(level);
            }
            _ = ticks.join_next() => {}
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                if let Some(n) = &notify {
                    n.send("WATCHDOG=1");
                }
            }
        }
    }
    while aux.join_next().await.is_some() {}
    while watchers.join_next().await.is_some() {}
    session_cancel.cancel();
    let _ = session_task.await;
    tracing::info!(node = %cfg.node, "conchd stopped");
}

/// Validate a stored job and put it in the table. Returns its name if it is new to the table.
fn load_job(table: &mut Table, e: &watch::Entry, now_ms: i64) -> Option<Name> {
    let Ok(name) = Name::parse(&e.name) else {
        tracing::warn!(key = %e.name, "ignoring a job whose name is not valid");
        return None;
    };
    let job = JobSpec::decode(&e.value).and_then(|s| s.validate(&name, now_ms / 1000, e.mod_rev));
    match job {
        Ok(job) => {
            let how = table.upsert(job, now_ms);
            if how != Upserted::Same {
                tracing::info!(name = %name, change = ?how, next = ?table.next_tick(&name), "job loaded");
            }
            (how == Upserted::New).then_some(name)
        }
        Err(err) => {
            // Never run what does not validate; drop an older valid version too.
            table.remove(&name);
            tracing::warn!(name = %name, error = %err, "ignoring an invalid job spec");
            None
        }
    }
}

/// Start a manual run of `name` for trigger `tr` (if this node may run it).
#[allow(clippy::too_many_arguments)]
fn start_manual(
    sh: &Arc<Shared>,
    table: &Table,
    session_rx: &tokio_watch::Receiver<Option<Session>>,
    labels: &BTreeMap<String, String>,
    ticks: &mut JoinSet<(Name, TickEnd, Option<String>)>,
    in_flight: &mut HashSet<String>,
    name: Name,
    tr: TriggerRef,
) {
    let Some(job) = table.get(&name).cloned() else {
        return;
    };
    if !job.selects(labels) || !in_flight.insert(tr.key.clone()) {
        return;
    }
    let sh = sh.clone();
    let sessions = session_rx.clone();
    let key = tr.key.clone();
    ticks.spawn(async move {
        let first = sh.clock.now_ms() / 1000;
        let mut end = TickEnd::NotClaimed;
        for t in first..first + MANUAL_TICK_TRIES {
            end = run::tick(
                sh.clone(),
                sessions.clone(),
                job.clone(),
                t,
                Some(tr.clone()),
            )
            .await;
            // The second is taken by a scheduled tick: try the next one.
            if end != (TickEnd::Taken { fire_existed: true }) {
                break;
            }
        }
        (name, end, Some(key))
    });
}

/// The jobs named by `names` with the tick each one's lookback stops before: the next tick
/// the table hands out (that one and later ones are the table's to decide).
fn lookback_set<'a>(
    table: &Table,
    names: impl Iterator<Item = &'a Name>,
) -> Vec<(Arc<crate::cron::job::Job>, Option<i64>)> {
    names
        .filter_map(|n| table.get(n).map(|j| (j.clone(), table.next_tick(n))))
        .collect()
}

/// Record the ticks of `job` before `below` (the table's next tick; `None`: no bound) that
/// nobody decided before their starting deadline passed (all conchd were down, or etcd was):
/// each at most once, the newest [`LOOKBACK_MAX`]. Ticks older than the newest claim before
/// `below` count as decided: a claim at or after `below` may be one this conchd's table made
/// a moment ago, and must not hide the undecided ticks before it.
async fn lookback(sh: &Shared, job: &crate::cron::job::Job, below: Option<i64>) {
    if job.spec.paused {
        return;
    }
    let now_ms = sh.clock.now_ms();
    let now_s = now_ms / 1000;
    let sd = job.starting_deadline.as_secs() as i64;
    let jitter = job.jitter_offset().as_millis() as i64;
    // Ticks whose start deadline has passed: t*1000 + jitter + sd*1000 < now.
    let mut to = (now_ms - jitter - sd * 1000 - 1).div_euclid(1000);
    let mut from = job.resumed_at.max(now_s - run::KEEP_FOR.as_secs() as i64);
    let newest = match below {
        Some(b) => {
            to = to.min(b - 1);
            sh.store.newest_fire_before(&job.name, b).await
        }
        None => sh
            .store
            .fires(&job.name, 1)
            .await
            .map(|f| f.first().map(|(t, _, _)| *t)),
    };
    match newest {
        Ok(t) => {
            if let Some(t) = t {
                from = from.max(t);
            }
        }
        Err(e) => {
            tracing::debug!(name = %job.name, error = %e, "lookback: cannot read the last claim");
            return;
        }
    }
    if from >= to {
        return;
    }
    let mut ticks = std::collections::VecDeque::new();
    for window in [3600, 86_400, run::KEEP_FOR.as_secs() as i64] {
        ticks.clear();
        let start = from.max(to - window);
        let mut t = start;
        while let Some(n) = job.schedule.next_after(t) {
            if n > to {
                break;
            }
            ticks.push_back(n);
            if ticks.len() > LOOKBACK_MAX {
                ticks.pop_front();
            }
            t = n;
        }
        if ticks.len() >= LOOKBACK_MAX || start == from {
            break;
        }
    }
    for t in ticks {
        run::record_missed(sh, job, t, now_ms, false).await;
    }
}
