//! The etcd server the whole test binary shares, and `etcdctl` as the tests' own client.
//!
//! One server per test binary: started lazily by the first test that asks for it, on free
//! loopback ports, with its data in a temporary directory. It must die with the test binary,
//! even when a test panics or the binary is killed, so it is spawned with
//! `PR_SET_PDEATHSIG=SIGKILL` from one dedicated thread that parks forever (PDEATHSIG fires
//! when the *thread* that forked exits, and test threads come and go).
//!
//! Tests read and change etcd through the real `etcdctl`, never through conch's own code, so
//! they check conch independently.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a fresh etcd may take to answer before the attempt counts as failed.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// Port races (a free port taken between our probe and etcd's bind) are retried this often.
const START_ATTEMPTS: usize = 3;
/// Bound on every `etcdctl` call the harness makes.
const ETCDCTL_TIMEOUT: &str = "5s";

/// The shared server: where it listens and where its binaries are.
#[derive(Debug)]
pub struct Etcd {
    pub endpoint: String,
    pub etcd_bin: PathBuf,
    pub etcdctl_bin: PathBuf,
    pub version: String,
    pub data_dir: PathBuf,
}

/// One key-value pair as `etcdctl get -w json` reports it.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// Lease ID, 0 when the key has none.
    pub lease: u64,
}

static SERVER: OnceLock<Etcd> = OnceLock::new();

/// The shared etcd server, started on first use.
pub fn shared() -> &'static Etcd {
    SERVER.get_or_init(start)
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the etcd and etcdctl binaries are, in the order the project documents:
/// `CONCH_TEST_ETCD_SUITE` (a specific Debian suite from the cache, fetched if needed),
/// `CONCH_ETCD_BIN`, the repo's cache (sid first), `PATH`, and finally the fetch script.
pub fn find_binaries() -> (PathBuf, PathBuf) {
    let root = repo_root();
    let cache = root.join(".cache/etcd");
    if let Ok(suite) = std::env::var("CONCH_TEST_ETCD_SUITE")
        && !suite.is_empty()
    {
        let dir = cache.join(&suite).join("bin");
        let dir = if dir.join("etcd").is_file() {
            dir
        } else {
            fetch(Some(&suite))
        };
        return (dir.join("etcd"), dir.join("etcdctl"));
    }
    if let Some(bin) = std::env::var_os("CONCH_ETCD_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        let ctl = bin.with_file_name("etcdctl");
        let ctl = if ctl.is_file() {
            ctl
        } else {
            on_path("etcdctl").expect("CONCH_ETCD_BIN is set but no etcdctl beside it or on PATH")
        };
        return (bin, ctl);
    }
    let mut cached: Vec<PathBuf> = vec![cache.join("sid/bin")];
    if let Ok(entries) = std::fs::read_dir(&cache) {
        let mut others: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| !p.ends_with("sid/bin"))
            .collect();
        others.sort();
        cached.extend(others);
    }
    for dir in cached {
        if dir.join("etcd").is_file() && dir.join("etcdctl").is_file() {
            return (dir.join("etcd"), dir.join("etcdctl"));
        }
    }
    if let (Some(etcd), Some(ctl)) = (on_path("etcd"), on_path("etcdctl")) {
        return (etcd, ctl);
    }
    let dir = fetch(None);
    (dir.join("etcd"), dir.join("etcdctl"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `scripts/fetch-etcd.sh [suite]` and returns the directory it prints.
fn fetch(suite: Option<&str>) -> PathBuf {
    let script = repo_root().join("scripts/fetch-etcd.sh");
    let mut cmd = Command::new(&script);
    cmd.args(suite).stderr(Stdio::inherit());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} {:?} failed ({}): no etcd for the integration tests",
        script.display(),
        suite,
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{} printed no directory", script.display()));
    PathBuf::from(dir.trim())
}

/// A binary that is not ELF is not an etcd server (a fetched package can also hold an init
/// script called `etcd`); say so plainly rather than time out waiting for it.
fn check_is_elf(bin: &Path) {
    let head = std::fs::read(bin)
        .map(|b| b.get(..4).map(<[u8]>::to_vec).unwrap_or_default())
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", bin.display()));
    assert_eq!(
        head,
        b"\x7fELF",
        "{} is not an executable etcd binary (is it an init script picked up by \
         scripts/fetch-etcd.sh?)",
        bin.display()
    );
}

/// A loopback port that is free now and that no outgoing connection will take before the
/// server binds it: ports come from below the kernel's ephemeral range (32768–60999 by
/// default), where the kernel never picks source ports. Binding port 0 instead handed out
/// ephemeral ports, and with many clients connecting in parallel one of them sometimes took
/// the port first ("bind: address already in use" for an etcd member).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Start at a per-process offset, so consecutive test binaries do not reuse ports at once.
    let _ = NEXT.compare_exchange(
        0,
        LOW + std::process::id() % (HIGH - LOW),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..(HIGH - LOW) {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (LOW + (n - LOW) % (HIGH - LOW)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{HIGH}")
}

/// The first line `etcd --version` prints (empty if it cannot run).
pub fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// Runs `start` on a thread named `name` that then parks forever holding the server it
/// started: the thread forked the server, and PDEATHSIG is tied to it, so the server dies
/// only when the whole test process ends. Returns what `start` returned beside the server.
pub fn keep_server<T: Send + 'static>(
    name: &str,
    start: impl FnOnce() -> Result<(std::process::Child, T), String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(name.into())
        .spawn(move || match start() {
            Ok((child, started)) => {
                let _ = tx.send(Ok(started));
                let _server = child;
                loop {
                    thread::park();
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the {name} thread: {e}"));
    rx.recv()
        .unwrap_or_else(|_| panic!("the {name} thread died"))
}

fn start() -> Etcd {
    let (etcd_bin, etcdctl_bin) = find_binaries();
    check_is_elf(&etcd_bin);
    check_is_elf(&etcdctl_bin);
    let version = version_of(&etcd_bin);
    let base = super::base_dir();
    let (bin, ctl) = (etcd_bin.clone(), etcdctl_bin.clone());
    let (endpoint, data_dir) = keep_server("etcd-keeper", move || {
        start_with_retries(&bin, &ctl, &base).map(|(child, endpoint, dir)| (child, (endpoint, dir)))
    })
    .unwrap_or_else(|e| panic!("cannot start etcd from {}: {e}", etcd_bin.display()));
    Etcd {
        endpoint,
        etcd_bin,
        etcdctl_bin,
        version,
        data_dir,
    }
}

type Started = (std::process::Child, String, PathBuf);

fn start_with_retries(bin: &Path, ctl: &Path, base: &Path) -> Result<Started, String> {
    let mut last = String::new();
    for attempt in 0..START_ATTEMPTS {
        let dir = base.join(format!("etcd-{attempt}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        match start_once(bin, ctl, &dir) {
            Ok((child, endpoint)) => return Ok((child, endpoint, dir)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn start_once(bin: &Path, ctl: &Path, dir: &Path) -> Result<(std::process::Child, String), String> {
    let client = format!("http://127.0.0.1:{}", free_port());
    let log = dir.join("etcd.log");
    let mut child = spawn_member(bin, "it", &client, &dir.join("data"), &log, &[])?;
    wait_healthy(&mut child, &log, || {
        let mut c = Command::new(ctl);
        c.arg(format!("--endpoints={client}"));
        c
    })?;
    Ok((child, client))
}

/// Starts a single-member etcd named `name` serving clients on `client`, its data in `data`
/// and its output in `log`, with `extra` arguments (TLS), killed when the test process ends.
pub fn spawn_member(
    bin: &Path,
    name: &str,
    client: &str,
    data: &Path,
    log: &Path,
    extra: &[String],
) -> Result<std::process::Child, String> {
    let peer = format!("http://127.0.0.1:{}", free_port());
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--name={name}"))
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster={name}={peer}"))
        .arg("--initial-cluster-state=new")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    super::proc::die_with_parent(&mut cmd, rustix::process::Signal::KILL);
    cmd.spawn().map_err(|e| format!("spawn: {e}"))
}

/// Polls `etcdctl … endpoint health` (`ctl()` gives the command with its endpoint and TLS
/// flags) until it succeeds; fails, killing the server and naming its log, if the server
/// exits or is not healthy within [`START_DEADLINE`].
pub fn wait_healthy(
    child: &mut std::process::Child,
    log: &Path,
    ctl: impl Fn() -> Command,
) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "etcd exited at start ({status}); log in {}",
                log.display()
            ));
        }
        let ok = ctl()
            .env("ETCDCTL_API", "3")
            .args([
                "--command-timeout=2s",
                "--dial-timeout=1s",
                "endpoint",
                "health",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "etcd did not become healthy within {START_DEADLINE:?}; log in {}",
                log.display()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

impl Etcd {
    /// Runs `etcdctl <args>` against the shared server; panics unless it succeeds.
    pub fn ctl<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = Command::new(&self.etcdctl_bin)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg(format!("--command-timeout={ETCDCTL_TIMEOUT}"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key under `prefix`, in key order.
    pub fn get_prefix(&self, prefix: &str) -> Vec<Kv> {
        let out = self.ctl(["get", "--prefix", prefix, "-w", "json"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl printed bad JSON ({e}): {out}"));
        let Some(kvs) = v.get("kvs").and_then(Value::as_array) else {
            return Vec::new();
        };
        kvs.iter()
            .map(|kv| Kv {
                key: b64_str(kv["key"].as_str().unwrap_or("")),
                value: b64_str(kv["value"].as_str().unwrap_or("")),
                create_revision: kv["create_revision"].as_i64().unwrap_or(0),
                mod_revision: kv["mod_revision"].as_i64().unwrap_or(0),
                lease: kv
                    .get("lease")
                    .and_then(|l| l.as_u64().or_else(|| l.as_i64().map(|i| i as u64)))
                    .unwrap_or(0),
            })
            .collect()
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl(["put", key, value]);
    }

    pub fn del(&self, key: &str) {
        self.ctl(["del", key]);
    }

    /// Revokes a lease given in hex, as conch exports it in `CONCH_LEASE`.
    pub fn revoke(&self, lease_hex: &str) {
        self.ctl(["lease", "revoke", lease_hex]);
    }

    /// Whether the lease (hex) is still alive on the server.
    pub fn lease_alive(&self, lease_hex: &str) -> bool {
        let out = self.ctl(["lease", "list"]);
        let want = u64::from_str_radix(lease_hex, 16).ok();
        out.lines()
            .skip(1)
            .any(|l| u64::from_str_radix(l.trim(), 16).ok() == want)
    }
}

/// Decodes standard base64 (as etcdctl's JSON carries keys and values) into a string.
fn b64_str(s: &str) -> String {
    String::from_utf8_lossy(&b64_decode(s)).into_owned()
}

fn b64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn base64_decodes_what_etcdctl_prints() {
    assert_eq!(b64_str("L3QvdjEvZWxlY3QveA=="), "/t/v1/elect/x");
    assert_eq!(b64_str("YWI="), "ab");
    assert_eq!(b64_str("YWJj"), "abc");
    assert_eq!(b64_str(""), "");
}
