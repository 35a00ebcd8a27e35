//! What a [`crate::HostAgent`] is told (inputs) and what it asks its driver to do (actions).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmha_model::{Name, VmState};

use crate::ids::ActionId;

pub use vmha_model::observation::{
    ExitStatus, PauseReason, ProbeCheck, ProbeOutcome, ProcessRef, Unreadable, VmObservation,
    WatchEnd, WatchReport, WatchTarget,
};

/// Why an action failed, as the driver reports it. The driver only says what happened; the
/// engine decides what it means (a blocked `guest-exec` or an unreachable guest channel is not
/// the app's fault, a command that ran and failed is). `Display` gives the human text used in
/// event reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum ActionError {
    /// The guest agent answered but refuses `guest-exec` (its configuration blocks it, or it
    /// lacks the command): the guest channel works, nothing can be run in the guest.
    #[error("guest-exec is blocked in the guest agent: {detail}")]
    ExecBlocked {
        /// What the agent said.
        detail: String,
    },
    /// The guest channel could not be used: no answer in time, connection refused or closed,
    /// or answers that could not be read. A command sent may or may not have run.
    #[error("{detail}")]
    GuestUnreachable {
        /// What went wrong.
        detail: String,
    },
    /// The guest agent sent more than it may (a read's byte budget or the channel's rate
    /// limit): the driver disconnected it and waits before connecting again. For the engine the
    /// channel failed, as with [`ActionError::GuestUnreachable`]; the first of a streak is
    /// reported in an event with this detail (the driver's words, no guest text).
    #[error("guest agent disconnected as hostile: {detail}")]
    GuestHostile {
        /// What it did.
        detail: String,
    },
    /// The command ran in the guest and failed: its exit code or the signal that killed it,
    /// or (`status: None`) the agent could not start it.
    #[error("{}", command_failed(status.as_ref(), stderr))]
    CommandFailed {
        /// How it ended (`None`: it could not be started).
        status: Option<ExitStatus>,
        /// The start of its stderr (or the agent's refusal), control characters removed.
        stderr: String,
    },
    /// The command was still running in the guest when its time was up (it may go on there:
    /// the guest agent cannot kill it).
    #[error("still running after {}", crate::time::human(*after_ms))]
    CommandTimedOut {
        /// The time it was given, in milliseconds.
        after_ms: u64,
    },
    /// The hypervisor driver failed (QEMU did not start, stop or die; an I/O error; the host
    /// refused to start a VM while fenced or exiting).
    #[error("{detail}")]
    Driver {
        /// What went wrong.
        detail: String,
    },
    /// Nothing on this host can carry the action out (the VM has no driver here, or its
    /// driver is not supported by this build).
    #[error("{detail}")]
    NotConfigured {
        /// What is missing.
        detail: String,
    },
}

fn command_failed(status: Option<&ExitStatus>, stderr: &str) -> String {
    let stderr = stderr.trim();
    match (status, stderr.is_empty()) {
        (Some(s), true) => s.to_string(),
        (Some(s), false) => format!("{s}: {stderr}"),
        (None, _) => format!("could not be run: {stderr}"),
    }
}

/// What the controller decided for a VM group, as stored in the cluster store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Desired {
    /// The owner host runs it.
    Run,
    /// The owner host stops it (intentionally stopped, or being moved away).
    Stop,
}

/// An input to a [`crate::HostAgent`]: what the driver observed, and the answers to actions.
/// The driver reports facts as they are; the engine judges them (guest liveness, pauses,
/// failed commands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "kebab-case")]
pub enum HostInput {
    /// The answer to a [`HostActionKind::Probe`]: one outcome per app probed.
    /// Outcomes for apps that were not in the probe are ignored.
    ProbeResult {
        /// The probe action.
        id: ActionId,
        /// The VM.
        vm: Name,
        /// One outcome per app.
        outcomes: Vec<(Name, ProbeOutcome)>,
    },
    /// The answer to a [`HostActionKind::PrepareIncoming`]: the URI the incoming QEMU listens
    /// on, or why it could not be prepared.
    IncomingResult {
        /// The action.
        id: ActionId,
        /// `tcp:ADDR:PORT`, or what went wrong.
        result: Result<String, ActionError>,
    },
    /// The answer to a [`HostActionKind::Migrate`]: the migration completed (QEMU's own
    /// figures), or why it did not.
    MigrationResult {
        /// The action.
        id: ActionId,
        /// Figures of the completed migration, or what went wrong.
        result: Result<MigrationFigures, ActionError>,
    },
    /// The answer to a [`HostActionKind::Watch`] whose watcher ended: what its answer says.
    WatchResult {
        /// The watch action.
        id: ActionId,
        /// The VM.
        vm: Name,
        /// How it ended.
        report: WatchReport,
    },
    /// The answer to any other action, and to a probe that could not run (`Err`).
    ActionResult {
        /// The action.
        id: ActionId,
        /// `Ok`, or what went wrong.
        result: Result<(), ActionError>,
    },
    /// The hypervisor driver saw something happen to a VM.
    VmObserved {
        /// The VM.
        vm: Name,
        /// What.
        kind: VmObservation,
    },
    /// This host's lease in the cluster store: `live = false` once it has not been renewed for
    /// `ttl - fence_margin` — the agent then kills every VM on this host (self-fencing, even
    /// frozen ones) and starts none until `live = true` again. A new agent assumes no live lease.
    Lease {
        /// Lease live.
        live: bool,
    },
}

/// What a host agent tells the cluster store about a VM group on this host (persisted with the
/// host's state, read by the controller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// The VM group's state on this host.
    pub state: VmState,
    /// `false` only when the VM is known not to run on this host (stopped, killed, never
    /// started): the controller may then give it to another host.
    pub running: bool,
    /// Why.
    pub reason: String,
    /// Revision of the ownership record this report answers: the controller acts only on
    /// reports that answer the record it currently knows.
    pub revision: u64,
    /// This host's side of a live migration, when one concerns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationNote>,
}

/// A completed live migration as QEMU measured it on the source (`query-migrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationFigures {
    /// `total-time`: from `migrate` to completion, in ms.
    pub total_ms: u64,
    /// `downtime`: how long the guest was paused for the final copy, in ms.
    pub downtime_ms: u64,
}

/// What a host says about its side of a live migration (in its [`VmReport`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "migration", rename_all = "kebab-case")]
pub enum MigrationNote {
    /// The target: an incoming QEMU waits for the migration stream at `uri`.
    Incoming {
        /// Where the source sends it (`tcp:ADDR:PORT`).
        uri: String,
    },
    /// This side failed (the target could not prepare, the source's migration failed or was
    /// cancelled): the source keeps running the VM.
    Failed {
        /// Why.
        why: String,
    },
}

/// An action for the driver. Every action is idempotent and answered exactly once: a probe by
/// [`HostInput::ProbeResult`] (or [`HostInput::ActionResult`] with the error that kept it
/// from running), all others by [`HostInput::ActionResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum HostActionKind {
    /// Run these checks in the guest, in one guest round-trip.
    Probe {
        /// The VM.
        vm: Name,
        /// Checks of the apps due.
        checks: Vec<ProbeCheck>,
    },
    /// Start the VM's watcher (replacing any earlier one) waiting on these apps' processes,
    /// and poll it every `period`. Answered by [`HostInput::WatchResult`] when it ends, or by
    /// [`HostInput::ActionResult`] with the error that ended it (a replaced watcher's answer
    /// is ignored).
    Watch {
        /// The VM.
        vm: Name,
        /// The apps and how to find their processes.
        targets: Vec<WatchTarget>,
        /// How often the driver asks the guest agent whether it still runs.
        period: Duration,
    },
    /// Is the guest agent there? `guest-ping` within `timeout`; with `check_exec`, also read
    /// `guest-info`. Answer `Ok` (it answered, and `guest-exec` is allowed if checked),
    /// [`ActionError::ExecBlocked`] (it answered, `guest-exec` is blocked) or
    /// [`ActionError::GuestUnreachable`] (no answer). Asked by the engine, which owns every
    /// guest-liveness timer (`boot_timeout`, `guest_timeout`, when to ping).
    PingGuest {
        /// The VM.
        vm: Name,
        /// Time the ping (and the `guest-info` call) may take.
        timeout: Duration,
        /// Also tell whether `guest-exec` is allowed.
        check_exec: bool,
    },
    /// Run an app's `start` argv in the guest.
    StartApp {
        /// The VM.
        vm: Name,
        /// The app.
        app: Name,
        /// Its start command.
        argv: Vec<String>,
    },
    /// Run an app's `stop` argv in the guest.
    StopApp {
        /// The VM.
        vm: Name,
        /// The app.
        app: Name,
        /// Its stop command.
        argv: Vec<String>,
    },
    /// Start the VM on this host. `Ok` means the VM runs (the guest may still be booting).
    StartVm {
        /// The VM.
        vm: Name,
    },
    /// Stop the VM: graceful shutdown, forced after `timeout`. `Ok` means it no longer runs.
    StopVm {
        /// The VM.
        vm: Name,
        /// Graceful time before forcing.
        timeout: Duration,
    },
    /// Kill the VM at once. `Ok` means it no longer runs.
    KillVm {
        /// The VM.
        vm: Name,
    },
    /// Target side of a live migration: start the VM's QEMU with the same machine spec,
    /// waiting for an incoming migration (`-incoming defer`, then `migrate-incoming`) on this
    /// host's cluster address. Answered by [`HostInput::IncomingResult`] with the URI. The
    /// incoming QEMU runs nothing until the migration completes; then it resumes by itself.
    PrepareIncoming {
        /// The VM.
        vm: Name,
    },
    /// Source side of a live migration: QMP `migrate` to `uri`, followed until it ends.
    /// Answered by [`HostInput::MigrationResult`]. `Ok`: completed (the source's QEMU is paused for good, the target runs the VM); `Err`: it
    /// failed, stalled or was cancelled, and the source's QEMU runs on.
    Migrate {
        /// The VM.
        vm: Name,
        /// The target's `tcp:ADDR:PORT`.
        uri: String,
    },
    /// Cancel the migration in flight (QMP `migrate_cancel`); its [`HostActionKind::Migrate`]
    /// then answers `Err`. `Ok` even when none runs.
    CancelMigration {
        /// The VM.
        vm: Name,
    },
}

/// An action with its id and the reason it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAction {
    /// Echo this in the result.
    pub id: ActionId,
    /// What to do.
    pub kind: HostActionKind,
    /// Why, human-readable.
    pub reason: String,
}
