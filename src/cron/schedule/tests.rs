use chrono::{DateTime, SecondsFormat};

use super::*;

fn ts(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("bad test time {rfc3339}: {e}"))
        .timestamp()
}

fn show(t: i64) -> String {
    DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{t} (out of range)"))
}

fn parse(expr: &str, tz: &str) -> Schedule {
    Schedule::parse(expr, tz).unwrap_or_else(|e| panic!("{expr:?} in {tz}: {e}"))
}

/// (expression, zone, after, the next ticks in order).
///
/// Where the values come from: every row without a note is the output of Python's croniter
/// 7.0.0 with pytz 2026 (`croniter(expr, after.astimezone(zone), second_at_beginning=<6
/// fields>).get_next(datetime)`, repeated), copied here literally. The `@every` rows are
/// multiples of the period in Unix seconds, computed in Python (croniter has no `@every`).
/// The `5L` row was read off a calendar (croniter spells it `L5`).
///
/// croniter and cronie agree on the spring-forward gap for fixed-time jobs (run at the first
/// instant after the gap), but not elsewhere. Rows marked "cronie" follow cronie/Vixie cron,
/// as the module docs decide, and were worked out by hand from the zone's transition:
/// croniter runs a fixed-time job on both passes through a fall-back overlap, where cronie
/// runs it once; and croniter runs `*/30 2 * * *` at the end of a gap, where cronie skips
/// wildcard jobs in a gap.
#[rustfmt::skip]
const TABLE: &[(&str, &str, &str, &[&str])] = &[
    // Each basic form.
    ("* * * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T10:21:00Z", "2026-01-15T10:22:00Z", "2026-01-15T10:23:00Z"]),
    ("5 * * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T11:05:00Z", "2026-01-15T12:05:00Z"]),
    ("30 4 * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-16T04:30:00Z", "2026-01-17T04:30:00Z"]),
    ("0 0 1 * *", "UTC", "2026-01-15T10:20:30Z", &["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"]),
    ("0 12 * 6 *", "UTC", "2026-01-15T10:20:30Z", &["2026-06-01T12:00:00Z", "2026-06-02T12:00:00Z"]),
    ("0 9 * * 1", "UTC", "2026-01-15T10:20:30Z", &["2026-01-19T09:00:00Z", "2026-01-26T09:00:00Z"]),
    // Names, in any case.
    ("0 9 * * mon", "UTC", "2026-01-15T10:20:30Z", &["2026-01-19T09:00:00Z"]),
    ("0 9 * * MON", "UTC", "2026-01-15T10:20:30Z", &["2026-01-19T09:00:00Z"]),
    ("0 0 1 jan *", "UTC", "2026-01-15T10:20:30Z", &["2027-01-01T00:00:00Z"]),
    ("0 0 1 JUL *", "UTC", "2026-01-15T10:20:30Z", &["2026-07-01T00:00:00Z"]),
    ("0 0 1 mar-may *", "UTC", "2026-01-15T10:20:30Z", &["2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z"]),
    ("0 9 * * mon-fri", "UTC", "2026-01-16T10:20:30Z", &["2026-01-19T09:00:00Z", "2026-01-20T09:00:00Z", "2026-01-21T09:00:00Z"]),
    ("0 9 * * Sat,sun", "UTC", "2026-01-15T10:20:30Z", &["2026-01-17T09:00:00Z", "2026-01-18T09:00:00Z", "2026-01-24T09:00:00Z"]),
    // Ranges, steps, lists.
    ("0 9-17 * * *", "UTC", "2026-01-15T16:20:30Z", &["2026-01-15T17:00:00Z", "2026-01-16T09:00:00Z", "2026-01-16T10:00:00Z"]),
    ("*/15 * * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T10:30:00Z", "2026-01-15T10:45:00Z", "2026-01-15T11:00:00Z"]),
    ("1-30/7 * * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T10:22:00Z", "2026-01-15T10:29:00Z", "2026-01-15T11:01:00Z", "2026-01-15T11:08:00Z", "2026-01-15T11:15:00Z"]),
    ("0 0,12 * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T12:00:00Z", "2026-01-16T00:00:00Z", "2026-01-16T12:00:00Z"]),
    ("15,45 */6 * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T12:15:00Z", "2026-01-15T12:45:00Z", "2026-01-15T18:15:00Z"]),
    ("0 8-18/5 * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T13:00:00Z", "2026-01-15T18:00:00Z", "2026-01-16T08:00:00Z"]),
    // 0 and 7 are Sunday.
    ("0 0 * * 0", "UTC", "2026-01-15T10:20:30Z", &["2026-01-18T00:00:00Z", "2026-01-25T00:00:00Z"]),
    ("0 0 * * 7", "UTC", "2026-01-15T10:20:30Z", &["2026-01-18T00:00:00Z", "2026-01-25T00:00:00Z"]),
    ("0 0 * * 5-7", "UTC", "2026-01-15T10:20:30Z", &["2026-01-16T00:00:00Z", "2026-01-17T00:00:00Z", "2026-01-18T00:00:00Z", "2026-01-23T00:00:00Z"]),
    // Both day fields restricted: either fires (the 13th, or any Friday).
    ("0 0 13 * 5", "UTC", "2026-02-01T00:00:00Z", &["2026-02-06T00:00:00Z", "2026-02-13T00:00:00Z", "2026-02-20T00:00:00Z", "2026-02-27T00:00:00Z"]),
    ("0 0 1,15 * 3", "UTC", "2026-01-15T10:20:30Z", &["2026-01-21T00:00:00Z", "2026-01-28T00:00:00Z", "2026-02-01T00:00:00Z"]),
    ("0 0 */10 * 1", "UTC", "2026-01-15T10:20:30Z", &["2026-01-19T00:00:00Z", "2026-01-21T00:00:00Z", "2026-01-26T00:00:00Z"]),
    // 6 fields, seconds in front.
    ("*/10 * * * * *", "UTC", "2026-01-15T10:20:35Z", &["2026-01-15T10:20:40Z", "2026-01-15T10:20:50Z", "2026-01-15T10:21:00Z"]),
    ("30 15 10 * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-16T10:15:30Z", "2026-01-17T10:15:30Z"]),
    ("0 0 0 1 1 *", "UTC", "2026-01-15T10:20:30Z", &["2027-01-01T00:00:00Z"]),
    // Nicknames.
    ("@yearly", "UTC", "2026-01-15T10:20:30Z", &["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"]),
    ("@annually", "UTC", "2026-01-15T10:20:30Z", &["2027-01-01T00:00:00Z"]),
    ("@monthly", "UTC", "2026-01-15T10:20:30Z", &["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"]),
    ("@weekly", "UTC", "2026-01-15T10:20:30Z", &["2026-01-18T00:00:00Z", "2026-01-25T00:00:00Z"]),
    ("@daily", "UTC", "2026-01-15T10:20:30Z", &["2026-01-16T00:00:00Z", "2026-01-17T00:00:00Z"]),
    ("@midnight", "UTC", "2026-01-15T10:20:30Z", &["2026-01-16T00:00:00Z"]),
    ("@hourly", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T11:00:00Z", "2026-01-15T12:00:00Z"]),
    ("@hourly", "Asia/Kolkata", "2026-01-15T10:20:30Z", &["2026-01-15T10:30:00Z", "2026-01-15T11:30:00Z"]),
    // @every: multiples of the period since the epoch (Python arithmetic), whatever the zone.
    ("@every 90s", "UTC", "2026-01-15T10:00:05Z", &["2026-01-15T10:01:30Z", "2026-01-15T10:03:00Z", "2026-01-15T10:04:30Z"]),
    ("@every 90s", "Asia/Kolkata", "2026-01-15T10:00:05Z", &["2026-01-15T10:01:30Z"]),
    ("@every 1h", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T11:00:00Z", "2026-01-15T12:00:00Z"]),
    ("@every 7s", "UTC", "2026-01-15T10:00:05Z", &["2026-01-15T10:00:08Z", "2026-01-15T10:00:15Z", "2026-01-15T10:00:22Z"]),
    ("@every 1h30m", "UTC", "2026-01-15T10:20:30Z", &["2026-01-15T10:30:00Z", "2026-01-15T12:00:00Z"]),
    // Short months and leap days.
    ("0 0 29 2 *", "UTC", "2026-03-01T00:00:00Z", &["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]),
    ("0 0 31 * *", "UTC", "2026-04-01T00:00:00Z", &["2026-05-31T00:00:00Z", "2026-07-31T00:00:00Z", "2026-08-31T00:00:00Z"]),
    // croner extensions that stay accepted.
    ("0 0 L * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z"]),
    ("0 0 * * 1#2", "UTC", "2026-01-15T00:00:00Z", &["2026-02-09T00:00:00Z", "2026-03-09T00:00:00Z"]),
    ("0 0 * * 5L", "UTC", "2026-01-15T00:00:00Z", &["2026-01-30T00:00:00Z", "2026-02-27T00:00:00Z"]), // calendar
    // Zones without a change that day.
    ("0 9 * * *", "UTC", "2026-01-15T10:20:30Z", &["2026-01-16T09:00:00Z"]),
    ("0 9 * * *", "Asia/Kolkata", "2026-01-15T10:20:30Z", &["2026-01-16T03:30:00Z"]),
    ("0 9 * * *", "Europe/Berlin", "2026-01-15T10:20:30Z", &["2026-01-16T08:00:00Z"]),
    ("0 9 * * *", "Europe/Berlin", "2026-07-15T10:20:30Z", &["2026-07-16T07:00:00Z"]),
    ("0 9 * * *", "America/New_York", "2026-07-15T10:20:30Z", &["2026-07-15T13:00:00Z"]),
    // Europe/Berlin springs forward on 2026-03-29: 02:00 CET (01:00 UTC) becomes 03:00 CEST.
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", &["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]),
    ("0 30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", &["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]),
    ("0,30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", &["2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z", "2026-03-30T00:30:00Z"]),
    ("0 2,3 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", &["2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z", "2026-03-30T01:00:00Z"]),
    ("30 1-3 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", &["2026-03-29T00:30:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z", "2026-03-29T23:30:00Z"]),
    ("*/30 * * * *", "Europe/Berlin", "2026-03-29T00:15:00Z", &["2026-03-29T00:30:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"]),
    ("0 * * * *", "Europe/Berlin", "2026-03-29T00:30:00Z", &["2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z"]),
    ("*/30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", &["2026-03-30T00:00:00Z", "2026-03-30T00:30:00Z"]), // cronie
    // Europe/Berlin falls back on 2026-10-25: 03:00 CEST (01:00 UTC) becomes 02:00 CET.
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", &["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]), // cronie
    ("0,30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", &["2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:00:00Z"]), // cronie
    ("30 1-3 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", &["2026-10-24T23:30:00Z", "2026-10-25T00:30:00Z", "2026-10-25T02:30:00Z", "2026-10-26T00:30:00Z"]), // cronie
    ("*/30 * * * *", "Europe/Berlin", "2026-10-24T23:45:00Z", &["2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z", "2026-10-25T01:00:00Z"]),
    ("*/30 * * * *", "Europe/Berlin", "2026-10-25T00:45:00Z", &["2026-10-25T01:00:00Z", "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z"]),
    // America/New_York: 2026-03-08 02:00 EST (07:00 UTC) becomes 03:00 EDT; 2026-11-01 02:00 EDT
    // (06:00 UTC) becomes 01:00 EST.
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", &["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"]),
    ("*/30 * * * *", "America/New_York", "2026-03-08T06:45:00Z", &["2026-03-08T07:00:00Z", "2026-03-08T07:30:00Z", "2026-03-08T08:00:00Z"]),
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", &["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]), // cronie
    ("0 * * * *", "America/New_York", "2026-11-01T04:30:00Z", &["2026-11-01T05:00:00Z", "2026-11-01T06:00:00Z", "2026-11-01T07:00:00Z"]),
    // Australia/Lord_Howe moves by 30 minutes: 2026-10-04 02:00 (+10:30) becomes 02:30 (+11);
    // 2026-04-05 02:00 (+11) becomes 01:30 (+10:30).
    ("15 2 * * *", "Australia/Lord_Howe", "2026-10-03T00:00:00Z", &["2026-10-03T15:30:00Z", "2026-10-04T15:15:00Z"]),
    ("45 1 * * *", "Australia/Lord_Howe", "2026-04-04T00:00:00Z", &["2026-04-04T14:45:00Z", "2026-04-05T15:15:00Z"]), // cronie
    // Pacific/Auckland: 2026-09-27 02:00 NZST (+12) becomes 03:00 NZDT (+13).
    ("30 2 * * *", "Pacific/Auckland", "2026-09-26T00:00:00Z", &["2026-09-26T14:00:00Z", "2026-09-27T13:30:00Z"]),
];

#[test]
fn table_matches_the_reference() {
    assert!(TABLE.len() >= 45);
    let mut failures = Vec::new();
    for &(expr, tz, after, expected) in TABLE {
        let schedule = parse(expr, tz);
        let mut at = ts(after);
        let mut got = Vec::new();
        for _ in expected {
            match schedule.next_after(at) {
                Some(t) => {
                    got.push(show(t));
                    at = t;
                }
                None => {
                    got.push("none".to_owned());
                    break;
                }
            }
        }
        if got != expected.iter().map(|s| s.to_string()).collect::<Vec<_>>() {
            failures.push(format!(
                "{expr:?} in {tz} after {after}:\n   want {expected:?}\n    got {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn same_line_in_utc_and_kolkata_differs_by_five_and_a_half_hours() {
    let after = ts("2026-01-15T00:00:00Z");
    let utc = parse("0 9 * * *", "UTC");
    let kolkata = parse("0 9 * * *", "Asia/Kolkata");
    let mut a = after;
    let mut b = after;
    for _ in 0..5 {
        a = utc.next_after(a).unwrap();
        b = kolkata.next_after(b).unwrap();
        assert_eq!(a - b, 5 * 3600 + 1800, "{} vs {}", show(a), show(b));
    }
}

#[test]
fn errors_name_the_problem() {
    // (expression, zone, words the message must contain)
    let cases: &[(&str, &str, &[&str])] = &[
        ("CRON_TZ=", "UTC", &["CRON_TZ=", "no time zone"]),
        ("CRON_TZ= 0 * * * *", "UTC", &["CRON_TZ=", "no time zone"]),
        ("TZ= 0 * * * *", "UTC", &["TZ=", "no time zone"]),
        (
            "0 * * * *",
            "Mars/Base",
            &["unknown time zone", "Mars/Base"],
        ),
        (
            "CRON_TZ=Mars/Base 0 * * * *",
            "UTC",
            &["unknown time zone", "Mars/Base"],
        ),
        ("0 * * * *", "", &["unknown time zone"]),
        ("61 * * * *", "UTC", &["61 * * * *", "minute 61", "0-59"]),
        ("0 24 * * *", "UTC", &["hour 24", "0-23"]),
        ("0 0 0 * *", "UTC", &["day-of-month 0", "1-31"]),
        ("0 0 * 13 *", "UTC", &["month 13", "1-12"]),
        ("0 0 * * 8", "UTC", &["day-of-week 8", "0-7"]),
        ("60 0 0 * * *", "UTC", &["second 60"]),
        ("* * * *", "UTC", &["4 fields", "expected 5"]),
        ("0 0 0 1 1 * 2030", "UTC", &["7 fields", "years"]),
        (
            "@every 0s",
            "UTC",
            &["@every", "whole number of seconds", "zero"],
        ),
        ("@every 1500ms", "UTC", &["@every", "fraction of a second"]),
        (
            "@every abc",
            "UTC",
            &["@every", "\"abc\" is not a duration"],
        ),
        ("@every", "UTC", &["@every", "no duration"]),
        ("@reboot", "UTC", &["@reboot", "not supported"]),
        ("@fortnightly", "UTC", &["unknown @fortnightly"]),
        ("@daily 5", "UTC", &["@daily takes nothing"]),
        ("", "UTC", &["empty"]),
        ("   ", "UTC", &["empty"]),
        ("CRON_TZ=UTC", "UTC", &["empty"]),
        (
            "mon * * * *",
            "UTC",
            &["minute field takes numbers", "\"mon\""],
        ),
        ("0 0 * mon *", "UTC", &["\"mon\" is not a month name"]),
        ("0 0 * * jan", "UTC", &["\"jan\" is not a day-of-week name"]),
        ("0 0 * * +1", "UTC", &["unexpected '+'"]),
        ("1,,2 * * * *", "UTC", &["empty list item"]),
        ("0/10 * * * *", "UTC", &["0/10"]),
        ("*/0 * * * *", "UTC", &["step"]),
        ("30-10 * * * *", "UTC", &["range"]),
    ];
    let mut failures = Vec::new();
    for &(expr, tz, words) in cases {
        match Schedule::parse(expr, tz) {
            Ok(s) => failures.push(format!("{expr:?} in {tz:?} parsed: {s:?}")),
            Err(e) => {
                let msg = e.to_string();
                println!("{expr:?}: {msg}");
                if let Some(w) = words.iter().find(|w| !msg.contains(*w)) {
                    failures.push(format!("{expr:?}: {msg:?} lacks {w:?}"));
                }
                // Lowercase, except for the literal prefix a message may quote first.
                let rest = msg.trim_start_matches("CRON_TZ=").trim_start_matches("TZ=");
                if rest.starts_with(|c: char| c.is_ascii_uppercase()) {
                    failures.push(format!("{expr:?}: {msg:?} is not lowercase"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn parses_but_never_fires() {
    let now = ts("2026-01-15T00:00:00Z");
    for expr in ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 31 2 *"] {
        let s = parse(expr, "UTC");
        assert_eq!(s.next_after(now), None, "{expr}");
        let msg = s.check_fires(now).unwrap_err().to_string();
        assert_eq!(msg, format!("schedule {expr:?} never fires within 5 years"));
    }
    // Fires, but not within five years: the 29th of February skips 2100.
    let leap = parse("0 0 29 2 *", "UTC");
    assert!(leap.check_fires(ts("2096-03-01T00:00:00Z")).is_err());
    assert!(leap.check_fires(ts("2026-01-15T00:00:00Z")).is_ok());
    // An @every longer than five years ticks within five years of some instants only.
    let long = parse("@every 87600h", "UTC"); // ten years of 365 days
    assert!(long.check_fires(0).is_err());
    assert!(long.check_fires(315_360_000 - 10).is_ok());
    // The horizon is inclusive.
    let every = parse(&format!("@every {HORIZON_SECS}s"), "UTC");
    assert_eq!(every.next_after(0), Some(HORIZON_SECS));
}

#[test]
fn zone_prefix_overrides_tz() {
    let s = parse("CRON_TZ=Europe/Berlin 0 9 * * *", "America/New_York");
    assert_eq!(s.tz_name(), "Europe/Berlin");
    assert_eq!(s.expr(), "0 9 * * *");
    assert_eq!(s.every(), None);
    assert_eq!(
        s.next_after(ts("2026-01-15T10:20:30Z")),
        Some(ts("2026-01-16T08:00:00Z"))
    );

    let s = parse("  TZ=Asia/Kolkata   @daily  ", "UTC");
    assert_eq!(s.tz_name(), "Asia/Kolkata");
    assert_eq!(s.expr(), "@daily");

    let s = parse(" 0 9 * * * ", "America/New_York");
    assert_eq!(s.tz_name(), "America/New_York");
    assert_eq!(s.expr(), "0 9 * * *");

    let s = parse("@every 1h30m", "Europe/Berlin");
    assert_eq!(s.every(), Some(5400));
    assert_eq!(s.tz_name(), "Europe/Berlin");
    assert_eq!(s.expr(), "@every 1h30m");
}

#[test]
fn ticks_increase_and_each_is_the_next_after_the_second_before_it() {
    // Each run crosses a change of offset where the schedule has one nearby.
    let cases = [
        ("*/7 * * * *", "Europe/Berlin", "2026-03-28T23:00:00Z"),
        ("30 2 * * *", "Europe/Berlin", "2026-01-01T00:00:00Z"),
        ("0,30 1-3 * * *", "America/New_York", "2026-02-20T00:00:00Z"),
        (
            "*/30 * * * *",
            "Australia/Lord_Howe",
            "2026-04-04T10:00:00Z",
        ),
        ("*/10 * * * * *", "Europe/Berlin", "2026-10-25T00:30:00Z"),
        ("0 * * * *", "Europe/Berlin", "2026-10-24T00:00:00Z"),
        ("15 1 * * *", "America/New_York", "2026-01-01T00:00:00Z"),
        ("0 0 13 * 5", "UTC", "2026-01-01T00:00:00Z"),
        ("@every 90s", "UTC", "2026-01-01T00:00:00Z"),
        ("@weekly", "Pacific/Auckland", "2026-01-01T00:00:00Z"),
    ];
    for (expr, tz, start) in cases {
        let s = parse(expr, tz);
        let mut prev = ts(start);
        for i in 0..500 {
            let t = s
                .next_after(prev)
                .unwrap_or_else(|| panic!("{expr} in {tz}: no tick {i} after {}", show(prev)));
            assert!(t > prev, "{expr} in {tz}: {} after {}", show(t), show(prev));
            assert_eq!(
                s.next_after(t - 1),
                Some(t),
                "{expr} in {tz}: next_after({} - 1s)",
                show(t)
            );
            prev = t;
        }
    }
}

#[test]
fn tick_keys_round_trip() {
    assert_eq!(tick_key(90), "000000000090");
    assert_eq!(tick_key(0), "000000000000");
    for t in [0, 1, 90, 1_768_471_205, 999_999_999_999] {
        assert_eq!(parse_tick_key(&tick_key(t)), Some(t));
    }
    for bad in [
        "",
        "17684712050",   // 11 digits
        "0017684712050", // 13 digits
        "00000000009O",  // letter O
        "-00000000090",
        "+00000000090",
        " 00000000090",
        "000000000٩٠", // non-ASCII digits
    ] {
        assert_eq!(parse_tick_key(bad), None, "{bad:?}");
    }
}

/// Prints the cost of one `next_after`; run with
/// `cargo test --release --lib cron::schedule -- --ignored --nocapture`.
#[test]
#[ignore]
fn next_after_cost() {
    let start = ts("2026-01-15T10:20:30Z");
    for (expr, tz) in [
        ("*/5 * * * *", "UTC"),
        ("30 2 * * *", "Europe/Berlin"),
        ("0 9 * * mon-fri", "America/New_York"),
        ("0 0 13 * 5", "Asia/Kolkata"),
        ("0 0 29 2 *", "UTC"),
        ("@every 90s", "UTC"),
    ] {
        let s = parse(expr, tz);
        let n = 10_000;
        let began = std::time::Instant::now();
        let mut at = start;
        for _ in 0..n {
            // Leap days run out of croner's range (the year 5000) within 10,000 ticks.
            at = s.next_after(at).unwrap_or(start);
        }
        let walk = began.elapsed() / n;
        let began = std::time::Instant::now();
        for i in 0..n {
            std::hint::black_box(s.next_after(start + i64::from(i) * 37));
        }
        let fresh = began.elapsed() / n;
        println!(
            "{expr:>18} {tz:>16}: {walk:?} per call walking ticks, {fresh:?} from scattered instants"
        );
    }
}

/// Whether minute `t` is a tick, read straight off the rule in the module docs: a matching
/// wall-clock time that happens once, or on its first pass, or (wildcard jobs) on its second;
/// or, for a fixed-time job, the first instant after a gap that swallowed a matching time.
fn is_tick_by_definition(s: &Schedule, t: i64) -> bool {
    let Kind::Calendar(calendar) = &s.kind else {
        unreachable!("calendar schedules only")
    };
    let matches = |wall: &NaiveDateTime| calendar.cron.is_time_matching(wall).unwrap();
    let wall = wall_at(&s.tz, t).unwrap();
    let on_this_pass = match s.tz.local(&wall).unwrap() {
        Local::Single(_) => true,
        Local::Repeated(first, _) => first == t || calendar.wildcard,
        Local::Skipped { .. } => unreachable!("an instant's own wall-clock time exists"),
    };
    if matches(&wall) && on_this_pass {
        return true;
    }
    // A gap ends at `t` if the wall clock jumped forward between the previous minute and `t`.
    let before = wall_at(&s.tz, t - 60).unwrap();
    let mut skipped = before + TimeDelta::minutes(1);
    while !calendar.wildcard && skipped < wall {
        if matches(&skipped) {
            return true;
        }
        skipped += TimeDelta::minutes(1);
    }
    false
}

#[test]
fn agrees_with_a_minute_by_minute_reading_of_the_rule() {
    let windows = [
        ("Europe/Berlin", "2026-03-28T12:00:00Z"),
        ("Europe/Berlin", "2026-10-24T12:00:00Z"),
        ("America/New_York", "2026-03-07T18:00:00Z"),
        ("America/New_York", "2026-10-31T18:00:00Z"),
        ("Australia/Lord_Howe", "2026-04-04T00:00:00Z"),
        ("Australia/Lord_Howe", "2026-10-03T00:00:00Z"),
        ("Pacific/Auckland", "2026-09-26T00:00:00Z"),
        // Clocks change at midnight, so the gap and the overlap straddle a date.
        ("America/Santiago", "2026-04-04T12:00:00Z"),
        ("America/Santiago", "2026-09-05T12:00:00Z"),
        // Samoa skipped 2011-12-30 whole when it crossed the date line.
        ("Pacific/Apia", "2011-12-29T00:00:00Z"),
    ];
    let exprs = [
        "30 2 * * *",
        "0,30 2 * * *",
        "30 1-3 * * *",
        "*/15 2 * * *",
        "*/30 * * * *",
        "0 * * * *",
        "0 0 * * *",
        "30 0 * * *",
        "45 23 * * *",
        "59 1 * * *",
        "0 0,12 * * 0",
        "0 2 30 12 *",
    ];
    const WINDOW_SECS: i64 = 2 * 86_400;
    for (tz, start) in windows {
        for expr in exprs {
            let s = parse(expr, tz);
            let start = ts(start);
            let want: Vec<String> = (start / 60 + 1..=(start + WINDOW_SECS) / 60)
                .map(|m| m * 60)
                .filter(|&t| is_tick_by_definition(&s, t))
                .map(show)
                .collect();
            let mut got = Vec::new();
            let mut at = start;
            while let Some(t) = s.next_after(at).filter(|&t| t <= start + WINDOW_SECS) {
                got.push(show(t));
                at = t;
            }
            assert_eq!(got, want, "{expr:?} in {tz} from {}", show(start));
        }
    }
}

#[test]
fn accepts_crontab_forms_and_harmless_croner_extensions() {
    for expr in [
        "0 0 ? * 1",
        "0 0 15W * *",
        "0 0 LW * *",
        "0 0 * * sat-sun",
        "0 0 * * 0-7",
        "0 0 * * 5l",
        "0\t0  *   *\t* ",
        "*/90 * * * *",
        "0 0 1 Jan-Mar,oct *",
        "@DAILY",
        "@every 1h 30m",
    ] {
        let s = parse(expr, "UTC");
        assert!(s.check_fires(0).is_ok(), "{expr:?}");
    }
}

#[test]
fn zone_names_match_without_regard_to_case_and_are_stored_as_the_database_spells_them() {
    let s = parse("CRON_TZ=europe/berlin 0 * * * *", "UTC");
    assert_eq!(s.tz_name(), "Europe/Berlin");
    assert!(s.in_zone("Europe/Berlin"));
    assert!(s.in_zone("EUROPE/BERLIN"));
    assert!(!s.in_zone("UTC"));
    assert!(!s.in_zone("Mars/Base"));
    // A link keeps its own name: it is the zone the user named.
    let link = parse("0 * * * *", "US/Eastern");
    assert_eq!(link.tz_name(), "US/Eastern");
    assert!(!link.in_zone("America/New_York"));
}
