//! Checking a value against its allowed range (the ranges themselves are in
//! [`crate::defaults`]). The configuration parser and the run-time changes of the admin
//! commands both check through here, so a value is refused the same way, with the same words,
//! wherever it comes from.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::duration::format;

/// A value outside the allowed range of the setting `key`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` = {value} is out of range (allowed: {allowed})")]
pub struct OutOfRange {
    /// The setting, as written in the configuration file (`priority`, `restart_window`).
    pub key: String,
    /// The refused value, as it would be written in the file (`4000000000`, `"8d"`).
    pub value: String,
    /// The allowed range (`1 to 1000000`, `1s to 7d`).
    pub allowed: String,
}

/// `value` when `range` contains it.
pub fn check_number<T: PartialOrd + Display>(
    key: &str,
    value: T,
    range: &RangeInclusive<T>,
) -> Result<T, OutOfRange> {
    if range.contains(&value) {
        return Ok(value);
    }
    Err(OutOfRange {
        key: key.to_string(),
        value: value.to_string(),
        allowed: format!("{} to {}", range.start(), range.end()),
    })
}

/// `value` when `range` contains it; durations are shown as in the file (`"8d"`).
pub fn check_duration(
    key: &str,
    value: Duration,
    range: &RangeInclusive<Duration>,
) -> Result<Duration, OutOfRange> {
    if range.contains(&value) {
        return Ok(value);
    }
    Err(OutOfRange {
        key: key.to_string(),
        value: format!("\"{}\"", format(value)),
        allowed: format!("{} to {}", format(*range.start()), format(*range.end())),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::defaults as d;

    #[test]
    fn names_the_value_and_the_allowed_range() {
        assert_eq!(
            check_number("priority", 1_000_000, &d::APP_PRIORITY_RANGE),
            Ok(1_000_000)
        );
        let e = check_number("priority", 4_000_000_000u32, &d::APP_PRIORITY_RANGE).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`priority` = 4000000000 is out of range (allowed: 1 to 1000000)"
        );
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(
            check_duration("restart_window", week, &d::APP_RESTART_WINDOW_RANGE),
            Ok(week)
        );
        let e = check_duration(
            "restart_window",
            week + Duration::from_millis(1),
            &d::APP_RESTART_WINDOW_RANGE,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`restart_window` = \"7d1ms\" is out of range (allowed: 1s to 7d)"
        );
    }
}
