//! conchd's counters for `/metrics` (Prometheus text format, written by hand: a handful of
//! counters and two histograms do not need a metrics crate).

#![forbid(unsafe_code)]

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

/// A histogram with fixed buckets (upper bounds in ms).
#[derive(Debug)]
pub struct Histogram {
    bounds_ms: &'static [u64],
    counts: Vec<AtomicU64>,
    sum_ms: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds_ms: &'static [u64]) -> Histogram {
        Histogram {
            bounds_ms,
            counts: bounds_ms.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe_ms(&self, ms: u64) {
        for (b, c) in self.bounds_ms.iter().zip(&self.counts) {
            if ms <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.sum_ms.fetch_add(ms, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds_ms.iter().zip(&self.counts) {
            let le = *b as f64 / 1000.0;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", c.load(Relaxed));
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_ms.load(Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

const LAG_BUCKETS: &[u64] = &[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10_000];
const RUN_BUCKETS: &[u64] = &[100, 1000, 10_000, 60_000, 600_000, 3_600_000];
const CALL_BUCKETS: &[u64] = &[1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000];

/// Everything conchd counts, shared by its tasks and the status server.
#[derive(Debug)]
pub struct Metrics {
    pub claimed: AtomicU64,
    pub lost_race: AtomicU64,
    pub skipped: AtomicU64,
    pub missed: AtomicU64,
    pub refused: AtomicU64,
    pub runs_ok: AtomicU64,
    pub runs_failed: AtomicU64,
    pub runs_killed: AtomicU64,
    pub running: AtomicI64,
    pub etcd_errors: AtomicU64,
    /// Child start − tick (incl. jitter), ms.
    pub tick_lag: Histogram,
    pub run_duration: Histogram,
    /// Latency of the claim transaction, ms.
    pub claim_latency: Histogram,
    /// Latency of the lease renewals that moved D, ms.
    pub renewal_latency: Histogram,
    /// Starting a run's tree: from the spawn (after its turn at the gate) until the child has
    /// exec'd, ms.
    pub spawn_latency: Histogram,
    /// The last winner's claim time − tick time seen on a lost race, ms (clock skew + lag).
    pub observed_claim_offset_ms: AtomicI64,
    /// When (wall ms) a skew was last logged: at most once a minute.
    pub skew_logged_ms: AtomicI64,
    /// Health inputs.
    pub jobs_watching: std::sync::Arc<AtomicBool>,
    pub lease_alive: AtomicBool,
    pub jobs: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            claimed: AtomicU64::new(0),
            lost_race: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            runs_ok: AtomicU64::new(0),
            runs_failed: AtomicU64::new(0),
            runs_killed: AtomicU64::new(0),
            running: AtomicI64::new(0),
            etcd_errors: AtomicU64::new(0),
            tick_lag: Histogram::new(LAG_BUCKETS),
            run_duration: Histogram::new(RUN_BUCKETS),
            claim_latency: Histogram::new(CALL_BUCKETS),
            renewal_latency: Histogram::new(CALL_BUCKETS),
            spawn_latency: Histogram::new(CALL_BUCKETS),
            observed_claim_offset_ms: AtomicI64::new(0),
            skew_logged_ms: AtomicI64::new(0),
            jobs_watching: std::sync::Arc::new(AtomicBool::new(false)),
            lease_alive: AtomicBool::new(false),
            jobs: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// `Ok(())` when conchd is watching its jobs and holds a live lease; else the reason.
    pub fn health(&self) -> Result<(), &'static str> {
        if !self.lease_alive.load(Relaxed) {
            return Err("conchd holds no live lease (etcd unreachable or the lease was lost)");
        }
        if !self.jobs_watching.load(Relaxed) {
            return Err("conchd is not watching the job list (etcd unreachable)");
        }
        Ok(())
    }

    /// Prometheus text exposition.
    pub fn render(&self, node: &str) -> String {
        let mut out = String::new();
        let node = node.replace(['\\', '"', '\n'], "_");
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP conch_conchd_info conchd on this node.\n# TYPE conch_conchd_info gauge\nconch_conchd_info{{node=\"{node}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        for (status, v) in [
            ("claimed", &self.claimed),
            ("lost_race", &self.lost_race),
            ("skipped", &self.skipped),
            ("missed", &self.missed),
            ("refused", &self.refused),
        ] {
            counter(
                &mut out,
                &format!("conch_cron_ticks_{status}_total"),
                &format!("Ticks this node decided as {status}."),
                v.load(Relaxed),
            );
        }
        for (status, v) in [
            ("ok", &self.runs_ok),
            ("failed", &self.runs_failed),
            ("killed", &self.runs_killed),
        ] {
            counter(
                &mut out,
                &format!("conch_cron_runs_{status}_total"),
                &format!("Job runs on this node that ended {status}."),
                v.load(Relaxed),
            );
        }
        counter(
            &mut out,
            "conch_etcd_errors_total",
            "Failed etcd calls of conchd.",
            self.etcd_errors.load(Relaxed),
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "conch_cron_running",
            "Job runs in progress on this node.",
            self.running.load(Relaxed),
        );
        gauge(
            &mut out,
            "conch_cron_jobs",
            "Jobs conchd knows.",
            self.jobs.load(Relaxed) as i64,
        );
        gauge(
            &mut out,
            "conch_hold_lease_alive",
            "1 while conchd holds a live lease.",
            i64::from(self.lease_alive.load(Relaxed)),
        );
        gauge(
            &mut out,
            "conch_cron_watching",
            "1 while conchd watches the job list.",
            i64::from(self.jobs_watching.load(Relaxed)),
        );
        gauge(
            &mut out,
            "conch_cron_observed_claim_offset_ms",
            "Winner's claim time minus tick time, last seen on a lost race (clock skew plus lag).",
            self.observed_claim_offset_ms.load(Relaxed),
        );
        self.tick_lag.render(
            &mut out,
            "conch_cron_tick_lag_seconds",
            "Child start minus scheduled tick (plus jitter).",
        );
        self.run_duration.render(
            &mut out,
            "conch_cron_run_duration_seconds",
            "Duration of job runs.",
        );
        self.renewal_latency.render(
            &mut out,
            "conch_lease_renewal_latency_seconds",
            "Latency of conchd's lease renewals (send to answer).",
        );
        self.claim_latency.render(
            &mut out,
            "conch_etcd_claim_latency_seconds",
            "Latency of the tick-claim transaction.",
        );
        self.spawn_latency.render(
            &mut out,
            "conch_cron_spawn_latency_seconds",
            "Time to start a run's tree (supervisor and child exec'd), after its turn to spawn.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.claimed.fetch_add(3, Relaxed);
        m.tick_lag.observe_ms(7);
        m.tick_lag.observe_ms(120);
        let t = m.render("n1");
        assert!(t.contains("conch_cron_ticks_claimed_total 3\n"), "{t}");
        assert!(
            t.contains("conch_cron_tick_lag_seconds_bucket{le=\"0.01\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("conch_cron_tick_lag_seconds_bucket{le=\"0.25\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("conch_cron_tick_lag_seconds_count 2\n"), "{t}");
        assert!(t.contains("conch_conchd_info{node=\"n1\""), "{t}");
        assert_eq!(
            m.health(),
            Err("conchd holds no live lease (etcd unreachable or the lease was lost)")
        );
    }
}
