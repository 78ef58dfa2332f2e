//! Global flags (cli.md): every one has a `CONCH_*` environment fallback; a flag beats its
//! variable, which beats the default.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, ValueEnum};

use super::args;
use crate::child::{Containment, ContainmentRequest};
use crate::etcd::{ConnectError, Credentials, Etcd, EtcdConfig, TlsFiles};
use crate::keys::Prefix;

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// etcd endpoints, comma-separated: host:port, http://… or https://…
    #[arg(
        long,
        global = true,
        env = "CONCH_ENDPOINTS",
        value_delimiter = ',',
        default_value = "localhost:2379"
    )]
    pub endpoints: Vec<String>,
    /// Give up connecting after this long (exit 69).
    #[arg(long, allow_hyphen_values = true, global = true, env = "CONCH_DIAL_TIMEOUT", default_value = "5s", value_parser = args::positive_duration)]
    pub dial_timeout: Duration,
    /// Deadline for every single etcd call that is not a wait.
    #[arg(long, allow_hyphen_values = true, global = true, env = "CONCH_REQUEST_TIMEOUT", default_value = "5s", value_parser = args::positive_duration)]
    pub request_timeout: Duration,
    /// Lease TTL: with --kill-after it fixes how fast a cut-off holder kills its child.
    #[arg(long, allow_hyphen_values = true, global = true, env = "CONCH_TTL", default_value = "10s", value_parser = args::positive_duration)]
    pub ttl: Duration,
    /// Root of all keys (lets several teams share one etcd).
    #[arg(long, global = true, env = "CONCH_PREFIX", default_value = "/conch")]
    pub prefix: String,
    /// This node's name [default: the hostname].
    #[arg(long, global = true, env = "CONCH_NODE")]
    pub node: Option<String>,
    /// CA bundle to verify etcd's server certificate.
    #[arg(long, global = true, env = "CONCH_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    #[arg(long, global = true, env = "CONCH_CERT")]
    pub cert: Option<PathBuf>,
    /// Client key (mutual TLS). From the environment, CONCH_KEY counts only together with
    /// CONCH_CERT: inside a conch child CONCH_KEY is the holder's etcd key.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// etcd user, `name` or `name:password`.
    #[arg(long, global = true, env = "CONCH_USER")]
    pub user: Option<String>,
    /// etcd password (prefer CONCH_PASSWORD or --password-file).
    #[arg(long, global = true, env = "CONCH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Read the etcd password from this file.
    #[arg(long, global = true, env = "CONCH_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// cgroup: refuse a child that cannot get its own cgroup v2; pgroup: process group +
    /// subreaper; auto: cgroup where possible, else pgroup with a warning.
    #[arg(
        long,
        global = true,
        env = "CONCH_CONTAINMENT",
        value_enum,
        default_value = "auto"
    )]
    pub containment: ContainmentArg,
    /// Where conch creates the children's cgroups [default: <cgroup v2 mount>/conch.slice].
    #[arg(long, global = true, env = "CONCH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Log only warnings and errors.
    #[arg(long, global = true, env = "CONCH_QUIET", value_parser = BoolishValueParser::new(), default_value = "false", num_args = 0, default_missing_value = "true")]
    pub quiet: bool,
    /// Log debug events too: each lease renewal and the deadline it proves, failovers, what a
    /// waiter waits for, ticks taken by other nodes.
    #[arg(long, global = true, env = "CONCH_VERBOSE", value_parser = BoolishValueParser::new(), default_value = "false", num_args = 0, default_missing_value = "true")]
    pub verbose: bool,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "CONCH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ContainmentArg {
    Auto,
    Cgroup,
    Pgroup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// etcd's default minimum lease TTL: smaller TTLs are raised silently by the server.
const ETCD_MIN_TTL: Duration = Duration::from_secs(2);

impl GlobalArgs {
    pub fn prefix(&self) -> Result<Prefix, String> {
        Prefix::parse(&self.prefix).map_err(|e| format!("bad --prefix: {e}"))
    }

    pub fn node(&self) -> Result<String, String> {
        let node = match &self.node {
            Some(n) => n.clone(),
            None => rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
        };
        if node.is_empty() || node.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!(
                "bad --node {node:?}: empty or contains spaces or control characters"
            ));
        }
        Ok(node)
    }

    /// The TTL conch will ask for: whole seconds (etcd's unit), at least etcd's minimum.
    /// Raising it is said out loud.
    pub fn effective_ttl(&self) -> Duration {
        let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        let ttl = Duration::from_secs(secs).max(ETCD_MIN_TTL);
        if ttl != self.ttl {
            tracing::warn!(
                asked = %humantime::format_duration(self.ttl),
                using = %humantime::format_duration(ttl),
                "--ttl raised to whole seconds and at least etcd's minimum of 2s"
            );
        }
        ttl
    }

    pub fn containment_request(&self) -> ContainmentRequest {
        match self.containment {
            ContainmentArg::Auto => ContainmentRequest::Auto,
            ContainmentArg::Cgroup => ContainmentRequest::Cgroup,
            ContainmentArg::Pgroup => ContainmentRequest::Pgroup,
        }
    }

    /// Resolve containment for running children; a pgroup fallback is warned about.
    pub fn containment(&self) -> Result<Containment, String> {
        let c = Containment::resolve(self.containment_request(), self.cgroup_root.clone())
            .map_err(|e| format!("{e} (--containment cgroup demands it; use auto or pgroup to allow the weaker mode)"))?;
        if c.mode == crate::child::ContainmentMode::Pgroup
            && self.containment == ContainmentArg::Auto
        {
            tracing::warn!(reason = %c.reason, "containment is weaker: process group + subreaper instead of a cgroup");
        }
        Ok(c)
    }

    /// The connection settings, reading the password file and splitting `--user name:pass`.
    pub fn etcd_config(&self) -> Result<EtcdConfig, String> {
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err("--endpoints is empty".into());
        }
        let key = self.key.clone().or_else(|| {
            // CONCH_KEY is also what conch exports to its children (the holder's etcd key):
            // take it as a TLS key file only next to a client certificate.
            self.cert
                .as_ref()
                .and_then(|_| std::env::var_os("CONCH_KEY").map(PathBuf::from))
        });
        let tls =
            (self.cacert.is_some() || self.cert.is_some() || key.is_some()).then(|| TlsFiles {
                ca: self.cacert.clone(),
                cert: self.cert.clone(),
                key,
            });
        let auth = match &self.user {
            None => None,
            Some(u) => {
                let (user, inline) = match u.split_once(':') {
                    Some((n, p)) => (n.to_string(), Some(p.to_string())),
                    None => (u.clone(), None),
                };
                let password = match (inline, &self.password, &self.password_file) {
                    (Some(p), _, _) => p,
                    (None, Some(p), _) => p.clone(),
                    (None, None, Some(f)) => std::fs::read_to_string(f)
                        .map_err(|e| format!("cannot read --password-file {}: {e}", f.display()))?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                    (None, None, None) => {
                        return Err(format!(
                            "--user {u} needs a password: name:password, --password, CONCH_PASSWORD or --password-file"
                        ));
                    }
                };
                Some(Credentials { user, password })
            }
        };
        Ok(EtcdConfig {
            endpoints,
            dial_timeout: self.dial_timeout,
            request_timeout: self.request_timeout,
            tls,
            auth,
        })
    }

    /// Connect, warning about old servers. Errors are printed; the caller exits 69.
    pub async fn connect(&self, cfg: &EtcdConfig) -> Result<Etcd, ConnectError> {
        let (etcd, info) = Etcd::connect(cfg).await?;
        match &info.version {
            Some(v) => {
                if let Some(w) = crate::etcd::version_warning(v) {
                    tracing::warn!(endpoint = %info.endpoint, "{w}");
                }
            }
            None => tracing::debug!(
                endpoint = %info.endpoint,
                "etcd's version is unknown (its Status call needs the root role), so it is not checked for known lease bugs"
            ),
        }
        tracing::debug!(endpoint = %info.endpoint, version = ?info.version, "connected");
        Ok(etcd)
    }
}

/// Set up the one `tracing` subscriber: stderr, text or JSON, INFO (WARN with `--quiet`,
/// conch's own DEBUG events too with `--verbose`; both at once is refused before this). The
/// libraries below conch (gRPC, HTTP/2) never log below INFO: their debug lines are per frame.
pub fn init_logging(g: &GlobalArgs) {
    use std::io::IsTerminal;
    use tracing::Level;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::fmt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = if g.quiet {
        Level::WARN
    } else if g.verbose {
        Level::DEBUG
    } else {
        Level::INFO
    };
    let only = Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), level)
        .with_default(level.min(Level::INFO));
    let builder = fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match g.log_format {
        LogFormat::Text => builder.finish().with(only).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(only)
            .try_init(),
    };
}
