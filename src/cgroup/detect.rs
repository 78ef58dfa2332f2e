//! Finding the cgroup v2 hierarchy and deciding whether conch may create cgroups in it.
//!
//! The v2 mount is read from `/proc/self/mountinfo`, never assumed: hybrid hosts mount it at
//! `/sys/fs/cgroup/unified` with v1 controllers at `/sys/fs/cgroup/*`. Parsing is split from
//! reading so the parsers are tested on sample text.

use std::path::{Path, PathBuf};

use super::CgroupError;

/// Where `/proc` tells us about mounts and cgroup membership.
const MOUNTINFO: &str = "/proc/self/mountinfo";
const SELF_CGROUP: &str = "/proc/self/cgroup";

/// Leaf name of conch's slice under the v2 mount when no `--cgroup-root` is given.
pub const DEFAULT_SLICE: &str = "conch.slice";

/// The cgroup v2 hierarchy as mounted in conch's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point, e.g. `/sys/fs/cgroup/unified` on hybrid hosts.
    pub mount: PathBuf,
    /// Mounted read-only (common in containers): no cgroup can be created.
    pub read_only: bool,
    /// conch's own cgroup, as `/proc/self/cgroup` names it (`/` = the root).
    pub own: String,
}

impl Hierarchy {
    /// Read `/proc/self/mountinfo` and `/proc/self/cgroup`. Blocks only on procfs reads.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let mountinfo = read_proc(MOUNTINFO)?;
        let (mount, read_only) =
            parse_mountinfo(&mountinfo).ok_or_else(|| CgroupError::NoHierarchy {
                path: PathBuf::from(MOUNTINFO),
            })?;
        let cgroups = read_proc(SELF_CGROUP)?;
        let own = parse_own_cgroup(&cgroups).ok_or_else(|| CgroupError::NoHierarchy {
            path: PathBuf::from(SELF_CGROUP),
        })?;
        Ok(Hierarchy {
            mount,
            read_only,
            own,
        })
    }

    /// `<mount>/conch.slice`.
    pub fn default_root(&self) -> PathBuf {
        self.mount.join(DEFAULT_SLICE)
    }

    /// A root given by the operator: absolute paths as they are, relative ones under the mount.
    /// `Err` (with the reason) when the path lies outside the v2 hierarchy.
    pub fn root_for(&self, given: Option<&Path>) -> Result<PathBuf, String> {
        let root = match given {
            None => return Ok(self.default_root()),
            Some(p) if p.is_absolute() => p.to_path_buf(),
            Some(p) => self.mount.join(p),
        };
        let climbs = root
            .components()
            .any(|c| c == std::path::Component::ParentDir);
        match root.strip_prefix(&self.mount) {
            Ok(rest) if !rest.as_os_str().is_empty() && !climbs => Ok(root),
            _ => Err(format!(
                "{} is not below the cgroup v2 mount {}",
                root.display(),
                self.mount.display()
            )),
        }
    }

    /// Whether conch can create cgroups under `root` (which may not exist yet): the mount is
    /// writable, and conch has `CAP_SYS_ADMIN` or write access to the nearest existing
    /// directory. Creates nothing. `Err` carries the reason for the operator.
    pub fn check_usable(&self, root: &Path) -> Result<(), String> {
        if self.read_only {
            return Err(format!("{} is mounted read-only", self.mount.display()));
        }
        let existing = root
            .ancestors()
            .find(|p| p.is_dir())
            .unwrap_or(self.mount.as_path());
        let sys_admin = caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_SYS_ADMIN,
        )
        .unwrap_or(false);
        let writable = rustix::fs::accessat(
            rustix::fs::CWD,
            existing,
            rustix::fs::Access::WRITE_OK,
            rustix::fs::AtFlags::EACCESS,
        )
        .is_ok();
        if !sys_admin && !writable {
            return Err(format!(
                "{} is not writable and conch lacks CAP_SYS_ADMIN",
                existing.display()
            ));
        }
        // `cgroup.kill` (Linux 5.14) is what makes the kill escape-proof; it exists in every
        // non-root cgroup, so it can be checked once the root exists.
        if root.is_dir() && !root.join("cgroup.kill").exists() {
            return Err(format!(
                "{} has no cgroup.kill (needs Linux 5.14 or later)",
                root.display()
            ));
        }
        Ok(())
    }
}

fn read_proc(path: &str) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: PathBuf::from(path),
        source,
    })
}

/// The first `cgroup2` mount in mountinfo text: its mount point and whether it is read-only.
///
/// Format (proc(5)): `id parent major:minor root mount-point options [optional…] - fstype
/// source super-options`; the mount point has spaces etc. escaped as `\ooo`.
pub fn parse_mountinfo(text: &str) -> Option<(PathBuf, bool)> {
    text.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = before.split(' ');
        let mount_point = fields.nth(4)?;
        let options = fields.next()?;
        let read_only = options.split(',').any(|o| o == "ro");
        Some((PathBuf::from(unescape_octal(mount_point)), read_only))
    })
}

/// conch's cgroup in the v2 hierarchy: the path of the `0::` line of `/proc/self/cgroup`.
pub fn parse_own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_owned())
}

/// Undo mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const PURE_V2: &str = "\
22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
26 24 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    const CONTAINER_RO: &str = "\
700 690 0:30 /docker/abc /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime master:4 - cgroup2 cgroup rw
";

    #[test]
    fn hybrid_layout_finds_unified() {
        assert_eq!(
            parse_mountinfo(HYBRID),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), false))
        );
    }

    #[test]
    fn pure_v2_layout() {
        assert_eq!(
            parse_mountinfo(PURE_V2),
            Some((PathBuf::from("/sys/fs/cgroup"), false))
        );
    }

    #[test]
    fn read_only_mount_is_reported() {
        assert_eq!(
            parse_mountinfo(CONTAINER_RO),
            Some((PathBuf::from("/sys/fs/cgroup"), true))
        );
    }

    #[test]
    fn v1_only_has_no_hierarchy() {
        let v1: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_mountinfo(&v1), None);
    }

    #[test]
    fn escaped_mount_point() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            parse_mountinfo(line),
            Some((PathBuf::from("/mnt/my cgroups"), false))
        );
    }

    #[test]
    fn own_cgroup_hybrid_and_v2() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/88\n0::/\n";
        assert_eq!(parse_own_cgroup(hybrid).as_deref(), Some("/"));
        let v2 = "0::/user.slice/user-0.slice/session-3.scope\n";
        assert_eq!(
            parse_own_cgroup(v2).as_deref(),
            Some("/user.slice/user-0.slice/session-3.scope")
        );
        assert_eq!(parse_own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn roots_must_be_below_the_mount() {
        let h = Hierarchy {
            mount: PathBuf::from("/sys/fs/cgroup/unified"),
            read_only: false,
            own: "/".into(),
        };
        assert_eq!(
            h.root_for(None).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified/conch.slice")
        );
        assert_eq!(
            h.root_for(Some(Path::new("a.slice"))).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified/a.slice")
        );
        assert!(
            h.root_for(Some(Path::new("/sys/fs/cgroup/memory/x")))
                .is_err()
        );
        assert!(
            h.root_for(Some(Path::new("/sys/fs/cgroup/unified")))
                .is_err()
        );
        assert!(h.root_for(Some(Path::new("../memory/x"))).is_err());
    }

    #[test]
    fn this_host_has_a_hierarchy() {
        let h = Hierarchy::detect().expect("cgroup v2 must be mounted on test machines");
        assert!(h.mount.join("cgroup.procs").exists());
    }
}
