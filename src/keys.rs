//! The key schema (public API, versioned under `v1`), validated names, and holder records.
//!
//! ```text
//! <prefix>/v1/elect/<office>/<lease-hex>    one key per candidate; value = holder record
//! ```
//! Names never contain `/`, so one name's keys never fall under another name's prefix.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted name: long enough for any sensible office, short enough for a cgroup leaf.
pub const NAME_MAX: usize = 128;

/// Longest `cmd` stored in a holder record, in bytes (cut on a UTF-8 boundary).
pub const CMD_MAX: usize = 256;

/// A validated office / semaphore / job name: 1–128 characters from `A-Z a-z 0-9 . _ -`,
/// not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} characters long; at most {NAME_MAX} are allowed")]
    TooLong(usize),
    #[error("name must not start with '.'")]
    LeadingDot,
    #[error("name contains {0}; only A-Z a-z 0-9 . _ - are allowed")]
    BadChar(String),
}

impl Name {
    pub fn parse(s: &str) -> Result<Name, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            let shown = match c {
                ' ' => "a space".to_string(),
                '\0' => "a NUL byte".to_string(),
                '/' => "'/'".to_string(),
                c if c.is_control() => format!("control character U+{:04X}", c as u32),
                c => format!("'{c}'"),
            };
            return Err(NameError::BadChar(shown));
        }
        let len = s.chars().count();
        if len > NAME_MAX {
            return Err(NameError::TooLong(len));
        }
        if s.starts_with('.') {
            return Err(NameError::LeadingDot);
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An etcd lease id, shown as 16 lower-case hex digits (as in keys and `CONCH_LEASE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0 as u64)
    }
}

/// A create revision: the fencing token `CONCH_REV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub i64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The key prefix all of conch's keys live under (`--prefix`, default `/conch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// Accepts any non-empty prefix; a trailing `/` is dropped so `/conch/` and `/conch` agree.
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let trimmed = s.trim_end_matches('/');
        if trimmed.is_empty() && !s.is_empty() {
            return Ok(Prefix(String::new()));
        }
        if s.is_empty() {
            return Err("prefix is empty".into());
        }
        if s.contains('\0') {
            return Err("prefix contains a NUL byte".into());
        }
        Ok(Prefix(trimmed.to_string()))
    }

    /// `<prefix>/v1/elect/<office>/`: every candidate of one office, with the trailing slash
    /// so `api` never matches `api2`.
    pub fn elect_office(&self, office: &Name) -> String {
        format!("{}/v1/elect/{}/", self.0, office)
    }

    /// `<prefix>/v1/elect/<office>/<lease-hex>`: one candidate's key.
    pub fn elect_candidate(&self, office: &Name, lease: LeaseId) -> String {
        format!("{}{}", self.elect_office(office), lease)
    }
}

/// The `<max>` segment of a semaphore's keys: `5`, or `5-spread` with `--spread`, so that
/// participants disagreeing on either live under different segments and one transaction can
/// refuse them.
pub fn sema_segment(max: u32, spread: bool) -> String {
    if spread {
        format!("{max}-spread")
    } else {
        max.to_string()
    }
}

/// Parse a `<max>` segment back: `(max, spread)`.
pub fn parse_sema_segment(seg: &str) -> Option<(u32, bool)> {
    let (num, spread) = match seg.strip_suffix("-spread") {
        Some(n) => (n, true),
        None => (seg, false),
    };
    let max: u32 = num.parse().ok()?;
    (max >= 1 && num == max.to_string()).then_some((max, spread))
}

impl Prefix {
    /// `<prefix>/v1/sema/<name>/`: every participant of one semaphore, whatever its max.
    pub fn sema_dir(&self, name: &Name) -> String {
        format!("{}/v1/sema/{}/", self.0, name)
    }

    /// `<prefix>/v1/sema/<name>/<max>/`: the queue of one max.
    pub fn sema_queue(&self, name: &Name, max: u32, spread: bool) -> String {
        format!("{}{}/", self.sema_dir(name), sema_segment(max, spread))
    }

    /// `<prefix>/v1/sema/<name>/<max>/<lease-hex>`: one participant's key.
    pub fn sema_key(&self, name: &Name, max: u32, spread: bool, lease: LeaseId) -> String {
        format!("{}{}", self.sema_queue(name, max, spread), lease)
    }
}

impl Prefix {
    /// `<prefix>/v1/cron/job/`: every job spec.
    pub fn cron_jobs(&self) -> String {
        format!("{}/v1/cron/job/", self.0)
    }

    /// `<prefix>/v1/cron/job/<name>`: one job's spec (no lease: jobs persist).
    pub fn cron_job(&self, name: &Name) -> String {
        format!("{}{}", self.cron_jobs(), name)
    }

    /// `<prefix>/v1/cron/fire/<name>/`: the per-tick claims of one job.
    pub fn cron_fire_dir(&self, name: &Name) -> String {
        format!("{}/v1/cron/fire/{}/", self.0, name)
    }

    /// `<prefix>/v1/cron/fire/<name>/<tick>`: one tick's claim, created at most once.
    pub fn cron_fire(&self, name: &Name, tick: i64) -> String {
        format!("{}{}", self.cron_fire_dir(name), tick_key(tick))
    }

    /// `<prefix>/v1/cron/running/<name>`: leased by the node running the job (overlap=forbid).
    pub fn cron_running(&self, name: &Name) -> String {
        format!("{}/v1/cron/running/{}", self.0, name)
    }

    /// `<prefix>/v1/cron/result/<name>/`: one job's results, oldest first.
    pub fn cron_result_dir(&self, name: &Name) -> String {
        format!("{}/v1/cron/result/{}/", self.0, name)
    }

    /// `<prefix>/v1/cron/result/<name>/<tick>`.
    pub fn cron_result(&self, name: &Name, tick: i64) -> String {
        format!("{}{}", self.cron_result_dir(name), tick_key(tick))
    }

    /// `<prefix>/v1/cron/trigger/`: every pending `cron run` request.
    pub fn cron_triggers(&self) -> String {
        format!("{}/v1/cron/trigger/", self.0)
    }

    /// `<prefix>/v1/cron/trigger/<name>/<id>`.
    pub fn cron_trigger(&self, name: &Name, id: &str) -> String {
        format!("{}{}/{}", self.cron_triggers(), name, id)
    }

    /// `<prefix>/v1/node/`: every live conchd.
    pub fn nodes(&self) -> String {
        format!("{}/v1/node/", self.0)
    }

    /// `<prefix>/v1/node/<node>`: one live conchd (leased).
    pub fn node(&self, node: &str) -> String {
        format!("{}{}", self.nodes(), node)
    }

    /// `<prefix>/v1/elect/` and `<prefix>/v1/sema/`: every office and every semaphore.
    pub fn elect_all(&self) -> String {
        format!("{}/v1/elect/", self.0)
    }

    pub fn sema_all(&self) -> String {
        format!("{}/v1/sema/", self.0)
    }
}

/// A tick as a key component: its UTC Unix time zero-padded to 12 digits, so keys sort by time.
pub fn tick_key(tick: i64) -> String {
    debug_assert!(tick >= 0, "ticks before 1970 are not valid");
    format!("{:012}", tick.max(0))
}

/// Inverse of [`tick_key`]: exactly 12 ASCII digits.
pub fn parse_tick_key(s: &str) -> Option<i64> {
    (s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What a holder's key says about it. One-line JSON, fields in this order (public API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderRecord {
    pub node: String,
    /// conch's own pid (the record is written before the child exists).
    pub pid: u32,
    /// RFC 3339 UTC.
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    pub lease: String,
    pub containment: String,
}

impl HolderRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a holder record always serializes")
    }

    /// `None` for a value conch did not write (another tool's key, a corrupted value):
    /// readers show such a holder as unknown, never crash.
    pub fn parse(bytes: &[u8]) -> Option<HolderRecord> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The child argv joined by spaces, cut at [`CMD_MAX`] bytes on a UTF-8 boundary.
pub fn cmd_summary<S: AsRef<std::ffi::OsStr>>(argv: &[S]) -> String {
    let joined = argv
        .iter()
        .map(|a| a.as_ref().to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    cut_utf8(&joined, CMD_MAX).to_string()
}

fn cut_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2026-06-12T10:15:00Z`), without a date crate.
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.fff]Z` (what [`rfc3339_utc`] writes) back to Unix seconds
/// (fractions dropped). Anything else, including other offsets, is `None`.
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || *b.last()? != b'Z' || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = &s[19..s.len() - 1];
    if !(frac.is_empty()
        || (frac.len() > 1
            && frac.starts_with('.')
            && frac[1..].bytes().all(|c| c.is_ascii_digit())))
    {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days-from-civil (Howard Hinnant's algorithm), proleptic Gregorian.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Now as Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds
/// (`2026-06-12T10:15:00.123Z`).
pub fn rfc3339_utc_ms(unix_ms: i64) -> String {
    let secs = rfc3339_utc(unix_ms.div_euclid(1000).max(0) as u64);
    format!(
        "{}.{:03}Z",
        &secs[..secs.len() - 1],
        unix_ms.rem_euclid(1000)
    )
}

/// Now, as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339_utc(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for t in [0u64, 951_782_400, 1_795_000_000, 4_102_444_799] {
            assert_eq!(parse_rfc3339_utc(&rfc3339_utc(t)), Some(t as i64));
        }
        assert_eq!(
            parse_rfc3339_utc("2028-02-29T12:00:00.250Z"),
            Some(1_835_438_400)
        );
        for bad in [
            "",
            "2026-11-28 10:00:00Z",
            "2026-11-28T10:00:00+01:00",
            "2026-13-01T00:00:00Z",
            "2026-11-28T10:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tick_keys_sort_by_time() {
        assert_eq!(tick_key(90), "000000000090");
        assert_eq!(parse_tick_key("000000000090"), Some(90));
        for bad in [
            "00000000009",
            "0000000000900",
            "00000000009x",
            "-00000000009",
        ] {
            assert_eq!(parse_tick_key(bad), None, "{bad:?}");
        }
        assert!(tick_key(999) < tick_key(1000));
    }

    #[test]
    fn names_accept_the_allowed_alphabet() {
        for ok in [
            "a",
            "api-leader",
            "db.primary_2",
            "A-Z.09",
            &"x".repeat(128),
        ] {
            assert_eq!(Name::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn names_reject_with_the_reason() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert_eq!(Name::parse(&"x".repeat(129)), Err(NameError::TooLong(129)));
        assert_eq!(Name::parse(".hidden"), Err(NameError::LeadingDot));
        assert_eq!(Name::parse("a/b"), Err(NameError::BadChar("'/'".into())));
        assert_eq!(
            Name::parse("a b"),
            Err(NameError::BadChar("a space".into()))
        );
        assert_eq!(
            Name::parse("a\0b"),
            Err(NameError::BadChar("a NUL byte".into()))
        );
        assert_eq!(Name::parse("é"), Err(NameError::BadChar("'é'".into())));
        assert!(
            Name::parse("a\nb")
                .unwrap_err()
                .to_string()
                .contains("U+000A")
        );
    }

    #[test]
    fn keys_follow_the_schema() {
        let p = Prefix::parse("/conch/").unwrap();
        let n = Name::parse("api").unwrap();
        assert_eq!(p.elect_office(&n), "/conch/v1/elect/api/");
        assert_eq!(
            p.elect_candidate(&n, LeaseId(0x694d7b5c1e2a3f01)),
            "/conch/v1/elect/api/694d7b5c1e2a3f01"
        );
        assert_eq!(LeaseId(1).to_string(), "0000000000000001");
        assert!(Prefix::parse("").is_err());
    }

    #[test]
    fn sema_keys_and_segments() {
        let p = Prefix::parse("/conch").unwrap();
        let n = Name::parse("jobs").unwrap();
        assert_eq!(p.sema_dir(&n), "/conch/v1/sema/jobs/");
        assert_eq!(p.sema_queue(&n, 3, false), "/conch/v1/sema/jobs/3/");
        assert_eq!(
            p.sema_key(&n, 5, true, LeaseId(1)),
            "/conch/v1/sema/jobs/5-spread/0000000000000001"
        );
        assert_eq!(parse_sema_segment("3"), Some((3, false)));
        assert_eq!(parse_sema_segment("5-spread"), Some((5, true)));
        for bad in ["0", "03", "x", "-spread", "3-spreadx", ""] {
            assert_eq!(parse_sema_segment(bad), None, "{bad}");
        }
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
    }

    #[test]
    fn holder_record_field_order_is_stable() {
        let r = HolderRecord {
            node: "db2".into(),
            pid: 4242,
            started: "2026-06-12T10:15:00Z".into(),
            cmd: Some("pg_ctl start".into()),
            lease: "694d7b5c1e2a3f01".into(),
            containment: "cgroup".into(),
        };
        assert_eq!(
            r.to_json(),
            r#"{"node":"db2","pid":4242,"started":"2026-06-12T10:15:00Z","cmd":"pg_ctl start","lease":"694d7b5c1e2a3f01","containment":"cgroup"}"#
        );
        assert_eq!(HolderRecord::parse(r.to_json().as_bytes()), Some(r));
        assert_eq!(HolderRecord::parse(b"not json"), None);
        assert_eq!(HolderRecord::parse(br#"{"node":1}"#), None);
    }

    #[test]
    fn cmd_is_cut_on_a_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let s = cmd_summary(&[long.as_str()]);
        assert!(s.len() <= CMD_MAX && s.len() >= CMD_MAX - 1);
        assert!(s.chars().all(|c| c == 'é'));
        assert_eq!(cmd_summary(&["pg_ctl", "start"]), "pg_ctl start");
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_781_259_300), "2026-06-12T10:15:00Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
