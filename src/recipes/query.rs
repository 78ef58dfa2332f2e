//! Read-only views of an office: `--who`, `--watch`, `--assert`. They create no lease and no key.

use std::io::Write;
use std::time::Duration;

use etcd_client::{GetOptions, SortOrder, SortTarget, WatchOptions};
use serde_json::{Map, Value, json};

use crate::etcd::{CallError, Etcd};
use crate::keys::{HolderRecord, Name, Prefix, Revision};

/// The holder of an office as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub rev: Revision,
    /// `None` when the key's value is not a holder record conch wrote: shown as unknown.
    pub record: Option<HolderRecord>,
}

/// The current holder (lowest create revision) and the revision of the read.
pub async fn holder(
    etcd: &Etcd,
    prefix: &Prefix,
    office: &Name,
) -> Result<(Option<Holder>, i64), CallError> {
    let key = prefix.elect_office(office);
    let resp = etcd
        .retry("read holder", |mut c| {
            let key = key.clone();
            async move {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1);
                c.get(key, Some(opts)).await
            }
        })
        .await?;
    let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let holder = resp.kvs().first().map(|kv| Holder {
        rev: Revision(kv.create_revision()),
        record: HolderRecord::parse(kv.value()),
    });
    Ok((holder, header_rev))
}

/// One line of `--who` / `--watch` output for a held office.
pub fn holder_line(office: &Name, h: &Holder, json_out: bool) -> String {
    match (&h.record, json_out) {
        (Some(r), false) => format!(
            "{office} {} pid={} since={} rev={} cmd={}",
            r.node,
            r.pid,
            r.started,
            h.rev,
            r.cmd.as_deref().unwrap_or("")
        ),
        (None, false) => format!("{office} unknown rev={}", h.rev),
        (Some(r), true) => {
            let mut m = Map::new();
            m.insert("office".into(), json!(office.as_str()));
            if let Value::Object(rec) = serde_json::to_value(r).expect("record serializes") {
                m.extend(rec);
            }
            m.insert("rev".into(), json!(h.rev.0));
            Value::Object(m).to_string()
        }
        (None, true) => {
            json!({"office": office.as_str(), "holder": "unknown", "rev": h.rev.0}).to_string()
        }
    }
}

/// One line of `--watch` output for a vacant office.
pub fn vacant_line(office: &Name, json_out: bool) -> String {
    if json_out {
        json!({"office": office.as_str(), "holder": null}).to_string()
    } else {
        format!("{office} -")
    }
}

/// `--assert`: does this node hold the office with rev ≥ `min_rev`?
pub fn asserts(h: Option<&Holder>, node: &str, min_rev: i64) -> bool {
    h.is_some_and(|h| h.rev.0 >= min_rev && h.record.as_ref().is_some_and(|r| r.node == node))
}

/// `--assert --json` output.
pub fn assert_line(h: Option<&Holder>, held: bool) -> String {
    let mut v = json!({"held": held});
    if let Some(h) = h {
        v["rev"] = json!(h.rev.0);
        v["node"] = match &h.record {
            Some(r) => json!(r.node),
            None => Value::Null,
        };
    }
    v.to_string()
}

/// Pause between reconnection attempts of `--watch`.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// `--watch`: print the current state, then one line per change, until `stop` resolves.
/// Survives etcd restarts and compaction: on any watch trouble it re-reads and watches again.
pub async fn watch(
    etcd: &Etcd,
    prefix: &Prefix,
    office: &Name,
    json_out: bool,
    out: &mut impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(stop);
    let key = prefix.elect_office(office);
    let mut last: Option<Option<Holder>> = None;
    loop {
        let read = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = holder(etcd, prefix, office) => r,
        };
        let (current, header_rev) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(name = %office, error = %e, "watch: etcd unavailable; retrying");
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(WATCH_RETRY) => continue,
                }
            }
        };
        if last.as_ref() != Some(&current) {
            let line = match &current {
                Some(h) => holder_line(office, h, json_out),
                None => vacant_line(office, json_out),
            };
            writeln!(out, "{line}")?;
            out.flush()?;
            last = Some(current);
        }
        let (idx, mut client) = etcd.client();
        let k = key.clone();
        let opened = etcd
            .bounded("watch office", async move {
                client
                    .watch(
                        k,
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(header_rev + 1),
                        ),
                    )
                    .await
            })
            .await;
        let mut events = match opened {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(name = %office, error = %e, "watch: could not watch; retrying");
                etcd.rotate(idx);
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(WATCH_RETRY) => continue,
                }
            }
        };
        // Any event, or the end of the watch, means: read the holder again.
        tokio::select! {
            _ = &mut stop => return Ok(()),
            m = events.message() => if !matches!(m, Ok(Some(_))) { etcd.rotate(idx) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str) -> HolderRecord {
        HolderRecord {
            node: node.into(),
            pid: 7,
            started: "2026-06-12T10:15:00Z".into(),
            cmd: Some("srv -x".into()),
            lease: "00000000000000ab".into(),
            containment: "cgroup".into(),
        }
    }

    #[test]
    fn lines_for_held_unknown_and_vacant() {
        let o = Name::parse("api").unwrap();
        let h = Holder {
            rev: Revision(42),
            record: Some(rec("db2")),
        };
        assert_eq!(
            holder_line(&o, &h, false),
            "api db2 pid=7 since=2026-06-12T10:15:00Z rev=42 cmd=srv -x"
        );
        assert_eq!(
            holder_line(&o, &h, true),
            r#"{"office":"api","node":"db2","pid":7,"started":"2026-06-12T10:15:00Z","cmd":"srv -x","lease":"00000000000000ab","containment":"cgroup","rev":42}"#
        );
        let u = Holder {
            rev: Revision(5),
            record: None,
        };
        assert_eq!(holder_line(&o, &u, false), "api unknown rev=5");
        assert_eq!(
            holder_line(&o, &u, true),
            r#"{"office":"api","holder":"unknown","rev":5}"#
        );
        assert_eq!(vacant_line(&o, false), "api -");
        assert_eq!(vacant_line(&o, true), r#"{"office":"api","holder":null}"#);
    }

    #[test]
    fn assert_checks_node_and_rev() {
        let h = Holder {
            rev: Revision(42),
            record: Some(rec("db2")),
        };
        assert!(asserts(Some(&h), "db2", 0));
        assert!(asserts(Some(&h), "db2", 42));
        assert!(!asserts(Some(&h), "db2", 43));
        assert!(!asserts(Some(&h), "db1", 0));
        assert!(!asserts(None, "db2", 0));
        assert!(!asserts(
            Some(&Holder {
                rev: Revision(42),
                record: None
            }),
            "db2",
            0
        ));
        assert_eq!(
            assert_line(Some(&h), true),
            r#"{"held":true,"rev":42,"node":"db2"}"#
        );
        assert_eq!(assert_line(None, false), r#"{"held":false}"#);
    }
}
