//! The simulated cluster store: the records of [`crate::records`] with revisions, membership
//! and (on an etcd cluster) ownership bound to host leases, the controller election with its
//! term as fencing token, and a switch that makes every commit fail.

use std::collections::BTreeMap;

use vmha_model::Name;

use crate::controller::OwnerRecord;
use crate::node::{Commit, Persist};
use crate::records::{HostMember, NodeState, Record, RecordKey};

#[derive(Debug, Clone)]
struct Stored {
    record: Record,
    /// The host whose lease the record is bound to.
    lease: Option<usize>,
}

/// Who writes an ownership record: the controller's host, whether it reaches the store, and
/// the term it leads in.
#[derive(Debug, Clone, Copy)]
pub(super) struct Writer {
    pub host: usize,
    pub connected: bool,
    pub term: u64,
}

/// The store of a simulated cluster.
#[derive(Debug, Clone)]
pub(super) struct SimStore {
    revision: u64,
    records: BTreeMap<RecordKey, Stored>,
    /// Ownership records are bound to the owner's lease (etcd), or permanent (embedded).
    leased_owners: bool,
    /// Every commit fails while set.
    pub failing: bool,
    /// The current leader of the controller election and its term.
    pub leader: Option<(usize, u64)>,
    term: u64,
}

impl SimStore {
    pub fn new(leased_owners: bool) -> Self {
        SimStore {
            revision: 0,
            records: BTreeMap::new(),
            leased_owners,
            failing: false,
            leader: None,
            term: 0,
        }
    }

    /// Every record, in key order.
    pub fn listing(&self) -> Vec<Record> {
        self.records.values().map(|s| s.record.clone()).collect()
    }

    /// A stored record.
    pub fn get(&self, key: &RecordKey) -> Option<&Record> {
        self.records.get(key).map(|s| &s.record)
    }

    /// What a host persisted about itself.
    pub fn node_state(&self, host: &Name) -> Option<NodeState> {
        match self.get(&RecordKey::Agent(host.clone())) {
            Some(Record::Agent { state, .. }) => state.clone(),
            _ => None,
        }
    }

    fn put(&mut self, record: Record, lease: Option<usize>, changes: &mut Vec<Record>) {
        let key = record.key();
        if record.exists() {
            self.records.insert(
                key,
                Stored {
                    record: record.clone(),
                    lease,
                },
            );
        } else {
            self.records.remove(&key);
        }
        changes.push(record);
    }

    /// Puts a record taken from a live cluster (bound to host `lease`'s lease, if any); the
    /// store's revision moves past the record's own, so later writes are newer.
    pub fn seed(&mut self, record: Record, lease: Option<usize>) {
        if let Record::Owner { revision, .. } = &record {
            self.revision = self.revision.max(*revision);
        }
        self.revision += 1;
        let mut changes = Vec::new();
        self.put(record, lease, &mut changes);
    }

    /// Registers host `h` (its membership, bound to its lease).
    pub fn register(
        &mut self,
        h: usize,
        host: &Name,
        memory_mb: Option<u64>,
        incarnation: u64,
    ) -> Vec<Record> {
        self.revision += 1;
        let mut changes = Vec::new();
        let member = Record::Host {
            host: host.clone(),
            member: Some(HostMember {
                memory_mb,
                incarnation,
            }),
        };
        self.put(member, Some(h), &mut changes);
        changes
    }

    /// Host `h`'s lease ended: its membership (and, on etcd, the ownership records bound to it)
    /// are deleted, and it no longer leads.
    pub fn expire(&mut self, h: usize) -> Vec<Record> {
        self.revision += 1;
        let keys: Vec<RecordKey> = self
            .records
            .iter()
            .filter(|(_, s)| s.lease == Some(h))
            .map(|(k, _)| k.clone())
            .collect();
        let mut changes = Vec::new();
        for key in keys {
            self.put(Record::absent(&key), None, &mut changes);
        }
        if self.leader.is_some_and(|(l, _)| l == h) {
            self.leader = None;
        }
        changes
    }

    /// Makes host `h` the leader in a new term; returns the term.
    pub fn elect(&mut self, h: usize) -> u64 {
        self.term += 1;
        self.leader = Some((h, self.term));
        self.term
    }

    /// Commits a node's batch atomically, as the daemon does: fenced by the controller's
    /// term when it holds controller writes. Returns the outcome and the changed records.
    pub fn commit(
        &mut self,
        h: usize,
        host: &Name,
        connected: bool,
        persist: &Persist,
    ) -> (Commit, Vec<Record>) {
        if !connected {
            return (
                Commit::Failed("cluster store unreachable".into()),
                Vec::new(),
            );
        }
        if self.failing {
            return (
                Commit::Failed("cluster store refuses writes (simulated)".into()),
                Vec::new(),
            );
        }
        if let Some(c) = &persist.controller
            && self.leader != Some((h, c.term))
        {
            return (Commit::Deposed, Vec::new());
        }
        self.revision += 1;
        let mut changes = Vec::new();
        if let Some(state) = &persist.node {
            let record = Record::Agent {
                host: host.clone(),
                state: Some(state.clone()),
            };
            self.put(record, None, &mut changes);
        }
        for (vm, settings) in &persist.settings {
            let record = Record::Settings {
                vm: vm.clone(),
                settings: Some(settings.clone()),
            };
            self.put(record, None, &mut changes);
        }
        for (vm, report) in &persist.reports {
            let record = Record::Report {
                vm: vm.clone(),
                report: Some(report.clone()),
            };
            self.put(record, None, &mut changes);
        }
        if let Some(c) = &persist.controller {
            if let Some(state) = &c.state {
                let record = Record::Controller {
                    state: Some(state.clone()),
                };
                self.put(record, None, &mut changes);
            }
            for (vm, admin) in &c.admin {
                let record = Record::Admin {
                    vm: vm.clone(),
                    admin: Some(admin.clone()),
                };
                self.put(record, None, &mut changes);
            }
        }
        (Commit::Ok, changes)
    }

    /// The controller's compare-and-swap of an ownership record, fenced by its term. `owner`
    /// is the index of the record's owner host (whose lease it is bound to on etcd).
    pub fn cas_owner(
        &mut self,
        writer: Writer,
        vm: &Name,
        expected: u64,
        record: &OwnerRecord,
        owner: Option<usize>,
    ) -> (Option<u64>, Vec<Record>) {
        let Writer {
            host: h,
            connected,
            term,
        } = writer;
        if !connected || self.failing || self.leader != Some((h, term)) {
            return (None, Vec::new());
        }
        let key = RecordKey::Owner(vm.clone());
        let current = match self.get(&key) {
            Some(Record::Owner { revision, .. }) => *revision,
            _ => 0,
        };
        if current != expected {
            return (None, Vec::new());
        }
        self.revision += 1;
        let revision = self.revision;
        let lease = if self.leased_owners { owner } else { None };
        let mut changes = Vec::new();
        let stored = Record::Owner {
            vm: vm.clone(),
            record: Some(record.clone()),
            revision,
        };
        self.put(stored, lease, &mut changes);
        (Some(revision), changes)
    }
}
