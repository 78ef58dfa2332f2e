//! The status model: every office, semaphore, cron job and conchd node under the prefix,
//! read straight from etcd. `conch status --json`, `conch cron ls --json` and the conchd
//! status API serve these same structs, so they cannot drift apart.
//!
//! Values conch did not write (another tool's key, a corrupted value) are shown as unknown,
//! never as a crash.

#![forbid(unsafe_code)]

pub mod page;
pub mod server;

use std::collections::BTreeMap;

use etcd_client::{GetOptions, SortOrder, SortTarget};
use serde::Serialize;

use crate::cron::job::JobSpec;
use crate::cron::record::{Decision, FireRecord, ResultRecord, Status as RunStatus};
use crate::cron::store::Store;
use crate::etcd::CallError;
use crate::keys::{HolderRecord, Name, parse_sema_segment, rfc3339_utc};
use crate::recipes::sema_query::{Participant, mark_holders};

/// Everything under the prefix.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub cron: Vec<JobStatus>,
    pub elect: Vec<OfficeStatus>,
    pub sema: Vec<SemaStatus>,
    pub nodes: Vec<NodeStatus>,
    /// The etcd revision the snapshot was read at (the newest of its reads).
    pub revision: i64,
}

/// A holder or candidate: the record if conch wrote it, else `"unknown": true`.
#[derive(Debug, Clone, Serialize)]
pub struct Participant2 {
    pub rev: i64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub record: Option<HolderRecord>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl Participant2 {
    fn new(rev: i64, record: Option<HolderRecord>) -> Participant2 {
        Participant2 {
            rev,
            unknown: record.is_none(),
            record,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OfficeStatus {
    pub office: String,
    pub holder: Option<Participant2>,
    /// Candidates waiting, in queue order.
    pub waiting: Vec<Participant2>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SemaStatus {
    pub name: String,
    pub max: u32,
    pub spread: bool,
    pub holders: Vec<Participant2>,
    pub waiters: Vec<Participant2>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

/// The last thing that happened to a job's ticks.
#[derive(Debug, Clone, Serialize)]
pub struct LastRun {
    pub tick: String,
    /// A result's status, or `running` (claimed, its node alive, no result yet), or `lost`
    /// (claimed, its conchd gone, no result), or `unknown` (unreadable).
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub name: String,
    /// `None` when the stored value is not a valid job (then `error` says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<JobSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The next tick after now, RFC 3339 UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<LastRun>,
}

impl JobStatus {
    pub fn paused(&self) -> bool {
        self.spec.as_ref().is_some_and(|s| s.paused)
    }
}

/// Read every office, semaphore, job (with its last run) and node.
pub async fn read(store: &Store) -> Result<Snapshot, CallError> {
    let (elect, r1) = offices(store).await?;
    let (sema, r2) = semaphores(store).await?;
    let nodes_raw = store.nodes().await?;
    let cron = jobs(store, &nodes_raw, true).await?;
    let nodes = node_statuses(nodes_raw);
    Ok(Snapshot {
        cron,
        elect,
        sema,
        nodes,
        revision: r1.max(r2),
    })
}

/// Every live conchd node.
pub async fn read_nodes(store: &Store) -> Result<Vec<NodeStatus>, CallError> {
    Ok(node_statuses(store.nodes().await?))
}

fn node_statuses(raw: Vec<(String, Option<crate::cron::record::NodeRecord>)>) -> Vec<NodeStatus> {
    raw.into_iter()
        .map(|(node, rec)| match rec {
            Some(r) => NodeStatus {
                node,
                labels: Some(r.labels),
                version: Some(r.version),
                started: Some(r.started),
                pid: Some(r.pid),
                unknown: false,
            },
            None => NodeStatus {
                node,
                labels: None,
                version: None,
                started: None,
                pid: None,
                unknown: true,
            },
        })
        .collect()
}

async fn sorted_dir(
    store: &Store,
    what: &'static str,
    dir: String,
) -> Result<etcd_client::GetResponse, CallError> {
    store
        .etcd
        .retry(what, |mut c| {
            let d = dir.clone();
            async move {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend);
                c.get(d, Some(opts)).await
            }
        })
        .await
}

/// Every office with its holder (lowest create revision) and waiting candidates.
pub async fn offices(store: &Store) -> Result<(Vec<OfficeStatus>, i64), CallError> {
    let dir = store.prefix.elect_all();
    let r = sorted_dir(store, "read offices", dir.clone()).await?;
    let mut by: BTreeMap<String, Vec<Participant2>> = BTreeMap::new();
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let Some((office, _)) = key.strip_prefix(&dir).and_then(|r| r.split_once('/')) else {
            continue;
        };
        by.entry(office.to_string())
            .or_default()
            .push(Participant2::new(
                kv.create_revision(),
                HolderRecord::parse(kv.value()),
            ));
    }
    let out = by
        .into_iter()
        .map(|(office, mut cands)| {
            let holder = (!cands.is_empty()).then(|| cands.remove(0));
            OfficeStatus {
                office,
                holder,
                waiting: cands,
            }
        })
        .collect();
    Ok((out, r.header().map_or(0, |h| h.revision())))
}

/// Every semaphore queue with holders and waiters.
pub async fn semaphores(store: &Store) -> Result<(Vec<SemaStatus>, i64), CallError> {
    let dir = store.prefix.sema_all();
    let r = sorted_dir(store, "read semaphores", dir.clone()).await?;
    let mut by: BTreeMap<(String, u32, bool), Vec<Participant>> = BTreeMap::new();
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let mut parts = key.strip_prefix(&dir).unwrap_or("").splitn(3, '/');
        let (Some(name), Some(seg)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((max, spread)) = parse_sema_segment(seg) else {
            continue;
        };
        by.entry((name.to_string(), max, spread))
            .or_default()
            .push(Participant {
                rev: kv.create_revision(),
                record: HolderRecord::parse(kv.value()),
                held: false,
            });
    }
    let out = by
        .into_iter()
        .map(|((name, max, spread), mut ps)| {
            mark_holders(max, spread, &mut ps);
            let (h, w): (Vec<_>, Vec<_>) = ps.into_iter().partition(|p| p.held);
            let conv = |v: Vec<Participant>| {
                v.into_iter()
                    .map(|p| Participant2::new(p.rev, p.record))
                    .collect()
            };
            SemaStatus {
                name,
                max,
                spread,
                holders: conv(h),
                waiters: conv(w),
            }
        })
        .collect();
    Ok((out, r.header().map_or(0, |h| h.revision())))
}

/// Every job with its next tick and (with `with_last`) its last run.
pub async fn jobs(
    store: &Store,
    nodes: &[(String, Option<crate::cron::record::NodeRecord>)],
    with_last: bool,
) -> Result<Vec<JobStatus>, CallError> {
    let (stored, _) = store.jobs().await?;
    let now = crate::keys::now_unix();
    let mut out = Vec::with_capacity(stored.len());
    for sj in stored {
        let name = sj.name();
        let decoded = JobSpec::decode(&sj.raw);
        let validated = match (&name, &decoded) {
            (Some(n), Ok(spec)) => Some(spec.validate(n, now, sj.mod_rev)),
            _ => None,
        };
        let (spec, error, next) = match (decoded, validated) {
            (Ok(spec), Some(Ok(job))) => {
                let next = job.schedule.next_after(now).map(|t| rfc3339_utc(t as u64));
                (Some(spec), None, next)
            }
            (Ok(spec), Some(Err(e))) => (Some(spec), Some(e.to_string()), None),
            (Ok(spec), None) => (Some(spec), Some("the job's name is not valid".into()), None),
            (Err(e), _) => (None, Some(e.to_string()), None),
        };
        let last = match (&name, with_last) {
            (Some(n), true) => last_run(store, n, nodes).await?,
            _ => None,
        };
        out.push(JobStatus {
            name: sj.key_name,
            spec,
            error,
            next,
            last,
        });
    }
    Ok(out)
}

/// A job's last run: the newest claim, with its result if written; a claim without a result
/// is `running` while its conchd (same lease) is registered, else `lost`.
pub async fn last_run(
    store: &Store,
    name: &Name,
    nodes: &[(String, Option<crate::cron::record::NodeRecord>)],
) -> Result<Option<LastRun>, CallError> {
    let fires = store.fires(name, 1).await?;
    let Some((tick, fire, _)) = fires.into_iter().next() else {
        return Ok(None);
    };
    let results = store.results(name, 1).await?;
    let result = results
        .into_iter()
        .find(|(t, _)| *t == tick)
        .map(|(_, r)| r);
    Ok(Some(describe(tick, fire, result, nodes)))
}

/// Combine a claim and its result (if any) into what `ls` shows.
pub fn describe(
    tick: i64,
    fire: Option<FireRecord>,
    result: Option<Option<ResultRecord>>,
    nodes: &[(String, Option<crate::cron::record::NodeRecord>)],
) -> LastRun {
    let tick_s = rfc3339_utc(tick as u64);
    match (result, fire) {
        (Some(Some(r)), _) => LastRun {
            tick: tick_s,
            status: r.status.as_str().into(),
            node: Some(r.node.clone()),
            result: Some(r),
        },
        (Some(None), f) => LastRun {
            tick: tick_s,
            status: "unknown".into(),
            node: f.map(|f| f.node),
            result: None,
        },
        (None, Some(f)) if f.decision == Decision::Run => {
            let alive = nodes
                .iter()
                .any(|(n, rec)| *n == f.node && rec.as_ref().is_some_and(|r| r.lease == f.lease));
            LastRun {
                tick: tick_s,
                status: if alive {
                    "running".into()
                } else {
                    RunStatus::Lost.as_str().into()
                },
                node: Some(f.node),
                result: None,
            }
        }
        // A miss or skip whose result was pruned or not yet visible.
        (None, Some(f)) => LastRun {
            tick: tick_s,
            status: match f.decision {
                Decision::Missed => "missed".into(),
                Decision::Skipped => "skipped".into(),
                Decision::Run => unreachable!("handled above"),
            },
            node: Some(f.node),
            result: None,
        },
        (None, None) => LastRun {
            tick: tick_s,
            status: "unknown".into(),
            node: None,
            result: None,
        },
    }
}

/// `cron ls` columns: `NAME SCHEDULE TZ NEXT LAST-TICK NODE STATUS EXIT DURATION`.
pub fn ls_lines(jobs: &[JobStatus]) -> Vec<String> {
    let mut rows = vec![
        [
            "NAME",
            "SCHEDULE",
            "TZ",
            "NEXT",
            "LAST-TICK",
            "NODE",
            "STATUS",
            "EXIT",
            "DURATION",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for j in jobs {
        let (schedule, tz) = match &j.spec {
            Some(s) => (s.schedule.clone(), s.tz.clone()),
            None => ("?".into(), "?".into()),
        };
        let next = if j.error.is_some() {
            "invalid".to_string()
        } else if j.paused() {
            "paused".to_string()
        } else {
            j.next.clone().unwrap_or_else(|| "-".into())
        };
        let (tick, node, status, exit, duration) = match &j.last {
            Some(l) => {
                let r = l.result.as_ref();
                (
                    l.tick.clone(),
                    l.node.clone().unwrap_or_else(|| "-".into()),
                    l.status.clone(),
                    r.and_then(|r| {
                        r.exit
                            .map(|e| e.to_string())
                            .or(r.signal.map(|s| format!("sig{s}")))
                    })
                    .unwrap_or_else(|| "-".into()),
                    r.and_then(|r| r.duration.clone())
                        .unwrap_or_else(|| "-".into()),
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        rows.push(vec![
            j.name.clone(),
            schedule,
            tz,
            next,
            tick,
            node,
            status,
            exit,
            duration,
        ]);
    }
    table(&rows)
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> Vec<String> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (i, cell) in r.iter().enumerate() {
                if i + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}
