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
//! - a waiter that becomes a holder writes its key again unchanged (guarded by its create
//!   revision, alongside the child's start): that put wakes the waiter behind it, which is now
//!   the head waiter. A participant that holds from the moment its key is created skips it:
//!   nobody can be watching a key that was a holder's from the start.
//!
//! Where a participant stands is read in the same transaction that proves its key is still
//! its own (holds.md §4): in the creating transaction itself, then in a read guarded by the
//! key's create revision. Deciding "ours" and confirming ownership are one read, and its
//! revision is the acquisition revision the own-key guard starts from.
//!
//! With `--spread` (at most one slot per node) a free slot may belong to any waiter whose node
//! holds nothing yet, so spread waiters all watch the queue for deletes and re-read it: the
//! work per release grows with the queue there (spread queues are about as long as the number
//! of nodes).

use std::ffi::OsString;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchFilterType, WatchOptions,
};

use super::{NotAcquired, Outcome, Queued, child_env, leaf, queue_timer, wait_queued};
use super::{acquired, holder_record};
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
        let (rev, first) = match create_key(etcd, cfg, &key, &record, lease.id()).await {
            Ok(created) => created,
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
            etcd, cfg, &queue, &mut lease, &ctx, signals, give_up_at, nonblock, first,
        )
        .await;
        let turn = match turn {
            Ok(t) => t,
            Err(e) => {
                hold::release(etcd, lease, &ctx).await;
                return Err(e);
            }
        };
        let (at, waited) = match turn {
            Turn::Ours { at, waited } => (at, waited),
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
        };
        if !acquired(&mut lease, &ctx, cfg.grace, at) {
            lease.revoke().await;
            continue;
        }
        // A waiter that became a holder may be watched by the waiter right behind it, which
        // is now the head waiter: wake it. Spread waiters all watch the queue for deletes.
        if waited && !cfg.spread {
            let wake = wake_behind(etcd.clone(), ctx.key.clone(), rev, lease.id(), record);
            lease.alongside(wake);
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
/// `<max>` segment, in one transaction that also reads where the new key stands. Safe to
/// repeat: a repeat finds the key on our lease (and reads nothing: the caller reads then).
async fn create_key(
    etcd: &Etcd,
    cfg: &SemaConfig,
    key: &str,
    value: &str,
    lease: LeaseId,
) -> Result<(Revision, Option<Reading>), SemaError> {
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
            // The new key is the newest of the queue: everything else in it is ahead.
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key, CompareOp::Equal, 0),
                    before,
                    after,
                ])
                .and_then([
                    TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease.0))),
                    TxnOp::get(queue.as_str(), Some(ahead_options(cfg, None))),
                ])
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
    let at = resp.header().map(|h| h.revision()).unwrap_or(0);
    let ops = resp.op_responses();
    if resp.succeeded() {
        let reading = ops.iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(Reading {
                standing: standing(cfg, key, g.kvs()),
                at,
            }),
            _ => None,
        });
        return Ok((Revision(at), reading));
    }
    if let Some(TxnOpResponse::Get(g)) = ops.first()
        && let Some(kv) = g.kvs().first()
    {
        return if kv.lease() == lease.0 {
            Ok((Revision(kv.create_revision()), None))
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
    /// A slot is ours, proven at revision `at`; `waited`: it was not ours at creation.
    Ours {
        at: i64,
        waited: bool,
    },
    GiveUp,
    Stopped(i32),
    LostWaiting(Loss),
}

/// Where a participant stands: holder, or waiting with what to watch.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    Holder,
    /// Watch the whole queue for deletes (the head waiter; every spread waiter).
    WatchQueue,
    /// Watch the key right ahead for a delete or a put.
    WatchAhead(String),
}

/// Where the own key stood at revision `at`, read together with the proof that it was ours.
struct Reading {
    standing: Standing,
    at: i64,
}

/// The read of the keys ahead. Spread: all of them, oldest first, with their values (the
/// node decides). Otherwise newest first, keys only, at most N + 1 (+ 1 for the own key when
/// `before` is `None`: read in the creating transaction, where the own key is the newest).
///
/// etcd applies create-revision filters after reading the range, and computes `count`
/// before them: so read the keys ahead rather than count.
fn ahead_options(cfg: &SemaConfig, before: Option<Revision>) -> GetOptions {
    let mut opts = GetOptions::new().with_prefix();
    if let Some(rev) = before {
        opts = opts.with_max_create_revision(rev.0 - 1);
    }
    if cfg.spread {
        return opts.with_sort(SortTarget::Create, SortOrder::Ascend);
    }
    let own = i64::from(before.is_none());
    opts.with_sort(SortTarget::Create, SortOrder::Descend)
        .with_limit(i64::from(cfg.max) + 1 + own)
        .with_keys_only()
}

/// Where the own key stands behind `kvs`, read with [`ahead_options`] (the own key, if the
/// read saw it, is skipped).
fn standing(cfg: &SemaConfig, own: &str, kvs: &[KeyValue]) -> Standing {
    let ahead = kvs.iter().filter(|kv| kv.key() != own.as_bytes());
    if cfg.spread {
        // Holders are the first key per node.
        let mut nodes: Vec<String> = Vec::new();
        for kv in ahead {
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
        return if eligible {
            Standing::Holder
        } else {
            Standing::WatchQueue
        };
    }
    let ahead: Vec<&KeyValue> = ahead.take(cfg.max as usize + 1).collect();
    let max = cfg.max as usize;
    if ahead.len() < max {
        Standing::Holder
    } else if ahead.len() == max {
        Standing::WatchQueue
    } else {
        Standing::WatchAhead(String::from_utf8_lossy(ahead[0].key()).into_owned())
    }
}

/// Read where this participant stands, in one transaction guarded by its key's create
/// revision: `None` when the key is no longer its own.
async fn read_standing(
    etcd: &Etcd,
    cfg: &SemaConfig,
    queue: &str,
    ctx: &HoldCtx,
) -> Result<Option<Reading>, CallError> {
    let key = ctx.key.as_str();
    let rev = ctx.rev;
    let resp = etcd
        .retry("read queue ahead", |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, rev.0)])
                .and_then([TxnOp::get(queue, Some(ahead_options(cfg, Some(rev))))]);
            async move { c.txn(txn).await }
        })
        .await?;
    if !resp.succeeded() {
        return Ok(None);
    }
    let at = resp.header().map(|h| h.revision()).unwrap_or(0);
    let standing = match resp.op_responses().first() {
        Some(TxnOpResponse::Get(g)) => standing(cfg, key, g.kvs()),
        _ => standing(cfg, key, &[]),
    };
    Ok(Some(Reading { standing, at }))
}

/// Wait until this participant holds a slot, gives up, is told to stop, or loses its lease
/// (its key no longer its own counts as lost). `first`: the reading of the creating
/// transaction, if it had one.
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
    first: Option<Reading>,
) -> Result<Turn, SemaError> {
    let mut timer = queue_timer()?;
    let mut next = first;
    let mut waited = false;
    loop {
        let reading = match next.take() {
            Some(r) => r,
            None => {
                waited = true;
                match read_standing(etcd, cfg, queue, ctx).await? {
                    Some(r) => r,
                    None => return Ok(Turn::LostWaiting(Loss::NotOwner)),
                }
            }
        };
        let at = reading.at;
        let (watch_key, opts) = match reading.standing {
            Standing::Holder => return Ok(Turn::Ours { at, waited }),
            _ if nonblock => return Ok(Turn::GiveUp),
            Standing::WatchQueue => (
                queue.to_string(),
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(at + 1)
                    .with_filters([WatchFilterType::NoPut]),
            ),
            Standing::WatchAhead(k) => (k, WatchOptions::new().with_start_revision(at + 1)),
        };
        if give_up_at.is_some_and(|g| BootInstant::now() >= g) {
            return Ok(Turn::GiveUp);
        }
        tracing::debug!(name = %ctx.name, watching = %watch_key, at, "waiting");
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

/// Write the own key again unchanged, only while its create revision is still ours: a put
/// event for the waiter watching it. Best effort, and off the path to the child's start: if
/// it fails, that waiter wakes only at this key's delete, so a slot another holder frees in
/// the meantime stays idle until then (never taken twice).
async fn wake_behind(etcd: Etcd, key: String, rev: Revision, lease: LeaseId, value: String) {
    let done = etcd
        .retry("wake the waiter behind", |mut c| {
            let put = PutOptions::new().with_lease(lease.0);
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    rev.0,
                )])
                .and_then([TxnOp::put(key.as_str(), value.as_str(), Some(put))]);
            async move { c.txn(txn).await }
        })
        .await;
    if let Err(e) = done {
        tracing::warn!(key, error = %e, "could not wake the waiter behind");
    }
}
