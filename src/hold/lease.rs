//! A lease conch grants and renews itself, and the deadline D it proves (holds.md §2–§3).
//!
//! [`Lease`] owns two tasks: the keeper, which renews on conch's own cadence P over one
//! long-lived keepalive stream with exactly one renewal in flight (a send only queues and an
//! answer names no request, so each answer is timed against its own send), and, once a key is
//! held, the key guard, which watches the own key. Both publish into one [`HoldState`]; the
//! run loop reads it and owns the clock. Work that belongs to the hold but must not delay its
//! owner runs [`Lease::alongside`]. Dropping the `Lease` stops every task; it does not revoke
//! (use [`Lease::revoke`]).

#![forbid(unsafe_code)]

use std::time::Duration;

use etcd_client::{EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, WatchOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::clock::BootInstant;
use super::deadline::{Deadline, Renewal, Timing, TimingError};
use super::loss::Loss;
use crate::etcd::{CallError, Etcd};
use crate::keys::{LeaseId, Revision};

/// Pause after a failed attempt to open a stream, so a refused endpoint is not hammered.
const REOPEN_PAUSE: Duration = Duration::from_millis(100);

/// Longest a best-effort revoke may delay conch's exit (holds.md §3).
const REVOKE_BOUND: Duration = Duration::from_secs(1);

/// What the keeper and the key guard know about the hold right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldState {
    pub deadline: Deadline,
    /// Set once, by the first trigger that fired; never cleared.
    pub lost: Option<Loss>,
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error(transparent)]
    Etcd(#[from] CallError),
    #[error("etcd granted a TTL of {0}s, in which no renewal period fits: {1}")]
    Timing(i64, TimingError),
}

/// A granted lease with its renewal running. See the module docs.
#[derive(Debug)]
pub struct Lease {
    id: LeaseId,
    etcd: Etcd,
    tx: watch::Sender<HoldState>,
    /// The state as this lease's owner reads it (timing included).
    own: HoldView,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Lease {
    /// Grant a lease of `ttl` (etcd may raise it: the server's TTL is what counts) and start
    /// renewing it. D is measured from just before the Grant was sent.
    pub async fn grant(etcd: &Etcd, ttl: Duration, grace: Duration) -> Result<Lease, GrantError> {
        let asked = ttl.as_secs().max(1) as i64;
        let sent = BootInstant::now();
        let resp = etcd
            .retry("lease grant", |mut c| async move {
                c.lease_grant(asked, None).await
            })
            .await?;
        let granted = resp.ttl();
        if granted != asked {
            tracing::warn!(
                asked,
                granted,
                "etcd changed the lease TTL; using the server's"
            );
        }
        let ttl = Duration::from_secs(granted.max(0) as u64);
        let timing = Timing::derive(ttl, grace).map_err(|e| GrantError::Timing(granted, e))?;
        let id = LeaseId(resp.id());
        let (tx, rx) = watch::channel(HoldState {
            deadline: Deadline::granted(sent, ttl),
            lost: None,
        });
        let cancel = CancellationToken::new();
        let keeper = tokio::spawn(keep(
            etcd.clone(),
            id,
            timing,
            sent,
            tx.clone(),
            cancel.child_token(),
        ));
        Ok(Lease {
            id,
            etcd: etcd.clone(),
            tx,
            own: HoldView { rx, timing },
            cancel,
            tasks: vec![keeper],
        })
    }

    pub fn id(&self) -> LeaseId {
        self.id
    }

    pub fn timing(&self) -> Timing {
        self.own.timing()
    }

    /// The current state (a copy).
    pub fn state(&self) -> HoldState {
        self.own.state()
    }

    /// Resolve when the state changed since it was last marked seen through this lease.
    /// Cancel-safe. Pends forever once both tasks ended.
    pub async fn changed(&mut self) {
        self.own.changed().await
    }

    /// Mark the state seen, so the next [`Lease::changed`] waits for a new change.
    pub fn mark_seen(&mut self) -> HoldState {
        self.own.mark_seen()
    }

    /// A read-only view of this lease's state, for a run loop that shares the lease with
    /// others (conchd runs every job under its one lease).
    pub fn view(&self) -> HoldView {
        self.own.clone()
    }

    /// Record a loss found by the caller (e.g. a failed ownership re-check).
    pub fn mark_lost(&self, loss: Loss) {
        mark_lost(&self.tx, loss);
    }

    /// Start watching the own `key` (created at `rev` on this lease) from `from_revision`:
    /// a delete, or a put by another lease, is a loss.
    pub fn guard_key(&mut self, key: String, rev: Revision, from_revision: i64) {
        let task = tokio::spawn(guard(
            self.etcd.clone(),
            key,
            rev,
            self.id,
            from_revision,
            self.tx.clone(),
            self.cancel.child_token(),
        ));
        self.tasks.push(task);
    }

    /// Run `work` for as long as this lease lives: stopped with its other tasks (on revoke or
    /// drop). For what must not delay the caller but belongs to this hold.
    pub fn alongside(&mut self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.child_token();
        self.tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = work => {}
            }
        }));
    }

    /// Stop renewing and revoke the lease (deleting every key bound to it), best effort and
    /// bounded by 1 s: if it fails the lease simply expires. `true` when the lease is gone
    /// (revoked now, or already revoked or expired).
    pub async fn revoke(mut self) -> bool {
        self.stop_tasks().await;
        let id = self.id.0;
        let r = tokio::time::timeout(
            REVOKE_BOUND,
            self.etcd.retry(
                "lease revoke",
                |mut c| async move { c.lease_revoke(id).await },
            ),
        )
        .await;
        match r {
            Ok(Ok(_)) => true,
            // Already gone (revoked by someone else, or expired): nothing left to release.
            Ok(Err(e)) if e.detail.contains("lease not found") => true,
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.id, error = %e, "revoke failed; the lease will expire");
                false
            }
            Err(_) => {
                tracing::warn!(lease = %self.id, "revoke timed out; the lease will expire");
                false
            }
        }
    }

    async fn stop_tasks(&mut self) {
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a run loop reads of a lease: its state and timing. Cheap to clone; each view has
/// its own notion of "seen". Outlives the lease harmlessly: once the lease's tasks end,
/// [`HoldView::changed`] pends forever and the state stays as last published.
#[derive(Debug, Clone)]
pub struct HoldView {
    rx: watch::Receiver<HoldState>,
    timing: Timing,
}

impl HoldView {
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The current state (a copy).
    pub fn state(&self) -> HoldState {
        self.rx.borrow().clone()
    }

    /// Resolve when the state changed since it was last marked seen. Cancel-safe.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Mark the state seen, so the next [`HoldView::changed`] waits for a new change.
    pub fn mark_seen(&mut self) -> HoldState {
        self.rx.borrow_and_update().clone()
    }
}

fn mark_lost(tx: &watch::Sender<HoldState>, loss: Loss) {
    tx.send_if_modified(|st| {
        if st.lost.is_none() {
            st.lost = Some(loss);
            true
        } else {
            false
        }
    });
}

/// `--verbose`: one line per renewal, with what etcd granted and how far away D now is.
fn renewed_event(
    id: LeaseId,
    endpoint: &str,
    ttl_s: i64,
    sent: BootInstant,
    received: BootInstant,
    tx: &watch::Sender<HoldState>,
) {
    tracing::debug!(
        lease = %id,
        endpoint,
        ttl_s,
        rtt_ms = (received - sent).as_millis() as u64,
        deadline_in_ms = tx.borrow().deadline.remaining(received).as_millis() as u64,
        "renewed"
    );
}

/// The keeper: one renewal every P, one in flight, timed from its own send.
async fn keep(
    etcd: Etcd,
    id: LeaseId,
    timing: Timing,
    granted_at: BootInstant,
    tx: watch::Sender<HoldState>,
    cancel: CancellationToken,
) {
    let mut stream: Option<(usize, LeaseKeeper, LeaseKeepAliveStream)> = None;
    let mut next = granted_at + timing.period;
    loop {
        let wait = next - BootInstant::now();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let d = tx.borrow().deadline;
        if d.passed(BootInstant::now()) || tx.borrow().lost.is_some() {
            // Nothing can revive the hold now: the run loop acts on D.
            return;
        }
        let (idx, keeper, answers) = match stream.as_mut() {
            Some(s) => s,
            None => {
                // Opening a keepalive stream is itself a renewal: etcd-client sends one
                // keepalive and waits for its answer (and fails on TTL ≤ 0). Like any renewal
                // attempt it gets at most P, so three attempts fit before the kill point.
                let (idx, mut client) = etcd.client();
                let sent = BootInstant::now();
                let open = async move { client.lease_keep_alive(id.0).await };
                let bound = timing
                    .period
                    .min(etcd.request_timeout())
                    .min(d.remaining(sent));
                let opened = tokio::select! {
                    _ = cancel.cancelled() => return,
                    o = tokio::time::timeout(bound, open) => o,
                };
                match opened {
                    Ok(Ok((k, s))) => {
                        let received = BootInstant::now();
                        let ttl = timing.ttl.as_secs() as i64;
                        let mut outcome = Renewal::Extended;
                        tx.send_modify(|st| outcome = st.deadline.renewed(sent, received, ttl));
                        if outcome != Renewal::Extended {
                            return;
                        }
                        renewed_event(id, etcd.endpoint(idx), ttl, sent, received, &tx);
                        stream = Some((idx, k, s));
                        next = sent + timing.period;
                        continue;
                    }
                    Ok(Err(e)) if crate::etcd::chain(&e).contains("lease not found") => {
                        mark_lost(&tx, Loss::LeaseGone);
                        return;
                    }
                    other => {
                        let (why, pause) = match other {
                            Ok(Err(e)) => (crate::etcd::chain(&e), REOPEN_PAUSE),
                            // Timed out after a full attempt: try the next endpoint at once.
                            _ => ("no answer within the renewal period".into(), Duration::ZERO),
                        };
                        tracing::warn!(lease = %id, endpoint = etcd.endpoint(idx), error = %why, "keepalive stream could not be opened");
                        etcd.rotate(idx);
                        next = BootInstant::now() + pause;
                        continue;
                    }
                }
            }
        };
        let idx = *idx;
        let sent = BootInstant::now();
        if let Err(e) = keeper.keep_alive().await {
            tracing::warn!(lease = %id, endpoint = etcd.endpoint(idx), error = %crate::etcd::chain(&e), "keepalive send failed");
            stream = None;
            etcd.rotate(idx);
            next = BootInstant::now() + REOPEN_PAUSE;
            continue;
        }
        // Wait for this renewal's answer until the next one is due, but never past D.
        let answer_by = (sent + timing.period).min(d.at());
        let answer = tokio::select! {
            _ = cancel.cancelled() => return,
            a = tokio::time::timeout(answer_by - BootInstant::now(), answers.message()) => a,
        };
        let received = BootInstant::now();
        match answer {
            Ok(Ok(Some(resp))) => {
                let mut outcome = Renewal::Extended;
                tx.send_modify(|st| outcome = st.deadline.renewed(sent, received, resp.ttl()));
                let took = received - sent;
                match outcome {
                    Renewal::Extended => {
                        if took > timing.period {
                            tracing::warn!(lease = %id, elapsed_ms = took.as_millis() as u64, "renew-late");
                        }
                        renewed_event(id, etcd.endpoint(idx), resp.ttl(), sent, received, &tx);
                        next = sent + timing.period;
                    }
                    Renewal::Gone => {
                        mark_lost(&tx, Loss::LeaseGone);
                        return;
                    }
                    Renewal::TooLate => return,
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let why = match answer {
                    Ok(Err(e)) => crate::etcd::chain(&e),
                    _ => "stream closed".into(),
                };
                tracing::warn!(lease = %id, endpoint = etcd.endpoint(idx), error = %why, "keepalive stream failed; reopening");
                stream = None;
                etcd.rotate(idx);
                next = BootInstant::now() + REOPEN_PAUSE;
            }
            Err(_) => {
                // No answer within P: drop the stream, so a late answer is never credited to a
                // later send, and try again at once (on the next endpoint, if any).
                tracing::warn!(lease = %id, endpoint = etcd.endpoint(idx), elapsed_ms = (received - sent).as_millis() as u64, "renew-late");
                stream = None;
                etcd.rotate(idx);
                next = BootInstant::now();
            }
        }
    }
}

/// The key guard: a watch on the own key; on any doubt re-read it.
async fn guard(
    etcd: Etcd,
    key: String,
    rev: Revision,
    lease: LeaseId,
    mut from: i64,
    tx: watch::Sender<HoldState>,
    cancel: CancellationToken,
) {
    loop {
        let (idx, mut client) = etcd.client();
        let k = key.clone();
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            r = etcd.bounded("watch own key", async move {
                client.watch(k, Some(WatchOptions::new().with_start_revision(from))).await
            }) => r,
        };
        let mut events = match opened {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(key, error = %e, "own-key watch could not be opened");
                etcd.rotate(idx);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(REOPEN_PAUSE * 2) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = events.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                _ => break,
            };
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    EventType::Delete => {
                        mark_lost(&tx, Loss::KeyGone("deleted"));
                        return;
                    }
                    EventType::Put if kv.lease() != lease.0 || kv.create_revision() != rev.0 => {
                        mark_lost(&tx, Loss::KeyGone("overwritten by another lease"));
                        return;
                    }
                    EventType::Put => {}
                }
                from = from.max(kv.mod_revision() + 1);
            }
            if resp.canceled() {
                break;
            }
            if let Some(h) = resp.header() {
                from = from.max(h.revision() + 1);
            }
        }
        // The watch ended (etcd restart, compaction, endpoint failure): re-read the key, then
        // watch again from after that read.
        let k = key.clone();
        let read = tokio::select! {
            _ = cancel.cancelled() => return,
            r = etcd.retry("get own key", |mut c| { let k = k.clone(); async move { c.get(k, None::<GetOptions>).await } }) => r,
        };
        match read {
            Ok(resp) => {
                match resp.kvs().first() {
                    None => {
                        mark_lost(&tx, Loss::KeyGone("deleted"));
                        return;
                    }
                    Some(kv) if kv.lease() != lease.0 || kv.create_revision() != rev.0 => {
                        mark_lost(&tx, Loss::KeyGone("overwritten by another lease"));
                        return;
                    }
                    Some(_) => {}
                }
                if let Some(h) = resp.header() {
                    from = h.revision() + 1;
                }
            }
            Err(_) => {
                // etcd unreachable: the keeper's deadline covers this; keep trying.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(REOPEN_PAUSE * 2) => {}
                }
            }
        }
    }
}
