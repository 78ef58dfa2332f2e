//! `conch dev`: a throw-away single-node etcd from a real etcd binary, for trying conch on one
//! machine. Never for production, and it says so.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::{GlobalArgs, exit, usage};
use crate::child::{ChildCommand, Containment, ContainmentRequest, Tree};
use crate::etcd::{Etcd, EtcdConfig};

/// How long a fresh etcd may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// conch dev [--data-dir DIR] [--listen URL] [-- <cmd...>]
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Keep etcd's data here (kept on exit) [default: a temporary directory, removed on exit].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client URL etcd listens on.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    listen: String,
    /// The etcd binary [default: the project's .cache/etcd/, then PATH].
    #[arg(long, env = "CONCH_ETCD_BIN")]
    etcd_bin: Option<PathBuf>,
    /// Run this with CONCH_ENDPOINTS pointing at the dev etcd, then stop etcd.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

pub async fn run(g: &GlobalArgs, a: DevArgs) -> u8 {
    let Some(addr) = listen_addr(&a.listen) else {
        return usage(format!(
            "bad --listen {:?}: want http://HOST:PORT",
            a.listen
        ));
    };
    let Some(etcd_bin) = find_etcd(a.etcd_bin.as_deref()) else {
        eprintln!(
            "conch: no etcd binary found (looked at --etcd-bin/CONCH_ETCD_BIN, .cache/etcd/*/bin/etcd, PATH); \
             fetch one with scripts/fetch-etcd.sh from the conch repository, or pass --etcd-bin"
        );
        return exit::UNAVAILABLE;
    };
    if let Err(e) = TcpListener::bind(addr) {
        eprintln!(
            "conch: cannot listen on {addr}: {e}{}",
            holder_of(addr)
                .map(|h| format!(" (held by {h})"))
                .unwrap_or_default()
        );
        return exit::UNAVAILABLE;
    }
    let peer = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("conch: no free port for etcd's peer URL: {e}");
            return exit::UNAVAILABLE;
        }
    };
    let (data_dir, temporary) = match &a.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "conch-dev-{}-{:08x}",
                std::process::id(),
                fastrand::u32(..)
            )),
            true,
        ),
    };
    if let Err(e) = std::fs::create_dir_all(&data_dir) {
        eprintln!("conch: cannot create {}: {e}", data_dir.display());
        return exit::UNAVAILABLE;
    }
    let code = serve(g, &a, &etcd_bin, addr, peer, &data_dir).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    code
}

async fn serve(
    g: &GlobalArgs,
    a: &DevArgs,
    etcd_bin: &Path,
    addr: SocketAddr,
    peer: SocketAddr,
    data_dir: &Path,
) -> u8 {
    let client_url = format!("http://{addr}");
    let peer_url = format!("http://{peer}");
    let log = data_dir.join("etcd.log");
    let containment = Containment::resolve(ContainmentRequest::Auto, g.cgroup_root.clone())
        .or_else(|_| Containment::resolve(ContainmentRequest::Pgroup, None));
    let containment = match containment {
        Ok(c) => c,
        Err(e) => {
            eprintln!("conch: {e}");
            return exit::UNAVAILABLE;
        }
    };
    // etcd's own chatter goes to a log file so the demo stays readable.
    let mut argv: Vec<OsString> = vec![
        "sh".into(),
        "-c".into(),
        "exec \"$0\" \"$@\" >>\"$CONCH_DEV_LOG\" 2>&1".into(),
    ];
    argv.push(etcd_bin.into());
    for s in [
        "--name=conch-dev".to_string(),
        format!("--data-dir={}", data_dir.join("data").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=conch-dev={peer_url}"),
    ] {
        argv.push(s.into());
    }
    let cmd = ChildCommand {
        argv,
        env: vec![("CONCH_DEV_LOG".into(), log.clone().into())],
        cgroup_leaf: format!("dev-etcd-{}", std::process::id()),
        output: None,
    };
    let mut etcd = match Tree::spawn(&containment, &cmd) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("conch: cannot start etcd: {e}");
            return exit::UNAVAILABLE;
        }
    };
    let version = tokio::select! {
        v = wait_ready(&client_url) => v,
        exit = etcd.wait() => {
            eprintln!("conch: etcd exited during start ({exit:?}); its log: {}", log.display());
            return exit::UNAVAILABLE;
        }
    };
    let Some(version) = version else {
        eprintln!(
            "conch: etcd did not answer within {READY_TIMEOUT:?}; its log: {}",
            log.display()
        );
        etcd.shutdown(Duration::from_secs(5)).await;
        return exit::UNAVAILABLE;
    };
    eprintln!(
        "conch dev: etcd {version} on {client_url} (throw-away single node, data in {}; NOT for production)",
        data_dir.display()
    );
    let code = if a.cmd.is_empty() {
        eprintln!(
            "conch dev: try   CONCH_ENDPOINTS={client_url} conch elect demo -- sh -c 'echo leader $CONCH_REV; sleep 5'"
        );
        eprintln!("conch dev: Ctrl-C stops etcd");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            exit = etcd.wait() => eprintln!("conch: etcd exited ({exit:?}); its log: {}", log.display()),
        }
        exit::OK
    } else {
        run_cmd(&containment, &a.cmd, &client_url).await
    };
    etcd.shutdown(Duration::from_secs(5)).await;
    code
}

async fn run_cmd(containment: &Containment, argv: &[OsString], client_url: &str) -> u8 {
    let mut path = OsString::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        path.push(dir);
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let cmd = ChildCommand {
        argv: argv.to_vec(),
        env: vec![
            ("CONCH_ENDPOINTS".into(), client_url.into()),
            ("PATH".into(), path),
        ],
        cgroup_leaf: format!("dev-cmd-{}", std::process::id()),
        output: None,
    };
    let mut tree = match Tree::spawn(containment, &cmd) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("conch: {e}");
            return match e {
                crate::child::SpawnError::NotFound(_) => exit::NOT_FOUND,
                _ => exit::NOT_EXECUTABLE,
            };
        }
    };
    let exit = tokio::select! {
        e = tree.wait() => e,
        _ = tokio::signal::ctrl_c() => tree.shutdown(Duration::from_secs(5)).await,
    };
    // Stop what the command left behind before etcd goes away.
    tree.shutdown(Duration::from_secs(5)).await;
    exit::of_child(exit)
}

/// Poll until etcd answers a status call; its version, or `None` after the timeout.
async fn wait_ready(url: &str) -> Option<String> {
    let cfg = EtcdConfig {
        endpoints: vec![url.to_string()],
        dial_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        tls: None,
        auth: None,
    };
    let until = tokio::time::Instant::now() + READY_TIMEOUT;
    while tokio::time::Instant::now() < until {
        if let Ok((_, info)) = Etcd::connect(&cfg).await {
            // dev's own etcd has no auth: its Status call always answers.
            return Some(info.version.unwrap_or_else(|| "unknown".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn listen_addr(url: &str) -> Option<SocketAddr> {
    let rest = url.strip_prefix("http://")?;
    rest.trim_end_matches('/').to_socket_addrs().ok()?.next()
}

/// `--etcd-bin`, then `.cache/etcd/<suite>/bin/etcd` above the binary or the working
/// directory (newest suite first), then `PATH`.
fn find_etcd(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then(|| p.to_path_buf());
    }
    let mut starts: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    for start in &starts {
        for dir in start.ancestors() {
            for suite in ["sid", "trixie", "bookworm"] {
                let p = dir.join(".cache/etcd").join(suite).join("bin/etcd");
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// Which process listens on `addr`, from /proc (best effort): `pid 123 (etcd)`.
fn holder_of(addr: SocketAddr) -> Option<String> {
    let port = format!("{:04X}", addr.port());
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
        (f.len() > 9 && f[1].ends_with(&format!(":{port}")) && f[3] == "0A")
            .then(|| f[9].to_string())
    })?;
    let needle = format!("socket:[{inode}]");
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
                return Some(format!(
                    "pid {} ({})",
                    proc.file_name().to_string_lossy(),
                    comm.trim()
                ));
            }
        }
    }
    None
}
