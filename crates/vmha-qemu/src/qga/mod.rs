//! QGA client: the guest channel of one VM (the QEMU guest agent over its virtio-serial socket).
//!
//! The connection is opened lazily and kept; every (re)connect and every call after a timeout or
//! a protocol error first resynchronises (byte `0xFF`, then `guest-sync-delimited` with a random
//! id, discarding everything until the matching reply). Lines are framed as raw bytes with a
//! length cap. Every call is bounded by a timeout, so a silent or hostile agent costs the caller
//! at most that timeout and never affects another VM's client. Calls on one client are
//! serialised (one request in flight on the channel at a time), and cancel-safe: a call dropped
//! half-way leaves the channel marked out of step, so the next call resynchronises first.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;
use tokio::time::Instant;

use vmha_model::ExitStatus;

use crate::framing::{FrameError, Framer};
use crate::reply::{Message, RemoteError, parse_line};

/// Errors of the QGA client. All are local to one VM's guest channel.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// Connecting to the socket failed (QEMU gone, or no such socket).
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No (complete) reply in time: no agent running, a hung agent, or a line that never ends.
    #[error("{command} timed out after {timeout:?}")]
    Timeout {
        /// The command that timed out (`guest-sync-delimited` during resync).
        command: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The socket closed or broke; the next call reconnects.
    #[error("guest channel closed")]
    Disconnected,
    /// The agent answered with an error.
    #[error("{command} failed: {error}")]
    Remote {
        /// The command.
        command: String,
        /// The error the agent returned.
        error: RemoteError,
    },
    /// The agent sent something that is not a valid reply (bad JSON, wrong shape).
    #[error("malformed reply to {command}: {detail}")]
    Malformed {
        /// The command.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// The reply carried another request's id.
    #[error("reply to {command} has id {got}, expected {expected}")]
    WrongId {
        /// The command.
        command: String,
        /// The id sent.
        expected: u64,
        /// The id received (as JSON text, truncated).
        got: String,
    },
    /// A reply line exceeded the cap.
    #[error("reply line longer than {max} bytes")]
    LineTooLong {
        /// The cap.
        max: usize,
    },
    /// The agent has `guest-exec`/`guest-exec-status` disabled or lacks them.
    #[error("guest-exec is blocked in this guest agent: {detail}")]
    ExecBlocked {
        /// How it was detected.
        detail: String,
    },
    /// The guest process had not exited by the deadline. It keeps running in the guest: the
    /// protocol has no way to kill it.
    #[error("guest process {pid} still running at the deadline")]
    ExecDeadline {
        /// The guest pid.
        pid: i64,
    },
    /// Writing to the socket failed.
    #[error("writing to the guest channel: {0}")]
    Write(std::io::Error),
}

/// Tunables of a guest channel.
#[derive(Debug, Clone)]
pub struct QgaConfig {
    /// Bound on connecting to the socket.
    pub connect_timeout: Duration,
    /// Bound on each request/reply round trip, resync included.
    pub call_timeout: Duration,
    /// Longest accepted reply line (exec output arrives base64 in one line).
    pub max_line: usize,
    /// First `guest-exec-status` poll interval; doubles up to `poll_max`.
    pub poll_initial: Duration,
    /// Longest `guest-exec-status` poll interval.
    pub poll_max: Duration,
}

impl Default for QgaConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
            max_line: 4 << 20,
            poll_initial: Duration::from_millis(2),
            poll_max: Duration::from_millis(50),
        }
    }
}

/// One command listed by `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CommandInfo {
    /// The command name.
    pub name: String,
    /// Whether the agent allows it.
    pub enabled: bool,
}

/// The answer of `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestInfo {
    /// The agent's version string.
    pub version: String,
    /// The commands it knows.
    #[serde(rename = "supported_commands")]
    pub commands: Vec<CommandInfo>,
}

impl GuestInfo {
    /// Ok if both `guest-exec` and `guest-exec-status` are present and enabled, else
    /// [`QgaError::ExecBlocked`] naming the first missing or disabled one.
    pub fn check_exec(&self) -> Result<(), QgaError> {
        for needed in ["guest-exec", "guest-exec-status"] {
            match self.commands.iter().find(|c| c.name == needed) {
                Some(c) if c.enabled => {}
                Some(_) => {
                    return Err(QgaError::ExecBlocked {
                        detail: format!("{needed} is disabled"),
                    });
                }
                None => {
                    return Err(QgaError::ExecBlocked {
                        detail: format!("{needed} is not supported"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// A guest command to run with [`QgaClient::exec`].
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is the path of the program.
    pub argv: Vec<String>,
    /// Extra environment, `KEY=value` entries.
    pub env: Vec<String>,
    /// Bytes fed to the program's stdin, if any.
    pub input: Option<Vec<u8>>,
    /// Overall time allowed for start, run and result.
    pub deadline: Duration,
    /// At most this many bytes of stdout and of stderr are kept.
    pub output_cap: usize,
}

impl ExecRequest {
    /// A request for `argv` with no env or input, a 10 s deadline and a 64 KiB output cap.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            input: None,
            deadline: Duration::from_secs(10),
            output_cap: 64 << 10,
        }
    }
}

/// The result of a finished guest process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Its stdout, at most `output_cap` bytes.
    pub stdout: Vec<u8>,
    /// Its stderr, at most `output_cap` bytes.
    pub stderr: Vec<u8>,
    /// True if stdout was cut (by the cap or by the agent's own limit).
    pub stdout_truncated: bool,
    /// True if stderr was cut (by the cap or by the agent's own limit).
    pub stderr_truncated: bool,
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    framer: Framer,
    synced: bool,
}

/// The guest channel of one VM. Methods take `&self`; calls are serialised internally.
#[derive(Debug)]
pub struct QgaClient {
    path: PathBuf,
    config: QgaConfig,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

/// A random positive id for `guest-sync-delimited`, from the std hasher's random keys.
pub(crate) fn random_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    // Keep it exactly representable as a JSON number everywhere (< 2^53).
    h.finish() & ((1 << 53) - 1)
}

impl QgaClient {
    /// A client for the agent socket at `path`. Does not connect until the first call.
    pub fn new(path: impl Into<PathBuf>, config: QgaConfig) -> Self {
        Self {
            path: path.into(),
            config,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `guest-ping`: Ok if the agent answers within the call timeout.
    pub async fn ping(&self) -> Result<(), QgaError> {
        self.ping_within(self.config.call_timeout).await
    }

    /// `guest-ping`: Ok if the agent answers within `timeout` (resync included).
    pub async fn ping_within(&self, timeout: Duration) -> Result<(), QgaError> {
        self.call("guest-ping", None, timeout).await.map(drop)
    }

    /// `guest-info`: the agent version and its enabled commands.
    pub async fn info(&self) -> Result<GuestInfo, QgaError> {
        self.info_within(self.config.call_timeout).await
    }

    /// `guest-info` within `timeout` (resync included).
    pub async fn info_within(&self, timeout: Duration) -> Result<GuestInfo, QgaError> {
        let value = self.call("guest-info", None, timeout).await?;
        serde_json::from_value(value).map_err(|e| QgaError::Malformed {
            command: "guest-info".into(),
            detail: e.to_string(),
        })
    }

    /// Sends `guest-shutdown` (powerdown) without waiting for a reply: on success the agent
    /// never answers. Confirm through QMP (`SHUTDOWN` event or the socket closing).
    pub async fn shutdown(&self) -> Result<(), QgaError> {
        let timeout = self.config.call_timeout;
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock(deadline, "guest-shutdown", timeout).await?;
        let result = tokio::time::timeout_at(deadline, async {
            let conn = self.ready(&mut guard).await?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let request =
                json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}, "id": id});
            // An error reply, if any, is stale for the next call: resync first then.
            conn.synced = false;
            send(conn, &request).await
        })
        .await;
        finish(&mut guard, result, "guest-shutdown", timeout)
    }

    /// Runs a program in the guest (`guest-exec` with captured output), then polls
    /// `guest-exec-status` until it exits or the deadline passes. The first exited reply reaps
    /// the process, so its result is the one returned.
    pub async fn exec(&self, request: &ExecRequest) -> Result<ExecOutput, QgaError> {
        let deadline = Instant::now() + request.deadline;
        let Some((path, args)) = request.argv.split_first() else {
            return Err(QgaError::Malformed {
                command: "guest-exec".into(),
                detail: "empty argv".into(),
            });
        };
        let mut arguments = json!({"path": path, "arg": args, "capture-output": true});
        if !request.env.is_empty() {
            arguments["env"] = json!(request.env);
        }
        if let Some(input) = &request.input {
            arguments["input-data"] = json!(B64.encode(input));
        }
        let started = self
            .call("guest-exec", Some(arguments), self.bounded(deadline))
            .await
            .map_err(exec_blocked)?;
        let pid =
            started
                .get("pid")
                .and_then(Value::as_i64)
                .ok_or_else(|| QgaError::Malformed {
                    command: "guest-exec".into(),
                    detail: "no integer pid".into(),
                })?;
        let mut interval = self.config.poll_initial;
        loop {
            tokio::time::sleep(interval.min(deadline.saturating_duration_since(Instant::now())))
                .await;
            if Instant::now() >= deadline {
                return Err(QgaError::ExecDeadline { pid });
            }
            let status = self
                .call(
                    "guest-exec-status",
                    Some(json!({"pid": pid})),
                    self.bounded(deadline),
                )
                .await
                .map_err(exec_blocked)?;
            if status.get("exited").and_then(Value::as_bool) == Some(true) {
                return exec_output(&status, request.output_cap);
            }
            interval = (interval * 2).min(self.config.poll_max);
        }
    }

    fn bounded(&self, deadline: Instant) -> Duration {
        self.config
            .call_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
    }

    /// Runs one command and returns its `return` value, bounded by `timeout` (resync included).
    pub async fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock(deadline, command, timeout).await?;
        let result = tokio::time::timeout_at(deadline, async {
            let conn = self.ready(&mut guard).await?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut request = json!({"execute": command, "id": id});
            if let Some(args) = arguments {
                request["arguments"] = args;
            }
            // In step again only once this request's own reply is read: a call dropped
            // half-way (its caller timed out or was cancelled) leaves the channel to resync.
            conn.synced = false;
            send(conn, &request).await?;
            let line = read_line(conn, self.config.max_line).await?;
            match parse_line(&line) {
                Ok(Message::Return { id: got, value }) => {
                    check_id(command, id, got)?;
                    conn.synced = true;
                    Ok(value)
                }
                Ok(Message::Error { id: got, error }) => {
                    check_id(command, id, got)?;
                    conn.synced = true;
                    Err(QgaError::Remote {
                        command: command.to_owned(),
                        error,
                    })
                }
                Ok(_) => Err(QgaError::Malformed {
                    command: command.to_owned(),
                    detail: "not a reply".into(),
                }),
                Err(e) => Err(QgaError::Malformed {
                    command: command.to_owned(),
                    detail: e.to_string(),
                }),
            }
        })
        .await;
        finish(&mut guard, result, command, timeout)
    }

    /// Waits for the channel (another call may hold it) until `deadline`.
    async fn lock(
        &self,
        deadline: Instant,
        command: &str,
        timeout: Duration,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Conn>>, QgaError> {
        tokio::time::timeout_at(deadline, self.conn.lock())
            .await
            .map_err(|_| QgaError::Timeout {
                command: command.to_owned(),
                timeout,
            })
    }

    /// Connects if needed and resynchronises if needed; returns the ready connection.
    async fn ready<'a>(&self, slot: &'a mut Option<Conn>) -> Result<&'a mut Conn, QgaError> {
        if slot.is_none() {
            let stream =
                tokio::time::timeout(self.config.connect_timeout, UnixStream::connect(&self.path))
                    .await
                    .map_err(|_| QgaError::Connect {
                        path: self.path.display().to_string(),
                        source: std::io::ErrorKind::TimedOut.into(),
                    })?
                    .map_err(|source| QgaError::Connect {
                        path: self.path.display().to_string(),
                        source,
                    })?;
            let (read, writer) = stream.into_split();
            *slot = Some(Conn {
                reader: BufReader::new(read),
                writer,
                framer: Framer::new(self.config.max_line, true),
                synced: false,
            });
        }
        let Some(conn) = slot.as_mut() else {
            return Err(QgaError::Disconnected);
        };
        if !conn.synced {
            resync(conn, self.config.max_line).await?;
            conn.synced = true;
        }
        Ok(conn)
    }
}

/// Applies the outcome of a call to the connection state: a broken connection is dropped, a
/// timeout or protocol error forces a resync before the next call.
fn finish<T>(
    slot: &mut Option<Conn>,
    result: Result<Result<T, QgaError>, tokio::time::error::Elapsed>,
    command: &str,
    timeout: Duration,
) -> Result<T, QgaError> {
    let result = result.unwrap_or_else(|_| {
        Err(QgaError::Timeout {
            command: command.to_owned(),
            timeout,
        })
    });
    match &result {
        Ok(_) | Err(QgaError::Remote { .. }) => {}
        Err(QgaError::Disconnected | QgaError::Write(_) | QgaError::Connect { .. }) => {
            *slot = None;
        }
        Err(_) => {
            if let Some(conn) = slot.as_mut() {
                conn.synced = false;
            }
        }
    }
    result
}

async fn send(conn: &mut Conn, request: &Value) -> Result<(), QgaError> {
    let mut bytes = request.to_string().into_bytes();
    bytes.push(b'\n');
    conn.writer.write_all(&bytes).await.map_err(QgaError::Write)
}

async fn read_line(conn: &mut Conn, max: usize) -> Result<Vec<u8>, QgaError> {
    conn.framer
        .next_line(&mut conn.reader)
        .await
        .map_err(|e| match e {
            FrameError::LineTooLong { .. } => QgaError::LineTooLong { max },
            FrameError::Closed | FrameError::Io(_) => QgaError::Disconnected,
        })
}

/// Sends `0xFF` + `guest-sync-delimited` and discards everything until its reply.
async fn resync(conn: &mut Conn, max: usize) -> Result<(), QgaError> {
    let id = random_id();
    let mut bytes = vec![0xFF];
    bytes.extend_from_slice(
        json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
            .to_string()
            .as_bytes(),
    );
    bytes.push(b'\n');
    conn.writer
        .write_all(&bytes)
        .await
        .map_err(QgaError::Write)?;
    loop {
        let line = match read_line(conn, max).await {
            Ok(line) => line,
            Err(QgaError::LineTooLong { .. }) => continue,
            Err(e) => return Err(e),
        };
        if let Ok(Message::Return { value, .. }) = parse_line(&line) {
            if value.as_u64() == Some(id) {
                return Ok(());
            }
        }
        tracing::debug!(len = line.len(), "discarded a line while resynchronising");
    }
}

fn check_id(command: &str, expected: u64, got: Option<Value>) -> Result<(), QgaError> {
    match got {
        None => Ok(()),
        Some(v) if v.as_u64() == Some(expected) => Ok(()),
        Some(v) => Err(QgaError::WrongId {
            command: command.to_owned(),
            expected,
            got: v.to_string().chars().take(64).collect(),
        }),
    }
}

fn exec_blocked(e: QgaError) -> QgaError {
    match e {
        QgaError::Remote { command, error }
            if error.class == "CommandNotFound" || error.desc.contains("disabled") =>
        {
            QgaError::ExecBlocked {
                detail: format!("{command}: {error}"),
            }
        }
        other => other,
    }
}

fn exec_output(status: &Value, cap: usize) -> Result<ExecOutput, QgaError> {
    let malformed = |detail: &str| QgaError::Malformed {
        command: "guest-exec-status".into(),
        detail: detail.into(),
    };
    let int = |key: &str| status.get(key).and_then(Value::as_i64);
    let status_kind = match (int("exitcode"), int("signal")) {
        (_, Some(sig)) => ExitStatus::Signal(i32::try_from(sig).map_err(|_| malformed("signal"))?),
        (Some(code), None) => {
            ExitStatus::Code(i32::try_from(code).map_err(|_| malformed("exitcode"))?)
        }
        (None, None) => return Err(malformed("exited without exitcode or signal")),
    };
    let (stdout, out_cut) =
        decode_capped(status.get("out-data"), cap).ok_or_else(|| malformed("out-data"))?;
    let (stderr, err_cut) =
        decode_capped(status.get("err-data"), cap).ok_or_else(|| malformed("err-data"))?;
    let flag = |key: &str| status.get(key).and_then(Value::as_bool).unwrap_or(false);
    Ok(ExecOutput {
        status: status_kind,
        stdout,
        stderr,
        stdout_truncated: out_cut || flag("out-truncated"),
        stderr_truncated: err_cut || flag("err-truncated"),
    })
}

/// Decodes at most `cap` bytes of a base64 field (absent = empty). `None` if it is not base64.
fn decode_capped(field: Option<&Value>, cap: usize) -> Option<(Vec<u8>, bool)> {
    let Some(field) = field else {
        return Some((Vec::new(), false));
    };
    let text = field.as_str()?.as_bytes();
    // Decode only a prefix long enough for `cap` bytes (base64: 4 chars per 3 bytes).
    let prefix_len = cap.div_ceil(3).saturating_mul(4).min(text.len());
    let mut bytes = B64.decode(&text[..prefix_len]).ok()?;
    let cut = bytes.len() > cap || prefix_len < text.len();
    bytes.truncate(cap);
    Some((bytes, cut))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exec_output_signal_and_code() {
        let out = exec_output(
            &json!({"exited": true, "signal": 9, "out-data": B64.encode("hi")}),
            100,
        )
        .unwrap();
        assert_eq!(out.status, ExitStatus::Signal(9));
        assert_eq!(out.stdout, b"hi");
        let out = exec_output(&json!({"exited": true, "exitcode": 3}), 100).unwrap();
        assert_eq!(out.status, ExitStatus::Code(3));
        assert!(out.stdout.is_empty() && !out.stdout_truncated);
        assert!(exec_output(&json!({"exited": true}), 100).is_err());
        assert!(
            exec_output(
                &json!({"exited": true, "exitcode": 0, "out-data": "!!"}),
                100
            )
            .is_err()
        );
    }

    #[test]
    fn output_is_capped_and_flagged() {
        let data = vec![b'x'; 1000];
        let out = exec_output(
            &json!({"exited": true, "exitcode": 0, "out-data": B64.encode(&data), "err-truncated": true}),
            10,
        )
        .unwrap();
        assert_eq!(out.stdout.len(), 10);
        assert!(out.stdout_truncated);
        assert!(out.stderr_truncated);
        let out = exec_output(
            &json!({"exited": true, "exitcode": 0, "out-data": B64.encode(&data[..9])}),
            9,
        )
        .unwrap();
        assert_eq!(out.stdout.len(), 9);
        assert!(!out.stdout_truncated);
    }

    #[test]
    fn check_exec_detects_disabled() {
        let info: GuestInfo =
            serde_json::from_value(json!({"version": "7.2", "supported_commands": [
            {"name": "guest-exec", "enabled": false, "success-response": true},
            {"name": "guest-exec-status", "enabled": true, "success-response": true}]}))
            .unwrap();
        assert!(matches!(
            info.check_exec(),
            Err(QgaError::ExecBlocked { .. })
        ));
    }

    #[test]
    fn wrong_id_is_an_error() {
        assert!(check_id("x", 5, Some(json!(5))).is_ok());
        assert!(check_id("x", 5, None).is_ok());
        assert!(matches!(
            check_id("x", 5, Some(json!("5"))),
            Err(QgaError::WrongId { .. })
        ));
    }
}
