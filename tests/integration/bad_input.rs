//! Bad input to `conch elect` (quality.md §4): exit 64, a message on stderr naming the
//! problem, and nothing written to etcd, nothing run.

use crate::harness::{Ctx, refused};

const CHILD: [&str; 4] = ["--", "sh", "-c", "echo ran > {dir}/ran"];

fn elect(name: &str, flags: &[&str]) -> Vec<String> {
    let mut v = vec!["elect".to_string(), name.to_string()];
    v.extend(flags.iter().map(|s| s.to_string()));
    v.extend(CHILD.iter().map(|s| s.to_string()));
    v
}

fn refused_elect(test: &str, office: &str, flags: &[&str], mentions: &[&str]) {
    let args = elect(office, flags);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(test, &args, mentions);
}

#[test]
fn empty_name() {
    refused_elect("bad-empty-name", "", &[], &["empty"]);
}

#[test]
fn name_with_slash() {
    refused_elect("bad-slash", "a/b", &[], &["'/'", "\"/\"", "`/`"]);
}

#[test]
fn name_with_space() {
    refused_elect("bad-space", "a b", &[], &["' '", "` `", "space"]);
}

#[test]
fn name_of_129_characters() {
    let long = "a".repeat(129);
    refused_elect("bad-long", &long, &[], &["128"]);
}

#[test]
fn name_of_128_characters_is_fine() {
    let ctx = Ctx::new("good-long");
    let name = "a".repeat(128);
    ctx.elect(&name).args(["--", "true"]).run().expect_code(0);
}

#[test]
fn name_starting_with_a_dot() {
    refused_elect("bad-dot", ".hidden", &[], &["'.'", "`.`"]);
}

#[test]
fn ttl_zero() {
    refused_elect("bad-ttl0", "x", &["--ttl", "0"], &["ttl"]);
}

#[test]
fn ttl_below_etcds_minimum_is_raised_and_said_so() {
    let ctx = Ctx::new("ttl-raised");
    let out = ctx
        .elect("x")
        .args(["--ttl", "500ms", "--kill-after", "100ms", "--", "true"])
        .run();
    out.expect_code(0);
    let stderr = out.stderr.to_lowercase();
    assert!(
        stderr.contains("ttl") && stderr.contains("2s"),
        "a raised TTL is said on stderr: {}",
        out.stderr
    );
}

#[test]
fn ttl_not_a_duration() {
    refused_elect("bad-ttl-abc", "x", &["--ttl", "abc"], &["abc"]);
}

#[test]
fn impossible_timing_names_the_flag_to_change() {
    refused_elect(
        "bad-timing",
        "x",
        &["--ttl", "10s", "--kill-after", "30s"],
        &["--kill-after", "--ttl"],
    );
}

#[test]
fn unknown_containment_mode() {
    refused_elect(
        "bad-containment",
        "x",
        &["--containment", "jail"],
        &["jail"],
    );
}

#[test]
fn missing_command() {
    refused("bad-no-cmd", &["elect", "x"], &["command"]);
    refused("bad-no-cmd-dashdash", &["elect", "x", "--"], &["command"]);
}

#[test]
fn unknown_flag() {
    refused_elect("bad-flag", "x", &["--bogus-flag"], &["--bogus-flag"]);
}

#[test]
fn stray_positional() {
    refused_elect("bad-positional", "x", &["extra-arg"], &["extra-arg"]);
}

#[test]
fn who_with_a_command() {
    refused_elect("bad-who-cmd", "x", &["--who"], &["--who"]);
}

#[test]
fn help_exits_0_and_prints_usage_on_stdout() {
    let ctx = Ctx::new("help");
    for args in [&["elect", "-h"][..], &["elect", "--help"][..]] {
        let out = ctx.conch().args(args).run();
        out.expect_code(0);
        let lower = out.stdout.to_lowercase();
        assert!(lower.contains("usage"), "{args:?}: {}", out.stdout);
        assert!(
            out.stdout.contains("--nonblock"),
            "{args:?}: {}",
            out.stdout
        );
    }
    let out = ctx.conch().arg("-h").run();
    out.expect_code(0);
    assert!(out.stdout.contains("elect"), "{}", out.stdout);
    assert!(ctx.keys().is_empty());
}

/// Every command that takes a name refuses the same bad names the same way (quality.md §4):
/// exit 64, a message naming the problem, nothing run, nothing written.
#[test]
fn every_command_that_takes_a_name_refuses_bad_names() {
    let long = "a".repeat(129);
    let names: [(&str, &[&str]); 5] = [
        ("", &["empty"]),
        ("a/b", &["'/'", "\"/\"", "`/`"]),
        ("a b", &["' '", "` `", "space"]),
        (".hidden", &["'.'", "`.`"]),
        (&long, &["128"]),
    ];
    let child = ["--", "sh", "-c", "echo ran > {dir}/ran"];
    for (i, (name, mentions)) in names.iter().enumerate() {
        let commands: Vec<Vec<&str>> = vec![
            [&["elect", name][..], &child].concat(),
            vec!["elect", name, "--who"],
            [&["sema", name, "--max", "2"][..], &child].concat(),
            vec!["sema", name, "--who"],
            [&["cron", "add", name, "--schedule", "@hourly"][..], &child].concat(),
            vec!["cron", "rm", name],
            vec!["cron", "run", name],
            vec!["cron", "pause", name],
            vec!["cron", "resume", name],
            vec!["cron", "history", name],
        ];
        for (j, args) in commands.iter().enumerate() {
            refused(&format!("bad-name-{i}-{j}"), args, mentions);
        }
    }
}
