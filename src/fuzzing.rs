//! Property checks on conch's decoders of untrusted bytes, shared by the cargo-fuzz targets
//! in `fuzz/` and by the unit test below that runs every seed in `fuzz/corpus/`.
//!
//! Each function takes arbitrary bytes, never panics on any of them, and panics (an assert)
//! only when a property below is broken, which is what a fuzzer reports. Not part of conch's
//! API: the fuzz crate and the tests are the only callers.
//!
//! Inputs are line-based text so the seeds can be written and read by hand; a missing or
//! unparsable line takes a default.

#![forbid(unsafe_code)]

use std::time::Duration;

use crate::cron::job::{self, JobError, JobSpec, MAX_SPEC_BYTES};
use crate::cron::schedule::Schedule;
use crate::keys::{
    self, HolderRecord, LeaseId, NAME_MAX, Name, NameError, Prefix, parse_rfc3339_utc,
    parse_sema_segment, parse_tick_key, prefix_end, rfc3339_utc, tick_key,
};

/// The "now" job specs are validated at: 2026-11-18, as in the job tests.
const NOW: i64 = 1_795_000_000;

/// Ticks a key can name: 12 digits of Unix seconds (until the year 33658). Ticks are never
/// more than 5 years after now, so no real tick is outside.
const TICK_KEY_END: i64 = 1_000_000_000_000;

/// 9999-12-31T23:59:59Z, the last second RFC 3339's 4-digit year can write.
const YEAR_9999_END: i64 = 253_402_300_799;

/// Line `i` of `data` as text (lossy), or `""`.
fn line(data: &[u8], i: usize) -> String {
    data.split(|&b| b == b'\n')
        .nth(i)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default()
}

/// `s` as an integer: decimal, `0x` hex, or else a hash of its bytes (so every mutation
/// still moves the number).
fn number(s: &str) -> i64 {
    let t = s.trim();
    if let Ok(n) = t.parse::<i64>() {
        return n;
    }
    if let Some(h) = t.strip_prefix("0x")
        && let Ok(n) = u64::from_str_radix(h, 16)
    {
        return n as i64;
    }
    t.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }) as i64
}

/// What [`Name::parse`] must decide, written out independently of it.
fn expected_name(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(NameError::BadChar(c.to_string()));
    }
    if s.len() > NAME_MAX {
        return Err(NameError::TooLong(s.len()));
    }
    if s.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    Ok(())
}

/// Whether `rest` (a key below its prefix) is made of plain segments: no empty, `.` or `..`.
fn plain_segments(rest: &str) -> bool {
    rest.split('/').all(|seg| !matches!(seg, "" | "." | ".."))
}

/// Names (from the command line) and the keys built from them and read back from etcd.
///
/// Input lines: name, other name, prefix (default `/conch`), lease, max, tick. Properties:
/// - [`Name::parse`] accepts exactly `A-Z a-z 0-9 . _ -`, 1..=128 long, no leading `.`, and
///   refuses anything else with the right reason and a message without control characters;
///   an accepted name parses again to itself.
/// - Every key built from an accepted name lies in its directory's etcd range, reads back
///   (the way `status`, `sema` and conchd split keys) to the same name, lease, max and tick,
///   and has no empty, `.` or `..` segment below the prefix.
/// - One name's keys never fall under another name's directory.
/// - The whole input read as a key component: `parse_tick_key`, `parse_sema_segment` and
///   `parse_rfc3339_utc` never panic and accept only what the writers would write.
pub fn names_and_keys(data: &[u8]) {
    let whole = String::from_utf8_lossy(data);
    components(&whole);
    for i in 0..6 {
        components(&line(data, i));
    }

    let raw = line(data, 0);
    let other = line(data, 1);
    let prefix = match line(data, 2) {
        p if p.is_empty() => "/conch".to_owned(),
        p => p,
    };
    let lease = LeaseId(number(&line(data, 3)));
    let max = (number(&line(data, 4)) as u32).max(1);
    let tick = number(&line(data, 5)).rem_euclid(TICK_KEY_END);

    let name = match (Name::parse(&raw), expected_name(&raw)) {
        (Ok(name), Ok(())) => name,
        (Err(got), Err(want)) => {
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{raw:?}: refused as {got:?}, expected {want:?}"
            );
            let message = got.to_string();
            assert!(
                !message.is_empty() && !message.chars().any(char::is_control),
                "{raw:?}: message {message:?}"
            );
            return;
        }
        (got, want) => panic!("{raw:?}: Name::parse gave {got:?}, expected {want:?}"),
    };
    assert_eq!(name.as_str(), raw);
    assert_eq!(Name::parse(name.as_str()).as_ref(), Ok(&name));
    assert!((1..=NAME_MAX).contains(&raw.len()) && !raw.contains('/'));

    let Ok(p) = Prefix::parse(&prefix) else {
        assert!(prefix.is_empty() || prefix.contains('\0'), "{prefix:?}");
        return;
    };
    let in_range = |dir: &str, key: &str| {
        assert!(key.starts_with(dir), "{key:?} not under {dir:?}");
        assert!(
            key.as_bytes() < prefix_end(dir).as_slice(),
            "{key:?} past the range of {dir:?}"
        );
    };

    // elect: <all>/<name>/<lease-hex>, read as status does.
    let key = p.elect_candidate(&name, lease);
    in_range(&p.elect_office(&name), &key);
    in_range(&p.elect_all(), &key);
    let rest = key.strip_prefix(&p.elect_all()).expect("checked above");
    assert!(plain_segments(rest), "{key:?}");
    let (n, hex) = rest.split_once('/').expect("a candidate key has a lease");
    assert_eq!(n, name.as_str(), "{key:?}");
    assert!(
        hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{key:?}: lease {hex:?}"
    );
    assert_eq!(u64::from_str_radix(hex, 16).map(|v| v as i64), Ok(lease.0));

    // sema: <all>/<name>/<max>[-spread]/<lease-hex>, read as status does.
    for spread in [false, true] {
        let key = p.sema_key(&name, max, spread, lease);
        in_range(&p.sema_queue(&name, max, spread), &key);
        in_range(&p.sema_dir(&name), &key);
        let rest = key.strip_prefix(&p.sema_all()).expect("under sema_all");
        assert!(plain_segments(rest), "{key:?}");
        let mut parts = rest.splitn(3, '/');
        assert_eq!(parts.next(), Some(name.as_str()));
        assert_eq!(
            parts.next().and_then(parse_sema_segment),
            Some((max, spread)),
            "{key:?}"
        );
        assert_eq!(parts.next(), Some(lease.to_string().as_str()));
    }

    // cron: job, running, fire and result keys.
    let job = p.cron_job(&name);
    assert_eq!(job.strip_prefix(&p.cron_jobs()), Some(name.as_str()));
    let running = p.cron_running(&name);
    assert!(running.ends_with(&format!("/v1/cron/running/{name}")));
    for (dir, key) in [
        (p.cron_fire_dir(&name), p.cron_fire(&name, tick)),
        (p.cron_result_dir(&name), p.cron_result(&name, tick)),
    ] {
        in_range(&dir, &key);
        let last = key.strip_prefix(&dir).expect("in range");
        assert_eq!(parse_tick_key(last), Some(tick), "{key:?}");
    }
    for key in [&job, &running] {
        let below = key
            .strip_prefix(p.cron_jobs().trim_end_matches("job/"))
            .unwrap_or(key);
        assert!(plain_segments(below), "{key:?}");
    }

    // Another valid name: its directories never hold this name's keys.
    if let Ok(o) = Name::parse(&other)
        && o != name
    {
        for (dir, key) in [
            (p.elect_office(&o), p.elect_candidate(&name, lease)),
            (p.sema_dir(&o), p.sema_key(&name, max, false, lease)),
            (p.cron_fire_dir(&o), p.cron_fire(&name, tick)),
            (p.cron_result_dir(&o), p.cron_result(&name, tick)),
        ] {
            assert!(!key.starts_with(&dir), "{key:?} falls under {dir:?}");
        }
        assert_ne!(p.cron_job(&o), job);
    }
}

/// One string read as each kind of key component or stored time.
fn components(s: &str) {
    if let Some(t) = parse_tick_key(s) {
        assert!((0..TICK_KEY_END).contains(&t));
        assert_eq!(tick_key(t), s);
    }
    if let Some((max, spread)) = parse_sema_segment(s) {
        assert!(max >= 1);
        assert_eq!(keys::sema_segment(max, spread), s);
    }
    // A parsed time up to year 9999 (what the 4-digit writer can write) is written back
    // to a string that reads as the same second (`:60` and day 31 of a short month roll over).
    if let Some(t) = parse_rfc3339_utc(s)
        && (0..=YEAR_9999_END).contains(&t)
    {
        let written = rfc3339_utc(t as u64);
        assert_eq!(parse_rfc3339_utc(&written), Some(t), "{s:?} -> {written:?}");
    }
    let n = number(s);
    if (0..=YEAR_9999_END).contains(&n) {
        assert_eq!(parse_rfc3339_utc(&rfc3339_utc(n as u64)), Some(n));
    }
}

/// A holder record, the value of an elect or sema key: anyone with write access to the
/// prefix can plant one.
///
/// Properties: parsing never panics; a record that parses serialises to one line of JSON
/// that parses back equal, and serialising again gives the same bytes.
pub fn holder_record(data: &[u8]) {
    let Some(record) = HolderRecord::parse(data) else {
        return;
    };
    let json = record.to_json();
    assert!(!json.contains('\n'), "{json:?} is not one line");
    let again = HolderRecord::parse(json.as_bytes());
    assert_eq!(again.as_ref(), Some(&record), "{json}");
    assert_eq!(again.map(|r| r.to_json()), Some(json));
    // What status and query show of it never panics.
    let _ = parse_rfc3339_utc(&record.started);
    let _ = keys::cmd_summary(&[record.cmd.as_deref().unwrap_or("")]);
}

/// A job spec, the value under `<prefix>/v1/cron/job/<name>` that conchd on every node reads
/// and validates.
///
/// Properties:
/// - Decoding never panics; a value over 64 KiB is refused unread.
/// - A spec that decodes re-encodes to one line that decodes equal.
/// - The same spec grown past 64 KiB is refused by both `validate` and `decode`.
/// - A spec that validates has a non-empty command, a tick after now within 5 years,
///   positive run TTL and starting deadline, jitter below the starting deadline and its
///   offset below the jitter, labels that format and parse back, and durations small enough
///   for the millisecond and instant arithmetic conchd does with them.
pub fn job_spec(data: &[u8]) {
    let decoded = JobSpec::decode(data);
    if data.len() > MAX_SPEC_BYTES {
        assert!(matches!(decoded, Err(JobError::TooBig(_))), "{decoded:?}");
        return;
    }
    let Ok(spec) = decoded else {
        return;
    };
    let json = spec.to_json();
    assert!(!json.contains('\n'));
    let name = Name::parse("fuzz").expect("a valid name");
    if json.len() <= MAX_SPEC_BYTES {
        assert_eq!(
            JobSpec::decode(json.as_bytes()).ok().as_ref(),
            Some(&spec),
            "{json}"
        );
    } else {
        // Defaults written out can take a stored value just under the limit over it: such a
        // spec never validates, so conchd never runs it.
        assert!(matches!(
            spec.validate(&name, NOW, 1),
            Err(JobError::TooBig(_))
        ));
    }
    match spec.validate(&name, NOW, 1) {
        Ok(job) => valid_job(&job, &json),
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let mut big = spec.clone();
    big.cmd
        .push("x".repeat((MAX_SPEC_BYTES + 1).saturating_sub(json.len())));
    let big_json = big.to_json();
    assert!(big_json.len() > MAX_SPEC_BYTES);
    assert!(matches!(
        big.validate(&name, NOW, 1),
        Err(JobError::TooBig(_))
    ));
    assert!(matches!(
        JobSpec::decode(big_json.as_bytes()),
        Err(JobError::TooBig(_))
    ));
}

fn valid_job(job: &job::Job, json: &str) {
    let spec = &job.spec;
    assert!(json.len() <= MAX_SPEC_BYTES);
    assert!(spec.cmd.first().is_some_and(|c| !c.is_empty()));
    let first = job.schedule.next_after(NOW);
    assert!(
        first.is_some_and(|t| t > NOW),
        "{json}: first tick {first:?}"
    );
    assert!(!job.run_ttl.is_zero() && !job.starting_deadline.is_zero());
    assert!(job.jitter < job.starting_deadline);
    assert!(job.jitter.is_zero() || job.jitter_offset() < job.jitter);
    assert!(job.resumed_at >= job.added_at);
    assert_eq!(
        job::parse_labels(&job::format_labels(&spec.node_selector)).as_ref(),
        Ok(&spec.node_selector)
    );
    assert!(job.selects(&spec.node_selector));

    // conchd's arithmetic on a tick up to 5 years ahead (table.rs, run.rs, mod.rs): whole
    // milliseconds in an i64, and a run's end as a boot-clock instant.
    let ms = |d: Duration| i64::try_from(d.as_millis()).ok();
    let tick_ms = first.and_then(|t| t.checked_mul(1000));
    let deadline = tick_ms
        .zip(ms(job.jitter_offset()))
        .and_then(|(t, j)| t.checked_add(j))
        .zip(ms(job.starting_deadline))
        .and_then(|(t, d)| t.checked_add(d));
    assert!(deadline.is_some(), "{json}: tick deadline overflows");
    let earliest = i64::try_from(job.starting_deadline.as_secs())
        .ok()
        .and_then(|sd| NOW.checked_sub(sd)?.checked_sub(1));
    assert!(
        earliest.is_some(),
        "{json}: earliest claimable tick overflows"
    );
    // A boot clock 100 years in: the run's limit is that plus run_ttl.
    let boot = Duration::from_secs(100 * 366 * 86_400);
    assert!(
        boot.checked_add(job.run_ttl).is_some(),
        "{json}: run-ttl overflows"
    );
}

/// A schedule and a zone: the `schedule` and `tz` fields of a job spec (any etcd writer's).
///
/// Input lines: expression, zone (default `UTC`), the instant to search after (Unix seconds,
/// default 2026-11-18). Properties: parsing never panics, for any expression and zone; the
/// zone read back names itself; a tick is strictly after the instant searched from and
/// within 5 years of it, `next_after(t - 1)` is `t` again, a point between the two finds the
/// same tick, and the next tick after it is strictly later (eight ticks, at most: the check
/// is bounded). An `@every` tick is a multiple of its period.
pub fn schedule(data: &[u8]) {
    let expr = line(data, 0);
    let tz = match line(data, 1) {
        z if z.is_empty() => "UTC".to_owned(),
        z => z,
    };
    let after = match line(data, 2) {
        a if a.trim().is_empty() => NOW,
        a => number(&a),
    };
    let Ok(schedule) = Schedule::parse(&expr, &tz) else {
        return;
    };
    assert!(
        schedule.in_zone(schedule.tz_name()),
        "{}",
        schedule.tz_name()
    );
    assert!(!schedule.expr().starts_with("CRON_TZ=") && !schedule.expr().starts_with("TZ="));
    let horizon = crate::cron::schedule::HORIZON_SECS;
    let mut from = after;
    for _ in 0..8 {
        let Some(t) = schedule.next_after(from) else {
            return;
        };
        assert!(t > from, "{expr:?} in {tz}: next after {from} is {t}");
        assert!(
            t.checked_sub(from).is_some_and(|d| d <= horizon),
            "{expr:?} in {tz}: {t} too far after {from}"
        );
        assert_eq!(
            schedule.next_after(t - 1),
            Some(t),
            "{expr:?} in {tz}: next after {} is not {t}",
            t - 1
        );
        let middle = from + (t - from) / 2;
        assert_eq!(
            schedule.next_after(middle),
            Some(t),
            "{expr:?} in {tz}: next after {middle} (between {from} and {t})"
        );
        if let Some(period) = schedule.every() {
            assert_eq!(t.rem_euclid(period as i64), 0, "{expr:?}");
        }
        from = t;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    type Target = fn(&[u8]);
    const TARGETS: [(&str, Target); 4] = [
        ("names_and_keys", names_and_keys),
        ("holder_record", holder_record),
        ("job_spec", job_spec),
        ("schedule", schedule),
    ];

    /// Every seed of every fuzz target, through the same function the fuzzer calls.
    #[test]
    fn every_seed_holds_the_properties() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, check) in TARGETS {
            let dir = root.join(target);
            let mut seeds: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.expect("a directory entry").path())
                .collect();
            seeds.sort();
            assert!(seeds.len() >= 5, "{target}: only {} seeds", seeds.len());
            for seed in seeds {
                let data = std::fs::read(&seed).expect("a readable seed");
                let outcome = std::panic::catch_unwind(|| check(&data));
                assert!(outcome.is_ok(), "{target}: seed {} fails", seed.display());
            }
        }
    }

    /// The properties are not vacuous: seeds reach the deep branches.
    #[test]
    fn seeds_reach_the_checks() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let read = |t: &str, f: &str| std::fs::read(root.join(t).join(f)).expect(f);
        let spec = read("job_spec", "valid-daily");
        let job = JobSpec::decode(&spec).expect("decodes");
        assert!(job.validate(&Name::parse("fuzz").unwrap(), NOW, 1).is_ok());
        let sched = read("schedule", "berlin-fall-back-wildcard");
        let expr = line(&sched, 0);
        assert!(Schedule::parse(&expr, &line(&sched, 1)).is_ok());
        assert!(HolderRecord::parse(&read("holder_record", "valid")).is_some());
        assert!(Name::parse(&line(&read("names_and_keys", "valid"), 0)).is_ok());
    }

    /// A too-big job spec in the product would be caught: the 64 KiB check fires.
    #[test]
    fn oversized_input_is_refused() {
        job_spec(&vec![b' '; MAX_SPEC_BYTES + 1]);
    }
}
