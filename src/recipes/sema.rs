//! `conch sema`: run a command while holding one of N cluster-wide slots (primitives.md, sema).
//!
//! Each participant creates `<prefix>/v1/sema/<name>/<max>/<lease-hex>` only if absent, bound
//! to its own lease, in a transaction that also requires every key of the name to live under
//! the same `<max>` segment — so participants that disagree on `--max` (or `--spread`, which
//! is part of the segment) are refused atomically. Holders are the first N keys by create
//! revision.
//!
//! Promotion without a herd, with constant etcd work per release however long the queue:
//! - the *head waiter* (exactly N keys ahead of it) watches the queue for deletes: any holder
//!   leaving — not only the oldest — wakes it, and only it;
//! - every other waiter watches just the key right ahead of it, for a delete *or a put*;
//! - a waiter that becomes a holder confirms its key in one transaction that also writes it
//!   again unchanged: that put wakes the waiter behind it, which is now the head waiter.
//!
//! With `--spread` (at most one slot per node) a free slot may belong to any waiter whose node
//! holds nothing yet, so spread waiters all watch the queue for deletes and re-read it: the
//! work per release grows with the queue there (spread queues are about as long as the number
//! of nodes).

use std::ffi::OsString;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions,
};

use super::{NotAcquired, Outcome, Queued, child_env, leaf, queue_timer, wait_queued};
use super::{acquire, holder_record};
use crate::child::{ChildCommand, Containment, Tree};
use crate::etcd::{CallError, Etcd};
use crate::hold::clock::BootInstant;
use crate::hold::lease::{GrantError, Lease};
use crate::hold::loss::Loss;
use crate::hold::signals::Signals;
use crate::hold::{self, HoldCtx, RunEnd};
use crate::hold_event;
use crate::keys::{self, HolderRecord, LeaseId, Name, Prefix, Revision};

/// Largest `--max`: a bound that keeps a single read of the holders cheap.
pub const MAX_SLOTS: u32 = 10_000;

/// Everything `conch sema … -- cmd` needs, validated.
#[derive(Debug, Clone)]
pub struct SemaConfig {
    pub name: Name,
    pub prefix: Prefix,
    pub node: String,
    pub ttl: Duration,
    pub grace: Duration,
    pub max: u32,
    pub spread: bool,
    /// `None`: wait forever; `Some(0)`: `--nonblock`.
    pub wait: Option<Duration>,
    pub cmd: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum SemaError {
    #[error(transparent)]
    Etcd(#[from] CallError),
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// Another participant holds or waits with a different `--max` / `--spread`.
    #[error(
        "semaphore {name} is in use with {live}; every participant must agree (you gave {asked}); \
         a new value can be set once it is empty"
    )]
    Mismatch {
        name: String,
        live: String,
        asked: String,
    },
    #[error("etcd holds {0} under another lease")]
    Foreign(String),
}

/// `--max 3` or `--max 3 --spread`, for messages.
pub fn describe(max: u32, spread: bool) -> String {
    if spread {
        format!("--max {max} --spread")
    } else {
        format!("--max {max}")
    }
}

/// Run `conch sema`: queue, hold a slot, run the child, release.
pub async fn run(
    etcd: &Etcd,
    cfg: &SemaConfig,
    containment: &Containment,
    signals: &mut Signals,
) -> Result<Outcome, SemaError> {
    let since = BootInstant::now();
    let give_up_at = cfg.wait.map(|w| since + w);
    let nonblock = cfg.wait == Some(Duration::ZERO);
    let queue = cfg.prefix.sema_queue(&cfg.name, cfg.max, cfg.spread);
    // The child's supervisor starts while the slot is acquired, so its start-up is not paid
    // between acquiring and the child running. It starts nothing before `start`.
    let warm = Tree::prepare().ok();
    let (lease, ctx) = loop {
        let lease = Lease::grant(etcd, cfg.ttl, cfg.grace).await?;
        let key = cfg
            .prefix
            .sema_key(&cfg.name, cfg.max, cfg.spread, lease.id());
        let record = holder_record(&cfg.node, &cfg.cmd, &lease, containment).to_json();
        let rev = match create_key(etcd, cfg, &key, &record, lease.id()).await {
            Ok(rev) => rev,
            Err(e) => {
                lease.revoke().await;
                return Err(e);
            }
        };
        let ctx = HoldCtx {
            name: cfg.name.to_string(),
            key,
            rev,
            lease: lease.id(),
            since,
        };
        hold_event!(info, ctx, "campaign", max = cfg.max, spread = cfg.spread);
        let mut lease = lease;
        let turn = wait_for_slot(
            etcd, cfg, &queue, &mut lease, &ctx, signals, give_up_at, nonblock,
        )
        .await;
        let turn = match turn {
            Ok(t) => t,
            Err(e) => {
                hold::release(etcd, lease, &ctx).await;
                return Err(e);
            }
        };
        match turn {
            Turn::Ours => {}
            Turn::GiveUp => {
                hold::release(etcd, lease, &ctx).await;
                let why = if nonblock {
                    NotAcquired::Held
                } else {
                    NotAcquired::WaitExpired
                };
                return Ok(Outcome::NotAcquired(why));
            }
            Turn::Stopped(signal) => {
                hold::release(etcd, lease, &ctx).await;
                return Ok(Outcome::Stopped {
                    signal,
                    child: None,
                });
            }
            Turn::LostWaiting(loss) => {
                hold_event!(warn, ctx, "lost", reason = %loss, waiting = true);
                lease.revoke().await;
                if give_up_at.is_some_and(|g| BootInstant::now() >= g) {
                    return Ok(Outcome::NotAcquired(NotAcquired::WaitExpired));
                }
                continue;
            }
        }
        // The epilogue; rewriting the key unchanged wakes the waiter queued behind.
        let id = lease.id().0;
        if !acquire(etcd, &mut lease, &ctx, cfg.grace, Some((&record, id))).await? {
            lease.revoke().await;
            continue;
        }
        break (lease, ctx);
    };

    let cmd = ChildCommand {
        argv: cfg.cmd.clone(),
        env: child_env(&cfg.node, &ctx),
        cgroup_leaf: leaf("sema", &ctx),
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
            hold::release(etcd, lease, &ctx).await;
            return Ok(Outcome::SpawnFailed(e));
        }
    };
    hold_event!(info, ctx, "child-start", pid = tree.pid());
    let end = hold::supervise(&mut lease.view(), &mut tree, signals, &ctx, None).await;
    drop(tree);
    Ok(match end {
        RunEnd::Lost(loss, _) => {
            lease.revoke().await;
            Outcome::Lost(loss)
        }
        RunEnd::Exited(exit) | RunEnd::TimedOut(exit) => {
            hold::release(etcd, lease, &ctx).await;
            Outcome::Exited(exit)
        }
        RunEnd::Stopped(signal, exit) => {
            hold::release(etcd, lease, &ctx).await;
            Outcome::Stopped {
                signal,
                child: Some(exit),
            }
        }
    })
}

/// Create the own key only if absent and only if no key of this name lives under another
/// `<max>` segment, in one transaction. Safe to repeat: a repeat finds the key on our lease.
async fn create_key(
    etcd: &Etcd,
    cfg: &SemaConfig,
    key: &str,
    value: &str,
    lease: LeaseId,
) -> Result<Revision, SemaError> {
    let dir = cfg.prefix.sema_dir(&cfg.name);
    let queue = cfg.prefix.sema_queue(&cfg.name, cfg.max, cfg.spread);
    let dir_end = keys::prefix_end(&dir);
    let queue_end = keys::prefix_end(&queue);
    let resp = etcd
        .retry("create queue key", |mut c| {
            // "Every key in the range has create revision 0" holds only for an empty range.
            let before = Compare::create_revision(dir.as_str(), CompareOp::Equal, 0)
                .with_range(queue.as_str());
            let after = Compare::create_revision(queue_end.clone(), CompareOp::Equal, 0)
                .with_range(dir_end.clone());
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key, CompareOp::Equal, 0),
                    before,
                    after,
                ])
                .and_then([TxnOp::put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(lease.0)),
                )])
                .or_else([
                    TxnOp::get(key, None),
                    TxnOp::get(
                        dir.as_str(),
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_keys_only()
                                .with_limit(64),
                        ),
                    ),
                ]);
            async move { c.txn(txn).await }
        })
        .await?;
    if resp.succeeded() {
        return Ok(Revision(resp.header().map(|h| h.revision()).unwrap_or(0)));
    }
    let ops = resp.op_responses();
    if let Some(TxnOpResponse::Get(g)) = ops.first()
        && let Some(kv) = g.kvs().first()
    {
        return if kv.lease() == lease.0 {
            Ok(Revision(kv.create_revision()))
        } else {
            Err(SemaError::Foreign(key.to_string()))
        };
    }
    // Refused: some key lives under another segment. Name the live value.
    let mut live = Vec::new();
    if let Some(TxnOpResponse::Get(g)) = ops.get(1) {
        for kv in g.kvs() {
            let k = String::from_utf8_lossy(kv.key());
            if let Some(seg) = k.strip_prefix(&dir).and_then(|rest| rest.split('/').next()) {
                let shown = match keys::parse_sema_segment(seg) {
                    Some((m, s)) => describe(m, s),
                    None => format!("an unknown value {seg:?}"),
                };
                if !live.contains(&shown) {
                    live.push(shown);
                }
            }
        }
    }
    Err(SemaError::Mismatch {
        name: cfg.name.to_string(),
        live: if live.is_empty() {
            "another value".into()
        } else {
            live.join(" and ")
        },
        asked: describe(cfg.max, cfg.spread),
    })
}

enum Turn {
    Ours,
    GiveUp,
    Stopped(i32),
    LostWaiting(Loss),
}

/// Where a participant stands: holder, or waiting with what to watch.
enum Standing {
    Holder,
    /// Watch the whole queue for deletes (the head waiter; every spread waiter).
    WatchQueue(i64),
    /// Watch the key right ahead for a delete or a put.
    WatchAhead(String, i64),
}

/// Read where this participant stands (one or two range reads; see the module docs).
async fn standing(
    etcd: &Etcd,
    cfg: &SemaConfig,
    queue: &str,
    ctx: &HoldCtx,
) -> Result<Standing, CallError> {
    let rev = ctx.rev.0;
    if cfg.spread {
        // Everything ahead, in order, with the nodes: holders are the first key per node.
        let resp = etcd
            .retry("read queue", |mut c| async move {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_max_create_revision(rev - 1);
                c.get(queue, Some(opts)).await
            })
            .await?;
        let header = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut nodes: Vec<String> = Vec::new();
        for kv in resp.kvs() {
            if nodes.len() as u32 >= cfg.max {
                break;
            }
            // A record conch cannot read counts as a node of its own.
            let node = HolderRecord::parse(kv.value())
                .map(|r| r.node)
                .unwrap_or_else(|| format!("unknown:{}", kv.create_revision()));
            if !nodes.contains(&node) {
                nodes.push(node);
            }
        }
        let eligible = (nodes.len() as u32) < cfg.max && !nodes.contains(&cfg.node);
        return Ok(if eligible {
            Standing::Holder
        } else {
            Standing::WatchQueue(header)
        });
    }
    // etcd applies create-revision filters after reading the range, and computes `count`
    // before them: so read the keys ahead (newest first, at most N + 1) rather than count.
    let limit = i64::from(cfg.max) + 1;
    let resp = etcd
        .retry("read queue ahead", |mut c| async move {
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(rev - 1)
                .with_limit(limit)
                .with_keys_only();
            c.get(queue, Some(opts)).await
        })
        .await?;
    let header = resp.header().map(|h| h.revision()).unwrap_or(0);
    let ahead = resp.kvs().len() as i64;
    Ok(if ahead < i64::from(cfg.max) {
        Standing::Holder
    } else if ahead == i64::from(cfg.max) {
        Standing::WatchQueue(header)
    } else {
        let kv = &resp.kvs()[0];
        Standing::WatchAhead(String::from_utf8_lossy(kv.key()).into_owned(), header)
    })
}

/// Wait until this participant holds a slot, gives up, is told to stop, or loses its lease.
#[allow(clippy::too_many_arguments)]
async fn wait_for_slot(
    etcd: &Etcd,
    cfg: &SemaConfig,
    queue: &str,
    lease: &mut Lease,
    ctx: &HoldCtx,
    signals: &mut Signals,
    give_up_at: Option<BootInstant>,
    nonblock: bool,
) -> Result<Turn, SemaError> {
    let mut timer = queue_timer()?;
    loop {
        let (watch_key, opts) = match standing(etcd, cfg, queue, ctx).await? {
            Standing::Holder => return Ok(Turn::Ours),
            _ if nonblock => return Ok(Turn::GiveUp),
            Standing::WatchQueue(h) => (
                queue.to_string(),
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(h + 1)
                    .with_filters([WatchFilterType::NoPut]),
            ),
            Standing::WatchAhead(k, h) => (k, WatchOptions::new().with_start_revision(h + 1)),
        };
        if give_up_at.is_some_and(|g| BootInstant::now() >= g) {
            return Ok(Turn::GiveUp);
        }
        match wait_queued(
            etcd, lease, &mut timer, signals, give_up_at, watch_key, opts, true,
        )
        .await?
        {
            Queued::Moved => {}
            Queued::GiveUp => return Ok(Turn::GiveUp),
            Queued::Stopped(n) => return Ok(Turn::Stopped(n)),
            Queued::Lost(loss) => return Ok(Turn::LostWaiting(loss)),
        }
    }
}
