//! What a hypervisor driver sees of a VM and of the apps in its guest: the vocabulary shared by
//! the drivers (`vmha-qemu`), which report what they observe as it is, and the engine
//! (`vmha-engine`), which judges it. It lives here, in the lowest crate both depend on, so
//! neither keeps a copy of the other's types: a driver returns these, the engine takes them.
//!
//! Nothing here decides anything: a paused VM's [`PauseReason`] says why QEMU stopped its
//! vCPUs, not whether that is a failure (the engine's call, SPEC §4.3); a probe's
//! [`ProbeOutcome::Unreadable`] says the guest's answer could not be trusted, not what to do.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Name;

/// How a process in the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// One app check of a batched probe (all checks of a VM run in one guest round trip).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeCheck {
    /// The app.
    pub app: Name,
    /// Its `check` argv; exit 0 means the app runs.
    pub argv: Vec<String>,
    /// Its `timeout`: the guest stops the check after this long.
    pub timeout: Duration,
}

/// Why a check's answer could not be read or trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unreadable {
    /// The guest's answer held no valid status line for this check (garbled or cut output).
    Missing,
    /// The guest has no `sleep` command, so the check could not be run under its timeout.
    NoSleepCommand,
    /// The check's argv is empty or holds a NUL byte: it was not run.
    InvalidArgv,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unreadable::Missing => "no status line for this check in the guest's answer",
            Unreadable::NoSleepCommand => "the guest has no sleep command",
            Unreadable::InvalidArgv => "invalid check argv",
        })
    }
}

/// The outcome of one app's check inside a batched probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeOutcome {
    /// The check exited 0.
    Running,
    /// The check exited non-zero, or a signal killed it.
    NotRunning(ExitStatus),
    /// The check did not finish within its `timeout`.
    TimedOut,
    /// The guest answered, but not in a way that says whether the app runs.
    Unreadable(Unreadable),
}

/// Why a VM's vCPUs are stopped while its QEMU runs: QEMU's run state from `query-status`
/// (libvirt's pause reasons map onto the same categories).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseReason {
    /// `paused`: the QMP `stop` command (an admin, or a tool acting for one).
    Admin,
    /// `debug`: stopped by a debugger (gdbstub).
    Debug,
    /// `suspended`: the guest suspended itself to RAM (ACPI S3).
    Suspended,
    /// `io-error`: a disk I/O error with `werror`/`rerror=stop`.
    IoError,
    /// `internal-error`: the emulation failed (e.g. KVM_EXIT_INTERNAL_ERROR).
    InternalError,
    /// `guest-panicked`: the guest panicked (pvpanic, Hyper-V crash) and QEMU paused it.
    GuestPanicked,
    /// `watchdog`: the emulated watchdog fired with `-action watchdog=pause`.
    Watchdog,
    /// `inmigrate`, `postmigrate`, `finish-migrate`, `colo`: a migration holds the vCPUs.
    Migration,
    /// `save-vm`, `restore-vm`: a snapshot is being taken or loaded.
    Snapshot,
    /// `prelaunch`: QEMU was started with `-S` and the guest never ran yet.
    Prelaunch,
    /// A run state this build does not know.
    Other,
}

impl PauseReason {
    /// The reason's name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Admin => "admin",
            PauseReason::Debug => "debug",
            PauseReason::Suspended => "suspended",
            PauseReason::IoError => "io-error",
            PauseReason::InternalError => "internal-error",
            PauseReason::GuestPanicked => "guest-panicked",
            PauseReason::Watchdog => "watchdog",
            PauseReason::Migration => "migration",
            PauseReason::Snapshot => "snapshot",
            PauseReason::Prelaunch => "prelaunch",
            PauseReason::Other => "other",
        }
    }
}

impl fmt::Display for PauseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the hypervisor driver observed of a VM (QMP events, the periodic status poll, and
/// adoption at daemon start), as it is: the engine judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmObservation {
    /// The VM runs (status poll, or found running at adoption).
    Running,
    /// The VM shut down (`SHUTDOWN`, or run state `shutdown`); `by_guest` when the guest
    /// itself powered off.
    Stopped {
        /// The guest initiated it.
        by_guest: bool,
    },
    /// The guest reset (`RESET`): it reboots.
    Reset,
    /// The VM's vCPUs are stopped while QEMU runs (`STOP`, or a paused run state), and why.
    Paused {
        /// QEMU's run state.
        reason: PauseReason,
    },
    /// The vCPUs run again (`RESUME`).
    Resumed,
    /// The guest panicked (`GUEST_PANICKED`) or the emulated watchdog fired (`WATCHDOG`).
    Panicked,
    /// The QEMU process is gone (QMP socket closed, process exited, nothing to adopt).
    Gone,
    /// QEMU is there (its QMP socket accepted the driver) but did not answer `query-status`
    /// in time or properly: whether the VM runs is not known.
    Unresponsive,
}

/// How the watch finds an app's process in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessRef {
    /// The pid in this file (an absolute guest path).
    PidFile(String),
    /// The process of this name (as `pidof -s` finds it).
    Name(String),
}

/// One app the VM's watcher waits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchTarget {
    /// The app.
    pub app: Name,
    /// Its process.
    pub process: ProcessRef,
    /// Its `check` argv, which the watcher runs the moment the process is gone (empty: none,
    /// the app is then checked by a probe).
    #[serde(default)]
    pub check: Vec<String>,
    /// Its check's `timeout`: the watcher stops the check after this long.
    #[serde(default)]
    pub timeout: Duration,
}

/// How a watcher ended, as the guest's answer says (untrusted: it only brings a check forward).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchEnd {
    /// The process of this app is gone (exited, a zombie, or its pid now names another
    /// process): the VM's apps should be checked now.
    Gone(Name),
    /// Some targets were not found when it started (`not_found`): it ended at once.
    NotFound,
    /// The watcher ended otherwise (killed in the guest, an unreadable answer): no news about
    /// the apps.
    Ended(String),
}

/// A watcher's report: how it ended and the apps whose process it could not find at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchReport {
    /// How it ended.
    pub end: WatchEnd,
    /// Apps whose process could not be found when it started (left to interval checks).
    pub not_found: Vec<Name>,
    /// With [`WatchEnd::Gone`]: the outcome of that app's check, which the watcher ran the
    /// moment it saw the process gone (`None`: it did not, or its answer was not readable;
    /// the app is then probed at once).
    #[serde(default)]
    pub checked: Option<ProbeOutcome>,
}
