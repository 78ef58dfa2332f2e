//! The weaker containment: a process group plus conch as child subreaper, swept through
//! `/proc`.
//!
//! A tree here is the direct child, every process in its process group, every process conch
//! has inherited as subreaper (re-parented after its parent died), and all their descendants
//! by parent links. Limits, said out loud: a descendant that leaves the group *and* whose
//! parent stays alive is found only through the parent link, and one that forks between a
//! scan and the signal is caught by the next sweep (`wait_empty` keeps killing after `kill`).
//! conch cannot tell which tree an inherited orphan came from, so every pgroup tree claims
//! every inherited child that is not some `Tree`'s supervisor or direct child; conch starts no
//! other children in pgroup mode.
//!
//! The direct child is the supervisor's child, not conch's; descendants orphaned below it are
//! re-parented to conch (the subreaper), not to the supervisor. Sweeps run only in conch: once
//! conch is dead or stopped, the supervisor can only kill the process group.
//!
//! Reaping: conch reaps inherited zombies one pid at a time (`waitpid(pid, WNOHANG)`), never
//! with a catch-all wait, and never a supervisor or a direct child (the `Tree` reaps those).
//! Callers hold the registry lock so a just-forked supervisor is not mistaken for an orphan.

use std::collections::{HashMap, HashSet};

use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

/// One line of `/proc/<pid>/stat`, the fields the sweep needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub zombie: bool,
    /// Start time in clock ticks since boot: with `pid`, identifies a process across reuse.
    pub start: u64,
}

/// Parse `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Proc> {
    let (head, tail) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let f: Vec<&str> = tail.split_whitespace().collect();
    // tail fields: 0 state, 1 ppid, 2 pgrp, …, 19 starttime (field 22 overall).
    Some(Proc {
        pid,
        zombie: matches!(*f.first()?, "Z" | "X"),
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn read_stat(pid: i32) -> Option<Proc> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process visible in `/proc`. Processes that vanish mid-scan are skipped.
fn scan() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// The processes of the tree rooted at `direct` (process group `pgid`), including zombies.
/// `directs` are the supervisors and direct children of all live trees, never orphans.
pub(crate) fn members(
    procs: &[Proc],
    me: i32,
    direct: i32,
    pgid: i32,
    directs: &HashSet<i32>,
) -> Vec<Proc> {
    let mut children: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut stack: Vec<&Proc> = procs
        .iter()
        .filter(|p| {
            p.pid == direct || p.pgrp == pgid || (p.ppid == me && !directs.contains(&p.pid))
        })
        .collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while let Some(p) = stack.pop() {
        if p.pid == me || !seen.insert(p.pid) {
            continue;
        }
        out.push(*p);
        stack.extend(children.get(&p.pid).into_iter().flatten());
    }
    out
}

/// What one sweep saw and did.
#[derive(Debug, Default)]
pub(crate) struct Sweep {
    /// Processes of the tree still alive (not zombies) when scanned.
    pub alive: usize,
}

/// Scan once: reap inherited zombies, and send `signal` (if any) to every live member.
/// `group_pinned` says the direct child is not yet reaped, which keeps `pgid` from being
/// reused, so the whole group can be signalled with one `kill(-pgid)`.
pub(crate) fn sweep(
    direct: i32,
    pgid: i32,
    group_pinned: bool,
    directs: &HashSet<i32>,
    signal: Option<Signal>,
) -> Sweep {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    if let (Some(sig), true, Some(pg)) = (signal, group_pinned, Pid::from_raw(pgid)) {
        let _ = rustix::process::kill_process_group(pg, sig);
    }
    let procs = scan();
    let tree = members(&procs, me, direct, pgid, directs);
    let mut sweep = Sweep::default();
    for p in &tree {
        if p.zombie {
            let inherited = p.ppid == me && p.pid != direct && !directs.contains(&p.pid);
            if let (true, Some(pid)) = (inherited, Pid::from_raw(p.pid)) {
                let _ = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG);
            }
            continue;
        }
        sweep.alive += 1;
        let Some(sig) = signal else { continue };
        if group_pinned && p.pgrp == pgid {
            continue; // covered by kill(-pgid)
        }
        signal_verified(p, me, sig);
    }
    sweep
}

/// Signal a scanned process without hitting a recycled pid: conch's own unreaped children
/// cannot be recycled; others are pinned with a pidfd and checked against their start time.
fn signal_verified(p: &Proc, me: i32, sig: Signal) {
    let Some(pid) = Pid::from_raw(p.pid) else {
        return;
    };
    if p.ppid == me {
        let _ = rustix::process::kill_process(pid, sig);
        return;
    }
    let Ok(fd) = rustix::process::pidfd_open(pid, PidfdFlags::empty()) else {
        return;
    };
    if read_stat(p.pid).is_some_and(|now| now.start == p.start) {
        let _ = rustix::process::pidfd_send_signal(&fd, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_names() {
        let s = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse_stat(s),
            Some(Proc {
                pid: 4242,
                ppid: 1,
                pgrp: 4242,
                zombie: false,
                start: 987654
            })
        );
        let z = "77 (sh) Z 10 70 70 0 -1 4194304 1 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert!(parse_stat(z).unwrap().zombie);
    }

    #[test]
    fn membership_follows_group_orphans_and_parents() {
        let p = |pid, ppid, pgrp| Proc {
            pid,
            ppid,
            pgrp,
            zombie: false,
            start: 1,
        };
        let me = 100;
        let procs = [
            p(100, 1, 100),   // conch
            p(200, 100, 200), // direct child, group leader
            p(201, 200, 200), // in the group
            p(202, 201, 202), // setsid'd grandchild: own group, found by parent link
            p(203, 100, 203), // double-forked orphan inherited by conch
            p(204, 203, 203), // its child
            p(300, 100, 300), // another tree's direct child
            p(301, 300, 300), // its child
            p(400, 1, 400),   // unrelated
        ];
        let directs = HashSet::from([200, 300]);
        let mut got: Vec<i32> = members(&procs, me, 200, 200, &directs)
            .iter()
            .map(|p| p.pid)
            .collect();
        got.sort();
        assert_eq!(got, vec![200, 201, 202, 203, 204]);
    }
}
