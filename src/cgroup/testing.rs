//! Test support: a unique, self-cleaning cgroup root per test.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{Cgroup, Hierarchy};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Tests share one process: pgroup sweeps claim every child of the process that is not a
/// `Tree`'s direct child, and `kill_all_live` kills every tree. Tests that start processes
/// hold this shared; those that sweep or kill process-wide hold it exclusively.
pub(crate) static PROCESSES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// `<v2 mount>/conch-test-<pid>-<n>`, created on construction; on drop everything inside is
/// killed and removed. Panics when cgroup v2 is unusable: such a machine must fail loudly.
#[derive(Debug)]
pub(crate) struct TestRoot {
    pub(crate) path: PathBuf,
}

impl TestRoot {
    pub(crate) fn new() -> TestRoot {
        let h = Hierarchy::detect().expect("tests need a cgroup v2 hierarchy");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = h
            .mount
            .join(format!("conch-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create test cgroup root");
        TestRoot { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let root = Cgroup::at(&self.path);
        if root.populated().unwrap_or(false) {
            // The root itself is a non-root cgroup, so cgroup.kill covers every leaf.
            let _ = root.kill();
            let _ = root.wait_empty_blocking(Duration::from_secs(5));
        }
        let _ = root.remove_blocking();
    }
}
