//! `conch sema <name> --who`: holders then waiters of every live max of a semaphore.
//! Read-only: no lease, no key.

use std::collections::BTreeMap;

use etcd_client::{GetOptions, SortOrder, SortTarget};
use serde_json::{Map, Value, json};

use crate::etcd::{CallError, Etcd};
use crate::keys::{self, HolderRecord, Name, Prefix};

/// One participant as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    pub rev: i64,
    /// `None` for a value conch did not write: shown as unknown.
    pub record: Option<HolderRecord>,
    pub held: bool,
}

/// One live `<max>` segment of a semaphore, participants in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    pub max: u32,
    pub spread: bool,
    pub participants: Vec<Participant>,
}

impl Queue {
    pub fn held(&self) -> usize {
        self.participants.iter().filter(|p| p.held).count()
    }
}

/// Mark holders: the first `max` participants, or with `spread` the first of each node up
/// to `max` nodes (an unreadable record counts as a node of its own).
pub fn mark_holders(max: u32, spread: bool, participants: &mut [Participant]) {
    let mut nodes: Vec<String> = Vec::new();
    let mut held = 0u32;
    for p in participants.iter_mut() {
        if held >= max {
            p.held = false;
            continue;
        }
        if spread {
            let node = p
                .record
                .as_ref()
                .map(|r| r.node.clone())
                .unwrap_or_else(|| format!("unknown:{}", p.rev));
            p.held = !nodes.contains(&node);
            if p.held {
                nodes.push(node);
            }
        } else {
            p.held = true;
        }
        held += u32::from(p.held);
    }
}

/// Every live queue of `name` (only `max`'s, when given), in max order.
pub async fn queues(
    etcd: &Etcd,
    prefix: &Prefix,
    name: &Name,
    max: Option<u32>,
) -> Result<Vec<Queue>, CallError> {
    let dir = prefix.sema_dir(name);
    let resp = etcd
        .retry("read semaphore", |mut c| {
            let dir = dir.clone();
            async move {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend);
                c.get(dir, Some(opts)).await
            }
        })
        .await?;
    let mut by_seg: BTreeMap<(u32, bool), Vec<Participant>> = BTreeMap::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let Some(seg) = key.strip_prefix(&dir).and_then(|r| r.split('/').next()) else {
            continue;
        };
        let Some((m, spread)) = keys::parse_sema_segment(seg) else {
            continue;
        };
        if max.is_some_and(|want| want != m) {
            continue;
        }
        by_seg.entry((m, spread)).or_default().push(Participant {
            rev: kv.create_revision(),
            record: HolderRecord::parse(kv.value()),
            held: false,
        });
    }
    Ok(by_seg
        .into_iter()
        .map(|((max, spread), mut participants)| {
            mark_holders(max, spread, &mut participants);
            Queue {
                max,
                spread,
                participants,
            }
        })
        .collect())
}

/// `--who` lines for one queue: holders first, then waiters, each in queue order.
pub fn lines(name: &Name, q: &Queue, json_out: bool) -> Vec<String> {
    let held = q.held();
    let ordered = q
        .participants
        .iter()
        .filter(|p| p.held)
        .chain(q.participants.iter().filter(|p| !p.held));
    ordered
        .map(|p| {
            let state = if p.held { "HELD" } else { "WAIT" };
            if json_out {
                let mut m = Map::new();
                m.insert("name".into(), json!(name.as_str()));
                m.insert("max".into(), json!(q.max));
                m.insert("spread".into(), json!(q.spread));
                m.insert("held".into(), json!(held));
                m.insert("state".into(), json!(state));
                match &p.record {
                    Some(r) => {
                        if let Value::Object(rec) =
                            serde_json::to_value(r).expect("record serializes")
                        {
                            m.extend(rec);
                        }
                    }
                    None => {
                        m.insert("holder".into(), json!("unknown"));
                    }
                }
                m.insert("rev".into(), json!(p.rev));
                Value::Object(m).to_string()
            } else {
                let who = match &p.record {
                    Some(r) => format!(
                        "{} pid={} since={} rev={} cmd={}",
                        r.node,
                        r.pid,
                        r.started,
                        p.rev,
                        r.cmd.as_deref().unwrap_or("")
                    ),
                    None => format!("unknown rev={}", p.rev),
                };
                format!("{name}[{held}/{}] {state} {who}", q.max)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rev: i64, node: Option<&str>) -> Participant {
        Participant {
            rev,
            record: node.map(|n| HolderRecord {
                node: n.into(),
                pid: 1,
                started: "2026-06-12T10:15:00Z".into(),
                cmd: Some("job".into()),
                lease: "00000000000000ab".into(),
                containment: "cgroup".into(),
            }),
            held: false,
        }
    }

    #[test]
    fn first_n_hold() {
        let mut ps = vec![p(1, Some("a")), p(2, Some("a")), p(3, Some("b"))];
        mark_holders(2, false, &mut ps);
        assert_eq!(
            ps.iter().map(|p| p.held).collect::<Vec<_>>(),
            [true, true, false]
        );
    }

    #[test]
    fn spread_takes_the_first_key_of_each_node() {
        let mut ps = vec![
            p(1, Some("a")),
            p(2, Some("a")),
            p(3, Some("b")),
            p(4, None),
            p(5, Some("c")),
        ];
        mark_holders(3, true, &mut ps);
        assert_eq!(
            ps.iter().map(|p| p.held).collect::<Vec<_>>(),
            [true, false, true, true, false]
        );
    }

    #[test]
    fn who_lines_list_holders_then_waiters() {
        let n = Name::parse("jobs").unwrap();
        let mut ps = vec![p(1, Some("a")), p(2, Some("a")), p(3, Some("b"))];
        mark_holders(2, true, &mut ps);
        let q = Queue {
            max: 2,
            spread: true,
            participants: ps,
        };
        let l = lines(&n, &q, false);
        assert!(l[0].starts_with("jobs[2/2] HELD a pid=1"), "{}", l[0]);
        assert!(l[1].starts_with("jobs[2/2] HELD b "), "{}", l[1]);
        assert!(l[2].starts_with("jobs[2/2] WAIT a "), "{}", l[2]);
        let j: Value = serde_json::from_str(&lines(&n, &q, true)[2]).unwrap();
        assert_eq!(j["state"], "WAIT");
        assert_eq!(j["max"], 2);
        assert_eq!(j["rev"], 2);
    }
}
