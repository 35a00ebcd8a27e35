//! The cluster controller (SPEC §4.4, the patent's "cluster controller"): one elected instance
//! places VM groups on hosts and moves them, writing ownership records only by compare-and-swap.
//!
//! Driving protocol (same shape as [`crate::HostAgent`]): on election, feed the current lease
//! of every configured host ([`ControllerInput::HostLease`], `up = false` for hosts without a
//! live lease), the ownership record of every VM ([`ControllerInput::Ownership`], revision 0
//! when absent) and the latest report of each host per VM; then every change. The controller
//! acts on a VM only once its record is known, and on a host only once its lease is known.
//!
//! Safety (SPEC §4.6): a VM group is given to a new host only when the old owner reported it
//! not running (`running = false`) or the old owner's lease EXPIRED in the store; a move of a
//! running VM first sets `desired = stop` with `move_to` on the old owner's record.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmha_model::{Config, HostState, Name, VmState};

use crate::command::{AdminCommand, CommandError};
use crate::event::Event;
use crate::host_io::{Desired, VmReport};
use crate::ids::ActionId;
use crate::time::Timestamp;

/// The ownership record of a VM group in the cluster store (without its revision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The host allowed to run the VM (`None`: nobody).
    pub owner: Option<Name>,
    /// What the owner must do.
    pub desired: Desired,
    /// Set while a move is in progress: the owner stops the VM, then the controller gives it
    /// to this host.
    #[serde(default)]
    pub move_to: Option<Name>,
    /// Stopped by a maintenance drain with nowhere to go: runs again on its owner when the
    /// owner leaves maintenance.
    #[serde(default)]
    pub parked: bool,
}

/// An input to the [`Controller`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "kebab-case")]
pub enum ControllerInput {
    /// A host's lease: `up` when live, `false` once the store EXPIRED it (never on mere
    /// suspicion: only an expired lease lets the controller fail the host's VMs over).
    HostLease {
        /// Host.
        host: Name,
        /// Lease live.
        up: bool,
    },
    /// A host's memory for VMs, when its config has no `memory_mb`.
    HostCapacity {
        /// Host.
        host: Name,
        /// MiB available to VMs.
        memory_mb: u64,
    },
    /// A host's report about a VM group (see [`crate::HostActionKind::Report`]).
    Report {
        /// Reporting host.
        host: Name,
        /// VM.
        vm: Name,
        /// Report.
        report: VmReport,
    },
    /// The ownership record as stored, with its revision (0 and `None`: no record).
    Ownership {
        /// VM.
        vm: Name,
        /// Record.
        record: Option<OwnerRecord>,
        /// Store revision of the record.
        revision: u64,
    },
    /// The result of a [`ControllerActionKind::CasOwner`]: `ok = false` when the revision did
    /// not match (the new record then arrives as [`ControllerInput::Ownership`]).
    CasResult {
        /// The CAS action.
        id: ActionId,
        /// Swapped.
        ok: bool,
    },
}

/// What the controller asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ControllerActionKind {
    /// Write `record` if the stored revision is still `expected_revision` (0: no record).
    /// Answer with [`ControllerInput::CasResult`].
    CasOwner {
        /// VM.
        vm: Name,
        /// Revision the record must still have.
        expected_revision: u64,
        /// New record.
        record: OwnerRecord,
    },
    /// Raise an alert to operators (the group is faulted cluster-wide). Needs no answer.
    Alert {
        /// VM.
        vm: Name,
    },
}

/// A controller action with its id and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerAction {
    /// Echo in the result.
    pub id: ActionId,
    /// What to do.
    pub kind: ControllerActionKind,
    /// Why.
    pub reason: String,
}

/// What the controller must keep across a failover of the controller itself: maintenance
/// flags, frozen groups, fault history (host → time per VM) and cluster-wide faults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ControllerState {
    pub(crate) maintenance: Vec<Name>,
    pub(crate) frozen: Vec<Name>,
    pub(crate) faults: Vec<(Name, Name, Timestamp)>,
    pub(crate) faulted: Vec<(Name, String)>,
}

/// A host as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Host.
    pub name: Name,
    /// `None` until its lease is known.
    pub state: Option<HostState>,
    /// Memory for VMs in MiB, if known.
    pub capacity_mb: Option<u64>,
    /// Memory of the VM groups it owns with desired `run`.
    pub used_mb: u64,
}

/// A VM group as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVmView {
    /// VM.
    pub name: Name,
    /// Cluster-wide state.
    pub state: VmState,
    /// Stored record, if known.
    pub record: Option<OwnerRecord>,
    /// Its revision.
    pub revision: u64,
    /// Frozen.
    pub frozen: bool,
    /// Hosts where it faulted, and when.
    pub faulted_on: Vec<(Name, Timestamp)>,
    /// Why it waits, or why it is faulted cluster-wide.
    pub note: Option<String>,
}

/// The controller's view, for `vmha status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerStatus {
    /// Hosts in config order.
    pub hosts: Vec<HostView>,
    /// VM groups in config order.
    pub vms: Vec<ClusterVmView>,
}

/// The cluster controller (see the module documentation for the driving protocol).
#[derive(Debug)]
pub struct Controller {
    config: Arc<Config>,
    actions: VecDeque<ControllerAction>,
    events: VecDeque<Event>,
}

impl Controller {
    /// Creates the controller, restoring maintenance flags, frozen groups and fault history
    /// from `restored` (names no longer configured are ignored).
    pub fn new(config: Arc<Config>, restored: Option<ControllerState>, now: Timestamp) -> Self {
        let _ = (config, restored, now);
        todo!()
    }

    /// The configuration the controller runs.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Feeds one input at `now`. Inputs about unknown hosts or VMs are ignored.
    pub fn handle_input(&mut self, now: Timestamp, input: ControllerInput) {
        let _ = (now, input);
        todo!()
    }

    /// Applies an admin command routed to the controller ([`crate::Route::Controller`] or
    /// [`crate::Route::Both`]). On `Err` nothing changed.
    pub fn command(&mut self, now: Timestamp, cmd: AdminCommand) -> Result<(), CommandError> {
        let _ = (now, cmd);
        todo!()
    }

    /// Call when `now` has reached [`Controller::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let _ = now;
        todo!()
    }

    /// The earliest time the controller needs [`Controller::handle_timeout`] (a fault window
    /// ending for a VM that waits for a host), if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        todo!()
    }

    /// The next action.
    pub fn poll_action(&mut self) -> Option<ControllerAction> {
        self.actions.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The controller's view of hosts and VM groups.
    pub fn status(&self) -> ControllerStatus {
        todo!()
    }

    /// The persistent state (see [`ControllerState`]).
    pub fn state(&self) -> ControllerState {
        todo!()
    }

    /// `true` once after anything in [`Controller::state`] changed; resets the flag.
    pub fn take_state_changed(&mut self) -> bool {
        todo!()
    }
}
