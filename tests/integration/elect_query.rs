//! The read-only queries of `conch elect`: `--who`, `--assert`, `--watch`. They print
//! holder records (stdout, one per line) and never create a lease or a key.

use crate::elect::{Holder, SOON, hex, json};
use crate::harness::{Ctx, Signal};

#[test]
fn who_on_a_vacant_office_exits_1_and_prints_nothing() {
    let ctx = Ctx::new("elect-who-vacant");
    let out = ctx.elect("v").arg("--who").run();
    out.expect_code(1);
    assert_eq!(out.stdout, "", "nothing on stdout when vacant");
    let out = ctx.elect("v").args(["--who", "--json"]).run();
    out.expect_code(1);
    assert_eq!(
        out.stdout, "",
        "nothing on stdout when vacant, also with --json"
    );
    assert!(
        ctx.keys().is_empty(),
        "--who creates no key: {:?}",
        ctx.keys()
    );
}

#[test]
fn who_prints_the_holder_as_text_and_json() {
    let ctx = Ctx::new("elect-who");
    let h = Holder::start(&ctx, "a", "w", &["--node", "whonode"]);
    let out = ctx.elect("w").arg("--who").run();
    out.expect_code(0);
    let lines = out.lines();
    assert_eq!(lines.len(), 1, "one record per line: {:?}", out.stdout);
    let line = lines[0];
    let head = format!("w whonode pid={} since=", h.conch.pid());
    assert!(
        line.starts_with(&head),
        "{line:?} should start with {head:?}"
    );
    assert!(
        line.contains(&format!(" rev={} ", h.rev)),
        "{line:?} lacks rev={}",
        h.rev
    );
    assert!(line.contains(" cmd=sh -c "), "{line:?} lacks the command");

    let out = ctx.elect("w").args(["--who", "--json"]).run();
    out.expect_code(0);
    let lines = out.lines();
    assert_eq!(lines.len(), 1, "one record per line: {:?}", out.stdout);
    let v = json(lines[0]);
    assert_eq!(v["office"], "w", "{v}");
    assert_eq!(v["node"], "whonode", "{v}");
    assert_eq!(v["rev"].as_i64(), Some(h.rev), "{v}");
    assert_eq!(v["pid"].as_i64(), Some(i64::from(h.conch.pid())), "{v}");
    assert_eq!(
        hex(v["lease"].as_str().unwrap_or_default()),
        hex(&h.lease),
        "{v}"
    );
    assert_eq!(ctx.office_keys("w").len(), 1, "--who adds no key");
}

#[test]
fn who_shows_a_foreign_value_as_unknown_without_crashing() {
    let ctx = Ctx::new("elect-who-foreign");
    ctx.etcd.put(
        &format!("{}0123abcd", ctx.office_prefix("f")),
        "not a holder record {",
    );
    let out = ctx.elect("f").arg("--who").run();
    assert_ne!(out.code, Some(101), "conch panicked: {}", out.stderr);
    out.expect_code(0);
    assert!(
        out.stdout.contains("unknown"),
        "shown as unknown: {:?}",
        out.stdout
    );
    let out = ctx.elect("f").args(["--who", "--json"]).run();
    out.expect_code(0);
    for line in out.lines() {
        json(line);
    }
}

#[test]
fn assert_checks_node_and_min_rev() {
    let ctx = Ctx::new("elect-assert");
    let assert = |args: &[&str]| ctx.elect("a").arg("--assert").args(args).run();
    assert(&["--node", "a1"]).expect_code(1); // vacant
    let h = Holder::start(&ctx, "a", "a", &["--node", "a1"]);
    assert(&["--node", "a1"]).expect_code(0);
    assert(&["--node", "other"]).expect_code(1);
    let rev = h.rev.to_string();
    let above = (h.rev + 1).to_string();
    assert(&["--node", "a1", "--min-rev", &rev]).expect_code(0);
    assert(&["--node", "a1", "--min-rev", &above]).expect_code(1);

    let out = assert(&["--node", "a1", "--json"]);
    out.expect_code(0);
    let v = json(
        out.lines()
            .first()
            .expect("--assert --json prints a record"),
    );
    assert_eq!(v["held"], true, "{v}");
    assert_eq!(v["rev"].as_i64(), Some(h.rev), "{v}");
    assert_eq!(v["node"], "a1", "{v}");
    let out = assert(&["--node", "other", "--json"]);
    out.expect_code(1);
    let v = json(
        out.lines()
            .first()
            .expect("--assert --json prints a record"),
    );
    assert_eq!(v["held"], false, "{v}");
    assert_eq!(ctx.office_keys("a").len(), 1, "--assert adds no key");
}

#[test]
fn watch_json_prints_the_holder_then_each_change() {
    let ctx = Ctx::new("elect-watch");
    let a = Holder::start(&ctx, "a", "wj", &["--node", "w1"]);
    let mut watch = ctx.elect("wj").args(["--watch", "--json"]).spawn();
    let lines = watch.wait_lines(1, SOON);
    let v = json(&lines[0]);
    assert_eq!(v["office"], "wj", "{v}");
    assert_eq!(v["rev"].as_i64(), Some(a.rev), "{v}");
    assert_eq!(v["node"], "w1", "{v}");

    a.release(&ctx);
    let lines = watch.wait_lines(2, SOON);
    let v = json(&lines[1]);
    assert_eq!(v["office"], "wj", "{v}");
    assert!(
        v["holder"].is_null(),
        "vacancy is {{\"office\":…,\"holder\":null}}: {v}"
    );

    let b = Holder::start(&ctx, "b", "wj", &["--node", "w2"]);
    let lines = watch.wait_lines(3, SOON);
    let v = json(&lines[2]);
    assert_eq!(v["rev"].as_i64(), Some(b.rev), "{v}");
    assert_eq!(v["node"], "w2", "{v}");
    assert!(watch.is_running(), "--watch runs until interrupted");
    watch.signal(Signal::INT);
    watch.wait_timeout(SOON);
    assert_eq!(ctx.office_keys("wj").len(), 1, "--watch adds no key");
}

#[test]
fn watch_text_prints_vacancy_as_dash_then_the_holder() {
    let ctx = Ctx::new("elect-watch-text");
    let mut watch = ctx.elect("wt").arg("--watch").spawn();
    let lines = watch.wait_lines(1, SOON);
    assert_eq!(lines[0], "wt -", "vacant office");
    let a = Holder::start(&ctx, "a", "wt", &["--node", "w3"]);
    let lines = watch.wait_lines(2, SOON);
    let head = format!("wt w3 pid={} since=", a.conch.pid());
    assert!(
        lines[1].starts_with(&head),
        "{:?} should start with {head:?}",
        lines[1]
    );
    assert!(
        lines[1].contains(&format!(" rev={} ", a.rev)),
        "{:?}",
        lines[1]
    );
    watch.signal(Signal::INT);
    watch.wait_timeout(SOON);
}
