//! The guest channel through libvirt's agent passthrough (`virDomainQemuAgentCommand`).
//!
//! The same calls as the QEMU driver's [`vmha_qemu::QgaClient`], with its parsing and its
//! hostile-guest rules ([`crate::channel`]): every request carries an id that its reply must
//! carry, replies are capped per command before they are parsed, parsed into the QEMU driver's
//! typed structs ([`vmha_qemu::GuestInfo`], [`vmha_qemu::qga::ExecStarted`],
//! [`vmha_qemu::qga::ExecStatus`]) off the runtime workers when long, a domain over its byte
//! budget or rate is [`QgaError::Hostile`] and not called during a backoff; the batched probe
//! is the QEMU driver's ([`vmha_qemu::probe::probe_request`],
//! [`vmha_qemu::probe::parse_output`]). libvirt syncs with the agent before each command; this
//! module bounds each call in time (libvirt's agent timeout and a tokio timeout around it).

use std::sync::Arc;
use std::time::Duration;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::{Value, json};
use tokio::time::Instant;
use vmha_model::{Name, ProbeCheck, ProbeOutcome};
use vmha_qemu::guest_text::guest_text;
use vmha_qemu::qga::{ExecStarted, ExecStatus, INFO_LINE, SMALL_LINE, exec_blocked};
use vmha_qemu::reply::RemoteError;
use vmha_qemu::{ExecOutput, ExecRequest, GuestInfo, ProbeError, QgaConfig, QgaError};

use crate::channel::Channel;
use crate::domain::{Domain, DomainError};

/// The guest agent of one libvirt domain. Cheap to clone (clones share the domain's byte
/// rate and backoff).
#[derive(Clone)]
pub struct Agent {
    domain: Domain,
    config: QgaConfig,
    channel: Arc<Channel>,
}

impl Agent {
    /// The agent of `domain`, with the QEMU driver's tunables (`call_timeout`, exec polling,
    /// `max_line`, `byte_rate`, `hostile_backoff`).
    pub fn new(domain: Domain, config: QgaConfig) -> Agent {
        let channel = Arc::new(Channel::new(domain.name(), &config));
        Agent {
            domain,
            config,
            channel,
        }
    }

    /// Runs one command through libvirt within `timeout`; its reply (at most `cap` bytes and
    /// [`QgaConfig::max_line`]) is parsed as `T` and turned into the result by `convert`.
    async fn call<T, R, F>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
        cap: usize,
        convert: F,
    ) -> Result<R, QgaError>
    where
        T: DeserializeOwned + Send + 'static,
        R: Send + 'static,
        F: FnOnce(T) -> Result<R, String> + Send + 'static,
    {
        // libvirt counts in whole seconds: round up, never 0 (which would not wait at all).
        let seconds = i32::try_from(timeout.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
        let send = |request: String| async move {
            tokio::time::timeout(
                timeout + Duration::from_millis(500),
                self.domain.agent_command(request, seconds),
            )
            .await
            .map_err(|_| QgaError::Timeout {
                command: command.to_owned(),
                timeout,
            })?
            .map_err(|e| agent_error(command, timeout, e))
        };
        self.channel
            .call(
                command,
                arguments,
                cap.min(self.config.max_line),
                convert,
                send,
            )
            .await
    }

    /// `guest-ping` within `timeout`.
    pub async fn ping_within(&self, timeout: Duration) -> Result<(), QgaError> {
        self.call("guest-ping", None, timeout, SMALL_LINE, |_: IgnoredAny| {
            Ok(())
        })
        .await
    }

    /// `guest-info` within `timeout`.
    pub async fn info_within(&self, timeout: Duration) -> Result<GuestInfo, QgaError> {
        self.call("guest-info", None, timeout, INFO_LINE, Ok).await
    }

    /// Runs a program in the guest as [`vmha_qemu::QgaClient::exec`] does: `guest-exec`, then
    /// `guest-exec-status` polls (from `request.first_poll` or `poll_initial`, backing off up
    /// to `poll_max`) until it exits or `request.deadline` passes
    /// ([`QgaError::ExecDeadline`]). A pid, exit code or signal out of range is
    /// [`QgaError::Malformed`].
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
            use base64::Engine as _;
            arguments["input-data"] =
                json!(base64::engine::general_purpose::STANDARD.encode(input));
        }
        let pid = self
            .call(
                "guest-exec",
                Some(arguments),
                self.bounded(deadline),
                SMALL_LINE,
                |s: ExecStarted| Ok(s.pid),
            )
            .await
            .map_err(exec_blocked)?;
        let mut interval = request.first_poll.unwrap_or(self.config.poll_initial);
        // With a first poll timed by the caller, later polls start from a quarter of it.
        let mut first = request.first_poll.is_some();
        loop {
            tokio::time::sleep(interval.min(deadline.saturating_duration_since(Instant::now())))
                .await;
            if Instant::now() >= deadline {
                return Err(QgaError::ExecDeadline { pid });
            }
            let cap = request.output_cap;
            let status = self
                .call(
                    "guest-exec-status",
                    Some(json!({ "pid": pid })),
                    self.bounded(deadline),
                    request.max_reply_line,
                    move |s: ExecStatus| s.into_output(cap),
                )
                .await
                .map_err(exec_blocked)?;
            if let Some(output) = status {
                return Ok(output);
            }
            interval = if std::mem::take(&mut first) {
                (interval / 4).max(self.config.poll_initial)
            } else {
                interval * 2
            }
            .min(self.config.poll_max);
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

/// A libvirt failure on the guest channel, in the QGA client's terms: an agent that does not
/// answer (or is not connected) is a timeout; an error the agent returned (libvirt reports it
/// as "unable to execute QEMU agent command", with the agent's description) is
/// [`QgaError::Remote`] (`CommandNotFound` when the agent does not know the command); anything
/// else the channel failing. libvirt's text may carry the guest's: it is made safe
/// ([`guest_text`]).
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
        DomainError::Libvirt { detail, .. }
            if detail.contains("unable to execute QEMU agent command") =>
        {
            let class = if detail.contains("has not been found") {
                "CommandNotFound"
            } else {
                "GenericError"
            };
            QgaError::Remote {
                command: command.to_owned(),
                error: RemoteError {
                    class: class.into(),
                    desc: guest_text(&detail),
                },
            }
        }
        other => QgaError::Connect {
            path: "libvirt".into(),
            source: std::io::Error::other(guest_text(&other.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn libvirt(detail: &str) -> DomainError {
        DomainError::Libvirt {
            domain: "d".into(),
            what: "agent command",
            detail: detail.into(),
        }
    }

    #[test]
    fn libvirt_failures_map_to_channel_errors() {
        let timeout = Duration::from_secs(1);
        let e = agent_error(
            "guest-ping",
            timeout,
            libvirt("Guest agent is not responding: QEMU guest agent is not connected"),
        );
        assert!(matches!(e, QgaError::Timeout { .. }), "{e:?}");
        let e = agent_error("guest-ping", timeout, DomainError::NoDomain("d".into()));
        assert!(matches!(e, QgaError::Connect { .. }), "{e:?}");
    }

    /// The agent's own errors, as libvirt words them, are the agent's errors: a disabled or
    /// unknown `guest-exec` is blocked, any other failure of it the command's; the guest's
    /// text in them is made safe.
    #[test]
    fn agent_errors_through_libvirt_are_remote_errors_with_safe_text() {
        let timeout = Duration::from_secs(1);
        let unknown = "internal error: unable to execute QEMU agent command 'guest-exec': \
                       The command guest-exec has not been found";
        let e = exec_blocked(agent_error("guest-exec", timeout, libvirt(unknown)));
        assert!(matches!(e, QgaError::ExecBlocked { .. }), "{e:?}");
        let disabled = "internal error: unable to execute QEMU agent command 'guest-exec': \
                        Command guest-exec has been disabled";
        let e = exec_blocked(agent_error("guest-exec", timeout, libvirt(disabled)));
        assert!(matches!(e, QgaError::ExecBlocked { .. }), "{e:?}");
        let hostile = "internal error: unable to execute QEMU agent command 'guest-exec': \
                       a\u{202e}b\u{2028}c\u{2029}d\u{200b}e\u{1b}[2J"
            .to_owned()
            + &"x".repeat(100_000);
        match agent_error("guest-exec", timeout, libvirt(&hostile)) {
            QgaError::Remote { command, error } => {
                assert_eq!(command, "guest-exec");
                let text = format!("{error} {error:?}");
                assert!(
                    !text.chars().any(vmha_qemu::guest_text::is_unsafe),
                    "{text:?}"
                );
                assert!(text.len() < 2000);
            }
            other => panic!("{other:?}"),
        }
        let e = agent_error(
            "guest-ping",
            timeout,
            libvirt(&hostile.replace("unable", "")),
        );
        assert!(!e.to_string().chars().any(vmha_qemu::guest_text::is_unsafe));
    }
}
