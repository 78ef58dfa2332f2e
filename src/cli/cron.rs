//! `conch cron`: add, rm, ls, history, run, pause, resume. Everything is validated before
//! anything is written: an invalid job never reaches etcd.

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::{GlobalArgs, args, exit, report, usage};
use crate::cron::job::{JobSpec, Overlap, parse_labels};
use crate::cron::record::Trigger;
use crate::cron::schedule::Schedule;
use crate::cron::sign::SigningKey;
use crate::cron::store::{Store, UpdateError};
use crate::keys::{Name, now_rfc3339, now_unix, rfc3339_utc};

#[derive(Debug, Args)]
pub struct CronArgs {
    #[command(subcommand)]
    command: CronCommand,
}

#[derive(Debug, Subcommand)]
enum CronCommand {
    /// Create or replace a job: every conchd races for each tick; exactly one runs it.
    #[command(override_usage = "conch cron add <NAME> --schedule '<EXPR>' [flags] -- <CMD>...")]
    Add(AddArgs),
    /// Delete a job (a run in flight finishes).
    Rm {
        #[arg(value_parser = args::name)]
        name: Name,
    },
    /// List jobs: NAME SCHEDULE TZ NEXT, and with --last the last tick's node, status, exit
    /// and duration.
    Ls {
        /// Also read and show each job's last run.
        #[arg(long)]
        last: bool,
        /// One JSON object per job.
        #[arg(long)]
        json: bool,
    },
    /// Recent results of a job, newest first.
    History {
        #[arg(value_parser = args::name)]
        name: Name,
        /// How many results (at most 100 are kept).
        #[arg(long, default_value = "20", value_parser = clap::value_parser!(u16).range(1..=100))]
        limit: u16,
        /// One JSON result per line.
        #[arg(long)]
        json: bool,
    },
    /// Fire a job once now, on exactly one conchd whose labels match.
    Run {
        #[arg(value_parser = args::name)]
        name: Name,
        /// Give up (exit 75) if no conchd takes the run within this long.
        #[arg(long, allow_hyphen_values = true, default_value = "30s", value_parser = args::positive_duration)]
        wait: Duration,
    },
    /// Stop firing a job (runs in flight finish).
    Pause {
        #[arg(value_parser = args::name)]
        name: Name,
    },
    /// Fire a paused job again from its next tick (ticks while paused are not made up).
    Resume {
        #[arg(value_parser = args::name)]
        name: Name,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OverlapArg {
    Allow,
    Forbid,
}

#[derive(Debug, Args)]
struct AddArgs {
    /// The job: 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.').
    #[arg(value_parser = args::name)]
    name: Name,
    /// 5-field crontab, 6 fields with seconds, @hourly/@daily/@weekly/@monthly/@yearly, or
    /// '@every 90s'; may start with CRON_TZ=<zone>.
    #[arg(long)]
    schedule: String,
    /// IANA time zone the schedule is read in [default: UTC].
    #[arg(long)]
    tz: Option<String>,
    /// Kill a run still going after this long (SIGTERM, then SIGKILL).
    #[arg(long, default_value = "10m", allow_hyphen_values = true)]
    run_ttl: String,
    /// forbid: skip a tick (recorded skipped) while the previous run still runs anywhere.
    #[arg(long, value_enum, default_value = "allow")]
    overlap: OverlapArg,
    /// A tick not started within this long of its time is not run, and recorded missed.
    #[arg(long, default_value = "1m", allow_hyphen_values = true)]
    starting_deadline: String,
    /// k=v[,k=v]: only conchd nodes whose --labels match race for the ticks.
    #[arg(long, default_value = "")]
    node_selector: String,
    /// Start up to this long after each tick, at an offset derived from the job name.
    #[arg(long, default_value = "0s", allow_hyphen_values = true)]
    jitter: String,
    /// Sign the spec with this private key (`conch keygen`), for conchd --trust-key.
    #[arg(long, env = "CONCH_SIGN_KEY", value_name = "FILE")]
    sign_key: Option<std::path::PathBuf>,
    /// The command (after --), run by whichever conchd wins each tick.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<std::ffi::OsString>,
}

pub async fn run(g: &GlobalArgs, a: CronArgs) -> u8 {
    // Validate before connecting: a bad job never reaches etcd.
    let spec = match &a.command {
        CronCommand::Add(add) => match build_spec(g, add) {
            Ok(s) => Some(s),
            Err(code) => return code,
        },
        _ => None,
    };
    let (prefix, etcd) = match super::connect(g).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = Store::new(etcd, prefix);
    let r = match a.command {
        CronCommand::Add(add) => add_job(&store, &add.name, &spec.expect("built above")).await,
        CronCommand::Rm { name } => match store.remove_job(&name).await {
            Ok(true) => {
                eprintln!("conch: removed job {name}");
                Ok(exit::OK)
            }
            Ok(false) => no_job(&name),
            Err(e) => Err(e),
        },
        CronCommand::Ls { last, json } => ls(&store, last, json).await,
        CronCommand::History { name, limit, json } => history(&store, &name, limit, json).await,
        CronCommand::Run { name, wait } => run_now(&store, g, &name, wait).await,
        CronCommand::Pause { name } => set_paused(&store, &name, true).await,
        CronCommand::Resume { name } => set_paused(&store, &name, false).await,
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            exit::UNAVAILABLE
        }
    }
}

fn no_job(name: &Name) -> Result<u8, crate::etcd::CallError> {
    eprintln!("conch: no job named {name}");
    Ok(exit::NO)
}

/// `user@node` of whoever runs this.
fn added_by(g: &GlobalArgs) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{}", rustix::process::getuid().as_raw()));
    format!("{user}@{}", g.node().unwrap_or_else(|_| "?".into()))
}

/// Build and validate the spec from the flags; `Err` carries exit 64 (already printed).
fn build_spec(g: &GlobalArgs, a: &AddArgs) -> Result<JobSpec, u8> {
    if a.cmd.is_empty() {
        return Err(usage(
            "missing command: conch cron add <NAME> --schedule '<EXPR>' [flags] -- <CMD>...",
        ));
    }
    let mut cmd = Vec::with_capacity(a.cmd.len());
    for arg in &a.cmd {
        match arg.to_str() {
            Some(s) => cmd.push(s.to_string()),
            None => {
                return Err(usage(format!(
                    "the command argument {arg:?} is not valid UTF-8"
                )));
            }
        }
    }
    // A CRON_TZ= prefix names the zone; it must not contradict an explicit --tz.
    let tz_default = a.tz.clone().unwrap_or_else(|| "UTC".into());
    let schedule = Schedule::parse(&a.schedule, &tz_default)
        .map_err(|e| usage(format!("bad --schedule: {e}")))?;
    if let Some(tz) = &a.tz
        && !schedule.in_zone(tz)
    {
        return Err(usage(format!(
            "--tz {tz} contradicts the schedule's CRON_TZ={}",
            schedule.tz_name()
        )));
    }
    let labels =
        parse_labels(&a.node_selector).map_err(|e| usage(format!("bad --node-selector: {e}")))?;
    let mut spec = JobSpec {
        schedule: schedule.expr().to_string(),
        tz: schedule.tz_name().to_string(),
        cmd,
        run_ttl: a.run_ttl.trim().to_string(),
        overlap: match a.overlap {
            OverlapArg::Allow => Overlap::Allow,
            OverlapArg::Forbid => Overlap::Forbid,
        },
        starting_deadline: a.starting_deadline.trim().to_string(),
        node_selector: labels,
        jitter: a.jitter.trim().to_string(),
        paused: false,
        added_by: added_by(g),
        added_at: now_rfc3339(),
        resumed_at: None,
        signature: None,
    };
    spec.validate(&a.name, now_unix(), 0).map_err(usage)?;
    if let Some(path) = &a.sign_key {
        let key = SigningKey::read(path).map_err(|e| usage(format!("bad --sign-key: {e}")))?;
        spec.signature = Some(key.sign(a.name.as_str(), &spec));
    }
    Ok(spec)
}

async fn add_job(store: &Store, name: &Name, spec: &JobSpec) -> Result<u8, crate::etcd::CallError> {
    let replaced = store.job(name).await?.is_some();
    store.put_job(name, spec).await?;
    let next = Schedule::parse(&spec.schedule, &spec.tz)
        .ok()
        .and_then(|s| s.next_after(now_unix()))
        .map_or("-".into(), |t| rfc3339_utc(t as u64));
    eprintln!(
        "conch: {} job {name}: next tick {next}",
        if replaced { "replaced" } else { "added" }
    );
    Ok(exit::OK)
}

async fn set_paused(
    store: &Store,
    name: &Name,
    paused: bool,
) -> Result<u8, crate::etcd::CallError> {
    let r = store
        .update_job(name, |s| {
            if s.paused && !paused {
                s.resumed_at = Some(now_rfc3339());
            }
            s.paused = paused;
        })
        .await;
    match r {
        Ok(Some(_)) => {
            eprintln!(
                "conch: {} job {name}",
                if paused { "paused" } else { "resumed" }
            );
            Ok(exit::OK)
        }
        Ok(None) => no_job(name),
        Err(UpdateError::Etcd(e)) => Err(e),
        Err(e @ UpdateError::Foreign(_)) => {
            eprintln!("conch: {name}: {e}");
            Ok(exit::USAGE)
        }
    }
}

async fn ls(store: &Store, last: bool, json: bool) -> Result<u8, crate::etcd::CallError> {
    let nodes = if last { store.nodes().await? } else { vec![] };
    let jobs = crate::status::jobs(store, &nodes, last).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for j in &jobs {
            let _ = writeln!(out, "{}", serde_json::to_string(j).unwrap_or_default());
        }
    } else {
        let lines = if last {
            crate::status::ls_lines(&jobs)
        } else {
            short_ls(&jobs)
        };
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
    }
    Ok(exit::OK)
}

/// `ls` without `--last`: NAME SCHEDULE TZ NEXT.
fn short_ls(jobs: &[crate::status::JobStatus]) -> Vec<String> {
    let mut rows = vec![
        ["NAME", "SCHEDULE", "TZ", "NEXT"]
            .map(String::from)
            .to_vec(),
    ];
    for j in jobs {
        let (schedule, tz) = j.spec.as_ref().map_or(("?".into(), "?".into()), |s| {
            (s.schedule.clone(), s.tz.clone())
        });
        let next = if j.error.is_some() {
            "invalid".into()
        } else if j.paused() {
            "paused".into()
        } else {
            j.next.clone().unwrap_or_else(|| "-".into())
        };
        rows.push(vec![j.name.clone(), schedule, tz, next]);
    }
    crate::status::table(&rows)
}

async fn history(
    store: &Store,
    name: &Name,
    limit: u16,
    json: bool,
) -> Result<u8, crate::etcd::CallError> {
    if store.job(name).await?.is_none() {
        return no_job(name);
    }
    let results = store.results(name, i64::from(limit)).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for (tick, r) in &results {
            let line = match r {
                Some(r) => r.to_json(),
                None => serde_json::json!({"tick": rfc3339_utc(*tick as u64), "status": "unknown"})
                    .to_string(),
            };
            let _ = writeln!(out, "{line}");
        }
        return Ok(exit::OK);
    }
    let mut rows = vec![
        [
            "TICK", "NODE", "STATUS", "EXIT", "STARTED", "DURATION", "CPU", "MANUAL", "REASON",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (tick, r) in &results {
        let row = match r {
            Some(r) => vec![
                r.tick.clone(),
                r.node.clone(),
                r.status.as_str().into(),
                r.exit
                    .map(|e| e.to_string())
                    .or(r.signal.map(|s| format!("sig{s}")))
                    .unwrap_or_else(|| "-".into()),
                r.started.clone().unwrap_or_else(|| "-".into()),
                r.duration.clone().unwrap_or_else(|| "-".into()),
                r.cpu.clone().unwrap_or_else(|| "-".into()),
                if r.manual { "yes" } else { "no" }.into(),
                r.reason.clone().unwrap_or_default(),
            ],
            None => vec![rfc3339_utc(*tick as u64), "-".into(), "unknown".into()],
        };
        rows.push(row);
    }
    for l in crate::status::table(&rows) {
        let _ = writeln!(out, "{l}");
    }
    Ok(exit::OK)
}

/// Write a trigger and wait until a conchd takes it (a guarded delete decides which).
async fn run_now(
    store: &Store,
    g: &GlobalArgs,
    name: &Name,
    wait: Duration,
) -> Result<u8, crate::etcd::CallError> {
    if store.job(name).await?.is_none() {
        return no_job(name);
    }
    let id = format!("{:016x}", fastrand::u64(..));
    let trig = Trigger {
        by: added_by(g),
        at: now_rfc3339(),
    };
    let (key, rev) = store.put_trigger(name, &id, &trig.to_json()).await?;
    let give_up = tokio::time::Instant::now() + wait;
    // Poll for the trigger to go (a watch would do; polling keeps this one-shot tool simple
    // and bounded, and the wait is human-scale).
    loop {
        let gone = store
            .etcd
            .retry("read trigger", |mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?
            .kvs()
            .is_empty();
        if gone {
            let taken = store.fires(name, 10).await?.into_iter().find(|(_, f, _)| {
                f.as_ref().is_some_and(|f| {
                    f.manual && f.claimed.as_str() >= trig.at.trim_end_matches('Z')
                })
            });
            match taken {
                Some((tick, Some(f), rev)) => eprintln!(
                    "conch: {name} taken by {} (tick {}, rev {rev})",
                    f.node,
                    rfc3339_utc(tick as u64)
                ),
                _ => eprintln!("conch: {name} taken by a conchd"),
            }
            return Ok(exit::OK);
        }
        if tokio::time::Instant::now() >= give_up {
            if store.withdraw_trigger(&key, rev).await? {
                eprintln!(
                    "conch: no conchd took the run of {name} within {} (is a conchd whose labels match the job's --node-selector running?)",
                    humantime::format_duration(wait)
                );
                return Ok(exit::NOT_ACQUIRED);
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
