//! Real processes in real cgroups (and process groups) on this machine. Every wait polls a
//! condition against a deadline.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags};

use super::*;
use crate::cgroup::testing::{PROCESSES, TestRoot};

/// Generous bound for anything that should take milliseconds.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A scratch directory, removed on drop.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new() -> Scratch {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("conch-child-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sh -c script` with `$D` set to `dir`.
pub(crate) fn sh(script: &str, dir: &Path) -> ChildCommand {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ChildCommand {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("D".into(), dir.as_os_str().to_owned())],
        cgroup_leaf: format!("test-{n}"),
        output: None,
    }
}

pub(crate) fn in_cgroup(root: &TestRoot) -> Containment {
    Containment::resolve(ContainmentRequest::Cgroup, Some(root.path().to_path_buf()))
        .expect("cgroup containment")
}

pub(crate) fn in_pgroup() -> Containment {
    Containment::resolve(ContainmentRequest::Pgroup, None).unwrap()
}

pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait for a file the child writes, and return its trimmed contents.
pub(crate) async fn read_when_written(path: &Path) -> String {
    let mut text = String::new();
    eventually(&format!("{}", path.display()), || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.ends_with('\n')
    })
    .await;
    text.trim().to_owned()
}

/// Pin a process by pid, so its death can be observed without pid-reuse doubts.
pub(crate) fn pin(pid: &str) -> OwnedFd {
    let pid = Pid::from_raw(pid.parse().unwrap()).unwrap();
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).expect("process is alive")
}

pub(crate) fn exited(pidfd: &OwnedFd) -> bool {
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

/// Starts a child that leaves two escapees: one in a new session (`setsid`) and one
/// double-forked (its parent exits at once). Both write their pid and then sleep.
pub(crate) const ESCAPEES: &str = r#"
setsid sh -c 'echo $$ > "$D/setsid.tmp"; mv "$D/setsid.tmp" "$D/setsid"; exec sleep 300' &
sh -c '(echo $$ > /dev/null; sh -c "echo \$\$ > \"$D/double.tmp\"; mv \"$D/double.tmp\" \"$D/double\"; exec sleep 300" &) ; exit 0'
exec sleep 300
"#;

pub(crate) async fn escapees(dir: &Scratch) -> (OwnedFd, OwnedFd) {
    let setsid = read_when_written(&dir.file("setsid")).await;
    let double = read_when_written(&dir.file("double")).await;
    (pin(&setsid), pin(&double))
}

#[tokio::test(flavor = "current_thread")]
async fn child_is_in_its_own_cgroup_before_exec() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut tree = Tree::spawn(
        &in_cgroup(&root),
        &sh(r#"cat /proc/self/cgroup > "$D/cg""#, &dir.0),
    )
    .unwrap();
    assert_eq!(tree.mode(), ContainmentMode::Cgroup);
    let cg_dir = tree.cgroup_path().unwrap().to_path_buf();
    assert_eq!(tree.wait().await, Exit::Code(0));
    let text = std::fs::read_to_string(dir.file("cg")).unwrap();
    let own = crate::cgroup::parse_own_cgroup(&text).unwrap();
    let mount = crate::cgroup::Hierarchy::detect().unwrap().mount;
    assert_eq!(mount.join(own.trim_start_matches('/')), cg_dir);
    assert_eq!(tree.shutdown(Duration::from_secs(1)).await, Exit::Code(0));
    assert!(!cg_dir.exists(), "cgroup removed after shutdown");
}

#[tokio::test(flavor = "current_thread")]
async fn kill_reaches_setsid_and_double_forked_grandchildren() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(ESCAPEES, &dir.0)).unwrap();
    let (setsid, double) = escapees(&dir).await;
    assert!(!exited(&setsid) && !exited(&double));
    tree.kill();
    tokio::time::timeout(PATIENCE, tree.wait_empty())
        .await
        .expect("tree empties");
    assert!(exited(&setsid), "setsid grandchild killed");
    assert!(exited(&double), "double-forked grandchild killed");
    assert_eq!(tree.wait().await, Exit::Signal(9));
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_escalates_on_a_tree_that_ignores_term() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let script = r#"trap '' TERM; sleep 300 & echo $! > "$D/kid"; echo ready > "$D/ready"; wait"#;
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(script, &dir.0)).unwrap();
    let kid = pin(&read_when_written(&dir.file("kid")).await);
    read_when_written(&dir.file("ready")).await;
    let cg_dir = tree.cgroup_path().unwrap().to_path_buf();
    let grace = Duration::from_millis(300);
    let started = Instant::now();
    let exit = tokio::time::timeout(PATIENCE, tree.shutdown(grace))
        .await
        .expect("shutdown returns");
    assert_eq!(
        exit,
        Exit::Signal(9),
        "TERM was ignored, so SIGKILL ended it"
    );
    assert!(started.elapsed() >= grace, "waited the grace period first");
    assert!(exited(&kid));
    assert!(!cg_dir.exists(), "cgroup removed");
    assert_eq!(tree.wait().await, Exit::Signal(9), "wait repeats the exit");
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_terminates_politely_within_grace() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let script = r#"sleep 300 & echo $! > "$D/kid"; wait"#;
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(script, &dir.0)).unwrap();
    let kid = pin(&read_when_written(&dir.file("kid")).await);
    let started = Instant::now();
    let exit = tree.shutdown(PATIENCE).await;
    assert_eq!(exit, Exit::Signal(15));
    assert!(started.elapsed() < PATIENCE / 2, "no escalation needed");
    assert!(exited(&kid), "SIGTERM reached the grandchild too");
}

#[tokio::test(flavor = "current_thread")]
async fn exit_codes_and_signals() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let containment = in_cgroup(&root);
    let mut code = Tree::spawn(&containment, &sh("exit 7", &dir.0)).unwrap();
    assert_eq!(code.wait().await, Exit::Code(7));
    assert_eq!(code.wait().await, Exit::Code(7));
    assert_eq!(code.try_wait(), Some(Exit::Code(7)));
    let mut signalled = Tree::spawn(&containment, &sh("kill -USR2 $$", &dir.0)).unwrap();
    assert_eq!(signalled.wait().await, Exit::Signal(12));
    // Cancelling a wait and waiting again is fine.
    let script = r#"while [ ! -e "$D/go" ]; do sleep 0.01; done; exit 3"#;
    let mut slow = Tree::spawn(&containment, &sh(script, &dir.0)).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(20), slow.wait())
            .await
            .is_err()
    );
    std::fs::write(dir.file("go"), "").unwrap();
    assert_eq!(
        tokio::time::timeout(PATIENCE, slow.wait()).await.unwrap(),
        Exit::Code(3)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn forward_reaches_the_direct_child() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let script = r#"trap 'exit 42' HUP; echo ready > "$D/ready"; while :; do sleep 0.01; done"#;
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(script, &dir.0)).unwrap();
    read_when_written(&dir.file("ready")).await;
    tree.forward(1);
    assert_eq!(
        tokio::time::timeout(PATIENCE, tree.wait()).await.unwrap(),
        Exit::Code(42)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn environment_is_filtered_then_extended() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut cmd = sh(r#"echo "$CONCH_TEST_VAR" > "$D/env""#, &dir.0);
    cmd.env.push(("CONCH_TEST_VAR".into(), "hello".into()));
    let (sock, _other) = supervisor::proto::pair().unwrap();
    let built = spawn::command(&cmd, Path::new("/bin/sh"), sock.as_fd(), None).unwrap();
    let envs: Vec<String> = built
        .env()
        .map(|kv| kv.to_string_lossy().into_owned())
        .collect();
    for key in spawn::STRIPPED_ENV {
        assert!(
            !envs.iter().any(|kv| kv.starts_with(&format!("{key}="))),
            "{key} removed"
        );
    }
    assert_eq!(
        envs.iter()
            .filter(|kv| kv.starts_with("CONCH_TEST_VAR="))
            .collect::<Vec<_>>(),
        ["CONCH_TEST_VAR=hello"],
        "set once, by the command"
    );
    drop(built);
    let mut tree = Tree::spawn(&in_cgroup(&root), &cmd).unwrap();
    assert_eq!(tree.wait().await, Exit::Code(0));
    assert_eq!(read_when_written(&dir.file("env")).await, "hello");
}

#[tokio::test(flavor = "current_thread")]
async fn spawn_errors_are_classified() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let containment = in_cgroup(&root);
    let mut missing = sh("", &dir.0);
    missing.argv = vec![OsString::from("conch-test-no-such-program")];
    assert!(
        matches!(Tree::spawn(&containment, &missing), Err(SpawnError::NotFound(name)) if name == "conch-test-no-such-program")
    );
    missing.argv = vec![dir.file("absent").into_os_string()];
    assert!(matches!(
        Tree::spawn(&containment, &missing),
        Err(SpawnError::NotFound(_))
    ));

    let plain = dir.file("plain");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    let mut not_exec = sh("", &dir.0);
    not_exec.argv = vec![plain.into_os_string()];
    assert!(matches!(
        Tree::spawn(&containment, &not_exec),
        Err(SpawnError::NotExecutable(_))
    ));
    not_exec.argv = vec![dir.0.clone().into_os_string()];
    assert!(matches!(
        Tree::spawn(&containment, &not_exec),
        Err(SpawnError::NotExecutable(_))
    ));
    // A failed spawn leaves no cgroup behind.
    assert_eq!(
        std::fs::read_dir(root.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count(),
        0
    );
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_tree_kills_it() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let tree = Tree::spawn(&in_cgroup(&root), &sh(ESCAPEES, &dir.0)).unwrap();
    let direct =
        rustix::process::pidfd_open(Pid::from_raw(tree.pid()).unwrap(), PidfdFlags::empty())
            .unwrap();
    let (setsid, double) = escapees(&dir).await;
    let cg_dir = tree.cgroup_path().unwrap().to_path_buf();
    drop(tree);
    assert!(
        exited(&direct) && exited(&setsid) && exited(&double),
        "drop killed the tree synchronously"
    );
    assert!(!cg_dir.exists(), "drop removed the cgroup");
}

#[tokio::test(flavor = "current_thread")]
async fn cpu_usage_is_reported() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let script = r#"i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo done > "$D/done"; exec sleep 300"#;
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(script, &dir.0)).unwrap();
    read_when_written(&dir.file("done")).await;
    assert!(tree.cpu_usage().unwrap() > Duration::ZERO);
    assert_eq!(tree.shutdown(PATIENCE).await, Exit::Signal(15));
}

#[test]
fn any_thread_may_spawn() {
    let root = TestRoot::new();
    let dir = Scratch::new();
    let containment = in_cgroup(&root);
    let cmd = sh(r#"echo ready > "$D/ready"; exec sleep 300"#, &dir.0);
    let _shared = PROCESSES.blocking_read();
    // The thread that spawned exits at once. The supervisor forked the child from its only
    // thread, so the child's PDEATHSIG is not tied to the short-lived thread.
    let mut tree = std::thread::spawn(move || Tree::spawn(&containment, &cmd).unwrap())
        .join()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        read_when_written(&dir.file("ready")).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(200), tree.wait())
                .await
                .is_err(),
            "the child outlives the thread that spawned it"
        );
        assert_eq!(tree.shutdown(PATIENCE).await, Exit::Signal(15));
    });
}

#[tokio::test(flavor = "current_thread")]
async fn pgroup_mode_kills_grandchildren_and_escapees() {
    let _exclusive = PROCESSES.write().await;
    let dir = Scratch::new();
    let mut tree = Tree::spawn(&in_pgroup(), &sh(ESCAPEES, &dir.0)).unwrap();
    assert_eq!(tree.mode(), ContainmentMode::Pgroup);
    assert!(tree.cgroup_path().is_none() && tree.cpu_usage().is_none());
    let (setsid, double) = escapees(&dir).await;
    let exit = tokio::time::timeout(PATIENCE, tree.shutdown(Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(exit, Exit::Signal(15));
    assert!(
        exited(&setsid),
        "setsid grandchild (parent alive) found through its parent"
    );
    assert!(
        exited(&double),
        "double-forked orphan found through the subreaper"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn pgroup_kill_and_drop() {
    let _exclusive = PROCESSES.write().await;
    let dir = Scratch::new();
    let script = r#"trap '' TERM; sh -c 'echo $$ > "$D/kid.tmp"; mv "$D/kid.tmp" "$D/kid"; exec sleep 300' & wait"#;
    let tree = Tree::spawn(&in_pgroup(), &sh(script, &dir.0)).unwrap();
    let kid = pin(&read_when_written(&dir.file("kid")).await);
    drop(tree);
    assert!(exited(&kid), "drop killed the grandchild");
}

#[tokio::test(flavor = "current_thread")]
async fn kill_all_live_kills_every_tree() {
    let _exclusive = PROCESSES.write().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut a = Tree::spawn(&in_cgroup(&root), &sh("exec sleep 300", &dir.0)).unwrap();
    let mut b = Tree::spawn(&in_pgroup(), &sh("exec sleep 300", &dir.0)).unwrap();
    kill_all_live();
    assert_eq!(
        tokio::time::timeout(PATIENCE, a.wait()).await.unwrap(),
        Exit::Signal(9)
    );
    assert_eq!(
        tokio::time::timeout(PATIENCE, b.wait()).await.unwrap(),
        Exit::Signal(9)
    );
}

#[test]
fn containment_decisions() {
    let root = TestRoot::new();
    let given = Some(root.path().join("slice"));
    let auto = Containment::resolve(ContainmentRequest::Auto, given.clone()).unwrap();
    assert_eq!(auto.mode, ContainmentMode::Cgroup);
    assert_eq!(auto.cgroup_root, given);
    assert!(given.as_ref().unwrap().is_dir(), "resolve creates the root");

    let outside = Some(PathBuf::from("/tmp/not-a-cgroup"));
    let probed = Containment::probe(ContainmentRequest::Auto, outside.clone()).unwrap();
    assert_eq!(probed.mode, ContainmentMode::Pgroup);
    assert!(probed.reason.contains("not below"), "{}", probed.reason);
    assert!(matches!(
        Containment::probe(ContainmentRequest::Cgroup, outside),
        Err(ContainmentError::CgroupUnavailable(_))
    ));
    let fresh = root.path().join("not-created");
    let probe = Containment::probe(ContainmentRequest::Cgroup, Some(fresh.clone())).unwrap();
    assert_eq!(probe.mode, ContainmentMode::Cgroup);
    assert!(!fresh.exists(), "probe creates nothing");
    let pg = Containment::resolve(ContainmentRequest::Pgroup, None).unwrap();
    assert_eq!((pg.mode, pg.cgroup_root), (ContainmentMode::Pgroup, None));
}

/// The pid of a warm supervisor, pinned.
fn warm_supervisor(warm: &Warm) -> OwnedFd {
    let parts = warm.parts.as_ref().expect("not started yet");
    pin(&parts.pid.to_string())
}

#[tokio::test(flavor = "current_thread")]
async fn a_warm_supervisor_starts_the_child_as_spawn_would() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let warm = Tree::prepare().unwrap();
    let supervisor = warm_supervisor(&warm);
    // It starts nothing on its own: no child appears while it waits.
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        warm.parts.as_ref().unwrap().pid,
        warm.parts.as_ref().unwrap().pid
    ))
    .unwrap_or_default();
    assert_eq!(children.trim(), "", "a warm supervisor has no child");
    let mut cmd = sh(
        r#"cat /proc/self/cgroup > "$D/cg"; echo "$CONCH_TEST_VAR" > "$D/env"; exit 7"#,
        &dir.0,
    );
    cmd.env.push(("CONCH_TEST_VAR".into(), "warm".into()));
    let mut tree = warm.start(&in_cgroup(&root), &cmd).unwrap();
    assert_eq!(tree.mode(), ContainmentMode::Cgroup);
    let cg_dir = tree.cgroup_path().unwrap().to_path_buf();
    assert_eq!(tree.wait().await, Exit::Code(7));
    assert_eq!(read_when_written(&dir.file("env")).await, "warm");
    let text = std::fs::read_to_string(dir.file("cg")).unwrap();
    let own = crate::cgroup::parse_own_cgroup(&text).unwrap();
    let mount = crate::cgroup::Hierarchy::detect().unwrap().mount;
    assert_eq!(
        mount.join(own.trim_start_matches('/')),
        cg_dir,
        "born in its cgroup"
    );
    assert_eq!(tree.shutdown(Duration::from_secs(1)).await, Exit::Code(7));
    assert!(
        exited(&supervisor),
        "the same supervisor ran it and is gone"
    );
    assert!(!cg_dir.exists());
}

#[tokio::test(flavor = "current_thread")]
async fn an_unused_warm_supervisor_is_reaped_and_a_dead_one_replaced() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    // Dropped unused: gone, and reaped (no zombie left behind).
    let warm = Tree::prepare().unwrap();
    let pid = warm.parts.as_ref().unwrap().pid;
    let supervisor = warm_supervisor(&warm);
    drop(warm);
    assert!(exited(&supervisor));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z ")),
        "reaped, not a zombie"
    );
    // Killed while waiting: `start` starts a fresh supervisor and the child still runs.
    let warm = Tree::prepare().unwrap();
    let supervisor = warm_supervisor(&warm);
    rustix::process::pidfd_send_signal(&supervisor, rustix::process::Signal::KILL).unwrap();
    eventually("the warm supervisor to die", || exited(&supervisor)).await;
    let mut tree = warm
        .start(&in_cgroup(&root), &sh(r#"echo ran > "$D/ran""#, &dir.0))
        .unwrap();
    assert_eq!(tree.wait().await, Exit::Code(0));
    assert_eq!(read_when_written(&dir.file("ran")).await, "ran");
    assert_eq!(tree.shutdown(Duration::from_secs(1)).await, Exit::Code(0));
    // Errors are the same as spawn's, and leave nothing behind.
    let warm = Tree::prepare().unwrap();
    let supervisor = warm_supervisor(&warm);
    let mut missing = sh("", &dir.0);
    missing.argv = vec![OsString::from("conch-test-no-such-program")];
    assert!(matches!(
        warm.start(&in_cgroup(&root), &missing),
        Err(SpawnError::NotFound(name)) if name == "conch-test-no-such-program"
    ));
    assert!(exited(&supervisor), "the unused supervisor is gone");
}

#[tokio::test(flavor = "current_thread")]
async fn a_warm_supervisor_in_pgroup_mode_is_no_orphan_of_another_tree() {
    let _exclusive = PROCESSES.write().await;
    let dir = Scratch::new();
    let warm = Tree::prepare().unwrap();
    let supervisor = warm_supervisor(&warm);
    // A pgroup tree ends while the warm supervisor (conch's child too) waits: its sweeps must
    // neither count nor kill the warm supervisor.
    let mut other = Tree::spawn(&in_pgroup(), &sh("exit 0", &dir.0)).unwrap();
    assert_eq!(other.wait().await, Exit::Code(0));
    let exit = tokio::time::timeout(PATIENCE, other.shutdown(Duration::from_millis(50)))
        .await
        .expect("the pgroup tree empties although a warm supervisor waits");
    assert_eq!(exit, Exit::Code(0));
    assert!(
        !exited(&supervisor),
        "the sweep left the warm supervisor alone"
    );
    let mut tree = warm
        .start(&in_pgroup(), &sh(r#"echo ran > "$D/ran""#, &dir.0))
        .unwrap();
    assert_eq!(tree.mode(), ContainmentMode::Pgroup);
    assert_eq!(tree.wait().await, Exit::Code(0));
    assert_eq!(read_when_written(&dir.file("ran")).await, "ran");
    tokio::time::timeout(PATIENCE, tree.shutdown(Duration::from_millis(50)))
        .await
        .unwrap();
}
