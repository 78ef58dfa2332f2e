//! Decorrelated-jitter backoff for `--restart` (1 s growing to 30 s, reset after 60 s of life).

use std::time::Duration;

/// First pause after a run ended.
pub const BASE: Duration = Duration::from_secs(1);
/// Longest pause.
pub const CAP: Duration = Duration::from_secs(30);
/// A child that ran at least this long resets the backoff: it was healthy.
pub const RESET_AFTER: Duration = Duration::from_secs(60);

/// Decorrelated jitter: each pause is random in `[BASE, 3 × previous]`, capped at `CAP`, so
/// many restarting candidates spread out instead of campaigning in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    prev: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(rng: fastrand::Rng) -> Backoff {
        Backoff { prev: BASE, rng }
    }

    /// The pause after a run that lasted `ran`.
    pub fn next(&mut self, ran: Duration) -> Duration {
        if ran >= RESET_AFTER {
            self.prev = BASE;
        }
        let hi = (self.prev * 3).min(CAP).max(BASE);
        let span = (hi - BASE).as_millis() as u64;
        let pause = BASE + Duration::from_millis(self.rng.u64(0..=span));
        self.prev = pause;
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_stay_within_bounds_and_grow() {
        let mut b = Backoff::new(fastrand::Rng::with_seed(7));
        let mut max_seen = Duration::ZERO;
        for _ in 0..200 {
            let p = b.next(Duration::ZERO);
            assert!(p >= BASE && p <= CAP, "{p:?}");
            max_seen = max_seen.max(p);
        }
        assert!(
            max_seen > Duration::from_secs(20),
            "grows towards the cap: {max_seen:?}"
        );
    }

    #[test]
    fn a_long_run_resets() {
        let mut b = Backoff::new(fastrand::Rng::with_seed(1));
        for _ in 0..50 {
            b.next(Duration::ZERO);
        }
        let p = b.next(RESET_AFTER);
        assert!(p <= BASE * 3, "reset to the base range: {p:?}");
    }
}
