//! The real `conch` binary against a real etcd this test starts: when conch is SIGKILLed its
//! tree dies within 1 s; when conch is SIGSTOPped the tree is dead by the hold deadline D,
//! while etcd still counts the lease alive, and a resumed conch exits 70 without restarting
//! the child.
//!
//! Needs root, cgroup v2 and the etcd binaries (`scripts/fetch-etcd.sh`; `CONCH_ETCD_BIN`
//! overrides the directory). Waits poll conditions against deadlines.

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use conch::cgroup::{Cgroup, Hierarchy};
use rustix::process::{Pid, PidfdFlags, Signal};

/// Generous bound for anything that should take a moment (etcd start, conch acquiring).
const PATIENCE: Duration = Duration::from_secs(20);

/// The spec's budget for "if conch dies, the tree dies".
const DEATH_BUDGET: Duration = Duration::from_secs(1);

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("conch-sup-{what}-{}-{n}", std::process::id())
}

/// Where the etcd binaries are: `CONCH_ETCD_BIN`, else the checkout's cache, else the main
/// worktree's.
fn etcd_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONCH_ETCD_BIN") {
        return dir.into();
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/etcd/sid/bin");
    if here.join("etcd").exists() {
        return here;
    }
    PathBuf::from("/work/main/.cache/etcd/sid/bin")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(unique(what));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A single-member etcd on free loopback ports; killed and reaped on drop, which also runs
/// when the test panics.
struct Etcd {
    child: Child,
    url: String,
    _dir: Scratch,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = Scratch::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = File::create(dir.0.join("etcd.log")).unwrap();
        let child = Command::new(etcd_bin_dir().join("etcd"))
            .arg("--name=t")
            .arg(format!("--data-dir={}", dir.0.join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd starts (run scripts/fetch-etcd.sh)");
        let etcd = Etcd {
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + PATIENCE;
        while !etcd.ctl(&["endpoint", "health"]).status.success() {
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(etcd_bin_dir().join("etcdctl"))
            .arg(format!("--endpoints={}", self.url))
            .arg("--command-timeout=2s")
            .args(args)
            .output()
            .unwrap()
    }

    /// The only lease granted so far (this etcd serves one conch at a time), in hex.
    fn the_lease(&self) -> String {
        let out = self.ctl(&["lease", "list"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let ids: Vec<&str> = text.lines().skip(1).map(str::trim).collect();
        assert_eq!(ids.len(), 1, "exactly one lease expected: {text}");
        ids[0].to_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup root for conch's children under the v2 mount; whatever is left in it is killed
/// and it is removed on drop.
struct CgroupRoot(PathBuf);

impl CgroupRoot {
    fn new() -> CgroupRoot {
        let h = Hierarchy::detect().expect("these tests need cgroup v2");
        let path = h.mount.join(unique("cg"));
        std::fs::create_dir_all(&path).expect("create a cgroup (run as root)");
        CgroupRoot(path)
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        let root = Cgroup::at(&self.0);
        let _ = root.kill();
        let _ = root.wait_empty_blocking(Duration::from_secs(5));
        let _ = root.remove_blocking();
    }
}

/// A running `conch elect`; killed and reaped on drop.
struct Conch {
    child: Child,
    stderr: PathBuf,
}

impl Conch {
    /// `conch [global] elect office [elect] -- sh -c script`, with `$D` set to `dir`.
    fn elect(
        etcd: &Etcd,
        cg: &CgroupRoot,
        dir: &Scratch,
        global: &[&str],
        elect: &[&str],
        script: &str,
    ) -> Conch {
        let stderr = dir.0.join("conch.stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_conch"))
            .arg(format!("--endpoints={}", etcd.url))
            .arg(format!("--cgroup-root={}", cg.0.display()))
            .arg("--containment=cgroup")
            .arg(format!("--prefix=/{}", unique("prefix")))
            .args(global)
            .args(["elect", "office"])
            .args(elect)
            .args(["--", "sh", "-c", script])
            .env("D", &dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Conch { child, stderr }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Conch {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.pid(), Signal::CONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child: records each start, leaves a `setsid` grandchild and a double-forked one, and
/// writes its own pid last (so all three exist once `direct` does).
const TREE: &str = r#"
echo $$ >> "$D/starts"
setsid sh -c 'echo $$ > "$D/setsid.tmp"; mv "$D/setsid.tmp" "$D/setsid"; exec sleep 300' &
sh -c '(sh -c "echo \$\$ > \"$D/double.tmp\"; mv \"$D/double.tmp\" \"$D/double\"; exec sleep 300" &); exit 0'
while [ ! -e "$D/setsid" ] || [ ! -e "$D/double" ]; do sleep 0.01; done
echo $$ > "$D/direct.tmp"; mv "$D/direct.tmp" "$D/direct"
exec sleep 300
"#;

/// Pin the three processes of the tree once they have all written their pids.
fn pin_tree(dir: &Scratch, conch: &Conch) -> Vec<OwnedFd> {
    let deadline = Instant::now() + PATIENCE;
    while !dir.0.join("direct").exists() {
        assert!(
            Instant::now() < deadline,
            "the child never started; conch said:\n{}",
            conch.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ["direct", "setsid", "double"]
        .iter()
        .map(|name| {
            let pid: i32 = std::fs::read_to_string(dir.0.join(name))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            rustix::process::pidfd_open(Pid::from_raw(pid).unwrap(), PidfdFlags::empty())
                .unwrap_or_else(|e| panic!("{name} ({pid}) is alive: {e}"))
        })
        .collect()
}

fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&zero)).unwrap() == 1
}

/// Poll until every pinned process is gone; how long that took. Panics after `budget`.
fn all_gone_within(tree: &[OwnedFd], budget: Duration, what: &str, conch: &Conch) -> Duration {
    let started = Instant::now();
    while !tree.iter().all(exited) {
        assert!(
            started.elapsed() < budget,
            "{what}: tree still alive after {budget:?}; conch said:\n{}",
            conch.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed()
}

#[test]
fn sigkilled_conch_takes_its_whole_tree_within_a_second() {
    let etcd = Etcd::start();
    let cg = CgroupRoot::new();
    let dir = Scratch::new("kill");
    let mut conch = Conch::elect(&etcd, &cg, &dir, &[], &[], TREE);
    let tree = pin_tree(&dir, &conch);
    rustix::process::kill_process(conch.pid(), Signal::KILL).unwrap();
    let took = all_gone_within(&tree, DEATH_BUDGET, "after SIGKILL", &conch);
    eprintln!("tree gone {took:?} after conch was SIGKILLed");
    let status = conch.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
}

#[test]
fn stopped_conch_cannot_keep_its_tree_past_the_deadline() {
    let etcd = Etcd::start();
    let cg = CgroupRoot::new();
    let dir = Scratch::new("stop");
    // TTL 3 s, G 1 s: renewals every ~240 ms, D = last renewal + 3·0.99 − 0.25 s.
    let ttl = Duration::from_secs(3);
    let d_after_renewal = Duration::from_millis(2720);
    let mut conch = Conch::elect(&etcd, &cg, &dir, &["--ttl=3s"], &["--kill-after=1s"], TREE);
    let tree = pin_tree(&dir, &conch);
    let lease = etcd.the_lease();
    rustix::process::kill_process(conch.pid(), Signal::STOP).unwrap();
    let took = all_gone_within(&tree, ttl, "while conch was stopped", &conch);
    // Right away: etcd must still count the lease alive (no successor could have started).
    let ttl_out = etcd.ctl(&["lease", "timetolive", &lease]);
    let ttl_text = String::from_utf8_lossy(&ttl_out.stdout).into_owned();
    eprintln!(
        "tree gone {took:?} after SIGSTOP; etcd then said: {}",
        ttl_text.trim()
    );
    // The last renewal was at most one period (≈240 ms, plus scheduling) before the stop.
    assert!(
        took + Duration::from_millis(400) >= d_after_renewal,
        "killed {took:?} after the stop: earlier than D allows"
    );
    assert!(
        ttl_text.contains("remaining("),
        "the lease was still alive when the tree was dead: {ttl_text}"
    );
    assert!(
        !ttl_text.contains("already expired"),
        "lease expired before the tree was dead: {ttl_text}"
    );

    rustix::process::kill_process(conch.pid(), Signal::CONT).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = conch.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "conch did not exit after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(70),
        "hold lost; conch said:\n{}",
        conch.log()
    );
    let starts = std::fs::read_to_string(dir.0.join("starts")).unwrap();
    assert_eq!(starts.lines().count(), 1, "the child ran once: {starts}");
}
