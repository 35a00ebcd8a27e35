//! What a host agent keeps across a restart of its daemon that belongs to this host alone:
//! budget counters, a group's fault on this host, a restart in flight. Admin flags and run-time
//! settings are VM-wide and live in [`crate::records::VmSettings`] / [`crate::records::VmAdmin`].
//! Opaque to the daemon: it stores the serde form and hands it back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vmha_model::Name;

use crate::time::Timestamp;

/// The persistent, host-local part of a [`crate::HostAgent`]. Entries for VMs or apps that are
/// no longer configured are ignored on restore.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostAgentState {
    #[serde(default)]
    pub(crate) vms: BTreeMap<Name, VmLocal>,
}

/// The plan a VM was in when the state was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PlanIntent {
    /// Restart on this host (already counted in the budget). An intentional stop needs no
    /// record: the stored desired state says it.
    Restart,
}

/// One VM group's host-local state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct VmLocal {
    /// VM restarts on this host still inside the window.
    #[serde(default)]
    pub vm_restarts: Vec<Timestamp>,
    /// Why the group is faulted on this host.
    #[serde(default)]
    pub fault: Option<String>,
    /// A restart in flight (resumed, not counted again).
    #[serde(default)]
    pub plan: Option<PlanIntent>,
    /// The VM ran on this host when this was persisted: finding it not running at the next
    /// start of the daemon is a failure (counted), not a plain start.
    #[serde(default)]
    pub running: bool,
    /// The last `clear` generation of the admin record this host applied.
    #[serde(default)]
    pub clear_seen: u64,
    /// In-guest restarts per app still inside their window.
    #[serde(default)]
    pub app_restarts: BTreeMap<Name, Vec<Timestamp>>,
}

impl VmLocal {
    /// Nothing worth keeping.
    pub fn is_empty(&self) -> bool {
        *self == VmLocal::default()
    }
}

/// Which persisted parts of a VM group changed since they were last handed out for persisting.
/// Set by every mutation of persisted data; the engine never compares whole states to find out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Dirty {
    /// The host-local state ([`VmLocal`]).
    pub local: bool,
    /// The VM-wide settings ([`crate::records::VmSettings`]).
    pub settings: bool,
}

impl Dirty {
    /// Adds `other`'s marks.
    pub fn merge(&mut self, other: Dirty) {
        self.local |= other.local;
        self.settings |= other.settings;
    }
}
