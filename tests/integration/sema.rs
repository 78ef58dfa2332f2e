//! `conch sema`: a counting semaphore (primitives.md "sema", cli.md, quality.md §2 and §4).
//!
//! Written from the spec. Every participant is a real `conch sema` against the real etcd;
//! the tests read etcd with `etcdctl` and judge concurrency from the journal of
//! `conch-testchild` (at most N trees at once, FIFO by create revision) or from marker files
//! that the children write.
//!
//! Keys: `<prefix>/v1/sema/<name>/<max>[-spread]/<lease-hex>`, value = holder record (whose
//! `pid` is conch's own pid, which is how a test finds the key of the conch it started).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::cluster::Cluster;
use crate::harness::conch::events;
use crate::harness::journal::{self, boot_ms, ms};
use crate::harness::{self, Conch, Ctx, Kv, Running, Signal, proc, wait_for, wait_until};

/// Bound on anything that should happen "soon" (a child starting, conch exiting).
const SOON: Duration = Duration::from_secs(10);
/// Promotion target (primitives.md: a release promotes the next waiter within 200 ms).
const PROMOTION_MS: f64 = 200.0;
/// Fault timing, as in the fault suite: D − last renewal ≈ 3.71 s.
const TTL: &str = "4s";
const GRACE: &str = "1s";
const GRACE_MS: f64 = 1000.0;

// ---------------------------------------------------------------------------------------
// Keys in etcd

/// `<prefix>/v1/sema/<name>/`
fn sema_dir(ctx: &Ctx, name: &str) -> String {
    format!("{}/v1/sema/{name}/", ctx.prefix)
}

/// One participant's key as read from etcd.
#[derive(Debug, Clone)]
struct Part {
    key: String,
    /// The `<max>` segment: `3` or `3-spread`.
    seg: String,
    /// The key's last segment, parsed as hex.
    key_lease: u64,
    /// The lease the key is bound to in etcd.
    lease: u64,
    rev: i64,
    /// The holder record's `pid` (conch's own pid) and `node`.
    pid: Option<i64>,
    node: Option<String>,
}

fn parse_parts(kvs: Vec<Kv>, dir: &str) -> Vec<Part> {
    let mut v: Vec<Part> = kvs
        .into_iter()
        .map(|kv| {
            let rest = kv
                .key
                .strip_prefix(dir)
                .unwrap_or_else(|| panic!("{} is not under {dir}", kv.key));
            let (seg, lease_hex) = rest
                .split_once('/')
                .unwrap_or_else(|| panic!("sema key {} is not <max>/<lease-hex>", kv.key));
            let key_lease = u64::from_str_radix(lease_hex, 16)
                .unwrap_or_else(|_| panic!("sema key {} does not end in a hex lease", kv.key));
            let rec: Option<Value> = serde_json::from_str(&kv.value).ok();
            Part {
                key: kv.key.clone(),
                seg: seg.to_string(),
                key_lease,
                lease: kv.lease,
                rev: kv.create_revision,
                pid: rec.as_ref().and_then(|r| r["pid"].as_i64()),
                node: rec
                    .as_ref()
                    .and_then(|r| r["node"].as_str().map(str::to_string)),
            }
        })
        .collect();
    v.sort_by_key(|p| p.rev);
    v
}

/// Every participant of semaphore `name`, in create-revision order.
fn parts(ctx: &Ctx, name: &str) -> Vec<Part> {
    let dir = sema_dir(ctx, name);
    parse_parts(ctx.etcd.get_prefix(&dir), &dir)
}

/// The key of the conch with this pid, if it has one.
fn part_of(ctx: &Ctx, name: &str, pid: i32) -> Option<Part> {
    parts(ctx, name)
        .into_iter()
        .find(|p| p.pid == Some(i64::from(pid)))
}

/// Waits until the conch has its key in etcd (it queued or holds); returns the key.
#[track_caller]
fn wait_part(ctx: &Ctx, name: &str, conch: &mut Running) -> Part {
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(p) = part_of(ctx, name, conch.pid()) {
            return p;
        }
        if let Some(out) = conch.try_wait() {
            panic!(
                "conch exited {:?} before its key appeared\n--- stderr\n{}",
                out.code, out.stderr
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "conch (pid {}) wrote no key under {} within {SOON:?}: {:?}\n--- stderr\n{}",
                conch.pid(),
                sema_dir(ctx, name),
                parts(ctx, name),
                conch.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim(), 16).unwrap_or_else(|_| panic!("not a hex lease id: {s:?}"))
}

fn sema(ctx: &Ctx, name: &str) -> Conch {
    ctx.conch().args(["sema", name])
}

// ---------------------------------------------------------------------------------------
// Participants whose child is a shell script: it writes what it saw, then waits for a
// release marker.

/// What a child saw in its environment.
#[derive(Debug, Clone)]
struct Env {
    name: String,
    rev: i64,
    key: String,
    lease: String,
    node: String,
}

/// `conch sema <name> --max <max> <flags> -- sh -c '<write {label}.env; wait for {label}.release>'`
fn sh_participant(ctx: &Ctx, label: &str, name: &str, max: &str, flags: &[&str]) -> Running {
    let script = format!(
        "printf '%s\\n' \"$CONCH_NAME\" \"$CONCH_REV\" \"$CONCH_KEY\" \"$CONCH_LEASE\" \
         \"$CONCH_NODE\" > {{dir}}/{label}.tmp; mv {{dir}}/{label}.tmp {{dir}}/{label}.env; \
         until [ -e {{dir}}/{label}.release ]; do sleep 0.02; done"
    );
    sema(ctx, name)
        .args(["--max", max])
        .args(flags)
        .arg("--")
        .args(ctx.sh(&script))
        .spawn()
}

/// The environment the child of `label` wrote, once it runs.
fn env_of(ctx: &Ctx, label: &str) -> Option<Env> {
    let text = ctx.read(&format!("{label}.env"))?;
    let f: Vec<&str> = text.lines().collect();
    assert_eq!(f.len(), 5, "child environment incomplete: {text:?}");
    Some(Env {
        name: f[0].to_string(),
        rev: f[1]
            .parse()
            .unwrap_or_else(|_| panic!("CONCH_REV is not decimal: {:?}", f[1])),
        key: f[2].to_string(),
        lease: f[3].to_string(),
        node: f[4].to_string(),
    })
}

/// Waits until the child of `label` runs; returns what it saw.
#[track_caller]
fn wait_env(ctx: &Ctx, label: &str, conch: &mut Running) -> Env {
    ctx.wait_file_of(&format!("{label}.env"), SOON, conch);
    env_of(ctx, label).expect("env file")
}

fn release(ctx: &Ctx, label: &str) {
    ctx.touch(&format!("{label}.release"));
}

/// Polls for `d`: the child of `label` must not start meanwhile (a negative check with a
/// bound, not a synchronisation).
#[track_caller]
fn stays_waiting(ctx: &Ctx, label: &str, d: Duration, why: &str) {
    let started = wait_until(d, || env_of(ctx, label).is_some());
    assert!(!started, "{label} ran: {why}");
}

// ---------------------------------------------------------------------------------------
// Participants whose child is conch-testchild (journaled); stopped by SIGTERM to the child.

fn journaled(ctx: &Ctx, label: &str, name: &str, max: usize, flags: &[&str]) -> Conch {
    let j = journal::path_in(&ctx.dir);
    sema(ctx, name)
        .args(["--max", &max.to_string()])
        .args(flags)
        .arg("--")
        .arg(journal::testchild())
        .args(["--journal", &j.to_string_lossy()])
        .args(["--pidfile", &pidfile(ctx, label).to_string_lossy()])
}

fn pidfile(ctx: &Ctx, label: &str) -> PathBuf {
    ctx.path(&format!("{label}.pid"))
}

/// The pid of the running child of `label`, once its testchild wrote its pidfile.
fn child_pid(ctx: &Ctx, label: &str) -> Option<i32> {
    proc::read_pid(&pidfile(ctx, label))
}

#[track_caller]
fn wait_child(ctx: &Ctx, label: &str, conch: &mut Running) -> i32 {
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(pid) = child_pid(ctx, label) {
            return pid;
        }
        if let Some(out) = conch.try_wait() {
            panic!(
                "{label}: conch exited {:?} before its child ran\n--- stderr\n{}",
                out.code, out.stderr
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "{label}: child not running after {SOON:?}\n--- stderr\n{}",
                conch.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The journal interval of the process `pid` (a child's own records).
fn interval_of(ctx: &Ctx, pid: i32) -> Option<journal::Interval> {
    journal::intervals(&journal::read(&journal::path_in(&ctx.dir)))
        .into_iter()
        .find(|i| i.pids.contains(&pid))
}

fn event_ms(evs: &[Value], name: &str, field: &str) -> f64 {
    evs.iter()
        .find(|e| e["message"] == name)
        .and_then(|e| e[field].as_f64())
        .unwrap_or_else(|| panic!("no {name} event with {field} in {evs:#?}"))
}

// ---------------------------------------------------------------------------------------
// Basics

#[test]
fn child_sees_its_key_rev_lease_name_and_node() {
    let ctx = Ctx::new("sema-env");
    let mut a = sh_participant(&ctx, "a", "envs", "3", &["--node", "n1"]);
    let env = wait_env(&ctx, "a", &mut a);
    let ps = parts(&ctx, "envs");
    assert_eq!(ps.len(), 1, "one key per participant: {ps:?}");
    let p = &ps[0];
    assert_eq!(p.seg, "3", "the <max> segment of {}", p.key);
    assert_eq!(env.name, "envs", "CONCH_NAME");
    assert_eq!(env.node, "n1", "CONCH_NODE");
    assert_eq!(env.key, p.key, "CONCH_KEY is the own key in etcd");
    assert_eq!(env.rev, p.rev, "CONCH_REV is the own key's create revision");
    assert_eq!(hex(&env.lease), p.lease, "CONCH_LEASE is the key's lease");
    assert_eq!(p.key_lease, p.lease, "the key ends in its lease id in hex");
    assert_eq!(p.pid, Some(i64::from(a.pid())), "holder record pid");
    assert_eq!(p.node.as_deref(), Some("n1"), "holder record node");
    release(&ctx, "a");
    a.wait_timeout(SOON).expect_code(0);
    assert!(parts(&ctx, "envs").is_empty(), "released after the child");
}

/// N+1 contenders with `--max 2`: exactly two children run at once; the third starts only
/// after one of them ended; all complete.
#[test]
fn n_plus_one_contenders_run_n_at_once_and_all_complete() {
    let ctx = Ctx::new("sema-n-plus-one");
    let n = 2;
    // Every child runs until the test creates `stop`, so the look below never depends on
    // how long starting the contenders took.
    let stop = ctx.path("stop");
    let mut cs: Vec<Running> = Vec::new();
    for i in 0..=n {
        let mut c = journaled(&ctx, &format!("c{i}"), "np1", n, &[])
            .args(["--until-file", &stop.to_string_lossy()])
            .spawn();
        wait_part(&ctx, "np1", &mut c);
        cs.push(c);
    }
    for (i, c) in cs.iter_mut().enumerate().take(n) {
        wait_child(&ctx, &format!("c{i}"), c);
    }
    let j = journal::path_in(&ctx.dir);
    // For a second while both holders run, the third must not start.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        assert!(
            child_pid(&ctx, &format!("c{n}")).is_none(),
            "the third contender's child started while {n} ran"
        );
        let running = journal::intervals(&journal::read(&j)).len();
        assert_eq!(running, n, "{running} children run with --max {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(parts(&ctx, "np1").len(), n + 1, "the third one queued");
    std::fs::write(&stop, "").unwrap();
    for c in &mut cs {
        c.wait_timeout(Duration::from_secs(30)).expect_code(0);
    }
    let v = journal::check(&j, n);
    assert_eq!(v.intervals.len(), n + 1, "every contender ran: {v:#?}");
    assert_eq!(v.max_concurrent, n, "{n} ran at once");
    let third = interval_of(&ctx, child_pid(&ctx, &format!("c{n}")).unwrap()).unwrap();
    let first_end = v
        .intervals
        .iter()
        .filter(|i| i.rev != third.rev)
        .map(|i| i.last_ns)
        .min()
        .unwrap();
    assert!(
        third.first_ns >= first_end,
        "the third started {:.1} ms before a holder ended",
        ms(first_end) - ms(third.first_ns)
    );
    assert!(parts(&ctx, "np1").is_empty(), "all released");
}

// ---------------------------------------------------------------------------------------
// Promotion: random releases, FIFO, 200 ms

#[test]
fn random_releases_n2() {
    random_releases(2);
}

#[test]
fn random_releases_n3() {
    random_releases(3);
}

#[test]
fn random_releases_n5() {
    random_releases(5);
}

/// N + 4 contenders queue in a known order; holders are released one at a time in random
/// order (every other release the newest holder). Each release must promote exactly the
/// oldest waiter within 200 ms; never more than N at once; every waiter is served.
fn random_releases(n: usize) {
    let ctx = Ctx::new(&format!("sema-fifo-{n}"));
    let name = "fifo";
    let seed = std::env::var("CONCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("sema N={n}: seed {seed} (CONCH_SEED to repeat)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = n + 4;
    let label = |i: usize| format!("c{i}");
    let mut cs: Vec<Running> = Vec::new();
    let mut revs: Vec<i64> = Vec::new();
    // One at a time, each queued before the next starts: queue order = index order.
    for i in 0..total {
        let mut c = journaled(&ctx, &label(i), name, n, &[]).spawn();
        revs.push(wait_part(&ctx, name, &mut c).rev);
        cs.push(c);
    }
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    for (i, c) in cs.iter_mut().enumerate().take(n) {
        wait_child(&ctx, &label(i), c);
    }
    for i in n..total {
        assert!(
            child_pid(&ctx, &label(i)).is_none(),
            "waiter {i} runs while {n} hold"
        );
    }

    let mut holders: Vec<usize> = (0..n).collect();
    let mut latencies: Vec<(usize, usize, f64)> = Vec::new();
    for (round, waiter) in (n..total).enumerate() {
        let pick = if round % 2 == 0 {
            // The newest holder: the one with the highest rev.
            (0..holders.len())
                .max_by_key(|&k| revs[holders[k]])
                .unwrap()
        } else {
            rng.usize(..holders.len())
        };
        let h = holders.remove(pick);
        let pid = child_pid(&ctx, &label(h)).expect("holder's child pid");
        let t0 = boot_ms();
        proc::signal(pid, Signal::TERM);
        let started = wait_for(SOON, || {
            (waiter..total).find(|&w| child_pid(&ctx, &label(w)).is_some())
        })
        .unwrap_or_else(|| {
            panic!(
                "release of c{h} promoted nobody within {SOON:?}; keys {:?}\n--- stderr of c{waiter}\n{}",
                parts(&ctx, name),
                cs[waiter].stderr()
            )
        });
        assert_eq!(
            started, waiter,
            "FIFO by rev: c{started} (rev {}) started before c{waiter} (rev {})",
            revs[started], revs[waiter]
        );
        let child = child_pid(&ctx, &label(waiter)).unwrap();
        let iv = wait_for(SOON, || interval_of(&ctx, child)).expect("journal start");
        assert_eq!(
            iv.rev, revs[waiter],
            "CONCH_REV of c{waiter} is its key's create revision"
        );
        latencies.push((h, waiter, ms(iv.first_ns) - t0));
        cs[h].wait_timeout(SOON).expect_code(143);
        holders.push(waiter);
    }
    for h in holders {
        let pid = child_pid(&ctx, &label(h)).expect("holder's child pid");
        proc::signal(pid, Signal::TERM);
        cs[h].wait_timeout(SOON).expect_code(143);
    }
    let v = journal::check(&journal::path_in(&ctx.dir), n);
    assert_eq!(v.intervals.len(), total, "every contender ran");
    // FIFO over the whole run: after the first N, children started in rev order.
    let order: Vec<i64> = v.intervals.iter().skip(n).map(|i| i.rev).collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "waiters started out of rev order: {order:?}"
    );
    let text: Vec<String> = latencies
        .iter()
        .map(|(h, w, l)| format!("c{h}→c{w} {l:.1} ms"))
        .collect();
    println!(
        "sema N={n}: release → next child start: {}; max concurrent {}",
        text.join(", "),
        v.max_concurrent
    );
    for (h, w, l) in &latencies {
        assert!(
            *l <= PROMOTION_MS,
            "N={n}: c{w} started {l:.1} ms after c{h} was released (target {PROMOTION_MS} ms); all: {text:?}"
        );
    }
    assert!(parts(&ctx, name).is_empty(), "all released");
}

// ---------------------------------------------------------------------------------------
// --nonblock and --wait

#[test]
fn nonblock_when_full_exits_75_within_1s_and_leaves_no_key() {
    let ctx = Ctx::new("sema-nonblock-full");
    let mut a = sh_participant(&ctx, "a", "nb", "2", &[]);
    wait_env(&ctx, "a", &mut a);
    let mut b = sh_participant(&ctx, "b", "nb", "2", &[]);
    wait_env(&ctx, "b", &mut b);
    let before: Vec<String> = parts(&ctx, "nb").into_iter().map(|p| p.key).collect();
    for flags in [&["--nonblock"][..], &["--wait", "0"][..]] {
        let out = sema(&ctx, "nb")
            .args(["--max", "2"])
            .args(flags)
            .arg("--")
            .args(ctx.sh("echo ran > {dir}/ran"))
            .run();
        out.expect_code(75);
        assert!(
            out.elapsed < Duration::from_secs(1),
            "{flags:?} when full took {:?}",
            out.elapsed
        );
        assert!(ctx.read("ran").is_none(), "{flags:?} ran the child");
        let after: Vec<String> = parts(&ctx, "nb").into_iter().map(|p| p.key).collect();
        assert_eq!(after, before, "{flags:?} left a key behind");
    }
    assert!(a.is_running() && b.is_running(), "holders unaffected");
    release(&ctx, "a");
    release(&ctx, "b");
    a.wait_timeout(SOON).expect_code(0);
    b.wait_timeout(SOON).expect_code(0);
}

#[test]
fn nonblock_when_not_full_runs_at_once() {
    let ctx = Ctx::new("sema-nonblock-free");
    let mut a = sh_participant(&ctx, "a", "nb", "2", &[]);
    wait_env(&ctx, "a", &mut a);
    let out = sema(&ctx, "nb")
        .args(["--max", "2", "--nonblock", "--"])
        .args(ctx.sh("echo \"$CONCH_NAME\" > {dir}/ran"))
        .run();
    out.expect_code(0);
    assert_eq!(ctx.read("ran").as_deref(), Some("nb\n"));
    let left = parts(&ctx, "nb");
    assert_eq!(left.len(), 1, "only the holder's key remains: {left:?}");
    assert_eq!(left[0].pid, Some(i64::from(a.pid())));
    release(&ctx, "a");
    a.wait_timeout(SOON).expect_code(0);
}

#[test]
fn wait_expiry_exits_75_after_the_duration_and_removes_its_key() {
    let ctx = Ctx::new("sema-wait");
    let mut a = sh_participant(&ctx, "a", "wt", "1", &[]);
    wait_env(&ctx, "a", &mut a);
    let mut w = sema(&ctx, "wt")
        .args(["--max", "1", "--wait", "1s", "--"])
        .args(ctx.sh("echo ran > {dir}/ran"))
        .spawn();
    // It queues (a key of its own) while it waits.
    let queued = wait_part(&ctx, "wt", &mut w);
    let out = w.wait_timeout(SOON);
    out.expect_code(75);
    println!("sema --wait 1s gave up after {:?}", out.elapsed);
    assert!(
        out.elapsed >= Duration::from_millis(900) && out.elapsed < Duration::from_secs(3),
        "--wait 1s gave up after {:?}",
        out.elapsed
    );
    assert!(ctx.read("ran").is_none(), "ran the child");
    let left = parts(&ctx, "wt");
    assert!(
        left.iter().all(|p| p.key != queued.key),
        "the waiter's key {} is still there: {left:?}",
        queued.key
    );
    assert_eq!(left.len(), 1, "only the holder's key: {left:?}");
    assert!(a.is_running(), "holder unaffected");
    release(&ctx, "a");
    a.wait_timeout(SOON).expect_code(0);
}

// ---------------------------------------------------------------------------------------
// Capacity agreement

/// A participant disagreeing with the live ones is refused (64, the live value named), writes
/// no key, and leaves the holder alone.
#[track_caller]
fn refused_disagreement(ctx: &Ctx, name: &str, flags: &[&str], names: &str, holder: &Part) {
    let out = sema(ctx, name)
        .args(flags)
        .arg("--")
        .args(ctx.sh("echo ran > {dir}/ran"))
        .run();
    out.expect_code(64);
    assert!(
        out.stderr.contains(names),
        "{flags:?}: stderr should name the live value {names:?}:\n{}",
        out.stderr
    );
    assert!(ctx.read("ran").is_none(), "{flags:?} ran the child");
    let left = parts(ctx, name);
    assert_eq!(left.len(), 1, "{flags:?} wrote a key: {left:?}");
    assert_eq!(left[0].key, holder.key, "holder's key intact");
    assert_eq!(left[0].rev, holder.rev, "holder's key not re-created");
    assert_eq!(left[0].lease, holder.lease, "holder's lease unchanged");
}

#[test]
fn mismatched_max_is_refused_and_a_new_max_is_accepted_once_empty() {
    let ctx = Ctx::new("sema-mismatch-max");
    let mut a = sh_participant(&ctx, "a", "mm", "3", &[]);
    wait_env(&ctx, "a", &mut a);
    let holder = part_of(&ctx, "mm", a.pid()).expect("holder key");
    refused_disagreement(&ctx, "mm", &["--max", "2"], "--max 3", &holder);
    // Also when it would only queue, and with --nonblock.
    refused_disagreement(
        &ctx,
        "mm",
        &["--max", "4", "--nonblock"],
        "--max 3",
        &holder,
    );
    assert!(a.is_running(), "holder unaffected");
    assert!(ctx.read("a.env").is_some(), "holder's child still running");
    release(&ctx, "a");
    a.wait_timeout(SOON).expect_code(0);
    assert!(parts(&ctx, "mm").is_empty());
    // Empty again: a new value is accepted.
    sema(&ctx, "mm")
        .args(["--max", "2", "--"])
        .args(ctx.sh("echo ran > {dir}/ran"))
        .run()
        .expect_code(0);
    assert_eq!(ctx.read("ran").as_deref(), Some("ran\n"));
}

#[test]
fn mismatched_spread_is_refused_both_ways() {
    let ctx = Ctx::new("sema-mismatch-spread");
    let mut a = sh_participant(&ctx, "a", "ms", "3", &["--spread", "--node", "n1"]);
    wait_env(&ctx, "a", &mut a);
    let holder = part_of(&ctx, "ms", a.pid()).expect("holder key");
    assert_eq!(holder.seg, "3-spread", "key {}", holder.key);
    refused_disagreement(
        &ctx,
        "ms",
        &["--max", "3", "--node", "n2"],
        "spread",
        &holder,
    );
    assert!(a.is_running(), "holder unaffected");
    release(&ctx, "a");
    a.wait_timeout(SOON).expect_code(0);

    // The other way round: live participants without --spread refuse one with it.
    let mut b = sh_participant(&ctx, "b", "ms", "3", &["--node", "n1"]);
    wait_env(&ctx, "b", &mut b);
    let holder = part_of(&ctx, "ms", b.pid()).expect("holder key");
    assert_eq!(holder.seg, "3", "key {}", holder.key);
    refused_disagreement(
        &ctx,
        "ms",
        &["--max", "3", "--spread", "--node", "n2"],
        "spread",
        &holder,
    );
    assert!(b.is_running(), "holder unaffected");
    release(&ctx, "b");
    b.wait_timeout(SOON).expect_code(0);
}

// ---------------------------------------------------------------------------------------
// --spread

/// `--max 2 --spread` over nodes n1, n2, n3: a second n1 process waits although a slot is
/// free; an n2 process takes the free slot; an n3 process waits (full); releasing n1's holder
/// promotes the queued n1 process (first in line), releasing n2's promotes n3's.
#[test]
fn spread_allows_one_slot_per_node() {
    let ctx = Ctx::new("sema-spread");
    let flags = |node: &'static str| ["--spread", "--node", node];
    let mut a = sh_participant(&ctx, "a", "sp", "2", &flags("n1"));
    let ea = wait_env(&ctx, "a", &mut a);
    assert_eq!(ea.node, "n1");
    let mut b = sh_participant(&ctx, "b", "sp", "2", &flags("n1"));
    let pb = wait_part(&ctx, "sp", &mut b);
    assert_eq!(pb.seg, "2-spread", "key {}", pb.key);
    stays_waiting(
        &ctx,
        "b",
        Duration::from_millis(500),
        "a second process on n1 must wait although a slot is free",
    );
    let mut c = sh_participant(&ctx, "c", "sp", "2", &flags("n2"));
    let ec = wait_env(&ctx, "c", &mut c);
    assert_eq!(ec.node, "n2");
    assert!(env_of(&ctx, "b").is_none(), "b ran with n1 held");
    let mut d = sh_participant(&ctx, "d", "sp", "2", &flags("n3"));
    wait_part(&ctx, "sp", &mut d);
    stays_waiting(&ctx, "d", Duration::from_millis(300), "both slots are held");

    release(&ctx, "a");
    let eb = wait_env(&ctx, "b", &mut b);
    assert_eq!(eb.node, "n1");
    assert!(eb.rev > ea.rev);
    a.wait_timeout(SOON).expect_code(0);
    assert!(
        env_of(&ctx, "d").is_none(),
        "d (n3) ran: the freed slot belongs to b, first in line"
    );
    release(&ctx, "c");
    let ed = wait_env(&ctx, "d", &mut d);
    assert_eq!(ed.node, "n3");
    c.wait_timeout(SOON).expect_code(0);
    for (l, r) in [("b", &mut b), ("d", &mut d)] {
        release(&ctx, l);
        r.wait_timeout(SOON).expect_code(0);
    }
    assert!(parts(&ctx, "sp").is_empty());
}

// ---------------------------------------------------------------------------------------
// A waiter's lease revoked while it is queued

/// W queues behind two holders, X behind W. W's lease is revoked, then a holder is released:
/// X must get the slot (W's old position is gone), and W never runs under the revoked lease
/// or its old rev: it queues again with a new key and lease (behind X), or exits 75.
#[test]
fn waiter_whose_lease_is_revoked_never_runs_on_its_stale_position() {
    let ctx = Ctx::new("sema-waiter-revoke");
    let name = "wr";
    let mut h1 = sh_participant(&ctx, "h1", name, "2", &[]);
    wait_env(&ctx, "h1", &mut h1);
    let mut h2 = sh_participant(&ctx, "h2", name, "2", &[]);
    wait_env(&ctx, "h2", &mut h2);
    let mut w = sh_participant(&ctx, "w", name, "2", &[]);
    let stale = wait_part(&ctx, name, &mut w);
    let mut x = sh_participant(&ctx, "x", name, "2", &[]);
    let px = wait_part(&ctx, name, &mut x);
    assert!(stale.rev < px.rev);

    ctx.etcd.revoke(&format!("{:x}", stale.lease));
    release(&ctx, "h1");
    let ex = wait_env(&ctx, "x", &mut x);
    assert_eq!(ex.rev, px.rev);
    h1.wait_timeout(SOON).expect_code(0);
    if let Some(ew) = env_of(&ctx, "w") {
        panic!("w ran instead of x after its lease was revoked: {ew:?}");
    }

    // W either gave up (75) or queued again with a new lease and key.
    let requeued = wait_for(SOON, || {
        if let Some(out) = w.try_wait() {
            return Some(Err(out));
        }
        part_of(&ctx, name, w.pid())
            .filter(|p| p.lease != stale.lease)
            .map(Ok)
    })
    .unwrap_or_else(|| {
        panic!(
            "w neither exited nor queued with a new lease: {:?}\n--- stderr\n{}",
            parts(&ctx, name),
            w.stderr()
        )
    });
    match requeued {
        Err(out) => {
            out.expect_code(75);
            assert!(env_of(&ctx, "w").is_none(), "w ran");
            println!("revoked waiter exited 75");
        }
        Ok(p) => {
            assert_ne!(p.key, stale.key, "a new key");
            assert!(p.rev > px.rev, "w re-enters at the back, behind x");
            release(&ctx, "h2");
            let ew = wait_env(&ctx, "w", &mut w);
            assert_ne!(hex(&ew.lease), stale.lease, "w ran under the revoked lease");
            assert_eq!(ew.rev, p.rev, "w runs under its new key");
            assert_eq!(ew.key, p.key);
            release(&ctx, "w");
            w.wait_timeout(SOON).expect_code(0);
            h2.wait_timeout(SOON).expect_code(0);
            println!("revoked waiter re-queued with rev {} > {}", p.rev, px.rev);
        }
    }
    if let Some(ew) = env_of(&ctx, "w") {
        assert_ne!(hex(&ew.lease), stale.lease, "w ran under the revoked lease");
        assert_ne!(ew.rev, stale.rev, "w ran on its stale rev");
    }
    release(&ctx, "x");
    release(&ctx, "h2");
    x.wait_timeout(SOON).expect_code(0);
    h2.wait_timeout(SOON).expect_code(0);
}

/// A waiter whose own key is deleted by hand (its lease still alive) never runs on it: the
/// read that would find a free slot also finds the key gone, so it queues again with a new
/// lease and key and runs only under those.
#[test]
fn waiter_whose_key_is_deleted_runs_only_under_a_new_key() {
    let ctx = Ctx::new("sema-waiter-key-deleted");
    let name = "wd";
    let mut h = sh_participant(&ctx, "h", name, "1", &[]);
    wait_env(&ctx, "h", &mut h);
    let mut w = sh_participant(&ctx, "w", name, "1", &[]);
    let deleted = wait_part(&ctx, name, &mut w);
    ctx.etcd.del(&deleted.key);
    release(&ctx, "h");
    h.wait_timeout(SOON).expect_code(0);
    let ew = wait_env(&ctx, "w", &mut w);
    assert_ne!(
        ew.key,
        deleted.key,
        "w ran on a key deleted while it waited\n{}",
        w.stderr()
    );
    assert_ne!(
        hex(&ew.lease),
        deleted.lease,
        "w queued again with a new lease"
    );
    assert!(
        ew.rev > deleted.rev,
        "a new token: {} > {}",
        ew.rev,
        deleted.rev
    );
    let now = part_of(&ctx, name, w.pid()).expect("w's key exists while it runs");
    assert_eq!(now.key, ew.key, "the key w runs under is in etcd");
    release(&ctx, "w");
    w.wait_timeout(SOON).expect_code(0);
}

// ---------------------------------------------------------------------------------------
// A partitioned holder

/// Wait until `n` keys exist under the semaphore (read directly from the cluster).
fn wait_cluster_keys(cluster: &Cluster, dir: &str, n: usize) {
    assert!(
        wait_until(SOON, || cluster
            .ctl(["get", "--prefix", "--keys-only", dir])
            .map(|o| o.lines().filter(|l| !l.trim().is_empty()).count() == n)
            .unwrap_or(false)),
        "expected {n} keys under {dir}: {:?}",
        cluster.ctl(["get", "--prefix", "--keys-only", dir])
    );
}

/// Holder A (through the fault proxies) and holder B share `--max 2`; C waits. A is cut off
/// from etcd: its tree is dead by D, while the lease is still alive; C gets the slot only
/// after A's lease expired; B keeps running; never more than 2 at once.
#[test]
fn partitioned_holder_dies_by_d_and_its_slot_moves_only_after_expiry() {
    let ctx = Ctx::new("sema-partition");
    let cluster = Cluster::start(&ctx.dir, 3);
    let name = "pt";
    let dir = sema_dir(&ctx, name);
    let member = |label: &str, node: &str, endpoints: String| {
        let flags = [
            "--node",
            node,
            "--ttl",
            TTL,
            "--kill-after",
            GRACE,
            "--log-format",
            "json",
        ];
        journaled(&ctx, label, name, 2, &flags)
            .env("CONCH_ENDPOINTS", endpoints)
            .spawn()
    };
    let mut a = member("a", "a", cluster.endpoints());
    let a_pid = wait_child(&ctx, "a", &mut a);
    let held = wait_for(SOON, || interval_of(&ctx, a_pid)).expect("a in the journal");
    let mut b = member("b", "b", cluster.direct_endpoints());
    wait_child(&ctx, "b", &mut b);
    let mut c = member("c", "c", cluster.direct_endpoints());
    wait_cluster_keys(&cluster, &dir, 3);
    assert!(child_pid(&ctx, "c").is_none(), "c runs while 2 hold");

    for m in &cluster.members {
        m.proxy.blackhole();
    }
    let cut = boot_ms();
    // Watch A's lease from outside until it is gone.
    let mut last_alive = boot_ms();
    let gone = wait_for(Duration::from_secs(15), || {
        let t = boot_ms();
        if cluster.lease_alive(&held.lease) {
            last_alive = t;
            None
        } else {
            Some(boot_ms())
        }
    })
    .unwrap_or_else(|| panic!("lease {} still alive 15 s after the cut", held.lease));
    let out = a.wait_timeout(SOON);
    out.expect_code(70);
    let evs = events(&out.stderr);
    let d = event_ms(&evs, "lost", "deadline_boot_ms");
    let term = event_ms(&evs, "term-sent", "boot_ms");
    let empty = event_ms(&evs, "tree-empty", "boot_ms");
    let last = ms(interval_of(&ctx, a_pid).unwrap().last_ns);
    assert!(
        d <= cut + 3710.0 + 1.0,
        "D {:.0} ms after the cut: later than the last renewal allows",
        d - cut
    );
    assert!(
        (term - (d - GRACE_MS)).abs() <= 50.0,
        "SIGTERM at D−G{:+.1} ms (allowed ±50)",
        term - (d - GRACE_MS)
    );
    assert!(empty <= d, "tree empty {:.1} ms after D", empty - d);
    assert!(last <= empty, "a journal record after tree-empty");
    assert!(
        last < last_alive,
        "A's tree must be dead while etcd still has its lease: last record {last:.1}, lease last seen alive {last_alive:.1}"
    );

    let c_pid = wait_child(&ctx, "c", &mut c);
    let next = wait_for(SOON, || interval_of(&ctx, c_pid)).expect("c in the journal");
    assert!(
        ms(next.first_ns) > last_alive,
        "c started {:.0} ms before A's lease was last seen alive",
        last_alive - ms(next.first_ns)
    );
    assert!(b.is_running(), "b (not cut off) keeps its slot");
    for m in &cluster.members {
        m.proxy.pass();
    }
    for (l, r) in [("b", &mut b), ("c", &mut c)] {
        proc::signal(child_pid(&ctx, l).unwrap(), Signal::TERM);
        r.wait_timeout(SOON).expect_code(143);
    }
    let v = journal::check(&journal::path_in(&ctx.dir), 2);
    println!(
        "sema partition: SIGTERM at D−G{:+.1} ms, tree empty at D{:+.1} ms, lease gone {:.0}–{:.0} ms after D, \
         waiter started {:.0} ms after D; max concurrent {}",
        term - (d - GRACE_MS),
        empty - d,
        last_alive - d,
        gone - d,
        ms(next.first_ns) - d,
        v.max_concurrent
    );
}

// ---------------------------------------------------------------------------------------
// --who

#[test]
fn who_lists_holders_then_waiters_in_queue_order() {
    let ctx = Ctx::new("sema-who");
    let name = "hj";
    let mut rs = Vec::new();
    for (label, node) in [("a", "w1"), ("b", "w2")] {
        let mut r = sh_participant(&ctx, label, name, "2", &["--node", node]);
        wait_env(&ctx, label, &mut r);
        rs.push(r);
    }
    let mut c = sh_participant(&ctx, "c", name, "2", &["--node", "w3"]);
    wait_part(&ctx, name, &mut c);
    rs.push(c);
    let ps = parts(&ctx, name);
    assert_eq!(ps.len(), 3);
    let expect = [("HELD", "w1"), ("HELD", "w2"), ("WAIT", "w3")];

    for who in [&["--who"][..], &["--who", "--max", "2"][..]] {
        let out = sema(&ctx, name).args(who).run();
        out.expect_code(0);
        let lines = out.lines();
        assert_eq!(
            lines.len(),
            3,
            "{who:?}: one line per participant:\n{}",
            out.stdout
        );
        for (i, ((state, node), line)) in expect.iter().zip(&lines).enumerate() {
            let head = format!("{name}[2/2] {state} {node} pid={} since=", rs[i].pid());
            assert!(
                line.starts_with(&head),
                "{who:?}: {line:?} should start with {head:?}"
            );
            assert!(
                line.contains(&format!(" rev={} ", ps[i].rev)),
                "{who:?}: {line:?} lacks rev={}",
                ps[i].rev
            );
            assert!(line.contains(" cmd=sh -c "), "{line:?} lacks the command");
            let since = line
                .split(" since=")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .unwrap_or_default();
            assert!(
                since.len() >= 20 && since.as_bytes()[10] == b'T',
                "since is RFC 3339: {since:?}"
            );
        }
    }

    let out = sema(&ctx, name).args(["--who", "--json"]).run();
    out.expect_code(0);
    let lines = out.lines();
    assert_eq!(lines.len(), 3, "one object per line:\n{}", out.stdout);
    for (i, ((state, node), line)) in expect.iter().zip(&lines).enumerate() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert_eq!(v["name"], name, "{v}");
        assert!(
            v["max"].as_u64() == Some(2) || v["max"].as_str() == Some("2"),
            "max: {v}"
        );
        assert_eq!(v["state"], *state, "{v}");
        assert_eq!(v["node"], *node, "{v}");
        assert_eq!(v["rev"].as_i64(), Some(ps[i].rev), "{v}");
    }
    assert_eq!(parts(&ctx, name).len(), 3, "--who wrote no key");

    for (label, mut r) in ["a", "b", "c"].into_iter().zip(rs) {
        release(&ctx, label);
        if label == "c" {
            wait_env(&ctx, "c", &mut r);
        }
        r.wait_timeout(SOON).expect_code(0);
    }
    for who in [&["--who"][..], &["--who", "--json"][..]] {
        let out = sema(&ctx, name).args(who).run();
        out.expect_code(1);
        assert_eq!(out.stdout, "", "{who:?}: nothing on stdout when empty");
    }
    assert!(
        ctx.keys().is_empty(),
        "--who creates no key: {:?}",
        ctx.keys()
    );
}

/// Two live maxes of one name (a second queue written by another client, on its own lease):
/// `--who` without `--max` shows both, `--who --max N` only that one.
#[test]
fn who_without_max_shows_every_live_max() {
    let ctx = Ctx::new("sema-who-maxes");
    let name = "mx";
    let mut a = sh_participant(&ctx, "a", name, "2", &["--node", "w1"]);
    wait_env(&ctx, "a", &mut a);
    let granted = ctx.etcd.ctl(["lease", "grant", "60"]);
    let lease = granted
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("etcdctl lease grant said {granted:?}"))
        .to_string();
    let record = format!(
        "{{\"node\":\"w9\",\"pid\":4242,\"started\":\"2026-01-01T00:00:00Z\",\"cmd\":\"other\",\"lease\":\"{lease}\",\"containment\":\"cgroup\"}}"
    );
    let key = format!("{}5/{lease}", sema_dir(&ctx, name));
    ctx.etcd
        .ctl(["put", &format!("--lease={lease}"), &key, &record]);

    let out = sema(&ctx, name).arg("--who").run();
    out.expect_code(0);
    let lines = out.lines();
    assert_eq!(lines.len(), 2, "both maxes:\n{}", out.stdout);
    let mine = format!("{name}[1/2] HELD w1 pid={} ", a.pid());
    let other = format!("{name}[1/5] HELD w9 pid=4242 ");
    assert!(
        lines.iter().any(|l| l.starts_with(&mine)),
        "no line starting {mine:?}:\n{}",
        out.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&other)),
        "no line starting {other:?}:\n{}",
        out.stdout
    );
    let out = sema(&ctx, name).args(["--who", "--max", "2"]).run();
    out.expect_code(0);
    let lines = out.lines();
    assert_eq!(lines.len(), 1, "only max 2:\n{}", out.stdout);
    assert!(lines[0].starts_with(&mine), "{:?}", lines[0]);
    ctx.etcd.revoke(&lease);
    release(&ctx, "a");
    a.wait_timeout(SOON).expect_code(0);
}

// ---------------------------------------------------------------------------------------
// Bad input (quality.md §4): 64, a message naming the problem, no key, nothing run.

/// [`harness::refused`] for `conch <args> sh -c 'echo ran > {dir}/ran'`.
#[track_caller]
fn refused(test: &str, args: &[&str], mentions: &[&str]) {
    let args = [args, &["sh", "-c", "echo ran > {dir}/ran"]].concat();
    harness::refused(test, &args, mentions);
}

#[test]
fn max_zero_is_refused() {
    refused(
        "sema-bad-max0",
        &["sema", "x", "--max", "0", "--"],
        &["max"],
    );
}

#[test]
fn max_negative_is_refused() {
    refused(
        "sema-bad-max-neg",
        &["sema", "x", "--max", "-1", "--"],
        &["max"],
    );
}

#[test]
fn max_not_a_number_is_refused() {
    refused(
        "sema-bad-max-abc",
        &["sema", "x", "--max", "abc", "--"],
        &["max"],
    );
}

#[test]
fn max_above_10000_is_refused() {
    refused(
        "sema-bad-max-big",
        &["sema", "x", "--max", "10001", "--"],
        &["max", "10000"],
    );
}

#[test]
fn max_10000_is_accepted() {
    let ctx = Ctx::new("sema-max-10000");
    sema(&ctx, "x")
        .args(["--max", "10000", "--", "true"])
        .run()
        .expect_code(0);
    assert!(ctx.keys().is_empty(), "released");
}

#[test]
fn running_without_max_is_refused() {
    refused("sema-bad-no-max", &["sema", "x", "--"], &["max"]);
}

#[test]
fn who_with_a_command_is_refused() {
    refused(
        "sema-bad-who-cmd",
        &["sema", "x", "--who", "--"],
        &["who", "command"],
    );
}

#[test]
fn bad_name_is_refused() {
    refused(
        "sema-bad-name",
        &["sema", "a/b", "--max", "2", "--"],
        &["/"],
    );
}
