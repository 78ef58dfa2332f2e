//! The fault suite (quality.md §2): the promise of holds.md, proved with injected faults on a
//! real 3-member etcd cluster. conch talks to every member through a [`FaultProxy`]; the
//! child is `conch-testchild`, which journals `start`/`beat`/`end` on `CLOCK_BOOTTIME`, and
//! the journal checker proves no two holders ran at once.
//!
//! Every test prints what it measured (kill time relative to D, overlap in ms) so a run's
//! output is the report. Timing: `--ttl 4s --kill-after 1s` (P ≈ 0.57 s, D − last renewal
//! ≈ 3.71 s) keeps each scenario to a few seconds.

use std::time::Duration;

use serde_json::Value;

use crate::harness::cluster::Cluster;
use crate::harness::conch::events;
use crate::harness::journal::{self, boot_ms, ms};
use crate::harness::{Ctx, Running, Signal, proc, wait_until};

const TTL: &str = "4s";
const GRACE: &str = "1s";
const GRACE_MS: f64 = 1000.0;
/// The journal's heartbeat: a tree's death is at most this long after its last record.
const BEAT_MS: f64 = 5.0;

/// The first event called `name` (the `message` of conch's JSON log lines).
fn event<'a>(evs: &'a [Value], name: &str) -> Option<&'a Value> {
    evs.iter().find(|e| e["message"] == name)
}

fn num(ev: &Value, field: &str) -> f64 {
    ev[field]
        .as_f64()
        .unwrap_or_else(|| panic!("event without {field}: {ev}"))
}

/// A `conch elect` with the fault suite's timing, JSON logs, pointed at `endpoints`,
/// running `conch-testchild` with `child_args`.
fn holder(
    ctx: &Ctx,
    office: &str,
    node: &str,
    endpoints: &str,
    extra: &[&str],
    child_args: &[&str],
) -> Running {
    let j = journal::path_in(&ctx.dir);
    ctx.elect(office)
        .args(["--ttl", TTL, "--kill-after", GRACE, "--log-format", "json"])
        .args(["--node", node])
        .args(extra)
        .env("CONCH_ENDPOINTS", endpoints)
        .arg("--")
        .arg(journal::testchild())
        .args(["--journal", &j.to_string_lossy()])
        .args(child_args)
        .spawn()
}

/// Wait until the journal shows a process of `node` running; its interval.
fn running(ctx: &Ctx, node: &str, conch: &mut Running) -> journal::Interval {
    let j = journal::path_in(&ctx.dir);
    proc::wait_for(Duration::from_secs(15), || {
        journal::intervals(&journal::read(&j))
            .into_iter()
            .rev()
            .find(|i| i.node == node)
    })
    .unwrap_or_else(|| panic!("{node} never ran\n--- stderr\n{}", conch.stderr()))
}

/// The last record of `rev` in the journal, in boot ms.
fn last_record_ms(ctx: &Ctx, rev: i64) -> f64 {
    let iv = journal::intervals(&journal::read(&journal::path_in(&ctx.dir)));
    ms(iv
        .iter()
        .find(|i| i.rev == rev)
        .expect("rev in journal")
        .last_ns)
}

/// Wait until `n` candidate keys exist for the office (read directly from the cluster).
fn wait_candidates(ctx: &Ctx, cluster: &Cluster, office: &str, n: usize) {
    let prefix = ctx.office_prefix(office);
    assert!(
        wait_until(Duration::from_secs(10), || cluster
            .ctl(["get", "--prefix", "--keys-only", &prefix])
            .map(|o| o.lines().filter(|l| !l.is_empty()).count() == n)
            .unwrap_or(false)),
        "expected {n} candidates under {prefix}"
    );
}

/// Poll the lease until it is gone; returns (last time seen alive, first time seen gone).
fn watch_lease_expiry(cluster: &Cluster, lease: &str, within: Duration) -> (f64, f64) {
    let mut last_alive = boot_ms();
    let gone = proc::wait_for(within, || {
        let t = boot_ms();
        if cluster.lease_alive(lease) {
            last_alive = t;
            None
        } else {
            Some(boot_ms())
        }
    })
    .unwrap_or_else(|| panic!("lease {lease} still alive after {within:?}"));
    (last_alive, gone)
}

/// Sample the lease's remaining TTL (seconds, `None` once gone) until conch exits: `(boot
/// ms when the answer arrived, remaining)` pairs.
fn sample_lease(
    cluster: &Cluster,
    lease: &str,
    conch: &mut Running,
    within: Duration,
) -> Vec<(f64, Option<u64>)> {
    let mut samples = Vec::new();
    let until = std::time::Instant::now() + within;
    while conch.is_running() && std::time::Instant::now() < until {
        let raw = cluster.ctl(["lease", "timetolive", lease]);
        // Stamped when the answer is in: it shows etcd's state as of some moment before.
        let t = boot_ms();
        let remaining = raw.ok().and_then(|o| {
            let r = o.split("remaining(").nth(1)?.split('s').next()?;
            r.parse::<i64>().ok().filter(|r| *r > 0).map(|r| r as u64)
        });
        samples.push((t, remaining));
    }
    samples
}

/// Partition conch ↔ etcd both ways while its child runs: SIGTERM at D − G, the tree dead by
/// D while the lease is still alive on etcd; a contender starts only after expiry.
#[test]
fn partition_kills_before_the_lease_expires() {
    partition_trial("fault-partition", &[]);
}

/// The same with a child and grandchild that ignore SIGTERM: SIGKILL at D, still before the
/// lease expires.
#[test]
fn partition_kills_a_term_ignoring_tree_by_d() {
    partition_trial(
        "fault-partition-stubborn",
        &["--ignore-term", "--grandchildren", "1"],
    );
}

fn partition_trial(name: &str, child_args: &[&str]) {
    let ctx = Ctx::new(name);
    let cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(&ctx, "p", "a", &cluster.endpoints(), &[], child_args);
    let held = running(&ctx, "a", &mut a);
    let mut b = holder(&ctx, "p", "b", &cluster.direct_endpoints(), &[], &[]);
    wait_candidates(&ctx, &cluster, "p", 2);

    for m in &cluster.members {
        m.proxy.blackhole();
    }
    let cut = boot_ms();
    let (last_alive, gone) = watch_lease_expiry(&cluster, &held.lease, Duration::from_secs(10));
    let out = a.wait_timeout(Duration::from_secs(10));
    out.expect_code(70);
    let evs = events(&out.stderr);
    let lost = event(&evs, "lost").expect("a lost event");
    assert_eq!(
        lost["reason"], "no renewal before the hold deadline",
        "{lost}"
    );
    let d = num(lost, "deadline_boot_ms");
    let term = num(event(&evs, "term-sent").expect("term-sent"), "boot_ms");
    let empty = num(event(&evs, "tree-empty").expect("tree-empty"), "boot_ms");
    let last = last_record_ms(&ctx, held.rev);

    // The deadline follows from renewals sent before the cut.
    assert!(
        d <= cut + 3710.0 + 1.0,
        "D {d:.1} later than cut {cut:.1} + span"
    );
    assert!(
        (term - (d - GRACE_MS)).abs() <= 50.0,
        "SIGTERM at D−G{:+.1} ms (allowed ±50)",
        term - (d - GRACE_MS)
    );
    assert!(empty <= d, "tree empty {:.1} ms after D", empty - d);
    assert!(last <= empty, "a record after tree-empty");
    assert!(
        empty < last_alive,
        "the tree must be dead while etcd still has the lease: tree-empty {empty:.1}, lease last seen alive {last_alive:.1}"
    );

    let next = running(&ctx, "b", &mut b);
    assert!(
        ms(next.first_ns) > last_alive,
        "the contender started before the old lease expired"
    );
    let v = journal::check(&journal::path_in(&ctx.dir), 1);
    for m in &cluster.members {
        m.proxy.pass();
    }
    b.signal(Signal::TERM);
    b.wait_timeout(Duration::from_secs(10));
    println!(
        "{name}: SIGTERM at D−G{:+.1} ms, tree empty at D{:+.1} ms, lease gone {:.0}–{:.0} ms after D, \
         successor started {:.0} ms after D, overlap {:.1} ms",
        term - (d - GRACE_MS),
        empty - d,
        last_alive - d,
        gone - d,
        ms(next.first_ns) - d,
        v.max_overlap_ms
    );
    assert_eq!(v.max_overlap_ms, 0.0);
}

/// Only etcd's answers are lost (renewals still arrive and keep the lease alive on etcd),
/// then the answers come late: conch kills by D anyway and a late answer never revives the
/// hold; nothing runs under the old rev afterwards.
#[test]
fn lost_answers_kill_by_d_and_late_answers_revive_nothing() {
    let ctx = Ctx::new("fault-answers");
    let cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(&ctx, "q", "a", &cluster.endpoints(), &[], &[]);
    let held = running(&ctx, "a", &mut a);
    for m in &cluster.members {
        m.proxy.stall_replies();
    }
    let cut = boot_ms();
    // Meanwhile, etcd's own view of the lease, sampled by another client.
    let samples = sample_lease(&cluster, &held.lease, &mut a, Duration::from_secs(10));
    let ended = last_record_ms(&ctx, held.rev);
    assert!(
        ended <= cut + 3710.0 + BEAT_MS,
        "tree ran {:.0} ms after the cut (D is at most 3710 ms after it)",
        ended - cut
    );
    let (t, remaining) = samples
        .iter()
        .rev()
        .find(|(t, _)| *t < ended)
        .copied()
        .expect("a sample before the tree died");
    assert!(
        remaining.is_some_and(|r| r >= 2),
        "renewals still arrive, so etcd keeps the lease alive: at {:.0} ms before the tree died it had {remaining:?} s left",
        ended - t
    );
    // Now the held-back answers arrive, late.
    for m in &cluster.members {
        m.proxy.pass();
    }
    let out = a.wait_timeout(Duration::from_secs(10));
    out.expect_code(70);
    let healed = boot_ms();
    let evs = events(&out.stderr);
    let d = num(event(&evs, "lost").expect("lost"), "deadline_boot_ms");
    assert!(
        event(&evs, "child-start").into_iter().count() == 1,
        "one child only"
    );
    // Nothing of the old rev after D, and nothing at all after the heal.
    let recs = journal::read(&journal::path_in(&ctx.dir));
    assert!(recs.iter().all(|r| ms(r.ns) <= d + BEAT_MS));
    assert!(recs.iter().all(|r| ms(r.ns) < healed));
    println!(
        "answers lost: tree ended {:.0} ms after the cut, D at {:.0} ms after it; late answers revived nothing",
        ended - cut,
        d - cut
    );
}

/// Another client revokes the lease: SIGTERM within P + 100 ms, and with --restart the next
/// run has a higher rev.
#[test]
fn revoke_kills_within_p_and_restart_takes_a_higher_rev() {
    let ctx = Ctx::new("fault-revoke");
    let cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(&ctx, "r", "a", &cluster.endpoints(), &["--restart"], &[]);
    let first = running(&ctx, "a", &mut a);
    let before = boot_ms();
    cluster
        .ctl(["lease", "revoke", &first.lease])
        .expect("revoke");
    let after = boot_ms();
    let second = proc::wait_for(Duration::from_secs(20), || {
        journal::intervals(&journal::read(&journal::path_in(&ctx.dir)))
            .into_iter()
            .find(|i| i.rev > first.rev)
    })
    .expect("--restart never ran the child again");
    let died = last_record_ms(&ctx, first.rev);
    // P ≈ 0.57 s with these flags; the revoke itself (etcdctl) is inside [before, after].
    assert!(
        died - after <= 570.0 + 100.0 + BEAT_MS,
        "tree outlived the revoke by {:.0} ms",
        died - after
    );
    assert!(second.lease != first.lease, "a new lease after the loss");
    journal::check(&journal::path_in(&ctx.dir), 1);
    a.signal(Signal::TERM);
    a.wait_timeout(Duration::from_secs(10));
    println!(
        "revoke: tree dead {:.0} ms after etcdctl returned ({:.0} ms after it started); next rev {} > {}",
        died - after,
        died - before,
        second.rev,
        first.rev
    );
}

/// Another client deletes the own key: SIGTERM within 200 ms.
#[test]
fn own_key_delete_kills_within_200ms() {
    let ctx = Ctx::new("fault-delete");
    let cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(&ctx, "k", "a", &cluster.endpoints(), &[], &[]);
    let held = running(&ctx, "a", &mut a);
    let key = format!("{}{}", ctx.office_prefix("k"), held.lease);
    let before = boot_ms();
    cluster.ctl(["del", &key]).expect("delete");
    let after = boot_ms();
    a.wait_timeout(Duration::from_secs(10)).expect_code(70);
    let died = last_record_ms(&ctx, held.rev);
    assert!(
        died - after <= 200.0,
        "tree outlived the delete by {:.0} ms",
        died - after
    );
    println!(
        "own key deleted: tree dead {:.0} ms after etcdctl returned ({:.0} ms after it started)",
        died - after,
        died - before
    );
}

/// A tree whose child and grandchildren ignore SIGTERM: SIGKILL reaches all of them, and the
/// office is released only after the last one died.
#[test]
fn term_ignoring_tree_is_killed_and_released_after() {
    let ctx = Ctx::new("fault-ignore-term");
    let cluster = Cluster::start(&ctx.dir, 3);
    let pidfile = ctx.path("pids");
    let mut a = holder(
        &ctx,
        "t",
        "a",
        &cluster.endpoints(),
        &[],
        &[
            "--ignore-term",
            "--grandchildren",
            "2",
            "--setsid-grandchild",
            "--pidfile",
            &pidfile.to_string_lossy(),
        ],
    );
    let held = running(&ctx, "a", &mut a);
    let mut b = holder(&ctx, "t", "b", &cluster.direct_endpoints(), &[], &[]);
    wait_candidates(&ctx, &cluster, "t", 2);
    // Wait for all four processes of a's tree to be journaling.
    assert!(wait_until(Duration::from_secs(10), || {
        journal::intervals(&journal::read(&journal::path_in(&ctx.dir)))
            .iter()
            .find(|i| i.rev == held.rev)
            .is_some_and(|i| i.pids.len() == 4)
    }));
    a.signal(Signal::TERM);
    let out = a.wait_timeout(Duration::from_secs(10));
    // The child ignored SIGTERM and was SIGKILLed.
    out.expect_code(137);
    let evs = events(&out.stderr);
    let term = num(event(&evs, "term-sent").unwrap(), "boot_ms");
    let kill = num(event(&evs, "kill-sent").expect("kill-sent"), "boot_ms");
    assert!(
        (kill - term - GRACE_MS).abs() <= 50.0,
        "SIGKILL {:.0} ms after SIGTERM",
        kill - term
    );
    let next = running(&ctx, "b", &mut b);
    let iv = journal::intervals(&journal::read(&journal::path_in(&ctx.dir)));
    let old = iv.iter().find(|i| i.rev == held.rev).unwrap();
    for pid in &old.pids {
        assert!(!proc::alive(*pid), "pid {pid} of the old tree survived");
    }
    assert!(next.first_ns > old.last_ns);
    journal::check(&journal::path_in(&ctx.dir), 1);
    b.signal(Signal::TERM);
    b.wait_timeout(Duration::from_secs(10));
    println!(
        "TERM ignored: SIGKILL {:.0} ms after SIGTERM; successor started {:.1} ms after the old tree's last record",
        kill - term,
        ms(next.first_ns) - ms(old.last_ns)
    );
}

/// The member conch talks to is cut off, one after another: conch moves to another endpoint
/// and the hold survives (same rev, one child throughout).
#[test]
fn member_cut_off_fails_over_and_the_hold_survives() {
    let ctx = Ctx::new("fault-failover");
    let cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(&ctx, "f", "a", &cluster.endpoints(), &[], &[]);
    let held = running(&ctx, "a", &mut a);
    for (i, m) in cluster.members.iter().enumerate() {
        m.proxy.blackhole();
        m.proxy.reset();
        // Two TTLs: without failover the hold would be lost well within this.
        std::thread::sleep(Duration::from_secs(8));
        assert!(
            a.is_running(),
            "conch lost the hold with only member {i} cut off\n{}",
            a.stderr()
        );
        m.proxy.pass();
    }
    let iv = journal::intervals(&journal::read(&journal::path_in(&ctx.dir)));
    assert_eq!(iv.len(), 1, "one holder throughout: {iv:#?}");
    assert_eq!(iv[0].rev, held.rev);
    assert!(cluster.lease_alive(&held.lease));
    a.signal(Signal::TERM);
    a.wait_timeout(Duration::from_secs(10));
    println!(
        "failover: hold survived each of 3 members cut off for 2×TTL (rev {})",
        held.rev
    );
}

/// The etcd leader is killed, then restarted: either the hold survives (renewed before D) or
/// the tree is dead by D; never an overlap with the waiting contender.
#[test]
fn etcd_leader_killed_never_overlaps() {
    leader_fault("fault-leader-kill", "leader killed", |cluster, leader| {
        cluster.kill(leader);
        let new_leader = cluster.wait_leader(Duration::from_secs(15));
        assert_ne!(leader, new_leader);
        // Two TTLs on the reduced cluster, then the member comes back.
        std::thread::sleep(Duration::from_secs(8));
        cluster.restart(leader);
    });
}

/// The etcd leader freezes (SIGSTOP) longer than an election, then wakes up believing it
/// leads — the "stuck old leader". Never an overlap.
#[test]
fn frozen_etcd_leader_never_overlaps() {
    leader_fault(
        "fault-leader-freeze",
        "leader frozen 6 s",
        |cluster, leader| {
            cluster.stop(leader);
            // The freeze itself, longer than an election: not a synchronisation.
            std::thread::sleep(Duration::from_secs(6));
            cluster.cont(leader);
        },
    );
}

/// A holder and a waiting contender; `fault` does something to the etcd leader. Then: the
/// hold survived, or conch lost it and its tree was dead by D; the journal shows no overlap.
fn leader_fault(name: &str, label: &str, fault: impl FnOnce(&mut Cluster, usize)) {
    let ctx = Ctx::new(name);
    let mut cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(&ctx, "l", "a", &cluster.endpoints(), &[], &[]);
    let held = running(&ctx, "a", &mut a);
    let mut b = holder(&ctx, "l", "b", &cluster.endpoints(), &[], &[]);
    wait_candidates(&ctx, &cluster, "l", 2);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    fault(&mut cluster, leader);
    cluster.wait_leader(Duration::from_secs(15));
    let recovered = boot_ms();
    // Judge once the outcome shows: either conch lost the hold and exits, or its tree still
    // beats after D ≤ (a renewal sent before the recovery) + 3710 ms could have passed, which
    // proves a renewal sent after the recovery was answered: the hold survived the fault.
    let survived = proc::wait_for(Duration::from_secs(20), || {
        if !a.is_running() {
            return Some(false);
        }
        (last_record_ms(&ctx, held.rev) > recovered + 3710.0).then_some(true)
    })
    .unwrap_or_else(|| {
        panic!(
            "conch neither exited nor kept its tree running after the fault\n--- stderr\n{}",
            a.stderr()
        )
    });
    if !survived {
        let out = a.wait_timeout(Duration::from_secs(5));
        out.expect_code(70);
        let evs = events(&out.stderr);
        let d = num(event(&evs, "lost").expect("lost"), "deadline_boot_ms");
        let empty = num(event(&evs, "tree-empty").expect("tree-empty"), "boot_ms");
        assert!(empty <= d, "tree empty {:.1} ms after D", empty - d);
    }
    let v = journal::check(&journal::path_in(&ctx.dir), 1);
    for r in [&mut a, &mut b] {
        r.signal(Signal::TERM);
        r.wait_timeout(Duration::from_secs(15));
    }
    let how = if survived {
        "survived"
    } else {
        "lost (tree dead by D) and handed over"
    };
    println!("{label}: hold {how}; overlap {:.1} ms", v.max_overlap_ms);
}

/// The whole cluster is down longer than the TTL, then back: the tree is dead by D; with
/// --restart conch then holds again with a fresh lease and a higher rev.
#[test]
fn whole_cluster_down_then_back() {
    let ctx = Ctx::new("fault-cluster-down");
    let mut cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(&ctx, "w", "a", &cluster.endpoints(), &["--restart"], &[]);
    let first = running(&ctx, "a", &mut a);
    let down = boot_ms();
    cluster.kill_all();
    let died = proc::wait_for(Duration::from_secs(10), || {
        let last = last_record_ms(&ctx, first.rev);
        (boot_ms() - last > 200.0).then_some(last)
    })
    .expect("the tree kept running with etcd down");
    assert!(
        died <= down + 3710.0 + BEAT_MS,
        "tree ran {:.0} ms after etcd went down",
        died - down
    );
    // The outage itself: the cluster stays down longer than the TTL.
    std::thread::sleep(Duration::from_secs(5));
    cluster.restart_all();
    let second = proc::wait_for(Duration::from_secs(60), || {
        journal::intervals(&journal::read(&journal::path_in(&ctx.dir)))
            .into_iter()
            .find(|i| i.rev > first.rev)
    })
    .unwrap_or_else(|| panic!("never held again after etcd came back\n{}", a.stderr()));
    assert_ne!(second.lease, first.lease);
    journal::check(&journal::path_in(&ctx.dir), 1);
    a.signal(Signal::TERM);
    a.wait_timeout(Duration::from_secs(15));
    println!(
        "cluster down: tree dead {:.0} ms after etcd died (D ≤ 3710 ms); held again with rev {} > {}",
        died - down,
        second.rev,
        first.rev
    );
}

/// conch is SIGKILLed while its child has grandchildren, one of which called `setsid` and one
/// was double-forked away: every process of the tree is gone within 1 s (the supervisor
/// process sees conch's end of its socket close and writes `cgroup.kill`).
#[test]
fn conch_sigkilled_takes_the_whole_tree_within_1s() {
    let ctx = Ctx::new("fault-conch-kill");
    let cluster = Cluster::start(&ctx.dir, 3);
    let pidfile = ctx.path("pids");
    let mut a = holder(
        &ctx,
        "c",
        "a",
        &cluster.endpoints(),
        &[],
        &[
            "--grandchildren",
            "1",
            "--setsid-grandchild",
            "--double-fork-grandchild",
            "--pidfile",
            &pidfile.to_string_lossy(),
        ],
    );
    let held = running(&ctx, "a", &mut a);
    // child, grandchild, setsid grandchild and the orphaned double-fork grandchild.
    let tree = proc::wait_for(Duration::from_secs(10), || {
        journal::intervals(&journal::read(&journal::path_in(&ctx.dir)))
            .into_iter()
            .find(|i| i.rev == held.rev && i.pids.len() == 4)
    })
    .expect("the whole tree journaling");
    a.signal(Signal::KILL);
    let killed = boot_ms();
    let gone = wait_until(Duration::from_secs(1), || {
        tree.pids.iter().all(|p| !proc::alive(*p))
    });
    let took = boot_ms() - killed;
    let survivors: Vec<i32> = tree
        .pids
        .iter()
        .copied()
        .filter(|p| proc::alive(*p))
        .collect();
    assert!(
        gone,
        "1 s after conch was SIGKILLed these still live: {survivors:?}"
    );
    println!("conch SIGKILLed: all 4 processes of its tree gone after {took:.0} ms");
}

/// conch is SIGSTOPped for 2×TTL: the tree is dead by D anyway (the supervisor holds D), a
/// contender takes over only after the lease expired, and on SIGCONT conch sees the loss and
/// never runs under the old rev again (with --restart it queues anew with a new lease).
#[test]
fn conch_sigstopped_loses_by_d_and_never_resumes_the_old_rev() {
    let ctx = Ctx::new("fault-conch-stop");
    let cluster = Cluster::start(&ctx.dir, 3);
    let mut a = holder(
        &ctx,
        "s",
        "a",
        &cluster.endpoints(),
        &["--restart"],
        &["--setsid-grandchild"],
    );
    let held = running(&ctx, "a", &mut a);
    let mut b = holder(&ctx, "s", "b", &cluster.direct_endpoints(), &[], &[]);
    wait_candidates(&ctx, &cluster, "s", 2);
    a.signal(Signal::STOP);
    let stopped = boot_ms();
    let (last_alive, _gone) = watch_lease_expiry(&cluster, &held.lease, Duration::from_secs(15));
    let died = last_record_ms(&ctx, held.rev);
    // The last renewal was sent before the stop, so D ≤ stop + TTL·0.99 − δ.
    assert!(
        died <= stopped + 3710.0,
        "the tree of a frozen conch ran {:.0} ms after the stop (D ≤ 3710 ms)",
        died - stopped
    );
    assert!(died < last_alive, "the tree outlived the lease");
    let next = running(&ctx, "b", &mut b);
    assert!(ms(next.first_ns) > last_alive);
    // Keep conch stopped well past its lease's expiry (2×TTL in all): the outage itself.
    std::thread::sleep(Duration::from_secs(4));
    a.signal(Signal::CONT);
    let resumed = boot_ms();
    // conch notices the loss and campaigns again behind b; the old rev never runs again.
    assert!(wait_until(Duration::from_secs(10), || a
        .stderr()
        .contains("\"message\":\"lost\"")));
    let campaigns = |a: &Running| {
        events(&a.stderr())
            .iter()
            .filter(|e| e["message"] == "campaign")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || campaigns(&a) >= 2),
        "conch did not campaign again after the loss\n--- stderr\n{}",
        a.stderr()
    );
    wait_candidates(&ctx, &cluster, "s", 2);
    let old_rev_quiet = || {
        journal::read(&journal::path_in(&ctx.dir))
            .iter()
            .filter(|r| r.rev == Some(held.rev))
            .all(|r| ms(r.ns) < resumed)
    };
    let child_starts = |stderr: &str| {
        events(stderr)
            .iter()
            .filter(|e| e["message"] == "child-start")
            .count()
    };
    assert!(old_rev_quiet(), "the old rev ran again after SIGCONT");
    assert_eq!(
        child_starts(&a.stderr()),
        1,
        "conch started no child while b holds"
    );
    journal::check(&journal::path_in(&ctx.dir), 1);
    for r in [&mut a, &mut b] {
        r.signal(Signal::TERM);
        r.wait_timeout(Duration::from_secs(15));
    }
    // And not up to the end either: a, still queued behind b, exited first.
    assert!(old_rev_quiet(), "the old rev ran again after SIGCONT");
    assert_eq!(
        child_starts(&a.stderr()),
        1,
        "conch started no child while b holds"
    );
    journal::check(&journal::path_in(&ctx.dir), 1);
    println!(
        "conch SIGSTOPped: tree dead {:.0} ms after the stop (D ≤ 3710 ms), lease last seen alive {:.0} ms after; \
         successor started {:.0} ms after the stop",
        died - stopped,
        last_alive - stopped,
        ms(next.first_ns) - stopped
    );
}

/// The checker is not a rubber stamp: with the deadline kill switched off (a debug-build-only
/// test switch), a partitioned holder keeps running after its lease expired, a contender
/// starts, and the checker must report the overlap.
#[test]
fn checker_catches_overlap_when_the_deadline_kill_is_disabled() {
    let ctx = Ctx::new("fault-checker");
    let cluster = Cluster::start(&ctx.dir, 3);
    let j = journal::path_in(&ctx.dir);
    let mut a = ctx
        .elect("o")
        .args(["--ttl", TTL, "--kill-after", GRACE, "--node", "a"])
        .env("CONCH_ENDPOINTS", cluster.endpoints())
        .env("CONCH_TEST_UNSAFE_NO_DEADLINE_KILL", "1")
        .arg("--")
        .arg(journal::testchild())
        .args(["--journal", &j.to_string_lossy()])
        .spawn();
    running(&ctx, "a", &mut a);
    let mut b = holder(&ctx, "o", "b", &cluster.direct_endpoints(), &[], &[]);
    wait_candidates(&ctx, &cluster, "o", 2);
    for m in &cluster.members {
        m.proxy.blackhole();
    }
    // The lease expires, b takes over, and a's tree (unkilled) keeps beating.
    running(&ctx, "b", &mut b);
    assert!(wait_until(Duration::from_secs(5), || {
        let iv = journal::intervals(&journal::read(&j));
        iv.len() == 2 && iv[0].last_ns > iv[1].first_ns + 100_000_000
    }));
    let verdict = std::panic::catch_unwind(|| journal::check(&j, 1));
    assert!(verdict.is_err(), "the checker missed a 100 ms overlap");
    for r in [&mut a, &mut b] {
        r.signal(Signal::KILL);
        r.wait_timeout(Duration::from_secs(10));
    }
    println!("checker: overlap with the deadline kill disabled was caught");
}
