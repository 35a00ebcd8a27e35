//! When vmhad asks the guest agent whether a VM's watcher has ended (`guest-exec-status`): the
//! schedule that `VmSlot::watch` executes, as a pure type. Time comes in as `now`; nothing here
//! sleeps, polls or counts.
//!
//! - Every `period` until the watcher rings the doorbell "armed". Then every
//!   [`BELL_SAFETY_POLL`] (or `period`, if longer) while the doorbell stays armed: the poll is
//!   only a safety net for a lost ring.
//! - An "ended" ring asks for a poll at once. The ring can beat the agent to the watcher's exit
//!   (by a lot on a busy guest), so while the watcher still runs the poll comes again after each
//!   of [`RING_RETRIES`] (none longer than `period`), then [`RING_FOLLOW`] times every
//!   `period`; then the ring is forgotten.
//! - Rings while an "ended" ring is followed change nothing. A guest ringing without pause
//!   therefore gets about one poll per `period`, as a guest without a doorbell does.

use std::time::Duration;

use tokio::time::Instant;
use vmha_qemu::doorbell::Ring;

/// How often a watcher that can ring the doorbell is still polled (a ring lost, e.g. a guest
/// that let the port to another writer): its end is noticed within this, at worst.
pub const BELL_SAFETY_POLL: Duration = Duration::from_secs(2);

/// When a watcher's status is asked again after an "ended" ring found it still running, each
/// after the one before; then every watch period until the ring is forgotten.
pub const RING_RETRIES: [Duration; 5] = [
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
    Duration::from_millis(160),
];

/// Polls every watch period after [`RING_RETRIES`] before an "ended" ring is forgotten.
pub const RING_FOLLOW: usize = 10;

/// The poll schedule of one watcher (see the module documentation).
#[derive(Debug, Clone)]
pub struct WatchPolls {
    period: Duration,
    next: Instant,
    /// Since an "ended" ring: the polls made after it that found the watcher running (`None`:
    /// no ring is followed).
    since_end: Option<usize>,
}

impl WatchPolls {
    /// The schedule of a watcher started at `now`, polled every `period` to begin with.
    pub fn new(now: Instant, period: Duration) -> Self {
        WatchPolls {
            period,
            next: now + period,
            since_end: None,
        }
    }

    /// When the next poll is due (the watch loop polls when this has passed, or when
    /// [`WatchPolls::ring`] says so).
    pub fn next_poll(&self) -> Instant {
        self.next
    }

    /// A ring came at `now`; true when the watcher is to be polled at once (the first "ended"
    /// ring since the last one was forgotten). An "armed" ring defers the next poll to the
    /// safety period; any ring while an "ended" one is followed changes nothing.
    pub fn ring(&mut self, now: Instant, ring: Ring) -> bool {
        if self.since_end.is_some() {
            return false;
        }
        match ring {
            Ring::Armed => {
                self.next = self.next.max(now + self.safety_period());
                false
            }
            Ring::Ended => {
                self.since_end = Some(0);
                true
            }
        }
    }

    /// A poll at `now` found the watcher still running; `armed` is whether the doorbell is
    /// armed (open, and rung "armed" by this watcher). Schedules the next poll.
    pub fn still_running(&mut self, now: Instant, armed: bool) {
        let follow = self
            .since_end
            .filter(|&n| n < RING_RETRIES.len() + RING_FOLLOW);
        self.since_end = follow.map(|n| n + 1);
        let after = match follow {
            Some(n) => RING_RETRIES
                .get(n)
                .copied()
                .unwrap_or(self.period)
                .min(self.period),
            None if armed => self.safety_period(),
            None => self.period,
        };
        self.next = now + after;
    }

    /// The poll period of an armed watcher.
    fn safety_period(&self) -> Duration {
        self.period.max(BELL_SAFETY_POLL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The gaps between the polls of `polls` when every poll from `now` finds the watcher
    /// running, `n` times, with the doorbell `armed` or not.
    fn gaps(polls: &mut WatchPolls, mut now: Instant, n: usize, armed: bool) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                polls.still_running(now, armed);
                let gap = polls.next_poll() - now;
                now = polls.next_poll();
                gap
            })
            .collect()
    }

    #[test]
    fn without_a_doorbell_the_watcher_is_polled_every_period() {
        let t0 = Instant::now();
        let mut polls = WatchPolls::new(t0, 200 * MS);
        assert_eq!(polls.next_poll(), t0 + 200 * MS);
        assert_eq!(gaps(&mut polls, t0 + 200 * MS, 4, false), [200 * MS; 4]);
    }

    #[test]
    fn an_armed_watcher_is_polled_only_as_a_safety_net() {
        let t0 = Instant::now();
        let mut polls = WatchPolls::new(t0, 200 * MS);
        assert!(!polls.ring(t0 + 50 * MS, Ring::Armed));
        assert_eq!(polls.next_poll(), t0 + 50 * MS + BELL_SAFETY_POLL);
        let first = polls.next_poll();
        assert_eq!(gaps(&mut polls, first, 3, true), [BELL_SAFETY_POLL; 3]);
        // A doorbell that closed is no longer armed: back to the period.
        assert_eq!(gaps(&mut polls, first, 1, false), [200 * MS]);
        // A period longer than the safety net is kept.
        let mut slow = WatchPolls::new(t0, 5 * BELL_SAFETY_POLL);
        assert!(!slow.ring(t0, Ring::Armed));
        assert_eq!(slow.next_poll(), t0 + 5 * BELL_SAFETY_POLL);
    }

    #[test]
    fn an_ended_ring_polls_at_once_then_retries_backing_off_then_forgets_the_ring() {
        let t0 = Instant::now();
        let mut polls = WatchPolls::new(t0, 200 * MS);
        assert!(!polls.ring(t0, Ring::Armed));
        assert!(polls.ring(t0 + MS, Ring::Ended));
        let mut want: Vec<Duration> = RING_RETRIES.to_vec();
        want.extend([200 * MS; RING_FOLLOW]);
        want.extend([BELL_SAFETY_POLL; 2]);
        let n = want.len();
        assert_eq!(gaps(&mut polls, t0 + MS, n, true), want);
        // Forgotten: the next "ended" ring polls at once again.
        assert!(polls.ring(t0 + 60_000 * MS, Ring::Ended));
    }

    #[test]
    fn no_retry_waits_longer_than_the_period() {
        let t0 = Instant::now();
        let mut polls = WatchPolls::new(t0, 50 * MS);
        assert!(polls.ring(t0, Ring::Ended));
        assert_eq!(
            gaps(&mut polls, t0, 6, false),
            [10 * MS, 20 * MS, 40 * MS, 50 * MS, 50 * MS, 50 * MS]
        );
    }

    #[test]
    fn rings_while_an_end_is_followed_change_nothing() {
        let t0 = Instant::now();
        let mut polls = WatchPolls::new(t0, 200 * MS);
        assert!(polls.ring(t0, Ring::Ended));
        polls.still_running(t0, true);
        let next = polls.next_poll();
        for ring in [Ring::Ended, Ring::Armed, Ring::Ended] {
            assert!(!polls.ring(t0 + MS, ring));
            assert_eq!(polls.next_poll(), next);
        }
    }

    /// A guest that rings "ended" every millisecond for a minute, its watcher never ending:
    /// the polls are those of one followed ring per follow-up, about one per period.
    #[test]
    fn a_flooding_guest_gets_about_one_poll_per_period() {
        let period = 200 * MS;
        let t0 = Instant::now();
        let mut polls = WatchPolls::new(t0, period);
        let mut count = 0u32;
        for ms in 0..60_000u32 {
            let now = t0 + ms * MS;
            if polls.ring(now, Ring::Ended) || polls.next_poll() <= now {
                count += 1;
                polls.still_running(now, true);
            }
        }
        // Each follow-up: the poll at once, the retries and RING_FOLLOW polls a period apart,
        // about 2.3 s; then a ring starts the next one at once.
        let per_follow = 1 + RING_RETRIES.len() + RING_FOLLOW;
        let follow_time = RING_RETRIES.iter().sum::<Duration>() + period * RING_FOLLOW as u32;
        let follows = (60_000 * MS).as_secs_f64() / follow_time.as_secs_f64();
        let bound = ((follows.ceil() as usize) * per_follow) as u32;
        assert!(count <= bound, "{count} polls in a minute (bound {bound})");
        assert!(
            count >= 60_000 / 200,
            "{count} polls: fewer than one per period"
        );
    }
}
