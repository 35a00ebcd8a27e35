//! Parsing of one JSON line from a QMP or QGA peer into a typed message.
//!
//! Total over all inputs: any byte string yields either a [`Message`] or a [`ParseError`],
//! never a panic. Unknown fields are ignored.

use serde_json::{Map, Value};

/// Errors parsing one line.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The line is not valid JSON.
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The line is JSON but not an object.
    #[error("line is not a JSON object")]
    NotObject,
    /// An object that is none of greeting, return, error or event.
    #[error("unrecognised message with keys {keys:?}")]
    Unrecognised {
        /// The keys of the object (at most 8), for diagnostics.
        keys: Vec<String>,
    },
}

/// An error reply from the peer (`{"error": {"class", "desc"}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// The QAPI error class, e.g. `GenericError` or `CommandNotFound`.
    pub class: String,
    /// The human-readable description.
    pub desc: String,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

/// One message from a peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The QMP greeting (`{"QMP": …}`).
    Greeting(Value),
    /// A successful reply, with the request's `id` if the peer echoed one.
    Return {
        /// The echoed `id`, if any.
        id: Option<Value>,
        /// The `return` member.
        value: Value,
    },
    /// An error reply, with the request's `id` if the peer echoed one.
    Error {
        /// The echoed `id`, if any.
        id: Option<Value>,
        /// The error.
        error: RemoteError,
    },
    /// An asynchronous event.
    Event {
        /// The event name, e.g. `SHUTDOWN`.
        name: String,
        /// The `data` member (`Null` if absent).
        data: Value,
    },
}

/// Parses one line (without its terminator). Bytes that are not valid UTF-8 or JSON are errors.
pub fn parse_line(line: &[u8]) -> Result<Message, ParseError> {
    let value: Value = serde_json::from_slice(line)?;
    let Value::Object(mut obj) = value else {
        return Err(ParseError::NotObject);
    };
    if let Some(g) = obj.remove("QMP") {
        return Ok(Message::Greeting(g));
    }
    if let Some(Value::String(name)) = obj.get("event").cloned() {
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event { name, data });
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        return Ok(Message::Error {
            id,
            error: remote_error(err),
        });
    }
    Err(unrecognised(&obj))
}

/// A peer's error text as it may reach logs, events and the API: see
/// [`crate::guest_text::guest_text`] (capped, no control or format characters).
fn printable(text: &str) -> String {
    crate::guest_text::guest_text(text)
}

fn remote_error(err: Value) -> RemoteError {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => printable(s),
        Some(other) => printable(&other.to_string()),
        None => String::new(),
    };
    RemoteError {
        class: text(err.get("class")),
        desc: text(err.get("desc")),
    }
}

fn unrecognised(obj: &Map<String, Value>) -> ParseError {
    ParseError::Unrecognised {
        keys: obj
            .keys()
            .take(8)
            .map(|k| crate::guest_text::guest_text(&k.chars().take(64).collect::<String>()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_each_kind() {
        assert!(matches!(
            parse_line(br#"{"QMP":{"version":{}}}"#).unwrap(),
            Message::Greeting(_)
        ));
        assert_eq!(
            parse_line(br#"{"return":{},"id":7}"#).unwrap(),
            Message::Return {
                id: Some(json!(7)),
                value: json!({})
            }
        );
        assert_eq!(
            parse_line(br#"{"error":{"class":"GenericError","desc":"no"}}"#).unwrap(),
            Message::Error {
                id: None,
                error: RemoteError {
                    class: "GenericError".into(),
                    desc: "no".into()
                }
            }
        );
        assert_eq!(
            parse_line(br#"{"event":"STOP","timestamp":{"seconds":1,"microseconds":2}}"#).unwrap(),
            Message::Event {
                name: "STOP".into(),
                data: Value::Null
            }
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_line(b"\xff\xfe"), Err(ParseError::Json(_))));
        assert!(matches!(parse_line(b"[1,2]"), Err(ParseError::NotObject)));
        assert!(matches!(
            parse_line(br#"{"foo":1}"#),
            Err(ParseError::Unrecognised { .. })
        ));
        assert!(matches!(
            parse_line(b"{\"return\":"),
            Err(ParseError::Json(_))
        ));
    }
}
