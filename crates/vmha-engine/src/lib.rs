//! vmha-engine: the HA logic of vmha (SPEC §4) as a sans-IO, deterministic core.
//!
//! The agents of the patent (US 8,413,144) are here by name:
//! - [`app_monitor`] — the application monitoring agent: probes apps through the guest channel,
//!   restarts them within their budget, reports them faulted;
//! - [`decision_agent`] — turns app states + priorities + policy into "no action" or
//!   "restart the VM";
//! - [`vm_monitor`] — the VM monitoring agent: watches the VM, runs restart plans within the VM
//!   budget, faults the group on this host;
//! - [`controller`] — the cluster controller: placement, failover, drain, failback.
//!
//! [`HostAgent`] wires the first three for one host. Time comes in as `now`
//! ([`Timestamp`], milliseconds); observations and admin commands come in as typed inputs;
//! actions and [`Event`]s come out; `poll_timeout` says when to wake the engine next. The
//! engine never reads a clock, does no I/O and iterates no hash map: same inputs, same outputs.
//! [`node::Node`] wires a host agent and (when elected) the controller for one daemon;
//! [`sim`] wires N nodes — the same code — through an in-memory cluster store.

pub mod app_monitor;
mod budget;
pub mod command;
pub mod controller;
pub mod decision_agent;
pub mod event;
pub mod host_agent;
pub mod host_io;
pub mod ids;
pub mod node;
pub mod persist;
pub mod records;
pub mod sim;
pub mod status;
pub mod time;
pub(crate) mod vm_monitor;

pub use command::{AdminCommand, CommandError, Route};
pub use controller::{
    ClusterVmView, Controller, ControllerAction, ControllerActionKind, ControllerInput,
    ControllerState, ControllerStatus, HostView, Migration, OwnerRecord,
};
pub use decision_agent::{AppView, Verdict};
pub use event::{Event, ObjectRef, Origin};
pub use host_agent::{HostAgent, HostAgentError};
pub use host_io::{
    ActionError, Desired, ExitStatus, HostAction, HostActionKind, HostInput, MigrationFigures,
    MigrationNote, PauseReason, ProbeCheck, ProbeOutcome, ProcessRef, Unreadable, VmObservation,
    VmReport, WatchEnd, WatchReport, WatchTarget,
};
pub use ids::ActionId;
pub use node::{
    CommandOrigin, Commit, ControllerPersist, Effects, Forward, Node, NodeInput, NodeStatus,
    Persist, Ready, Receiver, StoreHealth,
};
pub use persist::HostAgentState;
pub use records::{
    AppSettings, HostMember, HostReport, NodeState, Record, RecordKey, VmAdmin, VmSettings,
};
pub use status::{AppStatus, DecisionRecord, HostStatus, OfflineFlag, VmStatus};
pub use time::Timestamp;
