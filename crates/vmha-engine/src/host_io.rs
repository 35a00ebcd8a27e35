//! What a [`crate::HostAgent`] is told (inputs) and what it asks its driver to do (actions).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmha_model::{Name, VmState};

use crate::ids::ActionId;

/// The outcome of one app's check inside a batched probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeOutcome {
    /// The check exited 0.
    Running,
    /// The check exited non-zero.
    NotRunning {
        /// Its exit code (or a signal number as negative).
        exit: i32,
    },
    /// The check did not finish within the app's `timeout`.
    TimedOut,
}

/// What the VM monitor observed of a VM through the hypervisor driver (QMP events and the
/// periodic status poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmObservation {
    /// The VM is running (status poll, or `RESUME` after start).
    Running,
    /// The VM shut down (`SHUTDOWN`); `by_guest` when the guest itself powered off.
    Stopped {
        /// The guest initiated it.
        by_guest: bool,
    },
    /// The guest reset (`RESET`): it reboots; its apps will be started again.
    Reset,
    /// The VM is paused (`STOP`): no probes until it resumes.
    Paused,
    /// The VM resumed (`RESUME`).
    Resumed,
    /// The guest panicked (`GUEST_PANICKED`, or `WATCHDOG`).
    Panicked,
    /// The QEMU process is gone (QMP socket closed, no process).
    Gone,
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

/// An input to a [`crate::HostAgent`].
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
    /// The guest channel of the VM could not be reached. Answers the VM's probe in flight, if
    /// any; may also be sent on its own (a reconnect failed).
    GuestUnreachable {
        /// The VM.
        vm: Name,
    },
    /// The result of any action but a probe (a probe may also be answered with `Err`: then it
    /// counts as [`HostInput::GuestUnreachable`]).
    ActionResult {
        /// The action.
        id: ActionId,
        /// `Ok` or what went wrong.
        result: Result<(), String>,
    },
    /// The hypervisor driver saw something happen to a VM.
    VmObserved {
        /// The VM.
        vm: Name,
        /// What.
        kind: VmObservation,
    },
    /// The guest channel connected (`up`, after `guest-sync`) or disconnected.
    GuestChannel {
        /// The VM.
        vm: Name,
        /// Connected.
        up: bool,
    },
    /// Whether the guest agent allows `guest-exec` (`guest-info` lists it enabled). Send it
    /// after every connect, before `GuestChannel { up: true }`, and when an exec is refused
    /// as disabled. Blocked: apps are `unknown`, never probed or started; the VM is left alone.
    GuestExec {
        /// The VM.
        vm: Name,
        /// `guest-exec` and `guest-exec-status` are enabled.
        allowed: bool,
    },
    /// This host's lease in the cluster store: `live = false` once it has not been renewed for
    /// `ttl - fence_margin` — the agent then kills every VM on this host (self-fencing, even
    /// frozen ones) and starts none until `live = true` again. A new agent assumes no live lease.
    Lease {
        /// Lease live.
        live: bool,
    },
}

/// One check of a batched probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeCheck {
    /// The app.
    pub app: Name,
    /// Its `check` argv.
    pub argv: Vec<String>,
    /// Its `timeout`.
    pub timeout: Duration,
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
}

/// An action for the driver. Every action is idempotent and answered exactly once: probes by
/// [`HostInput::ProbeResult`] / [`HostInput::GuestUnreachable`], all others by
/// [`HostInput::ActionResult`].
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
