//! What conch writes about ticks, runs and nodes (public API, primitives.md): the claim at
//! `cron/fire/<name>/<tick>`, the result at `cron/result/<name>/<tick>`, a trigger at
//! `cron/trigger/<name>/<id>` and a node at `node/<node>`. One-line JSON, fields in a fixed
//! order. Readers treat values they cannot parse as unknown, never as a crash.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a tick ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The job exited 0.
    Ok,
    /// The job exited non-zero, was killed by a signal conch did not send, or could not start.
    Failed,
    /// conch killed it: `--run-ttl` passed, conchd's hold was lost, or conchd was stopped.
    Killed,
    /// Claimed, but no result was ever written: the running conchd died (derived by readers
    /// from a claim without a result whose node is gone; never written).
    Lost,
    /// Nobody claimed the tick within its starting deadline.
    Missed,
    /// `--overlap forbid` and the previous run still ran.
    Skipped,
    /// The spec was not run: unsigned or signed by an untrusted key.
    Refused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Killed => "killed",
            Status::Lost => "lost",
            Status::Missed => "missed",
            Status::Skipped => "skipped",
            Status::Refused => "refused",
        }
    }
}

/// What the claim of a tick decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// `node` runs it.
    Run,
    /// Recorded as missed (nobody claimed it in time).
    Missed,
    /// Recorded as skipped (overlap=forbid).
    Skipped,
}

/// The value of a fire key: who decided the tick, when, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FireRecord {
    pub node: String,
    /// The claiming conchd's lease (hex): a claim whose lease is gone and has no result is lost.
    pub lease: String,
    pub decision: Decision,
    /// The claiming node's clock at the claim, RFC 3339 UTC with milliseconds.
    pub claimed: String,
    #[serde(default)]
    pub manual: bool,
}

/// The value of a result key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    /// The tick, RFC 3339 UTC (as `CONCH_TICK`).
    pub tick: String,
    pub node: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// CPU time of the whole tree, from its cgroup's `cpu.stat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default)]
    pub manual: bool,
    /// The fire key's create revision (`CONCH_REV`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<i64>,
    /// Why, for killed, failed-to-start, missed, skipped and refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ResultRecord {
    /// A result of `status` for `tick` on `node`, every optional field empty.
    pub fn new(tick: i64, node: &str, status: Status, manual: bool) -> ResultRecord {
        ResultRecord {
            tick: crate::keys::rfc3339_utc(tick.max(0) as u64),
            node: node.to_string(),
            status,
            exit: None,
            signal: None,
            started: None,
            duration: None,
            cpu: None,
            manual,
            rev: None,
            reason: None,
        }
    }
}

/// A `cron run` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub by: String,
    pub at: String,
}

/// The value of `node/<node>`: a live conchd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub started: String,
    pub pid: u32,
    pub lease: String,
}

macro_rules! json_codec {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn to_json(&self) -> String {
                serde_json::to_string(self).expect("a record always serializes")
            }
            /// `None` for a value conch did not write.
            pub fn parse(bytes: &[u8]) -> Option<Self> {
                serde_json::from_slice(bytes).ok()
            }
        }
    )*};
}
json_codec!(FireRecord, ResultRecord, Trigger, NodeRecord);

/// A duration as results show it: `4.2s`, `0.0s`, `1m3.5s`... kept short and sortable by eye.
pub fn fmt_secs(d: Duration) -> String {
    let tenths = (d.as_millis() + 50) / 100;
    let (m, s10) = (tenths / 600, tenths % 600);
    if m > 0 {
        format!("{m}m{}.{}s", s10 / 10, s10 % 10)
    } else {
        format!("{}.{}s", s10 / 10, s10 % 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_serialize_in_the_public_order() {
        let r = ResultRecord {
            tick: "2026-11-28T10:00:00Z".into(),
            node: "n1".into(),
            status: Status::Ok,
            exit: Some(0),
            signal: None,
            started: Some("2026-11-28T10:00:00.004Z".into()),
            duration: Some(fmt_secs(Duration::from_millis(4230))),
            cpu: Some("0.1s".into()),
            manual: false,
            rev: Some(42),
            reason: None,
        };
        assert_eq!(
            r.to_json(),
            r#"{"tick":"2026-11-28T10:00:00Z","node":"n1","status":"ok","exit":0,"started":"2026-11-28T10:00:00.004Z","duration":"4.2s","cpu":"0.1s","manual":false,"rev":42}"#
        );
        assert_eq!(ResultRecord::parse(r.to_json().as_bytes()), Some(r));
        assert_eq!(ResultRecord::parse(b"{\"status\":\"ok\"}"), None);
    }

    #[test]
    fn durations_print_short() {
        assert_eq!(fmt_secs(Duration::ZERO), "0.0s");
        assert_eq!(fmt_secs(Duration::from_millis(4249)), "4.2s");
        assert_eq!(fmt_secs(Duration::from_millis(59_960)), "1m0.0s");
        assert_eq!(fmt_secs(Duration::from_secs(125)), "2m5.0s");
    }
}
