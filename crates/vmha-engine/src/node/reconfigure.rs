//! A new configuration, applied to a running node (SIGHUP, `vmha config reload`, `vmha config
//! apply`): the node is rebuilt on the new configuration at a clean point — everything it
//! decided is committed — keeping what it persisted (budget counters, faults, plans in flight,
//! event numbering), its view of the cluster store and its leadership. VMs keep running: the
//! daemon reports what runs and the rebuilt agents adopt it; new VM groups are placed by the
//! controller, removed ones are no longer managed here (left running), changed apps,
//! priorities, budgets and intervals are in effect at once.

use std::collections::BTreeSet;
use std::sync::Arc;

use vmha_model::{Config, Name};

use super::{Node, NodeInput};
use crate::event::{Event, ObjectRef, Origin};
use crate::host_agent::HostAgentError;
use crate::host_io::HostInput;
use crate::records::{NodeState, Record};
use crate::time::Timestamp;

/// Why a new configuration cannot be applied to this node now. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconfigureError {
    /// Decisions are still being committed: apply it once [`Node::idle`] holds.
    #[error("the node is busy committing; apply the configuration once it is idle")]
    Busy,
    /// This host is not in the new configuration.
    #[error("host `{0}` is not in the new configuration")]
    HostRemoved(Name),
    /// The cluster's identity or its store changed: that needs every daemon restarted.
    #[error("{0} cannot change while the cluster runs; restart every vmhad with the new file")]
    Fixed(&'static str),
}

impl From<HostAgentError> for ReconfigureError {
    fn from(e: HostAgentError) -> Self {
        match e {
            HostAgentError::UnknownHost(h) => ReconfigureError::HostRemoved(h),
        }
    }
}

/// What a new configuration changed, as people read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigChange {
    /// VM groups added.
    pub added: Vec<Name>,
    /// VM groups removed (no longer managed; left running).
    pub removed: Vec<Name>,
    /// VM groups whose definition changed.
    pub changed: Vec<Name>,
    /// Hosts added or removed, or other cluster settings changed.
    pub cluster: Vec<String>,
}

impl ConfigChange {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == ConfigChange::default()
    }

    /// One line: `+vm web2; -vm old; ~vm shop; hosts: +kvm4`.
    pub fn describe(&self) -> String {
        let names = |v: &[Name]| v.iter().map(Name::as_str).collect::<Vec<_>>().join(", ");
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            parts.push(format!("added {}", names(&self.added)));
        }
        if !self.removed.is_empty() {
            parts.push(format!(
                "removed {} (no longer managed, left running)",
                names(&self.removed)
            ));
        }
        if !self.changed.is_empty() {
            parts.push(format!("changed {}", names(&self.changed)));
        }
        parts.extend(self.cluster.iter().cloned());
        if parts.is_empty() {
            "no change".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// What changed from `old` to `new` (VMs by name and definition, hosts, cluster settings).
pub fn diff(old: &Config, new: &Config) -> ConfigChange {
    let old_vms: BTreeSet<&Name> = old.vms.iter().map(|v| &v.name).collect();
    let new_vms: BTreeSet<&Name> = new.vms.iter().map(|v| &v.name).collect();
    let mut change = ConfigChange {
        added: new_vms.difference(&old_vms).map(|n| (*n).clone()).collect(),
        removed: old_vms.difference(&new_vms).map(|n| (*n).clone()).collect(),
        ..ConfigChange::default()
    };
    for v in &new.vms {
        if let Some(o) = old.vm(v.name.as_str())
            && o != v
        {
            change.changed.push(v.name.clone());
        }
    }
    let old_hosts: BTreeSet<&Name> = old.hosts.iter().map(|h| &h.name).collect();
    let new_hosts: BTreeSet<&Name> = new.hosts.iter().map(|h| &h.name).collect();
    for h in new_hosts.difference(&old_hosts) {
        change.cluster.push(format!("host {h} added"));
    }
    for h in old_hosts.difference(&new_hosts) {
        change.cluster.push(format!("host {h} removed"));
    }
    for h in &new.hosts {
        if let Some(o) = old.host(h.name.as_str())
            && o != h
        {
            change.cluster.push(format!("host {} changed", h.name));
        }
    }
    if old.api != new.api {
        change.cluster.push("API settings changed".to_string());
    }
    change
}

impl Node {
    /// Applies `config` (see the module documentation). Refused, changing nothing, while the
    /// node is not [`Node::idle`], when this host is not in it, or when the cluster's name or
    /// store changed. The change is announced as an event on this host.
    pub fn reconfigure(
        &mut self,
        now: Timestamp,
        config: Arc<Config>,
    ) -> Result<ConfigChange, ReconfigureError> {
        if !self.idle() {
            return Err(ReconfigureError::Busy);
        }
        if config.cluster.name != self.config.cluster.name {
            return Err(ReconfigureError::Fixed("the cluster name"));
        }
        if config.cluster.store != self.config.cluster.store {
            return Err(ReconfigureError::Fixed("the cluster store"));
        }
        let change = diff(&self.config, &config);
        let state = NodeState {
            agent: self.agent.state(),
            next_event: self.next_event,
        };
        let mut node = Node::new(
            Arc::clone(&config),
            self.host.clone(),
            self.incarnation,
            Some(state),
            now,
        )?;
        node.health = self.health.clone();
        node.next_ready = self.next_ready;
        let live = self.agent.lease_live();
        let elected = self.elected;
        let records: Vec<Record> = std::mem::take(&mut self.mirror).into_values().collect();
        *self = node;
        if live {
            self.handle(now, NodeInput::Host(HostInput::Lease { live: true }));
        }
        self.handle(
            now,
            NodeInput::Records {
                records,
                full: true,
            },
        );
        if elected.is_some() {
            self.handle(now, NodeInput::Leadership(elected));
        }
        let event = Event {
            time: self.now,
            origin: Origin::Host(self.host.clone()),
            object: ObjectRef::Host(self.host.clone()),
            from: "configured".to_string(),
            to: "configured".to_string(),
            reason: format!("new configuration applied: {}", change.describe()),
        };
        self.push_event(event);
        Ok(change)
    }
}
