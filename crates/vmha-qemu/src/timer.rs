//! Sleeps that wake the daemon once, at their deadline.
//!
//! tokio's timer wheel files a sleep of 64 ms or more in a coarse level and wakes the runtime
//! twice for it: at the start of the coarse slot that holds the deadline (to move the sleep to
//! a finer level), then at the deadline. On a quiet host each wake is a context switch, and
//! vmhad's periodic work (a probe a second, a watcher poll every 200 ms) is small enough that
//! the extra wake costs about as much as the work it wakes for. These sleeps use a Linux
//! `timerfd` instead, armed for the whole duration: the kernel wakes the runtime once.
//!
//! Shorter sleeps, and any sleep when no timer can be made (out of file descriptors), fall
//! back to tokio's: a sleep always ends, at worst with the extra wake.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Sleeps shorter than this (64 ms) stay in the finest level of tokio's wheel (one wake already).
const WHEEL_SLOT: Duration = Duration::from_millis(64);

/// A `timerfd` the runtime can wait on.
#[derive(Debug)]
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A reusable one-shot timer (one `timerfd`, made at its first sleep of 64 ms or
/// more), for a loop that sleeps again and again (a task's main `select!`, a poll loop). Each
/// [`Timer::sleep`] re-arms it, so a sleep dropped before its end (cancelled by another branch)
/// leaves nothing behind: the next sleep's arming discards the old deadline and any expiry not
/// yet seen.
#[derive(Debug, Default)]
pub struct Timer {
    state: State,
}

#[derive(Debug, Default)]
enum State {
    /// No long sleep yet.
    #[default]
    Unmade,
    Made(AsyncFd<Fd>),
    /// No `timerfd` could be made or registered: sleeps are tokio's.
    Unavailable,
}

impl Timer {
    /// A timer; it takes no descriptor until its first long sleep.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `timerfd`, made on first use (within the runtime).
    fn fd(&mut self) -> Option<&AsyncFd<Fd>> {
        if matches!(self.state, State::Unmade) {
            let made = TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )
            .map_err(io::Error::from)
            .and_then(|t| {
                // SAFETY: `Fd` owns the timerfd, which stays open until the `AsyncFd` drops
                // it, and `as_raw_fd` always returns that descriptor.
                #[allow(unsafe_code)]
                unsafe { AsyncFd::register_with_interest(Fd(t), Interest::READABLE) }
                    .map_err(io::Error::from)
            });
            self.state = match made {
                Ok(fd) => State::Made(fd),
                Err(e) => {
                    tracing::debug!("no timerfd ({e}): sleeps use tokio's timer");
                    State::Unavailable
                }
            };
        }
        match &self.state {
            State::Made(fd) => Some(fd),
            State::Unmade | State::Unavailable => None,
        }
    }

    /// Sleeps for `duration`: returns once it has passed, never earlier. Cancel-safe.
    pub async fn sleep(&mut self, duration: Duration) {
        if duration < WHEEL_SLOT {
            return tokio::time::sleep(duration).await;
        }
        let Some(fd) = self.fd() else {
            return tokio::time::sleep(duration).await;
        };
        let armed = fd.get_ref().0.set(
            Expiration::OneShot(TimeSpec::from_duration(duration)),
            TimerSetTimeFlags::empty(),
        );
        if let Err(e) = armed {
            tracing::debug!("timerfd_settime failed ({e}): this sleep uses tokio's timer");
            return tokio::time::sleep(duration).await;
        }
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return tokio::time::sleep(duration).await;
            };
            // A readiness left from a cancelled sleep reads nothing (`EAGAIN`): wait on.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(Ok(())) => return,
                Ok(Err(e)) => {
                    tracing::debug!("timerfd read failed ({e}): this sleep uses tokio's timer");
                    return tokio::time::sleep(duration).await;
                }
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn a_sleep_lasts_its_duration() {
        let mut timer = Timer::new();
        for ms in [0, 5, 64, 150] {
            let d = Duration::from_millis(ms);
            let t = Instant::now();
            timer.sleep(d).await;
            assert!(t.elapsed() >= d, "{ms} ms took {:?}", t.elapsed());
        }
    }

    #[tokio::test]
    async fn a_timer_reused_after_a_cancelled_sleep_waits_its_full_time() {
        let mut timer = Timer::new();
        assert!(timer.fd().is_some(), "this machine can make a timerfd");
        // Cancelled before its end: the timer stays armed and fires unseen.
        let cancelled = tokio::time::timeout(Duration::from_millis(10), timer.sleep(WHEEL_SLOT));
        assert!(cancelled.await.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        // That expiry must not end the next sleep early.
        let d = Duration::from_millis(120);
        let t = Instant::now();
        timer.sleep(d).await;
        assert!(t.elapsed() >= d, "ended after {:?}", t.elapsed());
    }

    /// This thread's voluntary context switches (each time it blocked, in `epoll_wait` here).
    fn blocked() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_long_sleep_blocks_the_runtime_once() {
        // tokio's wheel would wake this runtime twice in 63 of 64 cases (a coarse slot, then
        // the deadline); the timerfd wakes it once.
        let mut timer = Timer::new();
        timer.sleep(WHEEL_SLOT).await;
        let before = blocked();
        timer.sleep(Duration::from_millis(300)).await;
        assert_eq!(blocked() - before, 1);
    }
}
