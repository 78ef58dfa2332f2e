//! `conch elect`: acquisition, the child's environment, fencing tokens, hand-over,
//! `--nonblock` and `--wait`, argument order, unreachable etcd. Queries: `elect_query.rs`.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Conch, Ctx, Kv, Running, wait_until};

/// Bound on anything that should happen "soon" (a child starting, conch exiting).
pub const SOON: Duration = Duration::from_secs(10);

/// A conch holding an office, with what its child saw. The child waits for a release
/// marker and then exits 0.
pub struct Holder {
    pub conch: Running,
    pub rev: i64,
    pub key: String,
    pub lease: String,
    pub node: String,
    pub name: String,
    label: String,
}

impl Holder {
    /// Starts `conch elect <office> <flags> -- <child>` and waits until its child runs.
    pub fn start(ctx: &Ctx, label: &str, office: &str, flags: &[&str]) -> Holder {
        let script = format!(
            "printf '%s\\n' \"$CONCH_NAME\" \"$CONCH_REV\" \"$CONCH_KEY\" \"$CONCH_LEASE\" \
             \"$CONCH_NODE\" > {{dir}}/{label}.tmp; mv {{dir}}/{label}.tmp {{dir}}/{label}.env; \
             until [ -e {{dir}}/{label}.release ]; do sleep 0.02; done"
        );
        Self::start_with(
            ctx,
            label,
            ctx.elect(office)
                .args(flags)
                .arg("--")
                .args(ctx.sh(&script)),
        )
    }

    fn start_with(ctx: &Ctx, label: &str, conch: Conch) -> Holder {
        let mut conch = conch.spawn();
        let env = ctx.wait_file_of(&format!("{label}.env"), SOON, &mut conch);
        let f: Vec<&str> = env.lines().collect();
        assert_eq!(f.len(), 5, "child environment incomplete: {env:?}");
        Holder {
            name: f[0].to_string(),
            rev: f[1]
                .parse()
                .unwrap_or_else(|_| panic!("CONCH_REV is not decimal: {:?}", f[1])),
            key: f[2].to_string(),
            lease: f[3].to_string(),
            node: f[4].to_string(),
            label: label.to_string(),
            conch,
        }
    }

    /// Lets the child exit 0.
    pub fn release(&self, ctx: &Ctx) {
        ctx.touch(&format!("{}.release", self.label));
    }
}

/// Parses a lease ID as conch writes it (hex).
pub fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim(), 16).unwrap_or_else(|_| panic!("not a hex lease id: {s:?}"))
}

pub fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

fn only_key(ctx: &Ctx, office: &str) -> Kv {
    let keys = ctx.office_keys(office);
    assert_eq!(
        keys.len(),
        1,
        "expected exactly one candidate key: {keys:?}"
    );
    keys.into_iter().next().unwrap()
}

#[test]
fn child_sees_its_fencing_token_key_lease_name_and_node() {
    let ctx = Ctx::new("elect-env");
    let h = Holder::start(&ctx, "a", "env-office", &["--node", "n1"]);
    let kv = only_key(&ctx, "env-office");
    assert_eq!(h.name, "env-office", "CONCH_NAME");
    assert_eq!(h.node, "n1", "CONCH_NODE");
    assert_eq!(h.key, kv.key, "CONCH_KEY is the candidate key in etcd");
    assert!(
        kv.key.starts_with(&ctx.office_prefix("env-office")),
        "key {} is not under {}",
        kv.key,
        ctx.office_prefix("env-office")
    );
    assert_eq!(
        h.rev, kv.create_revision,
        "CONCH_REV must be the create revision of the own key (not a lease id or header rev)"
    );
    assert_eq!(
        hex(&h.lease),
        kv.lease,
        "CONCH_LEASE is the key's lease, in hex"
    );
    let suffix = kv.key.rsplit('/').next().unwrap();
    assert_eq!(
        hex(suffix),
        kv.lease,
        "key ends in the lease id in hex: {}",
        kv.key
    );
}

#[test]
fn holder_record_in_etcd_has_the_spec_fields_in_order() {
    let ctx = Ctx::new("elect-record");
    let h = Holder::start(&ctx, "a", "rec", &["--node", "recnode"]);
    let kv = only_key(&ctx, "rec");
    let raw = kv.value.clone();
    assert!(
        !raw.contains('\n'),
        "holder record must be one line: {raw:?}"
    );
    let pos: Vec<usize> = ["node", "pid", "started", "cmd", "lease", "containment"]
        .iter()
        .map(|f| {
            raw.find(&format!("\"{f}\":"))
                .unwrap_or_else(|| panic!("holder record lacks {f}: {raw}"))
        })
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "field order: {raw}");
    let v = json(&raw);
    assert_eq!(v["node"], "recnode");
    assert_eq!(
        v["pid"].as_i64(),
        Some(i64::from(h.conch.pid())),
        "pid is conch's own pid"
    );
    let started = v["started"].as_str().unwrap_or_default();
    assert!(
        started.len() >= 20 && started.as_bytes()[10] == b'T' && started.ends_with('Z'),
        "started is RFC 3339 UTC: {started:?}"
    );
    let cmd = v["cmd"].as_str().unwrap_or_default();
    assert!(
        cmd.starts_with("sh -c printf "),
        "cmd is the argv joined: {cmd:?}"
    );
    assert_eq!(hex(v["lease"].as_str().unwrap_or_default()), kv.lease);
    assert_eq!(v["containment"], "cgroup", "cgroup v2 is available here");
}

#[test]
fn node_comes_from_flag_then_env_then_hostname() {
    let ctx = Ctx::new("elect-node");
    let child = ctx.sh("echo \"$CONCH_NODE\" >> {dir}/nodes");
    ctx.elect("n").arg("--").args(&child).run().expect_code(0);
    ctx.elect("n")
        .env("CONCH_NODE", "from-env")
        .arg("--")
        .args(&child)
        .run()
        .expect_code(0);
    ctx.elect("n")
        .env("CONCH_NODE", "from-env")
        .args(["--node", "from-flag", "--"])
        .args(&child)
        .run()
        .expect_code(0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let nodes = ctx.read("nodes").unwrap_or_default();
    assert_eq!(
        nodes.lines().collect::<Vec<_>>(),
        [host.trim(), "from-env", "from-flag"]
    );
}

#[test]
fn revs_strictly_increase_across_successive_leaders() {
    let ctx = Ctx::new("elect-revs");
    for _ in 0..3 {
        ctx.elect("r")
            .arg("--")
            .args(ctx.sh("echo \"$CONCH_REV\" >> {dir}/revs"))
            .run()
            .expect_code(0);
    }
    // And one hand-over to a candidate that queued while the office was held.
    let a = Holder::start(&ctx, "a", "r", &[]);
    let b = ctx
        .elect("r")
        .arg("--")
        .args(ctx.sh("echo \"$CONCH_REV\" >> {dir}/revs"))
        .spawn();
    assert!(
        wait_until(SOON, || ctx.office_keys("r").len() == 2),
        "b never queued"
    );
    a.release(&ctx);
    let mut b = b;
    b.wait_timeout(SOON).expect_code(0);
    let mut revs: Vec<i64> = ctx
        .read("revs")
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(revs.len(), 4, "{revs:?}");
    let last = revs.pop().unwrap();
    revs.push(a.rev);
    revs.push(last);
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "revs must strictly increase from leader to leader: {revs:?}"
    );
    assert!(ctx.office_keys("r").is_empty(), "released");
}

#[test]
fn clean_exit_hands_over_to_a_waiter_well_before_the_ttl() {
    let ctx = Ctx::new("elect-handover");
    let mut a = ctx
        .elect("h")
        .args(["--ttl", "10s", "--"])
        .args(ctx.sh(
            "echo \"$CONCH_REV\" > {dir}/a.rev; until [ -e {dir}/release ]; do sleep 0.01; done; \
             date +%s%N > {dir}/a.end",
        ))
        .spawn();
    let a_rev: i64 = ctx.wait_file_of("a.rev", SOON, &mut a).parse().unwrap();
    let mut b =
        ctx.elect("h")
            .args(["--ttl", "10s", "--"])
            .args(ctx.sh(
                "date +%s%N > {dir}/b.start; echo \"$CONCH_REV\" > {dir}/b.rev; exec sleep 1000",
            ))
            .spawn();
    assert!(
        wait_until(SOON, || ctx.office_keys("h").len() == 2),
        "the second candidate never queued: {:?}\n{}",
        ctx.office_keys("h"),
        b.stderr()
    );
    assert!(
        ctx.read("b.start").is_none(),
        "b ran while a held the office"
    );
    ctx.touch("release");
    let b_rev: i64 = ctx.wait_file_of("b.rev", SOON, &mut b).parse().unwrap();
    a.wait_timeout(SOON).expect_code(0);
    let a_end: i128 = ctx.wait_file("a.end", SOON).parse().unwrap();
    let b_start: i128 = ctx.wait_file("b.start", SOON).parse().unwrap();
    let gap_ms = (b_start - a_end) / 1_000_000;
    eprintln!("hand-over: waiter's child started {gap_ms} ms after the holder's child ended");
    assert!(gap_ms >= 0, "b started {gap_ms} ms before a's child ended");
    assert!(
        gap_ms < 1000,
        "hand-over took {gap_ms} ms: the waiter must not wait for the TTL"
    );
    assert!(b_rev > a_rev, "rev {b_rev} after {a_rev}");
}

/// A standby whose own key is deleted by hand while it waits never runs on it: when the
/// office frees, it finds the key gone (in the same read that finds nobody ahead), queues
/// again with a new lease and key, and only then runs, with a higher fencing token.
#[test]
fn a_standby_whose_key_was_deleted_while_waiting_runs_only_under_a_new_key() {
    let ctx = Ctx::new("elect-standby-key-deleted");
    let a = Holder::start(&ctx, "a", "sk", &[]);
    let mut b = ctx
        .elect("sk")
        .args(["--"])
        .args(ctx.sh(
            "printf '%s\\n' \"$CONCH_KEY\" \"$CONCH_REV\" > {dir}/b.tmp; mv {dir}/b.tmp {dir}/b.env; \
             exec sleep 1000",
        ))
        .spawn();
    assert!(
        wait_until(SOON, || ctx.office_keys("sk").len() == 2),
        "the standby never queued: {:?}\n{}",
        ctx.office_keys("sk"),
        b.stderr()
    );
    let first = ctx
        .office_keys("sk")
        .into_iter()
        .find(|k| k.key != a.key)
        .expect("the standby's key");
    ctx.etcd.del(&first.key);
    a.release(&ctx);
    let env = ctx.wait_file_of("b.env", SOON, &mut b);
    let f: Vec<&str> = env.lines().collect();
    assert_eq!(f.len(), 2, "child environment incomplete: {env:?}");
    assert_ne!(
        f[0],
        first.key,
        "the standby ran on a key deleted while it waited\n{}",
        b.stderr()
    );
    let rev: i64 = f[1].parse().expect("CONCH_REV is decimal");
    assert!(
        rev > first.create_revision,
        "new token {rev} not above the deleted key's {}",
        first.create_revision
    );
    let keys = ctx.office_keys("sk");
    assert_eq!(
        keys.len(),
        1,
        "only the standby's new key is left: {keys:?}"
    );
    assert_eq!(keys[0].key, f[0], "the key it runs under exists in etcd");
    assert!(
        wait_until(SOON, || b.stderr().contains("no longer")),
        "the loss while waiting is logged:\n{}",
        b.stderr()
    );
}

#[test]
fn nonblock_runs_at_once_when_vacant() {
    let ctx = Ctx::new("elect-nonblock-vacant");
    ctx.elect("nb")
        .args(["--nonblock", "--"])
        .args(ctx.sh("echo ran > {dir}/ran"))
        .run()
        .expect_code(0);
    assert_eq!(ctx.read("ran").as_deref(), Some("ran\n"));
    assert!(ctx.office_keys("nb").is_empty(), "released after the child");
}

#[test]
fn nonblock_and_wait_0_on_a_held_office_exit_75_at_once_and_leave_no_key() {
    let ctx = Ctx::new("elect-nonblock-held");
    let h = Holder::start(&ctx, "a", "nb", &[]);
    for flags in [&["--nonblock"][..], &["--wait", "0"][..]] {
        let out = ctx
            .elect("nb")
            .args(flags)
            .arg("--")
            .args(ctx.sh("echo ran > {dir}/ran"))
            .run();
        out.expect_code(75);
        assert!(
            out.elapsed < Duration::from_secs(1),
            "{flags:?} took {:?}",
            out.elapsed
        );
        assert!(ctx.read("ran").is_none(), "{flags:?} ran the child");
        let keys = ctx.office_keys("nb");
        assert_eq!(keys.len(), 1, "{flags:?} left a key: {keys:?}");
        assert_eq!(keys[0].key, h.key, "only the holder's key remains");
    }
}

#[test]
fn wait_gives_up_after_the_duration_with_75_and_leaves_no_key() {
    let ctx = Ctx::new("elect-wait");
    let h = Holder::start(&ctx, "a", "wt", &[]);
    let out = ctx
        .elect("wt")
        .args(["--wait", "1s", "--"])
        .args(ctx.sh("echo ran > {dir}/ran"))
        .run();
    out.expect_code(75);
    eprintln!("--wait 1s gave up after {:?}", out.elapsed);
    assert!(
        out.elapsed >= Duration::from_millis(900) && out.elapsed < Duration::from_secs(3),
        "--wait 1s gave up after {:?}",
        out.elapsed
    );
    assert!(ctx.read("ran").is_none(), "ran the child");
    let keys = ctx.office_keys("wt");
    assert_eq!(keys.len(), 1, "left a key: {keys:?}");
    assert_eq!(keys[0].key, h.key, "only the holder's key remains");
}

#[test]
fn flags_may_come_before_or_after_the_office_and_after_dashdash_is_the_command() {
    let ctx = Ctx::new("elect-argv");
    ctx.elect("o")
        .args(["--nonblock", "--"])
        .args(ctx.sh("echo after >> {dir}/runs"))
        .run()
        .expect_code(0);
    ctx.conch()
        .args(["elect", "--nonblock", "o", "--"])
        .args(ctx.sh("echo before >> {dir}/runs"))
        .run()
        .expect_code(0);
    // Everything after the first bare `--` belongs to the child, even conch's own flags.
    ctx.elect("o")
        .arg("--")
        .args(ctx.sh("echo \"$*\" >> {dir}/runs"))
        .args(["sh", "--who", "--", "--bogus"])
        .run()
        .expect_code(0);
    assert_eq!(
        ctx.read("runs").unwrap_or_default(),
        "after\nbefore\n--who -- --bogus\n"
    );
}

#[test]
fn stdin_reaches_the_child() {
    let ctx = Ctx::new("elect-stdin");
    let out = ctx
        .elect("in")
        .args(["--", "cat"])
        .stdin_bytes("hello")
        .run();
    out.expect_code(0);
    assert_eq!(out.stdout, "hello");
}

#[test]
fn unreachable_etcd_exits_69_within_the_dial_timeout() {
    let ctx = Ctx::new("elect-unreachable");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let global = ["--endpoints", &endpoint, "--dial-timeout", "1s"];
    let run = |args: &[&str]| {
        ctx.conch()
            .args(global)
            .args(["elect", "u"])
            .args(args)
            .run()
    };
    let out = run(&["--", "sh", "-c", "echo ran > ran"]);
    out.expect_code(69);
    assert!(
        out.elapsed < Duration::from_millis(2500),
        "took {:?}",
        out.elapsed
    );
    assert!(ctx.read("ran").is_none(), "the child ran without a hold");
    assert!(!out.stderr.is_empty(), "says why on stderr");
    let out = run(&["--assert"]);
    out.expect_code(69);
    assert!(
        out.elapsed < Duration::from_millis(2500),
        "took {:?}",
        out.elapsed
    );
    let out = run(&["--who"]);
    out.expect_code(69);
    assert!(
        out.elapsed < Duration::from_millis(2500),
        "took {:?}",
        out.elapsed
    );
}

#[test]
fn an_endpoint_that_accepts_but_never_answers_exits_69_without_hanging() {
    let ctx = Ctx::new("elect-blackhole");
    // The kernel completes TCP handshakes into the backlog; nobody ever reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = silent.local_addr().unwrap().to_string();
    let out = ctx
        .conch()
        .args(["--endpoints", &endpoint, "--dial-timeout", "1s"])
        .args(["elect", "bh", "--", "sh", "-c", "echo ran > ran"])
        .run();
    eprintln!("silent endpoint: exit after {:?}", out.elapsed);
    out.expect_code(69);
    assert!(
        out.elapsed < Duration::from_secs(3),
        "took {:?}",
        out.elapsed
    );
    assert!(ctx.read("ran").is_none(), "the child ran without a hold");
    drop(silent);
}

#[test]
fn quiet_happy_path_logs_nothing_but_warnings() {
    let ctx = Ctx::new("elect-quiet");
    let out = ctx
        .conch()
        .args(["--quiet", "elect", "q", "--", "true"])
        .run();
    out.expect_code(0);
    let noise: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.contains("WARN") && !l.to_lowercase().contains("warn"))
        .collect();
    assert!(noise.is_empty(), "--quiet still logs: {noise:#?}");
}

#[test]
fn verbose_logs_each_renewal_with_its_deadline_and_quiet_with_verbose_is_refused() {
    let ctx = Ctx::new("elect-verbose");
    let release = ctx.path("release");
    let mut holder = ctx
        .conch()
        .args(["--verbose", "--log-format", "json", "--ttl", "4s"])
        .args(["elect", "v", "--kill-after", "1s", "--"])
        .args(ctx.sh(&format!(
            "until [ -e {} ]; do sleep 0.02; done",
            release.display()
        )))
        .spawn();
    let renewals = |r: &Running| -> Vec<Value> {
        crate::harness::conch::events(&r.stderr())
            .into_iter()
            .filter(|e| e["message"] == "renewed")
            .collect()
    };
    assert!(
        wait_until(SOON, || renewals(&holder).len() >= 2
            || !holder.is_running()),
        "no renewals logged:\n{}",
        holder.stderr()
    );
    ctx.touch("release");
    let out = holder.wait_timeout(SOON);
    out.expect_code(0);
    let evs = crate::harness::conch::events(&out.stderr);
    let started = evs
        .iter()
        .find(|e| e["message"] == "child-start")
        .unwrap_or_else(|| panic!("no child-start: {evs:#?}"));
    for r in evs.iter().filter(|e| e["message"] == "renewed") {
        assert_eq!(r["level"], "DEBUG", "{r}");
        assert_eq!(r["lease"], started["lease"], "{r}");
        assert_eq!(r["ttl_s"].as_i64(), Some(4), "{r}");
        let d = r["deadline_in_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("{r}"));
        assert!(
            d > 0 && d <= 4000,
            "D lies within the TTL of the renewal: {r}"
        );
    }
    assert!(
        evs.iter().any(|e| e["message"] == "connected"),
        "--verbose shows the endpoint it connected to: {evs:#?}"
    );
    let frames: Vec<&Value> = evs
        .iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.contains("frame")))
        .collect();
    assert!(
        frames.is_empty(),
        "--verbose is conch's debug events, not the HTTP/2 library's: {frames:#?}"
    );

    // Without --verbose there are no debug lines.
    let plain = ctx
        .conch()
        .args(["--log-format", "json", "elect", "v", "--", "true"])
        .run();
    plain.expect_code(0);
    let debug: Vec<Value> = crate::harness::conch::events(&plain.stderr)
        .into_iter()
        .filter(|e| e["level"] == "DEBUG")
        .collect();
    assert!(debug.is_empty(), "debug lines by default: {debug:#?}");

    // Both at once, by flag or by environment: refused before anything happens.
    for (args, env) in [
        (vec!["--quiet", "--verbose"], None),
        (vec!["--verbose"], Some(("CONCH_QUIET", "1"))),
    ] {
        let mut cmd = ctx.conch().args(&args).args(["elect", "both", "--"]);
        cmd = cmd.args(ctx.sh(&format!("touch {}/ran", ctx.dir.display())));
        if let Some((k, v)) = env {
            cmd = cmd.env(k, v);
        }
        let out = cmd.run();
        out.expect_code(64);
        assert!(
            out.stderr.contains("--quiet and --verbose"),
            "names the contradiction: {}",
            out.stderr
        );
        assert!(ctx.read("ran").is_none(), "the child ran");
        assert!(ctx.office_keys("both").is_empty(), "a key was written");
    }
}
