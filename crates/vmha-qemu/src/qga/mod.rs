//! QGA client: the guest channel of one VM (the QEMU guest agent over its virtio-serial socket).
//!
//! The guest is hostile by default: it controls every byte on this socket.
//!
//! - **In step.** The connection is opened lazily and kept; every (re)connect and every call
//!   after a timeout, a protocol error or a malformed result first resynchronises (byte `0xFF`,
//!   then `guest-sync-delimited` with a random id, discarding everything until the matching
//!   reply). Calls are serialised and cancel-safe: a call dropped half-way (its caller timed
//!   out) leaves the channel marked out of step, so the next call resynchronises first. Every
//!   request carries a fresh id and only a reply with that id answers it: a reply with another
//!   id or none is [`QgaError::WrongId`], never an answer.
//! - **Memory.** Lines are framed as raw bytes with a cap per command (4 KiB for a ping, 64 KiB
//!   for `guest-info`, [`QgaConfig::max_line`] for exec results); lines discarded by a resync
//!   are skipped unbuffered and never parsed; kept ones are parsed straight into typed structs
//!   (nothing becomes a `serde_json::Value` except in [`QgaClient::call`], capped at 64 KiB),
//!   with `serde_json`'s nesting limit, and above 64 KiB on a blocking thread, not a runtime
//!   worker.
//! - **CPU.** Each read has a byte budget (a resync: one [`QgaConfig::max_line`] plus 64 KiB)
//!   and the channel a rate limit ([`QgaConfig::byte_rate`]); a guest that exceeds either is
//!   disconnected and reported as [`QgaError::Hostile`] with the reason, and not reconnected
//!   before a backoff (from [`QgaConfig::hostile_backoff`], doubling up to 64 times that).
//! - **Text.** Every guest string in an error is capped and free of control and format
//!   characters ([`crate::guest_text`]); pids and exit statuses out of range are malformed.
//!
//! Every call is bounded by a timeout, so a silent or hostile agent costs the caller at most
//! that timeout and never affects another VM's client.

mod exec;
mod socket;
pub use exec::{ExecOutput, ExecRequest, ExecStarted, ExecStatus, exec_blocked};
pub mod guard;
pub mod wire;

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::io::BufReader;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::framing::{FrameError, Framer};
use crate::reply::RemoteError;
use guard::Limits;
use socket::ChannelSocket;
use wire::{GuestText, Reply, SYNC_LINE_MAX, SyncReply, describe, parse_reply};

/// Line cap of a reply without payload (`guest-ping`, `guest-exec`).
pub const SMALL_LINE: usize = 4 << 10;
/// Line cap of `guest-info` and of [`QgaClient::call`].
pub const INFO_LINE: usize = 64 << 10;
/// Bytes a read may take beyond its line cap (a few short stray lines); a guest that sends
/// more than the cap plus this while one reply is awaited is [`QgaError::Hostile`].
pub const SLACK: u64 = 64 << 10;
/// Replies longer than this are parsed on a blocking thread.
const INLINE_PARSE: usize = 64 << 10;

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
    /// The reply carried another request's id, or none: it answers nothing.
    #[error("reply to {command} has id {got}, expected {expected}")]
    WrongId {
        /// The command.
        command: String,
        /// The id sent.
        expected: u64,
        /// The id received (`none` if absent), capped and printable.
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
    /// The guest sent more than a read's byte budget or the channel's rate limit allows: it was
    /// disconnected and is not reconnected for `retry_in`.
    #[error("guest agent disconnected as hostile: {reason}; next attempt in {retry_in:?}")]
    Hostile {
        /// What it did (no guest text).
        reason: String,
        /// The backoff before the channel is tried again.
        retry_in: Duration,
    },
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
    /// Sustained bytes per second a guest may send (bursts up to 2 × `max_line` + 1 MiB).
    pub byte_rate: u64,
    /// First wait before reconnecting to a guest found hostile; doubles up to 64 times this.
    pub hostile_backoff: Duration,
}

impl Default for QgaConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
            max_line: 4 << 20,
            poll_initial: Duration::from_millis(2),
            poll_max: Duration::from_millis(50),
            byte_rate: 1 << 20,
            hostile_backoff: Duration::from_secs(1),
        }
    }
}

/// One command listed by `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CommandInfo {
    /// The command name (capped, printable).
    #[serde(deserialize_with = "guest_string")]
    pub name: String,
    /// Whether the agent allows it.
    pub enabled: bool,
}

/// The answer of `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestInfo {
    /// The agent's version string (capped, printable).
    #[serde(deserialize_with = "guest_string")]
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

/// A guest string as [`GuestText`] makes it: capped, no control or format characters.
fn guest_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    GuestText::deserialize(d).map(|t| t.0)
}

struct Conn {
    /// The socket, read through a buffer and written directly (`io.get_ref().write_all`).
    io: BufReader<ChannelSocket>,
    framer: Framer,
    synced: bool,
    /// Bytes the current read may still take.
    budget: u64,
    /// The current read's allowance.
    granted: u64,
    /// Bytes read under earlier allowances and not yet charged to the rate limit.
    used: u64,
}

impl Conn {
    /// Starts a read allowance of `bytes` (what the previous one used stays to be charged).
    fn allow(&mut self, bytes: u64) {
        self.used += self.granted - self.budget;
        self.granted = bytes;
        self.budget = bytes;
    }

    /// Bytes read since the last charge, for the rate limit.
    fn take_used(&mut self) -> u64 {
        let used = self.used + (self.granted - self.budget);
        self.used = 0;
        self.granted = self.budget;
        used
    }
}

/// The channel state behind the client's lock.
struct Channel {
    conn: Option<Conn>,
    limits: Limits,
}

/// The guest channel of one VM. Methods take `&self`; calls are serialised internally.
#[derive(Debug)]
pub struct QgaClient {
    path: PathBuf,
    config: QgaConfig,
    channel: Mutex<Channel>,
    next_id: AtomicU64,
    /// When the next probe's first status poll comes, in µs after its exec (0 = not known
    /// yet), per probe size (`probe::size_slot`); see `probe::next_first_poll`.
    pub(crate) first_poll_us: [AtomicU64; crate::probe::PROBE_SIZES],
    /// How long the last probe of each size ran in the guest as it told, in µs (0 = it did
    /// not).
    pub(crate) probe_guest_us: [AtomicU64; crate::probe::PROBE_SIZES],
    /// Whether the last probe's guest showed a process's children in `/proc`: the next
    /// probe's checks can be timed out by vmhad (see `probe::host_timeout`).
    pub(crate) proc_children: AtomicBool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("connected", &self.conn.is_some())
            .field("synced", &self.conn.as_ref().map(|c| c.synced))
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
        let channel = Channel {
            conn: None,
            limits: Limits::for_channel(&config),
        };
        Self {
            path: path.into(),
            config,
            channel: Mutex::new(channel),
            first_poll_us: Default::default(),
            probe_guest_us: Default::default(),
            proc_children: AtomicBool::new(false),
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
        self.call_typed("guest-ping", None, timeout, SMALL_LINE, |_: IgnoredAny| {
            Ok(())
        })
        .await
    }

    /// `guest-info`: the agent version and its enabled commands.
    pub async fn info(&self) -> Result<GuestInfo, QgaError> {
        self.info_within(self.config.call_timeout).await
    }

    /// `guest-info` within `timeout` (resync included).
    pub async fn info_within(&self, timeout: Duration) -> Result<GuestInfo, QgaError> {
        self.call_typed("guest-info", None, timeout, INFO_LINE, Ok)
            .await
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
        self.finish(&mut guard, result, "guest-shutdown", timeout)
    }

    /// Runs one command and returns its `return` value, bounded by `timeout` (resync included).
    /// The reply line is capped at 64 KiB (and [`QgaConfig::max_line`]).
    pub async fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        self.call_typed(command, arguments, timeout, INFO_LINE, Ok)
            .await
    }

    /// Runs one command: its reply line (at most `line_cap` bytes) is parsed as `T` and turned
    /// into the result by `convert` (an `Err` there is a malformed reply).
    async fn call_typed<T, R, F>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
        line_cap: usize,
        convert: F,
    ) -> Result<R, QgaError>
    where
        T: DeserializeOwned + Send + 'static,
        R: Send + 'static,
        F: FnOnce(T) -> Result<R, String> + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock(deadline, command, timeout).await?;
        let line_cap = line_cap.min(self.config.max_line);
        let result = tokio::time::timeout_at(deadline, async {
            let conn = self.ready(&mut guard).await?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut request = json!({"execute": command, "id": id});
            if let Some(args) = arguments {
                request["arguments"] = args;
            }
            // In step again only once this request's own reply is read and valid: a call
            // dropped half-way (its caller timed out) or a malformed answer leaves the channel
            // to resync.
            conn.synced = false;
            send(conn, &request).await?;
            conn.framer.set_max_line(line_cap);
            conn.allow(line_cap as u64 + SLACK);
            let line = read_line(conn, command).await?;
            let malformed = |detail: String| QgaError::Malformed {
                command: command.to_owned(),
                detail,
            };
            match parse_typed(line, id, convert).await.map_err(malformed)? {
                Reply::Return(value) => {
                    conn.synced = true;
                    Ok(value)
                }
                Reply::Error(error) => {
                    conn.synced = true;
                    Err(QgaError::Remote {
                        command: command.to_owned(),
                        error,
                    })
                }
                Reply::NotOurs { got } => Err(QgaError::WrongId {
                    command: command.to_owned(),
                    expected: id,
                    got,
                }),
            }
        })
        .await;
        self.finish(&mut guard, result, command, timeout)
    }

    /// Waits for the channel (another call may hold it) until `deadline`.
    async fn lock(
        &self,
        deadline: Instant,
        command: &str,
        timeout: Duration,
    ) -> Result<tokio::sync::MutexGuard<'_, Channel>, QgaError> {
        tokio::time::timeout_at(deadline, self.channel.lock())
            .await
            .map_err(|_| QgaError::Timeout {
                command: command.to_owned(),
                timeout,
            })
    }

    /// Connects if needed (not while backing off from a hostile guest) and resynchronises if
    /// needed; returns the ready connection.
    async fn ready<'a>(&self, channel: &'a mut Channel) -> Result<&'a mut Conn, QgaError> {
        if let Some((reason, left)) = channel.limits.backoff.active() {
            return Err(QgaError::Hostile {
                reason: reason.to_owned(),
                retry_in: left,
            });
        }
        let slot = &mut channel.conn;
        if slot.is_none() {
            let stream = tokio::time::timeout(
                self.config.connect_timeout,
                ChannelSocket::connect(&self.path),
            )
            .await
            .map_err(|_| QgaError::Connect {
                path: self.path.display().to_string(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| QgaError::Connect {
                path: self.path.display().to_string(),
                source,
            })?;
            *slot = Some(Conn {
                io: BufReader::new(stream),
                framer: Framer::new(SYNC_LINE_MAX, true),
                synced: false,
                budget: 0,
                granted: 0,
                used: 0,
            });
        }
        let Some(conn) = slot.as_mut() else {
            return Err(QgaError::Disconnected);
        };
        if !conn.synced {
            // One late reply of the largest size may still be on its way, and a few strays.
            resync(conn, self.config.max_line as u64 + SLACK).await?;
            conn.synced = true;
        }
        Ok(conn)
    }

    /// Applies the outcome of a call to the channel: the bytes read are charged to the rate
    /// limit, a hostile guest is disconnected and backed off from, a broken connection is
    /// dropped, a timeout or protocol error forces a resync before the next call.
    fn finish<T>(
        &self,
        channel: &mut Channel,
        result: Result<Result<T, QgaError>, tokio::time::error::Elapsed>,
        command: &str,
        timeout: Duration,
    ) -> Result<T, QgaError> {
        let mut result = result.unwrap_or_else(|_| {
            Err(QgaError::Timeout {
                command: command.to_owned(),
                timeout,
            })
        });
        let used = channel.conn.as_mut().map_or(0, Conn::take_used);
        if let Some((reason, retry_in)) = channel.limits.settle(used, &mut result) {
            channel.conn = None;
            tracing::warn!(path = %self.path.display(), %reason, ?retry_in, "guest agent disconnected as hostile");
        }
        match &result {
            Ok(_) | Err(QgaError::Remote { .. } | QgaError::Hostile { .. }) => {}
            Err(QgaError::Disconnected | QgaError::Write(_) | QgaError::Connect { .. }) => {
                channel.conn = None;
            }
            Err(_) => {
                if let Some(conn) = channel.conn.as_mut() {
                    conn.synced = false;
                }
            }
        }
        result
    }
}

/// Parses a reply line for request `id` as [`wire::parse_reply`] does and converts its
/// `return` with `convert`; a line longer than 64 KiB is parsed on a blocking thread so that no
/// runtime worker is held up, and dropped before `convert` runs. `Err` is a safe description
/// (capped, no control or format characters). Also used by drivers that carry agent commands
/// themselves (libvirt).
pub async fn parse_typed<T, R, F>(line: Vec<u8>, id: u64, convert: F) -> Result<Reply<R>, String>
where
    T: DeserializeOwned + Send + 'static,
    R: Send + 'static,
    F: FnOnce(T) -> Result<R, String> + Send + 'static,
{
    let inline = line.len() <= INLINE_PARSE;
    let work = move || match parse_reply::<T>(&line, id)? {
        Reply::Return(value) => {
            drop(line);
            convert(value).map(Reply::Return)
        }
        Reply::Error(e) => Ok(Reply::Error(e)),
        Reply::NotOurs { got } => Ok(Reply::NotOurs { got }),
    };
    if inline {
        work()
    } else {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| "the reply's parser failed".to_owned())?
    }
}

async fn send(conn: &mut Conn, request: &Value) -> Result<(), QgaError> {
    let mut bytes = request.to_string().into_bytes();
    bytes.push(b'\n');
    conn.io
        .get_ref()
        .write_all(&bytes)
        .await
        .map_err(QgaError::Write)
}

/// Reads one line within the connection's budget and its framer's cap.
async fn read_line(conn: &mut Conn, what: &str) -> Result<Vec<u8>, QgaError> {
    let max = conn.framer.max_line();
    conn.framer
        .next_line_within(&mut conn.io, &mut conn.budget)
        .await
        .map_err(|e| match e {
            FrameError::LineTooLong { .. } => QgaError::LineTooLong { max },
            FrameError::OverBudget { budget } => QgaError::Hostile {
                reason: format!("sent more than {budget} bytes while vmha waited for {what}"),
                retry_in: Duration::ZERO,
            },
            FrameError::Closed | FrameError::Io(_) => QgaError::Disconnected,
        })
}

/// Sends `0xFF` + `guest-sync-delimited` and discards everything until its reply, reading at
/// most `budget` bytes. Discarded lines are neither buffered beyond a short prefix nor parsed.
async fn resync(conn: &mut Conn, budget: u64) -> Result<(), QgaError> {
    let id = random_id();
    let mut bytes = vec![0xFF];
    bytes.extend_from_slice(
        json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
            .to_string()
            .as_bytes(),
    );
    bytes.push(b'\n');
    conn.io
        .get_ref()
        .write_all(&bytes)
        .await
        .map_err(QgaError::Write)?;
    conn.framer.set_max_line(SYNC_LINE_MAX);
    conn.allow(budget);
    let sync = SyncReply::new(id);
    loop {
        match read_line(conn, "guest-sync-delimited").await {
            Ok(line) if sync.is(&line) => return Ok(()),
            Ok(line) => {
                tracing::debug!(len = line.len(), line = %describe(&line), "discarded a line while resynchronising");
                // A flood of short lines is many lines per read: let other VMs' tasks run.
                tokio::task::consume_budget().await;
            }
            Err(QgaError::LineTooLong { .. }) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
    fn guest_info_strings_are_made_safe() {
        let info: GuestInfo = serde_json::from_value(json!({
            "version": format!("7.2\u{202e}{}", "v".repeat(100_000)),
            "supported_commands": [{"name": "guest-exec\u{2028}", "enabled": true}]}))
        .unwrap();
        assert!(info.version.chars().count() <= crate::guest_text::MAX_GUEST_TEXT + 1);
        assert!(!info.version.chars().any(crate::guest_text::is_unsafe));
        assert_eq!(info.commands[0].name, "guest-exec ");
    }
}
