//! `conch cron` + `conch conchd` against a real etcd: several conchd processes (distinct
//! `--node`) on this host race for every tick; the journal of `conch-testchild` proves that
//! no tick ran twice, and the records in etcd that each tick was decided once.

use std::time::Duration;

use crate::harness::cron::{
    add, assert_ran_as, now_ms, per_node, start_nodes, status, stop_all, wait_registered,
};
use crate::harness::journal;
use crate::harness::{Ctx, Signal, alive, wait_for, wait_until};

/// How long conchd may take to register.
const REGISTER: Duration = Duration::from_secs(15);

#[test]
fn three_nodes_run_each_tick_of_a_per_second_job_exactly_once() {
    let ctx = Ctx::new("cron-3x1s");
    let mut nodes = start_nodes(&ctx, &["n1", "n2", "n3"]);
    wait_registered(&ctx, &["n1", "n2", "n3"], REGISTER);
    add(&ctx, "beat", "@every 1s", &[], &["--run", "300ms"]);
    ctx.wait_results("beat", 30, Duration::from_secs(60));
    stop_all(&mut nodes);
    let results = ctx.results("beat");
    let ticks: Vec<i64> = results.iter().map(|(t, _)| *t).collect();
    // Every tick from the first to the last was decided, each exactly once (a key per tick).
    let (first, last) = (ticks[0], *ticks.last().unwrap());
    assert_eq!(
        ticks,
        (first..=last).collect::<Vec<_>>(),
        "a tick has no result"
    );
    let runs: Vec<&(i64, serde_json::Value)> =
        results.iter().filter(|(_, v)| status(v) == "ok").collect();
    for (t, v) in &results {
        assert!(matches!(status(v), "ok" | "missed"), "tick {t}: {v}");
        assert_eq!(
            v["tick"].as_str().unwrap(),
            crate::harness::cron::rfc3339(*t)
        );
    }
    assert!(
        runs.len() >= 28,
        "only {} of {} ticks ran: {results:#?}",
        runs.len(),
        results.len()
    );
    // The journal: no tick ran twice, each on the node its result names.
    let ran = journal::check_ticks(&journal::path_in(&ctx.dir));
    for (t, v) in &runs {
        assert_ran_as(&ran, "beat", *t, v);
    }
    // More than one node took ticks: the race is real, not a single scheduler.
    let per_node = per_node(&ran);
    assert!(per_node.len() >= 2, "one node ran everything: {per_node:?}");
}

#[test]
fn a_five_second_job_runs_once_per_tick_not_once_per_node() {
    let ctx = Ctx::new("cron-3x5s");
    let mut nodes = start_nodes(&ctx, &["a", "b", "c"]);
    wait_registered(&ctx, &["a", "b", "c"], REGISTER);
    add(&ctx, "five", "@every 5s", &[], &["--run", "100ms"]);
    let results = ctx.wait_results("five", 3, Duration::from_secs(30));
    stop_all(&mut nodes);
    let ran = journal::check_ticks(&journal::path_in(&ctx.dir));
    assert!(ran.len() >= 3);
    for (t, v) in &results {
        assert_eq!(t % 5, 0, "@every 5s ticks are anchored to the epoch: {t}");
        assert_eq!(status(v), "ok", "{v}");
    }
    // Every start is a distinct tick: 3 ticks → 3 runs, never 9.
    let starts = journal::read(&journal::path_in(&ctx.dir))
        .into_iter()
        .filter(|r| r.event == "start" && r.role == "child")
        .count();
    assert_eq!(starts, ran.len());
}

#[test]
fn run_ttl_kills_the_tree_and_records_killed() {
    let ctx = Ctx::new("cron-ttl");
    let mut nodes = start_nodes(&ctx, &["n1"]);
    wait_registered(&ctx, &["n1"], REGISTER);
    add(
        &ctx,
        "long",
        "@every 3s",
        &["--run-ttl", "1s", "--overlap", "forbid"],
        &["--run", "30s", "--ignore-term", "--grandchildren", "1"],
    );
    let results = ctx.wait_results("long", 1, Duration::from_secs(20));
    let (_, v) = &results[0];
    assert_eq!(status(v), "killed", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("--run-ttl"), "{v}");
    let d: f64 = v["duration"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    // SIGTERM at 1s is ignored; SIGKILL after --kill-after 1s: dead by ~2s.
    assert!((0.9..4.0).contains(&d), "duration {d}");
    stop_all(&mut nodes);
    // Nothing of the tree survived.
    for r in journal::read(&journal::path_in(&ctx.dir)) {
        assert!(!alive(r.pid), "pid {} of a killed run still lives", r.pid);
    }
}

#[test]
fn manual_run_runs_exactly_once_and_a_paused_job_does_not_fire() {
    let ctx = Ctx::new("cron-manual");
    let mut nodes = start_nodes(&ctx, &["n1", "n2", "n3"]);
    wait_registered(&ctx, &["n1", "n2", "n3"], REGISTER);
    // A schedule that will not fire during the test (once a year).
    add(&ctx, "adhoc", "@yearly", &[], &["--run", "100ms"]);
    let out = ctx.cron(["run", "adhoc"]).run();
    out.expect_code(0);
    assert!(out.stderr.contains("taken by"), "{}", out.stderr);
    let results = ctx.wait_results("adhoc", 1, Duration::from_secs(10));
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].1["manual"], true);
    assert_eq!(status(&results[0].1), "ok");
    // No trigger is left behind.
    assert!(
        ctx.etcd
            .get_prefix(&format!("{}/v1/cron/trigger/", ctx.prefix))
            .is_empty()
    );

    // Paused: a per-second job does not fire.
    add(&ctx, "quiet", "@every 1s", &[], &["--run", "100ms"]);
    ctx.wait_results("quiet", 1, Duration::from_secs(10));
    ctx.cron(["pause", "quiet"]).run().expect_code(0);
    // Each node takes the pause in with the watch event that brings it, and logs it. A tick
    // a node took up before that may still be claimed; no tick due after it may be, on any
    // node.
    let pause_seen = |n: &crate::harness::Running| {
        n.stderr().lines().any(|l| {
            l.contains("job loaded") && l.contains("name=quiet") && l.contains("change=Changed")
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || nodes.iter().all(pause_seen)),
        "not every node logged the paused job"
    );
    let seen_ms = now_ms();
    let fired_after = || {
        ctx.fires("quiet")
            .into_iter()
            .find(|(t, _)| t * 1000 > seen_ms)
    };
    assert!(
        wait_for(Duration::from_secs(3), fired_after).is_none(),
        "a paused job fired: {:?}",
        fired_after()
    );
    let resumed_ms = now_ms();
    ctx.cron(["resume", "quiet"]).run().expect_code(0);
    assert!(
        wait_until(Duration::from_secs(10), || ctx
            .results("quiet")
            .iter()
            .any(|(t, r)| t * 1000 > resumed_ms && status(r) == "ok")),
        "the resumed job did not run"
    );
    stop_all(&mut nodes);
    let ran = journal::check_ticks(&journal::path_in(&ctx.dir));
    assert!(ran.len() >= 3);
}

#[test]
fn overlap_forbid_skips_ticks_while_a_run_lasts_longer_than_the_period() {
    let ctx = Ctx::new("cron-forbid");
    let mut nodes = start_nodes(&ctx, &["n1", "n2"]);
    wait_registered(&ctx, &["n1", "n2"], REGISTER);
    add(
        &ctx,
        "slow",
        "@every 1s",
        &["--overlap", "forbid"],
        &["--run", "2500ms"],
    );
    let results = wait_for(Duration::from_secs(30), || {
        let r = ctx.results("slow");
        (r.iter().filter(|(_, v)| status(v) == "ok").count() >= 2).then_some(r)
    })
    .expect("two runs of slow");
    stop_all(&mut nodes);
    let skipped = results
        .iter()
        .filter(|(_, v)| status(v) == "skipped")
        .count();
    assert!(skipped >= 2, "no tick was skipped: {results:#?}");
    // No two runs overlapped: the journal holds at most one tree at a time.
    let v = journal::check(&journal::path_in(&ctx.dir), 1);
    assert_eq!(v.max_overlap_ms, 0.0);
    // The running key is gone with the run.
    assert!(
        ctx.etcd
            .get_prefix(&format!("{}/v1/cron/running/", ctx.prefix))
            .is_empty()
    );
}

#[test]
fn node_selector_restricts_which_nodes_run_a_job() {
    let ctx = Ctx::new("cron-selector");
    let mut nodes = vec![
        ctx.conchd("web1").args(["--labels", "role=web"]).spawn(),
        ctx.conchd("db1")
            .args(["--labels", "role=db,zone=eu"])
            .spawn(),
        ctx.conchd("db2")
            .args(["--labels", "role=db,zone=us"])
            .spawn(),
    ];
    wait_registered(&ctx, &["web1", "db1", "db2"], REGISTER);
    add(
        &ctx,
        "dbonly",
        "@every 1s",
        &["--node-selector", "role=db,zone=eu"],
        &["--run", "100ms"],
    );
    ctx.wait_results("dbonly", 5, Duration::from_secs(20));
    stop_all(&mut nodes);
    for (t, v) in ctx.results("dbonly") {
        if status(&v) == "ok" {
            assert_eq!(
                v["node"], "db1",
                "tick {t} ran on a node the selector excludes"
            );
        }
    }
}

#[test]
fn restart_claims_no_past_tick_and_rm_lets_a_run_finish() {
    let ctx = Ctx::new("cron-restart");
    let mut nodes = start_nodes(&ctx, &["n1"]);
    wait_registered(&ctx, &["n1"], REGISTER);
    let marker = ctx.path("go");
    add(
        &ctx,
        "job",
        "@every 2s",
        &["--starting-deadline", "1s"],
        &["--until-file", &marker.to_string_lossy()],
    );
    // The first run waits for the marker; rm the job while it runs.
    let first = wait_for(Duration::from_secs(10), || {
        ctx.fires("job").into_iter().next()
    })
    .expect("a claim");
    ctx.cron(["rm", "job"]).run().expect_code(0);
    ctx.touch("go");
    // The run finishes (its journal ends), and conchd clears the removed job's history.
    assert!(wait_until(Duration::from_secs(10), || journal::read(
        &journal::path_in(&ctx.dir)
    )
    .iter()
    .any(|r| r.event == "end")));
    assert!(wait_until(Duration::from_secs(10), || ctx
        .fires("job")
        .is_empty()
        && ctx.results("job").is_empty()));
    stop_all(&mut nodes);
    let _ = first;

    // Restart claims no past tick: ticks decided before the stop stay decided once, and the
    // ticks while no conchd ran beyond the starting deadline are recorded missed, not run.
    add(
        &ctx,
        "again",
        "@every 1s",
        &["--starting-deadline", "1s"],
        &["--run", "100ms"],
    );
    let mut n1 = start_nodes(&ctx, &["n1"]);
    ctx.wait_results("again", 2, Duration::from_secs(15));
    stop_all(&mut n1);
    let stopped_at = crate::harness::cron::now_unix();
    // The outage itself (no conchd for 4 ticks), not a synchronisation.
    std::thread::sleep(Duration::from_secs(4));
    let mut n1 = start_nodes(&ctx, &["n1"]);
    let restarted_at = crate::harness::cron::now_unix();
    let after = wait_for(Duration::from_secs(15), || {
        let r = ctx.results("again");
        r.iter()
            .any(|(t, v)| *t > restarted_at && status(v) == "ok")
            .then_some(r)
    })
    .expect("runs after the restart");
    stop_all(&mut n1);
    let ran = journal::check_ticks(&journal::path_in(&ctx.dir));
    for (t, v) in &after {
        if *t > stopped_at && *t + 1 < restarted_at {
            assert_eq!(status(v), "missed", "tick {t} while conchd was down: {v}");
            assert!(
                !ran.contains_key(&crate::harness::cron::rfc3339(*t)),
                "a past tick ran"
            );
        }
    }
    let missed = after.iter().filter(|(_, v)| status(v) == "missed").count();
    assert!(
        missed >= 1,
        "the gap was not recorded as missed: {after:#?}"
    );
}

#[test]
fn job_output_goes_to_conchds_stderr_prefixed_with_the_job_name() {
    let ctx = Ctx::new("cron-output");
    let mut nodes = start_nodes(&ctx, &["n1"]);
    wait_registered(&ctx, &["n1"], REGISTER);
    ctx.cron([
        "add",
        "greet",
        "--schedule",
        "@yearly",
        "--",
        "sh",
        "-c",
        "echo out-line $CONCH_NAME; echo err-line >&2; echo tick=$CONCH_TICK",
    ])
    .run()
    .expect_code(0);
    ctx.cron(["run", "greet"]).run().expect_code(0);
    let results = ctx.wait_results("greet", 1, Duration::from_secs(10));
    assert_eq!(status(&results[0].1), "ok");
    stop_all(&mut nodes);
    let err = nodes[0].stderr();
    assert!(err.contains("greet: out-line greet"), "{err}");
    assert!(err.contains("greet: err-line"), "{err}");
    let tick = crate::harness::cron::rfc3339(results[0].0);
    assert!(err.contains(&format!("greet: tick={tick}")), "{err}");
    // Output is never stored in etcd (only the job spec holds the command's text).
    for kv in ctx
        .keys()
        .iter()
        .filter(|kv| !kv.key.contains("/v1/cron/job/"))
    {
        assert!(!kv.value.contains("out-line"), "{kv:?}");
    }
}

#[test]
fn sigterm_drains_runs_then_stops_them_writes_results_and_revokes() {
    let ctx = Ctx::new("cron-drain");
    // A run that finishes within the drain: conchd waits for it.
    let mut n1 = ctx.conchd("n1").args(["--drain-timeout", "20s"]).spawn();
    wait_registered(&ctx, &["n1"], REGISTER);
    add(&ctx, "short", "@yearly", &[], &["--run", "1500ms"]);
    ctx.cron(["run", "short"]).run().expect_code(0);
    let j = journal::path_in(&ctx.dir);
    assert!(wait_until(Duration::from_secs(10), || !journal::read(&j).is_empty()));
    n1.signal(Signal::TERM);
    let out = n1.wait_timeout(Duration::from_secs(20));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let r = ctx.results("short");
    assert_eq!(r.len(), 1);
    assert_eq!(status(&r[0].1), "ok", "the run was cut short: {}", r[0].1);
    assert!(journal::read(&j).iter().any(|r| r.event == "end"));
    // Revoked: the node key went with the lease.
    assert!(
        ctx.etcd
            .get_prefix(&format!("{}/v1/node/", ctx.prefix))
            .is_empty()
    );

    // A run that outlasts the drain (and ignores SIGTERM): stopped, recorded killed.
    let mut n1 = ctx.conchd("n1").args(["--drain-timeout", "1s"]).spawn();
    wait_registered(&ctx, &["n1"], REGISTER);
    add(
        &ctx,
        "long",
        "@yearly",
        &[],
        &["--run", "60s", "--ignore-term", "--grandchildren", "1"],
    );
    ctx.cron(["run", "long"]).run().expect_code(0);
    assert!(wait_until(Duration::from_secs(10), || ctx
        .fires("long")
        .len()
        == 1
        && journal::read(&j).iter().any(|r| r.role == "grandchild")));
    let stopped = std::time::Instant::now();
    n1.signal(Signal::TERM);
    let out = n1.wait_timeout(Duration::from_secs(20));
    let took = stopped.elapsed();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // drain 1s + kill-after 1s, plus result and revoke.
    assert!(
        took < Duration::from_secs(6),
        "conchd took {took:?} to stop"
    );
    let r = ctx.results("long");
    assert_eq!(status(&r[0].1), "killed", "{}", r[0].1);
    assert!(
        r[0].1["reason"].as_str().unwrap().contains("drain"),
        "{}",
        r[0].1
    );
    for rec in journal::read(&j) {
        assert!(!alive(rec.pid), "pid {} outlived conchd", rec.pid);
    }
    assert!(
        ctx.etcd
            .get_prefix(&format!("{}/v1/node/", ctx.prefix))
            .is_empty()
    );
}

#[test]
fn retention_keeps_the_newest_hundred_results_and_nothing_older_than_fourteen_days() {
    let ctx = Ctx::new("cron-retention");
    let now = crate::harness::cron::now_unix();
    let key = |kind: &str, t: i64| format!("{}/v1/cron/{kind}/keep/{t:012}", ctx.prefix);
    // 120 results from the last day, and 5 from 15 days ago, as conchd would have written.
    let recent: Vec<i64> = (0..120).map(|i| now - 3600 - i * 60).collect();
    let ancient: Vec<i64> = (0..5).map(|i| now - 15 * 86_400 - i * 60).collect();
    for t in recent.iter().chain(&ancient) {
        let tick = crate::harness::cron::rfc3339(*t);
        ctx.etcd.put(&key("fire", *t), r#"{"node":"old","lease":"","decision":"run","claimed":"2026-01-01T00:00:00.000Z","manual":false}"#);
        ctx.etcd.put(
            &key("result", *t),
            &format!(r#"{{"tick":"{tick}","node":"old","status":"ok","exit":0,"manual":false}}"#),
        );
    }
    let mut nodes = start_nodes(&ctx, &["n1"]);
    wait_registered(&ctx, &["n1"], REGISTER);
    add(&ctx, "keep", "@every 1s", &[], &["--run", "50ms"]);
    // The node's first run of the job prunes its history.
    assert!(
        wait_until(Duration::from_secs(15), || ctx.results("keep").len() <= 100),
        "history not pruned: {} results",
        ctx.results("keep").len()
    );
    stop_all(&mut nodes);
    let results: Vec<i64> = ctx.results("keep").iter().map(|(t, _)| *t).collect();
    let fires: Vec<i64> = ctx.fires("keep").iter().map(|(t, _)| *t).collect();
    let cutoff = now - 14 * 86_400;
    assert!(
        results.iter().chain(&fires).all(|t| *t > cutoff),
        "a tick older than 14 days survived"
    );
    // The oldest of the recent ones went (both keys of a tick), the newest stayed.
    let oldest_kept = *results.iter().min().unwrap();
    assert!(oldest_kept > recent[119], "the oldest result was kept");
    assert!(
        results.contains(&recent[0]),
        "the newest planted result was pruned"
    );
    assert_eq!(
        fires.iter().filter(|t| **t < oldest_kept).count(),
        0,
        "claims older than the kept results remain: {fires:?}"
    );
}
