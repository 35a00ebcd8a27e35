//! A simulation that starts from a live cluster's state instead of an empty one: the records
//! of its cluster store (placements, admin flags, run-time settings, budget counters, faults,
//! maintenance) plus what the host that took the snapshot sees inside its guests. Each host
//! whose membership is live gets a node restored from what it persisted — exactly as its
//! daemon restarts — and finds its VMs running where it persisted they run.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmha_model::{AppState, Config, Name, PauseReason, Store};

use crate::node::Node;
use crate::records::{Record, RecordKey};
use crate::status::VmStatus;
use crate::time::Timestamp;

use super::{Sim, SimError};

/// The state of a live cluster, as one host sees it (`GET /v1/snapshot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// When it was taken, in engine time (the daemon's: milliseconds since the Unix epoch).
    pub now: Timestamp,
    /// Every record of the cluster store as the host last saw it.
    pub records: Vec<Record>,
    /// What the host sees inside the VMs it runs; guests of VMs running elsewhere are taken
    /// to be healthy (guest agent up, every app running).
    #[serde(default)]
    pub guests: Vec<GuestSnapshot>,
}

/// One running guest as its host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSnapshot {
    /// The host that sees it (it applies only where the VM runs on that host).
    pub host: Name,
    /// The VM.
    pub vm: Name,
    /// Its guest agent answers.
    pub guest_up: bool,
    /// Its vCPUs are stopped, and why.
    #[serde(default)]
    pub paused: Option<PauseReason>,
    /// Its apps that are not online (not running, in the model).
    #[serde(default)]
    pub apps_down: Vec<Name>,
}

impl GuestSnapshot {
    /// The guest of a VM as the status of `host` shows it.
    pub fn of(host: &Name, vm: &VmStatus) -> GuestSnapshot {
        GuestSnapshot {
            host: host.clone(),
            vm: vm.name.clone(),
            guest_up: vm.guest_channel_up != Some(false),
            paused: if vm.paused { vm.pause_reason } else { None },
            apps_down: vm
                .apps
                .iter()
                .filter(|a| a.state != AppState::Online)
                .map(|a| a.name.clone())
                .collect(),
        }
    }
}

impl Sim {
    /// The cluster of `config` as `snapshot` shows it, at the snapshot's time: the store holds
    /// its records (memberships and, on etcd, ownership bound to their hosts' leases); every
    /// host with a live membership runs a node restored from its persisted state, with the
    /// VMs it persisted as running; the other hosts are down (`host-recover` restarts them).
    /// Then the live hosts join, one is elected controller and the cluster settles; what that
    /// logs is the restore, before any script.
    pub fn from_snapshot(config: Arc<Config>, snapshot: &ClusterSnapshot) -> Result<Sim, SimError> {
        let mut sim = Sim::blank(config, snapshot.now);
        let leased = matches!(sim.config.cluster.store, Store::Etcd { .. });
        for record in &snapshot.records {
            let lease = match record {
                Record::Host { host, .. } => sim.host_idx(host),
                Record::Owner {
                    record: Some(r), ..
                } if leased => r.owner.as_ref().and_then(|o| sim.host_idx(o)),
                _ => None,
            };
            sim.store.seed(record.clone(), lease);
        }
        let mut live = Vec::new();
        for h in 0..sim.hosts.len() {
            let name = sim.hosts[h].name.clone();
            let Some(Record::Host {
                member: Some(member),
                ..
            }) = sim.store.get(&RecordKey::Host(name.clone()))
            else {
                continue;
            };
            let incarnation = member.incarnation;
            let saved = sim.store.node_state(&name);
            let running: Vec<Name> = sim.hosts[h]
                .vms
                .iter()
                .filter(|vm| {
                    saved
                        .as_ref()
                        .and_then(|s| s.agent.vms.get(*vm))
                        .is_some_and(|l| l.running)
                })
                .cloned()
                .collect();
            // The live cluster's daemons run since long: no cold-start wait in the what-if.
            let node = Node::new(sim.config.clone(), name, incarnation, saved, snapshot.now)?
                .started_at(Timestamp::ZERO);
            sim.hosts[h].node = Some(node);
            sim.hosts[h].incarnation = incarnation;
            for vm in running {
                let host = &sim.hosts[h].name;
                let seen = snapshot
                    .guests
                    .iter()
                    .find(|g| g.vm == vm && &g.host == host);
                sim.restore_guest(h, &vm, seen);
            }
            live.push(h);
        }
        for h in live {
            sim.join(h);
        }
        sim.elect();
        sim.settle();
        Ok(sim)
    }

    /// The simulated cluster's state in the form a live one gives it: every record of the
    /// store, and every running guest as its host sees it.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let mut guests = Vec::new();
        for h in &self.hosts {
            for vm in &h.running {
                let Some(g) = self.guests.get(vm) else {
                    continue;
                };
                guests.push(GuestSnapshot {
                    host: h.name.clone(),
                    vm: vm.clone(),
                    guest_up: h.guest_up.contains(vm) && !g.hung && !g.qemu_hung,
                    paused: g.paused,
                    apps_down: g
                        .apps
                        .iter()
                        .filter(|(_, m)| !m.running)
                        .map(|(a, _)| a.clone())
                        .collect(),
                });
            }
        }
        ClusterSnapshot {
            now: self.now,
            records: self.store.listing(),
            guests,
        }
    }

    /// VM `vm` runs on host `h`, its guest as `seen` (healthy when not seen).
    fn restore_guest(&mut self, h: usize, vm: &Name, seen: Option<&GuestSnapshot>) {
        self.hosts[h].running.insert(vm.clone());
        if seen.is_none_or(|g| g.guest_up) {
            self.hosts[h].guest_up.insert(vm.clone());
        }
        let Some(guest) = self.guests.get_mut(vm) else {
            return;
        };
        guest.paused = seen.and_then(|g| g.paused);
        for (app, model) in &mut guest.apps {
            model.running = !seen.is_some_and(|g| g.apps_down.contains(app));
        }
    }
}
