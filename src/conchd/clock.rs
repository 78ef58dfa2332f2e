//! conchd's wall clock. Ticks are wall-clock instants (primitives.md): conchd reads the
//! system clock, never derives ticks from it, and decides only "is tick T due" and "is it
//! past its starting deadline" with it.
//!
//! Debug builds (the test suite's binary) accept `CONCH_TEST_CLOCK_OFFSET` (`+2s`, `-30s`,
//! `250ms`) so a test can run nodes whose clocks disagree; release builds ignore it.

#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock {
    offset_ms: i64,
}

impl WallClock {
    pub fn system() -> WallClock {
        WallClock {
            offset_ms: test_offset_ms(),
        }
    }

    /// Milliseconds since the Unix epoch, as this node believes.
    pub fn now_ms(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        real + self.offset_ms
    }

    /// The injected offset (0 outside tests).
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms
    }
}

#[cfg(debug_assertions)]
fn test_offset_ms() -> i64 {
    let Some(v) = std::env::var_os("CONCH_TEST_CLOCK_OFFSET") else {
        return 0;
    };
    let v = v.to_string_lossy();
    let (neg, body) = match v.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, v.trim_start_matches('+')),
    };
    let ms = humantime::parse_duration(body)
        .map(|d: std::time::Duration| d.as_millis() as i64)
        .unwrap_or(0);
    if ms != 0 {
        tracing::warn!(
            offset_ms = if neg { -ms } else { ms },
            "TEST SWITCH: conchd's clock is offset"
        );
    }
    if neg { -ms } else { ms }
}

#[cfg(not(debug_assertions))]
fn test_offset_ms() -> i64 {
    0
}
