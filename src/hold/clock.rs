//! `CLOCK_BOOTTIME`: the clock the hold deadline lives on.
//!
//! etcd's lease keeps running while this machine is suspended, so the deadline must too:
//! `std::time::Instant` and tokio's timers use `CLOCK_MONOTONIC`, which stops during suspend
//! and would let a child outlive its lease after a resume. [`BootInstant`] reads
//! `CLOCK_BOOTTIME`; [`BootTimer`] is a timerfd on the same clock, awaited through tokio.

#![forbid(unsafe_code)]

use std::io;
use std::ops::{Add, Sub};
use std::task::Poll;
use std::time::Duration;

use rustix::fd::AsFd;
use rustix::time::{
    ClockId, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec,
};
use tokio::io::Interest;

use crate::child::sys::Watched;

/// A point on `CLOCK_BOOTTIME`, as time since boot. Pure value: arithmetic only; reading the
/// clock is [`BootInstant::now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> BootInstant {
        let ts = rustix::time::clock_gettime(ClockId::Boottime);
        BootInstant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// For tests and maths: the instant `d` after boot.
    pub const fn from_boot(d: Duration) -> BootInstant {
        BootInstant(d)
    }

    pub const fn since_boot(self) -> Duration {
        self.0
    }

    /// `self − earlier`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// `self − d`, never before boot.
    pub fn saturating_sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d))
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0 + d)
    }
}

impl Sub<BootInstant> for BootInstant {
    type Output = Duration;
    /// Saturating: an instant already past gives zero.
    fn sub(self, earlier: BootInstant) -> Duration {
        self.saturating_since(earlier)
    }
}

/// A one-shot timer on `CLOCK_BOOTTIME` (a non-blocking timerfd in tokio's reactor).
///
/// `set` re-arms it for an absolute instant; `wait` resolves once that instant has passed.
/// A disarmed timer never fires.
#[derive(Debug)]
pub struct BootTimer {
    fd: Watched,
    armed: Option<BootInstant>,
}

impl BootTimer {
    /// Needs a tokio runtime with IO enabled.
    pub fn new() -> io::Result<BootTimer> {
        let fd = rustix::time::timerfd_create(
            TimerfdClockId::Boottime,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        Ok(BootTimer {
            fd: Watched::new(fd, Interest::READABLE)?,
            armed: None,
        })
    }

    /// Arm for `at` (absolute). An instant in the past fires at once.
    pub fn set(&mut self, at: BootInstant) -> io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        // An all-zero it_value would disarm the timer: the earliest real instant is 1 ns.
        let at_d = at.0.max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: at_d.as_secs() as _,
                tv_nsec: at_d.subsec_nanos() as _,
            },
        };
        rustix::time::timerfd_settime(self.fd.as_fd(), TimerfdTimerFlags::ABSTIME, &spec)?;
        self.armed = Some(at);
        Ok(())
    }

    /// The instant the timer is armed for, if any.
    pub fn armed(&self) -> Option<BootInstant> {
        self.armed
    }

    /// Resolve once the armed instant has passed; pends forever when disarmed.
    /// Cancel-safe: dropping the future loses nothing (the expiry stays readable).
    ///
    /// The clock is read on *every* poll, not only when the timerfd reports readiness: after
    /// the process was stopped or starved, another branch of a `biased` `select!` may wake
    /// the task before the reactor has seen the timerfd's event, and the deadline must still
    /// win that poll.
    pub async fn wait(&mut self) {
        let Some(at) = self.armed else {
            return std::future::pending().await;
        };
        let fd = &self.fd;
        std::future::poll_fn(|cx| {
            loop {
                if BootInstant::now() >= at {
                    return Poll::Ready(true);
                }
                match fd.poll_read_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(mut guard)) => {
                        let mut buf = [0u8; 8];
                        if rustix::io::read(fd.as_fd(), &mut buf).is_err() {
                            guard.clear_ready();
                        }
                    }
                    // The reactor is gone: fall back to checking the clock on tokio's timer.
                    Poll::Ready(Err(_)) => return Poll::Ready(false),
                }
            }
        })
        .await;
        while BootInstant::now() < at {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Sleep until `at` on `CLOCK_BOOTTIME`.
pub async fn sleep_until(at: BootInstant) -> io::Result<()> {
    let mut t = BootTimer::new()?;
    t.set(at)?;
    t.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_moves_forward() {
        let a = BootInstant::now();
        let b = BootInstant::now();
        assert!(b >= a);
        assert_eq!(a - b, Duration::ZERO, "subtraction saturates");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn timer_fires_after_its_instant_and_can_be_rearmed() {
        let start = BootInstant::now();
        let mut t = BootTimer::new().unwrap();
        t.set(start + Duration::from_secs(3600)).unwrap();
        t.set(start + Duration::from_millis(30)).unwrap();
        t.wait().await;
        assert!(BootInstant::now() - start >= Duration::from_millis(30));
        // A past instant fires at once.
        t.set(start).unwrap();
        tokio::time::timeout(Duration::from_secs(1), t.wait())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn disarmed_timer_never_fires() {
        let mut t = BootTimer::new().unwrap();
        let r = tokio::time::timeout(Duration::from_millis(20), t.wait()).await;
        assert!(r.is_err());
    }
}

#[cfg(test)]
mod stopped {
    use super::*;

    /// Set in the process that [`stopped_process`] runs in.
    const STOP_ME: &str = "CONCH_TEST_STOP_ME";

    /// The timer is waiting in a `biased` `select!` when the process is SIGSTOPped past the
    /// armed instant; on SIGCONT another branch (tokio's timer) wakes the task before the
    /// reactor has seen the timerfd's event, and the deadline must still win that poll.
    /// Stopping the whole test binary would stall every other test, so this re-runs the test
    /// binary for `stopped_process` alone.
    #[test]
    fn the_deadline_wins_the_first_poll_after_a_stop() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "hold::clock::stopped::stopped_process",
                "--ignored",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(STOP_ME, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    #[ignore = "stops its own process: run by the_deadline_wins_the_first_poll_after_a_stop"]
    async fn stopped_process() {
        if std::env::var_os(STOP_ME).is_none() {
            return;
        }
        let pid = std::process::id();
        let mut stopper = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sleep 0.1; kill -STOP {pid}; sleep 0.5; kill -CONT {pid}"
            ))
            .spawn()
            .unwrap();
        let start = BootInstant::now();
        let mut t = BootTimer::new().unwrap();
        t.set(start + Duration::from_millis(300)).unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                biased;
                _ = t.wait() => break,
                _ = tick.tick() => assert!(
                    BootInstant::now() - start < Duration::from_millis(300),
                    "a later branch won over a passed deadline"
                ),
            }
        }
        stopper.wait().unwrap();
        assert!(
            BootInstant::now() - start >= Duration::from_millis(500),
            "was stopped"
        );
    }
}
