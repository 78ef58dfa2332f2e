//! The randomized soak: three `conch elect --restart` candidates on one office, each with its
//! own fault proxies to a 3-member etcd cluster, while a seeded random schedule mixes faults —
//! partitions, lost answers, revokes, deleted keys, a killed or frozen etcd leader, conch
//! SIGKILLed or SIGSTOPped. At the end the journal must show no overlap and increasing revs,
//! and no process of any tree may be left.
//!
//! The bounded run inside `cargo test` uses seed 1 for 20 s. A longer soak:
//! `CONCH_SOAK=30m CONCH_SEED=7 cargo test --test integration soak -- --nocapture`; the seed
//! is printed so a failure reproduces.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::cluster::Cluster;
use crate::harness::journal;
use crate::harness::proxy::FaultProxy;
use crate::harness::{Ctx, Running, Signal, wait_until};

struct Candidate {
    node: String,
    proxies: Vec<FaultProxy>,
    conch: Option<Running>,
}

fn start(ctx: &Ctx, c: &Candidate) -> Running {
    let endpoints = c
        .proxies
        .iter()
        .map(FaultProxy::url)
        .collect::<Vec<_>>()
        .join(",");
    ctx.elect("soak")
        .args(["--ttl", "4s", "--kill-after", "1s", "--restart"])
        .args(["--node", &c.node])
        .env("CONCH_ENDPOINTS", endpoints)
        .arg("--")
        .arg(journal::testchild())
        .args(["--journal", &journal::path_in(&ctx.dir).to_string_lossy()])
        .args(["--setsid-grandchild", "--run", "3s"])
        .spawn()
}

/// The node holding the office now, from the journal's newest interval, with its lease.
fn holder(ctx: &Ctx) -> Option<(String, String)> {
    let iv = journal::intervals(&journal::read(&journal::path_in(&ctx.dir)));
    iv.last().map(|i| (i.node.clone(), i.lease.clone()))
}

#[test]
fn soak_mixed_faults_never_overlap() {
    let duration = std::env::var("CONCH_SOAK")
        .ok()
        .map(|d| humantime::parse_duration(&d).expect("CONCH_SOAK is a duration like 30m"))
        .unwrap_or(Duration::from_secs(20));
    let seed: u64 = std::env::var("CONCH_SEED")
        .ok()
        .map(|s| s.parse().expect("CONCH_SEED is a number"))
        .unwrap_or(1);
    println!(
        "soak: seed {seed}, {duration:?} (reproduce with CONCH_SOAK={duration:?} CONCH_SEED={seed})"
    );
    let mut rng = fastrand::Rng::with_seed(seed);

    let ctx = Ctx::new("soak");
    let mut cluster = Cluster::start(&ctx.dir, 3);
    let targets: Vec<SocketAddr> = cluster
        .members
        .iter()
        .map(|m| m.client_url.trim_start_matches("http://").parse().unwrap())
        .collect();
    let mut cands: Vec<Candidate> = ["a", "b", "c"]
        .iter()
        .map(|n| Candidate {
            node: n.to_string(),
            proxies: targets.iter().map(|t| FaultProxy::start(*t)).collect(),
            conch: None,
        })
        .collect();
    for c in cands.iter_mut() {
        let r = start(&ctx, c);
        c.conch = Some(r);
    }
    assert!(wait_until(Duration::from_secs(20), || holder(&ctx).is_some()));

    let until = Instant::now() + duration;
    let mut faults = 0;
    while Instant::now() < until {
        let who = holder(&ctx).and_then(|(node, lease)| {
            cands
                .iter()
                .position(|c| c.node == node)
                .map(|i| (i, lease))
        });
        let pause = Duration::from_millis(rng.u64(500..4000));
        let kind = rng.u32(0..8);
        faults += 1;
        match (kind, who) {
            (0, Some((i, _))) => {
                println!("soak: partition {} for {pause:?}", cands[i].node);
                cands[i].proxies.iter().for_each(FaultProxy::blackhole);
                std::thread::sleep(pause);
                cands[i].proxies.iter().for_each(FaultProxy::pass);
            }
            (1, Some((i, _))) => {
                println!("soak: answers to {} lost for {pause:?}", cands[i].node);
                cands[i].proxies.iter().for_each(FaultProxy::stall_replies);
                std::thread::sleep(pause);
                cands[i].proxies.iter().for_each(FaultProxy::pass);
            }
            (2, Some((_, lease))) => {
                println!("soak: revoke {lease}");
                let _ = cluster.ctl(["lease", "revoke", &lease]);
            }
            (3, Some((_, lease))) => {
                println!("soak: delete the holder's key");
                let _ = cluster.ctl(["del", &format!("{}{lease}", ctx.office_prefix("soak"))]);
            }
            (4, _) => {
                if let Some(l) = cluster.leader() {
                    println!("soak: kill etcd leader m{l} for {pause:?}");
                    cluster.kill(l);
                    std::thread::sleep(pause);
                    cluster.restart(l);
                    cluster.wait_leader(Duration::from_secs(20));
                }
            }
            (5, _) => {
                if let Some(l) = cluster.leader() {
                    println!("soak: freeze etcd leader m{l} for {pause:?}");
                    cluster.stop(l);
                    std::thread::sleep(pause);
                    cluster.cont(l);
                }
            }
            (6, Some((i, _))) => {
                println!("soak: SIGKILL conch of {}", cands[i].node);
                if let Some(r) = cands[i].conch.as_ref() {
                    r.signal(Signal::KILL);
                }
                let mut old = cands[i].conch.take().unwrap();
                old.wait_timeout(Duration::from_secs(5));
                let r = start(&ctx, &cands[i]);
                cands[i].conch = Some(r);
            }
            (7, Some((i, _))) => {
                println!("soak: SIGSTOP conch of {} for {pause:?}", cands[i].node);
                let r = cands[i].conch.as_ref().unwrap();
                r.signal(Signal::STOP);
                std::thread::sleep(pause);
                r.signal(Signal::CONT);
            }
            _ => std::thread::sleep(pause),
        }
        // A random gap between faults (the schedule itself, not a synchronisation).
        std::thread::sleep(Duration::from_millis(rng.u64(200..1500)));
    }

    for c in &mut cands {
        if let Some(mut r) = c.conch.take() {
            r.signal(Signal::TERM);
            r.wait_timeout(Duration::from_secs(15));
        }
    }
    let v = journal::check(&journal::path_in(&ctx.dir), 1);
    // No process of any tree is left behind: every tree process beats into the journal every
    // 5 ms while it lives, so a quiet journal means none is left. (Pids alone would mislead:
    // over a long soak they are reused by unrelated processes.)
    let j = journal::path_in(&ctx.dir);
    let settled = journal::read(&j).len();
    std::thread::sleep(Duration::from_millis(500));
    let late: Vec<_> = journal::read(&j).into_iter().skip(settled).collect();
    assert!(
        late.is_empty(),
        "processes still running after every conch ended: {late:?}"
    );
    if let Some(root) = &ctx.cgroup_root {
        let busy: Vec<_> = crate::harness::cgroup::children(root)
            .into_iter()
            .filter(|c| {
                std::fs::read_to_string(c.join("cgroup.events"))
                    .is_ok_and(|e| e.contains("populated 1"))
            })
            .collect();
        assert!(busy.is_empty(), "cgroups still populated: {busy:?}");
    }
    // No key of the office is left behind once every lease could have expired.
    assert!(
        wait_until(Duration::from_secs(6), || cluster
            .ctl(["get", "--prefix", "--keys-only", &ctx.office_prefix("soak")])
            .map(|o| o.trim().is_empty())
            .unwrap_or(false)),
        "keys left under the office"
    );
    println!(
        "soak: seed {seed}: {faults} faults, {} holders, max overlap {:.1} ms",
        v.intervals.len(),
        v.max_overlap_ms
    );
}
