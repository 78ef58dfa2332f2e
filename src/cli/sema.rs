//! `conch sema`: the semaphore's command line, validation, and `--who`.

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use clap::Args;

use super::{GlobalArgs, Prepared, args, exit, prepare, report, usage};
use crate::keys::Name;
use crate::recipes::sema::{self, MAX_SLOTS, SemaConfig, SemaError};
use crate::recipes::sema_query;

/// conch sema <name> --max N [flags] -- <cmd...>
#[derive(Debug, Args)]
#[command(
    override_usage = "conch sema <NAME> --max N [flags] -- <CMD>...\n       \
                      conch sema <NAME> --who [--max N] [--json]"
)]
pub struct SemaArgs {
    /// The semaphore: 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.').
    #[arg(value_parser = args::name)]
    name: Name,
    /// Number of slots, 1 to 10000; every participant of a name must agree on it.
    #[arg(long, allow_hyphen_values = true, value_parser = max_slots)]
    max: Option<u32>,
    /// At most one slot per node (--node); part of what participants must agree on.
    #[arg(long)]
    spread: bool,
    /// Give up waiting for a slot after this long: exit 75 (0 means do not wait) [default: forever].
    #[arg(long, allow_hyphen_values = true, value_parser = args::duration, conflicts_with = "nonblock")]
    wait: Option<Duration>,
    /// Exit 75 at once if every slot is taken; run at once if one is free.
    #[arg(long)]
    nonblock: bool,
    /// Grace between SIGTERM and SIGKILL (capped so the tree is dead by the hold deadline).
    #[arg(long, allow_hyphen_values = true, env = "CONCH_KILL_AFTER", default_value = "5s", value_parser = args::duration)]
    kill_after: Duration,
    /// List holders then waiters (every live max unless --max is given); exit 1 if empty.
    #[arg(long)]
    who: bool,
    /// Machine output for --who.
    #[arg(long)]
    json: bool,
    /// The child command (after --).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

fn max_slots(s: &str) -> Result<u32, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of slots (1 to {MAX_SLOTS})"))?;
    if n < 1 || n > i64::from(MAX_SLOTS) {
        return Err(format!("--max must be between 1 and {MAX_SLOTS}, not {n}"));
    }
    Ok(n as u32)
}

pub async fn run(g: &GlobalArgs, a: SemaArgs) -> u8 {
    if a.who {
        if !a.cmd.is_empty() {
            return usage("--who takes no command (remove the part after --)");
        }
        for (set, flag) in [
            (a.spread, "--spread"),
            (a.nonblock, "--nonblock"),
            (a.wait.is_some(), "--wait"),
        ] {
            if set {
                return usage(format!("{flag} cannot be used with --who"));
            }
        }
        return who(g, &a).await;
    }
    if a.json {
        return usage("--json goes with --who");
    }
    let Some(max) = a.max else {
        return usage("--max is required to run a command: conch sema <NAME> --max N -- <CMD>...");
    };
    if a.cmd.is_empty() {
        return usage("missing command: conch sema <NAME> --max N [flags] -- <CMD>...");
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
    let cfg = SemaConfig {
        name: a.name.clone(),
        prefix,
        node,
        ttl,
        grace: a.kill_after,
        max,
        spread: a.spread,
        wait: if a.nonblock {
            Some(Duration::ZERO)
        } else {
            a.wait
        },
        cmd: a.cmd.clone(),
    };
    match sema::run(&etcd, &cfg, &containment, &mut signals).await {
        Ok(outcome) => exit::of_outcome(cfg.name.as_str(), "has no free slot", outcome),
        Err(e @ SemaError::Mismatch { .. }) => usage(e),
        Err(e) => {
            report(&e);
            match e {
                SemaError::Grant(crate::hold::lease::GrantError::Timing(..)) => exit::USAGE,
                _ => exit::UNAVAILABLE,
            }
        }
    }
}

async fn who(g: &GlobalArgs, a: &SemaArgs) -> u8 {
    let (prefix, etcd) = match super::connect(g).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let queues = match sema_query::queues(&etcd, &prefix, &a.name, a.max).await {
        Ok(q) => q,
        Err(e) => {
            report(&e);
            return exit::UNAVAILABLE;
        }
    };
    let mut out = std::io::stdout().lock();
    for q in &queues {
        for line in sema_query::lines(&a.name, q, a.json) {
            let _ = writeln!(out, "{line}");
        }
    }
    if queues.iter().any(|q| q.held() > 0) {
        exit::OK
    } else {
        exit::NO
    }
}
