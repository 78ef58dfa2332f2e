//! A 3-member etcd cluster as separate processes on loopback, for the fault suite: kill,
//! stop/continue and restart members, find the leader. Each member also gets a
//! [`FaultProxy`] in front of its client port, and conch is pointed at the proxies, so a test
//! can cut conch off one member (or all of them) while the cluster itself stays healthy.
//!
//! Members are started from the test's own thread with `PDEATHSIG`: they die when the test
//! ends, however it ends. Dropping the `Cluster` kills them at once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::etcd::{find_binaries, free_port};
use super::proxy::FaultProxy;
use super::{Signal, proc};

/// How long a member (or the whole cluster) may take to become healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub proxy: FaultProxy,
    child: Option<Child>,
}

#[derive(Debug)]
pub struct Cluster {
    pub members: Vec<Member>,
    etcd_bin: PathBuf,
    etcdctl_bin: PathBuf,
    initial_cluster: String,
    dir: PathBuf,
}

impl Cluster {
    /// Start `n` members in `dir` and wait until every one is healthy.
    pub fn start(dir: &Path, n: usize) -> Cluster {
        let (etcd_bin, etcdctl_bin) = find_binaries();
        let mut members = Vec::new();
        for i in 0..n {
            let client_port = free_port();
            let target = format!("127.0.0.1:{client_port}").parse().unwrap();
            members.push(Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{client_port}"),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                data_dir: dir.join(format!("m{i}")),
                proxy: FaultProxy::start(target),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            members,
            etcd_bin,
            etcdctl_bin,
            initial_cluster,
            dir: dir.to_path_buf(),
        };
        for i in 0..n {
            c.spawn(i, "new");
        }
        assert!(
            proc::wait_until(HEALTHY_WITHIN, || c.leader().is_some()),
            "cluster did not elect a leader within {HEALTHY_WITHIN:?}; logs in {}",
            c.dir.display()
        );
        c
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let m = &self.members[i];
        std::fs::create_dir_all(&m.data_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .unwrap();
        let mut cmd = Command::new(&self.etcd_bin);
        cmd.arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", m.data_dir.display()))
            .arg(format!("--listen-client-urls={}", m.client_url))
            .arg(format!("--advertise-client-urls={}", m.client_url))
            .arg(format!("--listen-peer-urls={}", m.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer_url))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--initial-cluster-token=conch-faults")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        proc::die_with_parent(&mut cmd, Signal::KILL);
        let child = cmd.spawn().expect("cannot start an etcd member");
        self.members[i].child = Some(child);
    }

    /// conch's `--endpoints`: every member, through its fault proxy.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.proxy.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The members' real client URLs (bypassing the proxies), for the test's own etcdctl.
    pub fn direct_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl` against the live members (directly, not through the proxies).
    pub fn ctl<I, S>(&self, args: I) -> Result<String, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = Command::new(&self.etcdctl_bin)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.direct_endpoints()))
            .args(["--command-timeout=3s", "--dial-timeout=1s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Index of the member that is the Raft leader now, as the live members report it.
    pub fn leader(&self) -> Option<usize> {
        let out = self.ctl(["endpoint", "status", "-w", "json"]).ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        let statuses = v.as_array()?;
        let leader_id = statuses
            .iter()
            .find_map(|s| s.pointer("/Status/leader").and_then(Value::as_u64))?;
        let endpoint = statuses.iter().find_map(|s| {
            (s.pointer("/Status/header/member_id")
                .and_then(Value::as_u64)
                == Some(leader_id))
            .then(|| s["Endpoint"].as_str().map(str::to_string))
            .flatten()
        })?;
        self.members.iter().position(|m| m.client_url == endpoint)
    }

    /// Is the lease (hex) alive according to the cluster? Only an answer counts: a failed
    /// request is asked again (3 tries), never taken for "gone".
    #[track_caller]
    pub fn lease_alive(&self, lease_hex: &str) -> bool {
        let mut errors = vec![];
        while errors.len() < 3 {
            match self.ctl(["lease", "timetolive", lease_hex]) {
                Ok(out) => return !out.contains("already expired") && !out.contains("not found"),
                Err(e) => errors.push(e),
            }
        }
        panic!("the cluster did not answer about lease {lease_hex}: {errors:?}")
    }

    /// SIGKILL a member.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT a member (a frozen process: it holds its sockets but answers nothing).
    pub fn stop(&self, i: usize) {
        self.signal(i, Signal::STOP);
    }
    pub fn cont(&self, i: usize) {
        self.signal(i, Signal::CONT);
    }

    fn signal(&self, i: usize, sig: Signal) {
        if let Some(c) = &self.members[i].child {
            proc::signal(c.id() as i32, sig);
        }
    }

    /// Start a killed member again with its old data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        self.spawn(i, "existing");
    }

    /// Wait until a leader is elected among the live members.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        proc::wait_for(timeout, || self.leader())
            .unwrap_or_else(|| panic!("no etcd leader within {timeout:?}"))
    }

    /// Kill every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Restart every killed member and wait for a leader.
    pub fn restart_all(&mut self) {
        let start = Instant::now();
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i, "existing");
            }
        }
        self.wait_leader(HEALTHY_WITHIN.saturating_sub(start.elapsed()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(c) = &m.child {
                proc::signal(c.id() as i32, Signal::CONT);
            }
        }
        self.kill_all();
    }
}
