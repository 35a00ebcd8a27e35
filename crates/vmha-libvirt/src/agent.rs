//! The guest channel through libvirt's agent passthrough (`virDomainQemuAgentCommand`).
//!
//! The same calls as the QEMU driver's [`vmha_qemu::QgaClient`], with its parsing: the
//! `guest-exec` request, the checked `guest-exec-status` result and the batched probe come from
//! `vmha_qemu` ([`vmha_qemu::qga::exec_started`], [`vmha_qemu::qga::exec_status`],
//! [`vmha_qemu::probe::probe_request`], [`vmha_qemu::probe::parse_output`]). libvirt syncs
//! with the agent before each command and matches its reply; this module bounds each call in
//! time (libvirt's agent timeout and a tokio timeout around it) and refuses a reply longer
//! than the request's cap before parsing it.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use vmha_model::{Name, ProbeCheck, ProbeOutcome};
use vmha_qemu::qga::{exec_blocked, exec_started, exec_status};
use vmha_qemu::reply::{Message, parse_line};
use vmha_qemu::{ExecOutput, ExecRequest, GuestInfo, ProbeError, QgaConfig, QgaError};

use crate::domain::{Domain, DomainError};

/// Cap on the reply of a small command (`guest-ping`, `guest-exec`'s pid).
const SMALL_REPLY: usize = 4 << 10;
/// Cap on the reply of `guest-info` (the list of commands).
const INFO_REPLY: usize = 64 << 10;

/// The guest agent of one libvirt domain. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    domain: Domain,
    config: QgaConfig,
}

impl Agent {
    /// The agent of `domain`, with the QEMU driver's tunables (`call_timeout`, exec polling,
    /// `max_line`).
    pub fn new(domain: Domain, config: QgaConfig) -> Agent {
        Agent { domain, config }
    }

    /// Runs one command through libvirt within `timeout`, its reply capped at `cap` bytes;
    /// returns its `return` value.
    pub async fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
        cap: usize,
    ) -> Result<Value, QgaError> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let timeout_error = || QgaError::Timeout {
            command: command.to_owned(),
            timeout,
        };
        // libvirt counts in whole seconds: round up, never 0 (which would not wait at all).
        let seconds = i32::try_from(timeout.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
        let reply = tokio::time::timeout(
            timeout + Duration::from_millis(500),
            self.domain.agent_command(request.to_string(), seconds),
        )
        .await
        .map_err(|_| timeout_error())?
        .map_err(|e| agent_error(command, timeout, e))?;
        parse_reply(command, &reply, cap.min(self.config.max_line))
    }

    /// `guest-ping` within `timeout`.
    pub async fn ping_within(&self, timeout: Duration) -> Result<(), QgaError> {
        self.call("guest-ping", None, timeout, SMALL_REPLY)
            .await
            .map(|_| ())
    }

    /// `guest-info` within `timeout`.
    pub async fn info_within(&self, timeout: Duration) -> Result<GuestInfo, QgaError> {
        let value = self.call("guest-info", None, timeout, INFO_REPLY).await?;
        serde_json::from_value(value).map_err(|e| QgaError::Malformed {
            command: "guest-info".into(),
            detail: vmha_qemu::guest_text::guest_text(&e.to_string()),
        })
    }

    /// Runs a program in the guest as [`vmha_qemu::QgaClient::exec`] does: `guest-exec`, then
    /// `guest-exec-status` polls (doubling from `poll_initial` to `poll_max`) until it exits
    /// or `request.deadline` passes ([`QgaError::ExecDeadline`]).
    pub async fn exec(&self, request: &ExecRequest) -> Result<ExecOutput, QgaError> {
        let deadline = Instant::now() + request.deadline;
        let malformed = |command: &str, detail: String| QgaError::Malformed {
            command: command.into(),
            detail,
        };
        let Some((path, args)) = request.argv.split_first() else {
            return Err(malformed("guest-exec", "empty argv".into()));
        };
        let mut arguments = json!({"path": path, "arg": args, "capture-output": true});
        if !request.env.is_empty() {
            arguments["env"] = json!(request.env);
        }
        if let Some(input) = &request.input {
            use base64::Engine as _;
            arguments["input-data"] =
                json!(base64::engine::general_purpose::STANDARD.encode(input));
        }
        let started = self
            .call(
                "guest-exec",
                Some(arguments),
                self.bounded(deadline),
                SMALL_REPLY,
            )
            .await
            .map_err(exec_blocked)?;
        let pid = exec_started(started).map_err(|d| malformed("guest-exec", d))?;
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
                    Some(json!({ "pid": pid })),
                    self.bounded(deadline),
                    request.max_reply_line,
                )
                .await
                .map_err(exec_blocked)?;
            if let Some(output) = exec_status(status, request.output_cap)
                .map_err(|d| malformed("guest-exec-status", d))?
            {
                return Ok(output);
            }
            interval = (interval * 2).min(self.config.poll_max);
        }
    }

    /// Every check in ONE `guest-exec`, exactly the QEMU driver's probe; one outcome per check,
    /// in order.
    pub async fn probe(
        &self,
        checks: &[ProbeCheck],
        slack: Duration,
    ) -> Result<Vec<(Name, ProbeOutcome)>, ProbeError> {
        let (request, nonce) = vmha_qemu::probe::probe_request(checks, slack);
        let output = self.exec(&request).await?;
        Ok(vmha_qemu::probe::parse_output(
            checks,
            nonce,
            &output.stdout,
        ))
    }

    fn bounded(&self, deadline: Instant) -> Duration {
        self.config
            .call_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
    }
}

/// The agent's reply to `command` as libvirt returns it: refused above `cap` bytes before it is
/// parsed; its `return` value, or the agent's error, or [`QgaError::Malformed`] (with a safe,
/// sanitised description) for anything else. Total over arbitrary text.
pub fn parse_reply(command: &str, reply: &str, cap: usize) -> Result<Value, QgaError> {
    if reply.len() > cap {
        return Err(QgaError::LineTooLong { max: cap });
    }
    let malformed = |detail: String| QgaError::Malformed {
        command: command.to_owned(),
        detail,
    };
    match parse_line(reply.as_bytes()) {
        Ok(Message::Return { value, .. }) => Ok(value),
        Ok(Message::Error { error, .. }) => Err(QgaError::Remote {
            command: command.to_owned(),
            error,
        }),
        Ok(_) => Err(malformed("not a reply".into())),
        Err(e) => Err(malformed(vmha_qemu::guest_text::guest_text(&e.to_string()))),
    }
}

/// A libvirt failure on the guest channel, in the QGA client's terms: an agent that does not
/// answer (or is not connected) is a timeout, anything else the channel failing.
fn agent_error(command: &str, timeout: Duration, e: DomainError) -> QgaError {
    match e {
        DomainError::Timeout { .. } => QgaError::Timeout {
            command: command.to_owned(),
            timeout,
        },
        DomainError::Libvirt { detail, .. }
            if detail.contains("not responding") || detail.contains("timed out") =>
        {
            QgaError::Timeout {
                command: command.to_owned(),
                timeout,
            }
        }
        other => QgaError::Connect {
            path: "libvirt".into(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replies_are_capped_before_parsing() {
        let big = format!("{{\"return\": \"{}\"}}", "A".repeat(5000));
        assert!(matches!(
            parse_reply("guest-ping", &big, 4096),
            Err(QgaError::LineTooLong { max: 4096 })
        ));
        assert_eq!(
            parse_reply("guest-ping", &big, 8192).unwrap(),
            Value::String("A".repeat(5000))
        );
    }

    #[test]
    fn hostile_replies_are_typed_errors_with_safe_text() {
        for garbage in [
            "",
            "nonsense",
            "{\"return\": 1",
            "[1,2]",
            "{\"event\": \"X\"}",
        ] {
            match parse_reply("guest-exec", garbage, 4096) {
                Err(QgaError::Malformed { command, detail }) => {
                    assert_eq!(command, "guest-exec");
                    assert!(!detail.chars().any(char::is_control), "{detail:?}");
                }
                other => panic!("{garbage:?}: {other:?}"),
            }
        }
        let err = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"bad\\u001b[2Jthing\"}}";
        match parse_reply("guest-exec", err, 4096) {
            Err(QgaError::Remote { command, error }) => {
                assert_eq!(command, "guest-exec");
                assert!(!error.to_string().contains('\u{1b}'), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn libvirt_failures_map_to_channel_errors() {
        let timeout = Duration::from_secs(1);
        let e = agent_error(
            "guest-ping",
            timeout,
            DomainError::Libvirt {
                domain: "d".into(),
                what: "agent command",
                detail: "Guest agent is not responding: QEMU guest agent is not connected".into(),
            },
        );
        assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
        let e = agent_error("guest-ping", timeout, DomainError::NoDomain("d".into()));
        assert!(matches!(e, QgaError::Connect { .. }), "{e:?}");
    }
}
