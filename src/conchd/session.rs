//! conchd's hold: one lease for the whole daemon, and its registration under `node/`.
//!
//! The session task grants a lease, registers `node/<node>` on it, and publishes the lease
//! while it can be proven (holds.md: renewed on conchd's own cadence, D on
//! `CLOCK_BOOTTIME`). Every job runs under it: when it is lost, each job's run loop kills its
//! tree by D on its own. The task then publishes `None`, and grants a new lease after a
//! capped backoff. On shutdown it revokes the lease, which removes the node key and any
//! `running` key with it.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::cron::record::NodeRecord;
use crate::cron::store::Store;
use crate::hold::clock::BootInstant;
use crate::hold::lease::{HoldView, Lease};
use crate::keys::LeaseId;

/// The lease jobs run under, while it can be proven.
#[derive(Debug, Clone)]
pub struct Session {
    pub lease: LeaseId,
    pub view: HoldView,
}

/// Pause before granting again after a failure, growing to the cap.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct SessionConfig {
    pub store: Store,
    pub node: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub ttl: Duration,
    pub grace: Duration,
    pub metrics: Arc<Metrics>,
}

/// Keep a session until `cancel`; publish it on `tx`. Revokes the lease on the way out.
pub async fn keep(
    cfg: SessionConfig,
    tx: watch::Sender<Option<Session>>,
    cancel: CancellationToken,
) {
    let started = crate::keys::now_rfc3339();
    let mut backoff = BACKOFF_START;
    let mut told_waiting = false;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let lease = match Lease::grant(&cfg.store.etcd, cfg.ttl, cfg.grace).await {
            Ok(l) => l,
            Err(e) => {
                cfg.metrics.etcd_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %crate::etcd::chain(&e), "conchd cannot get a lease; retrying");
                if pause(&cancel, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        let record = NodeRecord {
            node: cfg.node.clone(),
            labels: cfg.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: started.clone(),
            pid: std::process::id(),
            lease: lease.id().to_string(),
        };
        match register(&cfg.store, &record, lease.id()).await {
            Ok(None) => {}
            Ok(Some(other)) => {
                if !told_waiting {
                    tracing::warn!(node = %cfg.node, other = %other, "another conchd is registered as this node; waiting for its registration to go (a conchd that just died leaves it until its lease expires)");
                    told_waiting = true;
                }
                lease.revoke().await;
                if pause(&cancel, &mut Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                cfg.metrics.etcd_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "conchd cannot register its node; retrying");
                lease.revoke().await;
                if pause(&cancel, &mut backoff).await {
                    return;
                }
                continue;
            }
        }
        told_waiting = false;
        backoff = BACKOFF_START;
        tracing::info!(node = %cfg.node, lease = %lease.id(), "registered");
        let mut view = lease.view();
        tx.send_replace(Some(Session {
            lease: lease.id(),
            view: view.clone(),
        }));
        cfg.metrics.lease_alive.store(true, Relaxed);
        // Hold until the lease can no longer be proven, or shutdown.
        let mut last_d = view.state().deadline.at();
        let span = crate::hold::deadline::proven_span(view.timing().ttl);
        let stopping = loop {
            let st = view.mark_seen();
            // A renewal moved D to (its send + span): its latency is now − send.
            if st.deadline.at() > last_d {
                last_d = st.deadline.at();
                let sent = last_d.saturating_sub(span);
                cfg.metrics
                    .renewal_latency
                    .observe_ms((BootInstant::now() - sent).as_millis() as u64);
            }
            if let Some(loss) = st.lost {
                tracing::warn!(lease = %lease.id(), reason = %loss, "conchd's lease lost; its jobs are killed");
                break false;
            }
            let now = BootInstant::now();
            if now >= st.deadline.at() {
                tracing::warn!(lease = %lease.id(), "conchd's lease could not be renewed in time; its jobs are killed");
                break false;
            }
            let left = st.deadline.at() - now;
            tokio::select! {
                _ = cancel.cancelled() => break true,
                _ = view.changed() => {}
                _ = tokio::time::sleep(left) => {}
            }
        };
        cfg.metrics.lease_alive.store(false, Relaxed);
        tx.send_replace(None);
        lease.revoke().await;
        if stopping {
            tracing::info!(node = %cfg.node, "unregistered");
            return;
        }
        if pause(&cancel, &mut backoff).await {
            return;
        }
    }
}

/// Sleep for `backoff` (then double it, up to the cap) unless cancelled. `true`: cancelled.
async fn pause(cancel: &CancellationToken, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_CAP);
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Create `node/<node>` on `lease` if absent. `Ok(Some(who))`: another conchd holds it.
async fn register(
    store: &Store,
    record: &NodeRecord,
    lease: LeaseId,
) -> Result<Option<String>, crate::etcd::CallError> {
    let key = store.prefix.node(&record.node);
    let value = record.to_json();
    let r = store
        .etcd
        .retry("register node", |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease.0)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            async move { c.txn(txn).await }
        })
        .await?;
    if r.succeeded() {
        return Ok(None);
    }
    let other = match r.op_responses().first() {
        Some(TxnOpResponse::Get(g)) => g
            .kvs()
            .first()
            .map(|kv| (kv.lease(), NodeRecord::parse(kv.value()))),
        _ => None,
    };
    match other {
        // Our own earlier attempt landed (its answer was lost).
        Some((l, _)) if l == lease.0 => Ok(None),
        Some((_, Some(rec))) => Ok(Some(format!("pid {} since {}", rec.pid, rec.started))),
        Some((_, None)) => Ok(Some("an unreadable registration".into())),
        // Gone in between: try again.
        None => Ok(Some("a registration that just went away".into())),
    }
}
