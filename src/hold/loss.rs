//! Why a hold ended (holds.md §3).

use std::fmt;

/// The first loss trigger that fired. A value, not an error: the run loop acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// The clock reached the kill point (D − G for a holder, D for a waiter) with no renewal
    /// moving D: partition, etcd down or too slow.
    Deadline,
    /// A keepalive answered TTL ≤ 0: the lease was revoked or expired.
    LeaseGone,
    /// The own key was deleted, or overwritten by another lease.
    KeyGone(&'static str),
    /// The own key was gone or not ours when a queued participant read where it stands.
    NotOwner,
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::Deadline => f.write_str("no renewal before the hold deadline"),
            Loss::LeaseGone => f.write_str("lease revoked or expired (keepalive answered TTL 0)"),
            Loss::KeyGone(how) => write!(f, "own key {how}"),
            Loss::NotOwner => f.write_str("own key no longer ours (found while queued)"),
        }
    }
}
