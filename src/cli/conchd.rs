//! `conch conchd`: the per-node cron daemon's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{GlobalArgs, args, exit, report, usage};
use crate::conchd::{self, daemonize};
use crate::cron::job::parse_labels;
use crate::status::server::Listener;

#[derive(Debug, Args)]
pub struct ConchdArgs {
    /// Serve the read-only status API and page here (e.g. 127.0.0.1:7480) [default: off].
    #[arg(long, env = "CONCH_STATUS_ADDR")]
    status_addr: Option<SocketAddr>,
    /// This node's labels, k=v[,k=v], matched against jobs' --node-selector.
    #[arg(long, env = "CONCH_LABELS", default_value = "")]
    labels: String,
    /// On SIGTERM, let running jobs finish for this long, then stop them.
    #[arg(long, allow_hyphen_values = true, env = "CONCH_DRAIN_TIMEOUT", default_value = "30s", value_parser = args::duration)]
    drain_timeout: Duration,
    /// Grace between SIGTERM and SIGKILL for a job that is stopped (capped by the hold deadline).
    #[arg(long, allow_hyphen_values = true, env = "CONCH_KILL_AFTER", default_value = "5s", value_parser = args::duration)]
    kill_after: Duration,
    /// Detach from the terminal (for hosts with no supervisor); needs --pidfile.
    #[arg(long, requires = "pidfile")]
    daemonize: bool,
    /// Write conchd's pid here; refuse to start while it names a live conchd.
    #[arg(long, env = "CONCH_PIDFILE")]
    pidfile: Option<PathBuf>,
    /// With --daemonize: append conchd's log (and job output) here [default: discarded].
    #[arg(long, requires = "daemonize")]
    log_file: Option<PathBuf>,
    /// Run only job specs signed by one of these public keys (`conch keygen`); record the
    /// others' ticks as refused.
    #[arg(
        long,
        env = "CONCH_TRUST_KEY",
        value_delimiter = ',',
        value_name = "FILE[,FILE]"
    )]
    trust_key: Vec<PathBuf>,
}

pub async fn run(g: &GlobalArgs, a: ConchdArgs) -> u8 {
    let labels = match parse_labels(&a.labels) {
        Ok(l) => l,
        Err(e) => return usage(format!("bad --labels: {e}")),
    };
    let ttl = g.effective_ttl();
    if let Err(e) = crate::hold::deadline::Timing::derive(ttl, a.kill_after) {
        return usage(e);
    }
    let trusted = match crate::cron::sign::TrustedKeys::read(&a.trust_key) {
        Ok(t) => t,
        Err(e) => return usage(format!("bad --trust-key: {e}")),
    };
    if !trusted.is_empty() {
        tracing::info!(
            keys = a.trust_key.len(),
            "running only job specs signed by a trusted key"
        );
    }
    let (prefix, node, etcd_cfg) = match (g.prefix(), g.node(), g.etcd_config()) {
        (Ok(p), Ok(n), Ok(c)) => (p, n, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return usage(e),
    };
    let detached = std::env::var_os(daemonize::DETACHED_ENV).is_some();
    if a.daemonize && !detached {
        let pidfile = a.pidfile.as_deref().expect("clap requires --pidfile");
        return match daemonize::detach(pidfile, a.log_file.as_deref()) {
            Ok(pid) => {
                eprintln!("conch: conchd started in the background as pid {pid}");
                exit::OK
            }
            Err(e @ daemonize::DaemonizeError::Running { .. }) => {
                report(&e);
                exit::NOT_ACQUIRED
            }
            Err(e) => {
                report(&e);
                exit::UNAVAILABLE
            }
        };
    }
    let _pidfile = match &a.pidfile {
        Some(p) => match daemonize::write_pidfile(p) {
            Ok(guard) => Some(guard),
            Err(e @ daemonize::DaemonizeError::Running { .. }) => {
                report(&e);
                return exit::NOT_ACQUIRED;
            }
            Err(e) => {
                report(&e);
                return exit::UNAVAILABLE;
            }
        },
        None => None,
    };
    let status = match a.status_addr.map(Listener::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("conch: cannot listen on --status-addr: {e}");
            return exit::UNAVAILABLE;
        }
    };
    let containment = match g.containment() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    if let Some(root) = &containment.cgroup_root {
        enter_own_cgroup(root);
    }
    let signals = match crate::hold::signals::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return exit::UNAVAILABLE;
        }
    };
    let etcd = match g.connect(&etcd_cfg).await {
        Ok(e) => e,
        Err(e) => {
            report(&e);
            return exit::UNAVAILABLE;
        }
    };
    if let Err(e) = may_work_here(&etcd, &prefix, &node).await {
        report(&e);
        return exit::UNAVAILABLE;
    }
    let cfg = conchd::Config {
        node,
        labels,
        prefix,
        ttl,
        grace: a.kill_after,
        drain_timeout: a.drain_timeout,
        containment,
        json_output: g.log_format == super::global::LogFormat::Json,
        status,
        trusted,
    };
    conchd::run(etcd, cfg, signals).await;
    exit::OK
}

/// conchd puts itself under `<cgroup-root>/conchd` (primitives.md), beside its jobs'
/// cgroups. Best effort: a conchd that cannot move itself still contains its jobs.
fn enter_own_cgroup(root: &std::path::Path) {
    let dir = root.join("conchd");
    let r =
        std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join("cgroup.procs"), "0\n"));
    if let Err(e) = r {
        tracing::warn!(cgroup = %dir.display(), error = %e, "conchd cannot move itself into its own cgroup");
    }
}

/// Whether etcd lets this user do conchd's work under the prefix: read it and write this
/// node's key. Without this a conchd whose role lacks the prefix logged "permission denied"
/// every few seconds forever instead of saying so once and exiting 69. The check writes
/// nothing: etcd checks a transaction's permissions on both branches, and the compare
/// (a create revision of -1) never holds. Errors other than a refusal are left to conchd's
/// own retries.
async fn may_work_here(
    etcd: &crate::etcd::Etcd,
    prefix: &crate::keys::Prefix,
    node: &str,
) -> Result<(), crate::etcd::CallError> {
    use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
    let node_key = prefix.node(node);
    let jobs = prefix.cron_jobs();
    let r = etcd
        .retry("check permissions", |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    node_key.clone(),
                    CompareOp::Equal,
                    -1,
                )])
                .and_then([TxnOp::put(node_key.clone(), "", None)])
                .or_else([TxnOp::get(
                    jobs.clone(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )]);
            async move { c.txn(txn).await }
        })
        .await;
    match r {
        Err(e) if e.kind == crate::etcd::CallErrorKind::Refused => Err(e),
        _ => Ok(()),
    }
}
