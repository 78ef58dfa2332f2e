//! cron helpers: conchd processes, `conch cron …` command lines, and reading what conchd
//! wrote (claims and results) straight from etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::conch::{Conch, Running};
use super::journal::{self, testchild};
use super::{Ctx, Kv, Signal, wait_for};

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

/// The journal of one job added with [`add_own_journal`].
pub fn journal_of(ctx: &Ctx, job: &str) -> PathBuf {
    ctx.dir.join(format!("journal-{job}"))
}

/// `conch cron add <job> --schedule <s> [extra…] -- conch-testchild --journal J [child…]`,
/// which must succeed; `J` is the test's one journal, `journal::path_in(&ctx.dir)`, shared
/// by every job so added.
pub fn add(ctx: &Ctx, job: &str, schedule: &str, extra: &[&str], child: &[&str]) {
    let shared = journal::path_in(&ctx.dir);
    add_journaled(ctx, &shared, job, schedule, extra, child);
}

/// Like [`add`], but `J` is the job's own journal, [`journal_of`], so
/// `journal::check_ticks` proves per job that no tick ran twice.
pub fn add_own_journal(ctx: &Ctx, job: &str, schedule: &str, extra: &[&str], child: &[&str]) {
    add_journaled(ctx, &journal_of(ctx, job), job, schedule, extra, child);
}

/// [`add`] with `J` = `journal`.
fn add_journaled(
    ctx: &Ctx,
    journal: &Path,
    job: &str,
    schedule: &str,
    extra: &[&str],
    child: &[&str],
) {
    let mut args: Vec<String> = vec![
        "add".into(),
        job.into(),
        "--schedule".into(),
        schedule.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([
        "--".into(),
        testchild().into(),
        "--journal".into(),
        journal.to_string_lossy().into(),
    ]);
    args.extend(child.iter().map(|s| s.to_string()));
    ctx.cron(&args).run().expect_code(0);
}

/// Spawns `conch conchd --node <n>` ([`Ctx::conchd`]) for each of `nodes`.
pub fn start_nodes(ctx: &Ctx, nodes: &[&str]) -> Vec<Running> {
    nodes.iter().map(|n| ctx.conchd(n).spawn()).collect()
}

/// Waits up to `within` until exactly these nodes are registered under node/; returns
/// their keys.
#[track_caller]
pub fn wait_registered(ctx: &Ctx, nodes: &[&str], within: Duration) -> Vec<Kv> {
    let dir = format!("{}/v1/node/", ctx.prefix);
    let want: BTreeSet<String> = nodes.iter().map(|n| format!("{dir}{n}")).collect();
    wait_for(within, || {
        let kvs = ctx.etcd.get_prefix(&dir);
        let have: BTreeSet<String> = kvs.iter().map(|kv| kv.key.clone()).collect();
        (have == want).then_some(kvs)
    })
    .unwrap_or_else(|| {
        panic!(
            "{nodes:?} did not register within {within:?}: {:?}",
            ctx.etcd.get_prefix(&dir)
        )
    })
}

/// SIGTERM every conchd, then wait for each; each must stop cleanly (exit 0) within 20 s.
#[track_caller]
pub fn stop_all(nodes: &mut [Running]) {
    for n in nodes.iter() {
        n.signal(Signal::TERM);
    }
    for n in nodes.iter_mut() {
        let out = n.wait_timeout(Duration::from_secs(20));
        assert_eq!(
            out.code,
            Some(0),
            "conchd did not stop cleanly: {}",
            out.stderr
        );
    }
}

/// Per-node count of ticks that ran (from `journal::check_ticks`' map).
pub fn per_node(ran: &BTreeMap<String, (String, i64)>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (node, _) in ran.values() {
        *m.entry(node.clone()).or_default() += 1;
    }
    m
}

/// The `ok` result `r` of `job`'s tick `t` names the node and the rev its run journaled
/// under (`ran` is `journal::check_ticks`' map).
#[track_caller]
pub fn assert_ran_as(ran: &BTreeMap<String, (String, i64)>, job: &str, t: i64, r: &Value) {
    let (node, rev) = ran
        .get(&rfc3339(t))
        .unwrap_or_else(|| panic!("{job}: tick {t} has an ok result but never ran"));
    assert_eq!(r["node"].as_str().unwrap(), node, "{job}: tick {t}: {r}");
    assert_eq!(r["rev"].as_i64().unwrap(), *rev, "{job}: tick {t}: {r}");
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
    now_ms() / 1000
}

/// Now, Unix milliseconds (the wall clock conchd compares ticks with).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
