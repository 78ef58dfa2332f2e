//! cron under faults (quality.md §2, primitives.md "cron and conchd"): conchd SIGKILLed
//! mid-run, every conchd down across ticks, nodes in different local time zones, nodes
//! whose clocks disagree, etcd's lease count over many ticks, `/healthz` while etcd is
//! frozen, and an overlap=forbid run whose node is partitioned away.
//!
//! Each job journals through `conch-testchild` into its own journal (`journal-<job>`), so
//! `journal::check_ticks` proves per job that no tick ran twice. Tests that need an etcd of
//! their own (a lease count nobody else disturbs, a server to freeze, a proxy to cut) start
//! a private cluster and point the test's `Ctx` at it with [`use_private`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::cluster::Cluster;
use crate::harness::conch::events;
use crate::harness::cron::{
    add_own_journal, assert_ran_as, journal_of, now_ms, now_unix, per_node, rfc3339, start_nodes,
    status, stop_all, wait_registered,
};
use crate::harness::journal::{self, boot_ms, ms};
use crate::harness::{Ctx, Etcd, Kv, Running, Signal, alive, wait_for, wait_until};

/// How long conchd may take to register.
const REGISTER: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Helpers

/// Like `wait_for`, polling every `period`: for long waits whose every look spawns etcdctl,
/// so the polling does not load the machine the timing-sensitive daemons run on.
fn poll<T>(timeout: Duration, period: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(period);
    }
}

/// Point `ctx` (its etcdctl reads and every conch it starts) at a private cluster, directly.
fn use_private(ctx: &mut Ctx, cluster: &Cluster) {
    let (etcd_bin, etcdctl_bin) = crate::harness::etcd::find_binaries();
    let private = Etcd {
        endpoint: cluster.direct_endpoints(),
        etcd_bin,
        etcdctl_bin,
        version: String::new(),
        data_dir: ctx.dir.clone(),
    };
    ctx.etcd = Box::leak(Box::new(private));
}

/// The raw keys of a job's `fire/` or `result/` directory, by tick (with revisions, lease).
fn tick_kvs(ctx: &Ctx, kind: &str, job: &str) -> BTreeMap<i64, Kv> {
    let dir = format!("{}/v1/cron/{kind}/{job}/", ctx.prefix);
    ctx.etcd
        .get_prefix(&dir)
        .into_iter()
        .map(|kv| (kv.key[dir.len()..].parse().expect("tick key"), kv))
        .collect()
}

fn json(kv: &Kv) -> Value {
    serde_json::from_str(&kv.value).unwrap_or_else(|e| panic!("bad value {:?}: {e}", kv.value))
}

/// `conch cron ls --last --json`: the object of `job`.
fn ls_last(ctx: &Ctx, job: &str) -> Value {
    let out = ctx.cron(["ls", "--last", "--json"]).run();
    out.expect_code(0);
    out.lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("ls --json prints JSON lines"))
        .find(|v| v["name"] == job)
        .unwrap_or_else(|| panic!("{job} not in ls --json: {}", out.stdout))
}

// ---------------------------------------------------------------------------------------
// 1. The winner's conchd SIGKILLed mid-run.

/// The node running a tick is SIGKILLed while the run (child, grandchild, a `setsid`
/// grandchild and a double-forked orphan) goes on: the whole tree is gone within 1 s, the
/// tick is never run again by the surviving nodes (at most once per tick: the fire key has
/// no lease), and `ls --last` shows it `running` while the dead conchd's lease lives and
/// `lost` once it expired.
#[test]
fn winner_sigkilled_mid_run_loses_its_tree_and_the_tick_is_never_rerun() {
    let ctx = Ctx::new("cronf-winner-kill");
    let names = ["n1", "n2", "n3"];
    let nodes = start_nodes(&ctx, &names);
    wait_registered(&ctx, &names, REGISTER);
    // Once a minute, at a second ~4 s from now: a single tick in this test's lifetime, so
    // the claim under test stays the job's newest (what `ls --last` reports).
    let second = (now_unix() + 4) % 60;
    let never = ctx.path("never-touched");
    let pids = ctx.path("pids");
    add_own_journal(
        &ctx,
        "long",
        &format!("{second} * * * * *"),
        &[],
        &[
            "--until-file",
            &never.to_string_lossy(),
            "--grandchildren",
            "1",
            "--setsid-grandchild",
            "--double-fork-grandchild",
            "--pidfile",
            &pids.to_string_lossy(),
        ],
    );
    let j = journal_of(&ctx, "long");
    // child, grandchild, setsid grandchild and the orphaned double-fork grandchild.
    let tree = wait_for(Duration::from_secs(15), || {
        journal::intervals(&journal::read(&j))
            .into_iter()
            .find(|i| i.pids.len() == 4)
    })
    .unwrap_or_else(|| panic!("the whole tree never journaled: {:#?}", journal::read(&j)));
    let fires = tick_kvs(&ctx, "fire", "long");
    assert_eq!(fires.len(), 1, "one tick claimed: {fires:#?}");
    let (&tick, fire) = fires.iter().next().unwrap();
    let claim = json(fire);
    assert_eq!(claim["decision"], "run", "{claim}");
    assert_eq!(claim["node"], tree.node.as_str(), "the claimant runs it");
    assert_eq!(
        fire.create_revision, tree.rev,
        "CONCH_REV is the claim's revision"
    );
    assert_eq!(fire.lease, 0, "a claim carries no lease");
    let winner = names
        .iter()
        .position(|n| *n == tree.node)
        .unwrap_or_else(|| panic!("unknown node {}", tree.node));

    nodes[winner].signal(Signal::KILL);
    let killed = boot_ms();
    let gone = wait_until(Duration::from_secs(1), || {
        tree.pids.iter().all(|p| !alive(*p))
    });
    let took = boot_ms() - killed;
    let survivors: Vec<i32> = tree.pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        gone,
        "1 s after conchd {} was SIGKILLed these still live: {survivors:?}",
        tree.node
    );
    println!(
        "conchd {} SIGKILLed mid-run: all 4 processes of the tree gone after {took:.0} ms",
        tree.node
    );

    // While the dead conchd's lease lives (TTL 4 s), its claim counts as running.
    let node_key = format!("{}/v1/node/{}", ctx.prefix, tree.node);
    let registered = |ctx: &Ctx| !ctx.etcd.get_prefix(&node_key).is_empty();
    let before = registered(&ctx);
    let last = ls_last(&ctx, "long")["last"].clone();
    let after = registered(&ctx);
    assert_eq!(last["tick"], rfc3339(tick), "{last}");
    if before && after {
        assert_eq!(
            last["status"], "running",
            "its node is still registered: {last}"
        );
    }
    // Once the lease expired, the claim without a result is lost.
    assert!(
        wait_until(Duration::from_secs(10), || !registered(&ctx)),
        "the killed conchd's registration outlived its 4 s lease"
    );
    let lease_gone = boot_ms();
    let last = ls_last(&ctx, "long")["last"].clone();
    assert_eq!(last["status"], "lost", "{last}");
    assert_eq!(last["tick"], rfc3339(tick), "{last}");
    assert_eq!(last["node"], tree.node.as_str(), "{last}");
    assert!(last.get("result").is_none_or(Value::is_null), "{last}");
    let text = ctx.cron(["ls", "--last"]).run();
    text.expect_code(0);
    let row = text
        .lines()
        .into_iter()
        .find(|l| l.starts_with("long "))
        .unwrap_or_else(|| panic!("no row for long: {}", text.stdout))
        .to_string();
    assert!(
        row.split_whitespace().any(|c| c == "lost"),
        "ls --last: {row}"
    );

    // Observation window (a fixed 3 s, on purpose): the tick is still within its starting
    // deadline (1 m) and the survivors are live, yet nobody claims or runs it again.
    std::thread::sleep(
        Duration::from_secs(3)
            .saturating_sub(Duration::from_millis((boot_ms() - lease_gone) as u64)),
    );
    let fires_after = tick_kvs(&ctx, "fire", "long");
    let same = &fires_after[&tick];
    assert_eq!(
        (same.create_revision, same.mod_revision, &same.value),
        (fire.create_revision, fire.mod_revision, &fire.value),
        "the claim of the killed run changed"
    );
    assert_eq!(fires_after.len(), 1, "{fires_after:#?}");
    assert!(
        tick_kvs(&ctx, "result", "long").is_empty(),
        "a result appeared for a run nobody finished"
    );
    let ran = journal::check_ticks(&j);
    assert_eq!(ran.len(), 1, "{ran:?}");
    let starts = journal::read(&j)
        .into_iter()
        .filter(|r| r.event == "start" && r.role == "child")
        .count();
    assert_eq!(starts, 1, "the tick ran again");
    assert!(
        journal::read(&j).iter().all(|r| !alive(r.pid)),
        "a process of the killed run came back"
    );
    let mut survivors: Vec<Running> = nodes
        .into_iter()
        .enumerate()
        .filter_map(|(i, n)| (i != winner).then_some(n))
        .collect();
    stop_all(&mut survivors);
}

// ---------------------------------------------------------------------------------------
// 2. Every conchd stopped across ticks.

/// All conchd are down (stopped cleanly) for several ticks of an `@every 2s` job with a
/// 1 s starting deadline, then come back: each tick of the gap is recorded `missed` exactly
/// once (one put-if-absent of fire + result, never rewritten), nobody runs it, and the ticks
/// after the restart run normally. Then again with two nodes restarting at the same moment,
/// racing to record the same misses.
#[test]
fn all_conchd_down_across_ticks_records_each_gap_tick_missed_once() {
    let ctx = Ctx::new("cronf-gap");
    let mut nodes = start_nodes(&ctx, &["n1", "n2"]);
    wait_registered(&ctx, &["n1", "n2"], REGISTER);
    add_own_journal(
        &ctx,
        "gap",
        "@every 2s",
        &["--starting-deadline", "1s"],
        &["--run", "100ms"],
    );
    wait_ok_after(&ctx, "gap", 0, 2);
    stop_all(&mut nodes);

    // One node comes back.
    let (mut nodes, last_before, restart_ms) = outage(&ctx, "gap", &["n1"]);
    check_gap(&ctx, "gap", last_before, restart_ms, &["n1"]);
    stop_all(&mut nodes);

    // Two nodes come back at the same moment: both look back over the same gap.
    let (mut nodes, last_before, restart_ms) = outage(&ctx, "gap", &["n1", "n2"]);
    check_gap(&ctx, "gap", last_before, restart_ms, &["n1", "n2"]);
    stop_all(&mut nodes);

    let ran = journal::check_ticks(&journal_of(&ctx, "gap"));
    println!("gap: runs per node {:?}", per_node(&ran));
}

/// Waits until `job` has `n` ok results of ticks after `after_ms`; returns every result.
#[track_caller]
fn wait_ok_after(ctx: &Ctx, job: &str, after_ms: i64, n: usize) -> Vec<(i64, Value)> {
    poll(Duration::from_secs(30), Duration::from_millis(100), || {
        let r = ctx.results(job);
        (r.iter()
            .filter(|(t, v)| t * 1000 > after_ms && status(v) == "ok")
            .count()
            >= n)
            .then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "{job}: fewer than {n} ok results after {after_ms}: {:#?}",
            ctx.results(job)
        )
    })
}

/// With every conchd of `job` stopped: let three ticks pass their starting deadline, check
/// that nothing decided them meanwhile, then start `nodes` together. Returns the nodes, the
/// newest tick decided before, and the wall clock (ms) just before they started.
fn outage(ctx: &Ctx, job: &str, nodes: &[&str]) -> (Vec<Running>, i64, i64) {
    let fires = ctx.fires(job);
    let last_before = fires.last().expect("ticks before the outage").0;
    // The wall clock passing: 3 ticks (2 s apart) past their 1 s deadline, plus a margin.
    let until = (last_before + 3 * 2 + 1) * 1000 + 500;
    assert!(
        wait_until(Duration::from_secs(30), || now_ms() > until),
        "the clock did not reach {until}"
    );
    assert_eq!(
        ctx.fires(job).last().map(|(t, _)| *t),
        Some(last_before),
        "a tick was decided while no conchd ran"
    );
    let restart_ms = now_ms();
    let running = start_nodes(ctx, nodes);
    (running, last_before, restart_ms)
}

/// After an outage that ended at `restart_ms`: every tick after `last_before` whose
/// starting deadline passed before the restart is missed, recorded once, never run; the
/// ticks after the restart run.
#[track_caller]
fn check_gap(ctx: &Ctx, job: &str, last_before: i64, restart_ms: i64, nodes: &[&str]) {
    wait_ok_after(ctx, job, restart_ms, 2);
    // Results before fires: conchd keeps running, and a tick's claim always precedes its
    // result, so every result read has its claim in the later read.
    let results = tick_kvs(ctx, "result", job);
    let fires = tick_kvs(ctx, "fire", job);
    let ran = journal::check_ticks(&journal_of(ctx, job));
    let gap: Vec<i64> = (last_before + 1..)
        .filter(|t| t % 2 == 0)
        .take_while(|t| (t + 1) * 1000 < restart_ms)
        .collect();
    assert!(gap.len() >= 3, "the outage spanned too few ticks: {gap:?}");
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for t in &gap {
        let f = fires
            .get(t)
            .unwrap_or_else(|| {
                panic!(
                    "gap tick {t} has no claim (silently dropped); outage after tick {last_before}, restart at {restart_ms} ms; claims: {:#?}",
                    fires.values().map(|kv| (&kv.key, kv.create_revision, &kv.value)).collect::<Vec<_>>()
                )
            });
        let r = results
            .get(t)
            .unwrap_or_else(|| panic!("gap tick {t} has no result (silently dropped)"));
        let (fv, rv) = (json(f), json(r));
        assert_eq!(fv["decision"], "missed", "gap tick {t}: {fv}");
        assert_eq!(status(&rv), "missed", "gap tick {t}: {rv}");
        assert_eq!(rv["tick"], rfc3339(*t));
        assert!(
            nodes.contains(&rv["node"].as_str().unwrap_or("?")),
            "gap tick {t} recorded by {}",
            rv["node"]
        );
        // Recorded once: fire and result written by one transaction, neither rewritten.
        assert_eq!(
            (f.create_revision, r.create_revision),
            (f.mod_revision, r.mod_revision),
            "gap tick {t} was written more than once"
        );
        assert_eq!(
            f.create_revision, r.create_revision,
            "gap tick {t}: two writes"
        );
        assert_eq!((f.lease, r.lease), (0, 0));
        assert!(!ran.contains_key(&rfc3339(*t)), "gap tick {t} ran");
        *by.entry(rv["node"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    // Every tick from the gap on is decided exactly once; after the first run following
    // the restart, they run.
    let last = *results.keys().next_back().unwrap();
    let first_ok = results
        .iter()
        .find(|(t, kv)| **t * 1000 > restart_ms && status(&json(kv)) == "ok")
        .map(|(t, _)| *t)
        .unwrap();
    for t in (last_before + 2..=last).step_by(2) {
        let r = json(
            results
                .get(&t)
                .unwrap_or_else(|| panic!("tick {t}: no result")),
        );
        let f = json(&fires[&t]);
        match status(&r) {
            "ok" => {
                assert_eq!(f["decision"], "run");
                assert_ran_as(&ran, job, t, &r);
            }
            "missed" => {
                assert!(t < first_ok, "tick {t} missed while conchd ran: {r}");
                assert!(!ran.contains_key(&rfc3339(t)), "missed tick {t} ran");
            }
            other => panic!("tick {t}: {other}: {r}"),
        }
    }
    println!(
        "gap after restart of {nodes:?}: {} ticks missed, recorded by {by:?}; runs again from tick {first_ok}",
        gap.len()
    );
}

// ---------------------------------------------------------------------------------------
// 3. Identical tick keys on nodes with different local time zones.

/// Three conchd whose local `TZ` are UTC, Asia/Kolkata and America/New_York agree on
/// every tick: `*/2 * * * * *` in Europe/Berlin and `@every 3s` tick on multiples of 2 s and
/// 3 s, each tick decided once, the result's tick is the key's. A job pinned to each node
/// that fires only in the current and next hour of Berlin proves each node reads the
/// schedule in the job's zone, not its own (each local zone is an hour or more away from
/// Berlin, so a node reading the hours in its own zone would not fire at all), and the three
/// pinned jobs tick on identical keys.
#[test]
fn nodes_in_different_local_zones_compute_identical_ticks() {
    let ctx = Ctx::new("cronf-tz");
    let zones = [
        ("utc", "UTC"),
        ("kolkata", "Asia/Kolkata"),
        ("newyork", "America/New_York"),
    ];
    let mut nodes: Vec<Running> = zones
        .iter()
        .map(|(n, tz)| {
            ctx.conchd(n)
                .args(["--labels", &format!("node={n}")])
                .env("TZ", tz)
                .spawn()
        })
        .collect();
    let names: Vec<&str> = zones.iter().map(|(n, _)| *n).collect();
    wait_registered(&ctx, &names, REGISTER);
    let hour = |tz: &str, at: Option<i64>| -> u32 {
        let mut c = std::process::Command::new("date");
        c.env("TZ", tz);
        if let Some(t) = at {
            c.args(["-d", &format!("@{t}")]);
        }
        let out = c.arg("+%H").output().expect("date");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("an hour")
    };
    // The zones this machine resolves must really differ, or the test proves nothing.
    let berlin_now = hour("Europe/Berlin", None);
    for (_, tz) in zones {
        assert_ne!(hour(tz, None), berlin_now, "{tz} has Berlin's hour here");
    }
    let hours = [berlin_now, (berlin_now + 1) % 24];
    add_own_journal(
        &ctx,
        "even",
        "*/2 * * * * *",
        &["--tz", "Europe/Berlin"],
        &["--run", "100ms"],
    );
    add_own_journal(
        &ctx,
        "third",
        "@every 3s",
        &["--tz", "Asia/Kolkata"],
        &["--run", "100ms"],
    );
    let pinned_schedule = format!("*/2 * {},{} * * *", hours[0], hours[1]);
    for n in &names {
        add_own_journal(
            &ctx,
            &format!("berlin-{n}"),
            &pinned_schedule,
            &[
                "--tz",
                "Europe/Berlin",
                "--node-selector",
                &format!("node={n}"),
            ],
            &["--run", "50ms"],
        );
    }
    ctx.wait_results("even", 10, Duration::from_secs(60));
    ctx.wait_results("third", 6, Duration::from_secs(60));
    for n in &names {
        ctx.wait_results(&format!("berlin-{n}"), 6, Duration::from_secs(60));
    }
    stop_all(&mut nodes);

    let mut pinned: Vec<BTreeSet<i64>> = vec![];
    for (job, period) in [("even", 2), ("third", 3)]
        .into_iter()
        .map(|(j, p)| (j.to_string(), p))
        .chain(names.iter().map(|n| (format!("berlin-{n}"), 2)))
    {
        let fires = ctx.fires(&job);
        let results = ctx.results(&job);
        let ran = journal::check_ticks(&journal_of(&ctx, &job));
        for (t, f) in &fires {
            assert_eq!(
                t % period,
                0,
                "{job}: tick {t} is not on a {period} s step: {f}"
            );
        }
        assert_eq!(
            fires.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            results.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            "{job}: every claimed tick has one result"
        );
        for (t, r) in &results {
            assert_eq!(r["tick"], rfc3339(*t), "{job}: {r}");
            assert!(matches!(status(r), "ok" | "missed"), "{job} {t}: {r}");
            if status(r) == "ok" {
                assert_ran_as(&ran, &job, *t, r);
            }
        }
        if let Some(n) = job.strip_prefix("berlin-") {
            for (t, r) in &results {
                if status(r) == "ok" {
                    assert_eq!(r["node"], n, "{job} ran off its node");
                }
                assert!(
                    hours.contains(&hour("Europe/Berlin", Some(*t))),
                    "{job}: tick {t} outside Berlin hours {hours:?}"
                );
            }
            pinned.push(fires.iter().map(|(t, _)| *t).collect());
        }
        println!(
            "{job}: {} ticks, runs per node {:?}",
            fires.len(),
            per_node(&ran)
        );
    }
    // Over the window all three pinned jobs lived, they ticked on the same keys.
    let from = pinned.iter().map(|s| *s.first().unwrap()).max().unwrap();
    let to = pinned.iter().map(|s| *s.last().unwrap()).min().unwrap();
    assert!(to - from >= 6, "the pinned jobs shared too short a window");
    let window: Vec<BTreeSet<i64>> = pinned
        .iter()
        .map(|s| s.range(from..=to).copied().collect())
        .collect();
    assert_eq!(window[0], window[1], "utc and kolkata disagree on ticks");
    assert_eq!(window[0], window[2], "utc and newyork disagree on ticks");
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The EU's DST change in `year`, `month` (3 or 10): the last Sunday, 01:00 UTC.
fn eu_dst_change(year: i64, month: i64) -> i64 {
    let last = days_from_civil(year, month, 31);
    let sunday = last - (last + 4).rem_euclid(7);
    sunday * 86_400 + 3_600
}

/// Across both of Berlin's DST changes (conchd's clocks moved to just before each one with
/// `CONCH_TEST_CLOCK_OFFSET`), conchd whose local `TZ` are UTC, Asia/Kolkata and
/// America/New_York tick on identical keys, following cronie's rule (schedule.rs): a
/// wildcard job (`*/5 * * * * *`) ticks every 5 s straight through both changes; in spring a
/// fixed-time job in the gap (02:30:30) ticks once, at the first instant after it (01:00:00
/// UTC); in autumn a fixed-time job in the repeated hour (02:00:10, 02:00:20) ticks on the
/// first pass only, never again on the second (01:00:10, 01:00:20 UTC).
#[test]
fn nodes_in_different_zones_tick_identically_across_both_berlin_dst_changes() {
    // 2026's changes, as schedule.rs documents them: the helper is right.
    assert_eq!(rfc3339(eu_dst_change(2026, 3)), "2026-03-29T01:00:00Z");
    assert_eq!(rfc3339(eu_dst_change(2026, 10)), "2026-10-25T01:00:00Z");
    let soon = now_unix() + 600;
    let next = |month| {
        let y = rfc3339(now_unix())[..4].parse::<i64>().unwrap();
        [y, y + 1]
            .into_iter()
            .map(|y| eu_dst_change(y, month))
            .find(|t| *t > soon)
            .unwrap()
    };
    dst_trial("spring", next(3), "30 30 2 * * *");
    dst_trial("autumn", next(10), "10,20 0 2 * * *");
}

/// One DST change at `change` (Unix s): three conchd in three local zones, their clocks at
/// `change − 25 s`; per node a wildcard and a fixed-time job in Europe/Berlin.
fn dst_trial(label: &str, change: i64, fixed: &str) {
    let ctx = Ctx::new(&format!("cronf-dst-{label}"));
    let zones = [
        ("utc", "UTC"),
        ("kolkata", "Asia/Kolkata"),
        ("newyork", "America/New_York"),
    ];
    let names: Vec<&str> = zones.iter().map(|(n, _)| *n).collect();
    for n in &names {
        let pin = [
            "--tz",
            "Europe/Berlin",
            "--node-selector",
            &format!("node={n}"),
        ];
        add_own_journal(
            &ctx,
            &format!("wild-{n}"),
            "*/5 * * * * *",
            &pin,
            &["--run", "50ms"],
        );
        add_own_journal(&ctx, &format!("fixed-{n}"), fixed, &pin, &["--run", "50ms"]);
    }
    let offset_ms = (change - 25) * 1000 - now_ms();
    let virtual_ms = move || now_ms() + offset_ms;
    let mut nodes: Vec<Running> = zones
        .iter()
        .map(|(n, tz)| {
            ctx.conchd(n)
                .args(["--labels", &format!("node={n}")])
                .env("TZ", tz)
                .env("CONCH_TEST_CLOCK_OFFSET", format!("{offset_ms}ms"))
                .spawn()
        })
        .collect();
    wait_registered(&ctx, &names, REGISTER);
    // The (virtual) clock passing the change and 15 s more, then the last runs landing.
    assert!(
        wait_until(Duration::from_secs(60), || virtual_ms()
            > (change + 15) * 1000 + 1500),
        "the virtual clock did not pass the change"
    );
    stop_all(&mut nodes);

    let window = change - 15..=change + 15;
    let expected: BTreeSet<i64> = window.clone().step_by(5).collect();
    for n in &names {
        let wild = format!("wild-{n}");
        let fires = ctx.fires(&wild);
        let results: BTreeMap<i64, Value> = ctx.results(&wild).into_iter().collect();
        let ran = journal::check_ticks(&journal_of(&ctx, &wild));
        let got: BTreeSet<i64> = fires
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| window.contains(t))
            .collect();
        assert_eq!(
            got,
            expected,
            "{label}: {wild} (node TZ of {n}) around {}: not every 5 s",
            rfc3339(change)
        );
        for t in &expected {
            let r = &results[t];
            assert_eq!(status(r), "ok", "{label} {wild} {t}: {r}");
            assert_eq!(r["node"], *n);
            assert_eq!(ran[&rfc3339(*t)].0, *n);
        }
        let fixed_job = format!("fixed-{n}");
        let fires: BTreeMap<i64, Value> = ctx.fires(&fixed_job).into_iter().collect();
        let in_window: Vec<i64> = fires
            .keys()
            .copied()
            .filter(|t| window.contains(t))
            .collect();
        if label == "spring" {
            // 02:30:30 does not exist that night: once, at 03:00:00 CEST = 01:00:00 UTC.
            assert_eq!(in_window, vec![change], "{label}: {fixed_job}: {fires:#?}");
            let r = &ctx
                .results(&fixed_job)
                .into_iter()
                .collect::<BTreeMap<_, _>>()[&change];
            assert_eq!(status(r), "ok", "{r}");
            assert_eq!(r["node"], *n);
        } else {
            // 02:00:10 and 02:00:20 happen twice: ticked on the first pass (00:00:10 and
            // 00:00:20 UTC, before the nodes' clocks start: recorded missed by the
            // lookback), never on the second.
            assert!(
                in_window.is_empty(),
                "{label}: {fixed_job} ticked in the repeated hour: {in_window:?}"
            );
            for t in [change - 3600 + 10, change - 3600 + 20] {
                let f = fires.get(&t).unwrap_or_else(|| {
                    panic!("{label}: {fixed_job}: first pass {t} not decided: {fires:#?}")
                });
                assert_eq!(f["decision"], "missed", "{f}");
            }
        }
        println!(
            "{label} {}: node {n} (TZ {}) ticked {wild} every 5 s across it; {fixed_job} in the window: {in_window:?}",
            rfc3339(change),
            zones.iter().find(|(z, _)| z == n).unwrap().1,
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. Clock offsets.

/// Three conchd whose clocks are offset by 0, +2 s and −30 s share a per-second job for 200
/// ticks: every tick from the first to the last is decided exactly once (ok, missed or
/// skipped), and no tick ran twice. The fast node claims early by its skew, the slow one
/// loses every race.
#[test]
fn clock_offsets_never_run_a_tick_twice_over_200_ticks() {
    let ctx = Ctx::new("cronf-skew");
    let offsets = [("n0", "0s"), ("fast", "+2s"), ("slow", "-30s")];
    let mut nodes: Vec<Running> = offsets
        .iter()
        .map(|(n, off)| ctx.conchd(n).env("CONCH_TEST_CLOCK_OFFSET", off).spawn())
        .collect();
    let names: Vec<&str> = offsets.iter().map(|(n, _)| *n).collect();
    wait_registered(&ctx, &names, REGISTER);
    add_own_journal(&ctx, "beat", "@every 1s", &[], &["--run", "100ms"]);
    // Results older than the retention floor (~2 min) are pruned while the test runs:
    // collect them as they come, and check that none is ever rewritten.
    let mut seen: BTreeMap<i64, (Kv, Option<Kv>)> = BTreeMap::new();
    let mut collect = |ctx: &Ctx| {
        let fires = tick_kvs(ctx, "fire", "beat");
        let results = tick_kvs(ctx, "result", "beat");
        for (t, f) in fires {
            let r = results.get(&t).cloned();
            let e = seen.entry(t).or_insert_with(|| (f.clone(), r.clone()));
            assert_eq!(
                (e.0.create_revision, e.0.mod_revision),
                (f.create_revision, f.mod_revision),
                "tick {t}'s claim was rewritten"
            );
            match (&e.1, r) {
                (Some(old), Some(new)) => assert_eq!(
                    (old.create_revision, old.mod_revision),
                    (new.create_revision, new.mod_revision),
                    "tick {t}'s result was rewritten: {} then {}",
                    old.value,
                    new.value
                ),
                (None, Some(new)) => e.1 = Some(new),
                _ => {}
            }
        }
        seen.values().filter(|(_, r)| r.is_some()).count()
    };
    let done = poll(Duration::from_secs(300), Duration::from_secs(1), || {
        (collect(&ctx) >= 200).then_some(())
    });
    stop_all(&mut nodes);
    collect(&ctx);
    assert!(done.is_some(), "fewer than 200 ticks decided in 300 s");

    let ran = journal::check_ticks(&journal_of(&ctx, "beat"));
    let ticks: Vec<i64> = seen.keys().copied().collect();
    let (first, last) = (ticks[0], *ticks.last().unwrap());
    assert_eq!(
        ticks,
        (first..=last).collect::<Vec<_>>(),
        "a tick was never decided"
    );
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for (t, (f, r)) in &seen {
        let f = json(f);
        let r = json(
            r.as_ref()
                .unwrap_or_else(|| panic!("tick {t}: claimed, no result")),
        );
        assert_eq!(r["tick"], rfc3339(*t));
        let st = status(&r).to_string();
        match st.as_str() {
            "ok" => {
                assert_eq!(f["decision"], "run", "{t}: {f}");
                assert_ran_as(&ran, "beat", *t, &r);
            }
            "missed" | "skipped" => {
                assert!(!ran.contains_key(&rfc3339(*t)), "tick {t} {st} but ran");
            }
            _ => panic!("tick {t}: {r}"),
        }
        *statuses.entry(st).or_default() += 1;
    }
    let runs = per_node(&ran);
    let not_run: Vec<String> = seen
        .iter()
        .filter_map(|(t, (_, r))| {
            let r = json(r.as_ref()?);
            (status(&r) != "ok").then(|| {
                format!(
                    "tick #{} {} by {}: {}",
                    t - first,
                    status(&r),
                    r["node"],
                    r["reason"].as_str().unwrap_or("")
                )
            })
        })
        .collect();
    println!(
        "clock offsets {offsets:?}: {} ticks {statuses:?}; runs per node {runs:?}; not run: {not_run:#?}",
        seen.len()
    );
    // Liveness too: a stalled scheduler must not pass as "never twice".
    assert!(
        statuses.get("ok").copied().unwrap_or(0) * 10 >= seen.len() * 9,
        "fewer than 90% of the ticks ran: {statuses:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Live lease count constant over many ticks.

/// On an etcd of its own, three conchd hold exactly three leases (one each: the node key
/// and every `running` key ride on it) before and after 100 ticks of a per-second job and
/// of an overlap=forbid one; no claim or result carries a lease; stopping revokes all three.
#[test]
fn live_lease_count_stays_constant_over_100_ticks() {
    let mut ctx = Ctx::new("cronf-leases");
    let cluster = Cluster::start(&ctx.dir, 1);
    use_private(&mut ctx, &cluster);
    let leases = |ctx: &Ctx| -> BTreeSet<u64> {
        ctx.etcd
            .ctl(["lease", "list"])
            .lines()
            .skip(1)
            .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
            .collect()
    };
    assert!(leases(&ctx).is_empty(), "a fresh etcd has no lease");
    let names = ["n1", "n2", "n3"];
    let mut nodes = start_nodes(&ctx, &names);
    let reg = wait_registered(&ctx, &names, REGISTER);
    let node_leases: BTreeSet<u64> = reg.iter().map(|kv| kv.lease).collect();
    let before = leases(&ctx);
    assert_eq!(before.len(), 3, "one lease per conchd: {before:?}");
    assert_eq!(before, node_leases, "the leases are the nodes'");

    add_own_journal(&ctx, "beat", "@every 1s", &[], &["--run", "100ms"]);
    add_own_journal(
        &ctx,
        "solo",
        "@every 1s",
        &["--overlap", "forbid"],
        &["--run", "1500ms"],
    );
    poll(Duration::from_secs(180), Duration::from_millis(500), || {
        (ctx.results("beat").len() >= 100 && ctx.results("solo").len() >= 100).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "fewer than 100 results: beat {}, solo {}",
            ctx.results("beat").len(),
            ctx.results("solo").len()
        )
    });
    let after = leases(&ctx);
    let node_leases: BTreeSet<u64> = ctx
        .etcd
        .get_prefix(&format!("{}/v1/node/", ctx.prefix))
        .iter()
        .map(|kv| kv.lease)
        .collect();
    println!(
        "leases: {} after registration, {} after ≥100 ticks of two jobs (same ids: {})",
        before.len(),
        after.len(),
        before == after
    );
    assert_eq!(
        after.len(),
        before.len(),
        "lease count grew: {before:?} → {after:?}"
    );
    assert_eq!(
        after, node_leases,
        "a lease that is not a node's: {after:?}"
    );
    // The running key of the forbid job rides on its runner's lease.
    for kv in ctx
        .etcd
        .get_prefix(&format!("{}/v1/cron/running/", ctx.prefix))
    {
        assert!(
            after.contains(&kv.lease),
            "running key on a foreign lease: {kv:?}"
        );
    }
    for kind in ["fire", "result"] {
        let kvs = ctx
            .etcd
            .get_prefix(&format!("{}/v1/cron/{kind}/", ctx.prefix));
        assert!(kvs.len() >= 200, "{kind}: only {} keys", kvs.len());
        for kv in kvs {
            assert_eq!(kv.lease, 0, "{} carries a lease", kv.key);
        }
    }
    stop_all(&mut nodes);
    assert!(
        leases(&ctx).is_empty(),
        "stopped conchd left leases: {:?}",
        leases(&ctx)
    );
    journal::check_ticks(&journal_of(&ctx, "beat"));
    let v = journal::check(&journal_of(&ctx, "solo"), 1);
    assert_eq!(v.max_overlap_ms, 0.0);
}

// ---------------------------------------------------------------------------------------
// 6. /healthz.

/// One HTTP/1.1 GET with a plain TCP client: (status code, body).
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => return Err(format!("read: {e}")),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status_line = text.lines().next().unwrap_or("");
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

/// `/healthz` answers 200 while conchd watches and holds its lease; once its (private) etcd
/// is frozen it answers 503 with the reason within a few seconds — promptly, without waiting
/// on etcd — and 200 again once etcd is back.
#[test]
fn healthz_turns_503_while_etcd_is_frozen_and_200_when_it_is_back() {
    let mut ctx = Ctx::new("cronf-healthz");
    let cluster = Cluster::start(&ctx.dir, 1);
    use_private(&mut ctx, &cluster);
    let port = crate::harness::etcd::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut node = ctx.conchd("n1").args(["--status-addr", &addr]).spawn();
    wait_registered(&ctx, &["n1"], REGISTER);
    let healthz = || http_get(&addr, "/healthz");
    let up = wait_for(Duration::from_secs(15), || {
        healthz().ok().filter(|(c, _)| *c == 200)
    });
    assert!(
        up.is_some(),
        "no 200 from /healthz: {:?}\n--- conchd stderr\n{}",
        healthz(),
        node.stderr()
    );

    cluster.stop(0);
    let frozen = Instant::now();
    let mut slowest = Duration::ZERO;
    let down = wait_for(Duration::from_secs(15), || {
        let asked = Instant::now();
        let r = healthz();
        slowest = slowest.max(asked.elapsed());
        r.ok().filter(|(c, _)| *c == 503)
    });
    let took = frozen.elapsed();
    cluster.cont(0);
    let (_, reason) = down.unwrap_or_else(|| {
        panic!(
            "/healthz did not turn 503 with etcd frozen: {:?}\n--- conchd stderr\n{}",
            healthz(),
            node.stderr()
        )
    });
    println!(
        "/healthz: 503 {:.2} s after etcd froze ({}); slowest answer {slowest:?}",
        took.as_secs_f64(),
        reason.trim()
    );
    // The lease's deadline is ≤ 3.71 s after its last renewal (TTL 4 s): a few seconds.
    assert!(took <= Duration::from_secs(6), "503 only after {took:?}");
    assert!(
        reason.contains("lease") || reason.contains("watching"),
        "503 without a reason: {reason:?}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "/healthz waited on the frozen etcd: {slowest:?}"
    );

    let thawed = Instant::now();
    let back = wait_for(Duration::from_secs(30), || {
        healthz().ok().filter(|(c, _)| *c == 200)
    });
    assert!(
        back.is_some(),
        "/healthz not 200 again after etcd came back: {:?}\n--- conchd stderr\n{}",
        healthz(),
        node.stderr()
    );
    println!(
        "/healthz: 200 again {:.2} s after etcd came back",
        thawed.elapsed().as_secs_f64()
    );
    stop_all(std::slice::from_mut(&mut node));
}

// ---------------------------------------------------------------------------------------
// 7. overlap=forbid, a run longer than the period, its node partitioned.

/// An overlap=forbid per-second job whose run lasts until told; node `a` (through the fault
/// proxy) runs it, node `b` (direct) skips the ticks meanwhile. `a` is partitioned: its run
/// is killed by D (before its lease expires on etcd), `b` runs only after the lease expired
/// and the `running` key with it — never two runs at once — and once the partition heals
/// `a` writes its run's result: killed, the hold lost.
#[test]
fn overlap_forbid_run_whose_node_is_partitioned_is_killed_by_d_without_overlap() {
    let mut ctx = Ctx::new("cronf-partition");
    let cluster = Cluster::start(&ctx.dir, 1);
    use_private(&mut ctx, &cluster);
    let json_log = ["--log-format", "json"];
    let a = ctx
        .conchd("a")
        .args(json_log)
        .env("CONCH_ENDPOINTS", cluster.endpoints())
        .spawn();
    wait_registered(&ctx, &["a"], REGISTER);
    let go = ctx.path("go");
    add_own_journal(
        &ctx,
        "slow",
        "@every 1s",
        &["--overlap", "forbid"],
        &[
            "--until-file",
            &go.to_string_lossy(),
            "--grandchildren",
            "1",
        ],
    );
    let j = journal_of(&ctx, "slow");
    let held = wait_for(Duration::from_secs(15), || {
        journal::intervals(&journal::read(&j))
            .into_iter()
            .find(|i| i.node == "a" && i.pids.len() == 2)
    })
    .unwrap_or_else(|| panic!("a never ran slow\n--- a's stderr\n{}", a.stderr()));
    let b = ctx.conchd("b").args(json_log).spawn();
    wait_registered(&ctx, &["a", "b"], REGISTER);
    // b is live and racing: it records ticks skipped while a's run lasts.
    assert!(
        wait_until(Duration::from_secs(15), || ctx
            .results("slow")
            .iter()
            .any(|(_, v)| status(v) == "skipped" && v["node"] == "b")),
        "b never skipped a tick: {:#?}",
        ctx.results("slow")
    );

    cluster.members[0].proxy.blackhole();
    let cut = boot_ms();
    let next = wait_for(Duration::from_secs(20), || {
        journal::intervals(&journal::read(&j))
            .into_iter()
            .find(|i| i.node == "b")
    })
    .unwrap_or_else(|| {
        panic!(
            "b never ran after the partition\n--- b's stderr\n{}",
            b.stderr()
        )
    });
    ctx.touch("go");
    cluster.members[0].proxy.pass();
    // Healed: a writes its run's result (killed), b's run ended ok.
    let a_tick = journal::read(&j)
        .into_iter()
        .find(|r| r.rev == Some(held.rev))
        .and_then(|r| r.tick)
        .unwrap();
    let results = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        let r = ctx.results("slow");
        let a_done = r
            .iter()
            .any(|(t, v)| rfc3339(*t) == a_tick && status(v) == "killed");
        let b_done = r
            .iter()
            .any(|(_, v)| v["rev"] == next.rev && status(v) == "ok");
        (a_done && b_done).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "results after healing: {:#?}\n--- a's stderr\n{}",
            ctx.results("slow"),
            a.stderr()
        )
    });
    let mut both = [a, b];
    stop_all(&mut both);
    let [a, _b] = both;

    let v = journal::check(&j, 1);
    let evs = events(&a.stderr());
    let ev = |name: &str| {
        evs.iter()
            .find(|e| e["message"] == name && e["rev"] == held.rev)
            .unwrap_or_else(|| panic!("no {name} event for rev {}: {evs:#?}", held.rev))
    };
    let lost = ev("lost");
    let d = lost["deadline_boot_ms"].as_f64().expect("deadline_boot_ms");
    let empty = ev("tree-empty")["boot_ms"].as_f64().expect("boot_ms");
    let a_iv = v.intervals.iter().find(|i| i.rev == held.rev).unwrap();
    let b_iv = v.intervals.iter().find(|i| i.rev == next.rev).unwrap();
    let last = ms(a_iv.last_ns);
    println!(
        "partitioned forbid run: D {:.0} ms after the cut, tree empty at D{:+.0} ms, last beat D{:+.0} ms; next run (node b) {:.0} ms after the last beat; overlap {} ms",
        d - cut,
        empty - d,
        last - d,
        ms(b_iv.first_ns) - last,
        v.max_overlap_ms
    );
    assert_eq!(v.max_overlap_ms, 0.0, "two runs overlapped");
    assert!(
        last < ms(b_iv.first_ns),
        "the cut-off run beat after b's run started"
    );
    assert!(
        d <= cut + 3710.0 + 1.0,
        "D {:.1} ms after the cut (TTL 4 s)",
        d - cut
    );
    assert!(empty <= d, "tree empty {:.1} ms after D", empty - d);
    assert!(last <= empty, "a journal record after tree-empty");
    assert!(b_iv.rev > a_iv.rev);
    let (_, r) = results.iter().find(|(t, _)| rfc3339(*t) == a_tick).unwrap();
    assert_eq!(r["node"], "a");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("hold was lost"),
        "{r}"
    );
    for (t, r) in &results {
        assert!(
            matches!(status(r), "ok" | "killed" | "skipped" | "missed"),
            "{t}: {r}"
        );
    }
    assert!(
        ctx.etcd
            .get_prefix(&format!("{}/v1/cron/running/", ctx.prefix))
            .is_empty(),
        "a running key outlived the runs"
    );
}

// ---------------------------------------------------------------------------------------
// 8. A lease outage on the only node: every tick is still decided (run late, or missed).

#[test]
fn a_lease_outage_on_the_only_node_leaves_no_tick_undecided() {
    let mut ctx = Ctx::new("cronf-outage");
    let cluster = Cluster::start(&ctx.dir, 1);
    use_private(&mut ctx, &cluster);
    let mut node = ctx.conchd("n1").spawn();
    wait_registered(&ctx, &["n1"], REGISTER);
    add_own_journal(
        &ctx,
        "steady",
        "@every 1s",
        &["--starting-deadline", "10s"],
        &["--run", "50ms"],
    );
    ctx.wait_results("steady", 3, Duration::from_secs(15));
    // Freeze etcd past the lease's deadline (TTL 4 s: D ≤ 3.71 s after the last renewal):
    // conchd loses its hold, ticks come due without one, and nobody else could decide them.
    cluster.stop(0);
    let frozen_at = now_ms() / 1000;
    std::thread::sleep(Duration::from_secs(6)); // the outage itself, not a synchronisation
    cluster.cont(0);
    let back_at = now_ms() / 1000;
    // Runs resume under a new lease.
    let after = wait_for(Duration::from_secs(30), || {
        let r = ctx.results("steady");
        (r.iter()
            .filter(|(t, v)| *t > back_at + 1 && status(v) == "ok")
            .count()
            >= 3)
            .then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "no runs after the outage\n--- conchd stderr\n{}",
            node.stderr()
        )
    });
    stop_all(std::slice::from_mut(&mut node));
    let ticks: Vec<i64> = after.iter().map(|(t, _)| *t).collect();
    let (first, last) = (ticks[0], *ticks.last().unwrap());
    assert_eq!(
        ticks,
        (first..=last).collect::<Vec<_>>(),
        "ticks of the outage ({frozen_at}..{back_at}) were never decided: {after:#?}"
    );
    for (t, v) in &after {
        assert!(
            matches!(status(v), "ok" | "missed" | "killed"),
            "tick {t}: {v}"
        );
    }
    journal::check_ticks(&journal_of(&ctx, "steady"));
}
