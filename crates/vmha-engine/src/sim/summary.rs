//! Where everything ended up: one line per host and per VM group, for the final table of a
//! what-if run (`vmha simulate`).

use serde::{Deserialize, Serialize};
use vmha_model::{HostState, Name, VmState};

use crate::host_io::Desired;
use crate::records::{Record, RecordKey};

use super::Sim;

/// A host at the end of a simulation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLine {
    /// Host.
    pub host: Name,
    /// Its state as the controller sees it (`None`: no controller, or not known to it).
    pub state: Option<HostState>,
    /// Its daemon runs (`false`: the host crashed).
    pub running: bool,
    /// It reaches the cluster store.
    pub connected: bool,
    /// It leads the cluster.
    pub controller: bool,
}

/// A VM group at the end of a simulation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VM group.
    pub vm: Name,
    /// Its cluster-wide state (the controller's view; its owner's when nobody leads).
    pub state: Option<VmState>,
    /// Owner per the cluster store.
    pub owner: Option<Name>,
    /// Desired state per the cluster store.
    pub desired: Option<Desired>,
    /// Hosts where its process runs (more than one is a safety violation).
    pub running_on: Vec<Name>,
    /// Frozen by an admin.
    pub frozen: bool,
    /// Why it waits or is faulted, per the controller.
    pub note: Option<String>,
}

impl Sim {
    /// Every configured host, in configuration order.
    pub fn host_lines(&self) -> Vec<HostLine> {
        let view = self.controller().map(|c| c.status());
        let leader = self.store.leader.map(|(h, _)| h);
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| HostLine {
                host: h.name.clone(),
                state: view
                    .as_ref()
                    .and_then(|v| v.hosts.iter().find(|x| x.name == h.name))
                    .and_then(|x| x.state),
                running: h.node.is_some(),
                connected: h.connected,
                controller: leader == Some(i),
            })
            .collect()
    }

    /// Every configured VM group, in configuration order.
    pub fn placements(&self) -> Vec<Placement> {
        let view = self.controller().map(|c| c.status());
        self.config
            .vms
            .iter()
            .map(|v| {
                let record = match self.store.get(&RecordKey::Owner(v.name.clone())) {
                    Some(Record::Owner {
                        record: Some(r), ..
                    }) => Some(r.clone()),
                    _ => None,
                };
                let owner = record.as_ref().and_then(|r| r.owner.clone());
                let cluster = view
                    .as_ref()
                    .and_then(|c| c.vms.iter().find(|x| x.name == v.name));
                let on_owner = owner
                    .as_ref()
                    .and_then(|o| self.agent(o.as_str()))
                    .and_then(|a| a.status().vms.into_iter().find(|x| x.name == v.name));
                Placement {
                    vm: v.name.clone(),
                    state: cluster
                        .map(|c| c.state)
                        .or(on_owner.as_ref().map(|s| s.state)),
                    owner,
                    desired: record.map(|r| r.desired),
                    running_on: self.running_on(v.name.as_str()),
                    frozen: cluster
                        .map_or_else(|| on_owner.as_ref().is_some_and(|s| s.frozen), |c| c.frozen),
                    note: cluster.and_then(|c| c.note.clone()),
                }
            })
            .collect()
    }
}
