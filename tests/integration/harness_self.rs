//! The harness checks itself: a broken harness makes every other failure meaningless.

use std::time::Duration;

use crate::harness::{Ctx, alive, cgroup, wait_until};

#[test]
fn etcd_is_shared_reachable_and_keys_round_trip() {
    let ctx = Ctx::new("harness-etcd");
    let other = Ctx::new("harness-etcd");
    assert_eq!(
        ctx.etcd.endpoint, other.etcd.endpoint,
        "one etcd per binary"
    );
    assert_ne!(ctx.prefix, other.prefix, "prefixes are unique per test");
    let key = format!("{}/probe", ctx.prefix);
    ctx.etcd.put(&key, "v1");
    let kvs = ctx.keys();
    assert_eq!(kvs.len(), 1, "{kvs:?}");
    assert_eq!(kvs[0].key, key);
    assert_eq!(kvs[0].value, "v1");
    assert!(kvs[0].create_revision > 0);
    assert!(other.keys().is_empty(), "prefixes must not overlap");
    ctx.etcd.del(&key);
    assert!(ctx.keys().is_empty());
}

#[test]
fn zombies_count_as_dead_and_tags_find_descendants() {
    let ctx = Ctx::new("harness-proc");
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 1000 & echo $! ; exec sleep 1000"])
        .env(crate::harness::TAG_VAR, &ctx.tag)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    assert!(alive(pid));
    assert!(wait_until(Duration::from_secs(5), || ctx
        .tagged_processes()
        .len()
        == 2));
    crate::harness::proc::signal(pid, rustix::process::Signal::KILL);
    // Not reaped yet: a zombie, which must count as dead.
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok(),
        "still a zombie"
    );
    child.wait().unwrap();
    let left = ctx.tagged_processes();
    assert_eq!(
        left.len(),
        1,
        "the background sleep is still tagged: {left:?}"
    );
    drop(ctx);
    assert!(
        wait_until(Duration::from_secs(5), || !alive(left[0])),
        "Ctx drop kills leaks"
    );
}

#[test]
fn cgroup_v2_mount_is_found() {
    let mount = cgroup::v2_mount().expect("this host has no cgroup v2 hierarchy");
    assert!(mount.join("cgroup.procs").is_file(), "{}", mount.display());
}
