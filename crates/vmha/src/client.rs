//! A small HTTP/1.0 client for vmhad's local API on its Unix socket. HTTP/1.0 keeps it simple:
//! one request per connection, and the body (streamed or not) ends when vmhad closes it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde_json::Value;
use vmha_api::ErrorBody;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// vmhad is not listening on the socket.
    #[error("cannot reach vmhad at {path} (is vmhad running? see --socket / --state-dir)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("talking to vmhad")]
    Io(#[from] std::io::Error),
    /// vmhad answered something that is not HTTP + JSON.
    #[error("unexpected answer from vmhad: {0}")]
    Protocol(String),
    /// vmhad refused the request; the message is its error text.
    #[error("{}", .body.error)]
    Api {
        /// HTTP status.
        status: u16,
        /// vmhad's answer: its message, and the refused command's error as data if any.
        body: ErrorBody,
    },
}

/// A client of one vmhad.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the API socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    /// Sends a request; returns the status and a reader positioned at the body.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, BufReader<UnixStream>), ClientError> {
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut head = format!("{method} {path} HTTP/1.0\r\nHost: vmhad\r\n");
        if method == "POST" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| ClientError::Protocol(status_line.trim().to_string()))?;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        Ok((status, reader))
    }

    fn finish(status: u16, mut reader: BufReader<UnixStream>) -> Result<Value, ClientError> {
        let mut body = String::new();
        reader.read_to_string(&mut body)?;
        let value: Value = serde_json::from_str(&body)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", body.trim())))?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            Err(ClientError::Api {
                status,
                body: error_body(value, &body),
            })
        }
    }

    /// `GET path`, parsed as JSON.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let (status, reader) = self.request("GET", path, None)?;
        Self::finish(status, reader)
    }

    /// `POST path` with a JSON body, parsed as JSON.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let (status, reader) = self.request("POST", path, Some(body))?;
        Self::finish(status, reader)
    }

    /// `GET path` of an NDJSON stream: calls `each` per JSON line until it returns false or
    /// the stream ends.
    pub fn stream(
        &self,
        path: &str,
        mut each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let (status, reader) = self.request("GET", path, None)?;
        if !(200..300).contains(&status) {
            return Self::finish(status, reader).map(drop);
        }
        for line in reader.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&line)
                .map_err(|e| ClientError::Protocol(format!("{e}: {line}")))?;
            if !each(value) {
                break;
            }
        }
        Ok(())
    }
}

/// vmhad's refusal as an [`ErrorBody`]. A body that does not parse whole (e.g. a newer vmhad's
/// `command_error` this CLI does not know) keeps its `error` text, else the raw body.
fn error_body(value: Value, raw: &str) -> ErrorBody {
    let error = match value.get("error").and_then(Value::as_str) {
        Some(e) => e.to_string(),
        None => raw.trim().to_string(),
    };
    serde_json::from_value(value).unwrap_or(ErrorBody {
        error,
        command_error: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vmha_engine::CommandError;

    #[test]
    fn refusals_keep_their_command_error() {
        let raw =
            r#"{"error": "no cluster controller", "command_error": {"error": "no-controller"}}"#;
        let body = error_body(serde_json::from_str(raw).unwrap(), raw);
        assert_eq!(body.error, "no cluster controller");
        assert_eq!(body.command_error, Some(CommandError::NoController));
        let raw = r#"{"error": "store down", "command_error": {"error": "store-unavailable", "detail": "etcd: timeout"}}"#;
        let body = error_body(serde_json::from_str(raw).unwrap(), raw);
        assert_eq!(
            body.command_error,
            Some(CommandError::StoreUnavailable("etcd: timeout".into()))
        );
    }

    #[test]
    fn unknown_refusals_keep_their_message() {
        let raw = r#"{"error": "too hot", "command_error": {"error": "overheated"}}"#;
        let body = error_body(serde_json::from_str(raw).unwrap(), raw);
        assert_eq!(body.error, "too hot");
        assert_eq!(body.command_error, None);
        let raw = r#"["not", "an", "error body"]"#;
        let body = error_body(serde_json::from_str(raw).unwrap(), raw);
        assert_eq!(body.error, raw);
    }
}
