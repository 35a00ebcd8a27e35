//! QMP client: one connection to one QEMU's monitor socket.
//!
//! [`QmpClient::connect`] waits for the greeting (bounded by a timeout: a second client on a busy
//! socket never gets one), negotiates `qmp_capabilities`, and spawns one reader task. Commands
//! carry a numeric `id` and are matched to their replies while events interleave; each command
//! has a timeout. Events go to a bounded channel that ends with [`QmpEvent::Gone`] when the
//! socket closes; if the consumer falls behind, events are dropped and a [`QmpEvent::Lagged`]
//! item says how many (the consumer should then poll [`QmpClient::query_status`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use vmha_model::{PauseReason, VmObservation};

use crate::framing::{FrameError, Framer};
use crate::reply::{Message, RemoteError, parse_line};

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No greeting arrived in time (typically: another client holds the monitor).
    #[error("no QMP greeting within {0:?}")]
    GreetingTimeout(Duration),
    /// The first line was not a QMP greeting.
    #[error("expected a QMP greeting, got something else")]
    BadGreeting,
    /// A command got no reply in time. The connection stays usable.
    #[error("command {command} timed out after {timeout:?}")]
    Timeout {
        /// The command name.
        command: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// QEMU answered with an error.
    #[error("command {command} failed: {error}")]
    Remote {
        /// The command name.
        command: String,
        /// The error QEMU returned.
        error: RemoteError,
    },
    /// The reply did not have the expected shape.
    #[error("unexpected reply to {command}: {detail}")]
    BadReply {
        /// The command name.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// The socket is closed: QEMU is gone (or the connection broke).
    #[error("QMP connection closed")]
    Gone,
    /// Reading or writing the socket failed during the handshake.
    #[error("QMP I/O: {0}")]
    Io(#[from] FrameError),
}

/// Tunables of a QMP connection.
#[derive(Debug, Clone)]
pub struct QmpConfig {
    /// How long to wait for the greeting after connecting.
    pub greeting_timeout: Duration,
    /// How long each command waits for its reply.
    pub command_timeout: Duration,
    /// Longest accepted line; longer lines are skipped (and logged).
    pub max_line: usize,
    /// Capacity of the event channel.
    pub event_capacity: usize,
}

impl Default for QmpConfig {
    fn default() -> Self {
        Self {
            greeting_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(5),
            max_line: 1 << 20,
            event_capacity: 256,
        }
    }
}

/// An event from QEMU, typed for the ones HA cares about.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEvent {
    /// The guest or the host shut the VM down (QEMU exits unless run with `-no-shutdown`).
    Shutdown {
        /// True if the guest initiated it.
        guest: bool,
        /// The `ShutdownCause`, e.g. `guest-shutdown`, `guest-panic`, `host-qmp-quit`.
        reason: String,
    },
    /// The VM was reset.
    Reset {
        /// True if the guest initiated it.
        guest: bool,
        /// The `ShutdownCause` of the reset.
        reason: String,
    },
    /// The VM's vCPUs stopped (paused).
    Stop,
    /// The VM's vCPUs resumed.
    Resume,
    /// The guest reported a panic (pvpanic / hv crash).
    GuestPanicked {
        /// What QEMU did about it (`pause`, `poweroff`, `run`).
        action: String,
    },
    /// The emulated watchdog fired.
    Watchdog {
        /// The watchdog action taken (`reset`, `shutdown`, `pause`, …).
        action: String,
    },
    /// A guest opened or closed a virtio-serial port (e.g. the guest agent's).
    VserportChange {
        /// The chardev id of the port.
        id: String,
        /// Whether the guest side is now open.
        open: bool,
    },
    /// A block device hit an I/O error.
    BlockIoError {
        /// The device (may be empty when only a node name exists).
        device: String,
        /// `read` or `write`.
        operation: String,
        /// What QEMU did (`ignore`, `report`, `stop`).
        action: String,
        /// The error message.
        reason: String,
    },
    /// Any other event, or a known one whose data did not have the expected shape.
    Other {
        /// The event name.
        name: String,
        /// Its raw `data`.
        data: Value,
    },
    /// The consumer fell behind: this many events were dropped since the last delivered one.
    Lagged {
        /// How many events were dropped.
        dropped: u64,
    },
    /// The QMP socket closed: QEMU is gone. Always the last item of the stream.
    Gone,
}

impl QmpEvent {
    /// Types an event from its name and data; malformed data yields [`QmpEvent::Other`].
    pub fn from_parts(name: String, data: Value) -> Self {
        fn s(data: &Value, key: &str) -> Option<String> {
            data.get(key)?.as_str().map(str::to_owned)
        }
        fn b(data: &Value, key: &str) -> Option<bool> {
            data.get(key)?.as_bool()
        }
        let typed = match name.as_str() {
            "SHUTDOWN" => b(&data, "guest")
                .zip(s(&data, "reason"))
                .map(|(guest, reason)| Self::Shutdown { guest, reason }),
            "RESET" => b(&data, "guest")
                .zip(s(&data, "reason"))
                .map(|(guest, reason)| Self::Reset { guest, reason }),
            "STOP" => Some(Self::Stop),
            "RESUME" => Some(Self::Resume),
            "GUEST_PANICKED" => s(&data, "action").map(|action| Self::GuestPanicked { action }),
            "WATCHDOG" => s(&data, "action").map(|action| Self::Watchdog { action }),
            "VSERPORT_CHANGE" => s(&data, "id")
                .zip(b(&data, "open"))
                .map(|(id, open)| Self::VserportChange { id, open }),
            "BLOCK_IO_ERROR" => match (
                s(&data, "operation"),
                s(&data, "action"),
                s(&data, "reason"),
            ) {
                (Some(operation), Some(action), Some(reason)) => Some(Self::BlockIoError {
                    device: s(&data, "device").unwrap_or_default(),
                    operation,
                    action,
                    reason,
                }),
                _ => None,
            },
            _ => None,
        };
        typed.unwrap_or(Self::Other { name, data })
    }
}

/// The answer of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunStatus {
    /// True if the vCPUs are running.
    pub running: bool,
    /// The `RunState`, e.g. `running`, `paused`, `prelaunch`, `shutdown`, `guest-panicked`.
    pub status: String,
}

impl RunStatus {
    /// What this status tells the VM monitor, as it is: running, shut down, or paused with
    /// QEMU's run state as the reason (the engine judges whether a pause is a failure).
    pub fn observation(&self) -> VmObservation {
        if self.running {
            return VmObservation::Running;
        }
        if self.status == "shutdown" {
            return VmObservation::Stopped { by_guest: true };
        }
        VmObservation::Paused {
            reason: pause_reason(&self.status),
        }
    }
}

/// The answer of `query-status` typed (see [`typed_reply`]).
fn run_status(value: Value) -> Result<RunStatus, QmpError> {
    typed_reply(value, "query-status")
}

/// `value`, the answer to `command`, as a `T`; a wrong shape is [`QmpError::BadReply`] whose
/// detail (serde's message, which may quote the peer's text) is capped and free of control and
/// format characters, as every peer string in an error is.
pub(crate) fn typed_reply<T: serde::de::DeserializeOwned>(
    value: Value,
    command: &str,
) -> Result<T, QmpError> {
    serde_json::from_value(value).map_err(|e| QmpError::BadReply {
        command: command.into(),
        detail: crate::guest_text::guest_text(&e.to_string()),
    })
}

/// QEMU's run state (`qapi/run-state.json`) of a VM whose vCPUs are stopped, as a
/// [`PauseReason`].
pub fn pause_reason(status: &str) -> PauseReason {
    match status {
        "paused" => PauseReason::Admin,
        "debug" => PauseReason::Debug,
        "suspended" => PauseReason::Suspended,
        "io-error" => PauseReason::IoError,
        "internal-error" => PauseReason::InternalError,
        "guest-panicked" => PauseReason::GuestPanicked,
        "watchdog" => PauseReason::Watchdog,
        "inmigrate" | "postmigrate" | "finish-migrate" | "colo" => PauseReason::Migration,
        "save-vm" | "restore-vm" => PauseReason::Snapshot,
        "prelaunch" => PauseReason::Prelaunch,
        _ => PauseReason::Other,
    }
}

/// The receiving end of a QMP connection's events.
pub type QmpEvents = mpsc::Receiver<QmpEvent>;

type Pending = StdMutex<HashMap<u64, PendingSender>>;

struct Inner {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    closed: AtomicBool,
    reader: StdMutex<Option<JoinHandle<()>>>,
    command_timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.reader.lock() {
            if let Some(handle) = guard.take() {
                handle.abort();
            }
        }
    }
}

/// A connected QMP client. Cheap to clone; all clones share one connection. Dropping the last
/// clone closes the connection and stops the reader task.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connects, waits for the greeting (at most `greeting_timeout`), negotiates capabilities
    /// and starts the reader. The returned receiver yields events and ends with
    /// [`QmpEvent::Gone`] when the socket closes.
    pub async fn connect(
        path: impl AsRef<Path>,
        config: QmpConfig,
    ) -> Result<(Self, QmpEvents), QmpError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut framer = Framer::new(config.max_line, false);
        let greeting = tokio::time::timeout(config.greeting_timeout, framer.next_line(&mut reader))
            .await
            .map_err(|_| QmpError::GreetingTimeout(config.greeting_timeout))??;
        if !matches!(parse_line(&greeting), Ok(Message::Greeting(_))) {
            return Err(QmpError::BadGreeting);
        }
        let (tx, rx) = mpsc::channel(config.event_capacity.max(1));
        let inner = Arc::new(Inner {
            writer: Mutex::new(write),
            pending: StdMutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            reader: StdMutex::new(None),
            command_timeout: config.command_timeout,
        });
        let task = tokio::spawn(read_loop(Arc::downgrade(&inner), reader, framer, tx));
        if let Ok(mut guard) = inner.reader.lock() {
            *guard = Some(task);
        }
        let client = Self { inner };
        client.execute("qmp_capabilities", None).await?;
        Ok((client, rx))
    }

    /// True once the socket has closed; every later command fails with [`QmpError::Gone`].
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Runs one command and returns its `return` value. Fails with [`QmpError::Timeout`] after
    /// the configured command timeout, [`QmpError::Remote`] on an error reply, and
    /// [`QmpError::Gone`] if the socket closes first.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.inner.command_timeout)
            .await
    }

    /// Like [`QmpClient::execute`] with an explicit timeout.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Gone);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        let (tx, rx) = oneshot::channel();
        self.pending_map(|p| p.insert(id, tx));
        let result = tokio::time::timeout(timeout, async {
            {
                let mut writer = self.inner.writer.lock().await;
                writer.write_all(&bytes).await.map_err(|_| QmpError::Gone)?;
            }
            rx.await.map_err(|_| QmpError::Gone)
        })
        .await;
        self.pending_map(|p| p.remove(&id));
        match result {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                timeout,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(error))) => Err(QmpError::Remote {
                command: command.to_owned(),
                error,
            }),
        }
    }

    fn pending_map<T>(&self, f: impl FnOnce(&mut HashMap<u64, PendingSender>) -> T) -> Option<T> {
        self.inner.pending.lock().ok().map(|mut p| f(&mut p))
    }

    /// `query-status`: whether the vCPUs run and the QEMU run state.
    pub async fn query_status(&self) -> Result<RunStatus, QmpError> {
        run_status(self.execute("query-status", None).await?)
    }

    /// `cont`: resumes the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `stop`: pauses the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `system_reset`: hard-resets the VM.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `system_powerdown`: sends an ACPI power button press (the guest may ignore it).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once. Success means QEMU acknowledged it, or closed the socket
    /// before its reply arrived.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Gone) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

type PendingSender = oneshot::Sender<Result<Value, RemoteError>>;

async fn read_loop(
    inner: std::sync::Weak<Inner>,
    mut reader: BufReader<OwnedReadHalf>,
    mut framer: Framer,
    tx: mpsc::Sender<QmpEvent>,
) {
    let mut dropped: u64 = 0;
    loop {
        let line = match framer.next_line(&mut reader).await {
            Ok(line) => line,
            Err(FrameError::LineTooLong { max }) => {
                tracing::warn!(max, "QMP line too long, skipped");
                continue;
            }
            // QMP comes from our own QEMU: its reads have no budget.
            Err(FrameError::Closed | FrameError::OverBudget { .. }) => break,
            Err(FrameError::Io(e)) => {
                tracing::warn!(error = %e, "QMP read failed");
                break;
            }
        };
        let (id, result) = match parse_line(&line) {
            Ok(Message::Event { name, data }) => {
                deliver(&tx, QmpEvent::from_parts(name, data), &mut dropped);
                continue;
            }
            Ok(Message::Return { id, value }) => (id, Ok(value)),
            Ok(Message::Error { id, error }) => (id, Err(error)),
            Ok(Message::Greeting(_)) => {
                tracing::warn!("unexpected second QMP greeting ignored");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "unparsable QMP line ignored");
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        let sender = id
            .and_then(|v| v.as_u64())
            .and_then(|id| inner.pending.lock().ok().and_then(|mut p| p.remove(&id)));
        match sender {
            Some(sender) => {
                // The requester may have timed out and gone away; nothing to do then.
                let _ = sender.send(result);
            }
            None => tracing::debug!("QMP reply for no pending command ignored"),
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.closed.store(true, Ordering::Release);
        if let Ok(mut p) = inner.pending.lock() {
            p.clear();
        }
    }
    if dropped > 0 && tx.send(QmpEvent::Lagged { dropped }).await.is_err() {
        return;
    }
    // The receiver may be gone; the stream then simply ends.
    let _ = tx.send(QmpEvent::Gone).await;
}

fn deliver(tx: &mpsc::Sender<QmpEvent>, event: QmpEvent, dropped: &mut u64) {
    if *dropped > 0 {
        if tx.try_send(QmpEvent::Lagged { dropped: *dropped }).is_err() {
            *dropped += 1;
            return;
        }
        *dropped = 0;
    }
    if tx.try_send(event).is_err() {
        *dropped += 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bad_query_status_detail_is_safe_and_capped() {
        let hostile = format!("\u{202e}\u{1b}[2J{}", "x".repeat(10_000));
        let err = run_status(json!({"running": hostile, "status": "running"})).unwrap_err();
        let QmpError::BadReply { detail, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(detail.contains("invalid type"), "{detail}");
        let shown = err.to_string();
        assert!(
            !shown.chars().any(crate::guest_text::is_unsafe),
            "{shown:?}"
        );
        assert!(
            shown.chars().count() < crate::guest_text::MAX_GUEST_TEXT + 60,
            "{shown}"
        );
        assert!(run_status(json!({"running": true, "status": "running"})).is_ok());
    }

    #[test]
    fn types_known_events_and_falls_back() {
        assert_eq!(
            QmpEvent::from_parts(
                "SHUTDOWN".into(),
                json!({"guest": true, "reason": "guest-shutdown"})
            ),
            QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
        assert_eq!(
            QmpEvent::from_parts(
                "VSERPORT_CHANGE".into(),
                json!({"id": "qga0", "open": false})
            ),
            QmpEvent::VserportChange {
                id: "qga0".into(),
                open: false
            }
        );
        assert!(matches!(
            QmpEvent::from_parts("SHUTDOWN".into(), json!({"guest": "yes"})),
            QmpEvent::Other { .. }
        ));
        assert!(matches!(
            QmpEvent::from_parts("MEMORY_DEVICE_SIZE_CHANGE".into(), Value::Null),
            QmpEvent::Other { .. }
        ));
    }

    #[test]
    fn deliver_counts_drops_and_reports_lag() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut dropped = 0;
        deliver(&tx, QmpEvent::Stop, &mut dropped);
        deliver(&tx, QmpEvent::Resume, &mut dropped);
        deliver(&tx, QmpEvent::Resume, &mut dropped);
        assert_eq!(dropped, 2);
        assert_eq!(rx.try_recv().unwrap(), QmpEvent::Stop);
        deliver(&tx, QmpEvent::Stop, &mut dropped);
        assert_eq!(rx.try_recv().unwrap(), QmpEvent::Lagged { dropped: 2 });
        // The event after the lag notice found the channel full again.
        assert_eq!(dropped, 1);
    }
}
