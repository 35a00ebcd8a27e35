//! An API connection's byte stream as hyper sees it. hyper answers a request it cannot parse
//! (malformed request line or header, bad framing, URI or head too long) itself, with a bare
//! 400, 414 or 431 and no body; this stream rewrites that answer into a JSON [`ErrorReply`]
//! like every other refusal. vmhad's own responses always carry a body, so a `4xx` head with
//! `content-length: 0` can only be hyper's. A client that stops reading its response fails the
//! connection after [`WRITE_STALL_TIMEOUT`] without progress.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;
use vmha_api::{ErrorBody, ErrorCode, ErrorReply};

use crate::api_conn::WRITE_STALL_TIMEOUT;

/// A complete raw HTTP/1.1 response carrying `reply`, after which the connection closes.
pub fn raw_response(status: u16, reason: &str, reply: &ErrorReply) -> Vec<u8> {
    let body = serde_json::to_string(reply).unwrap_or_default();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The JSON answer replacing hyper's bare one in `written`, if `written` is one.
fn rewrite_bare_error(written: &[u8]) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(written).ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?;
    let (status, reason, code, error) = match status {
        "400" => (
            400,
            "Bad Request",
            ErrorCode::MalformedHttp,
            "not a valid HTTP/1 request (request line, a header or the framing is malformed)",
        ),
        "414" => (
            414,
            "URI Too Long",
            ErrorCode::UriTooLong,
            "the request's URI is too long",
        ),
        "431" => (
            431,
            "Request Header Fields Too Large",
            ErrorCode::HeadersTooLarge,
            "the request's head is too large",
        ),
        _ => return None,
    };
    let bodiless = head.ends_with("\r\n\r\n")
        && head
            .to_ascii_lowercase()
            .contains("\r\ncontent-length: 0\r\n");
    if !bodiless {
        return None;
    }
    let reply = ErrorReply {
        code,
        body: ErrorBody {
            error: format!("{error}; nothing was changed"),
            command_error: None,
        },
    };
    Some(raw_response(status, reason, &reply))
}

/// A connection's stream (Unix socket, TCP or TLS over TCP), rewriting hyper's bare error
/// answers (see the module).
pub struct Io<S> {
    inner: TokioIo<S>,
    /// A rewritten answer still to be written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
    /// Since when writing is blocked (the client does not read), while it is.
    stall: Option<Pin<Box<Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    /// Wraps an accepted connection.
    pub fn new(stream: S) -> Io<S> {
        Io {
            inner: TokioIo::new(stream),
            pending: Vec::new(),
            written: 0,
            stall: None,
        }
    }

    /// The connection, once hyper is done with it.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.pending.get(self.written..).filter(|r| !r.is_empty()) {
            let n = ready!(Self::write_inner(
                &mut self.inner,
                &mut self.stall,
                cx,
                rest
            ))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes to the connection; fails once writing has been blocked for
    /// [`WRITE_STALL_TIMEOUT`].
    fn write_inner(
        inner: &mut TokioIo<S>,
        stall: &mut Option<Pin<Box<Sleep>>>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(inner).poll_write(cx, buf) {
            Poll::Pending => {
                let timer =
                    stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL_TIMEOUT)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading its response",
                    )));
                }
                Poll::Pending
            }
            done => {
                *stall = None;
                done
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Read for Io<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Write for Io<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(answer) = rewrite_bare_error(buf) {
            this.pending = answer;
            return Poll::Ready(Ok(buf.len()));
        }
        Self::write_inner(&mut this.inner, &mut this.stall, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn body(answer: &[u8]) -> serde_json::Value {
        let text = std::str::from_utf8(answer).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn hypers_bare_answers_become_json_refusals() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                     content-length: 0\r\ndate: Mon, 30 Nov 2026 15:32:08 GMT\r\n\r\n";
        let answer = rewrite_bare_error(bare).unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 431 "));
        assert_eq!(body(&answer)["code"], "headers-too-large");
        let bare = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            body(&rewrite_bare_error(bare).unwrap())["code"],
            "malformed-http"
        );
    }

    #[test]
    fn vmhads_own_answers_and_body_bytes_pass_unchanged() {
        let reply = ErrorReply {
            code: ErrorCode::InvalidValue,
            body: ErrorBody {
                error: "limit must be at most 10000".into(),
                command_error: None,
            },
        };
        let own = raw_response(400, "Bad Request", &reply);
        let end = own.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(rewrite_bare_error(&own[..end]), None);
        assert_eq!(rewrite_bare_error(&own), None);
        assert_eq!(
            rewrite_bare_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        assert_eq!(rewrite_bare_error(b"{\"seq\": 1}\n"), None);
    }
}
