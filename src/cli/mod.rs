//! The command line: the only code that reads argv and the environment or picks exit codes.
//!
//! `conch [global flags] <command> [args] [flags] [-- child command...]`: flags may come
//! before or after positionals; everything after the first bare `--` is the child command.
//! Usage errors exit 64 (not clap's 2); `-h` prints help to stdout and exits 0.

#![forbid(unsafe_code)]

mod args;
mod conchd;
mod cron;
mod dev;
mod elect;
pub mod exit;
mod global;
mod sema;
mod status;
mod version;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

pub use global::GlobalArgs;

/// Run ordinary Linux processes under cluster-wide holds kept in etcd v3: leader election,
/// semaphores and cron, fail-closed (the child dies before anyone else can get the hold).
#[derive(Debug, Parser)]
#[command(
    name = "conch",
    version,
    disable_help_subcommand = true,
    after_help = "Exit codes: 0 ok, child's code, 128+N child killed by signal N, 1 vacant/not held, \
                  64 usage, 69 etcd unreachable, 70 hold lost, 75 not acquired, 126/127 not executable/not found."
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command only while this process holds a leader office.
    Elect(elect::ElectArgs),
    /// Run a command only while holding one of N cluster-wide slots.
    Sema(sema::SemaArgs),
    /// Distributed cron: jobs that run once per tick on exactly one conchd node.
    Cron(cron::CronArgs),
    /// The per-node daemon that runs cron jobs (and serves the status API with --status-addr).
    Conchd(conchd::ConchdArgs),
    /// Every office, semaphore, cron job and conchd node under the prefix.
    Status(status::StatusArgs),
    /// Start a throw-away single-node etcd for trying conch on one machine (never production).
    Dev(dev::DevArgs),
    /// Write a new Ed25519 key pair for signed cron jobs: FILE (private, mode 0600) and FILE.pub.
    Keygen {
        /// Where the private key goes; the public key goes to FILE.pub. Neither may exist.
        file: std::path::PathBuf,
    },
    /// Print the version, the commit, and the containment mode conch would use here.
    Version,
    /// Print shell completion for bash, zsh or fish.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Parse argv, run the command, and turn its result into conch's exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => exit::OK,
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => exit::USAGE,
                _ => exit::USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if cli.global.quiet && cli.global.verbose {
        eprintln!(
            "conch: --quiet and --verbose (CONCH_QUIET, CONCH_VERBOSE) contradict each other: set one"
        );
        return ExitCode::from(exit::USAGE);
    }
    global::init_logging(&cli.global);
    if let Some(hint) = refusal_hint(&cli.global) {
        let _ = REFUSAL_HINT.set(hint);
    }
    install_panic_hook();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conch: cannot start the async runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let code = runtime.block_on(dispatch(cli));
    // Nothing of ours may keep running: tasks end with the runtime; children were waited for.
    drop(runtime);
    ExitCode::from(code)
}

async fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Elect(a) => elect::run(&cli.global, a).await,
        Command::Sema(a) => sema::run(&cli.global, a).await,
        Command::Cron(a) => cron::run(&cli.global, a).await,
        Command::Conchd(a) => conchd::run(&cli.global, a).await,
        Command::Status(a) => status::run(&cli.global, a).await,
        Command::Dev(a) => dev::run(&cli.global, a).await,
        Command::Keygen { file } => keygen(&file),
        Command::Version => version::run(&cli.global),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "conch", &mut std::io::stdout());
            exit::OK
        }
    }
}

/// `conch keygen FILE`.
fn keygen(file: &std::path::Path) -> u8 {
    match crate::cron::sign::keygen(file) {
        Ok(public) => {
            eprintln!(
                "conch: wrote the private key to {} (keep it secret: it signs jobs with cron add \
                 --sign-key) and the public key to {} (give it to conchd --trust-key)",
                file.display(),
                public.display()
            );
            exit::OK
        }
        Err(e) => usage(e),
    }
}

/// A panic kills every live child tree before the process unwinds and exits: no child may
/// outlive conch because of a bug in conch.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        crate::child::kill_all_live();
        default(info);
    }));
}

/// What running a child under a hold needs, validated and connected.
pub(crate) struct Prepared {
    pub ttl: std::time::Duration,
    pub prefix: crate::keys::Prefix,
    pub node: String,
    pub containment: crate::child::Containment,
    pub signals: crate::hold::signals::Signals,
    pub etcd: crate::etcd::Etcd,
}

/// Everything before a campaign, in this order: the command and the timing are checked (64),
/// the globals parsed (64), containment resolved (64 if `cgroup` is demanded and impossible),
/// signal handlers installed — before anything can run, so no signal kills conch by its
/// default action and orphans a child — and etcd connected (69). `Err` carries the exit code;
/// the reason is already printed.
pub(crate) async fn prepare(
    g: &GlobalArgs,
    cmd: &[std::ffi::OsString],
    kill_after: std::time::Duration,
) -> Result<Prepared, u8> {
    if cmd.first().is_some_and(|c| c.is_empty()) {
        return Err(usage("the command after -- is empty"));
    }
    let ttl = g.effective_ttl();
    if let Err(e) = crate::hold::deadline::Timing::derive(ttl, kill_after) {
        return Err(usage(e));
    }
    let (prefix, node, etcd_cfg) = match (g.prefix(), g.node(), g.etcd_config()) {
        (Ok(p), Ok(n), Ok(c)) => (p, n, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Err(usage(e)),
    };
    let containment = g.containment().map_err(usage)?;
    let signals = crate::hold::signals::Signals::install().map_err(|e| {
        report(&e);
        exit::UNAVAILABLE
    })?;
    let etcd = g.connect(&etcd_cfg).await.map_err(|e| {
        report(&e);
        exit::UNAVAILABLE
    })?;
    Ok(Prepared {
        ttl,
        prefix,
        node,
        containment,
        signals,
        etcd,
    })
}

/// For commands that only read or write keys (no child): the prefix and a connection. `Err`
/// carries the exit code (64 for bad flags, 69 if etcd cannot be reached), already printed.
pub(crate) async fn connect(
    g: &GlobalArgs,
) -> Result<(crate::keys::Prefix, crate::etcd::Etcd), u8> {
    let (prefix, cfg) = match (g.prefix(), g.etcd_config()) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => return Err(usage(e)),
    };
    let etcd = g.connect(&cfg).await.map_err(|e| {
        report(&e);
        exit::UNAVAILABLE
    })?;
    Ok((prefix, etcd))
}

/// What [`report`] adds to etcd's bare "permission denied": which user may not use which key
/// prefix. Set once, after parsing.
static REFUSAL_HINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn refusal_hint(g: &GlobalArgs) -> Option<String> {
    g.prefix().ok()?;
    let prefix = g.prefix.trim_end_matches('/');
    Some(match g.user.as_deref() {
        Some(u) => format!(
            " (etcd user {} may not read and write the keys under {prefix}/: grant its role \
             readwrite on the key prefix {prefix}/)",
            u.split(':').next().unwrap_or(u)
        ),
        None => format!(
            " (no --user given: etcd takes the client certificate's CN as the user name, and \
             that user may not read and write the keys under {prefix}/, or is no etcd user)"
        ),
    })
}

/// Print an error and its causes once, as `conch: a: b: c`; an etcd permission refusal also
/// names the user and the key prefix (etcd's own message names neither).
pub(crate) fn report(e: &dyn std::error::Error) {
    let mut msg = crate::etcd::chain(e);
    if (msg.contains("etcdserver: permission denied")
        || msg.contains("etcdserver: user name not found")
        || msg.contains("etcdserver: user name is empty"))
        && let Some(hint) = REFUSAL_HINT.get()
    {
        msg.push_str(hint);
    }
    eprintln!("conch: {msg}");
}

/// A usage error found after parsing (exit 64).
pub(crate) fn usage(msg: impl std::fmt::Display) -> u8 {
    eprintln!("conch: {msg}");
    eprintln!("Try 'conch --help' (or '<command> --help') for more information.");
    exit::USAGE
}
