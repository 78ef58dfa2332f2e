//! Mutual TLS and etcd RBAC end to end (quality.md §4–§5): a real etcd with
//! `--client-cert-auth`, a CA made for this run, and auth on, with conch's user limited to the
//! test's prefix (`harness/tls.rs`). What works through it (elect, sema, cron add/ls, a conchd
//! running a job), what is refused with 69 and a message that says which (wrong CA, no client
//! certificate, a certificate from another CA, wrong password, no permission on the prefix),
//! and that the password shows up nowhere: not in conch's log, not in holder records or other
//! keys, not on conchd's status page or API, not in the child's environment or command line.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::tls::{self, OUTSIDER, OUTSIDER_PASSWORD, PASSWORD, USER};
use crate::harness::{Conch, Ctx, Running, Signal, wait_until};

const SOON: Duration = Duration::from_secs(10);

/// The server's CA and the ordinary client certificate (CN not an etcd user), through the
/// environment as a Kubernetes-style deployment would pass them; conch logs at its most
/// verbose (`CONCH_VERBOSE`), so no debug line may show a secret either.
fn mtls(c: Conch) -> Conch {
    let pki = &tls::server().pki;
    c.env("CONCH_VERBOSE", "1")
        .env("CONCH_CACERT", &pki.ca)
        .env("CONCH_CERT", &pki.client_cert)
        .env("CONCH_KEY", &pki.client_key)
}

/// [`mtls`] as the limited user, the password in `CONCH_PASSWORD`.
fn limited(c: Conch) -> Conch {
    mtls(c)
        .env("CONCH_USER", USER)
        .env("CONCH_PASSWORD", PASSWORD)
}

/// Every place a secret must not be: fails naming where it was found.
#[track_caller]
fn assert_no_secret(what: &str, text: &str) {
    for secret in [PASSWORD, OUTSIDER_PASSWORD] {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            lines.is_empty(),
            "the etcd password appears in {what}: {lines:?}"
        );
    }
}

/// `/proc/<pid>/<file>` with NULs as newlines.
fn proc_text(pid: i32, file: &str) -> String {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/{file}: {e}"))
}

fn ppid(pid: i32) -> i32 {
    proc_text(pid, "status")
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PPid for {pid}"))
}

/// Starts `conch`, whose child writes its pid to `<label>.pid` and sleeps; checks, while the
/// child runs, that the password is in no key under the prefix (the holder record among
/// them), not in the child's or its supervisor's environment or command line; then stops
/// conch and checks its log. Returns conch's stderr.
fn hold_and_inspect(ctx: &Ctx, label: &str, conch: Conch) -> String {
    let mut running = conch
        .arg("--")
        .args(ctx.sh(&format!(
            "echo $$ > {{dir}}/{label}.tmp; mv {{dir}}/{label}.tmp {{dir}}/{label}.pid; exec sleep 1000"
        )))
        .spawn();
    let pid: i32 = ctx
        .wait_file_of(&format!("{label}.pid"), SOON, &mut running)
        .parse()
        .expect("child pid");
    let keys = ctx.keys();
    assert!(
        keys.iter().any(|kv| kv.lease != 0),
        "{label}: no holder record: {keys:?}"
    );
    for kv in &keys {
        assert_no_secret(&format!("{label}: the value of {}", kv.key), &kv.value);
    }
    let env = proc_text(pid, "environ");
    assert!(
        env.lines().any(|l| l.starts_with("CONCH_REV=")),
        "{label}: not the child's environment: {env}"
    );
    assert!(
        !env.lines().any(|l| l.starts_with("CONCH_PASSWORD=")),
        "{label}: CONCH_PASSWORD reached the child"
    );
    assert_no_secret(&format!("{label}: the child's environment"), &env);
    assert_no_secret(
        &format!("{label}: the child's command line"),
        &proc_text(pid, "cmdline"),
    );
    let sup = ppid(pid);
    assert_ne!(sup, running.pid(), "{label}: expected a supervisor between");
    assert_no_secret(
        &format!("{label}: the supervisor's environment"),
        &proc_text(sup, "environ"),
    );
    assert_no_secret(
        &format!("{label}: the supervisor's command line"),
        &proc_text(sup, "cmdline"),
    );
    running.signal(Signal::TERM);
    let out = running.wait_timeout(SOON);
    assert_eq!(out.code, Some(143), "{label}: {out:?}");
    assert_no_secret(&format!("{label}: conch's stderr"), &out.stderr);
    out.stderr
}

#[test]
fn elect_and_sema_run_through_mutual_tls_as_the_limited_user_and_leak_no_password() {
    let ctx = tls::ctx("tls-hold");
    // The password in CONCH_PASSWORD.
    let log = hold_and_inspect(&ctx, "elect", limited(ctx.elect("db")));
    assert!(log.contains("db"), "elect logged nothing about db: {log}");
    // The password inline in CONCH_USER, JSON logs.
    hold_and_inspect(
        &ctx,
        "sema",
        mtls(ctx.conch())
            .env("CONCH_USER", format!("{USER}:{PASSWORD}"))
            .args(["--log-format", "json", "sema", "pool", "--max", "2"]),
    );
    // The password on conch's own command line (--user, --password): the child's and the
    // supervisor's command lines and environments still lack it.
    hold_and_inspect(
        &ctx,
        "argv",
        mtls(ctx.elect("db2")).args(["--user", USER, "--password", PASSWORD]),
    );
    // The password from --password-file; a quick run to the end.
    let file = ctx.path("password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let out = mtls(ctx.elect("quick"))
        .env("CONCH_USER", USER)
        .arg("--password-file")
        .arg(&file)
        .args(["--nonblock", "--"])
        .args(ctx.sh("echo ran > {dir}/ran"))
        .run();
    out.expect_code(0);
    assert_eq!(ctx.read("ran").as_deref(), Some("ran\n"));
    assert_no_secret("conch's stderr (--password-file)", &out.stderr);
}

#[test]
fn the_certificate_cn_is_the_user_when_no_password_is_sent() {
    let ctx = tls::ctx("tls-cn");
    let pki = &tls::server().pki;
    // CN=conch and no --user: etcd takes the certificate's CN as the user.
    let out = ctx
        .elect("db")
        .env("CONCH_CACERT", &pki.ca)
        .env("CONCH_CERT", &pki.cn_cert)
        .env("CONCH_KEY", &pki.cn_key)
        .args(["--nonblock", "--"])
        .args(ctx.sh("echo ran > {dir}/ran"))
        .run();
    out.expect_code(0);
    assert_eq!(ctx.read("ran").as_deref(), Some("ran\n"));
    // A certificate whose CN is no user, and no --user: etcd knows nobody; refused before
    // anything ran.
    let out = mtls(ctx.elect("db2"))
        .args(["--nonblock", "--"])
        .args(ctx.sh("echo ran > {dir}/ran2"))
        .run();
    out.expect_code(69);
    assert!(
        // etcd 3.5 says "user name not found" at connect, 3.4 "permission denied" at the
        // first write: either way the message must point at the certificate's CN.
        (out.stderr.contains("user name not found") || out.stderr.contains("permission denied"))
            && out.stderr.contains("CN"),
        "the message should say etcd took the certificate's CN as the user: {}",
        out.stderr
    );
    assert!(ctx.read("ran2").is_none(), "the child ran: {out:?}");
    assert!(
        !ctx.keys().iter().any(|kv| kv.key.contains("/db2/")),
        "a key was written for db2: {:?}",
        ctx.keys()
    );
}

/// One way of being refused: how to set conch up, and words its message must contain (all of
/// one of the alternatives, case-insensitive).
struct Refusal {
    what: &'static str,
    setup: fn(Conch) -> Conch,
    mentions: &'static [&'static [&'static str]],
}

fn refusals() -> Vec<Refusal> {
    vec![
        Refusal {
            what: "a CA that did not sign the server's certificate",
            setup: |c| limited(c).env("CONCH_CACERT", &tls::server().pki.rogue_ca),
            mentions: &[&["tls", "certificate"]],
        },
        Refusal {
            what: "no client certificate",
            setup: |c| {
                c.env("CONCH_CACERT", &tls::server().pki.ca)
                    .env("CONCH_USER", USER)
                    .env("CONCH_PASSWORD", PASSWORD)
            },
            mentions: &[&["tls", "certificate"]],
        },
        Refusal {
            what: "a client certificate from an unrelated CA",
            setup: |c| {
                let pki = &tls::server().pki;
                limited(c)
                    .env("CONCH_CERT", &pki.rogue_cert)
                    .env("CONCH_KEY", &pki.rogue_key)
            },
            mentions: &[&["tls", "certificate"]],
        },
        Refusal {
            what: "a wrong password",
            setup: |c| mtls(c).env("CONCH_USER", format!("{USER}:not-{PASSWORD}")),
            mentions: &[&["credentials"], &["authentication"]],
        },
        Refusal {
            what: "a user without permission on the prefix",
            setup: |c| {
                mtls(c)
                    .env("CONCH_USER", OUTSIDER)
                    .env("CONCH_PASSWORD", OUTSIDER_PASSWORD)
            },
            mentions: &[&["permission", "{prefix}"]],
        },
    ]
}

#[track_caller]
fn expect_refused(ctx: &Ctx, r: &Refusal, cmd: &str, out: &crate::harness::conch::Output) {
    out.expect_code(69);
    // Shown with --nocapture: what an operator reads for each refusal.
    eprintln!("{cmd} with {} ({:?}):\n{}", r.what, out.elapsed, out.stderr);
    let stderr = out.stderr.to_lowercase();
    assert!(
        r.mentions.iter().any(|all| all
            .iter()
            .all(|m| stderr.contains(&m.replace("{prefix}", &ctx.prefix).to_lowercase()))),
        "{cmd} with {}: the message should say which ({:?}):\n{}",
        r.what,
        r.mentions,
        out.stderr
    );
    assert_no_secret(&format!("{cmd}'s stderr with {}", r.what), &out.stderr);
}

#[test]
fn elect_sema_and_cron_add_are_refused_with_69_saying_why_and_change_nothing() {
    let ctx = tls::ctx("tls-refused");
    for r in refusals() {
        let runs: [(&str, Conch); 3] = [
            (
                "elect",
                ctx.elect("db")
                    .args(["--", "sh", "-c"])
                    .arg(format!("echo ran > {}/ran", ctx.dir.display())),
            ),
            (
                "sema",
                ctx.conch()
                    .args(["sema", "pool", "--max", "2", "--", "sh", "-c"])
                    .arg(format!("echo ran > {}/ran", ctx.dir.display())),
            ),
            (
                "cron add",
                ctx.cron(["add", "job", "--schedule", "@every 1s", "--", "sh", "-c"])
                    .arg(format!("echo ran > {}/ran", ctx.dir.display())),
            ),
        ];
        for (cmd, c) in runs {
            let out = (r.setup)(c).run();
            expect_refused(&ctx, &r, cmd, &out);
            assert!(
                out.elapsed < Duration::from_secs(5),
                "{cmd} with {}: took {:?}",
                r.what,
                out.elapsed
            );
            assert!(
                ctx.read("ran").is_none(),
                "{cmd} with {}: the child ran",
                r.what
            );
            assert!(
                ctx.keys().is_empty(),
                "{cmd} with {}: keys were written: {:?}",
                r.what,
                ctx.keys()
            );
        }
    }
}

#[test]
fn conchd_refused_by_etcd_exits_69_and_runs_nothing() {
    let ctx = tls::ctx("tls-conchd-refused");
    // A job conchd would run at once if it could read it.
    limited(ctx.cron(["add", "job", "--schedule", "@every 1s", "--", "sh", "-c"]))
        .arg(format!("echo ran >> {}/ran", ctx.dir.display()))
        .run()
        .expect_code(0);
    let before = ctx.keys();
    for r in refusals() {
        let out = (r.setup)(ctx.conchd("n1")).run();
        expect_refused(&ctx, &r, "conchd", &out);
        assert!(
            ctx.read("ran").is_none(),
            "conchd with {}: the job ran",
            r.what
        );
        let after: Vec<String> = ctx.keys().into_iter().map(|kv| kv.key).collect();
        let before: Vec<String> = before.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(after, before, "conchd with {}: keys changed", r.what);
    }
}

/// A minimal HTTP GET: (status code, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(SOON))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[test]
fn cron_add_ls_and_conchd_run_a_job_through_mutual_tls_and_leak_no_password() {
    let ctx = tls::ctx("tls-cron");
    let file = ctx.path("password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let out = mtls(ctx.cron(["add", "tick", "--schedule", "@every 1s", "--", "sh", "-c"]))
        .arg(format!(
            "env > {d}/env.tmp; tr '\\0' '\\n' < /proc/$PPID/environ > {d}/sup.tmp; \
             tr '\\0' ' ' < /proc/$PPID/cmdline >> {d}/sup.tmp; \
             mv {d}/sup.tmp {d}/sup; mv {d}/env.tmp {d}/env",
            d = ctx.dir.display()
        ))
        .env("CONCH_USER", USER)
        .env("CONCH_PASSWORD_FILE", &file)
        .run();
    out.expect_code(0);
    assert_no_secret("cron add's stderr", &out.stderr);
    let ls = limited(ctx.cron(["ls"])).run();
    ls.expect_code(0);
    assert!(ls.stdout.contains("tick"), "cron ls: {ls:?}");
    assert_no_secret("cron ls's output", &format!("{}{}", ls.stdout, ls.stderr));

    let addr = format!("127.0.0.1:{}", crate::harness::etcd::free_port());
    let mut conchd: Running = limited(ctx.conchd("n1"))
        .args(["--status-addr", &addr])
        .spawn();
    let env = ctx.wait_file_of("env", SOON, &mut conchd);
    assert!(
        env.contains("CONCH_TICK="),
        "not the job's environment: {env}"
    );
    assert!(
        !env.lines().any(|l| l.starts_with("CONCH_PASSWORD=")),
        "CONCH_PASSWORD reached the job"
    );
    assert_no_secret("the job's environment", &env);
    assert_no_secret(
        "the job's supervisor's environment and command line",
        &ctx.read("sup")
            .expect("the job moves `sup` into place before `env`"),
    );
    let results = ctx.wait_results("tick", 1, SOON);
    assert_eq!(
        results[0].1["status"], "ok",
        "the job's result: {results:?}"
    );
    // Everything conchd wrote: node record, claims, results.
    for kv in ctx.keys() {
        assert_no_secret(&format!("the value of {}", kv.key), &kv.value);
    }
    let up = wait_until(SOON, || {
        http_get(&addr, "/healthz").is_ok_and(|(c, _)| c == 200)
    });
    assert!(up, "conchd's status API not healthy:\n{}", conchd.stderr());
    for path in ["/", "/cron", "/nodes", "/elect", "/sema", "/metrics"] {
        let (code, body) = http_get(&addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(code, 200, "GET {path}: {body}");
        assert_no_secret(&format!("GET {path}"), &body);
        if path == "/cron" {
            assert!(body.contains("tick"), "GET /cron lacks the job: {body}");
        }
    }
    conchd.signal(Signal::TERM);
    let out = conchd.wait_timeout(Duration::from_secs(40));
    assert_eq!(out.code, Some(0), "conchd: {out:?}");
    assert_no_secret("conchd's stderr", &out.stderr);
}
