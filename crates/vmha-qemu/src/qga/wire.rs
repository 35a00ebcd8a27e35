//! The QGA reply, parsed straight into typed structs.
//!
//! Nothing a guest sends becomes a `serde_json::Value`: members that are not wanted are skipped
//! by `serde`'s `IgnoredAny` (no allocation), nesting is limited by `serde_json`'s recursion
//! limit (128), and the line itself by the per-command cap of the caller, so the memory a reply
//! costs is a small multiple of its line. Guest strings that may reach a human are
//! [`GuestText`]: capped and without control or format characters as they are read.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::guest_text::{guest_bytes, guest_text};
use crate::reply::RemoteError;

/// A guest string as it may be shown: see [`crate::guest_text::guest_text`]. Any other JSON
/// value is accepted and shown as its kind (`(number)`, `(object)`, …), never expanded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestText(pub String);

impl<'de> Deserialize<'de> for GuestText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GuestText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GuestText, E> {
                Ok(GuestText(guest_text(s)))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<GuestText, E> {
                Ok(GuestText(b.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<GuestText, E> {
                Ok(GuestText(n.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<GuestText, E> {
                Ok(GuestText(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<GuestText, E> {
                Ok(GuestText(n.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<GuestText, E> {
                Ok(GuestText("null".into()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<GuestText, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(GuestText("(array)".into()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<GuestText, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(GuestText("(object)".into()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    class: GuestText,
    #[serde(default)]
    desc: GuestText,
}

/// One reply line: `{"return": T, "id": n}` or `{"error": {…}, "id": n}`.
#[derive(Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
struct Wire<T> {
    #[serde(rename = "return")]
    ret: Option<T>,
    error: Option<WireError>,
    // A number, or the reply is malformed (a string id could carry anything).
    id: Option<serde_json::Number>,
}

/// What a reply line says, once parsed.
#[derive(Debug)]
pub enum Reply<T> {
    /// A success with this request's id.
    Return(T),
    /// An error with this request's id.
    Error(RemoteError),
    /// A reply that answers another request, or none (no id): `got` is the id, shown safely.
    NotOurs {
        /// The id received (`none` if absent).
        got: String,
    },
}

/// Parses one reply line for the request `expected` straight into `T` (no `serde_json::Value`,
/// nesting limited to 128): only a reply carrying `expected` as its id answers it. `Err` holds
/// a safe, capped description (no control or format characters).
pub fn parse_reply<T: DeserializeOwned>(line: &[u8], expected: u64) -> Result<Reply<T>, String> {
    let wire: Wire<T> = serde_json::from_slice(line).map_err(|e| guest_text(&e.to_string()))?;
    match &wire.id {
        Some(n) if n.as_u64() == Some(expected) => {}
        Some(n) => {
            return Ok(Reply::NotOurs {
                got: guest_text(&n.to_string()),
            });
        }
        None => return Ok(Reply::NotOurs { got: "none".into() }),
    }
    match (wire.ret, wire.error) {
        (Some(value), None) => Ok(Reply::Return(value)),
        (None, Some(e)) => Ok(Reply::Error(RemoteError {
            class: e.class.0,
            desc: e.desc.0,
        })),
        (Some(_), Some(_)) => Err("both return and error".into()),
        (None, None) => Err("neither return nor error".into()),
    }
}

/// The longest line that can be the reply to a `guest-sync-delimited` (`{"return": <id>}` with
/// some spacing); longer lines are discarded during a resync without being looked at.
pub(crate) const SYNC_LINE_MAX: usize = 96;

/// Recognises the reply to one `guest-sync-delimited` among the lines a resync discards, at
/// little cost per line: lines longer than [`SYNC_LINE_MAX`] or without the id's digits are not
/// parsed at all.
pub(crate) struct SyncReply {
    id: u64,
    digits: String,
}

impl SyncReply {
    /// The matcher for the sync request with `id`.
    pub(crate) fn new(id: u64) -> Self {
        SyncReply {
            id,
            digits: id.to_string(),
        }
    }

    /// True if `line` is the reply to the sync request.
    pub(crate) fn is(&self, line: &[u8]) -> bool {
        #[derive(Deserialize)]
        struct Sync {
            #[serde(rename = "return")]
            ret: u64,
        }
        // Cheap test first: a stray line rarely holds the id's digits.
        line.len() <= SYNC_LINE_MAX
            && line
                .windows(self.digits.len())
                .any(|w| w == self.digits.as_bytes())
            && serde_json::from_slice::<Sync>(line).is_ok_and(|s| s.ret == self.id)
    }
}

/// A short, safe description of a line that was not what was expected (for debug logs).
pub(crate) fn describe(line: &[u8]) -> String {
    guest_bytes(&line[..line.len().min(64)])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_our_id_answers() {
        let ok: Reply<IgnoredAny> = parse_reply(br#"{"return": {}, "id": 7}"#, 7).unwrap();
        assert!(matches!(ok, Reply::Return(_)));
        let other: Reply<IgnoredAny> = parse_reply(br#"{"return": {}, "id": 6}"#, 7).unwrap();
        assert!(matches!(other, Reply::NotOurs { got } if got == "6"));
        let none: Reply<IgnoredAny> = parse_reply(br#"{"return": {}}"#, 7).unwrap();
        assert!(matches!(none, Reply::NotOurs { got } if got == "none"));
        let err = parse_reply::<IgnoredAny>(br#"{"return": {}, "id": "7\u202e"}"#, 7).unwrap_err();
        assert!(!err.chars().any(crate::guest_text::is_unsafe), "{err}");
    }

    #[test]
    fn error_text_is_safe_whatever_its_type() {
        let line = br#"{"error": {"class": "A\u202eB", "desc": [1, [2, {"x": 3}]]}, "id": 1}"#;
        let Reply::Error(e) = parse_reply::<IgnoredAny>(line, 1).unwrap() else {
            panic!("not an error");
        };
        assert_eq!(e.class, "A B");
        assert_eq!(e.desc, "(array)");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut line = br#"{"id": 1, "return": "#.to_vec();
        line.extend(std::iter::repeat_n(b'[', 10_000));
        assert!(parse_reply::<IgnoredAny>(&line, 1).is_err());
    }

    #[test]
    fn sync_reply_recognised_only_short_and_exact() {
        let sync = SyncReply::new(12345);
        assert!(sync.is(br#"{"return": 12345}"#));
        assert!(!sync.is(br#"{"return": 12346}"#));
        let mut long = br#"{"return": 12345"#.to_vec();
        long.extend(std::iter::repeat_n(b' ', 200));
        long.push(b'}');
        assert!(!sync.is(&long));
    }
}
