//! The node: everything one host runs between its inputs and its outputs — the host agent, the
//! cluster controller while this host leads, command routing, event numbering and change
//! tracking. The daemon and the simulator drive the same `Node`; the daemon keeps only I/O.
//!
//! The contract is raft-rs's Ready/advance:
//!
//! ```text
//! node.handle(now, input)            // driver observations, store records, leadership, CAS results
//! node.command(now, origin, cmd)     // admin commands: queued, answered through Effects
//! node.handle_timeout(now)           // once node.poll_timeout() is reached
//! if let Some(ready) = node.ready() {
//!     run(ready.run_now)                         // only while the store is degraded
//!     let outcome = store.commit(&ready.persist) // durably: state, settings, reports, events
//!     let effects = node.advance(ready.id, outcome)
//!     run(effects)                               // actions, replies, forwards: only now
//! }
//! ```
//!
//! Guarantees:
//! - **Save, then act, then answer.** An action or a reply leaves in the [`Effects`] of the
//!   [`Ready`] whose persist holds the state that counts it (a VM restart taken from the budget,
//!   the admin's change): a crash between the two loses neither.
//! - **Acknowledged means durable; refused means unchanged.** Commands are applied on a clean
//!   node (everything before them committed), alone in their `Ready`; inputs arriving meanwhile
//!   wait (see [`Node::accepting_inputs`]). If that commit fails, the node is restored to its
//!   state before the commands and they are answered with the store's error.
//! - **Availability.** A failed commit marks the store degraded: later commands are refused at
//!   once, but probes, app restarts and VM restarts go on ([`Ready::run_now`]); the state and
//!   the events not yet written are retried with every later `Ready`, until a commit succeeds.
//! - Persisted data is tracked by dirty marks set where it changes, never by comparing states.
//! - Deterministic: same inputs at the same times, same outputs.

mod ready;
mod reconfigure;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmha_model::{Config, Name, Store};

use crate::command::{AdminCommand, CommandError, Route};
use crate::controller::{Controller, ControllerInput, ControllerState, ControllerStatus};
use crate::event::Event;
use crate::host_agent::{HostAgent, HostAgentError};
use crate::host_io::{HostInput, VmReport};
use crate::ids::ActionId;
use crate::records::{HostReport, NodeState, Record, RecordKey};
use crate::status::HostStatus;
use crate::time::Timestamp;

pub use ready::{
    CommandOrigin, Commit, ControllerPersist, Effects, Forward, Persist, Ready, Receiver,
};
pub use reconfigure::{ConfigChange, ReconfigureError, diff as config_diff};

/// Commands waiting for a clean node beyond this are refused with
/// [`CommandError::Overloaded`].
pub const MAX_QUEUED_COMMANDS: usize = 64;
/// After a failed commit, the next attempt waits this long (monitoring does not wait).
pub const COMMIT_RETRY_MS: u64 = 1_000;
/// Events not yet written beyond this (a long store outage) are dropped, oldest first, and
/// counted in [`StoreHealth::dropped_events`].
pub const MAX_PENDING_EVENTS: usize = 10_000;

/// An input to a [`Node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeInput {
    /// An observation or result of this host's driver.
    Host(HostInput),
    /// Records of the cluster store: a full listing (`full`: what is not listed does not
    /// exist) or changes seen by the watch. Hand bursts over together: the controller decides
    /// once per batch.
    Records {
        /// The records.
        records: Vec<Record>,
        /// A complete listing of the cluster's records.
        full: bool,
    },
    /// This host leads the cluster in this term (`Some`, a fencing token growing with every
    /// term), or does not (`None`).
    Leadership(Option<u64>),
    /// This host now holds a new lease (the old one ended): its reports from now on belong to
    /// this new life of the host.
    Incarnation(u64),
    /// The answer to a controller's compare-and-swap (see
    /// [`crate::ControllerActionKind::CasOwner`]).
    CasResult {
        /// The action.
        id: ActionId,
        /// The record's new revision, or `None` when it was not written.
        revision: Option<u64>,
    },
}

/// How the node's writes to the cluster store fare.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHealth {
    /// The last commit failed with this error (commands are refused until one succeeds).
    pub degraded: Option<String>,
    /// Events waiting to be written.
    pub pending_events: usize,
    /// Events dropped during a long outage.
    pub dropped_events: u64,
    /// Commits that succeeded.
    pub commits: u64,
}

/// The node's view for `vmha status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This host's VM groups and apps.
    pub agent: HostStatus,
    /// The controller's view, while this host leads.
    pub controller: Option<ControllerStatus>,
    /// The controller's term, while this host leads.
    pub term: Option<u64>,
    /// The cluster store as this host sees it.
    pub store: StoreHealth,
}

#[derive(Debug, Clone)]
struct Leader {
    controller: Controller,
    term: u64,
    /// The controller has been given the whole cluster (it decides nothing before).
    fed: bool,
}

/// Outputs gathered since the last [`Ready`].
#[derive(Debug, Clone, Default)]
struct Outbox {
    events: VecDeque<(u64, Event)>,
    reports: BTreeMap<Name, VmReport>,
    local: bool,
    settings: BTreeSet<Name>,
    controller_state: bool,
    admin: BTreeSet<Name>,
    remote_replies: Vec<(String, Result<(), CommandError>)>,
    effects: Effects,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.reports.is_empty()
            && !self.local
            && self.settings.is_empty()
            && !self.controller_state
            && self.admin.is_empty()
            && self.remote_replies.is_empty()
            && self.effects.is_empty()
    }
}

/// What a commit of commands undoes when it fails.
#[derive(Debug, Clone)]
struct Barrier {
    agent: HostAgent,
    leader: Option<Leader>,
    next_event: u64,
    /// Origins of the commands applied since.
    origins: Vec<CommandOrigin>,
}

#[derive(Debug, Clone)]
struct InFlight {
    id: u64,
    persist: Persist,
    /// Effects waiting for the commit (empty when they ran at once).
    effects: Effects,
}

/// One host's engine (see the module documentation for the driving protocol).
#[derive(Debug, Clone)]
pub struct Node {
    config: Arc<Config>,
    host: Name,
    incarnation: u64,
    agent: HostAgent,
    leader: Option<Leader>,
    /// The term this host won, as last told (it leads in it while its lease is live).
    elected: Option<u64>,
    /// Every record of the cluster as last seen; complete once `synced`.
    mirror: BTreeMap<RecordKey, Record>,
    synced: bool,
    next_event: u64,
    /// When this node started (its controller's startup wait counts from it).
    started: Timestamp,
    now: Timestamp,
    out: Outbox,
    queued: VecDeque<(CommandOrigin, AdminCommand)>,
    deferred: VecDeque<(Timestamp, NodeInput)>,
    barrier: Option<Box<Barrier>>,
    in_flight: Option<InFlight>,
    next_ready: u64,
    /// After a failed commit: no new attempt before this time.
    retry_at: Option<Timestamp>,
    health: StoreHealth,
}

impl Node {
    /// The node of `host` in its life `incarnation` (the daemon's lease id: the same when a
    /// restarted daemon keeps its lease), restoring what an earlier run of it persisted. It
    /// decides nothing about a VM before the cluster's records arrive ([`NodeInput::Records`]
    /// with `full`).
    pub fn new(
        config: Arc<Config>,
        host: Name,
        incarnation: u64,
        restored: Option<NodeState>,
        now: Timestamp,
    ) -> Result<Node, HostAgentError> {
        let restored = restored.unwrap_or_default();
        let agent = HostAgent::new(Arc::clone(&config), host.clone(), Some(restored.agent), now)?;
        Ok(Node {
            config,
            host,
            incarnation,
            agent,
            started: now,
            leader: None,
            elected: None,
            mirror: BTreeMap::new(),
            synced: false,
            next_event: restored.next_event,
            now,
            out: Outbox::default(),
            queued: VecDeque::new(),
            deferred: VecDeque::new(),
            barrier: None,
            in_flight: None,
            next_ready: 0,
            retry_at: None,
            health: StoreHealth::default(),
        })
    }

    /// This host's name.
    pub fn host(&self) -> &Name {
        &self.host
    }

    /// Which life of the host this node is (see [`Node::new`]).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The configuration the node runs.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The host agent (read-only).
    pub fn agent(&self) -> &HostAgent {
        &self.agent
    }

    /// The controller, while this host leads.
    pub fn controller(&self) -> Option<&Controller> {
        self.leader.as_ref().map(|l| &l.controller)
    }

    /// The leadership term, while this host leads.
    pub fn term(&self) -> Option<u64> {
        self.leader.as_ref().map(|l| l.term)
    }

    /// The record last seen under `key`, if any.
    pub fn record(&self, key: &RecordKey) -> Option<&Record> {
        self.mirror.get(key)
    }

    /// Every record of the cluster as last seen (complete once the first full listing
    /// arrived), in key order: what a snapshot of the cluster's state is made of.
    pub fn snapshot_records(&self) -> Vec<Record> {
        self.mirror.values().cloned().collect()
    }

    /// Whether the node takes inputs now. `false` while commands wait for, or are in, their
    /// commit: the caller should leave further inputs in its (bounded) queue until this is
    /// `true` again. Inputs handed over anyway are kept and applied after the commit.
    pub fn accepting_inputs(&self) -> bool {
        self.queued.is_empty() && self.barrier.is_none() && self.deferred.is_empty()
    }

    fn open(&self) -> bool {
        self.queued.is_empty() && self.barrier.is_none()
    }

    /// Feeds one input observed at `now`.
    pub fn handle(&mut self, now: Timestamp, input: NodeInput) {
        self.now = self.now.max(now);
        self.replay_deferred();
        if !self.open() {
            self.deferred.push_back((now, input));
            return;
        }
        self.apply(now, input);
        self.collect();
    }

    fn apply(&mut self, now: Timestamp, input: NodeInput) {
        match input {
            NodeInput::Host(input) => {
                let live = match input {
                    HostInput::Lease { live } => Some(live),
                    _ => None,
                };
                if live == Some(false) {
                    // A host without a live lease acts for nobody: its term may end any time.
                    self.leader = None;
                }
                self.agent.handle_input(now, input);
                if live == Some(true)
                    && self.leader.is_none()
                    && let Some(term) = self.elected
                {
                    // The same lease lives again, and with it the term it won.
                    self.leadership(now, Some(term));
                }
            }
            NodeInput::Records { records, full } => self.records(now, records, full),
            NodeInput::Leadership(term) => {
                self.elected = term;
                self.leadership(now, term);
            }
            NodeInput::Incarnation(incarnation) => {
                if incarnation != self.incarnation {
                    // A new lease: whatever term the old one won is over.
                    self.elected = None;
                    self.leader = None;
                }
                self.incarnation = incarnation;
            }
            NodeInput::CasResult { id, revision } => {
                if let Some(l) = self.leader.as_mut() {
                    l.controller
                        .handle_input(now, ControllerInput::CasResult { id, revision });
                }
            }
        }
    }

    fn records(&mut self, now: Timestamp, records: Vec<Record>, full: bool) {
        let mut changes = Vec::with_capacity(records.len());
        if full {
            let listed: BTreeSet<RecordKey> = records.iter().map(Record::key).collect();
            let gone: Vec<RecordKey> = self
                .mirror
                .keys()
                .filter(|k| !listed.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                self.mirror.remove(&key);
                changes.push(Record::absent(&key));
            }
            if !self.synced {
                // What no listing holds does not exist: tell the agent so, once.
                for vm in self
                    .config
                    .vms
                    .iter()
                    .filter(|v| v.hosts.contains(&self.host))
                {
                    for key in [
                        RecordKey::Owner(vm.name.clone()),
                        RecordKey::Admin(vm.name.clone()),
                        RecordKey::Settings(vm.name.clone()),
                    ] {
                        if !listed.contains(&key) {
                            changes.push(Record::absent(&key));
                        }
                    }
                }
            }
        }
        for record in records {
            let key = record.key();
            if record.exists() {
                self.mirror.insert(key, record.clone());
            } else {
                self.mirror.remove(&key);
            }
            changes.push(record);
        }
        // What an owner must know before it acts (frozen, desired, settings) goes first.
        changes.sort_by_key(|r| match r {
            Record::Host { .. } => 0,
            Record::Admin { .. } | Record::Settings { .. } => 1,
            Record::Report { .. } | Record::Agent { .. } | Record::Controller { .. } => 2,
            Record::Owner { .. } => 3,
        });
        for record in &changes {
            self.agent.handle_record(now, record);
        }
        self.synced |= full;
        if !self.synced {
            return;
        }
        let view = match &self.leader {
            Some(l) if !l.fed => Some(self.full_view()),
            _ => None,
        };
        let rebuilt = view
            .is_some()
            .then(|| self.new_controller(self.restored_controller(), now));
        if let Some(l) = self.leader.as_mut() {
            match view.zip(rebuilt) {
                Some((view, controller)) => {
                    // Elected before the first listing: the controller built then could not
                    // see what the previous controller committed; build it again from it.
                    l.controller = controller;
                    l.controller.handle_inputs(now, view);
                    l.fed = true;
                }
                None => {
                    let inputs: Vec<_> = changes.iter().flat_map(controller_inputs).collect();
                    l.controller.handle_inputs(now, inputs);
                }
            }
        }
    }

    fn leadership(&mut self, now: Timestamp, term: Option<u64>) {
        let Some(term) = term else {
            self.leader = None;
            return;
        };
        if self.leader.as_ref().is_some_and(|l| l.term == term) {
            return;
        }
        let mut controller = self.new_controller(self.restored_controller(), now);
        if self.synced {
            controller.handle_inputs(now, self.full_view());
        }
        self.leader = Some(Leader {
            controller,
            term,
            fed: self.synced,
        });
    }

    /// Takes `started` as the time this host's daemon started, when that was before the node
    /// was created (a node restored from a snapshot of a running cluster): its controller's
    /// cold-start wait (`startup_wait`) counts from it.
    pub fn started_at(mut self, started: Timestamp) -> Self {
        self.started = started;
        self
    }

    /// A controller for this node's term, restored from `restored`, waiting at a cold start
    /// (`startup_wait` after this node started) for the hosts a VM prefers.
    fn new_controller(&self, restored: Option<ControllerState>, now: Timestamp) -> Controller {
        let mut controller = Controller::new(Arc::clone(&self.config), restored, now);
        if let Store::Etcd { startup_wait, .. } = &self.config.cluster.store {
            let ms = u64::try_from(startup_wait.as_millis()).unwrap_or(u64::MAX);
            controller.wait_for_hosts_until(self.started.plus_ms(ms));
        }
        controller
    }

    /// What the last controller committed, as far as this node has seen the store.
    fn restored_controller(&self) -> Option<ControllerState> {
        match self.mirror.get(&RecordKey::Controller) {
            Some(Record::Controller { state }) => state.clone(),
            _ => None,
        }
    }

    /// The whole cluster as the controller must see it at election: every configured host's
    /// lease, every VM's ownership and admin record (absent ones included), the latest reports.
    fn full_view(&self) -> Vec<ControllerInput> {
        let mut inputs = Vec::new();
        for h in &self.config.hosts {
            let record = self
                .mirror
                .get(&RecordKey::Host(h.name.clone()))
                .cloned()
                .unwrap_or_else(|| Record::absent(&RecordKey::Host(h.name.clone())));
            inputs.extend(controller_inputs(&record));
        }
        for v in &self.config.vms {
            for key in [
                RecordKey::Owner(v.name.clone()),
                RecordKey::Admin(v.name.clone()),
                RecordKey::Report(v.name.clone()),
            ] {
                let record = self
                    .mirror
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| Record::absent(&key));
                inputs.extend(controller_inputs(&record));
            }
        }
        inputs
    }

    /// Queues an admin command. It is applied once everything before it is committed, and
    /// answered through [`Effects::replies`] (local callers) or [`Persist::replies`] (other
    /// hosts) once its own change is committed. A value outside the configuration's range
    /// ([`AdminCommand::check_values`]) is refused at once, and so is every command while the
    /// store is degraded ([`CommandError::StoreUnavailable`]); a refusal changes nothing.
    pub fn command(&mut self, now: Timestamp, origin: CommandOrigin, cmd: AdminCommand) {
        self.now = self.now.max(now);
        if let Err(e) = cmd.check_values() {
            self.reply(origin, Err(e));
            return;
        }
        if let Some(e) = self.health.degraded.clone() {
            self.reply(origin, Err(CommandError::StoreUnavailable(e)));
            return;
        }
        if self.queued.len() >= MAX_QUEUED_COMMANDS {
            self.reply(origin, Err(CommandError::Overloaded));
            return;
        }
        self.queued.push_back((origin, cmd));
    }

    fn reply(&mut self, origin: CommandOrigin, result: Result<(), CommandError>) {
        match origin {
            CommandOrigin::Local(id) => self.out.effects.replies.push((id, result)),
            CommandOrigin::Remote(key) => self.out.remote_replies.push((key, result)),
        }
    }

    /// Applies every queued command on a clean node, remembering how to undo them.
    fn apply_commands(&mut self) {
        let now = self.now;
        let mut barrier = Box::new(Barrier {
            agent: self.agent.clone(),
            leader: self.leader.clone(),
            next_event: self.next_event,
            origins: Vec::new(),
        });
        while let Some((origin, cmd)) = self.queued.pop_front() {
            let result = self.route(now, &origin, cmd);
            match result {
                Routed::Applied => {
                    barrier.origins.push(origin.clone());
                    self.reply(origin, Ok(()));
                }
                Routed::Refused(e) => self.reply(origin, Err(e)),
                Routed::Forwarded(to, command) => match origin {
                    CommandOrigin::Local(id) => {
                        self.out.effects.forwards.push(Forward { id, to, command })
                    }
                    CommandOrigin::Remote(_) => {
                        let e = CommandError::WrongReceiver(match to {
                            Receiver::Controller => "cluster controller".to_string(),
                            Receiver::Host(h) => format!("host {h}"),
                        });
                        self.reply(origin, Err(e));
                    }
                },
            }
            self.collect();
        }
        if !barrier.origins.is_empty() {
            self.barrier = Some(barrier);
        }
    }

    fn route(&mut self, now: Timestamp, origin: &CommandOrigin, cmd: AdminCommand) -> Routed {
        if let Some(vm) = cmd.vm()
            && self.config.vm(vm.as_str()).is_none()
        {
            return Routed::Refused(CommandError::UnknownVm(vm.clone()));
        }
        match cmd.route() {
            Route::Controller => match self.leader.as_mut() {
                Some(l) if !l.fed => Routed::Refused(CommandError::NoController),
                Some(l) => match l.controller.command(now, cmd) {
                    Ok(()) => Routed::Applied,
                    Err(e) => Routed::Refused(e),
                },
                None => Routed::Forwarded(Receiver::Controller, cmd),
            },
            Route::OwnerHost => {
                let Some(vm) = cmd.vm().cloned() else {
                    return Routed::Refused(CommandError::WrongReceiver(
                        "cluster controller".to_string(),
                    ));
                };
                let owner = match self.mirror.get(&RecordKey::Owner(vm.clone())) {
                    Some(Record::Owner {
                        record: Some(r), ..
                    }) => r.owner.clone(),
                    _ => None,
                };
                match owner {
                    Some(o) if o == self.host => match self.agent.command(now, cmd) {
                        Ok(()) => Routed::Applied,
                        Err(e) => Routed::Refused(e),
                    },
                    Some(o) if matches!(origin, CommandOrigin::Local(_)) => {
                        Routed::Forwarded(Receiver::Host(o), cmd)
                    }
                    Some(_) => Routed::Refused(CommandError::NotOwner {
                        vm,
                        host: self.host.clone(),
                    }),
                    None => Routed::Refused(CommandError::NoOwner(vm)),
                }
            }
        }
    }

    /// Call when `now` has reached [`Node::poll_timeout`] (earlier or later is harmless).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        self.replay_deferred();
        if self.retry_at.is_some_and(|t| t <= self.now) {
            self.retry_at = None;
        }
        if !self.open() {
            return;
        }
        self.agent.handle_timeout(now);
        if let Some(l) = self.leader.as_mut() {
            l.controller.handle_timeout(now);
        }
        self.collect();
    }

    /// The earliest time the node needs [`Node::handle_timeout`] (also the next commit
    /// attempt after a failed one); agent and controller timers are paused while commands wait
    /// for their commit.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let retry = self.retry_at.filter(|_| !self.out.is_empty());
        if !self.open() {
            return retry;
        }
        if !self.deferred.is_empty() {
            // Inputs wait to be applied: at once.
            return Some(self.now);
        }
        [
            self.agent.poll_timeout(),
            self.leader
                .as_ref()
                .and_then(|l| l.controller.poll_timeout()),
            retry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves everything the agents produced into the outbox.
    fn collect(&mut self) {
        // The controller's admin changes reach this host's own agent at once, in the same
        // batch (other hosts learn them from the store): a freeze answered here holds here.
        while self.collect_once() {}
    }

    /// One pass of [`Node::collect`]; `true` if the controller changed admin records, which
    /// were handed to the agent (whose reaction a next pass collects).
    fn collect_once(&mut self) -> bool {
        while let Some(a) = self.agent.poll_action() {
            self.out.effects.host_actions.push(a);
        }
        while let Some(e) = self.agent.poll_event() {
            self.push_event(e);
        }
        while let Some((vm, report)) = self.agent.poll_report() {
            self.out.reports.insert(vm, report);
        }
        let dirty = self.agent.take_dirty();
        self.out.local |= dirty.local;
        self.out.settings.extend(dirty.settings);
        // A controller not yet given the cluster decides and writes nothing (it is built again
        // when the first listing arrives).
        if let Some(l) = self.leader.as_mut().filter(|l| l.fed) {
            while let Some(a) = l.controller.poll_action() {
                self.out.effects.controller_actions.push((l.term, a));
            }
            let mut events = Vec::new();
            while let Some(e) = l.controller.poll_event() {
                events.push(e);
            }
            let d = l.controller.take_dirty();
            self.out.controller_state |= d.state.is_some();
            self.out
                .admin
                .extend(d.admin.iter().map(|(vm, _)| vm.clone()));
            for e in events {
                self.push_event(e);
            }
            let changed = !d.admin.is_empty();
            for (vm, admin) in d.admin {
                let record = Record::Admin {
                    vm,
                    admin: Some(admin),
                };
                self.mirror.insert(record.key(), record.clone());
                self.agent.handle_record(self.now, &record);
            }
            return changed;
        }
        false
    }

    fn push_event(&mut self, e: Event) {
        let seq = self.next_event;
        self.next_event = self.next_event.saturating_add(1);
        // The sequence number is persisted with the node's state.
        self.out.local = true;
        if self.out.events.len() >= MAX_PENDING_EVENTS {
            self.out.events.pop_front();
            self.health.dropped_events = self.health.dropped_events.saturating_add(1);
        }
        self.out.effects.events.push(e.clone());
        self.out.events.push_back((seq, e));
    }

    /// The next batch to persist and carry out, if there is anything and no batch is in
    /// flight. Queued commands are applied here, once everything before them is committed.
    ///
    /// While the store is degraded and a batch is in flight, effects produced meanwhile come out
    /// at once as a `Ready` with an empty persist and id 0 (nothing to commit or advance).
    pub fn ready(&mut self) -> Option<Ready> {
        self.replay_deferred();
        let retry_later = self.retry_at.is_some_and(|t| self.now < t);
        if self.in_flight.is_some() || retry_later {
            if self.health.degraded.is_some() && !self.out.effects.is_empty() {
                return Some(Ready {
                    id: 0,
                    persist: Persist::default(),
                    run_now: std::mem::take(&mut self.out.effects),
                    commands: false,
                });
            }
            return None;
        }
        if self.out.is_empty() && !self.queued.is_empty() && self.barrier.is_none() {
            self.apply_commands();
        }
        if self.out.is_empty() {
            return None;
        }
        let out = std::mem::take(&mut self.out);
        let persist = self.persist_of(&out);
        self.next_ready = self.next_ready.saturating_add(1);
        let id = self.next_ready;
        let (run_now, effects) = if self.health.degraded.is_some() {
            (out.effects, Effects::default())
        } else {
            (Effects::default(), out.effects)
        };
        self.health.pending_events = persist.events.len();
        self.in_flight = Some(InFlight {
            id,
            persist: persist.clone(),
            effects,
        });
        Some(Ready {
            id,
            persist,
            run_now,
            commands: self.barrier.is_some(),
        })
    }

    fn persist_of(&self, out: &Outbox) -> Persist {
        let host = &self.host;
        Persist {
            node: out.local.then(|| NodeState {
                agent: self.agent.state(),
                next_event: self.next_event,
            }),
            settings: out
                .settings
                .iter()
                .filter_map(|vm| self.agent.settings(vm).map(|s| (vm.clone(), s)))
                .collect(),
            reports: out
                .reports
                .iter()
                .map(|(vm, report)| {
                    (
                        vm.clone(),
                        HostReport {
                            host: host.clone(),
                            incarnation: self.incarnation,
                            report: report.clone(),
                        },
                    )
                })
                .collect(),
            events: out.events.iter().cloned().collect(),
            controller: self.leader.as_ref().and_then(|l| {
                if !out.controller_state && out.admin.is_empty() {
                    return None;
                }
                let admin = out
                    .admin
                    .iter()
                    .filter_map(|vm| l.controller.admin(vm).map(|a| (vm.clone(), a)))
                    .collect();
                Some(ControllerPersist {
                    term: l.term,
                    state: out.controller_state.then(|| l.controller.state()),
                    admin,
                })
            }),
            replies: out.remote_replies.clone(),
        }
    }

    /// Reports how the commit of [`Ready`] `id` ended, and returns what to do now: on success
    /// the batch's effects; on failure the effects that do not depend on the failed commit
    /// (monitoring and local restarts go on) and the refusals of the commands it held, which
    /// are undone.
    pub fn advance(&mut self, id: u64, outcome: Commit) -> Effects {
        let Some(flight) = self.in_flight.take_if(|f| f.id == id) else {
            return Effects::default();
        };
        let mut effects = flight.effects;
        match outcome {
            Commit::Ok => {
                self.health.degraded = None;
                self.retry_at = None;
                if !flight.persist.is_empty() {
                    self.health.commits = self.health.commits.saturating_add(1);
                }
                self.remember(&flight.persist);
                self.health.pending_events = self.out.events.len();
                self.barrier = None;
            }
            Commit::Failed(error) => {
                self.health.degraded = Some(error.clone());
                self.retry_at = Some(self.now.plus_ms(COMMIT_RETRY_MS));
                let refusal = CommandError::StoreUnavailable(error);
                effects = self.undo(flight.persist, effects, refusal.clone());
                // Commands still waiting would hold up monitoring for the whole outage.
                while let Some((origin, _)) = self.queued.pop_front() {
                    self.reply(origin, Err(refusal.clone()));
                }
            }
            Commit::Deposed => {
                effects = self.undo(flight.persist, effects, CommandError::NoController);
                self.leader = None;
                self.elected = None;
                effects.controller_actions.clear();
            }
        }
        // Inputs that waited for the commands are applied at the next call (handle, ready,
        // handle_timeout): the state right after `advance` is the committed (or restored) one.
        effects
    }

    /// What this node committed is in the store now: its view of the store holds it too
    /// (before the watch echoes it back), so nothing built from the view misses it.
    fn remember(&mut self, persist: &Persist) {
        let mut records = Vec::new();
        if let Some(state) = &persist.node {
            records.push(Record::Agent {
                host: self.host.clone(),
                state: Some(state.clone()),
            });
        }
        for (vm, settings) in &persist.settings {
            records.push(Record::Settings {
                vm: vm.clone(),
                settings: Some(settings.clone()),
            });
        }
        for (vm, report) in &persist.reports {
            records.push(Record::Report {
                vm: vm.clone(),
                report: Some(report.clone()),
            });
        }
        if let Some(c) = &persist.controller {
            if let Some(state) = &c.state {
                records.push(Record::Controller {
                    state: Some(state.clone()),
                });
            }
            for (vm, admin) in &c.admin {
                records.push(Record::Admin {
                    vm: vm.clone(),
                    admin: Some(admin.clone()),
                });
            }
        }
        for record in records {
            self.mirror.insert(record.key(), record);
        }
    }

    /// A commit failed: undo the commands it held (and refuse them), or keep what it should
    /// have written for the next batch. Returns the effects to run anyway.
    fn undo(&mut self, persist: Persist, effects: Effects, refusal: CommandError) -> Effects {
        if let Some(barrier) = self.barrier.take() {
            let barrier = *barrier;
            self.agent = barrier.agent;
            self.leader = barrier.leader;
            self.next_event = barrier.next_event;
            // Forwards and refusals made nothing to undo.
            let kept = Effects {
                forwards: effects.forwards,
                replies: effects
                    .replies
                    .into_iter()
                    .filter(|(id, _)| !barrier.origins.contains(&CommandOrigin::Local(*id)))
                    .collect(),
                ..Effects::default()
            };
            for origin in barrier.origins {
                self.reply(origin, Err(refusal.clone()));
            }
            // Replies to other hosts' commands that were refused anyway are still owed.
            for (key, result) in persist.replies {
                if result.is_err() {
                    self.out.remote_replies.push((key, result));
                }
            }
            self.health.pending_events = self.out.events.len();
            return kept;
        }
        // Not written: keep it for the next batch (state is re-read then, events kept as is).
        for e in persist.events.into_iter().rev() {
            self.out.events.push_front(e);
        }
        while self.out.events.len() > MAX_PENDING_EVENTS {
            self.out.events.pop_front();
            self.health.dropped_events = self.health.dropped_events.saturating_add(1);
        }
        self.out.local |= persist.node.is_some();
        self.out
            .settings
            .extend(persist.settings.into_iter().map(|(vm, _)| vm));
        for (vm, r) in persist.reports {
            self.out.reports.entry(vm).or_insert(r.report);
        }
        if let Some(c) = persist.controller {
            self.out.controller_state |= c.state.is_some();
            self.out.admin.extend(c.admin.into_iter().map(|(vm, _)| vm));
        }
        let mut replies = persist.replies;
        replies.append(&mut self.out.remote_replies);
        self.out.remote_replies = replies;
        self.health.pending_events = self.out.events.len();
        effects
    }

    fn replay_deferred(&mut self) {
        while self.open() {
            let Some((now, input)) = self.deferred.pop_front() else {
                return;
            };
            self.apply(now, input);
            self.collect();
        }
    }

    /// The node's view: this host's VM groups, the controller's view while it leads, and how
    /// the store fares.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            agent: self.agent.status(),
            controller: self.leader.as_ref().map(|l| l.controller.status()),
            term: self.term(),
            store: self.health.clone(),
        }
    }

    /// Nothing waits to be persisted, carried out or applied: everything the node decided is
    /// in the store and done.
    pub fn idle(&self) -> bool {
        self.out.is_empty()
            && self.in_flight.is_none()
            && self.queued.is_empty()
            && self.deferred.is_empty()
    }

    /// How the node's writes to the cluster store fare.
    pub fn store_health(&self) -> &StoreHealth {
        &self.health
    }
}

enum Routed {
    Applied,
    Refused(CommandError),
    Forwarded(Receiver, AdminCommand),
}

/// What a record means to the controller.
fn controller_inputs(record: &Record) -> Vec<ControllerInput> {
    match record {
        Record::Host { host, member } => {
            let mut v = vec![ControllerInput::HostLease {
                host: host.clone(),
                up: member.is_some(),
                incarnation: member.as_ref().map_or(0, |m| m.incarnation),
            }];
            if let Some(memory_mb) = member.as_ref().and_then(|m| m.memory_mb) {
                v.push(ControllerInput::HostCapacity {
                    host: host.clone(),
                    memory_mb,
                });
            }
            v
        }
        Record::Owner {
            vm,
            record,
            revision,
        } => vec![ControllerInput::Ownership {
            vm: vm.clone(),
            record: record.clone(),
            revision: *revision,
        }],
        Record::Admin { vm, admin } => vec![ControllerInput::Admin {
            vm: vm.clone(),
            admin: admin.clone(),
        }],
        Record::Report { vm, report } => match report {
            Some(HostReport {
                host,
                incarnation,
                report,
            }) => vec![ControllerInput::Report {
                host: host.clone(),
                incarnation: *incarnation,
                vm: vm.clone(),
                report: report.clone(),
            }],
            None => Vec::new(),
        },
        Record::Settings { .. } | Record::Agent { .. } | Record::Controller { .. } => Vec::new(),
    }
}
