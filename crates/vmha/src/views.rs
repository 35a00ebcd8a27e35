//! vmhad's API answers as typed values. The CLI renders these rather than poking at raw JSON,
//! so a change of vmhad's wire format fails loudly here instead of printing half a table.
//! Unknown fields are ignored: a newer vmhad may add fields.

use serde::Deserialize;
use vmha_engine::{ClusterVmView, ControllerStatus, Event, HostStatus, VmStatus};
use vmha_model::Name;

/// `GET /v1/status` (vmhad's `StatusView`).
#[derive(Debug, Clone, Deserialize)]
pub struct StatusView {
    /// The host that answered.
    pub host: Name,
    /// Cluster name.
    pub cluster: Name,
    /// Whether that host runs the cluster controller.
    pub controller: bool,
    /// The host's VM groups and their apps.
    pub agent: HostStatus,
    /// The controller's view (hosts, placement), when that host is the controller.
    pub cluster_view: Option<ControllerStatus>,
}

/// `GET /v1/vms/{vm}/explain`.
#[derive(Debug, Clone, Deserialize)]
pub struct Explain {
    /// The VM group as its host sees it, with its recent decisions.
    pub vm: VmStatus,
    /// The controller's view of the group, when the answering host is the controller.
    pub cluster: Option<ClusterVmView>,
    /// The last events about the VM and its apps, oldest first.
    pub events: Vec<Event>,
}

/// `POST /v1/vms/{vm}/exec`: what a guest command printed and how it ended.
#[derive(Debug, Clone, Deserialize)]
pub struct GuestOutput {
    /// Exit code, when it exited.
    pub exit: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
    /// Standard output (lossy UTF-8, capped by vmhad).
    pub stdout: String,
    /// Standard error (lossy UTF-8, capped by vmhad).
    pub stderr: String,
    /// Whether vmhad cut the output at its cap.
    pub truncated: bool,
}
