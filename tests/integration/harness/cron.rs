//! cron helpers: conchd processes, `conch cron …` command lines, and reading what conchd
//! wrote (claims and results) straight from etcd.

use std::time::Duration;

use serde_json::Value;

use super::conch::Conch;
use super::{Ctx, wait_for};

/// A parsed result or claim: (tick as Unix seconds, the JSON value).
pub type TickValue = (i64, Value);

impl Ctx {
    /// `conch conchd --node <node>` with this test's prefix, endpoints and cgroup root, a
    /// short TTL so a killed conchd's lease goes quickly, and a short drain.
    pub fn conchd(&self, node: &str) -> Conch {
        self.conch().args([
            "conchd",
            "--node",
            node,
            "--ttl",
            "4s",
            "--kill-after",
            "1s",
        ])
    }

    /// `conch cron <args…>`.
    pub fn cron<I, S>(&self, args: I) -> Conch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.conch().arg("cron").args(args)
    }

    fn tick_values(&self, kind: &str, job: &str) -> Vec<TickValue> {
        let dir = format!("{}/v1/cron/{kind}/{job}/", self.prefix);
        self.etcd
            .get_prefix(&dir)
            .into_iter()
            .map(|kv| {
                let tick: i64 = kv.key[dir.len()..]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad tick key {}", kv.key));
                assert_eq!(
                    kv.key.len() - dir.len(),
                    12,
                    "tick keys are 12 digits: {}",
                    kv.key
                );
                assert_eq!(kv.lease, 0, "{kind} keys carry no lease: {}", kv.key);
                let v: Value = serde_json::from_str(&kv.value)
                    .unwrap_or_else(|e| panic!("bad {kind} value {:?}: {e}", kv.value));
                (tick, v)
            })
            .collect()
    }

    /// Every result of `job`, oldest first.
    pub fn results(&self, job: &str) -> Vec<TickValue> {
        self.tick_values("result", job)
    }

    /// Every claim (fire key) of `job`, oldest first.
    pub fn fires(&self, job: &str) -> Vec<TickValue> {
        self.tick_values("fire", job)
    }

    /// Waits until `job` has at least `n` results; returns them.
    #[track_caller]
    pub fn wait_results(&self, job: &str, n: usize, timeout: Duration) -> Vec<TickValue> {
        wait_for(timeout, || {
            let r = self.results(job);
            (r.len() >= n).then_some(r)
        })
        .unwrap_or_else(|| {
            panic!(
                "{job}: fewer than {n} results within {timeout:?}: {:#?}",
                self.results(job)
            )
        })
    }

    /// The number of leases etcd has (all tests share the server: compare deltas only with
    /// care; conchd's own lease count is what a test can pin down).
    pub fn lease_count(&self) -> usize {
        self.etcd
            .ctl(["lease", "list"])
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count()
    }
}

/// The `status` field of a result.
pub fn status(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("?")
}

/// Unix seconds as RFC 3339 UTC, as conch writes ticks (`CONCH_TICK`, results).
pub fn rfc3339(t: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Now, Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
