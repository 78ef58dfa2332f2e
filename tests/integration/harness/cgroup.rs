//! The cgroup v2 hierarchy, found the way conch must find it (from `/proc/self/mountinfo`,
//! since these hosts mount it hybrid at `/sys/fs/cgroup/unified`), and the clean-up of the
//! per-test cgroup roots.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::proc::wait_until;

/// Where the cgroup v2 hierarchy is mounted, if anywhere.
pub fn v2_mount() -> Option<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            info.lines().find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                if right.split_whitespace().next()? != "cgroup2" {
                    return None;
                }
                // Field 5 is the mount point; octal escapes cover spaces and the like.
                left.split_whitespace()
                    .nth(4)
                    .map(|p| PathBuf::from(unescape(p)))
            })
        })
        .as_deref()
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(char::from(n));
                continue;
            }
            out.push(c);
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

/// The cgroup (relative to the v2 mount) that process `pid` is in, from `/proc/<pid>/cgroup`.
pub fn of_pid(pid: i32) -> Option<String> {
    parse_proc_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// The v2 line (`0::<path>`) of a `/proc/<pid>/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// Whether `cgroup.events` of `dir` says nothing runs in it or below it.
fn unpopulated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l.trim() == "populated 0"))
        .unwrap_or(true)
}

/// Kills whatever still runs under `root` (a leak the test itself reports, if it cares) and
/// removes `root` and every cgroup below it. Quiet: it runs from `Drop`.
pub fn destroy(root: &Path) {
    if !root.is_dir() {
        return;
    }
    if !unpopulated(root) {
        let _ = std::fs::write(root.join("cgroup.kill"), "1");
        wait_until(Duration::from_secs(5), || unpopulated(root));
    }
    remove_tree(root);
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Sub-cgroups directly under `root` (conch's per-child cgroups).
pub fn children(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn proc_cgroup_v2_line_is_found_among_v1_lines() {
    let text = "9:name=systemd:/\n4:memory:/x/y\n0::/conch-test-1-2/elect-a-1f\n";
    assert_eq!(
        parse_proc_cgroup(text).as_deref(),
        Some("/conch-test-1-2/elect-a-1f")
    );
    assert_eq!(unescape(r"/a\040b"), "/a b");
}
