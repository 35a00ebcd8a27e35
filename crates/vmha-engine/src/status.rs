//! Read-only views served by `vmha status` and `vmha explain VM`.

use serde::{Deserialize, Serialize};
use vmha_model::{AppState, Name, Policy, Tie, VmState};

use crate::decision_agent::Verdict;
use crate::host_io::Desired;
use crate::time::Timestamp;

/// Every VM group this host may run (its `hosts` list contains the host), in config order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// This host.
    pub host: Name,
    /// VM groups.
    pub vms: Vec<VmStatus>,
}

/// One VM group as this host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM name.
    pub name: Name,
    /// State on this host.
    pub state: VmState,
    /// Owner per the cluster store (`None` if no owner or not known yet).
    pub owner: Option<Name>,
    /// Desired state per the cluster store, if known.
    pub desired: Option<Desired>,
    /// Frozen: monitored, never acted upon.
    pub frozen: bool,
    /// Paused on purpose (an admin, a debugger, a migration): no probes and no guest-loss
    /// timers meanwhile.
    pub paused: bool,
    /// Why it is paused, when it is.
    #[serde(default)]
    pub pause_reason: Option<crate::PauseReason>,
    /// Its QEMU did not answer when last asked (it runs, stopped or stuck, for example on its
    /// storage): the VM is taken as running (never started twice) until its QEMU answers
    /// again or its guest channel's loss decides; `false` once it answers.
    #[serde(default)]
    pub qemu_unresponsive: bool,
    /// Guest channel reachable (`None`: no news since the VM started).
    pub guest_channel_up: Option<bool>,
    /// The guest agent refuses `guest-exec` (its configuration blocks it): apps are not
    /// probed and show `unknown`.
    #[serde(default)]
    pub guest_exec_blocked: bool,
    /// Effective policy.
    pub policy: Policy,
    /// Effective tie rule.
    pub tie: Tie,
    /// VM restarts counted in the current window.
    pub vm_restarts_in_window: u32,
    /// Effective `vm_restart_limit`.
    pub vm_restart_limit: u32,
    /// Effective `vm_restart_window` in ms.
    pub vm_restart_window_ms: u64,
    /// The step of the plan in progress (e.g. `stopping apps`, `waiting for guest channel`).
    pub plan: Option<String>,
    /// Why the group is faulted on this host, when it is.
    pub fault: Option<String>,
    /// The last decisions of the decision agent, oldest first (at most 8).
    pub decisions: Vec<DecisionRecord>,
    /// Apps, in config order.
    pub apps: Vec<AppStatus>,
}

/// One decision-agent run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// When.
    pub time: Timestamp,
    /// The verdict.
    pub verdict: Verdict,
    /// The arithmetic.
    pub reason: String,
}

/// An app's intentionally-offline flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineFlag {
    /// Cleared automatically when the app is seen running.
    pub auto_clear: bool,
}

/// One app as this host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    /// App name.
    pub name: Name,
    /// State.
    pub state: AppState,
    /// Effective priority.
    pub priority: u32,
    /// Marked critical.
    pub critical: bool,
    /// Intentionally-offline flag, if set.
    pub offline: Option<OfflineFlag>,
    /// Restarts counted in the current window.
    pub restarts_in_window: u32,
    /// Effective `restart_limit`.
    pub restart_limit: u32,
    /// Effective `restart_window` in ms.
    pub restart_window_ms: u64,
    /// Consecutive probe timeouts so far.
    pub consecutive_timeouts: u32,
    /// Reason of its last state change.
    pub reason: String,
}
