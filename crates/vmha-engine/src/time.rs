//! Engine time: milliseconds passed in by the driver. The engine never reads a clock.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time in milliseconds. The daemon passes wall-clock milliseconds since the Unix
/// epoch, so persisted budget windows survive restarts; tests and the simulator start at 0.
/// Arithmetic saturates: no input can make it overflow or panic.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The zero time.
    pub const ZERO: Timestamp = Timestamp(0);

    /// `self + d`, saturating at `u64::MAX` milliseconds.
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(millis(d)))
    }

    /// `self + ms` milliseconds, saturating.
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, 0 when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

pub(crate) use vmha_model::duration::millis;

/// Human form of a millisecond span for reasons ("10m", "1m30s", "500ms").
pub(crate) fn human(ms: u64) -> String {
    vmha_model::duration::format(Duration::from_millis(ms))
}
