//! Real cgroups on this machine; processes moved in from the parent side.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::testing::{PROCESSES, TestRoot};
use super::*;

/// A `sleep` moved into `cg` by writing its pid from the parent.
fn sleeper_in(cg: &Cgroup) -> Child {
    let child = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    std::fs::write(cg.path().join("cgroup.procs"), child.id().to_string())
        .expect("move into cgroup");
    child
}

fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn parse_events() {
    assert_eq!(parse_populated("populated 1\nfrozen 0\n"), Some(true));
    assert_eq!(parse_populated("populated 0\nfrozen 0\n"), Some(false));
    assert_eq!(parse_populated("frozen 0\n"), None);
}

#[test]
fn create_is_idempotent_for_empty_and_refuses_busy() {
    let _shared = PROCESSES.blocking_read();
    let root = TestRoot::new();
    let cg = Cgroup::create(root.path().join("a")).unwrap();
    assert!(!cg.populated().unwrap());
    Cgroup::create(cg.path()).expect("an empty cgroup is reused");
    let mut child = sleeper_in(&cg);
    assert!(matches!(
        Cgroup::create(cg.path()),
        Err(CgroupError::Busy { .. })
    ));
    cg.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn kill_then_wait_empty_then_remove() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let cg = Cgroup::create(root.path().join("leaf")).unwrap();
    let mut child = sleeper_in(&cg);
    assert!(cg.populated().unwrap());
    assert_eq!(cg.pids().unwrap(), vec![child.id() as i32]);

    // A nested cgroup with its own process is covered by kill, populated and remove.
    let nested = Cgroup::create(cg.path().join("nested")).unwrap();
    let mut grandchild = sleeper_in(&nested);
    let mut all = cg.pids_recursive().unwrap();
    all.sort();
    let mut want = vec![child.id() as i32, grandchild.id() as i32];
    want.sort();
    assert_eq!(all, want);

    cg.kill().unwrap();
    tokio::time::timeout(Duration::from_secs(5), cg.wait_empty())
        .await
        .expect("empty within 5 s")
        .unwrap();
    assert!(!cg.populated().unwrap());
    child.wait().unwrap();
    grandchild.wait().unwrap();
    cg.remove().await.unwrap();
    assert!(!cg.path().exists());
    cg.remove().await.expect("removing twice is fine");
}

#[test]
fn blocking_wait_times_out_then_sees_empty() {
    let _shared = PROCESSES.blocking_read();
    let root = TestRoot::new();
    let cg = Cgroup::create(root.path().join("b")).unwrap();
    let mut child = sleeper_in(&cg);
    assert!(!cg.wait_empty_blocking(Duration::from_millis(50)).unwrap());
    cg.kill().unwrap();
    assert!(cg.wait_empty_blocking(Duration::from_secs(5)).unwrap());
    child.wait().unwrap();
    cg.remove_blocking().unwrap();
}

#[test]
fn cpu_usage_grows() {
    let _shared = PROCESSES.blocking_read();
    let root = TestRoot::new();
    let cg = Cgroup::create(root.path().join("cpu")).unwrap();
    let before = cg.cpu_usage().unwrap();
    let mut child = Command::new("sh")
        .args([
            "-c",
            "read _; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(cg.path().join("cgroup.procs"), child.id().to_string()).unwrap();
    drop(child.stdin.take()); // EOF: start burning CPU inside the cgroup
    child.wait().unwrap();
    eventually("cpu usage to grow", Duration::from_secs(5), || {
        cg.cpu_usage().unwrap() > before
    });
}

#[test]
fn stale_cgroups_are_removed_but_not_busy_or_young_ones() {
    let _shared = PROCESSES.blocking_read();
    let root = TestRoot::new();
    let stale = Cgroup::create(root.path().join("stale")).unwrap();
    Cgroup::create(stale.path().join("inner")).unwrap();
    let busy = Cgroup::create(root.path().join("busy")).unwrap();
    let mut child = sleeper_in(&busy);

    let none = remove_stale(root.path(), Duration::from_secs(3600)).unwrap();
    assert!(none.is_empty(), "young cgroups are kept: {none:?}");
    let removed = remove_stale(root.path(), Duration::ZERO).unwrap();
    assert_eq!(removed, vec![stale.path().to_path_buf()]);
    assert!(busy.path().exists());

    busy.kill().unwrap();
    child.wait().unwrap();
}
