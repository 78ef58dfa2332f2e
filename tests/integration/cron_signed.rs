//! Signed jobs (quality.md §5): `conch keygen`, `cron add --sign-key`, `conchd --trust-key`.
//! A conchd that trusts keys runs only specs signed by one of them; every other tick is
//! claimed, never run, and recorded `refused` with the reason.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::Value;

use crate::cron_status::{get, get_json};
use crate::harness::cron::{status, stop_all};
use crate::harness::etcd::free_port;
use crate::harness::{Ctx, wait_for, wait_until};

const SOON: Duration = Duration::from_secs(15);

fn keygen(ctx: &Ctx, name: &str) {
    let out = ctx.conch().args(["keygen", &name_in(ctx, name)]).run();
    out.expect_code(0);
    assert!(
        out.stderr.contains(".pub"),
        "says where the public key went: {}",
        out.stderr
    );
}

fn name_in(ctx: &Ctx, name: &str) -> String {
    ctx.path(name).display().to_string()
}

/// `cron add <job> --schedule '@every 1s' [--sign-key <key>] -- sh -c 'echo … >> <job>.ran'`.
fn add(ctx: &Ctx, job: &str, key: Option<&str>) {
    let mut c = ctx.cron(["add", job, "--schedule", "@every 1s"]);
    if let Some(k) = key {
        c = c.args(["--sign-key", &name_in(ctx, k)]);
    }
    c.arg("--")
        .args(ctx.sh(&format!("echo \"$CONCH_TICK\" >> {{dir}}/{job}.ran")))
        .run()
        .expect_code(0);
}

fn job_key(ctx: &Ctx, job: &str) -> String {
    format!("{}/v1/cron/job/{job}", ctx.prefix)
}

/// The results of `job` with this status.
fn with_status(ctx: &Ctx, job: &str, want: &str) -> Vec<Value> {
    ctx.results(job)
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| status(v) == want)
        .collect()
}

#[test]
fn only_specs_signed_by_a_trusted_key_run_the_rest_are_refused_with_the_reason() {
    let ctx = Ctx::new("cron-signed");
    keygen(&ctx, "ops");
    keygen(&ctx, "stranger");
    let mode = std::fs::metadata(ctx.path("ops"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the private key is for its owner only");

    add(&ctx, "good", Some("ops"));
    add(&ctx, "unsigned", None);
    add(&ctx, "foreign", Some("stranger"));
    add(&ctx, "edited", Some("ops"));
    // Someone with write access to the prefix changes the signed command.
    let key = job_key(&ctx, "edited");
    let spec = ctx.etcd.get_prefix(&key).remove(0).value;
    let mut v: Value = serde_json::from_str(&spec).unwrap();
    assert!(
        v["signature"]
            .as_str()
            .is_some_and(|s| s.starts_with("ed25519:")),
        "{v}"
    );
    v["cmd"][2] = Value::String(format!("echo evil >> {}/edited.ran", ctx.dir.display()));
    ctx.etcd.put(&key, &v.to_string());

    let addr = format!("127.0.0.1:{}", free_port());
    let mut node = ctx
        .conchd("n1")
        .args(["--trust-key", &format!("{}.pub", name_in(&ctx, "ops"))])
        .args(["--status-addr", &addr])
        .spawn();
    let settled = wait_until(SOON, || {
        with_status(&ctx, "good", "ok").len() >= 2
            && ["unsigned", "foreign", "edited"]
                .iter()
                .all(|j| !with_status(&ctx, j, "refused").is_empty())
    });
    assert!(
        settled,
        "results: good {:?} unsigned {:?} foreign {:?} edited {:?}\n--- conchd\n{}",
        ctx.results("good"),
        ctx.results("unsigned"),
        ctx.results("foreign"),
        ctx.results("edited"),
        node.stderr()
    );
    for (job, says) in [
        ("unsigned", "not signed"),
        ("foreign", "does not trust"),
        ("edited", "does not match"),
    ] {
        for r in ctx.results(job).into_iter().map(|(_, v)| v) {
            assert_eq!(status(&r), "refused", "{job}: only refused results: {r}");
            let reason = r["reason"].as_str().unwrap_or_default();
            assert!(reason.contains(says), "{job}: the reason says why: {r}");
            assert!(
                r.get("exit").is_none_or(Value::is_null),
                "{job}: nothing ran: {r}"
            );
        }
        assert!(ctx.read(&format!("{job}.ran")).is_none(), "{job} ran");
    }
    assert!(ctx.read("good.ran").is_some(), "the signed job ran");

    // `ls --last`, the status API and the page show it to the operator. conchd keeps
    // claiming ticks meanwhile, and a tick claimed but not yet finished shows `running`;
    // each view is therefore read again until it shows no job between claim and result.
    let want = |name: &Value| if name == "good" { "ok" } else { "refused" };
    let settled = |running: &str, read: &dyn Fn() -> String| {
        wait_for(SOON, || Some(read()).filter(|text| !text.contains(running))).unwrap_or_else(read)
    };
    const RUNNING: &str = r#""status":"running""#;
    let ls = settled(RUNNING, &|| {
        let out = ctx.cron(["ls", "--last", "--json"]).run();
        out.expect_code(0);
        out.lines().join("\n")
    });
    for line in ls.lines() {
        let j: Value = serde_json::from_str(line).unwrap();
        assert_eq!(j["last"]["status"], want(&j["name"]), "{j}");
    }
    let api: Value =
        serde_json::from_str(&settled(RUNNING, &|| get_json(&addr, "/cron").to_string())).unwrap();
    let jobs = api
        .as_array()
        .unwrap_or_else(|| panic!("/cron is a list: {api}"));
    assert_eq!(jobs.len(), 4, "{api}");
    for j in jobs {
        assert_eq!(j["last"]["status"], want(&j["name"]), "/cron: {j}");
    }
    let page = settled(">running<", &|| {
        let page = get(&addr, "/");
        assert_eq!(page.code, 200);
        page.body
    });
    for job in ["unsigned", "foreign", "edited"] {
        let row = page
            .lines()
            .find(|l| l.contains(&format!("data-job=\"{job}\"")))
            .unwrap_or_else(|| panic!("no row for {job} on the page"));
        assert!(
            row.contains(">refused<"),
            "the page shows {job} refused: {row}"
        );
    }

    // Pausing and resuming needs no key, and leaves the job runnable.
    ctx.cron(["pause", "good"]).run().expect_code(0);
    ctx.cron(["resume", "good"]).run().expect_code(0);
    let resumed: Value =
        serde_json::from_str(&ctx.etcd.get_prefix(&job_key(&ctx, "good")).remove(0).value).unwrap();
    assert!(resumed["resumed_at"].is_string(), "{resumed}");
    let before = with_status(&ctx, "good", "ok").len();
    assert!(
        wait_until(SOON, || with_status(&ctx, "good", "ok").len() >= before + 2),
        "the resumed job did not run again: {:?}\n{}",
        ctx.results("good"),
        node.stderr()
    );
    assert!(
        with_status(&ctx, "good", "refused").is_empty(),
        "{:?}",
        ctx.results("good")
    );
    stop_all(std::slice::from_mut(&mut node));
}

#[test]
fn a_node_without_trust_keys_runs_signed_and_unsigned_specs_alike() {
    let ctx = Ctx::new("cron-signed-untrusting");
    keygen(&ctx, "ops");
    add(&ctx, "signed", Some("ops"));
    add(&ctx, "plain", None);
    let mut node = ctx.conchd("n1").spawn();
    assert!(
        wait_until(SOON, || {
            !with_status(&ctx, "signed", "ok").is_empty()
                && !with_status(&ctx, "plain", "ok").is_empty()
        }),
        "{:?} {:?}\n{}",
        ctx.results("signed"),
        ctx.results("plain"),
        node.stderr()
    );
    stop_all(std::slice::from_mut(&mut node));
}

#[test]
fn bad_key_files_are_refused_with_their_name_and_change_nothing() {
    let ctx = Ctx::new("cron-signed-bad");
    keygen(&ctx, "ops");
    let private = name_in(&ctx, "ops");
    let public = format!("{private}.pub");
    let missing = name_in(&ctx, "missing");

    // Signing with a missing file, or with the public half: 64, nothing written.
    for (key, says) in [(&missing, "missing"), (&public, "ops.pub")] {
        let out = ctx
            .cron([
                "add",
                "j",
                "--schedule",
                "@hourly",
                "--sign-key",
                key,
                "--",
                "true",
            ])
            .run();
        out.expect_code(64);
        assert!(out.stderr.contains(says), "names the file: {}", out.stderr);
        assert!(
            out.stderr.contains("--sign-key"),
            "names the flag: {}",
            out.stderr
        );
    }
    assert!(ctx.keys().is_empty(), "nothing written: {:?}", ctx.keys());

    // conchd with a trust key it cannot read: 64 before it registers or runs anything.
    let out = ctx
        .conchd("n1")
        .args(["--trust-key", &format!("{public},{missing}")])
        .run();
    out.expect_code(64);
    assert!(
        out.stderr.contains("--trust-key") && out.stderr.contains("missing"),
        "{}",
        out.stderr
    );
    assert!(ctx.keys().is_empty(), "nothing written: {:?}", ctx.keys());

    // keygen never overwrites a key.
    let before = std::fs::read(&private).unwrap();
    let out = ctx.conch().args(["keygen", &private]).run();
    out.expect_code(64);
    assert!(out.stderr.contains(&private), "{}", out.stderr);
    assert_eq!(
        std::fs::read(&private).unwrap(),
        before,
        "the key is untouched"
    );
}
