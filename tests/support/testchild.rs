//! `conch-testchild`: the test-only child program of the fault suite (quality.md §2).
//!
//! It appends one-line records to an append-only journal — `start`, a `beat` every 5 ms while
//! it lives, `end` if it finishes by itself — with a `CLOCK_BOOTTIME` timestamp, its pid,
//! `CONCH_NODE`, `CONCH_REV` (and for cron runs `CONCH_TICK`), so a checker can prove that no two holders ran at once.
//! A process killed by a signal writes no `end`: its last `beat` bounds its life (to 5 ms).
//!
//! ```text
//! conch-testchild --journal FILE [--run 10s] [--exit N] [--ignore-term]
//!                 [--grandchildren N] [--setsid-grandchild] [--double-fork-grandchild]
//!                 [--stop-self] [--pidfile FILE] [--until-file FILE]
//! ```
//! Grandchildren are further copies of this program (`--role grandchild`) that journal too.
//! `--ignore-term` re-executes the program through `sh -c "trap '' TERM; exec …"`: an ignored
//! disposition survives exec, so no signal handler (and no `unsafe`) is needed.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, ExitCode};
use std::time::Duration;

/// Heartbeat period: the resolution of the overlap check.
const BEAT: Duration = Duration::from_millis(5);

#[derive(Debug, Default, Clone)]
struct Opts {
    journal: String,
    run: Option<Duration>,
    exit: u8,
    ignore_term: bool,
    grandchildren: u32,
    setsid_grandchild: bool,
    double_fork_grandchild: bool,
    stop_self: bool,
    pidfile: Option<String>,
    /// Finish (with an `end` record) once this file exists.
    until_file: Option<String>,
    role: String,
    term_ignored: bool,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        role: "child".into(),
        ..Opts::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--journal" => o.journal = val()?,
            "--run" => o.run = Some(humantime::parse_duration(&val()?).map_err(|e| e.to_string())?),
            "--exit" => o.exit = val()?.parse().map_err(|_| "bad --exit")?,
            "--ignore-term" => o.ignore_term = true,
            "--grandchildren" => {
                o.grandchildren = val()?.parse().map_err(|_| "bad --grandchildren")?
            }
            "--setsid-grandchild" => o.setsid_grandchild = true,
            "--double-fork-grandchild" => o.double_fork_grandchild = true,
            "--stop-self" => o.stop_self = true,
            "--pidfile" => o.pidfile = Some(val()?),
            "--until-file" => o.until_file = Some(val()?),
            "--role" => o.role = val()?,
            "--term-ignored" => o.term_ignored = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.journal.is_empty() {
        return Err("--journal is required".into());
    }
    Ok(o)
}

fn now_ns() -> u128 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn record(journal: &str, role: &str, event: &str) {
    let pid = std::process::id();
    let node = std::env::var("CONCH_NODE").unwrap_or_else(|_| "-".into());
    let rev = std::env::var("CONCH_REV").unwrap_or_else(|_| "-".into());
    let lease = std::env::var("CONCH_LEASE").unwrap_or_else(|_| "-".into());
    // cron runs: the tick, so a checker can prove no tick ran twice.
    let tick = std::env::var("CONCH_TICK")
        .map(|t| format!(" tick={t}"))
        .unwrap_or_default();
    // One write() per record on an O_APPEND file: records never interleave. The kernel still
    // copies a write into the file page by page, so a reader can see the first part of a
    // record whose write is in progress, and a SIGKILL between two pages leaves it cut for
    // good. Hence the frame: a leading newline keeps a cut record on a line of its own, and
    // the closing ` .` tells a whole record from a cut one (harness/journal.rs reads both).
    let line = format!(
        "\n{} {event} {role} pid={pid} node={node} rev={rev} lease={lease}{tick} .\n",
        now_ns()
    );
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(journal)
        .expect("journal");
    let _ = f.write_all(line.as_bytes());
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("conch-testchild: {e}");
            return ExitCode::from(2);
        }
    };
    let me = std::env::current_exe().expect("own path");
    if o.ignore_term && !o.term_ignored {
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.push("--term-ignored".into());
        let err = std::os::unix::process::CommandExt::exec(
            Command::new("sh")
                .arg("-c")
                .arg("trap '' TERM; exec \"$0\" \"$@\"")
                .arg(&me)
                .args(&args),
        );
        eprintln!("conch-testchild: cannot re-exec: {err}");
        return ExitCode::from(2);
    }
    if o.role == "grandchild-setsid" {
        let _ = rustix::process::setsid();
    }
    if o.role == "double-fork" {
        // The middle process: start the real grandchild and vanish, orphaning it.
        let _ = Command::new(&me)
            .args(["--journal", &o.journal, "--role", "orphan"])
            .args(
                o.pidfile
                    .iter()
                    .flat_map(|p| ["--pidfile".to_string(), format!("{p}.orphan")]),
            )
            .spawn();
        return ExitCode::SUCCESS;
    }
    record(&o.journal, &o.role, "start");
    if let Some(p) = &o.pidfile {
        let _ = std::fs::write(format!("{p}.tmp"), std::process::id().to_string())
            .and_then(|_| std::fs::rename(format!("{p}.tmp"), p));
    }
    let mut kids = Vec::new();
    if o.role == "child" {
        let mut spawn = |role: &str, n: u32| {
            let mut c = Command::new(&me);
            c.args(["--journal", &o.journal, "--role", role]);
            if o.ignore_term {
                c.arg("--ignore-term");
            }
            if let Some(p) = &o.pidfile {
                c.args(["--pidfile", &format!("{p}.{role}{n}")]);
            }
            if let Ok(k) = c.spawn() {
                kids.push(k);
            }
        };
        for n in 0..o.grandchildren {
            spawn("grandchild", n);
        }
        if o.setsid_grandchild {
            spawn("grandchild-setsid", 0);
        }
        if o.double_fork_grandchild {
            spawn("double-fork", 0);
        }
        if o.stop_self {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::STOP,
            );
        }
    }
    let until = o.run.map(|d| std::time::Instant::now() + d);
    loop {
        if until.is_some_and(|u| std::time::Instant::now() >= u) {
            break;
        }
        if o.until_file
            .as_ref()
            .is_some_and(|f| std::path::Path::new(f).exists())
        {
            break;
        }
        record(&o.journal, &o.role, "beat");
        std::thread::sleep(BEAT);
    }
    record(&o.journal, &o.role, "end");
    drop(kids);
    ExitCode::from(o.exit)
}
