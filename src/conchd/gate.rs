//! A counting gate that lets the most urgent waiter through first.
//!
//! conchd puts two of these in front of the work a tick burst multiplies: the claim
//! transactions in flight to etcd, and the supervisor spawns in progress. Without them, 10,000
//! jobs due at the same minute meant 10,000 claims at once on the connection the lease is
//! renewed on (claims timed out and retried, leases were lost) and hundreds of blocking
//! threads forking at once.
//!
//! Urgency is rate-monotonic: the job with the shorter period goes first (a 1 s job that waits
//! a second has missed a tick; a daily job that waits a second has not), then the older tick.
//! Within one priority the order is first come, first served.

#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Smaller goes first: `(period in ms, tick)`; manual runs use period 0.
pub type Priority = (u64, i64);

#[derive(Debug)]
pub struct Gate {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    free: usize,
    next_seq: u64,
    waiting: BinaryHeap<Reverse<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    priority: Priority,
    seq: u64,
    grant: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.priority, self.seq) == (other.priority, other.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.priority, self.seq).cmp(&(other.priority, other.seq))
    }
}

/// One pass through the gate; dropping it lets the next waiter in.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release();
    }
}

impl Gate {
    /// A gate letting `permits` (at least 1) through at once.
    pub fn new(permits: usize) -> Arc<Gate> {
        Arc::new(Gate {
            inner: Mutex::new(Inner {
                free: permits.max(1),
                next_seq: 0,
                waiting: BinaryHeap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a pass. Cancel-safe: a waiter dropped before or after being granted one
    /// hands it on.
    pub async fn enter(self: &Arc<Self>, priority: Priority) -> Permit {
        let granted = {
            let mut inner = self.lock();
            if inner.free > 0 && inner.waiting.is_empty() {
                inner.free -= 1;
                None
            } else {
                let (grant, granted) = oneshot::channel();
                let seq = inner.next_seq;
                inner.next_seq += 1;
                inner.waiting.push(Reverse(Waiter {
                    priority,
                    seq,
                    grant,
                }));
                Some(granted)
            }
        };
        if let Some(granted) = granted {
            let mut waiting = Waiting {
                granted: Some(granted),
                gate: self,
            };
            if let Some(rx) = waiting.granted.as_mut() {
                // The sender lives in `waiting` of this gate, which `self` keeps alive: it is
                // dropped only after sending.
                let _ = rx.await;
            }
            waiting.granted = None;
        }
        Permit {
            gate: Arc::clone(self),
        }
    }

    fn release(&self) {
        let mut inner = self.lock();
        while let Some(Reverse(w)) = inner.waiting.pop() {
            if w.grant.send(()).is_ok() {
                return;
            }
            // That waiter was dropped while waiting: try the next.
        }
        inner.free += 1;
    }

    /// Waiters not yet let through (for metrics and tests).
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// A waiter's receiver; dropped while still waiting, it closes its receiver and passes on a
/// pass granted in the meantime.
struct Waiting<'a> {
    granted: Option<oneshot::Receiver<()>>,
    gate: &'a Gate,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.granted.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.gate.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn lets_the_shorter_period_then_the_older_tick_through_first() {
        let gate = Gate::new(1);
        let first = gate.enter((60_000, 100)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, priority) in [
            (60_000, 120),
            (1_000, 101),
            (60_000, 60),
            (0, 200),
            (1_000, 100),
        ]
        .into_iter()
        .enumerate()
        {
            let (gate, order) = (gate.clone(), order.clone());
            tasks.spawn(async move {
                let _p = gate.enter(priority).await;
                order.lock().unwrap().push(i);
                tokio::task::yield_now().await;
            });
        }
        while gate.waiting() < 5 {
            tokio::task::yield_now().await;
        }
        drop(first);
        while tasks.join_next().await.is_some() {}
        assert_eq!(*order.lock().unwrap(), vec![3, 4, 1, 2, 0]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn counts_passes_and_a_dropped_waiter_hands_its_pass_on() {
        let gate = Gate::new(2);
        let a = gate.enter((1, 1)).await;
        let b = gate.enter((1, 2)).await;
        // A third waits; cancelled while waiting, it takes nothing.
        let timed_out = tokio::time::timeout(Duration::from_millis(1), gate.enter((1, 3))).await;
        assert!(timed_out.is_err());
        // A waiter granted a pass but dropped before it ran hands the pass on.
        let mut granted_then_dropped = Box::pin(gate.enter((1, 4)));
        assert!(
            futures_poll_once(granted_then_dropped.as_mut()).is_none(),
            "both passes are taken"
        );
        drop(a); // granted to the pinned waiter, which never runs again
        drop(granted_then_dropped);
        let c = tokio::time::timeout(Duration::from_secs(5), gate.enter((1, 5)))
            .await
            .expect("the dropped waiter's pass came back");
        drop((b, c));
        let all: Vec<Permit> = vec![gate.enter((1, 6)).await, gate.enter((1, 7)).await];
        assert!(
            tokio::time::timeout(Duration::from_millis(1), gate.enter((1, 8)))
                .await
                .is_err(),
            "still exactly 2 passes"
        );
        drop(all);
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
