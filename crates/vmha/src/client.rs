//! A small HTTP/1.0 client for vmhad's API: on its local Unix socket, or on a remote vmhad's
//! TCP listener over `http://` or `https://` ([`crate::transport`]) with a bearer token.
//! HTTP/1.0 keeps it simple: one request per connection, and the body (streamed or not) ends
//! when vmhad closes it.
//!
//! Whatever listens on the socket is not trusted to behave:
//! - every call is bounded by the client's timeout ([`DEFAULT_TIMEOUT`], `--timeout`,
//!   `$VMHA_TIMEOUT`): connecting (also to a socket whose listen queue is full), sending, and
//!   reading the whole answer — except the body of a followed stream ([`Client::follow`]),
//!   which may stay quiet for as long as nothing happens (its connection and answer head are
//!   still bounded);
//! - answers are size-limited, and one that is not HTTP with a JSON body is reported as "not
//!   vmhad's API socket";
//! - before anything is sent, the process serving the socket must run as root or as the user
//!   running vmha (`SO_PEERCRED`): a socket planted by another user gets no request;
//! - a remote vmhad over `https://` must show a certificate signed by `--ca-cert` (or the
//!   system's CAs) for its host name; the token is sent only in the `Authorization` header and
//!   never appears in a message.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use serde_json::Value;
use vmha_api::ErrorBody;
use vmha_model::duration::format as human;

use crate::transport::{RemoteUrl, Target, Token, Transport, server_name};

/// How long a call may take when neither `--timeout` nor `$VMHA_TIMEOUT` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between connection attempts while the socket's listen queue is full.
const CONNECT_RETRY: Duration = Duration::from_millis(10);
/// Most bytes of an answer's status line and headers.
const HEAD_LIMIT: u64 = 64 * 1024;
/// Most bytes of an answer's body (a status of thousands of VMs fits many times).
const BODY_LIMIT: u64 = 256 * 1024 * 1024;
/// Most bytes of one line of an NDJSON stream.
const LINE_LIMIT: u64 = 16 * 1024 * 1024;
/// Most characters of a stranger's answer quoted in an error.
const QUOTED: usize = 80;

/// Why an API call failed. Each message names the socket and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the socket path.
    #[error(
        "vmhad is not running (no socket at {}); start it (`systemctl start vmhad`), or point \
         --socket, --state-dir or $VMHA_SOCKET at its socket",
        path.display()
    )]
    NoSocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A socket file nobody listens on: vmhad died without removing it.
    #[error(
        "vmhad is not running (stale socket {}: nothing listens on it); start vmhad",
        path.display()
    )]
    Stale {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket (or its directory) is closed to this user.
    #[error(
        "permission denied on {}: vmhad's API socket is open to root (and its configured group) \
         only; run vmha as root",
        path.display()
    )]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to {at}: {cause}")]
    Connect {
        /// The socket path or URL.
        at: Target,
        /// Why (in the message, not a separate source).
        cause: io::Error,
    },
    /// No (complete) answer within the timeout.
    #[error(
        "no answer from {at} within {} (vmhad busy or not vmhad?); wait longer with --timeout \
         DUR or $VMHA_TIMEOUT",
        human(*after)
    )]
    Timeout {
        /// The socket path or URL.
        at: Target,
        /// The timeout.
        after: Duration,
    },
    /// What answered is not vmhad's API.
    #[error("{at} is not vmhad's API{} ({detail})", if matches!(at, Target::Socket(_)) { " socket" } else { "" })]
    NotVmhad {
        /// The socket path or URL.
        at: Target,
        /// What was wrong with the answer.
        detail: String,
    },
    /// The TLS handshake failed (e.g. a certificate not signed by the given CA, or for another
    /// name).
    #[error(
        "TLS with {url} failed: {detail}; check --ca-cert (or $VMHA_CA_CERT) and the host name in the URL"
    )]
    Tls {
        /// The URL.
        url: RemoteUrl,
        /// rustls's reason.
        detail: String,
    },
    /// vmhad wants a (valid) token: HTTP 401.
    #[error(
        "{at} refused the request: no valid token ({message}); pass an API token with --token or $VMHA_TOKEN"
    )]
    Unauthorized {
        /// The URL.
        at: Target,
        /// vmhad's message.
        message: String,
    },
    /// The token is valid but may not do this (a read-only token on an admin command): 403.
    #[error(
        "{at} refused the request: this token may not do that ({message}); admin commands need an admin token"
    )]
    Forbidden {
        /// The URL.
        at: Target,
        /// vmhad's message.
        message: String,
    },
    /// The socket is served by a process of another user: nothing was sent.
    #[error("{}", untrusted_text(path, *uid, *me))]
    Untrusted {
        /// The socket path.
        path: PathBuf,
        /// The serving process's user.
        uid: u32,
        /// This process's effective user.
        me: u32,
    },
    /// The connection broke.
    #[error("connection to vmhad at {at} broke: {cause}")]
    Io {
        /// The socket path or URL.
        at: Target,
        /// Why (in the message, not a separate source).
        cause: io::Error,
    },
    /// vmhad refused the request; the message is its error text.
    #[error("{}", .body.error)]
    Api {
        /// HTTP status.
        status: u16,
        /// vmhad's answer: its message, and the refused command's error as data if any.
        body: ErrorBody,
    },
}

fn untrusted_text(path: &Path, uid: u32, me: u32) -> String {
    let nor_you = if me == 0 {
        String::new()
    } else {
        format!(" nor you (uid {me})")
    };
    format!(
        "{} is served by uid {uid}, not root{nor_you} — refusing to send commands to it",
        path.display()
    )
}

/// Whether a socket served by user `peer` may get the requests of user `me`: only from root
/// (vmhad's normal user) or from oneself.
pub fn peer_trusted(peer: u32, me: u32) -> bool {
    peer == 0 || peer == me
}

/// A client of one vmhad.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    timeout: Duration,
    token: Option<Token>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A connection whose every read and write ends by `deadline` (none: reads wait forever).
struct Conn {
    stream: Transport,
    deadline: Option<Instant>,
}

impl Conn {
    /// Time left before the deadline (`None`: no deadline); `TimedOut` once it passed.
    fn left(&self) -> io::Result<Option<Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Ok(Some(left)),
                _ => Err(io::ErrorKind::TimedOut.into()),
            },
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_timeouts(left)?;
        self.stream.read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_timeouts(left)?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// An answer whose status line and headers were read.
struct Answer {
    status: u16,
    reader: BufReader<Conn>,
}

impl Client {
    /// A client for the API socket at `socket`, with [`DEFAULT_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            target: Target::Socket(socket.into()),
            timeout: DEFAULT_TIMEOUT,
            token: None,
            tls: None,
        }
    }

    /// A client for the remote vmhad at `url`, with [`DEFAULT_TIMEOUT`], sending `token` when
    /// given; `tls` is required for an `https://` URL (else connecting fails).
    pub fn remote(
        url: RemoteUrl,
        token: Option<Token>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        Client {
            target: Target::Url(url),
            timeout: DEFAULT_TIMEOUT,
            token,
            tls,
        }
    }

    /// The same client with another timeout for each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The time each call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn at(&self) -> Target {
        self.target.clone()
    }

    /// An I/O failure on the connection: a timeout, a failed TLS handshake, or a broken
    /// connection.
    fn io(&self, e: io::Error) -> ClientError {
        if let Target::Url(url) = &self.target
            && let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return ClientError::Tls {
                url: url.clone(),
                detail: tls.to_string(),
            };
        }
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ClientError::Timeout {
                at: self.at(),
                after: self.timeout,
            },
            _ => ClientError::Io {
                at: self.at(),
                cause: e,
            },
        }
    }

    fn not_vmhad(&self, detail: impl Into<String>) -> ClientError {
        ClientError::NotVmhad {
            at: self.at(),
            detail: detail.into(),
        }
    }

    /// Connects by `deadline` to the socket or the URL.
    fn connect(&self, deadline: Instant) -> Result<Transport, ClientError> {
        match &self.target {
            Target::Socket(path) => {
                let stream = self.connect_socket(path, deadline)?;
                self.check_peer(path, &stream)?;
                Ok(Transport::Unix(stream))
            }
            Target::Url(url) => self.connect_url(url, deadline),
        }
    }

    /// Connects to a remote vmhad by `deadline`: TCP, then TLS for `https://` (its handshake
    /// runs with the first bytes sent, bounded like them).
    fn connect_url(&self, url: &RemoteUrl, deadline: Instant) -> Result<Transport, ClientError> {
        let connect_error = |cause: io::Error| ClientError::Connect {
            at: self.at(),
            cause,
        };
        let addrs: Vec<_> = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(connect_error)?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
        let mut tcp = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.io(io::ErrorKind::TimedOut.into()));
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(self.io(e)),
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or_else(|| connect_error(last))?;
        let _ = tcp.set_nodelay(true);
        if !url.https {
            return Ok(Transport::Tcp(tcp));
        }
        let tls_error = |detail: String| ClientError::Tls {
            url: url.clone(),
            detail,
        };
        let config = self
            .tls
            .clone()
            .ok_or_else(|| tls_error("no TLS configuration".to_string()))?;
        let name = server_name(url).map_err(tls_error)?;
        let conn =
            rustls::ClientConnection::new(config, name).map_err(|e| tls_error(e.to_string()))?;
        Ok(Transport::Tls(Box::new(rustls::StreamOwned::new(
            conn, tcp,
        ))))
    }

    /// Connects to the local socket by `deadline`; a full listen queue is waited out until
    /// then.
    fn connect_socket(&self, path: &Path, deadline: Instant) -> Result<UnixStream, ClientError> {
        let addr = UnixAddr::new(path).map_err(|e| self.connect_error(path, e))?;
        loop {
            let fd = socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| self.connect_error(path, e))?;
            match socket::connect(fd.as_raw_fd(), &addr) {
                Ok(()) => {
                    let stream = UnixStream::from(fd);
                    stream.set_nonblocking(false).map_err(|e| self.io(e))?;
                    return Ok(stream);
                }
                // The listen queue is full (vmhad busy, or flooded): try again until the
                // deadline.
                Err(Errno::EAGAIN) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.io(io::ErrorKind::TimedOut.into()));
                    }
                    std::thread::sleep(left.min(CONNECT_RETRY));
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.connect_error(path, e)),
            }
        }
    }

    fn connect_error(&self, socket: &Path, e: Errno) -> ClientError {
        let path = socket.to_path_buf();
        match e {
            Errno::ENOENT | Errno::ENOTDIR => ClientError::NoSocket { path },
            Errno::ECONNREFUSED => match std::fs::metadata(socket) {
                Ok(m) if !m.file_type().is_socket() => self.not_vmhad("it is not a socket"),
                _ => ClientError::Stale { path },
            },
            Errno::EACCES | Errno::EPERM => ClientError::PermissionDenied { path },
            e => ClientError::Connect {
                at: self.at(),
                cause: e.into(),
            },
        }
    }

    /// Refuses a socket served by another user than root or this one.
    fn check_peer(&self, path: &Path, stream: &UnixStream) -> Result<(), ClientError> {
        let cred =
            socket::getsockopt(stream, sockopt::PeerCredentials).map_err(|e| self.io(e.into()))?;
        let me = nix::unistd::geteuid().as_raw();
        if peer_trusted(cred.uid(), me) {
            Ok(())
        } else {
            Err(ClientError::Untrusted {
                path: path.to_path_buf(),
                uid: cred.uid(),
                me,
            })
        }
    }

    /// Sends a request and reads the answer's status line and headers, all by the deadline.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let stream = self.connect(deadline)?;
        let mut conn = Conn {
            stream,
            deadline: Some(deadline),
        };
        let body = body.map(Value::to_string).unwrap_or_default();
        let (prefix, host) = match &self.target {
            Target::Socket(_) => ("", "vmhad".to_string()),
            Target::Url(url) => (url.prefix.as_str(), url.authority()),
        };
        let mut head = format!("{method} {prefix}{path} HTTP/1.0\r\nHost: {host}\r\n");
        if let Some(token) = &self.token {
            head.push_str(&token.header());
        }
        if method == "POST" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes())
            .and_then(|()| conn.write_all(body.as_bytes()))
            .map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(conn);
        let mut budget = HEAD_LIMIT;
        let status_line = self.head_line(&mut reader, &mut budget)?;
        if status_line.is_empty() {
            return Err(self.not_vmhad("it closed the connection without an answer"));
        }
        let text = String::from_utf8_lossy(&status_line);
        let status = text
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.split_whitespace().nth(1))
            .filter(|code| code.len() == 3)
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| self.not_vmhad(format!("it answered `{}`", quote(&text))))?;
        loop {
            let line = self.head_line(&mut reader, &mut budget)?;
            if line.is_empty() || line == b"\r\n" || line == b"\n" {
                break;
            }
        }
        Ok(Answer { status, reader })
    }

    /// One line of the answer's head, counted against the head's `budget`.
    fn head_line(
        &self,
        reader: &mut BufReader<Conn>,
        budget: &mut u64,
    ) -> Result<Vec<u8>, ClientError> {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take(*budget)
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io(e))?;
        *budget = budget.saturating_sub(n as u64);
        if !line.is_empty() && !line.ends_with(b"\n") && *budget == 0 {
            return Err(self.not_vmhad(format!(
                "its answer's head is longer than {} KiB",
                HEAD_LIMIT / 1024
            )));
        }
        Ok(line)
    }

    /// Reads the whole body (by the deadline) and parses it as JSON; a refusal is an error.
    fn finish(&self, answer: Answer) -> Result<Value, ClientError> {
        let Answer { status, reader } = answer;
        let mut raw = Vec::new();
        reader
            .take(BODY_LIMIT + 1)
            .read_to_end(&mut raw)
            .map_err(|e| self.io(e))?;
        if raw.len() as u64 > BODY_LIMIT {
            return Err(self.not_vmhad(format!(
                "its answer is larger than {} MiB",
                BODY_LIMIT >> 20
            )));
        }
        let text = String::from_utf8_lossy(&raw);
        let value: Value = serde_json::from_str(&text).map_err(|_| {
            self.not_vmhad(format!(
                "it answered HTTP {status} with `{}`, not JSON",
                quote(&text)
            ))
        })?;
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let body = error_body(value, &text);
        Err(match status {
            401 => ClientError::Unauthorized {
                at: self.at(),
                message: body.error,
            },
            403 => ClientError::Forbidden {
                at: self.at(),
                message: body.error,
            },
            _ => ClientError::Api { status, body },
        })
    }

    /// `GET path`, parsed as JSON.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let answer = self.request("GET", path, None)?;
        self.finish(answer)
    }

    /// `GET path` as text (e.g. `/metrics`); a refusal is an error as for [`Client::get`].
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let answer = self.request("GET", path, None)?;
        if !(200..300).contains(&answer.status) {
            return self.finish(answer).map(|_| String::new());
        }
        let mut raw = Vec::new();
        answer
            .reader
            .take(BODY_LIMIT + 1)
            .read_to_end(&mut raw)
            .map_err(|e| self.io(e))?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// `POST path` with a JSON body, parsed as JSON.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let answer = self.request("POST", path, Some(body))?;
        self.finish(answer)
    }

    /// `GET path` of a finite NDJSON stream (the whole stream by the deadline): calls `each`
    /// per JSON line until it returns false or the stream ends.
    pub fn stream(&self, path: &str, each: impl FnMut(Value) -> bool) -> Result<(), ClientError> {
        let answer = self.request("GET", path, None)?;
        self.lines(answer, each)
    }

    /// `GET path` of an NDJSON stream that stays open (`follow=true`): connecting and the
    /// answer's head are bounded by the timeout, then lines are awaited as long as it takes.
    /// Calls `each` per JSON line until it returns false or vmhad closes the stream.
    pub fn follow(&self, path: &str, each: impl FnMut(Value) -> bool) -> Result<(), ClientError> {
        let mut answer = self.request("GET", path, None)?;
        if (200..300).contains(&answer.status) {
            answer.reader.get_mut().deadline = None;
        }
        self.lines(answer, each)
    }

    fn lines(
        &self,
        answer: Answer,
        mut each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        if !(200..300).contains(&answer.status) {
            return self.finish(answer).map(drop);
        }
        let mut reader = answer.reader;
        loop {
            let mut line = Vec::new();
            let n = reader
                .by_ref()
                .take(LINE_LIMIT)
                .read_until(b'\n', &mut line)
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Ok(());
            }
            if n as u64 == LINE_LIMIT && !line.ends_with(b"\n") {
                return Err(self.not_vmhad(format!(
                    "a line of its stream is longer than {} MiB",
                    LINE_LIMIT >> 20
                )));
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&text).map_err(|_| {
                self.not_vmhad(format!("its stream sent `{}`, not JSON", quote(&text)))
            })?;
            if !each(value) {
                return Ok(());
            }
        }
    }
}

/// The start of a stranger's answer, on one line, for an error message.
fn quote(text: &str) -> String {
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(QUOTED) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
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

    #[test]
    fn only_root_or_oneself_may_serve_the_socket() {
        assert!(peer_trusted(0, 0));
        assert!(peer_trusted(0, 1000));
        assert!(peer_trusted(1000, 1000));
        assert!(!peer_trusted(1000, 0));
        assert!(!peer_trusted(1001, 1000));
        let text = untrusted_text(Path::new("/run/vmhad.sock"), 1000, 0);
        assert_eq!(
            text,
            "/run/vmhad.sock is served by uid 1000, not root — refusing to send commands to it"
        );
        assert!(
            untrusted_text(Path::new("/s"), 1001, 1000).contains("not root nor you (uid 1000)")
        );
    }

    #[test]
    fn connect_failures_say_what_to_do() {
        let c = Client::new("/run/vmha/vmhad.sock");
        let text = |e: Errno| {
            c.connect_error(Path::new("/run/vmha/vmhad.sock"), e)
                .to_string()
        };
        assert_eq!(
            text(Errno::EACCES),
            "permission denied on /run/vmha/vmhad.sock: vmhad's API socket is open to root (and \
             its configured group) only; run vmha as root"
        );
        assert_eq!(text(Errno::EPERM), text(Errno::EACCES));
        assert!(text(Errno::ENOTDIR).starts_with("vmhad is not running (no socket at "));
        assert_eq!(
            text(Errno::ENAMETOOLONG),
            "cannot connect to /run/vmha/vmhad.sock: File name too long (os error 36)"
        );
    }

    #[test]
    fn strangers_answers_are_quoted_short_and_on_one_line() {
        assert_eq!(quote("  SSH-2.0-OpenSSH\r\n"), "SSH-2.0-OpenSSH");
        let long = "x".repeat(500);
        assert_eq!(quote(&long), format!("{}…", "x".repeat(QUOTED)));
        assert_eq!(quote("a\u{1b}[2Jb"), "a [2Jb");
    }
}
