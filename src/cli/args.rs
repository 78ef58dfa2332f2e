//! Value parsers shared by the commands: durations, names, booleans from the environment.

use std::time::Duration;

use crate::keys::Name;

/// A duration such as `5s`, `500ms`, `1m30s`; a bare number means seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "{s:?} is negative: a duration is like 5s, 500ms or 1m30s"
        ));
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{s:?} is not a duration like 5s, 500ms or 1m30s ({e})"))
}

/// A strictly positive duration.
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(d)
}

/// An office / semaphore / job name (cli.md's name rules).
pub fn name(s: &str) -> Result<Name, String> {
    Name::parse(s).map_err(|e| format!("bad name {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(duration("abc").is_err());
        assert!(duration("-1s").is_err());
        assert!(positive_duration("0s").is_err());
        assert!(positive_duration("0").is_err());
    }
}
