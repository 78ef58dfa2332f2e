//! `conch elect` and its child: exit codes, signals, the kill on loss (lease revoked, key
//! deleted), the child's cgroup, the process-group fallback, `--restart` and the hooks.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crate::elect::{Holder, SOON, hex};
use crate::harness::{Ctx, Signal, alive, cgroup, read_pid, wait_until};

/// Short hold timing for tests that provoke a loss, so the suite stays fast.
const LOSS_FLAGS: [&str; 4] = ["--ttl", "3s", "--kill-after", "1s"];

/// A child that records its pid, starts a grandchild that calls `setsid` (leaving the
/// child's session and process group), and waits.
const TREE: &str = "echo $$ > {dir}/child.pid; \
    setsid sh -c 'echo $$ > {dir}/gc.pid; exec sleep 1000' & \
    until [ -s {dir}/gc.pid ]; do sleep 0.01; done; \
    echo \"$CONCH_LEASE\" > {dir}/lease; echo \"$CONCH_KEY\" > {dir}/key; \
    exec sleep 1000";

#[test]
fn child_exit_code_passes_through() {
    let ctx = Ctx::new("child-code");
    ctx.elect("c")
        .args(["--", "sh", "-c", "exit 3"])
        .run()
        .expect_code(3);
    ctx.elect("c").args(["--", "true"]).run().expect_code(0);
    assert!(ctx.office_keys("c").is_empty(), "released");
}

#[test]
fn child_killed_by_a_foreign_signal_gives_128_plus_n() {
    let ctx = Ctx::new("child-signal");
    ctx.elect("s")
        .args(["--", "sh", "-c", "kill -9 $$"])
        .run()
        .expect_code(128 + 9);
    ctx.elect("s")
        .args(["--", "sh", "-c", "kill -USR1 $$"])
        .run()
        .expect_code(128 + 10);
}

#[test]
fn missing_command_exits_127_and_non_executable_126() {
    let ctx = Ctx::new("child-exec");
    let out = ctx
        .elect("e")
        .args(["--", "/nonexistent-conch-test/cmd"])
        .run();
    out.expect_code(127);
    ctx.elect("e")
        .args(["--", "conch-test-no-such-command-on-path"])
        .run()
        .expect_code(127);
    let script = ctx.path("not-executable");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    ctx.elect("e").arg("--").arg(&script).run().expect_code(126);
    assert!(
        ctx.office_keys("e").is_empty(),
        "released: {:?}",
        ctx.office_keys("e")
    );
}

#[test]
fn sigterm_sigint_sigquit_end_the_run_with_the_childs_code_and_release() {
    let ctx = Ctx::new("child-term");
    for (i, sig) in [Signal::TERM, Signal::INT, Signal::QUIT]
        .into_iter()
        .enumerate()
    {
        let office = format!("t{i}");
        let mut conch = ctx
            .elect(&office)
            .arg("--")
            .args(ctx.sh(&format!(
                "trap 'echo term > {{dir}}/term{i}; exit 7' TERM; echo \"$CONCH_REV\" > {{dir}}/rev{i}; \
                 while :; do sleep 0.05; done"
            )))
            .spawn();
        ctx.wait_file_of(&format!("rev{i}"), SOON, &mut conch);
        conch.signal(sig);
        conch.wait_timeout(SOON).expect_code(7);
        assert_eq!(
            ctx.read(&format!("term{i}")).as_deref(),
            Some("term\n"),
            "{sig:?} to conch: the child got SIGTERM"
        );
        assert!(
            ctx.office_keys(&office).is_empty(),
            "{sig:?}: office released"
        );
    }
}

#[test]
fn sighup_is_forwarded_to_the_child_unchanged() {
    let ctx = Ctx::new("child-hup");
    let mut conch = ctx
        .elect("hup")
        .arg("--")
        .args(ctx.sh(
            "trap 'echo hup >> {dir}/hup' HUP; echo up > {dir}/up; while :; do sleep 0.05; done",
        ))
        .spawn();
    ctx.wait_file_of("up", SOON, &mut conch);
    conch.signal(Signal::HUP);
    ctx.wait_file_of("hup", SOON, &mut conch);
    assert!(conch.is_running(), "SIGHUP does not end the run");
    assert_eq!(ctx.office_keys("hup").len(), 1, "still held");
}

/// Starts a holder whose child has a `setsid` grandchild; returns conch and the two pids.
fn hold_tree(ctx: &Ctx, office: &str, flags: &[&str]) -> (crate::harness::Running, i32, i32) {
    let mut conch = ctx
        .elect(office)
        .args(LOSS_FLAGS)
        .args(flags)
        .arg("--")
        .args(ctx.sh(TREE))
        .spawn();
    ctx.wait_file_of("key", SOON, &mut conch);
    let child = read_pid(&ctx.path("child.pid")).unwrap();
    let gc = read_pid(&ctx.path("gc.pid")).unwrap();
    assert!(alive(child) && alive(gc), "tree started");
    (conch, child, gc)
}

#[test]
fn lease_revoked_by_another_client_kills_the_whole_tree_and_exits_70() {
    let ctx = Ctx::new("loss-revoke");
    let (mut conch, child, gc) = hold_tree(&ctx, "rv", &[]);
    let lease = ctx.wait_file("lease", SOON);
    let t = Instant::now();
    ctx.etcd.revoke(&lease);
    let out = conch.wait_timeout(SOON);
    eprintln!("loss to conch exit: {:?}", t.elapsed());
    out.expect_code(70);
    assert!(!alive(child), "child {child} outlived the hold");
    assert!(!alive(gc), "setsid grandchild {gc} outlived the hold");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "loss noticed and tree killed only after {:?}",
        t.elapsed()
    );
    assert!(ctx.office_keys("rv").is_empty());
}

#[test]
fn own_key_deleted_by_another_client_kills_the_whole_tree_and_exits_70() {
    let ctx = Ctx::new("loss-delete");
    let (mut conch, child, gc) = hold_tree(&ctx, "dl", &[]);
    let key = ctx.wait_file("key", SOON);
    let lease = ctx.wait_file("lease", SOON);
    let t = Instant::now();
    ctx.etcd.del(&key);
    let out = conch.wait_timeout(SOON);
    eprintln!("loss to conch exit: {:?}", t.elapsed());
    out.expect_code(70);
    assert!(!alive(child), "child {child} outlived the hold");
    assert!(!alive(gc), "setsid grandchild {gc} outlived the hold");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "loss noticed and tree killed only after {:?}",
        t.elapsed()
    );
    assert!(
        !ctx.etcd.lease_alive(&lease),
        "after the tree is dead conch revokes its lease"
    );
}

#[test]
fn clean_exit_kills_a_leftover_setsid_grandchild_before_release() {
    let ctx = Ctx::new("child-leftover");
    let out = ctx
        .elect("lo")
        .arg("--")
        .args(
            ctx.sh("setsid sh -c 'echo $$ > {dir}/gc.pid; exec sleep 1000' & \
             until [ -s {dir}/gc.pid ]; do sleep 0.01; done; exit 0"),
        )
        .run();
    out.expect_code(0);
    let gc = read_pid(&ctx.path("gc.pid")).unwrap();
    assert!(!alive(gc), "background grandchild {gc} outlived the hold");
    assert!(ctx.office_keys("lo").is_empty());
}

#[test]
fn child_runs_in_its_own_cgroup_which_is_removed_after() {
    child_in_own_cgroup(false);
}

/// The same through the fallback spawn (the child writes itself into `cgroup.procs` before
/// exec), which kernels without clone3's CLONE_INTO_CGROUP use.
#[test]
fn child_runs_in_its_own_cgroup_without_clone3_too() {
    child_in_own_cgroup(true);
}

fn child_in_own_cgroup(no_clone3: bool) {
    let ctx = Ctx::new("child-cgroup");
    let mount = cgroup::v2_mount().expect("this host has no cgroup v2 hierarchy");
    let root = ctx.cgroup_root.clone().unwrap();
    let mut conch = ctx
        .elect("cg")
        .env("CONCH_TEST_NO_CLONE3", if no_clone3 { "1" } else { "0" })
        .arg("--")
        .args(ctx.sh(
            "echo $$ > {dir}/child.pid; echo \"$CONCH_LEASE\" > {dir}/lease; \
             cat /proc/self/cgroup > {dir}/cg.tmp; mv {dir}/cg.tmp {dir}/cg; \
             until [ -e {dir}/release ]; do sleep 0.02; done",
        ))
        .spawn();
    let cg_text = ctx.wait_file_of("cg", SOON, &mut conch);
    let lease = ctx.wait_file("lease", SOON);
    let child = read_pid(&ctx.path("child.pid")).unwrap();
    let rel = cgroup::parse_proc_cgroup(&cg_text).expect("no cgroup v2 line");
    let dir = mount.join(rel.trim_start_matches('/'));
    assert!(
        dir.starts_with(&root) && dir != root,
        "child cgroup {} is not below the cgroup root {}",
        dir.display(),
        root.display()
    );
    assert!(dir.is_dir(), "{} does not exist", dir.display());
    assert_eq!(
        dir.file_name().unwrap().to_string_lossy(),
        format!("elect-cg-{lease}"),
        "cgroup named <kind>-<name>-<lease-hex>"
    );
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == child.to_string()),
        "child {child} not in {}: {procs:?}",
        dir.display()
    );
    let conch_cg = cgroup::of_pid(conch.pid()).unwrap_or_default();
    assert_ne!(
        mount.join(conch_cg.trim_start_matches('/')),
        dir,
        "conch itself is not inside its child's cgroup"
    );
    ctx.touch("release");
    conch.wait_timeout(SOON).expect_code(0);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        cgroup::children(&root).is_empty(),
        "stale cgroups under the root"
    );
}

#[test]
fn pgroup_containment_runs_the_child_and_kills_a_grandchild_on_loss() {
    let ctx = Ctx::new("child-pgroup");
    let mut conch = ctx
        .elect("pg")
        .args(LOSS_FLAGS)
        .args(["--containment", "pgroup", "--"])
        .args(ctx.sh(
            "echo $$ > {dir}/child.pid; sleep 1000 & echo $! > {dir}/gc.pid; \
             echo \"$CONCH_LEASE\" > {dir}/lease; wait",
        ))
        .spawn();
    let lease = ctx.wait_file_of("lease", SOON, &mut conch);
    let child = read_pid(&ctx.path("child.pid")).unwrap();
    let gc = read_pid(&ctx.path("gc.pid")).unwrap();
    assert!(alive(child) && alive(gc));
    if let (Some(root), Some(cg)) = (&ctx.cgroup_root, cgroup::of_pid(child)) {
        let mount = cgroup::v2_mount().unwrap();
        assert!(
            !mount.join(cg.trim_start_matches('/')).starts_with(root),
            "pgroup mode must not put the child in a cgroup"
        );
    }
    let who = ctx.elect("pg").args(["--who", "--json"]).run();
    who.expect_code(0);
    let v: serde_json::Value = serde_json::from_str(who.lines().first().unwrap()).unwrap();
    assert_eq!(
        v["containment"], "pgroup",
        "the weaker mode is recorded: {v}"
    );
    ctx.etcd.revoke(&lease);
    conch.wait_timeout(SOON).expect_code(70);
    assert!(!alive(child), "child {child} outlived the hold");
    assert!(!alive(gc), "grandchild {gc} outlived the hold");
}

#[test]
fn restart_runs_again_with_a_higher_rev_after_the_child_exits() {
    let ctx = Ctx::new("restart-exit");
    let mut conch = ctx
        .elect("rs")
        .args(["--restart", "--"])
        .args(ctx.sh("echo \"$(date +%s%N) $CONCH_REV\" >> {dir}/runs"))
        .spawn();
    let runs = crate::harness::wait_for(Duration::from_secs(15), || {
        let runs: Vec<(i128, i64)> = ctx
            .read("runs")?
            .lines()
            .filter_map(|l| {
                let (t, rev) = l.split_once(' ')?;
                Some((t.parse().ok()?, rev.parse().ok()?))
            })
            .collect();
        (runs.len() >= 2).then_some(runs)
    })
    .unwrap_or_else(|| panic!("no second run\n--- stderr\n{}", conch.stderr()));
    assert!(
        runs[1].1 > runs[0].1,
        "second run has a new, higher rev: {runs:?}"
    );
    let gap_ms = (runs[1].0 - runs[0].0) / 1_000_000;
    eprintln!("--restart: second run {gap_ms} ms after the first");
    assert!(
        gap_ms >= 900,
        "no back-off (at least 1 s) between runs: {gap_ms} ms"
    );
    assert!(conch.is_running(), "--restart runs until signalled");
    conch.signal(Signal::TERM);
    conch.wait_timeout(SOON);
    assert!(ctx.office_keys("rs").is_empty(), "released on exit");
}

#[test]
fn restart_after_a_revoked_lease_campaigns_with_a_new_lease_and_higher_rev() {
    let ctx = Ctx::new("restart-loss");
    let mut conch = ctx
        .elect("rl")
        .args(LOSS_FLAGS)
        .args(["--restart", "--"])
        .args(ctx.sh(
            // The pid first: the test reads it as soon as `runs` has a line.
            "echo $$ > {dir}/child.pid; echo \"$CONCH_REV $CONCH_LEASE\" >> {dir}/runs; \
             exec sleep 1000",
        ))
        .spawn();
    let first = ctx.wait_file_of("runs", SOON, &mut conch);
    let (rev1, lease1) = first.split_once(' ').unwrap();
    let child1 = read_pid(&ctx.path("child.pid")).unwrap();
    ctx.etcd.revoke(lease1);
    let runs = crate::harness::wait_for(Duration::from_secs(15), || {
        let text = ctx.read("runs")?;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 2 && text.ends_with('\n')).then_some(lines)
    })
    .unwrap_or_else(|| panic!("no second run\n--- stderr\n{}", conch.stderr()));
    assert!(!alive(child1), "the first child outlived its hold");
    let (rev2, lease2) = runs[1].split_once(' ').unwrap();
    assert!(
        rev2.parse::<i64>().unwrap() > rev1.parse::<i64>().unwrap(),
        "higher rev after the loss: {runs:?}"
    );
    assert_ne!(hex(lease1), hex(lease2), "never reuse the old lease");
    assert!(conch.is_running());
}

#[test]
fn hooks_run_in_order_around_the_child_with_its_environment() {
    let ctx = Ctx::new("hooks-order");
    let dir = ctx.dir.display().to_string();
    ctx.elect("hk")
        .arg("--on-acquire")
        .arg(format!(
            "echo \"acquire $CONCH_NAME $CONCH_REV\" >> {dir}/log"
        ))
        .arg("--on-lose")
        .arg(format!("echo \"lose $CONCH_NAME $CONCH_REV\" >> {dir}/log"))
        .arg("--")
        .args(ctx.sh("echo \"child $CONCH_NAME $CONCH_REV\" >> {dir}/log"))
        .run()
        .expect_code(0);
    let log = ctx.read("log").unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log:?}");
    let rev = lines[1].rsplit(' ').next().unwrap();
    assert!(rev.parse::<i64>().is_ok(), "{log:?}");
    assert_eq!(
        lines,
        [
            format!("acquire hk {rev}"),
            format!("child hk {rev}"),
            format!("lose hk {rev}")
        ]
    );
}

#[test]
fn failing_on_acquire_hook_means_not_acquired_and_the_child_never_runs() {
    let ctx = Ctx::new("hooks-fail");
    let dir = ctx.dir.display().to_string();
    let out = ctx
        .elect("hf")
        .args(["--nonblock", "--on-acquire"])
        .arg(format!("echo hook >> {dir}/log; exit 1"))
        .arg("--")
        .args(ctx.sh("echo child >> {dir}/log"))
        .run();
    out.expect_code(75);
    assert_eq!(
        ctx.read("log").as_deref(),
        Some("hook\n"),
        "child must not run"
    );
    assert!(ctx.office_keys("hf").is_empty(), "no key left behind");
    // And the office is free for the next candidate at once.
    let h = Holder::start(&ctx, "b", "hf", &["--nonblock"]);
    assert!(h.rev > 0);
    assert!(wait_until(SOON, || ctx.office_keys("hf").len() == 1));
}

#[test]
fn conch_killed_by_sigkill_takes_its_tree_down_within_1s() {
    let ctx = Ctx::new("conch-sigkill");
    let (conch, child, gc) = hold_tree(&ctx, "kk", &[]);
    let t = Instant::now();
    conch.signal(Signal::KILL);
    let dead = wait_until(Duration::from_secs(1), || !alive(child) && !alive(gc));
    eprintln!("conch SIGKILLed: tree dead after {:?}", t.elapsed());
    assert!(
        dead,
        "1 s after conch died: child alive={}, setsid grandchild alive={}",
        alive(child),
        alive(gc)
    );
}

#[test]
fn a_tree_that_ignores_sigterm_is_killed_on_loss() {
    let ctx = Ctx::new("loss-stubborn");
    let mut conch = ctx
        .elect("st")
        .args(LOSS_FLAGS)
        .arg("--")
        .args(ctx.sh("trap '' TERM; echo $$ > {dir}/child.pid; \
             setsid sh -c 'trap \"\" TERM; echo $$ > {dir}/gc.pid; while :; do sleep 0.05; done' & \
             until [ -s {dir}/gc.pid ]; do sleep 0.01; done; \
             echo \"$CONCH_LEASE\" > {dir}/lease; while :; do sleep 0.05; done"))
        .spawn();
    let lease = ctx.wait_file_of("lease", SOON, &mut conch);
    let child = read_pid(&ctx.path("child.pid")).unwrap();
    let gc = read_pid(&ctx.path("gc.pid")).unwrap();
    let t = Instant::now();
    ctx.etcd.revoke(&lease);
    let out = conch.wait_timeout(SOON);
    eprintln!("stubborn tree: loss to conch exit {:?}", t.elapsed());
    out.expect_code(70);
    assert!(!alive(child), "child {child} ignored SIGTERM and survived");
    assert!(!alive(gc), "grandchild {gc} ignored SIGTERM and survived");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "SIGKILL came only after {:?} (--kill-after 1s)",
        t.elapsed()
    );
}

#[test]
fn the_child_does_not_inherit_systemd_notification_variables() {
    let ctx = Ctx::new("child-env-strip");
    ctx.elect("es")
        .env("NOTIFY_SOCKET", "/run/conch-test/notify")
        .env("WATCHDOG_USEC", "1000000")
        .env("WATCHDOG_PID", "1")
        .env("CONCH_IT_KEEP", "kept")
        .arg("--")
        .args(ctx.sh("env > {dir}/env.tmp; mv {dir}/env.tmp {dir}/env"))
        .run()
        .expect_code(0);
    let env = ctx.read("env").unwrap_or_default();
    assert!(
        env.contains("CONCH_IT_KEEP=kept"),
        "ordinary variables pass: {env}"
    );
    for var in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="] {
        assert!(
            !env.lines().any(|l| l.starts_with(var)),
            "{var} leaked into the child"
        );
    }
}

#[test]
fn a_waiter_whose_lease_is_revoked_requeues_with_a_new_lease_and_key() {
    let ctx = Ctx::new("waiter-revoked");
    let a = Holder::start(&ctx, "a", "wq", &[]);
    let mut b = ctx
        .elect("wq")
        .args(LOSS_FLAGS)
        .arg("--")
        .args(ctx.sh(
            "echo \"$CONCH_REV $CONCH_LEASE\" > {dir}/b.tmp; mv {dir}/b.tmp {dir}/b; \
             exec sleep 1000",
        ))
        .spawn();
    let waiter = |ctx: &Ctx| {
        let keys = ctx.office_keys("wq");
        keys.into_iter().find(|k| k.key != a.key)
    };
    let old = crate::harness::wait_for(SOON, || waiter(&ctx))
        .unwrap_or_else(|| panic!("b never queued\n{}", b.stderr()));
    ctx.etcd.revoke(&format!("{:x}", old.lease));
    let new = crate::harness::wait_for(SOON, || waiter(&ctx).filter(|k| k.lease != old.lease))
        .unwrap_or_else(|| {
            let state = b.try_wait().map(|o| o.code);
            panic!(
                "b did not re-queue with a new lease (exit {state:?})\n{}",
                b.stderr()
            )
        });
    assert!(new.create_revision > old.create_revision);
    assert!(ctx.read("b").is_none(), "b ran while a held the office");
    a.release(&ctx);
    let run = ctx.wait_file_of("b", SOON, &mut b);
    let (rev, lease) = run.split_once(' ').unwrap();
    assert_ne!(hex(lease), old.lease, "b ran on its revoked lease");
    assert_eq!(
        rev.parse::<i64>().unwrap(),
        new.create_revision,
        "rev of the new key"
    );
}
