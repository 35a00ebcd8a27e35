//! The records of the cluster store as the engine reads and writes them (SPEC §4.6–4.7).
//!
//! Who writes what, so that every key has exactly one writer:
//!
//! | record | writer | lease | survives |
//! |---|---|---|---|
//! | [`Record::Host`] membership | the host itself | the host's | only while the host lives |
//! | [`Record::Owner`] ownership | the controller, by compare-and-swap | the owner host's (etcd) | until the owner's lease ends |
//! | [`Record::Admin`] desired state, frozen, clears | the controller | none | every failover |
//! | [`Record::Settings`] offline flags, priorities, budgets, policy | the VM's owner host | none | every failover |
//! | [`Record::Report`] the owner's view of the group | the reporting host | none | — |
//! | [`Record::Agent`] budget counters, faults, plan in flight | that host | none | restarts of that host |
//! | [`Record::Controller`] maintenance, fault history | the controller | none | controller failovers |
//!
//! The daemon maps these to keys (`vmha-store`'s layout) and back; the simulator keeps them in
//! memory. Either way the [`crate::Node`] sees the same typed records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vmha_model::{Name, Policy, Tie};

use crate::controller::{ControllerState, OwnerRecord};
use crate::host_io::{Desired, VmReport};
use crate::persist::HostAgentState;
use crate::status::OfflineFlag;

/// What an admin decided for a VM group cluster-wide, kept by the controller in a record
/// without a lease: a stop or a freeze is not lost when the owner host dies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmAdmin {
    /// Run it somewhere, or keep it stopped.
    pub desired: Desired,
    /// Frozen: monitored, never acted upon.
    #[serde(default)]
    pub frozen: bool,
    /// Increased by every `vmha clear`: each host re-arms its budgets and faults of the group
    /// once when it sees a new value.
    #[serde(default)]
    pub clear: u64,
}

impl Default for VmAdmin {
    fn default() -> Self {
        VmAdmin {
            desired: Desired::Run,
            frozen: false,
            clear: 0,
        }
    }
}

/// An app's run-time settings (see [`VmSettings`]); `None` fields keep the config's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSettings {
    /// Intentionally offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineFlag>,
    /// Priority override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// `restart_limit` override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_limit: Option<u32>,
    /// `restart_window` override in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_window_ms: Option<u64>,
}

impl AppSettings {
    /// Nothing overridden.
    pub fn is_empty(&self) -> bool {
        *self == AppSettings::default()
    }
}

/// What an admin changed at run time for one VM group and its apps (SPEC §4.7): written by the
/// owner host in a record without a lease, so that whichever host runs the group next applies
/// the same flags, priorities, budgets and policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSettings {
    /// Policy override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Tie rule override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie: Option<Tie>,
    /// `vm_restart_limit` override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_restart_limit: Option<u32>,
    /// `vm_restart_window` override in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_restart_window_ms: Option<u64>,
    /// Per app (apps with nothing overridden are left out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub apps: BTreeMap<Name, AppSettings>,
}

/// A host's membership record (present while the host's lease lives).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMember {
    /// Memory available to VMs in MiB (config value, else the machine's total), if known.
    pub memory_mb: Option<u64>,
    /// Which life of the host this is (its daemon's lease id): reports written by an earlier
    /// life say nothing about what runs there now.
    #[serde(default)]
    pub incarnation: u64,
}

/// A host's report about a VM group, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// The reporting host.
    pub host: Name,
    /// The life of the host that wrote it (see [`HostMember::incarnation`]).
    #[serde(default)]
    pub incarnation: u64,
    /// What it reported.
    pub report: VmReport,
}

/// What a host persists about itself: its agent's counters and the next event number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The host agent's state (budget counters, faults on this host, plans in flight).
    #[serde(default)]
    pub agent: HostAgentState,
    /// Sequence number of this host's next event.
    #[serde(default)]
    pub next_event: u64,
}

/// One record of the cluster store, decoded; `None` values mean the key does not exist (deleted,
/// or its lease ended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Record {
    /// A host's membership: `Some` while its lease lives.
    Host {
        /// Host.
        host: Name,
        /// Membership.
        member: Option<HostMember>,
    },
    /// A VM group's ownership record with its store revision (0 when absent).
    Owner {
        /// VM.
        vm: Name,
        /// Record.
        record: Option<OwnerRecord>,
        /// Its `mod_revision`.
        revision: u64,
    },
    /// A VM group's admin record.
    Admin {
        /// VM.
        vm: Name,
        /// Record (absent: run, not frozen).
        admin: Option<VmAdmin>,
    },
    /// A VM group's run-time settings.
    Settings {
        /// VM.
        vm: Name,
        /// Record (absent: the config as is).
        settings: Option<VmSettings>,
    },
    /// The latest report about a VM group.
    Report {
        /// VM.
        vm: Name,
        /// Report.
        report: Option<HostReport>,
    },
    /// A host's own persisted state.
    Agent {
        /// Host.
        host: Name,
        /// State.
        state: Option<NodeState>,
    },
    /// The controller's persisted state.
    Controller {
        /// State.
        state: Option<ControllerState>,
    },
}

/// Identifies a record (its key, without the value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    /// Membership of a host.
    Host(Name),
    /// Ownership of a VM.
    Owner(Name),
    /// Admin record of a VM.
    Admin(Name),
    /// Settings of a VM.
    Settings(Name),
    /// Report about a VM.
    Report(Name),
    /// State of a host.
    Agent(Name),
    /// State of the controller.
    Controller,
}

impl Record {
    /// The record's key.
    pub fn key(&self) -> RecordKey {
        match self {
            Record::Host { host, .. } => RecordKey::Host(host.clone()),
            Record::Owner { vm, .. } => RecordKey::Owner(vm.clone()),
            Record::Admin { vm, .. } => RecordKey::Admin(vm.clone()),
            Record::Settings { vm, .. } => RecordKey::Settings(vm.clone()),
            Record::Report { vm, .. } => RecordKey::Report(vm.clone()),
            Record::Agent { host, .. } => RecordKey::Agent(host.clone()),
            Record::Controller { .. } => RecordKey::Controller,
        }
    }

    /// Whether the key exists.
    pub fn exists(&self) -> bool {
        match self {
            Record::Host { member, .. } => member.is_some(),
            Record::Owner { record, .. } => record.is_some(),
            Record::Admin { admin, .. } => admin.is_some(),
            Record::Settings { settings, .. } => settings.is_some(),
            Record::Report { report, .. } => report.is_some(),
            Record::Agent { state, .. } => state.is_some(),
            Record::Controller { state } => state.is_some(),
        }
    }

    /// The same key, absent (what a deletion of it looks like).
    pub fn absent(key: &RecordKey) -> Record {
        match key.clone() {
            RecordKey::Host(host) => Record::Host { host, member: None },
            RecordKey::Owner(vm) => Record::Owner {
                vm,
                record: None,
                revision: 0,
            },
            RecordKey::Admin(vm) => Record::Admin { vm, admin: None },
            RecordKey::Settings(vm) => Record::Settings { vm, settings: None },
            RecordKey::Report(vm) => Record::Report { vm, report: None },
            RecordKey::Agent(host) => Record::Agent { host, state: None },
            RecordKey::Controller => Record::Controller { state: None },
        }
    }
}
