//! `conch status`: every office, semaphore, cron job and conchd node under the prefix, read
//! straight from etcd (the same data as conchd's status API).

use std::io::Write;

use clap::Args;

use super::{GlobalArgs, exit, report};
use crate::cron::store::Store;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object (the same structs as the status API).
    #[arg(long)]
    json: bool,
}

pub async fn run(g: &GlobalArgs, a: StatusArgs) -> u8 {
    let (prefix, etcd) = match super::connect(g).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let snap = match crate::status::read(&Store::new(etcd, prefix)).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return exit::UNAVAILABLE;
        }
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        let _ = writeln!(out, "{}", serde_json::to_string(&snap).unwrap_or_default());
        return exit::OK;
    }
    let who = |p: &crate::status::Participant2| match &p.record {
        Some(r) => format!("{} pid={} since={} rev={}", r.node, r.pid, r.started, p.rev),
        None => format!("unknown rev={}", p.rev),
    };
    let _ = writeln!(out, "OFFICES");
    for o in &snap.elect {
        let h = o.holder.as_ref().map_or("vacant".into(), who);
        let _ = writeln!(out, "  {} {h} waiting={}", o.office, o.waiting.len());
    }
    let _ = writeln!(out, "SEMAPHORES");
    for s in &snap.sema {
        let _ = writeln!(
            out,
            "  {}[{}/{}]{} waiting={}",
            s.name,
            s.holders.len(),
            s.max,
            if s.spread { " spread" } else { "" },
            s.waiters.len()
        );
        for h in &s.holders {
            let _ = writeln!(out, "    HELD {}", who(h));
        }
    }
    let _ = writeln!(out, "CRON");
    for l in crate::status::ls_lines(&snap.cron) {
        let _ = writeln!(out, "  {l}");
    }
    let _ = writeln!(out, "NODES");
    for n in &snap.nodes {
        let labels = n
            .labels
            .as_ref()
            .map(crate::cron::job::format_labels)
            .unwrap_or_else(|| "unknown".into());
        let _ = writeln!(
            out,
            "  {} labels={} version={} started={}",
            n.node,
            labels,
            n.version.as_deref().unwrap_or("?"),
            n.started.as_deref().unwrap_or("?")
        );
    }
    exit::OK
}
