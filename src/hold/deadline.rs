//! The hold deadline D: pure maths, no I/O, no tokio (holds.md §2).
//!
//! If a renewal was *sent* at client time `s` and etcd answered with TTL > 0, the lease lives
//! until at least `s + TTL` on etcd's leader (etcd only ever expires late). Allowing for a
//! clock-rate error ρ and the time it takes to kill a tree δ, the hold is provably ours until
//!
//! ```text
//! D = s + TTL·(1 − ρ) − δ
//! ```
//!
//! D only moves forward, and only on an answer that arrives before the current D: an answer
//! after D proves nothing about the present.

use std::fmt;
use std::time::Duration;

use super::clock::BootInstant;

/// Clock-rate error allowed between this host and etcd's leader (1 %; generous on purpose:
/// NTP keeps real rates within 0.05 %).
pub const RHO: f64 = 0.01;

/// Margin for the kill itself: `cgroup.kill` and the tree's exit took well under 1 ms here;
/// 250 ms covers a loaded host.
pub const DELTA: Duration = Duration::from_millis(250);

/// One etcd election timeout (etcd's default): during a leader change renewals stall this long.
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// Renewals closer together than this would load etcd for no safety gain.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);

/// How many renewal attempts must fit between the last good renewal and the SIGTERM point.
pub const ATTEMPTS: u32 = 3;

/// The timing of one hold: server TTL, kill grace G and renewal period P.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The TTL etcd granted (never the one asked for: etcd raises small ones silently).
    pub ttl: Duration,
    /// `--kill-after`: SIGTERM → SIGKILL.
    pub grace: Duration,
    /// Renewal cadence P.
    pub period: Duration,
}

/// A `--ttl`/`--kill-after` combination in which no renewal period fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "impossible timing: with --ttl {ttl} and --kill-after {grace}, {ATTEMPTS} renewals plus a 1s \
     etcd election cannot fit before the kill point (need --ttl at least {min_ttl}, or a smaller --kill-after)"
)]
pub struct TimingError {
    ttl: String,
    grace: String,
    min_ttl: String,
}

impl Timing {
    /// Derive P from `3P + 1s ≤ TTL·(1−ρ) − δ − G`, requiring P ≥ 100 ms.
    pub fn derive(ttl: Duration, grace: Duration) -> Result<Timing, TimingError> {
        let budget = scaled(ttl)
            .checked_sub(DELTA + grace + ELECTION_TIMEOUT)
            .unwrap_or(Duration::ZERO);
        let period = budget / ATTEMPTS;
        if period < MIN_PERIOD {
            let need = DELTA + grace + ELECTION_TIMEOUT + MIN_PERIOD * ATTEMPTS;
            // TTL·(1−ρ) ≥ need  →  TTL ≥ need / (1−ρ), rounded up to whole seconds (etcd's unit).
            let min_ttl = Duration::from_secs((need.as_secs_f64() / (1.0 - RHO)).ceil() as u64);
            return Err(TimingError {
                ttl: humantime::format_duration(ttl).to_string(),
                grace: humantime::format_duration(grace).to_string(),
                min_ttl: humantime::format_duration(min_ttl).to_string(),
            });
        }
        Ok(Timing { ttl, grace, period })
    }
}

/// `TTL·(1−ρ) − δ`: how long after a renewal's send time the hold is provably ours.
/// How long a renewal answered with `ttl` proves the lease for, from its send: `TTL·(1−ρ) − δ`.
pub fn proven_span(ttl: Duration) -> Duration {
    scaled(ttl).saturating_sub(DELTA)
}

fn scaled(ttl: Duration) -> Duration {
    ttl.mul_f64(1.0 - RHO)
}

/// What one keepalive answer did to the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// D moved (or stayed: it never moves back).
    Extended,
    /// The answer came at or after D: it revives nothing.
    TooLate,
    /// TTL ≤ 0: the lease is gone (revoked or expired).
    Gone,
}

/// The deadline tracker. D never decreases; once passed, nothing moves it again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    d: BootInstant,
}

impl fmt::Debug for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Deadline({:?})", self.d.since_boot())
    }
}

impl Deadline {
    /// After a Grant sent at `sent` that returned `ttl`: `D = sent + TTL·(1−ρ) − δ`.
    pub fn granted(sent: BootInstant, ttl: Duration) -> Deadline {
        Deadline {
            d: sent + proven_span(ttl),
        }
    }

    /// Apply the answer to a renewal sent at `sent`, received at `received`, carrying `ttl_secs`.
    pub fn renewed(&mut self, sent: BootInstant, received: BootInstant, ttl_secs: i64) -> Renewal {
        if received >= self.d {
            return Renewal::TooLate;
        }
        if ttl_secs <= 0 {
            return Renewal::Gone;
        }
        let candidate = sent + proven_span(Duration::from_secs(ttl_secs as u64));
        if candidate > self.d {
            self.d = candidate;
        }
        Renewal::Extended
    }

    /// D itself: the last instant at which the hold is provably ours.
    pub fn at(&self) -> BootInstant {
        self.d
    }

    /// D − G: where a holder with a running child must send SIGTERM.
    pub fn term_at(&self, grace: Duration) -> BootInstant {
        self.d.saturating_sub(grace)
    }

    /// Has D passed at `now`?
    pub fn passed(&self, now: BootInstant) -> bool {
        now >= self.d
    }

    /// Time left before D at `now` (zero once passed).
    pub fn remaining(&self, now: BootInstant) -> Duration {
        self.d - now
    }

    /// The acquisition rule (holds.md §4): start a child only with `D − now ≥ G + 1 s`.
    pub fn fits_run(&self, now: BootInstant, grace: Duration) -> bool {
        self.remaining(now) >= grace + Duration::from_secs(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> BootInstant {
        BootInstant::from_boot(Duration::from_millis(ms))
    }
    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn grant_sets_d_from_send_time() {
        let d = Deadline::granted(at(1_000), secs(10));
        // 1 s + 10 s·0.99 − 0.25 s = 10.65 s
        assert_eq!(d.at(), at(10_650));
        assert_eq!(d.term_at(secs(5)), at(5_650));
    }

    #[test]
    fn renewal_moves_d_from_its_send_time_not_its_receipt() {
        let mut d = Deadline::granted(at(0), secs(10));
        assert_eq!(d.renewed(at(1_000), at(4_000), 10), Renewal::Extended);
        assert_eq!(
            d.at(),
            at(10_650),
            "3 s in flight gain nothing beyond the send time"
        );
    }

    #[test]
    fn late_answer_never_revives() {
        let mut d = Deadline::granted(at(0), secs(10)); // D = 9.65 s
        assert_eq!(d.renewed(at(9_000), at(9_650), 10), Renewal::TooLate);
        assert_eq!(d.renewed(at(9_000), at(20_000), 10), Renewal::TooLate);
        assert_eq!(d.at(), at(9_650));
        assert!(d.passed(at(9_650)));
    }

    #[test]
    fn answer_just_before_d_still_counts() {
        let mut d = Deadline::granted(at(0), secs(10));
        assert_eq!(d.renewed(at(9_000), at(9_649), 10), Renewal::Extended);
        assert_eq!(d.at(), at(18_650));
    }

    #[test]
    fn ttl_zero_or_negative_is_immediate_loss() {
        let mut d = Deadline::granted(at(0), secs(10));
        assert_eq!(d.renewed(at(1_000), at(1_001), 0), Renewal::Gone);
        assert_eq!(d.renewed(at(1_000), at(1_001), -1), Renewal::Gone);
        assert_eq!(d.at(), at(9_650), "a dead lease does not move D");
    }

    #[test]
    fn d_never_decreases() {
        let mut d = Deadline::granted(at(5_000), secs(10)); // 14.65 s
        // A renewal sent earlier (reordered) or answered with a smaller TTL moves nothing back.
        assert_eq!(d.renewed(at(1_000), at(6_000), 10), Renewal::Extended);
        assert_eq!(d.at(), at(14_650));
        assert_eq!(d.renewed(at(6_000), at(6_100), 2), Renewal::Extended);
        assert_eq!(d.at(), at(14_650));
        let mut prev = d.at();
        for step in 0..1000u64 {
            let sent = at(6_000 + step * 7);
            let ttl = (step % 13) as i64 - 2;
            d.renewed(sent, sent + Duration::from_millis(step % 50), ttl);
            assert!(d.at() >= prev);
            prev = d.at();
        }
    }

    #[test]
    fn server_ttl_is_what_counts() {
        // Asked for 1 s, etcd granted its minimum 2 s: D follows the granted TTL.
        let d = Deadline::granted(at(0), secs(2));
        assert_eq!(d.at(), at(1_730));
    }

    #[test]
    fn acquisition_needs_grace_plus_one_second() {
        let d = Deadline::granted(at(0), secs(10)); // 9.65 s
        assert!(d.fits_run(at(3_650), secs(5)));
        assert!(!d.fits_run(at(3_651), secs(5)));
        assert_eq!(d.remaining(at(20_000)), Duration::ZERO);
    }

    #[test]
    fn period_is_derived_from_ttl_and_grace() {
        let t = Timing::derive(secs(10), secs(5)).unwrap();
        // (9.9 − 0.25 − 5 − 1) / 3 = 1.2166… s
        assert_eq!(t.period.as_millis(), 1216);
        let t = Timing::derive(secs(3), Duration::from_millis(500)).unwrap();
        assert_eq!(t.period.as_millis(), 406);
        // With P the promise holds: 3 attempts + election fit before D − G.
        let t = Timing::derive(secs(60), secs(30)).unwrap();
        assert!(t.period * 3 + ELECTION_TIMEOUT <= scaled(secs(60)) - DELTA - secs(30));
    }

    #[test]
    fn impossible_timing_names_the_flags() {
        let e = Timing::derive(secs(10), secs(30)).unwrap_err().to_string();
        assert!(
            e.contains("--ttl 10s") && e.contains("--kill-after 30s"),
            "{e}"
        );
        assert!(e.contains("at least 32s"), "{e}");
        assert!(Timing::derive(secs(2), secs(1)).is_err());
        assert!(Timing::derive(Duration::ZERO, Duration::ZERO).is_err());
        // The smallest TTL that fits with the default grace.
        assert!(Timing::derive(secs(6), secs(5)).is_err());
        assert!(Timing::derive(secs(7), secs(5)).is_ok());
    }
}
