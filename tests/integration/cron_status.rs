//! What a person types at `conch cron` and `conch conchd`, and what they read back: bad input
//! (quality.md §4), corrupted or foreign values under the prefix, the status API and page
//! (primitives.md "Status API"; the page driven in headless Chromium through chromedriver's
//! WebDriver API), `--daemonize --pidfile`, and the systemd notification protocol.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::cron::{now_unix, rfc3339, status};
use crate::harness::etcd::free_port;
use crate::harness::{Ctx, Running, Signal, TAG_VAR, alive, proc, wait_for, wait_until};

// ---------------------------------------------------------------------------------------------
// Bad input: exit 64 (or 1 for a job that does not exist), a message naming the problem,
// nothing written.

/// Runs `conch <args>` and checks it exits `code`, says every one of `mentions`
/// (case-insensitive) on stderr, and wrote nothing under the test's prefix.
#[track_caller]
fn refused(ctx: &Ctx, args: &[String], code: i32, mentions: &[&str]) {
    let out = ctx.conch().args(args).run();
    out.expect_code(code);
    let stderr = out.stderr.to_lowercase();
    for m in mentions {
        assert!(
            stderr.contains(&m.to_lowercase()),
            "conch {args:?}: stderr should name the problem ({m:?}):\n{}",
            out.stderr
        );
    }
    assert!(
        !stderr.contains("panicked"),
        "conch {args:?} panicked:\n{}",
        out.stderr
    );
    assert!(
        ctx.keys().is_empty(),
        "conch {args:?} wrote to etcd: {:?}",
        ctx.keys()
    );
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `cron add <name> --schedule <schedule> <flags…> -- echo hi`.
fn add(name: &str, schedule: &str, flags: &[&str]) -> Vec<String> {
    let mut v = strings(&["cron", "add", name, "--schedule", schedule]);
    v.extend(strings(flags));
    v.extend(strings(&["--", "echo", "hi"]));
    v
}

#[test]
fn cron_add_refuses_bad_schedules_and_zones() {
    let ctx = Ctx::new("cs-bad-sched");
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (add("j", "61 * * * *", &[]), &["--schedule", "61"]),
        (add("j", "* * * *", &[]), &["--schedule", "4 fields"]),
        (add("j", "@reboot", &[]), &["@reboot"]),
        // Parses, but 30 February never comes.
        (add("j", "0 0 30 2 *", &[]), &["0 0 30 2 *", "never fires"]),
        (
            add("j", "CRON_TZ= 0 * * * *", &[]),
            &["CRON_TZ=", "no time zone"],
        ),
        (add("j", "CRON_TZ=", &[]), &["CRON_TZ=", "no time zone"]),
        (
            add("j", "0 * * * *", &["--tz", "Mars/Base"]),
            &["Mars/Base", "time zone"],
        ),
        (
            add("j", "CRON_TZ=Mars/Base 0 * * * *", &[]),
            &["Mars/Base", "time zone"],
        ),
        (
            add(
                "j",
                "CRON_TZ=America/New_York 0 * * * *",
                &["--tz", "Europe/Berlin"],
            ),
            &["--tz Europe/Berlin", "CRON_TZ=America/New_York"],
        ),
    ];
    for (args, mentions) in &cases {
        refused(&ctx, args, 64, mentions);
    }
    // The same command line with the problem fixed is accepted: the refusals above were about
    // the schedule, not about the test's setup.
    ctx.conch()
        .args(add("j", "CRON_TZ=America/New_York 0 * * * *", &[]))
        .run()
        .expect_code(0);
    assert_eq!(ctx.keys().len(), 1, "{:?}", ctx.keys());
}

#[test]
fn cron_add_refuses_bad_durations_selectors_commands_and_names() {
    let ctx = Ctx::new("cs-bad-flags");
    let huge = "x".repeat(65 * 1024);
    let mut too_big = strings(&["cron", "add", "j", "--schedule", "@hourly", "--", "echo"]);
    too_big.push(huge);
    let long_name = "a".repeat(129);
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            add("j", "@hourly", &["--run-ttl", "0s"]),
            &["--run-ttl", "zero"],
        ),
        (
            add("j", "@hourly", &["--run-ttl", "-5s"]),
            &["--run-ttl", "-5s"],
        ),
        (
            add("j", "@hourly", &["--run-ttl=-5s"]),
            &["--run-ttl", "-5s"],
        ),
        (
            add("j", "@hourly", &["--run-ttl", "soon"]),
            &["--run-ttl", "soon"],
        ),
        (
            add("j", "@hourly", &["--starting-deadline", "0"]),
            &["--starting-deadline", "zero"],
        ),
        (
            add("j", "@hourly", &["--starting-deadline", "-1m"]),
            &["--starting-deadline", "-1m"],
        ),
        // The default starting deadline is 1m: a jitter of 1m would miss every tick.
        (
            add("j", "@hourly", &["--jitter", "1m"]),
            &["--jitter", "--starting-deadline"],
        ),
        (
            add(
                "j",
                "@hourly",
                &["--jitter", "2m", "--starting-deadline", "90s"],
            ),
            &["--jitter 2m", "--starting-deadline 90s"],
        ),
        (
            add("j", "@hourly", &["--node-selector", "role"]),
            &["--node-selector", "\"role\""],
        ),
        (
            add("j", "@hourly", &["--node-selector", "=x"]),
            &["--node-selector", "\"=x\""],
        ),
        (too_big, &["64 KiB"]),
        (
            strings(&["cron", "add", "j", "--schedule", "@hourly"]),
            &["missing command"],
        ),
        (
            strings(&["cron", "add", "j", "--schedule", "@hourly", "--"]),
            &["missing command"],
        ),
        (add("a/b", "@hourly", &[]), &["a/b", "'/'"]),
        (add(".x", "@hourly", &[]), &[".x", "'.'"]),
        (add(&long_name, "@hourly", &[]), &["129", "128"]),
        (add("a b", "@hourly", &[]), &["a space"]),
    ];
    for (args, mentions) in &cases {
        refused(&ctx, args, 64, mentions);
    }
    ctx.conch()
        .args(add(
            "j",
            "@hourly",
            &[
                "--jitter",
                "59s",
                "--run-ttl",
                "5s",
                "--node-selector",
                "role=db",
            ],
        ))
        .run()
        .expect_code(0);
    assert_eq!(ctx.keys().len(), 1, "{:?}", ctx.keys());
}

#[test]
fn cron_commands_on_a_job_that_does_not_exist_exit_1() {
    let ctx = Ctx::new("cs-no-job");
    for sub in ["rm", "pause", "resume", "history", "run"] {
        refused(
            &ctx,
            &strings(&["cron", sub, "nosuch"]),
            1,
            &["no job named nosuch"],
        );
    }
}

#[test]
fn conchd_refuses_bad_labels_and_daemonize_without_a_pidfile() {
    let ctx = Ctx::new("cs-bad-conchd");
    refused(
        &ctx,
        &strings(&["conchd", "--node", "n1", "--labels", "bogus"]),
        64,
        &["--labels", "\"bogus\""],
    );
    refused(
        &ctx,
        &strings(&["conchd", "--node", "n1", "--labels", "role=db,=x"]),
        64,
        &["--labels", "\"=x\""],
    );
    refused(
        &ctx,
        &strings(&["conchd", "--node", "n1", "--daemonize"]),
        64,
        &["--pidfile"],
    );
    assert!(
        ctx.tagged_processes().is_empty(),
        "a refused conchd left a process: {:?}",
        ctx.tagged_processes()
    );
}

// ---------------------------------------------------------------------------------------------
// Corrupted or foreign values under the prefix: shown as unknown or invalid, never a crash, and
// never run.

/// A job spec as `cron add` writes it, for planting under a key `cron add` would refuse.
fn spec_json(schedule: &str, cmd: &[String]) -> String {
    json!({
        "schedule": schedule,
        "tz": "UTC",
        "cmd": cmd,
        "run_ttl": "10m",
        "overlap": "allow",
        "starting_deadline": "1m",
        "node_selector": {},
        "jitter": "0s",
        "paused": false,
        "added_by": "test@it",
        "added_at": rfc3339(now_unix() - 5),
    })
    .to_string()
}

/// A tick as a key segment: 12 zero-padded digits.
fn tick_key(t: i64) -> String {
    format!("{t:012}")
}

/// The results of `job` with status `ok` that `node` wrote (the planted ones are skipped).
fn ok_runs(ctx: &Ctx, job: &str, node: &str) -> usize {
    ctx.etcd
        .get_prefix(&format!("{}/v1/cron/result/{job}/", ctx.prefix))
        .iter()
        .filter_map(|kv| serde_json::from_str::<Value>(&kv.value).ok())
        .filter(|v| status(v) == "ok" && v["node"] == node)
        .count()
}

/// One JSON value per non-empty stdout line.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The element of a JSON array whose `field` is `value`.
#[track_caller]
fn by<'a>(arr: &'a Value, field: &str, value: &str) -> &'a Value {
    arr.as_array()
        .unwrap_or_else(|| panic!("not an array: {arr}"))
        .iter()
        .find(|v| v[field] == value)
        .unwrap_or_else(|| panic!("no {field}={value:?} in {arr:#}"))
}

#[test]
fn corrupted_and_foreign_values_are_shown_as_unknown_and_never_run() {
    let ctx = Ctx::new("cs-foreign");
    let p = ctx.prefix.clone();
    ctx.cron(["add", "good", "--schedule", "@every 1s", "--"])
        .args(ctx.sh("echo run >> {dir}/good-ran"))
        .run()
        .expect_code(0);
    ctx.cron(["add", "hist", "--schedule", "@yearly", "--", "true"])
        .run()
        .expect_code(0);
    let old = now_unix() - 120;
    let planted = [
        (format!("{p}/v1/cron/job/notjson"), "garbage".to_string()),
        // A valid spec under a name conch never writes: it must not run.
        (
            format!("{p}/v1/cron/job/a b"),
            spec_json("@every 1s", &ctx.sh("echo ran > {dir}/ab-ran")),
        ),
        // Valid JSON, invalid schedule: shown as invalid, not run.
        (
            format!("{p}/v1/cron/job/badsched"),
            spec_json("61 * * * *", &ctx.sh("echo ran > {dir}/badsched-ran")),
        ),
        (
            format!("{p}/v1/cron/fire/hist/{}", tick_key(old)),
            "garbage".into(),
        ),
        (
            format!("{p}/v1/cron/result/hist/{}", tick_key(old)),
            "garbage".into(),
        ),
        (
            format!("{p}/v1/cron/fire/hist/not-a-tick"),
            "garbage".into(),
        ),
        (
            // JSON, but not a result conch wrote.
            format!("{p}/v1/cron/result/good/{}", tick_key(old - 3600)),
            "{\"status\":\"ok\"}".into(),
        ),
        (format!("{p}/v1/node/ghost"), "garbage".into()),
        (
            format!("{p}/v1/elect/office1/694d7b5c1e2a3f01"),
            "garbage".into(),
        ),
        (format!("{p}/v1/elect/lonely"), "garbage".into()),
        (
            format!("{p}/v1/sema/pool/2/694d7b5c1e2a3f02"),
            "garbage".into(),
        ),
        (
            format!("{p}/v1/sema/pool/zero/694d7b5c1e2a3f03"),
            "garbage".into(),
        ),
        (format!("{p}/v1/sema/lonely"), "garbage".into()),
    ];
    for (k, v) in &planted {
        ctx.etcd.put(k, v);
    }

    // `cron ls`: every job listed, the bad ones as invalid.
    let out = ctx.cron(["ls"]).run();
    out.expect_code(0);
    let row = |out: &crate::harness::conch::Output, name: &str| -> String {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name:?}:\n{}", out.stdout))
            .to_string()
    };
    for bad in ["notjson", "a b", "badsched"] {
        assert!(row(&out, bad).contains("invalid"), "{}", out.stdout);
    }
    assert!(row(&out, "good").contains("@every 1s"), "{}", out.stdout);
    assert!(!row(&out, "good").contains("invalid"), "{}", out.stdout);

    let out = ctx.cron(["ls", "--last"]).run();
    out.expect_code(0);
    assert!(row(&out, "hist").contains("unknown"), "{}", out.stdout);
    assert!(row(&out, "notjson").contains("invalid"), "{}", out.stdout);

    let check_jobs = |jobs: &Value, with_last: bool| {
        let nj = by(jobs, "name", "notjson");
        assert!(nj.get("spec").is_none(), "{nj}");
        assert!(
            nj["error"]
                .as_str()
                .unwrap()
                .contains("not a conch job spec"),
            "{nj}"
        );
        let ab = by(jobs, "name", "a b");
        assert!(ab["error"].as_str().unwrap().contains("name"), "{ab}");
        assert!(ab.get("next").is_none(), "{ab}");
        let bs = by(jobs, "name", "badsched");
        assert_eq!(bs["spec"]["schedule"], "61 * * * *", "{bs}");
        assert!(bs["error"].as_str().unwrap().contains("61"), "{bs}");
        let good = by(jobs, "name", "good");
        assert!(good.get("error").is_none(), "{good}");
        assert!(good["next"].as_str().unwrap().ends_with('Z'), "{good}");
        if with_last {
            let hist = by(jobs, "name", "hist");
            assert_eq!(hist["last"]["status"], "unknown", "{hist}");
            assert_eq!(hist["last"]["tick"], rfc3339(old), "{hist}");
        }
    };
    let out = ctx.cron(["ls", "--json"]).run();
    out.expect_code(0);
    check_jobs(&Value::Array(json_lines(&out.stdout)), false);
    let out = ctx.cron(["ls", "--json", "--last"]).run();
    out.expect_code(0);
    check_jobs(&Value::Array(json_lines(&out.stdout)), true);

    // `cron history` of a job whose records are garbage: listed as unknown.
    let out = ctx.cron(["history", "hist"]).run();
    out.expect_code(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&rfc3339(old)) && l.contains("unknown")),
        "{}",
        out.stdout
    );
    let out = ctx.cron(["history", "hist", "--json"]).run();
    out.expect_code(0);
    let h = json_lines(&out.stdout);
    assert_eq!(h.len(), 1, "{}", out.stdout);
    assert_eq!(h[0]["status"], "unknown");
    assert_eq!(h[0]["tick"], rfc3339(old));
    ctx.cron(["history", "notjson"]).run().expect_code(0);
    // Pausing a spec that is not conch's is refused and changes nothing.
    let out = ctx.cron(["pause", "notjson"]).run();
    assert!(
        out.code.is_some_and(|c| c != 0 && c != 101),
        "cron pause notjson: {out:?}"
    );
    assert!(
        out.stderr.contains("not a conch job spec"),
        "{}",
        out.stderr
    );
    let nj = ctx.etcd.get_prefix(&format!("{p}/v1/cron/job/notjson"));
    assert_eq!(nj[0].value, "garbage");

    // `conch status` and `--json`.
    let out = ctx.conch().arg("status").run();
    out.expect_code(0);
    for want in [
        "office1 unknown rev=",
        "pool[1/2]",
        "HELD unknown rev=",
        "ghost labels=unknown",
        "notjson",
    ] {
        assert!(out.stdout.contains(want), "no {want:?} in\n{}", out.stdout);
    }
    let out = ctx.conch().args(["status", "--json"]).run();
    out.expect_code(0);
    let snap: Value = serde_json::from_str(out.stdout.trim()).expect("status --json");
    let check_elect = |elect: &Value| {
        let o = by(elect, "office", "office1");
        assert_eq!(o["holder"]["unknown"], true, "{o}");
        assert!(o["holder"]["rev"].as_i64().unwrap() > 0, "{o}");
        assert!(o["holder"].get("node").is_none(), "{o}");
    };
    let check_sema = |sema: &Value| {
        let s = by(sema, "name", "pool");
        assert_eq!(s["max"], 2, "{s}");
        assert_eq!(s["holders"][0]["unknown"], true, "{s}");
    };
    let check_nodes = |nodes: &Value| {
        let g = by(nodes, "node", "ghost");
        assert_eq!(g["unknown"], true, "{g}");
    };
    check_elect(&snap["elect"]);
    check_sema(&snap["sema"]);
    check_nodes(&snap["nodes"]);
    check_jobs(&snap["cron"], true);

    // A running conchd: runs the good job, logs and skips the bad ones, serves them all.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut conchd = ctx.conchd("n1").args(["--status-addr", &addr]).spawn();
    wait_healthy(&addr, &mut conchd);
    assert!(
        wait_until(Duration::from_secs(20), || ok_runs(&ctx, "good", "n1") >= 3),
        "the valid job did not run beside the corrupted ones\n--- conchd stderr\n{}",
        conchd.stderr()
    );
    for path in [
        "/", "/cron", "/elect", "/sema", "/nodes", "/healthz", "/metrics",
    ] {
        let r = get(&addr, path);
        assert_eq!(r.code, 200, "GET {path}: {r:?}");
    }
    check_jobs(&get_json(&addr, "/cron"), true);
    check_elect(&get_json(&addr, "/elect"));
    check_sema(&get_json(&addr, "/sema"));
    let nodes = get_json(&addr, "/nodes");
    check_nodes(&nodes);
    assert!(by(&nodes, "node", "n1").get("unknown").is_none(), "{nodes}");
    let page = get(&addr, "/").body;
    for want in [
        "data-job=\"notjson\"",
        "data-job=\"a b\"",
        "invalid: ",
        "unknown holder",
        "data-node=\"ghost\"",
    ] {
        assert!(page.contains(want), "no {want:?} in the page:\n{page}");
    }

    // Three ticks of the valid job ran; the spec under "a b" (same schedule) and the
    // invalid ones did not, and nothing claimed their ticks.
    for (file, job) in [("ab-ran", "a b"), ("badsched-ran", "badsched")] {
        assert!(ctx.read(file).is_none(), "conchd ran the job {job:?}");
        let fires = ctx.etcd.get_prefix(&format!("{p}/v1/cron/fire/{job}/"));
        assert!(
            fires.is_empty(),
            "conchd claimed ticks of {job:?}: {fires:?}"
        );
    }
    assert!(
        ctx.etcd
            .get_prefix(&format!("{p}/v1/cron/fire/notjson/"))
            .is_empty()
    );
    let log = conchd.stderr();
    let logged = |needles: &[&str]| log.lines().any(|l| needles.iter().all(|n| l.contains(n)));
    assert!(
        logged(&["ignoring a job whose name is not valid", "a b"]),
        "{log}"
    );
    assert!(
        logged(&["ignoring an invalid job spec", "notjson"]),
        "{log}"
    );
    assert!(
        logged(&["ignoring an invalid job spec", "badsched"]),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    conchd.signal(Signal::TERM);
    let out = conchd.wait_timeout(Duration::from_secs(20));
    out.expect_code(0);
    // The garbage is still there: shown, never "repaired" or deleted.
    for (k, v) in &planted {
        let kvs = ctx.etcd.get_prefix(k);
        assert!(
            kvs.iter().any(|kv| kv.key == *k && kv.value == *v),
            "{k} changed: {kvs:?}"
        );
    }
    // `cron history` of the good job lists its runs and the unreadable record.
    let out = ctx
        .cron(["history", "good", "--json", "--limit", "100"])
        .run();
    out.expect_code(0);
    let h = json_lines(&out.stdout);
    assert!(
        h.iter().filter(|r| r["status"] == "ok").count() >= 3,
        "{}",
        out.stdout
    );
    assert_eq!(
        h.iter().filter(|r| r["status"] == "unknown").count(),
        1,
        "{}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// A plain HTTP/1.1 client: one request per connection, the response read by Content-Length.

const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) code: u16,
    head: String,
    pub(crate) body: String,
}

impl Resp {
    /// A response header's value (names are case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let body = body.unwrap_or("");
    let ctype = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json; charset=utf-8\r\n"
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{ctype}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{method} {path}: closed before the response head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut rest = buf[end + 4..].to_vec();
    let mut resp = Resp {
        code: head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line: {head:?}")))?,
        head,
        body: String::new(),
    };
    if method != "HEAD" {
        match resp.header("content-length").map(str::parse::<usize>) {
            Some(Ok(len)) => {
                while rest.len() < len {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{method} {path}: body ended at {} of {len}", rest.len()),
                        ));
                    }
                    rest.extend_from_slice(&chunk[..n]);
                }
                rest.truncate(len);
            }
            _ => {
                s.read_to_end(&mut rest)?;
            }
        }
    }
    resp.body = String::from_utf8_lossy(&rest).into_owned();
    Ok(resp)
}

#[track_caller]
pub(crate) fn get(addr: &str, path: &str) -> Resp {
    http(addr, "GET", path, None).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[track_caller]
pub(crate) fn get_json(addr: &str, path: &str) -> Value {
    let r = get(addr, path);
    assert_eq!(r.code, 200, "GET {path}: {r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "GET {path}: {r:?}"
    );
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {r:?}"))
}

/// Waits until conchd's `/healthz` says ok (it is watching and holds its lease).
#[track_caller]
fn wait_healthy(addr: &str, conchd: &mut Running) {
    let ok = wait_until(Duration::from_secs(20), || {
        http(addr, "GET", "/healthz", None).is_ok_and(|r| r.code == 200)
    });
    assert!(
        ok,
        "conchd at {addr} not healthy within 20s (exited: {:?})\n--- conchd stderr\n{}",
        conchd.try_wait().map(|o| o.code),
        conchd.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// The status API and page against a scene the test builds: a job that ran, an office held, a
// semaphore holder, a conchd node.

struct Scene {
    addr: String,
    conchd: Running,
    elect: Running,
    sema: Running,
}

impl Scene {
    /// What the scene's processes said: for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- conchd stderr\n{}\n--- elect stderr\n{}\n--- sema stderr\n{}",
            self.conchd.stderr(),
            self.elect.stderr(),
            self.sema.stderr()
        )
    }
}

fn scene(ctx: &Ctx) -> Scene {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut conchd = ctx
        .conchd("n1")
        .args(["--labels", "role=api", "--status-addr", &addr])
        .spawn();
    wait_healthy(&addr, &mut conchd);
    ctx.cron(["add", "tick", "--schedule", "@every 1s", "--", "true"])
        .run()
        .expect_code(0);
    ctx.wait_results("tick", 1, Duration::from_secs(20));
    let elect = ctx
        .elect("office1")
        .args(["--node", "e1", "--", "sleep", "120"])
        .spawn();
    let sema = ctx
        .conch()
        .args([
            "sema", "pool", "--max", "2", "--node", "s1", "--", "sleep", "120",
        ])
        .spawn();
    let sema_dir = format!("{}/v1/sema/pool/", ctx.prefix);
    assert!(
        wait_until(Duration::from_secs(10), || !ctx
            .office_keys("office1")
            .is_empty()
            && !ctx.etcd.get_prefix(&sema_dir).is_empty()),
        "the office and the semaphore were not taken\n--- elect\n{}\n--- sema\n{}",
        elect.stderr(),
        sema.stderr()
    );
    Scene {
        addr,
        conchd,
        elect,
        sema,
    }
}

#[test]
fn status_api_serves_jobs_offices_semaphores_nodes_metrics_and_refuses_writes() {
    let ctx = Ctx::new("cs-api");
    let mut scene = scene(&ctx);
    let addr = scene.addr.clone();

    let cron = get_json(&addr, "/cron");
    let tick = by(&cron, "name", "tick");
    assert_eq!(tick["spec"]["schedule"], "@every 1s", "{tick}");
    assert_eq!(tick["spec"]["tz"], "UTC", "{tick}");
    assert_eq!(tick["spec"]["cmd"], json!(["true"]), "{tick}");
    assert_eq!(tick["spec"]["paused"], false, "{tick}");
    assert!(tick.get("error").is_none(), "{tick}");
    let next = tick["next"].as_str().expect("next tick");
    assert!(next > rfc3339(now_unix() - 2).as_str(), "{tick}");
    assert!(
        matches!(tick["last"]["status"].as_str(), Some("ok" | "running")),
        "{tick}"
    );
    assert_eq!(tick["last"]["node"], "n1", "{tick}");

    let elect = get_json(&addr, "/elect");
    assert!(
        elect.as_array().is_some_and(|a| !a.is_empty()),
        "/elect is {elect} while {:?} holds\n{}",
        ctx.office_keys("office1"),
        scene.logs()
    );
    let office = by(&elect, "office", "office1");
    let holder = &office["holder"];
    assert_eq!(holder["node"], "e1", "{office}");
    assert_eq!(holder["cmd"], "sleep 120", "{office}");
    assert!(holder["rev"].as_i64().unwrap() > 0, "{office}");
    assert!(holder["pid"].as_i64().unwrap() > 0, "{office}");
    assert_eq!(
        holder["rev"].as_i64().unwrap(),
        ctx.office_keys("office1")[0].create_revision,
        "{office}"
    );
    assert_eq!(office["waiting"], json!([]), "{office}");

    let sema = get_json(&addr, "/sema");
    let pool = by(&sema, "name", "pool");
    assert_eq!(pool["max"], 2, "{pool}");
    assert_eq!(pool["spread"], false, "{pool}");
    assert_eq!(pool["holders"].as_array().unwrap().len(), 1, "{pool}");
    assert_eq!(pool["holders"][0]["node"], "s1", "{pool}");
    assert_eq!(pool["holders"][0]["cmd"], "sleep 120", "{pool}");
    assert_eq!(pool["waiters"], json!([]), "{pool}");

    let nodes = get_json(&addr, "/nodes");
    let n1 = by(&nodes, "node", "n1");
    assert_eq!(n1["labels"], json!({"role": "api"}), "{n1}");
    assert_eq!(n1["pid"], scene.conchd.pid(), "{n1}");
    assert!(!n1["version"].as_str().unwrap().is_empty(), "{n1}");
    assert!(n1["started"].as_str().unwrap().ends_with('Z'), "{n1}");

    let m = get(&addr, "/metrics");
    assert_eq!(m.code, 200, "{m:?}");
    assert!(
        m.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{m:?}"
    );
    assert!(
        m.body
            .contains("# TYPE conch_cron_ticks_claimed_total counter"),
        "{}",
        m.body
    );
    let claimed: f64 = m
        .body
        .lines()
        .find_map(|l| l.strip_prefix("conch_cron_ticks_claimed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no conch_cron_ticks_claimed_total sample:\n{}", m.body));
    assert!(claimed >= 1.0, "{}", m.body);
    assert!(
        m.body.contains("conch_conchd_info{node=\"n1\""),
        "{}",
        m.body
    );

    let h = get(&addr, "/healthz");
    assert_eq!((h.code, h.body.as_str()), (200, "ok\n"), "{h:?}");
    let nf = get(&addr, "/no/such/path");
    assert_eq!(nf.code, 404, "{nf:?}");
    // A query string does not change the route.
    assert_eq!(get(&addr, "/healthz?x=1").code, 200);

    let before = ctx.keys();
    for method in ["POST", "PUT", "DELETE", "HEAD", "PATCH"] {
        for path in ["/", "/cron", "/nosuch"] {
            let body = matches!(method, "POST" | "PUT" | "PATCH").then_some("{\"paused\":true}");
            let r =
                http(&addr, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            assert_eq!(r.code, 405, "{method} {path}: {r:?}");
            assert_eq!(r.header("allow"), Some("GET"), "{method} {path}: {r:?}");
        }
    }
    let after = ctx.keys();
    let cron_jobs = |kvs: &[crate::harness::Kv]| -> Vec<(String, String)> {
        kvs.iter()
            .filter(|kv| kv.key.contains("/v1/cron/job/"))
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect()
    };
    assert_eq!(
        cron_jobs(&before),
        cron_jobs(&after),
        "a non-GET changed a job"
    );

    // `conch status --json` prints the same structs, read straight from etcd.
    let out = ctx.conch().args(["status", "--json"]).run();
    out.expect_code(0);
    let snap: Value = serde_json::from_str(out.stdout.trim()).expect("status --json");
    assert_eq!(by(&snap["elect"], "office", "office1"), office);
    assert_eq!(by(&snap["sema"], "name", "pool"), pool);
    assert_eq!(by(&snap["nodes"], "node", "n1"), n1);
    let st = by(&snap["cron"], "name", "tick");
    assert_eq!(st["spec"], tick["spec"]);
    assert_eq!(st["last"]["node"], "n1", "{st}");
    assert!(snap["revision"].as_i64().unwrap() > 0, "{snap}");

    scene.conchd.signal(Signal::TERM);
    scene
        .conchd
        .wait_timeout(Duration::from_secs(20))
        .expect_code(0);
}

// ---------------------------------------------------------------------------------------------
// The page in a real browser: headless Chromium through chromedriver's WebDriver HTTP API.

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An executable on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// chromedriver with one browser session; both end on drop (also when the test fails).
struct Browser {
    addr: String,
    driver: Child,
    session: Option<String>,
}

impl Browser {
    fn start(ctx: &Ctx) -> Browser {
        let missing = |what: &str| -> ! {
            panic!(
                "{what} is not installed, so the status page cannot be tested in a browser: \
                 run scripts/ensure-deps.sh (Debian: apt-get install chromium chromium-driver)"
            )
        };
        let driver_bin = which("chromedriver").unwrap_or_else(|| missing("chromedriver"));
        let chromium = which("chromium")
            .or_else(|| which("chromium-browser"))
            .unwrap_or_else(|| missing("chromium"));
        let port = free_port();
        let log = std::fs::File::create(ctx.path("chromedriver.log")).expect("chromedriver.log");
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"))
            // The tag reaches chromedriver and the browser's main process (its helpers end
            // with it): should the test die before Drop, the Ctx kills them.
            .env(TAG_VAR, &ctx.tag)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        proc::die_with_parent(&mut cmd, Signal::KILL);
        let driver = cmd.spawn().expect("cannot start chromedriver");
        let mut b = Browser {
            addr: format!("127.0.0.1:{port}"),
            driver,
            session: None,
        };
        let ready = wait_until(Duration::from_secs(20), || {
            b.call("GET", "/status", None)
                .is_ok_and(|(code, v)| code == 200 && v["value"]["ready"] == true)
        });
        assert!(
            ready,
            "chromedriver not ready within 20s:\n{}",
            ctx.read("chromedriver.log").unwrap_or_default()
        );
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            },
        }}});
        let (code, v) = b
            .call("POST", "/session", Some(&caps))
            .expect("POST /session");
        assert_eq!(code, 200, "cannot start a browser session: {v:#}");
        b.session = Some(
            v["value"]["sessionId"]
                .as_str()
                .unwrap_or_else(|| panic!("no sessionId in {v}"))
                .to_string(),
        );
        b
    }

    /// One WebDriver call: (HTTP status, JSON body).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> io::Result<(u16, Value)> {
        let body = body.map(Value::to_string);
        let r = http(&self.addr, method, path, body.as_deref())?;
        let v = serde_json::from_str(&r.body)
            .map_err(|e| io::Error::other(format!("{method} {path}: not JSON ({e}): {r:?}")))?;
        Ok((r.code, v))
    }

    /// A session command; `Err` carries WebDriver's error (e.g. a stale element while the page
    /// refreshes itself).
    fn cmd(&self, method: &str, rel: &str, body: Option<Value>) -> Result<Value, String> {
        let sid = self.session.as_deref().expect("a session");
        let path = format!("/session/{sid}{rel}");
        match self.call(method, &path, body.as_ref()) {
            Ok((200, v)) => Ok(v["value"].clone()),
            Ok((code, v)) => Err(format!("{method} {rel}: {code} {v}")),
            Err(e) => Err(format!("{method} {rel}: {e}")),
        }
    }

    fn exec(&self, script: &str) -> Result<Value, String> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The visible text of every element matching `css`.
    fn texts(&self, css: &str) -> Result<Vec<String>, String> {
        let found = self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        let mut out = vec![];
        for e in found.as_array().cloned().unwrap_or_default() {
            let id = e[ELEMENT].as_str().ok_or(format!("no element id in {e}"))?;
            let t = self.cmd("GET", &format!("/element/{id}/text"), None)?;
            out.push(t.as_str().unwrap_or("").to_string());
        }
        Ok(out)
    }

    /// The text of the one element matching `css`, retried while the page reloads.
    #[track_caller]
    fn text_of(&self, css: &str) -> String {
        let mut last = String::new();
        wait_for(Duration::from_secs(15), || match self.texts(css) {
            Ok(t) if t.len() == 1 => Some(t[0].clone()),
            Ok(t) => {
                last = format!("{} elements: {t:?}", t.len());
                None
            }
            Err(e) => {
                last = e;
                None
            }
        })
        .unwrap_or_else(|| panic!("no single element {css} in the page: {last}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(sid) = self.session.take() {
            let _ = self.call("DELETE", &format!("/session/{sid}"), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn status_page_in_a_headless_browser_shows_everything_and_loads_nothing_from_elsewhere() {
    let ctx = Ctx::new("cs-browser");
    let scene = scene(&ctx);
    let browser = Browser::start(&ctx);
    let url = format!("http://{}/", scene.addr);
    browser
        .cmd("POST", "/url", Some(json!({"url": url})))
        .expect("navigate to the status page");
    let title = browser.cmd("GET", "/title", None).expect("title");
    assert_eq!(title, "conch status: n1");

    let job = browser.text_of("tr[data-job=\"tick\"]");
    for want in ["tick", "@every 1s", "UTC", "n1", "true"] {
        assert!(job.contains(want), "job row {job:?} lacks {want:?}");
    }
    assert!(
        job.contains(" ok ") || job.contains(" running "),
        "job row {job:?} shows no last status"
    );
    let office = browser.text_of("tr[data-office=\"office1\"]");
    for want in ["office1", "e1", "sleep 120"] {
        assert!(
            office.contains(want),
            "office row {office:?} lacks {want:?}"
        );
    }
    let sema = browser.text_of("tr[data-sema=\"pool\"]");
    for want in ["pool", "1/2", "s1", "sleep 120"] {
        assert!(sema.contains(want), "semaphore row {sema:?} lacks {want:?}");
    }
    let node = browser.text_of("tr[data-node=\"n1\"]");
    for want in ["n1", "role=api"] {
        assert!(node.contains(want), "node row {node:?} lacks {want:?}");
    }
    let health = browser.text_of("#health");
    assert!(health.starts_with("healthy"), "{health:?}");
    // Served on loopback: no exposure warning.
    assert_eq!(browser.texts("#exposed").unwrap(), Vec::<String>::new());

    // Nothing loaded from anywhere: no resource fetched, no script, no reference to another host.
    // (The browser's own request for /favicon.ico is the only fetch allowed.)
    let fetched = browser
        .exec("return performance.getEntriesByType('resource').map(e => e.name)")
        .expect("resource entries");
    for r in fetched.as_array().unwrap() {
        assert_eq!(
            r.as_str(),
            Some(format!("{url}favicon.ico").as_str()),
            "the page fetched a resource: {fetched}"
        );
    }
    let refs = browser
        .exec(
            "return Array.from(document.querySelectorAll('[src],[href],script,link,iframe,img'))\
             .map(e => e.tagName + ' ' + (e.getAttribute('src') || e.getAttribute('href') || ''))",
        )
        .expect("references");
    for r in refs.as_array().unwrap() {
        let r = r.as_str().unwrap();
        assert!(
            r.starts_with("A /"),
            "the page refers to {r:?}: only its own relative links are allowed"
        );
    }
    let html = browser
        .exec("return document.documentElement.outerHTML")
        .expect("outerHTML");
    let html = html.as_str().unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "the page names another host:\n{html}"
    );

    // It refreshes itself: a meta refresh, and the document is actually reloaded.
    let refresh = browser
        .exec("return document.querySelector('meta[http-equiv=\"refresh\"]')?.getAttribute('content')")
        .expect("meta refresh");
    let secs: u32 = refresh
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no meta refresh with a number of seconds: {refresh}"));
    assert!((1..=60).contains(&secs), "refresh every {secs}s");
    browser
        .exec("window.conchMarker = 42; return true")
        .expect("set marker");
    let reloaded = wait_until(Duration::from_secs(u64::from(secs) * 3), || {
        browser.exec("return window.conchMarker === undefined") == Ok(json!(true))
    });
    assert!(
        reloaded,
        "the page did not reload itself within {}s",
        secs * 3
    );
    // After the reload it still shows the scene.
    assert!(
        browser
            .text_of("tr[data-job=\"tick\"]")
            .contains("@every 1s")
    );
}

// ---------------------------------------------------------------------------------------------
// --daemonize --pidfile --log-file

fn node_record(ctx: &Ctx, node: &str) -> Option<Value> {
    let key = format!("{}/v1/node/{node}", ctx.prefix);
    ctx.etcd
        .get_prefix(&key)
        .into_iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| serde_json::from_str(&kv.value).ok())
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`.
fn stat_field(pid: i32, n: usize) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(n - 3)?.parse().ok()
}

fn pid_in(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn daemonize_detaches_writes_its_pidfile_refuses_a_second_start_and_stops_on_sigterm() {
    let ctx = Ctx::new("cs-daemon");
    let pidfile = ctx.path("conchd.pid");
    let logfile = ctx.path("conchd.log");
    let (pf, lf) = (pidfile.to_str().unwrap(), logfile.to_str().unwrap());
    let daemon = |node: &str| {
        ctx.conchd(node)
            .args(["--daemonize", "--pidfile", pf, "--log-file", lf])
    };

    // A stale pidfile (its process is gone) does not stop a start.
    let mut gone = Command::new("true").spawn().expect("true");
    gone.wait().expect("wait");
    std::fs::write(&pidfile, format!("{}\n", gone.id())).expect("stale pidfile");

    let out = daemon("d1").run();
    out.expect_code(0);
    assert!(
        out.elapsed < Duration::from_secs(5),
        "--daemonize took {:?} to return",
        out.elapsed
    );
    let pid = pid_in(&pidfile).expect("the pidfile holds a pid");
    assert!(out.stderr.contains(&format!("pid {pid}")), "{}", out.stderr);
    assert!(alive(pid), "the daemon {pid} is not alive");
    // The harness finds (and on failure kills) it by the tag it inherited.
    assert!(
        ctx.tagged_processes().contains(&pid),
        "the daemon does not carry {TAG_VAR}: the test could leak it"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        cmdline.split(|b| *b == 0).any(|a| a == b"conchd"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    // Detached: its own session, not the test's child, stdin from /dev/null.
    assert_eq!(
        stat_field(pid, 6),
        Some(i64::from(pid)),
        "not a session leader"
    );
    assert_ne!(stat_field(pid, 4), Some(i64::from(std::process::id())));
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/0")).ok(),
        Some(PathBuf::from("/dev/null"))
    );
    let rec = wait_for(Duration::from_secs(15), || node_record(&ctx, "d1")).unwrap_or_else(|| {
        panic!(
            "the daemon did not register:\n{}",
            ctx.read("conchd.log").unwrap_or_default()
        )
    });
    assert_eq!(rec["pid"], pid, "{rec}");
    // Its log goes to --log-file: registered and watching, it says it is ready.
    assert!(
        wait_until(Duration::from_secs(15), || ctx
            .read("conchd.log")
            .is_some_and(|l| l.contains("ready"))),
        "no \"ready\" in --log-file:\n{}",
        ctx.read("conchd.log").unwrap_or_default()
    );

    // A second start with the same pidfile is refused, naming the running pid.
    let out = daemon("d2").run();
    out.expect_code(75);
    assert!(
        out.stderr.contains(&pid.to_string()) && out.stderr.contains("already running"),
        "{}",
        out.stderr
    );
    // So is a foreground conchd given the same pidfile.
    let out = ctx.conchd("d3").args(["--pidfile", pf]).run();
    out.expect_code(75);
    assert!(out.stderr.contains(&pid.to_string()), "{}", out.stderr);
    assert_eq!(
        pid_in(&pidfile),
        Some(pid),
        "a refused start touched the pidfile"
    );
    for n in ["d2", "d3"] {
        assert!(
            node_record(&ctx, n).is_none(),
            "a refused conchd {n} registered"
        );
    }

    // SIGTERM: it stops, removes its pidfile and its node key.
    proc::signal(pid, Signal::TERM);
    assert!(
        wait_until(Duration::from_secs(20), || !alive(pid)),
        "the daemon did not stop on SIGTERM"
    );
    assert!(
        wait_until(Duration::from_secs(5), || !pidfile.exists()),
        "the pidfile outlived the daemon"
    );
    assert!(
        node_record(&ctx, "d1").is_none(),
        "the node key outlived the daemon"
    );
    let log = ctx.read("conchd.log").unwrap_or_default();
    assert!(log.contains("conchd stopped"), "{log}");

    // A foreground conchd with --pidfile (as under a supervisor) writes it too, but stays in
    // the session it was started in: only --daemonize detaches.
    let mut fg = ctx.conchd("f1").args(["--pidfile", pf]).spawn();
    let rec = wait_for(Duration::from_secs(15), || node_record(&ctx, "f1"))
        .unwrap_or_else(|| panic!("f1 did not register:\n{}", fg.stderr()));
    assert_eq!(rec["pid"], fg.pid(), "{rec}");
    assert_eq!(pid_in(&pidfile), Some(fg.pid()));
    assert_eq!(
        stat_field(fg.pid(), 6),
        stat_field(std::process::id() as i32, 6),
        "a foreground conchd left its caller's session"
    );
    fg.signal(Signal::TERM);
    fg.wait_timeout(Duration::from_secs(20)).expect_code(0);
    assert!(
        !pidfile.exists(),
        "the pidfile outlived the foreground conchd"
    );
}

// ---------------------------------------------------------------------------------------------
// NOTIFY_SOCKET: READY=1, WATCHDOG=1, STOPPING=1.

/// Receives datagrams until `until` holds for one of them or `timeout` passes; every message
/// received is appended to `got` with the time it came.
fn recv_until(
    sock: &UnixDatagram,
    got: &mut Vec<(Instant, String)>,
    timeout: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = until(&msg);
                got.push((Instant::now(), msg));
                if hit {
                    return true;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    false
}

#[test]
fn notify_socket_gets_ready_watchdog_pings_and_stopping() {
    let ctx = Ctx::new("cs-notify");
    assert!(
        std::env::var_os("WATCHDOG_PID").is_none(),
        "the test runs with WATCHDOG_PID set; conchd would inherit it"
    );
    let path = ctx.path("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut conchd = ctx
        .conchd("n1")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "1000000")
        .spawn();
    let mut got = vec![];
    let ready = recv_until(&sock, &mut got, Duration::from_secs(20), |m| m == "READY=1");
    assert!(
        ready,
        "no READY=1 (got {:?})\n--- conchd stderr\n{}",
        got.iter().map(|(_, m)| m).collect::<Vec<_>>(),
        conchd.stderr()
    );
    let ready_at = got.last().unwrap().0;
    // READY=1 comes only once conchd is registered.
    assert!(
        node_record(&ctx, "n1").is_some_and(|r| r["pid"] == conchd.pid()),
        "READY=1 before conchd registered under node/"
    );
    // WATCHDOG_USEC=1s: pings every 0.5s; at least two within 3s.
    let mut pings = 0;
    recv_until(&sock, &mut got, Duration::from_secs(3), |m| {
        if m == "WATCHDOG=1" {
            pings += 1;
        }
        pings >= 2
    });
    assert!(
        pings >= 2,
        "{pings} WATCHDOG=1 within 3s of READY=1: {:?}",
        got.iter()
            .map(|(t, m)| (t.saturating_duration_since(ready_at), m))
            .collect::<Vec<_>>()
    );
    conchd.signal(Signal::TERM);
    let stopping = recv_until(&sock, &mut got, Duration::from_secs(10), |m| {
        m == "STOPPING=1"
    });
    let out = conchd.wait_timeout(Duration::from_secs(20));
    assert!(
        stopping,
        "no STOPPING=1 on SIGTERM: {:?}\n--- conchd stderr\n{}",
        got.iter().map(|(_, m)| m).collect::<Vec<_>>(),
        out.stderr
    );
    out.expect_code(0);
    let readies = got.iter().filter(|(_, m)| m == "READY=1").count();
    assert_eq!(readies, 1, "READY=1 sent {readies} times");
    for (_, m) in &got {
        assert!(
            matches!(m.as_str(), "READY=1" | "WATCHDOG=1" | "STOPPING=1"),
            "unexpected notification {m:?}"
        );
    }
}
