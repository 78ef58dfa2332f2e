//! A job: the spec stored at `cron/job/<name>` (public API, primitives.md) and its validated
//! form that conchd schedules.
//!
//! Everything is checked before anything is written ([`JobSpec::validate`]): `cron add`
//! refuses a job that conchd could not run, and conchd runs the same check on every spec it
//! reads, so a corrupted or foreign value under the prefix is reported, never run.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::schedule::{HORIZON_SECS, Schedule, ScheduleError};
use crate::keys::Name;

/// Largest job spec conch writes or reads: jobs are small; anything bigger is a mistake
/// (or an attempt to fill etcd, whose default request limit is 1.5 MiB).
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// Longest run TTL, starting deadline or jitter: five years, as far as a schedule looks
/// ahead. conchd does millisecond arithmetic in an i64 and boot-clock instant arithmetic with
/// them, which a planted `"run_ttl":"18446744073709551615"` would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(HORIZON_SECS as u64);

/// What a job does while a previous run of it still runs somewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// Run anyway (every tick runs once).
    #[default]
    Allow,
    /// Skip the tick (recorded `skipped`) while `running/<name>` exists.
    Forbid,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Allow => "allow",
            Overlap::Forbid => "forbid",
        }
    }
}

/// The job spec as stored in etcd (one-line JSON, fields in this order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub schedule: String,
    pub tz: String,
    /// argv; `cmd[0]` is looked up in PATH on the node that runs it.
    pub cmd: Vec<String>,
    /// Durations in humantime form (`10m`, `90s`).
    pub run_ttl: String,
    pub overlap: Overlap,
    pub starting_deadline: String,
    /// Labels a node must carry (`--labels`) to race for this job's ticks; empty: every node.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    pub jitter: String,
    #[serde(default)]
    pub paused: bool,
    /// `user@node` of whoever added it.
    pub added_by: String,
    /// RFC 3339 UTC; ticks before it never run (nor count as missed).
    pub added_at: String,
    /// RFC 3339 UTC of the last `cron resume`: ticks while paused are not missed ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<String>,
    /// `ed25519:<public key>:<signature>` from `cron add --sign-key` (`super::sign`); it
    /// covers every field above but `paused` and `resumed_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Why a job spec is refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("the command is empty")]
    EmptyCommand,
    #[error("{field} {value:?} is not a duration like 90s, 10m or 1h")]
    BadDuration { field: &'static str, value: String },
    #[error("{field} must be longer than zero")]
    NotPositive { field: &'static str },
    #[error("{field} {value:?} is longer than 5 years")]
    TooLong { field: &'static str, value: String },
    #[error(
        "--jitter {jitter} must be shorter than --starting-deadline {deadline}, or every tick would be missed"
    )]
    JitterTooLong { jitter: String, deadline: String },
    #[error("bad --node-selector {0:?}: expected k=v[,k=v] with non-empty keys")]
    Selector(String),
    #[error("the job spec is {0} bytes, over the limit of 64 KiB")]
    TooBig(usize),
    #[error("bad added_at {0:?}: not an RFC 3339 UTC time")]
    AddedAt(String),
    #[error("not a conch job spec: {0}")]
    Decode(String),
}

/// A validated job: what conchd schedules.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: Name,
    pub spec: JobSpec,
    pub schedule: Schedule,
    pub run_ttl: Duration,
    pub starting_deadline: Duration,
    pub jitter: Duration,
    /// `added_at` as Unix seconds.
    pub added_at: i64,
    /// `resumed_at` (else `added_at`) as Unix seconds: no tick before it counts as missed.
    pub resumed_at: i64,
    /// The spec's etcd mod revision (changes on every `add`, `pause`, `resume`).
    pub mod_rev: i64,
}

impl JobSpec {
    /// The stored form: one-line JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job spec always serializes")
    }

    /// Decode a stored value (size-checked first).
    pub fn decode(bytes: &[u8]) -> Result<JobSpec, JobError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(JobError::TooBig(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| JobError::Decode(e.to_string()))
    }

    /// Check everything conchd relies on: the schedule parses in its zone and fires within 5
    /// years of `now`, durations are positive, jitter fits in the starting deadline, the
    /// selector is well formed, the command is not empty, the spec fits in 64 KiB.
    pub fn validate(&self, name: &Name, now: i64, mod_rev: i64) -> Result<Job, JobError> {
        let size = self.to_json().len();
        if size > MAX_SPEC_BYTES {
            return Err(JobError::TooBig(size));
        }
        if self.cmd.first().is_none_or(|c| c.is_empty()) {
            return Err(JobError::EmptyCommand);
        }
        let schedule = Schedule::parse(&self.schedule, &self.tz)?;
        schedule.check_fires(now)?;
        let run_ttl = positive("--run-ttl", &self.run_ttl)?;
        let starting_deadline = positive("--starting-deadline", &self.starting_deadline)?;
        let jitter = duration("--jitter", &self.jitter)?;
        if jitter >= starting_deadline {
            return Err(JobError::JitterTooLong {
                jitter: self.jitter.clone(),
                deadline: self.starting_deadline.clone(),
            });
        }
        for (k, v) in &self.node_selector {
            check_label(k, v).map_err(|_| JobError::Selector(format!("{k}={v}")))?;
        }
        let added_at = crate::keys::parse_rfc3339_utc(&self.added_at)
            .ok_or_else(|| JobError::AddedAt(self.added_at.clone()))?;
        let resumed_at = match &self.resumed_at {
            Some(r) => {
                crate::keys::parse_rfc3339_utc(r).ok_or_else(|| JobError::AddedAt(r.clone()))?
            }
            None => added_at,
        };
        Ok(Job {
            name: name.clone(),
            spec: self.clone(),
            schedule,
            run_ttl,
            starting_deadline,
            jitter,
            added_at,
            resumed_at: resumed_at.max(added_at),
            mod_rev,
        })
    }
}

impl Job {
    /// This job's start offset after each tick, in `[0, jitter)`: derived from the name alone
    /// (FNV-1a), so every node and every version of conch agrees on it.
    pub fn jitter_offset(&self) -> Duration {
        let ms = self.jitter.as_millis() as u64;
        if ms == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(fnv1a(self.name.as_str().as_bytes()) % ms)
    }

    /// Whether a node with these labels races for this job.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec
            .node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn duration(field: &'static str, s: &str) -> Result<Duration, JobError> {
    let t = s.trim();
    let d = match t.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t).map_err(|_| JobError::BadDuration {
            field,
            value: s.to_string(),
        })?,
    };
    if d > MAX_DURATION {
        return Err(JobError::TooLong {
            field,
            value: s.to_string(),
        });
    }
    Ok(d)
}

fn positive(field: &'static str, s: &str) -> Result<Duration, JobError> {
    let d = duration(field, s)?;
    if d.is_zero() {
        return Err(JobError::NotPositive { field });
    }
    Ok(d)
}

/// A label key or value: non-empty key; both from `A-Za-z0-9._-/` (Kubernetes-like), so
/// `k=v,k=v` round-trips.
fn check_label(k: &str, v: &str) -> Result<(), ()> {
    let ok = |s: &str| {
        s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    if k.is_empty() || !ok(k) || !ok(v) {
        return Err(());
    }
    Ok(())
}

/// Parse `k=v[,k=v]` (node labels, `--node-selector`). Empty string: no labels.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("{part:?} is not k=v"));
        };
        let (k, v) = (k.trim(), v.trim());
        if check_label(k, v).is_err() {
            return Err(format!(
                "{part:?}: keys must be non-empty; keys and values use A-Z a-z 0-9 . _ - /"
            ));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("{k:?} is given twice"));
        }
    }
    Ok(out)
}

/// `k=v,k=v`, sorted by key.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            schedule: "*/5 * * * *".into(),
            tz: "UTC".into(),
            cmd: vec!["true".into()],
            run_ttl: "10m".into(),
            overlap: Overlap::Allow,
            starting_deadline: "1m".into(),
            node_selector: BTreeMap::new(),
            jitter: "0s".into(),
            paused: false,
            added_by: "root@n1".into(),
            added_at: "2026-11-28T10:00:00Z".into(),
            resumed_at: None,
            signature: None,
        }
    }

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    const NOW: i64 = 1_795_000_000;

    #[test]
    fn a_good_spec_validates_and_round_trips() {
        let s = spec();
        let job = s.validate(&name("backup"), NOW, 7).unwrap();
        assert_eq!(job.run_ttl, Duration::from_secs(600));
        assert_eq!(job.starting_deadline, Duration::from_secs(60));
        assert_eq!(JobSpec::decode(s.to_json().as_bytes()).unwrap(), s);
        assert!(
            s.to_json()
                .starts_with(r#"{"schedule":"*/5 * * * *","tz":"UTC","cmd":["true"]"#)
        );
    }

    #[test]
    fn bad_specs_are_refused_with_the_field_named() {
        type Edit = Box<dyn Fn(&mut JobSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.cmd.clear()), "command is empty"),
            (Box::new(|s| s.run_ttl = "0s".into()), "--run-ttl"),
            (Box::new(|s| s.run_ttl = "-5s".into()), "--run-ttl"),
            (
                Box::new(|s| s.starting_deadline = "soon".into()),
                "--starting-deadline",
            ),
            (Box::new(|s| s.jitter = "2m".into()), "--jitter"),
            (
                Box::new(|s| {
                    s.node_selector.insert(String::new(), "x".into());
                }),
                "--node-selector",
            ),
            (
                Box::new(|s| s.cmd = vec!["x".repeat(MAX_SPEC_BYTES)]),
                "64 KiB",
            ),
            (Box::new(|s| s.added_at = "yesterday".into()), "added_at"),
            (
                Box::new(|s| s.run_ttl = "18446744073709551615".into()),
                "--run-ttl \"18446744073709551615\" is longer than 5 years",
            ),
            (
                Box::new(|s| s.starting_deadline = "9223372036854775808s".into()),
                "--starting-deadline",
            ),
            (Box::new(|s| s.jitter = "1900days".into()), "--jitter"),
        ];
        for (edit, want) in cases {
            let mut s = spec();
            edit(&mut s);
            let e = s.validate(&name("j"), NOW, 1).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn foreign_values_do_not_decode() {
        assert!(JobSpec::decode(b"not json").is_err());
        assert!(JobSpec::decode(br#"{"schedule":"* * * * *"}"#).is_err());
        assert!(JobSpec::decode(&vec![b' '; MAX_SPEC_BYTES + 1]).is_err());
    }

    #[test]
    fn jitter_is_stable_per_name_and_below_the_bound() {
        let mut s = spec();
        s.jitter = "30s".into();
        let a = s.validate(&name("backup"), NOW, 1).unwrap();
        let b = s.validate(&name("backup"), NOW, 2).unwrap();
        let c = s.validate(&name("rotate-logs"), NOW, 1).unwrap();
        assert_eq!(a.jitter_offset(), b.jitter_offset());
        assert!(a.jitter_offset() < Duration::from_secs(30));
        assert_ne!(a.jitter_offset(), c.jitter_offset());
        // Written down once: a change here would move every deployed job's start.
        assert_eq!(
            fnv1a(b"backup") % 30_000,
            a.jitter_offset().as_millis() as u64
        );
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn labels_parse_and_select() {
        let l = parse_labels("role=db, zone=eu-1").unwrap();
        assert_eq!(format_labels(&l), "role=db,zone=eu-1");
        assert!(parse_labels("").unwrap().is_empty());
        for bad in ["role", "=x", "a=b,a=c", "a b=c", "k=v v"] {
            assert!(parse_labels(bad).is_err(), "{bad:?}");
        }
        let mut s = spec();
        s.node_selector = parse_labels("role=db").unwrap();
        let job = s.validate(&name("j"), NOW, 1).unwrap();
        assert!(job.selects(&l));
        assert!(!job.selects(&parse_labels("role=web").unwrap()));
        assert!(!job.selects(&BTreeMap::new()));
    }
}
