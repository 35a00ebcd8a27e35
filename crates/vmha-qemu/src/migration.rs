//! Live migration over QMP (QEMU's `docs/devel/migration.rst`, `qapi/migration.json`):
//! - target: QEMU started with `-incoming defer`, then [`listen_incoming`] runs
//!   `migrate-incoming` on `tcp:ADDR:0` and reads the port QEMU chose from `query-migrate`'s
//!   `socket-address`; when the stream completes QEMU resumes the guest by itself (`RESUME`);
//! - source: [`send`] runs `migrate` and follows `query-migrate` until the status is
//!   `completed` (the source's vCPUs are then stopped for good: run state `postmigrate`),
//!   `failed` or `cancelled` (QEMU resumes the source). A migration that makes no progress for
//!   [`MigrationLimits::stall`] or runs longer than [`MigrationLimits::total`] is cancelled
//!   (`migrate_cancel`) and reported as such;
//! - [`cancel`]: `migrate_cancel`, e.g. when the migration is withdrawn.
//!
//! Verified on QEMU 7.2: `tcp:ADDR:0` listens on a free port, reported as
//! `{"socket-address":[{"type":"inet","host":…,"port":"38487"}]}` (the port is a string).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::{QmpClient, QmpError};

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The QMP command failed (QEMU refused it, or is gone).
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU answered something this driver cannot read.
    #[error("unexpected answer to {command}: {detail}")]
    BadReply {
        /// The command.
        command: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The migration ended in `failed` (QEMU's `error-desc`, if any).
    #[error("migration failed: {0}")]
    Failed(String),
    /// The migration was cancelled (by [`cancel`], or by this driver after a stall).
    #[error("migration cancelled{0}")]
    Cancelled(String),
}

/// When the source gives up on a migration.
#[derive(Debug, Clone, Copy)]
pub struct MigrationLimits {
    /// No byte transferred for this long: the network or the target is gone.
    pub stall: Duration,
    /// The whole migration may take this long (a guest dirtying memory faster than the link
    /// carries it never converges).
    pub total: Duration,
    /// How often `query-migrate` is asked.
    pub poll: Duration,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        MigrationLimits {
            stall: Duration::from_secs(10),
            total: Duration::from_secs(300),
            poll: Duration::from_millis(100),
        }
    }
}

/// A completed migration as QEMU measured it (`query-migrate` on the source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigrationStats {
    /// `total-time`: from `migrate` to completion, in ms.
    pub total_ms: u64,
    /// `downtime`: how long the guest was paused for the final copy, in ms.
    pub downtime_ms: u64,
    /// `setup-time`, in ms.
    pub setup_ms: u64,
    /// `ram.transferred`, in bytes.
    pub transferred: u64,
}

/// A `tcp:` URI for `host` and `port` (an IPv6 address in brackets).
pub fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

/// Target side: `migrate-incoming` on `address` (any free port) of a QEMU started with
/// `-incoming defer`; returns the URI the source must send to.
pub async fn listen_incoming(qmp: &QmpClient, address: &str) -> Result<String, MigrationError> {
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": tcp_uri(address, 0) })),
    )
    .await?;
    let info = qmp.execute("query-migrate", None).await?;
    let port = listening_port(&info).ok_or_else(|| MigrationError::BadReply {
        command: "query-migrate",
        detail: format!("no listening port in {}", truncate(&info)),
    })?;
    Ok(tcp_uri(address, port))
}

/// The port in `query-migrate`'s `socket-address` (a string in QEMU 7.2, a number accepted).
fn listening_port(info: &Value) -> Option<u16> {
    info.get("socket-address")?
        .as_array()?
        .iter()
        .find_map(|a| match a.get("port")? {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        })
        .filter(|&p| p != 0)
}

/// Source side: `migrate` to `uri`, followed until it ends (see the module documentation).
/// A migration this QEMU already runs (started by an earlier daemon, which died) is followed
/// instead of being started again; one it already completed is reported completed.
pub async fn send(
    qmp: &QmpClient,
    uri: &str,
    limits: MigrationLimits,
) -> Result<MigrationStats, MigrationError> {
    let before = qmp.execute("query-migrate", None).await?;
    match before.get("status").and_then(Value::as_str).unwrap_or("") {
        "completed" => return Ok(stats(&before)),
        s if in_progress(s) => {}
        _ => {
            qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
        }
    }
    let started = Instant::now();
    let mut progress = (0u64, Instant::now());
    loop {
        tokio::time::sleep(limits.poll).await;
        let info = qmp.execute("query-migrate", None).await?;
        let status = info.get("status").and_then(Value::as_str).unwrap_or("");
        match status {
            "completed" => return Ok(stats(&info)),
            "failed" => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(MigrationError::Failed(crate::guest_text::guest_text(why)));
            }
            "cancelled" => return Err(MigrationError::Cancelled(String::new())),
            _ => {}
        }
        let transferred = info
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if transferred != progress.0 {
            progress = (transferred, Instant::now());
        }
        let why = if progress.1.elapsed() >= limits.stall {
            Some(format!(
                ": no progress for {:?} (target or network gone)",
                limits.stall
            ))
        } else if started.elapsed() >= limits.total {
            Some(format!(": not done within {:?}", limits.total))
        } else {
            None
        };
        if let Some(why) = why {
            // Best effort: the status poll above tells how it really ended.
            let _ = cancel(qmp).await;
            return Err(MigrationError::Cancelled(why));
        }
    }
}

/// Whether a `query-migrate` status is a migration still under way.
fn in_progress(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling"
    )
}

/// `migrate_cancel` (a no-op when no migration runs).
pub async fn cancel(qmp: &QmpClient) -> Result<(), MigrationError> {
    qmp.execute("migrate_cancel", None).await?;
    Ok(())
}

fn stats(info: &Value) -> MigrationStats {
    let n = |p: &str| info.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    MigrationStats {
        total_ms: n("/total-time"),
        downtime_ms: n("/downtime"),
        setup_ms: n("/setup-time"),
        transferred: n("/ram/transferred"),
    }
}

/// A QMP answer as it may appear in an error: capped, no control or format characters.
fn truncate(v: &Value) -> String {
    crate::guest_text::guest_text(&v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_port_is_read_as_qemu_writes_it() {
        let info = json!({"socket-address": [{"port": "38487", "ipv4": true, "host": "10.0.0.2", "type": "inet"}]});
        assert_eq!(listening_port(&info), Some(38487));
        assert_eq!(
            listening_port(&json!({"socket-address": [{"port": 4444}]})),
            Some(4444)
        );
        assert_eq!(
            listening_port(&json!({"socket-address": [{"port": "0"}]})),
            None
        );
        assert_eq!(
            listening_port(&json!({"socket-address": [{"port": "x"}]})),
            None
        );
        assert_eq!(listening_port(&json!({})), None);
    }

    #[test]
    fn an_answer_in_an_error_is_capped_and_printable() {
        let info = json!({"status": format!("\u{202e}\u{2028}{}", "y".repeat(5000))});
        let shown = truncate(&info);
        assert!(
            !shown.chars().any(crate::guest_text::is_unsafe),
            "{shown:?}"
        );
        assert!(shown.chars().count() <= crate::guest_text::MAX_GUEST_TEXT + 1);
    }

    #[test]
    fn uris_bracket_ipv6() {
        assert_eq!(tcp_uri("10.0.0.2", 0), "tcp:10.0.0.2:0");
        assert_eq!(tcp_uri("fd00::2", 5), "tcp:[fd00::2]:5");
    }

    #[test]
    fn stats_come_from_the_final_query() {
        let info = json!({"status": "completed", "downtime": 12, "total-time": 840, "setup-time": 3, "ram": {"transferred": 1000}});
        assert_eq!(
            stats(&info),
            MigrationStats {
                total_ms: 840,
                downtime_ms: 12,
                setup_ms: 3,
                transferred: 1000
            }
        );
    }
}
