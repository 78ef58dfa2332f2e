//! Choosing between cgroup and pgroup containment for this host.

use std::path::PathBuf;

use super::{Containment, ContainmentError, ContainmentMode, ContainmentRequest};
use crate::cgroup::{self, Hierarchy};

/// `resolve` (`prepare = true`) and `probe` (`prepare = false`) share everything but the
/// side effects on the cgroup root.
pub(crate) fn decide(
    request: ContainmentRequest,
    root: Option<PathBuf>,
    prepare: bool,
) -> Result<Containment, ContainmentError> {
    match request {
        ContainmentRequest::Pgroup => Ok(pgroup(
            "process group requested (--containment pgroup)".into(),
        )),
        ContainmentRequest::Cgroup => {
            cgroup_mode(root, prepare).map_err(ContainmentError::CgroupUnavailable)
        }
        ContainmentRequest::Auto => Ok(cgroup_mode(root, prepare).unwrap_or_else(|why| {
            pgroup(format!(
                "cgroup v2 unusable ({why}); process group + subreaper, weaker containment"
            ))
        })),
    }
}

fn pgroup(reason: String) -> Containment {
    Containment {
        mode: ContainmentMode::Pgroup,
        cgroup_root: None,
        reason,
    }
}

/// Cgroup containment if possible, else why not.
fn cgroup_mode(root: Option<PathBuf>, prepare: bool) -> Result<Containment, String> {
    let hierarchy = Hierarchy::detect().map_err(|e| error_chain(&e))?;
    let root = hierarchy.root_for(root.as_deref())?;
    hierarchy.check_usable(&root)?;
    if prepare {
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        // Now that the root exists, re-check what needs it (cgroup.kill).
        hierarchy.check_usable(&root)?;
        match cgroup::remove_stale(&root, cgroup::STALE_MIN_AGE) {
            Ok(removed) => {
                for path in removed {
                    tracing::info!(path = %path.display(), "stale-cgroup-removed");
                }
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "stale-cgroup-scan-failed"),
        }
    }
    Ok(Containment {
        mode: ContainmentMode::Cgroup,
        reason: format!(
            "cgroup v2 at {} (conch in {}), children under {}",
            hierarchy.mount.display(),
            hierarchy.own,
            root.display()
        ),
        cgroup_root: Some(root),
    })
}

/// `a: b: c` from an error and its sources, for reason strings.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
