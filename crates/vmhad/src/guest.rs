//! The guest channel as vmhad uses it, whatever the driver: app commands, operator commands,
//! the batched probe and the ping, over any [`GuestChannel`] (the QEMU driver's QGA client,
//! libvirt's agent passthrough), with one mapping of guest-channel errors onto
//! [`ActionError`]s and one treatment of guest text (sanitised, capped).

use std::future::Future;
use std::time::Duration;

use vmha_api::GuestOutput;
use vmha_engine::{ActionError, ExitStatus, ProbeCheck, ProbeOutcome};
use vmha_model::Name;
use vmha_qemu::{ExecOutput, ExecRequest, GuestInfo, ProbeError, QgaClient, QgaError};

/// A guest agent a driver reaches: the calls vmhad makes, each bounded by the channel itself.
pub trait GuestChannel: Send + Sync {
    /// `guest-exec` and its result (see `vmha_qemu::QgaClient::exec`).
    fn exec(
        &self,
        request: &ExecRequest,
    ) -> impl Future<Output = Result<ExecOutput, QgaError>> + Send;
    /// Every check in one `guest-exec` (see `vmha_qemu::QgaClient::probe`).
    fn probe(
        &self,
        checks: &[ProbeCheck],
        slack: Duration,
    ) -> impl Future<Output = Result<Vec<(Name, ProbeOutcome)>, ProbeError>> + Send;
    /// `guest-ping` within `timeout`.
    fn ping_within(&self, timeout: Duration) -> impl Future<Output = Result<(), QgaError>> + Send;
    /// `guest-info` within `timeout`.
    fn info_within(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<GuestInfo, QgaError>> + Send;
}

impl GuestChannel for QgaClient {
    fn exec(
        &self,
        request: &ExecRequest,
    ) -> impl Future<Output = Result<ExecOutput, QgaError>> + Send {
        QgaClient::exec(self, request)
    }
    fn probe(
        &self,
        checks: &[ProbeCheck],
        slack: Duration,
    ) -> impl Future<Output = Result<Vec<(Name, ProbeOutcome)>, ProbeError>> + Send {
        QgaClient::probe(self, checks, slack)
    }
    fn ping_within(&self, timeout: Duration) -> impl Future<Output = Result<(), QgaError>> + Send {
        QgaClient::ping_within(self, timeout)
    }
    fn info_within(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<GuestInfo, QgaError>> + Send {
        QgaClient::info_within(self, timeout)
    }
}

#[cfg(feature = "libvirt")]
impl GuestChannel for vmha_libvirt::Agent {
    fn exec(
        &self,
        request: &ExecRequest,
    ) -> impl Future<Output = Result<ExecOutput, QgaError>> + Send {
        vmha_libvirt::Agent::exec(self, request)
    }
    fn probe(
        &self,
        checks: &[ProbeCheck],
        slack: Duration,
    ) -> impl Future<Output = Result<Vec<(Name, ProbeOutcome)>, ProbeError>> + Send {
        vmha_libvirt::Agent::probe(self, checks, slack)
    }
    fn ping_within(&self, timeout: Duration) -> impl Future<Output = Result<(), QgaError>> + Send {
        vmha_libvirt::Agent::ping_within(self, timeout)
    }
    fn info_within(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<GuestInfo, QgaError>> + Send {
        vmha_libvirt::Agent::info_within(self, timeout)
    }
}

/// Time the guest channel's own round trips may add to a probe's longest check.
const PROBE_SLACK: Duration = Duration::from_secs(2);

/// What a guest-channel error means: a refused `guest-exec` is the agent's configuration, an
/// error the agent returned for `guest-exec` is the command's (it could not be started), a
/// command still running at its deadline timed out, an agent disconnected for sending too much
/// is hostile (the engine reports it in an event); anything else is the channel failing.
pub(crate) fn guest_error(e: QgaError) -> ActionError {
    match e {
        QgaError::ExecBlocked { detail } => ActionError::ExecBlocked { detail },
        QgaError::Remote { command, error } if command == "guest-exec" => {
            ActionError::CommandFailed {
                status: None,
                stderr: error.to_string(),
            }
        }
        QgaError::Hostile { reason, .. } => ActionError::GuestHostile { detail: reason },
        other => ActionError::GuestUnreachable {
            detail: other.to_string(),
        },
    }
}

/// The `kind` label of `vmha_guest_channel_errors_total` for a guest-channel error.
fn guest_error_kind(e: &QgaError) -> &'static str {
    match e {
        QgaError::Connect { .. } => "connect",
        QgaError::Timeout { .. } => "timeout",
        QgaError::Disconnected => "disconnected",
        QgaError::Remote { .. } => "agent-error",
        QgaError::Malformed { .. } => "malformed",
        QgaError::WrongId { .. } => "wrong-id",
        QgaError::LineTooLong { .. } => "line-too-long",
        QgaError::ExecBlocked { .. } => "exec-blocked",
        QgaError::ExecDeadline { .. } => "exec-deadline",
        QgaError::Write(_) => "write",
        QgaError::Hostile { .. } => "hostile",
    }
}

/// A guest-channel error of an engine's action on `vm`: counted in the metrics, then
/// translated by [`guest_error`].
pub(crate) fn failed(vm: &Name, e: QgaError) -> ActionError {
    crate::metrics::METRICS.guest_error(vm.as_str(), guest_error_kind(&e));
    guest_error(e)
}

/// Time a start/stop command of an app may take in the guest.
const APP_COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// Output kept of an app's start/stop command (its stderr goes into the reason).
const APP_COMMAND_OUTPUT: usize = 4096;
/// Output kept of an operator's guest command.
const OPERATOR_OUTPUT: usize = 64 << 10;

/// A guest command as the driver runs it: the one place an engine's or an operator's argv
/// becomes a `vmha_qemu::ExecRequest`.
fn exec_request(argv: &[String], deadline: Duration, output_cap: usize) -> ExecRequest {
    let mut request = ExecRequest::new(argv.iter().cloned());
    request.deadline = deadline;
    request.output_cap = output_cap;
    request
}

/// Runs an app's start or stop command in the guest of `vm`; `Ok` iff it exits 0.
pub async fn run_app_command<G: GuestChannel>(
    vm: &Name,
    guest: &G,
    argv: &[String],
) -> Result<(), ActionError> {
    let request = exec_request(argv, APP_COMMAND_DEADLINE, APP_COMMAND_OUTPUT);
    let out = match guest.exec(&request).await {
        Ok(out) => out,
        Err(QgaError::ExecDeadline { .. }) => {
            return Err(ActionError::CommandTimedOut {
                after_ms: vmha_model::duration::millis(APP_COMMAND_DEADLINE),
            });
        }
        Err(e) => return Err(failed(vm, e)),
    };
    if out.status == ExitStatus::Code(0) {
        return Ok(());
    }
    // Guest text goes into event reasons: no control or format characters, bounded.
    let stderr = vmha_qemu::guest_text::guest_bytes(&out.stderr);
    Err(ActionError::CommandFailed {
        status: Some(out.status),
        stderr: stderr.trim().to_string(),
    })
}

/// Runs an operator's command in the guest (capped output, bounded time).
pub async fn exec<G: GuestChannel>(
    guest: &G,
    argv: &[String],
    deadline: Duration,
) -> Result<GuestOutput, QgaError> {
    let out = guest
        .exec(&exec_request(argv, deadline, OPERATOR_OUTPUT))
        .await?;
    let (exit, signal) = match out.status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    };
    Ok(GuestOutput {
        exit,
        signal,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        truncated: out.stdout_truncated || out.stderr_truncated,
    })
}

/// Runs the checks of all due apps in one guest round trip; the outcomes as the guest gave
/// them (an unreadable answer is [`ProbeOutcome::Unreadable`], judged by the engine).
pub async fn probe<G: GuestChannel>(
    vm: &Name,
    guest: &G,
    checks: &[ProbeCheck],
) -> Result<Vec<(Name, ProbeOutcome)>, ActionError> {
    crate::guest_io::COUNTERS.probe(checks.len());
    guest
        .probe(checks, PROBE_SLACK)
        .await
        .map_err(|ProbeError::Channel(e)| failed(vm, e))
}

/// Pings the guest agent within `timeout`; with `check_exec`, also reads `guest-info` (in
/// `timeout` again) and answers [`ActionError::ExecBlocked`] when `guest-exec` is blocked.
pub async fn ping<G: GuestChannel>(
    vm: &Name,
    guest: &G,
    timeout: Duration,
    check_exec: bool,
) -> Result<(), ActionError> {
    guest
        .ping_within(timeout)
        .await
        .map_err(|e| failed(vm, e))?;
    if check_exec {
        let info = guest
            .info_within(timeout)
            .await
            .map_err(|e| failed(vm, e))?;
        info.check_exec().map_err(|e| failed(vm, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_guest_is_its_own_error_kind_with_the_reason() {
        let e = guest_error(QgaError::Hostile {
            reason: "sent more than 42 bytes".into(),
            retry_in: Duration::from_secs(1),
        });
        assert_eq!(
            e,
            ActionError::GuestHostile {
                detail: "sent more than 42 bytes".into()
            }
        );
        assert!(matches!(
            guest_error(QgaError::Disconnected),
            ActionError::GuestUnreachable { .. }
        ));
    }
}
