//! The etcd connection: endpoints, TLS, auth, a deadline on every call, failover.
//!
//! etcd-client hangs forever on a frozen server unless told otherwise, and does not fail over
//! between endpoints (facts.md). So conch keeps one client per endpoint, bounds every unary
//! call by `--request-timeout`, and retries only calls that are safe to repeat (reads,
//! guarded transactions, lease calls) on the next endpoint. A write that may have committed is
//! never repeated blindly: conch's writes are all guarded transactions, whose repetition is
//! harmless by construction.

#![forbid(unsafe_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::task::JoinSet;

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    pub tls: Option<TlsFiles>,
    pub auth: Option<Credentials>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// User and password. `Debug` never shows the password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.user)
    }
}

/// Why conch could not start talking to etcd (exit 69).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("no etcd endpoint answered within the dial timeout ({timeout}): {detail}")]
    Unreachable { timeout: String, detail: String },
    #[error("etcd refused the credentials: {0}")]
    Auth(String),
    #[error("TLS with etcd failed: {0}")]
    Tls(String),
}

/// A failed etcd call.
#[derive(Debug, thiserror::Error)]
#[error("etcd {what}: {detail}")]
pub struct CallError {
    pub what: &'static str,
    pub detail: String,
    pub kind: CallErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErrorKind {
    /// Timed out, unreachable, no leader: another endpoint (or later) may work.
    Unavailable,
    /// Authentication or permission refused.
    Refused,
    /// Anything else (a bug, a malformed request).
    Other,
}

/// What the server said about itself at connect time.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub endpoint: String,
    /// `None` when etcd would not say (its Status call needs the root role under auth).
    pub version: Option<String>,
}

/// Connected etcd. Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct Etcd {
    members: Arc<Vec<Member>>,
    current: Arc<AtomicUsize>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let eps: Vec<&str> = self.members.iter().map(|m| m.endpoint.as_str()).collect();
        f.debug_struct("Etcd").field("endpoints", &eps).finish()
    }
}

struct Member {
    endpoint: String,
    client: Client,
}

impl Etcd {
    /// Connect to the first endpoint that answers a status call within `dial_timeout`, keeping
    /// clients for every endpoint that could be set up (for failover).
    pub async fn connect(cfg: &EtcdConfig) -> Result<(Etcd, ServerInfo), ConnectError> {
        let opts = connect_options(cfg)?;
        let mut set = JoinSet::new();
        for (i, ep) in cfg.endpoints.iter().enumerate() {
            let ep = ep.clone();
            let opts = opts.clone();
            set.spawn(async move {
                let r = async {
                    let mut c = Client::connect([ep.as_str()], Some(opts)).await?;
                    let version = match c.status().await {
                        Ok(st) => Some(st.version().to_string()),
                        // etcd 3.5 with auth on gives the maintenance Status call to the root
                        // role only: a user limited to conch's prefix is refused it. The
                        // server answered over TLS and took our credentials (`connect`
                        // authenticates), so it is up; only its version stays unknown.
                        Err(etcd_client::Error::GRpcStatus(s))
                            if s.code() == tonic::Code::PermissionDenied =>
                        {
                            None
                        }
                        Err(e) => return Err(e),
                    };
                    Ok::<_, etcd_client::Error>((c, version))
                }
                .await;
                (i, ep, r)
            });
        }
        let deadline = tokio::time::Instant::now() + cfg.dial_timeout;
        let mut members: Vec<(usize, Member)> = Vec::new();
        let mut info = None;
        let mut failures: Vec<(String, etcd_client::Error)> = Vec::new();
        loop {
            // Once one endpoint works, give the others a short moment to join (for failover).
            let until = match info {
                None => deadline,
                Some(_) => deadline.min(tokio::time::Instant::now() + Duration::from_millis(300)),
            };
            match tokio::time::timeout_at(until, set.join_next()).await {
                Ok(Some(Ok((i, ep, Ok((client, version)))))) => {
                    if info.is_none() {
                        info = Some(ServerInfo {
                            endpoint: ep.clone(),
                            version,
                        });
                    }
                    members.push((
                        i,
                        Member {
                            endpoint: ep,
                            client,
                        },
                    ));
                }
                Ok(Some(Ok((_, ep, Err(e))))) => failures.push((ep, e)),
                Ok(Some(Err(join))) => {
                    failures.push(("?".into(), etcd_client::Error::Internal(join.to_string())))
                }
                Ok(None) | Err(_) => break,
            }
        }
        set.abort_all();
        let Some(info) = info else {
            return Err(classify_connect_failure(cfg, failures));
        };
        members.sort_by_key(|(i, _)| *i);
        let first = members
            .iter()
            .position(|(_, m)| m.endpoint == info.endpoint)
            .unwrap_or(0);
        let etcd = Etcd {
            members: Arc::new(members.into_iter().map(|(_, m)| m).collect()),
            current: Arc::new(AtomicUsize::new(first)),
            request_timeout: cfg.request_timeout,
        };
        Ok((etcd, info))
    }

    /// The per-call deadline (`--request-timeout`).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The client for the endpoint currently preferred, with its index.
    pub fn client(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        (i, self.members[i].client.clone())
    }

    /// The endpoint with index `i`.
    pub fn endpoint(&self, i: usize) -> &str {
        &self.members[i % self.members.len()].endpoint
    }

    /// Stop preferring endpoint `failed` (if it is still the preferred one).
    pub fn rotate(&self, failed: usize) {
        let n = self.members.len();
        let _ = self.current.compare_exchange(
            failed % n,
            (failed + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Run a call that is safe to repeat: each attempt bounded by the request timeout, moving
    /// to the next endpoint when one is unavailable; at most one attempt per endpoint.
    pub async fn retry<T, F, Fut>(&self, what: &'static str, mut f: F) -> Result<T, CallError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for _ in 0..self.members.len() {
            let (i, client) = self.client();
            match self.bounded(what, f(client)).await {
                Ok(v) => return Ok(v),
                Err(e) if e.kind == CallErrorKind::Unavailable => {
                    tracing::debug!(endpoint = self.endpoint(i), error = %e, "etcd-failover");
                    self.rotate(i);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// Bound one call by the request timeout and classify its error.
    pub async fn bounded<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(call_error(what, &e)),
            Err(_) => Err(CallError {
                what,
                detail: format!(
                    "no answer within the request timeout ({})",
                    humantime::format_duration(self.request_timeout)
                ),
                kind: CallErrorKind::Unavailable,
            }),
        }
    }
}

fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, ConnectError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.dial_timeout)
        .with_timeout(cfg.request_timeout)
        // Streams fail with "no leader" a few seconds after quorum loss instead of going silent.
        .with_require_leader(true)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let Some(tls) = &cfg.tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            t = t.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
        }
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                t = t.identity(Identity::from_pem(
                    read(cert, "client certificate")?,
                    read(key, "client key")?,
                ));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConnectError::Tls("--cert given without --key".into()));
            }
            (None, Some(_)) => {
                return Err(ConnectError::Tls("--key given without --cert".into()));
            }
        }
        opts = opts.with_tls(t);
    }
    if let Some(c) = &cfg.auth {
        opts = opts.with_user(c.user.clone(), c.password.clone());
    }
    for ep in &cfg.endpoints {
        if cfg.tls.is_some() && ep.starts_with("http://") {
            return Err(ConnectError::Endpoint {
                endpoint: ep.clone(),
                reason: "TLS options (--cacert/--cert/--key) need an https:// endpoint".into(),
            });
        }
    }
    Ok(opts)
}

fn read(path: &PathBuf, what: &'static str) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::File {
        what,
        path: path.clone(),
        source,
    })
}

/// The error and all its sources, joined with `: `.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn call_error(what: &'static str, e: &etcd_client::Error) -> CallError {
    use tonic::Code;
    let kind = match e {
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => CallErrorKind::Refused,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                CallErrorKind::Unavailable
            }
            _ => CallErrorKind::Other,
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            CallErrorKind::Unavailable
        }
        _ => CallErrorKind::Other,
    };
    let detail = match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => chain(other),
    };
    CallError { what, detail, kind }
}

/// Without `--user`, etcd takes the client certificate's CN as the user name: say so, or
/// "user name not found" leaves an operator guessing which name etcd looked for.
pub fn cn_hint(cfg: &EtcdConfig) -> &'static str {
    match (&cfg.auth, cfg.tls.as_ref().and_then(|t| t.cert.as_ref())) {
        (None, Some(_)) => {
            " (no --user given: etcd takes the client certificate's CN as the user name; give \
             --user, or a certificate whose CN is an etcd user)"
        }
        (None, None) => " (no --user given)",
        (Some(_), _) => "",
    }
}

fn classify_connect_failure(
    cfg: &EtcdConfig,
    failures: Vec<(String, etcd_client::Error)>,
) -> ConnectError {
    for (ep, e) in &failures {
        let text = chain(e);
        let lower = text.to_lowercase();
        if let etcd_client::Error::GRpcStatus(s) = e
            && (matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || lower.contains("authentication failed")
                || lower.contains("user name not found")
                || lower.contains("user name is empty"))
        {
            return ConnectError::Auth(format!("{ep}: {}{}", s.message(), cn_hint(cfg)));
        }
        if lower.contains("unknownissuer") {
            let ca = match cfg.tls.as_ref().and_then(|t| t.ca.as_ref()) {
                Some(ca) => format!("no CA in --cacert {} signed it", ca.display()),
                None => "no system CA signed it (give --cacert)".to_string(),
            };
            return ConnectError::Tls(format!(
                "{ep}: etcd's server certificate is not trusted: {ca} ({text})"
            ));
        }
        if lower.contains("certificate")
            || lower.contains("tls")
            || lower.contains("handshake")
            || lower.contains("unknownissuer")
        {
            return ConnectError::Tls(format!("{ep}: {text}"));
        }
        // With TLS 1.3 the server checks the client certificate after the client thinks
        // the handshake is done: a missing or untrusted one shows up here only as the server
        // closing the connection (or, when the alert arrives first, as an alert such as
        // UnknownCA), which looked like "no endpoint answered".
        if let Some(tls) = &cfg.tls
            && (lower.contains("connection closed")
                || lower.contains("connection reset")
                || lower.contains("broken pipe")
                || lower.contains("received fatal alert"))
        {
            let why = match &tls.cert {
                None => {
                    "etcd ended the TLS connection: it wants a client certificate (give --cert \
                         and --key)"
                        .to_string()
                }
                Some(cert) => format!(
                    "etcd ended the TLS connection: it did not accept the client certificate \
                     {} (is it signed by a CA etcd trusts?)",
                    cert.display()
                ),
            };
            return ConnectError::Tls(format!("{ep}: {why} ({text})"));
        }
        if let etcd_client::Error::InvalidUri(_) | etcd_client::Error::InvalidArgs(_) = e {
            return ConnectError::Endpoint {
                endpoint: ep.clone(),
                reason: text,
            };
        }
    }
    let detail = if failures.is_empty() {
        format!("tried {}", cfg.endpoints.join(", "))
    } else {
        failures
            .iter()
            .map(|(ep, e)| format!("{ep}: {}", chain(e)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    ConnectError::Unreachable {
        timeout: humantime::format_duration(cfg.dial_timeout).to_string(),
        detail,
    }
}

/// Oldest server releases without known lease bugs (holds.md §1), per minor line.
const FIXED_RELEASES: [(u32, u32, u32); 3] = [(3, 6, 9), (3, 5, 28), (3, 4, 42)];

/// A warning when `version` is older than the releases that fixed etcd's lease bugs.
pub fn version_warning(version: &str) -> Option<String> {
    let mut it = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let v: Vec<u32> = it.by_ref().take(3).filter_map(|s| s.parse().ok()).collect();
    let [maj, min, patch] = v[..] else {
        return Some(format!("etcd server version {version:?} not understood"));
    };
    let old = match FIXED_RELEASES
        .iter()
        .find(|(a, b, _)| (*a, *b) == (maj, min))
    {
        Some(&(_, _, fixed)) => patch < fixed,
        None => (maj, min) < (3, 4),
    };
    old.then(|| {
        format!(
            "etcd server {version} is older than 3.6.9 / 3.5.28 / 3.4.42 and has known lease bugs \
             (a stuck old leader can revoke leases; renewals can succeed on revoked leases): upgrade etcd"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_servers_are_warned_about() {
        assert!(version_warning("3.5.30").is_none());
        assert!(version_warning("3.5.28").is_none());
        assert!(version_warning("3.6.9").is_none());
        assert!(version_warning("3.7.0").is_none());
        assert!(version_warning("3.4.42").is_none());
        assert!(version_warning("3.5.16").is_some());
        assert!(version_warning("3.4.23").is_some());
        assert!(version_warning("3.6.0").is_some());
        assert!(version_warning("3.3.27").is_some());
        assert!(version_warning("garbage").is_some());
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
