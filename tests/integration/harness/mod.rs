//! The integration-test harness: one real etcd per test binary, the real `conch` binary
//! driven through a builder, real children, real cgroups.
//!
//! Each test makes a [`Ctx`]: its own key prefix (`/t/<test>-<n>`), its own temporary
//! directory for marker files, its own cgroup root under the v2 mount, and a tag that every
//! process it starts carries in its environment. Dropping the `Ctx` kills whatever carries the
//! tag (a leak the test may have asserted on already), removes the cgroup root and, unless
//! the test failed, the directory.

#![allow(dead_code)]

pub mod cgroup;
pub mod cluster;
pub mod conch;
pub mod cron;
pub mod etcd;
pub mod journal;
pub mod proc;
pub mod proxy;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use conch::{Conch, Running};
pub use etcd::{Etcd, Kv};
pub use proc::{alive, read_pid, wait_for, wait_until};
pub use rustix::process::Signal;

/// Environment variable that marks every process a test started (conch and its tree).
pub const TAG_VAR: &str = "CONCH_IT_TAG";

static NEXT: AtomicUsize = AtomicUsize::new(1);

/// The per-process scratch directory; stale ones of dead test binaries are swept on creation.
pub fn base_dir() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let tmp = std::env::temp_dir();
        sweep_stale(&tmp);
        let dir = tmp.join(format!("conch-it-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        dir
    })
    .clone()
}

/// Removes scratch directories and cgroup roots left by test binaries that no longer run
/// (their etcd died with them, PDEATHSIG; their files did not).
fn sweep_stale(tmp: &Path) {
    let dead = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next()?.parse::<i32>().ok())
            .is_some_and(|pid| !alive(pid))
    };
    if let Ok(entries) = std::fs::read_dir(tmp) {
        for e in entries.flatten() {
            if dead(&e.file_name().to_string_lossy(), "conch-it-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Some(mount) = cgroup::v2_mount()
        && let Ok(entries) = std::fs::read_dir(mount)
    {
        for e in entries.flatten() {
            if dead(&e.file_name().to_string_lossy(), "conch-test-") {
                cgroup::destroy(&e.path());
            }
        }
    }
}

/// Everything one test owns.
#[derive(Debug)]
pub struct Ctx {
    pub name: String,
    /// The key prefix conch gets as `CONCH_PREFIX`.
    pub prefix: String,
    /// Scratch directory for marker files.
    pub dir: PathBuf,
    /// `CONCH_CGROUP_ROOT` for this test, when the host has cgroup v2.
    pub cgroup_root: Option<PathBuf>,
    pub tag: String,
    pub etcd: &'static Etcd,
}

impl Ctx {
    pub fn new(name: &str) -> Ctx {
        let etcd = etcd::shared();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = base_dir().join(format!("{name}-{n}"));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Ctx {
            name: name.to_string(),
            prefix: format!("/t/{name}-{n}"),
            dir,
            cgroup_root: cgroup::v2_mount().map(|m| m.join(format!("conch-test-{pid}-{n}"))),
            tag: format!("{pid}-{n}"),
            etcd,
        }
    }

    /// A conch command line for this test.
    pub fn conch(&self) -> Conch {
        Conch::new(self)
    }

    /// A command line for `program` in this test's settings: none of the caller's `CONCH_*`
    /// variables, this test's etcd, prefix and cgroup root, the process tag, the scratch
    /// directory as working directory.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CONCH_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("CONCH_ENDPOINTS", &self.etcd.endpoint)
            .env("CONCH_PREFIX", &self.prefix)
            .env(TAG_VAR, &self.tag)
            .env("RUST_BACKTRACE", "1")
            .current_dir(&self.dir);
        if let Some(root) = &self.cgroup_root {
            cmd.env("CONCH_CGROUP_ROOT", root);
        }
        cmd
    }

    /// `conch elect <office>`; add flags, then `--` and the command.
    pub fn elect(&self, office: &str) -> Conch {
        self.conch().args(["elect", office])
    }

    /// A path in the test's scratch directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `["sh", "-c", script]` with every `{dir}` replaced by the scratch directory.
    pub fn sh(&self, script: &str) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            script.replace("{dir}", &self.dir.to_string_lossy()),
        ]
    }

    /// Creates (or updates) a marker file: how tests tell a child to move on.
    pub fn touch(&self, rel: &str) {
        std::fs::write(self.path(rel), "").expect("cannot write marker file");
    }

    /// The content of a marker file, if it exists.
    pub fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    /// Waits for a marker file to be complete (non-empty, ending in a newline, as `echo`
    /// writes it) and returns its content trimmed.
    #[track_caller]
    pub fn wait_file(&self, rel: &str, timeout: Duration) -> String {
        wait_for(timeout, || {
            self.read(rel)
                .filter(|s| s.ends_with('\n'))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| panic!("{rel} not written within {timeout:?}"))
    }

    /// Like [`Ctx::wait_file`], for a file the child of a running conch writes: gives up
    /// early when conch exits without it, and shows conch's stderr on failure.
    #[track_caller]
    pub fn wait_file_of(&self, rel: &str, timeout: Duration, conch: &mut Running) -> String {
        let complete = || {
            self.read(rel)
                .filter(|s| s.ends_with('\n'))
                .map(|s| s.trim().to_string())
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = complete() {
                return s;
            }
            // Once conch is gone nothing more will be written: stop waiting.
            if conch.try_wait().is_some() {
                if let Some(s) = complete() {
                    return s;
                }
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let state = match conch.try_wait() {
            Some(out) => format!("conch exited {:?} after {:?}", out.code, out.elapsed),
            None => format!("conch still running after {timeout:?}"),
        };
        panic!(
            "{rel} not written ({state})\n--- conch stderr\n{}",
            conch.stderr()
        )
    }

    /// `<prefix>/v1/elect/<office>/`
    pub fn office_prefix(&self, office: &str) -> String {
        format!("{}/v1/elect/{office}/", self.prefix)
    }

    /// Every key under this test's prefix.
    pub fn keys(&self) -> Vec<Kv> {
        self.etcd.get_prefix(&format!("{}/", self.prefix))
    }

    /// The candidate keys of an office, in key order.
    pub fn office_keys(&self, office: &str) -> Vec<Kv> {
        self.etcd.get_prefix(&self.office_prefix(office))
    }

    /// Live processes this test started that are still around (conch and its trees).
    pub fn tagged_processes(&self) -> Vec<i32> {
        proc::tagged(TAG_VAR, &self.tag)
    }
}

/// Runs `conch <args>` (every `{dir}` replaced by the scratch directory) in a fresh [`Ctx`]
/// named `test` and checks it is refused as a usage error (quality.md §4): exit 64, a
/// message on stderr containing one of `mentions` (case-insensitive), no child run (the
/// file `ran` in the scratch directory, which a child given as `echo ran > {dir}/ran`
/// would write, does not exist), nothing written under the test's prefix.
#[track_caller]
pub fn refused(test: &str, args: &[&str], mentions: &[&str]) {
    let ctx = Ctx::new(test);
    let dir = ctx.dir.to_string_lossy().into_owned();
    let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", &dir)).collect();
    let out = ctx.conch().args(&args).run();
    out.expect_code(64);
    let stderr = out.stderr.to_lowercase();
    assert!(
        mentions.iter().any(|m| stderr.contains(&m.to_lowercase())),
        "conch {args:?}: stderr should name the problem (one of {mentions:?}):\n{}",
        out.stderr
    );
    assert!(ctx.read("ran").is_none(), "conch {args:?} ran the child");
    assert!(
        ctx.keys().is_empty(),
        "conch {args:?} wrote to etcd: {:?}",
        ctx.keys()
    );
}

impl Drop for Ctx {
    fn drop(&mut self) {
        for pid in self.tagged_processes() {
            proc::signal(pid, Signal::KILL);
        }
        if let Some(root) = &self.cgroup_root {
            cgroup::destroy(root);
        }
        if std::thread::panicking() {
            eprintln!("harness: kept {} for inspection", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
