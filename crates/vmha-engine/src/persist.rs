//! What a host agent must keep across a daemon restart (SPEC §4.7: admin flags and run-time
//! changes persist). Opaque to the daemon: it stores the serde form and hands it back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vmha_model::{Name, Policy, Tie};

use crate::status::OfflineFlag;
use crate::time::Timestamp;

/// The persistent part of a [`crate::HostAgent`]: admin flags (intentionally offline, frozen),
/// run-time overrides (priorities, budgets, policy), budget counters (restart timestamps), a
/// VM group's fault on this host, and the plan in flight. Entries for VMs or apps that are no
/// longer configured are ignored on restore.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostAgentState {
    pub(crate) vms: BTreeMap<Name, VmPersist>,
}

/// The plan a VM was in when the state was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PlanIntent {
    /// Restart on this host (already counted in the budget). An intentional stop needs no
    /// record: the stored desired state says it.
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct VmPersist {
    #[serde(default)]
    pub frozen: bool,
    #[serde(default)]
    pub policy: Option<Policy>,
    #[serde(default)]
    pub tie: Option<Tie>,
    #[serde(default)]
    pub vm_restart_limit: Option<u32>,
    #[serde(default)]
    pub vm_restart_window_ms: Option<u64>,
    #[serde(default)]
    pub vm_restarts: Vec<Timestamp>,
    #[serde(default)]
    pub fault: Option<String>,
    #[serde(default)]
    pub plan: Option<PlanIntent>,
    #[serde(default)]
    pub apps: BTreeMap<Name, AppPersist>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct AppPersist {
    #[serde(default)]
    pub offline: Option<OfflineFlag>,
    #[serde(default)]
    pub priority: Option<u32>,
    #[serde(default)]
    pub restart_limit: Option<u32>,
    #[serde(default)]
    pub restart_window_ms: Option<u64>,
    #[serde(default)]
    pub restarts: Vec<Timestamp>,
}
