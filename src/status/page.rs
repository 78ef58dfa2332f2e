//! The status page: one self-refreshing HTML document with no external assets (no scripts,
//! fonts or styles from elsewhere), readable on a phone at 3 a.m.

#![forbid(unsafe_code)]

use std::fmt::Write;
use std::net::SocketAddr;

use super::{Participant2, Snapshot};

/// Seconds between refreshes of the page.
const REFRESH_SECS: u32 = 5;

/// Escape text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn who(p: &Participant2) -> String {
    match &p.record {
        Some(r) => format!(
            "{} pid={} since={} rev={} {}",
            r.node,
            r.pid,
            r.started,
            p.rev,
            r.cmd.as_deref().unwrap_or("")
        ),
        None => format!("unknown holder rev={}", p.rev),
    }
}

pub fn render(
    node: &str,
    addr: SocketAddr,
    snap: Result<&Snapshot, String>,
    health: Result<(), &str>,
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>conch status: {n}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:1em;color:#222}}\
         table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}\
         th{{background:#eee}} .bad{{color:#b00;font-weight:bold}} .ok{{color:#070}}\
         code{{font-size:13px}}</style></head><body>\n\
         <h1>conch on {n}</h1>\n",
        n = esc(node)
    );
    if !addr.ip().is_loopback() {
        h.push_str("<p class=\"bad\" id=\"exposed\">This page is served on a non-loopback address: command lines are visible to anyone who can reach it.</p>\n");
    }
    match health {
        Ok(()) => {
            h.push_str("<p id=\"health\" class=\"ok\">healthy: watching jobs, lease alive</p>\n")
        }
        Err(why) => {
            let _ = writeln!(
                h,
                "<p id=\"health\" class=\"bad\">unhealthy: {}</p>",
                esc(why)
            );
        }
    }
    let snap = match snap {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(
                h,
                "<p class=\"bad\" id=\"error\">cannot read etcd: {}</p></body></html>",
                esc(&e)
            );
            return h;
        }
    };
    h.push_str("<h2>Offices</h2>\n<table id=\"elect\"><tr><th>office</th><th>holder</th><th>waiting</th></tr>\n");
    for o in &snap.elect {
        let _ = writeln!(
            h,
            "<tr data-office=\"{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&o.office),
            esc(&o.office),
            o.holder.as_ref().map_or("vacant".into(), |p| esc(&who(p))),
            o.waiting.len()
        );
    }
    h.push_str("</table>\n<h2>Semaphores</h2>\n<table id=\"sema\"><tr><th>name</th><th>held</th><th>holders</th><th>waiting</th></tr>\n");
    for s in &snap.sema {
        let holders: Vec<String> = s.holders.iter().map(|p| esc(&who(p))).collect();
        let _ = writeln!(
            h,
            "<tr data-sema=\"{}\"><td>{}{}</td><td>{}/{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(&s.name),
            if s.spread { " (spread)" } else { "" },
            s.holders.len(),
            s.max,
            holders.join("<br>"),
            s.waiters.len()
        );
    }
    h.push_str("</table>\n<h2>Cron jobs</h2>\n<table id=\"cron\"><tr><th>name</th><th>schedule</th><th>tz</th><th>next</th><th>last tick</th><th>node</th><th>status</th><th>exit</th><th>duration</th><th>command</th></tr>\n");
    for j in &snap.cron {
        let (schedule, tz, cmd) = j
            .spec
            .as_ref()
            .map_or(("?".into(), "?".into(), String::new()), |s| {
                (s.schedule.clone(), s.tz.clone(), s.cmd.join(" "))
            });
        let next = if let Some(e) = &j.error {
            format!("invalid: {e}")
        } else if j.paused() {
            "paused".into()
        } else {
            j.next.clone().unwrap_or_else(|| "-".into())
        };
        let (tick, lnode, status, exit, dur) = match &j.last {
            Some(l) => {
                let r = l.result.as_ref();
                (
                    l.tick.clone(),
                    l.node.clone().unwrap_or_default(),
                    l.status.clone(),
                    r.and_then(|r| {
                        r.exit
                            .map(|e| e.to_string())
                            .or(r.signal.map(|s| format!("signal {s}")))
                    })
                    .unwrap_or_default(),
                    r.and_then(|r| r.duration.clone()).unwrap_or_default(),
                )
            }
            None => Default::default(),
        };
        let class = match status.as_str() {
            "ok" | "running" => "ok",
            "" => "",
            _ => "bad",
        };
        let _ = writeln!(
            h,
            "<tr data-job=\"{}\"><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&j.name),
            esc(&j.name),
            esc(&schedule),
            esc(&tz),
            esc(&next),
            esc(&tick),
            esc(&lnode),
            esc(&status),
            esc(&exit),
            esc(&dur),
            esc(&cmd)
        );
    }
    h.push_str("</table>\n<h2>Nodes</h2>\n<table id=\"nodes\"><tr><th>node</th><th>labels</th><th>version</th><th>started</th><th>pid</th></tr>\n");
    for n in &snap.nodes {
        let labels = n
            .labels
            .as_ref()
            .map(crate::cron::job::format_labels)
            .unwrap_or_else(|| "unknown".into());
        let _ = writeln!(
            h,
            "<tr data-node=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&n.node),
            esc(&n.node),
            esc(&labels),
            esc(n.version.as_deref().unwrap_or("?")),
            esc(n.started.as_deref().unwrap_or("?")),
            n.pid.map(|p| p.to_string()).unwrap_or_default()
        );
    }
    let _ = write!(
        h,
        "</table>\n<p><small>etcd revision {} · refreshes every {REFRESH_SECS}s · JSON: <a href=\"/cron\">/cron</a> <a href=\"/elect\">/elect</a> <a href=\"/sema\">/sema</a> <a href=\"/nodes\">/nodes</a> <a href=\"/metrics\">/metrics</a> <a href=\"/healthz\">/healthz</a></small></p>\n</body></html>\n",
        snap.revision
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_could_break_out() {
        assert_eq!(esc("<script>\"'&"), "&lt;script&gt;&quot;&#39;&amp;");
    }

    #[test]
    fn an_unreadable_etcd_is_said_not_hidden() {
        let addr: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        let page = render(
            "n<1>",
            addr,
            Err("etcd read: timeout".into()),
            Err("no lease"),
        );
        assert!(page.contains("conch on n&lt;1&gt;"));
        assert!(page.contains("id=\"exposed\""));
        assert!(page.contains("unhealthy: no lease"));
        assert!(page.contains("cannot read etcd: etcd read: timeout"));
    }
}
