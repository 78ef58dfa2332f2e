//! The supervisor end to end: real supervisor processes (this test binary re-executed, see
//! `sys::test_hook`), real children and grandchildren, real cgroups. Waits poll conditions
//! against deadlines.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal};

use crate::cgroup::testing::{PROCESSES, TestRoot};
use crate::child::tests::{
    ESCAPEES, PATIENCE, Scratch, escapees, eventually, exited, in_cgroup, in_pgroup,
    read_when_written, sh,
};
use crate::child::{Exit, SpawnError, Tree};
use crate::hold::clock::BootInstant;

/// The spec's budget for "if conch dies, the tree dies".
const DEATH_BUDGET: Duration = Duration::from_secs(1);

fn pidfd(pid: i32) -> OwnedFd {
    rustix::process::pidfd_open(Pid::from_raw(pid).unwrap(), PidfdFlags::empty()).unwrap()
}

/// Poll until every fd in `fds` reports its process gone; the time that took.
async fn all_exit_within(what: &str, fds: &[&OwnedFd], budget: Duration) -> Duration {
    let started = Instant::now();
    while !fds.iter().all(|fd| exited(fd)) {
        assert!(
            started.elapsed() < budget,
            "{what}: still alive after {budget:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`.
fn stat_field(pid: i32, n: usize) -> i64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let tail = text.rsplit_once(')').unwrap().1;
    tail.split_whitespace().nth(n - 3).unwrap().parse().unwrap()
}

#[test]
fn arguments_round_trip() {
    use super::Args;
    use std::ffi::OsString;
    use std::path::PathBuf;
    let cg = Args {
        fd: 5,
        cgroup: Some(PathBuf::from("/sys/fs/cgroup/conch.slice/elect-x-1")),
        program: "/bin/sh".into(),
        argv: vec!["sh".into(), "-c".into(), "echo --pgroup".into()],
    };
    assert_eq!(Args::parse(cg.to_os_args()), Some(cg));
    let pg = Args {
        fd: 3,
        cgroup: None,
        program: "/usr/bin/env".into(),
        argv: vec!["env".into(), "--".into()],
    };
    assert_eq!(Args::parse(pg.to_os_args()), Some(pg));

    let parse = |s: &[&str]| Args::parse(s.iter().map(OsString::from).collect());
    assert_eq!(parse(&[]), None);
    assert_eq!(
        parse(&["--fd", "x", "--pgroup", "--", "/bin/true", "true"]),
        None
    );
    assert_eq!(parse(&["--fd", "3", "--pgroup", "/bin/true", "true"]), None);
    assert_eq!(parse(&["--fd", "3", "--pgroup", "--", "/bin/true"]), None);
    assert_eq!(
        parse(&["--fd", "3", "--other", "--", "/bin/true", "true"]),
        None
    );
    assert!(parse(&["--fd", "3", "--pgroup", "--", "/bin/true", "true"]).is_some());
}

#[tokio::test(flavor = "current_thread")]
async fn conch_vanishing_kills_the_tree_within_a_second() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(ESCAPEES, &dir.0)).unwrap();
    let direct = pidfd(tree.pid());
    let (setsid, double) = escapees(&dir).await;
    tree.sever_link();
    let took = all_exit_within(
        "tree after conch vanished",
        &[&direct, &setsid, &double],
        DEATH_BUDGET,
    )
    .await;
    eprintln!("tree gone {took:?} after the supervisor saw end-of-file");
    assert_eq!(tree.wait().await, Exit::Signal(9));
}

#[tokio::test(flavor = "current_thread")]
async fn conch_vanishing_kills_the_group_in_pgroup_mode() {
    let _exclusive = PROCESSES.write().await;
    let dir = Scratch::new();
    let mut tree = Tree::spawn(&in_pgroup(), &sh(ESCAPEES, &dir.0)).unwrap();
    let direct = pidfd(tree.pid());
    let (setsid, double) = escapees(&dir).await;
    tree.sever_link();
    // The double-forked grandchild stayed in the group; the setsid one left it, and only
    // conch's own sweep (here: dropping the tree) finds it — the weaker mode, said out loud.
    all_exit_within(
        "group after conch vanished",
        &[&direct, &double],
        DEATH_BUDGET,
    )
    .await;
    drop(tree);
    assert!(
        exited(&setsid),
        "conch's sweep caught the one that left the group"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_passed_deadline_kills_the_tree_on_time() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(ESCAPEES, &dir.0)).unwrap();
    let direct = pidfd(tree.pid());
    let (setsid, double) = escapees(&dir).await;
    let d = BootInstant::now() + Duration::from_millis(300);
    tree.set_deadline(Some(d));
    all_exit_within("tree after D", &[&direct, &setsid, &double], PATIENCE).await;
    let now = BootInstant::now();
    assert!(now >= d, "killed {:?} before D", d - now);
    assert!(
        now - d < Duration::from_millis(250),
        "killed {:?} after D",
        now - d
    );
    assert_eq!(
        tokio::time::timeout(PATIENCE, tree.wait()).await.unwrap(),
        Exit::Signal(9)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_moving_deadline_keeps_the_tree_and_none_disarms_it() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh("exec sleep 300", &dir.0)).unwrap();
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        tree.set_deadline(Some(BootInstant::now() + Duration::from_millis(150)));
        assert!(tree.try_wait().is_none(), "killed although D kept moving");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tree.set_deadline(None);
    let quiet = tokio::time::timeout(Duration::from_millis(400), tree.wait()).await;
    assert!(quiet.is_err(), "no deadline, no kill");
    assert_eq!(tree.shutdown(PATIENCE).await, Exit::Signal(15));
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_supervisor_fails_closed() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(ESCAPEES, &dir.0)).unwrap();
    let direct = pidfd(tree.pid());
    let (setsid, double) = escapees(&dir).await;
    let supervisor = pidfd(tree.supervisor_pid());
    rustix::process::pidfd_send_signal(&supervisor, Signal::KILL).unwrap();
    assert_eq!(
        tokio::time::timeout(PATIENCE, tree.wait()).await.unwrap(),
        Exit::Signal(9),
        "a vanished supervisor counts as the child killed"
    );
    all_exit_within(
        "tree after its supervisor died",
        &[&direct, &setsid, &double],
        PATIENCE,
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn exit_is_reported_while_grandchildren_live_and_the_supervisor_is_reaped() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let script = r#"sleep 300 & echo $! > "$D/kid"; exit 5"#;
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(script, &dir.0)).unwrap();
    let supervisor = pidfd(tree.supervisor_pid());
    let kid = crate::child::tests::pin(&read_when_written(&dir.file("kid")).await);
    assert_eq!(
        tokio::time::timeout(PATIENCE, tree.wait()).await.unwrap(),
        Exit::Code(5)
    );
    assert!(!exited(&kid), "the grandchild outlives the direct child");
    assert!(
        !exited(&supervisor),
        "the supervisor stays while the tree may live"
    );
    assert_eq!(tree.shutdown(PATIENCE).await, Exit::Code(5));
    assert!(exited(&kid));
    eventually("supervisor exit", || exited(&supervisor)).await;
    let gone = rustix::process::waitid(
        rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(&supervisor)),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
    );
    assert!(
        gone.is_err(),
        "conch already reaped its supervisor: {gone:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn child_has_its_own_session_default_signals_and_no_terminal() {
    let _shared = PROCESSES.read().await;
    // As if conch's parent had ignored SIGXCPU: ignored dispositions survive exec.
    crate::child::sys::ignore_signal(rustix::process::Signal::XCPU.as_raw());
    let root = TestRoot::new();
    let dir = Scratch::new();
    let script = r#"exec sh -c 'grep -E "^Sig(Ign|Blk):" /proc/self/status > "$D/sig.tmp"; mv "$D/sig.tmp" "$D/sig"; exec sleep 300'"#;
    let mut tree = Tree::spawn(&in_cgroup(&root), &sh(script, &dir.0)).unwrap();
    let sig = read_when_written(&dir.file("sig")).await;
    for line in sig.lines() {
        let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(mask, 0, "{line}");
    }
    let (child, supervisor) = (tree.pid(), tree.supervisor_pid());
    // proc(5): 5 pgrp, 6 session, 7 tty_nr.
    assert_eq!(
        stat_field(child, 6),
        i64::from(supervisor),
        "the supervisor's session"
    );
    assert_eq!(
        stat_field(supervisor, 6),
        i64::from(supervisor),
        "it called setsid"
    );
    assert_ne!(stat_field(child, 6), i64::from(std::process::id()));
    assert_eq!(stat_field(child, 7), 0, "no controlling terminal");
    assert_eq!(tree.shutdown(PATIENCE).await, Exit::Signal(15));
}

#[tokio::test(flavor = "current_thread")]
async fn exec_errors_travel_back_from_the_supervisor() {
    let _shared = PROCESSES.read().await;
    let root = TestRoot::new();
    let dir = Scratch::new();
    let containment = in_cgroup(&root);
    // Executable, so conch's PATH check passes; the kernel then fails the exec (ENOENT for
    // the interpreter), which only the supervisor sees.
    let script = dir.file("bad-interpreter");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    rustix::fs::chmod(&script, rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
    let mut cmd = sh("", &dir.0);
    cmd.argv = vec![script.into_os_string()];
    assert!(matches!(
        Tree::spawn(&containment, &cmd),
        Err(SpawnError::NotFound(_))
    ));
    assert_eq!(
        std::fs::read_dir(root.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count(),
        0,
        "a failed spawn leaves no cgroup behind"
    );
}
