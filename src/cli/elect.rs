//! `conch elect`: the office's command line, validation, and the exit-code table.

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use clap::Args;

use super::{GlobalArgs, Prepared, args, exit, prepare, report, usage};
use crate::keys::Name;
use crate::recipes::elect::{self, ElectConfig};
use crate::recipes::query;

/// conch elect <office> [flags] -- <cmd...>
#[derive(Debug, Args)]
#[command(override_usage = "conch elect <OFFICE> [flags] -- <CMD>...\n       \
                      conch elect <OFFICE> --who [--json]\n       \
                      conch elect <OFFICE> --watch [--json]\n       \
                      conch elect <OFFICE> --assert [--min-rev N] [--json]")]
pub struct ElectArgs {
    /// The office: 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.').
    #[arg(value_parser = args::name)]
    office: Name,
    /// Service mode: after the child exits or the hold is lost, back off and campaign again.
    #[arg(long)]
    restart: bool,
    /// Grace between SIGTERM and SIGKILL (capped so the tree is dead by the hold deadline).
    #[arg(long, allow_hyphen_values = true, env = "CONCH_KILL_AFTER", default_value = "5s", value_parser = args::duration)]
    kill_after: Duration,
    /// Give up campaigning after this long: exit 75 (0 means do not wait) [default: forever].
    #[arg(long, allow_hyphen_values = true, value_parser = args::duration, conflicts_with = "nonblock")]
    wait: Option<Duration>,
    /// Exit 75 at once if the office is held; run at once if it is vacant.
    #[arg(long)]
    nonblock: bool,
    /// `sh -c` hook run after winning, before the child; non-zero or timeout = not acquired.
    #[arg(long, value_name = "CMD")]
    on_acquire: Option<String>,
    /// `sh -c` hook run after the child tree is dead, before re-campaign or exit.
    #[arg(long, value_name = "CMD")]
    on_lose: Option<String>,
    /// Bound on each hook.
    #[arg(long, allow_hyphen_values = true, env = "CONCH_HOOK_TIMEOUT", default_value = "30s", value_parser = args::positive_duration)]
    hook_timeout: Duration,
    /// Print the holder; exit 1 if vacant.
    #[arg(long, conflicts_with_all = ["watch", "assert"])]
    who: bool,
    /// Stream holder changes until interrupted.
    #[arg(long, conflicts_with = "assert")]
    watch: bool,
    /// Exit 0 iff this --node holds the office (and its rev is at least --min-rev).
    #[arg(long)]
    assert: bool,
    /// With --assert: also require the holder's CONCH_REV >= N.
    #[arg(long, default_value_t = 0, requires = "assert", value_name = "N")]
    min_rev: i64,
    /// Machine output for --who, --watch, --assert.
    #[arg(long)]
    json: bool,
    /// The child command (after --).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

pub async fn run(g: &GlobalArgs, a: ElectArgs) -> u8 {
    let query = a.who || a.watch || a.assert;
    if query {
        let mode = if a.who {
            "--who"
        } else if a.watch {
            "--watch"
        } else {
            "--assert"
        };
        if !a.cmd.is_empty() {
            return usage(format!(
                "{mode} takes no command (remove the part after --)"
            ));
        }
        for (set, flag) in [
            (a.restart, "--restart"),
            (a.nonblock, "--nonblock"),
            (a.wait.is_some(), "--wait"),
            (a.on_acquire.is_some(), "--on-acquire"),
            (a.on_lose.is_some(), "--on-lose"),
        ] {
            if set {
                return usage(format!("{flag} cannot be used with {mode}"));
            }
        }
        return run_query(g, &a).await;
    }
    if a.json {
        return usage("--json goes with --who, --watch or --assert");
    }
    if a.cmd.is_empty() {
        return usage("missing command: conch elect <OFFICE> [flags] -- <CMD>...");
    }
    let Prepared {
        ttl,
        prefix,
        node,
        containment,
        mut signals,
        etcd,
    } = match prepare(g, &a.cmd, a.kill_after).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let cfg = ElectConfig {
        office: a.office.clone(),
        prefix,
        node,
        ttl,
        grace: a.kill_after,
        wait: if a.nonblock {
            Some(Duration::ZERO)
        } else {
            a.wait
        },
        restart: a.restart,
        on_acquire: a.on_acquire.clone(),
        on_lose: a.on_lose.clone(),
        hook_timeout: a.hook_timeout,
        cmd: a.cmd.clone(),
    };
    match elect::run(&etcd, &cfg, &containment, &mut signals).await {
        Ok(outcome) => {
            exit::of_outcome(cfg.office.as_str(), "is held by another candidate", outcome)
        }
        Err(e) => {
            report(&e);
            match e {
                elect::ElectError::Grant(crate::hold::lease::GrantError::Timing(..)) => exit::USAGE,
                _ => exit::UNAVAILABLE,
            }
        }
    }
}

async fn run_query(g: &GlobalArgs, a: &ElectArgs) -> u8 {
    let (prefix, etcd_cfg) = match (g.prefix(), g.etcd_config()) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    let node = if a.assert {
        match g.node() {
            Ok(n) => n,
            Err(e) => return usage(e),
        }
    } else {
        String::new()
    };
    let etcd = match g.connect(&etcd_cfg).await {
        Ok(e) => e,
        Err(e) => {
            report(&e);
            return exit::UNAVAILABLE;
        }
    };
    if a.watch {
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    report(&e);
                    return exit::UNAVAILABLE;
                }
            };
        let stop = async {
            tokio::select! {
                _ = stop => {}
                _ = term.recv() => {}
            }
        };
        let mut out = std::io::stdout();
        return match query::watch(&etcd, &prefix, &a.office, a.json, &mut out, stop).await {
            Ok(()) => exit::OK,
            // stdout closed (e.g. `| head`): not an error worth a message.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
            Err(e) => {
                report(&e);
                exit::UNAVAILABLE
            }
        };
    }
    let holder = match query::holder(&etcd, &prefix, &a.office).await {
        Ok((h, _)) => h,
        Err(e) => {
            report(&e);
            return exit::UNAVAILABLE;
        }
    };
    let mut out = std::io::stdout().lock();
    if a.assert {
        let held = query::asserts(holder.as_ref(), &node, a.min_rev);
        if a.json {
            let _ = writeln!(out, "{}", query::assert_line(holder.as_ref(), held));
        }
        return if held { exit::OK } else { exit::NO };
    }
    match holder {
        Some(h) => {
            let _ = writeln!(out, "{}", query::holder_line(&a.office, &h, a.json));
            exit::OK
        }
        None => exit::NO,
    }
}
