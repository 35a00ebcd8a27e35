//! Restart budgets: at most `limit` restarts within any sliding `window`.

use serde::{Deserialize, Serialize};

use crate::time::{Timestamp, human};

/// A sliding-window restart budget. Keeps the times of the restarts still inside the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Budget {
    pub limit: u32,
    pub window_ms: u64,
    pub times: Vec<Timestamp>,
}

impl Budget {
    pub fn new(limit: u32, window_ms: u64) -> Self {
        Budget {
            limit,
            window_ms,
            times: Vec::new(),
        }
    }

    /// Forgets restarts that left the window at `now`.
    fn prune(&mut self, now: Timestamp) {
        let window = self.window_ms;
        self.times.retain(|t| now.since(*t) < window);
    }

    /// Restarts inside the window at `now`.
    pub fn used(&self, now: Timestamp) -> u32 {
        let n = self
            .times
            .iter()
            .filter(|t| now.since(**t) < self.window_ms)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// If one more restart fits at `now`, records it and returns true.
    pub fn try_take(&mut self, now: Timestamp) -> bool {
        self.prune(now);
        if self.used(now) < self.limit {
            self.times.push(now);
            true
        } else {
            false
        }
    }

    /// Forgets every restart (stable_after reached, or an admin clear).
    pub fn reset(&mut self) {
        self.times.clear();
    }

    /// `2/3 in 10m` at `now`.
    pub fn describe(&self, now: Timestamp) -> String {
        format!(
            "{}/{} in {}",
            self.used(now),
            self.limit,
            human(self.window_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window() {
        let mut b = Budget::new(2, 1000);
        assert!(b.try_take(Timestamp(0)));
        assert!(b.try_take(Timestamp(500)));
        assert!(!b.try_take(Timestamp(999)));
        assert_eq!(b.describe(Timestamp(999)), "2/2 in 1s");
        assert!(b.try_take(Timestamp(1000)));
        assert!(!b.try_take(Timestamp(1499)));
        b.reset();
        assert!(b.try_take(Timestamp(1499)));
        let mut zero = Budget::new(0, 1000);
        assert!(!zero.try_take(Timestamp(0)));
    }
}
