//! Human durations in configuration files: an integer with a unit, `ms`, `s`, `m`, `h` or
//! `d`, optionally several in a row (`"1m30s"`). Formatting gives the shortest exact form,
//! and parsing what [`format`] prints gives the same duration back.

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The string is empty.
    #[error("empty duration")]
    Empty,
    /// A number is missing or malformed.
    #[error("expected a number followed by a unit (ms, s, m, h, d), e.g. \"2s\" or \"500ms\"")]
    Malformed,
    /// The unit is not one of ms, s, m, h, d.
    #[error("unknown unit `{0}` (use ms, s, m, h or d)")]
    UnknownUnit(String),
    /// The value does not fit.
    #[error("duration too large")]
    Overflow,
}

/// Parses `"2s"`, `"500ms"`, `"1m30s"`, `"0s"`.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed);
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Overflow)?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(DurationError::Malformed),
            other => return Err(DurationError::UnknownUnit(other.to_string())),
        };
        total = value
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or(DurationError::Overflow)?;
    }
    Ok(Duration::from_millis(total))
}

/// A duration in whole milliseconds, saturating at `u64::MAX` (the unit of every timestamp,
/// window and timeout vmha stores or sends).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Formats with the largest units that keep the value exact (`"1m30s"`, `"500ms"`, `"0s"`).
/// Sub-millisecond parts are dropped.
pub fn format(d: Duration) -> String {
    let mut ms = millis(d);
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, factor) in [
        ("d", 86_400_000u64),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= factor {
            out.push_str(&format!("{}{unit}", ms / factor));
            ms %= factor;
        }
    }
    out
}

/// `serde` adapter: serializes a [`Duration`] as its [`format`] string.
pub mod serde_str {
    use std::time::Duration;

    /// Serializes `d` as a human duration string.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("5"), Err(DurationError::Malformed));
        assert_eq!(parse("s"), Err(DurationError::Malformed));
        assert_eq!(parse("3 weeks"), Err(DurationError::Malformed));
        assert_eq!(parse("2x"), Err(DurationError::UnknownUnit("x".into())));
        assert_eq!(parse("99999999999999999999s"), Err(DurationError::Overflow));
    }

    #[test]
    fn format_round_trips() {
        for ms in [
            0u64, 1, 999, 1000, 1500, 60_000, 90_000, 3_600_000, 86_400_001,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse(&format(d)).unwrap(), d, "{ms}");
        }
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
    }
}
