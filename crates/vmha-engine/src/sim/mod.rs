//! A deterministic simulated cluster: one [`Node`] per host — the very core vmhad runs — wired
//! through an in-memory cluster store ([`store`]: records with revisions, leases that expire
//! `ttl` after a host stops renewing, the controller election with its term as fencing token),
//! with a model of the VMs and of the apps inside them ([`world`]). Used by the scenario tests,
//! the property tests and the benchmarks; like raft-rs's harness, everything happens in one
//! thread in a fixed order, so a script always gives the same log. `vmha simulate` runs it
//! for operators ([`Sim::from_snapshot`] starts from a live cluster's state; [`script`] is the
//! language, [`summary`] the final tables).
//!
//! Every node is driven exactly as the daemon drives it: inputs, then `ready()` → commit to the
//! store → `advance()` → effects. Admin commands enter through one host's node (the first live
//! host, or `admin@HOST`) and are forwarded through the store like the daemon forwards them.
//!
//! While it runs, the simulator checks the safety rules and records every breach in
//! [`Sim::violations`] ([`safety`]): a VM running on two hosts, an action other than a probe
//! on a frozen group (self-fencing excepted), an app started before what it requires is
//! online, a VM started on a host where its previous process still runs, and persisted state
//! that changed without being marked for persisting.

mod safety;
mod script;
mod snapshot;
mod store;
mod summary;
mod world;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use vmha_model::{Config, Name, Store};

use crate::command::AdminCommand;
use crate::controller::{Controller, ControllerActionKind};
use crate::host_agent::{HostAgent, HostAgentError};
use crate::host_io::{
    ActionError, ExitStatus, HostAction, HostActionKind, HostInput, ProbeOutcome, Unreadable,
    VmObservation,
};
use crate::ids::ActionId;
use crate::node::{CommandOrigin, Effects, Node, NodeInput, Receiver};
use crate::records::Record;
use crate::time::{Timestamp, millis};

pub use script::{
    CrashKind, SimCommand, StartBehaviour, admin_text, parse_script, parse_script_for,
};
pub use snapshot::{ClusterSnapshot, GuestSnapshot};
use store::SimStore;
pub use summary::{HostLine, Placement};
use world::{AppModel, GuestModel};

/// Why a simulation could not be built or a script line not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// A host's node could not be created.
    #[error(transparent)]
    Agent(#[from] HostAgentError),
    /// A script line is malformed.
    #[error("line {line}: {msg}")]
    Script {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
}

#[derive(Debug)]
struct SimHost {
    name: Name,
    node: Option<Node>,
    connected: bool,
    epoch: u64,
    running: BTreeSet<Name>,
    /// Incoming QEMUs (live migration targets) that run nothing yet.
    incoming: BTreeSet<Name>,
    /// Source QEMUs paused for good after a completed live migration.
    migrated: BTreeSet<Name>,
    guest_up: BTreeSet<Name>,
    vms: Vec<Name>,
    /// The life of the host's lease (a new one after a crash or a lost lease).
    incarnation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    GuestUp {
        host: usize,
        vm: Name,
    },
    /// A live migration sent from `host` ends.
    Migration {
        host: usize,
        vm: Name,
    },
    /// The source's `migrate` follower sees the completed migration (it polls).
    MigrationSeen {
        host: usize,
        id: ActionId,
    },
    Fence {
        host: usize,
        epoch: u64,
    },
    LeaseExpire {
        host: usize,
        epoch: u64,
    },
}

/// Something for a node, in delivery order.
#[derive(Debug, Clone)]
enum Delivery {
    Input(NodeInput),
    Command(CommandOrigin, AdminCommand),
}

/// A restart the simulator saw performed (for budget checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// Position of the start action in [`Sim::actions`].
    pub seq: usize,
    /// When.
    pub time: Timestamp,
    /// On which host.
    pub host: Name,
    /// VM.
    pub vm: Name,
    /// The app, or `None` for a VM restart.
    pub app: Option<Name>,
}

/// The simulated cluster.
#[derive(Debug)]
pub struct Sim {
    config: Arc<Config>,
    now: Timestamp,
    hosts: Vec<SimHost>,
    store: SimStore,
    guests: BTreeMap<Name, GuestModel>,
    timers: BTreeSet<(Timestamp, u64, Timer)>,
    seq: u64,
    boot_ms: u64,
    ttl_ms: u64,
    fence_ms: u64,
    inbox: VecDeque<(usize, Delivery)>,
    log: Vec<String>,
    violations: Vec<String>,
    restarts: Vec<Restart>,
    actions: Vec<(Timestamp, Name, HostAction)>,
    decisions: BTreeMap<(Name, Name), (Timestamp, String)>,
    /// Admin commands waiting for their answer: (host, caller id) → script text.
    pending: BTreeMap<(usize, u64), String>,
    /// Live migrations in flight: (source host, VM) → (its `migrate` action, target host).
    migrations: BTreeMap<(usize, Name), (ActionId, usize)>,
    /// Forwarded commands: request key → (origin host, caller id).
    forwarded: BTreeMap<String, (usize, u64)>,
    next_command: u64,
    /// Probes are logged (script command `log-probes on`).
    log_probes: bool,
    /// Watchers running: (host, VM) → (action, apps watched).
    watchers: BTreeMap<(usize, Name), (crate::ActionId, Vec<Name>)>,
}

/// Time a simulated guest takes to bring its channel up after the VM starts.
pub const BOOT_MS: u64 = 1_000;

/// Time a simulated live migration takes from `migrate` to its end.
pub const MIGRATE_MS: u64 = 500;

/// The guest's pause at the end of a simulated live migration (reported, not simulated).
pub const MIGRATE_DOWNTIME_MS: u64 = 10;

/// How late the source's `migrate` follower sees a completed migration (it polls
/// `query-migrate`): by then the target runs the VM and may own it already.
pub const MIGRATE_POLL_MS: u64 = 100;

/// Settle-loop bound: more steps than this at one instant is reported as a livelock.
const MAX_STEPS: usize = 200_000;

impl Sim {
    /// Builds the cluster at time 0: every host up with a live lease, no VM running, no
    /// ownership record; the first host is elected controller and places everything.
    pub fn new(config: Arc<Config>) -> Result<Sim, SimError> {
        let mut sim = Sim::blank(config, Timestamp::ZERO);
        for h in 0..sim.hosts.len() {
            let name = sim.hosts[h].name.clone();
            let node = Node::new(sim.config.clone(), name, 1, None, Timestamp::ZERO)?;
            sim.hosts[h].node = Some(node);
        }
        // All hosts join before the first election (a cluster starting together).
        for h in 0..sim.hosts.len() {
            sim.join(h);
        }
        sim.elect();
        sim.settle();
        Ok(sim)
    }

    /// The cluster of `config` at `now` with every host down (no node), an empty store, every
    /// guest's apps down: what [`Sim::new`] and [`Sim::from_snapshot`] start from.
    fn blank(config: Arc<Config>, now: Timestamp) -> Sim {
        let (ttl_ms, fence_ms, leased) = match &config.cluster.store {
            Store::Etcd {
                ttl, fence_margin, ..
            } => (millis(*ttl), millis(*fence_margin), true),
            Store::Embedded => (
                millis(vmha_model::defaults::TTL),
                millis(vmha_model::defaults::FENCE_MARGIN),
                false,
            ),
        };
        let hosts = config
            .hosts
            .iter()
            .map(|h| SimHost {
                name: h.name.clone(),
                node: None,
                connected: false,
                epoch: 0,
                running: BTreeSet::new(),
                incoming: BTreeSet::new(),
                migrated: BTreeSet::new(),
                guest_up: BTreeSet::new(),
                vms: config
                    .vms
                    .iter()
                    .filter(|v| v.hosts.contains(&h.name))
                    .map(|v| v.name.clone())
                    .collect(),
                incarnation: 1,
            })
            .collect();
        let guests = config
            .vms
            .iter()
            .map(|v| (v.name.clone(), GuestModel::new(v)))
            .collect();
        Sim {
            config,
            now,
            hosts,
            store: SimStore::new(leased),
            guests,
            timers: BTreeSet::new(),
            seq: 0,
            boot_ms: BOOT_MS,
            ttl_ms,
            fence_ms,
            inbox: VecDeque::new(),
            log: Vec::new(),
            violations: Vec::new(),
            restarts: Vec::new(),
            actions: Vec::new(),
            decisions: BTreeMap::new(),
            pending: BTreeMap::new(),
            migrations: BTreeMap::new(),
            forwarded: BTreeMap::new(),
            next_command: 0,
            log_probes: false,
            watchers: BTreeMap::new(),
        }
    }

    /// Current simulated time.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The log so far: events, actions other than probes, ownership writes, alerts, elections
    /// and admin results, one per line.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// Safety breaches seen so far (empty when all is well).
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Every app and VM restart performed, in order.
    pub fn restarts(&self) -> &[Restart] {
        &self.restarts
    }

    /// Every host action performed, with its time and host.
    pub fn actions(&self) -> &[(Timestamp, Name, HostAction)] {
        &self.actions
    }

    /// The node of a host, if the host is alive.
    pub fn node(&self, host: &str) -> Option<&Node> {
        self.hosts
            .iter()
            .find(|h| h.name.as_str() == host)
            .and_then(|h| h.node.as_ref())
    }

    /// The agent of a host, if the host is alive.
    pub fn agent(&self, host: &str) -> Option<&HostAgent> {
        self.node(host).map(Node::agent)
    }

    /// The elected controller, if any.
    pub fn controller(&self) -> Option<&Controller> {
        let (h, _) = self.store.leader?;
        self.hosts[h].node.as_ref().and_then(Node::controller)
    }

    /// Hosts the VM runs on right now (more than one is a violation).
    pub fn running_on(&self, vm: &str) -> Vec<Name> {
        self.hosts
            .iter()
            .filter(|h| h.running.iter().any(|v| v.as_str() == vm))
            .map(|h| h.name.clone())
            .collect()
    }

    /// The incarnation host `h`'s node runs as.
    fn incarnation(&self, h: usize) -> u64 {
        self.hosts[h].incarnation
    }

    fn host_idx(&self, name: &Name) -> Option<usize> {
        self.hosts.iter().position(|h| &h.name == name)
    }

    fn timer(&mut self, at: Timestamp, t: Timer) {
        self.seq += 1;
        self.timers.insert((at, self.seq, t));
    }

    fn input(&mut self, h: usize, input: NodeInput) {
        self.inbox.push_back((h, Delivery::Input(input)));
    }

    fn host_input(&mut self, h: usize, input: HostInput) {
        self.input(h, NodeInput::Host(input));
    }

    /// Hands changed records to every connected host, as the store's watch does.
    fn publish(&mut self, changes: Vec<Record>) {
        if changes.is_empty() {
            return;
        }
        for h in 0..self.hosts.len() {
            if self.hosts[h].connected && self.hosts[h].node.is_some() {
                let records = changes.clone();
                self.input(
                    h,
                    NodeInput::Records {
                        records,
                        full: false,
                    },
                );
            }
        }
    }

    /// The host (re)joins the store: a live lease, its membership, what runs on it, the whole
    /// store as one listing; an election if nobody leads.
    fn connect_host(&mut self, h: usize) {
        self.join(h);
        self.elect();
    }

    /// Host `h` joins the store (see [`Sim::connect_host`]), without an election.
    fn join(&mut self, h: usize) {
        self.hosts[h].connected = true;
        self.hosts[h].epoch += 1;
        let name = self.hosts[h].name.clone();
        let memory = self.config.host(name.as_str()).and_then(|c| c.memory_mb);
        self.host_input(h, HostInput::Lease { live: true });
        for vm in self.hosts[h].vms.clone() {
            // Adoption reports the VM as it is: paused with its reason, running, unresponsive
            // (a QEMU that runs but cannot be adopted), or gone.
            let kind = if self.hosts[h].running.contains(&vm) {
                match self.guests.get(&vm) {
                    Some(g) if g.qemu_hung => VmObservation::Unresponsive,
                    Some(GuestModel {
                        paused: Some(reason),
                        ..
                    }) => VmObservation::Paused { reason: *reason },
                    _ => VmObservation::Running,
                }
            } else {
                VmObservation::Gone
            };
            self.host_input(h, HostInput::VmObserved { vm, kind });
        }
        let changes = self.store.register(h, &name, memory, self.incarnation(h));
        let others = changes.clone();
        let records = self.store.listing();
        self.input(
            h,
            NodeInput::Records {
                records,
                full: true,
            },
        );
        for o in 0..self.hosts.len() {
            if o != h && self.hosts[o].connected && self.hosts[o].node.is_some() {
                let records = others.clone();
                self.input(
                    o,
                    NodeInput::Records {
                        records,
                        full: false,
                    },
                );
            }
        }
    }

    /// Elects the first live, connected host when nobody leads (etcd's election: the next
    /// candidate wins once the leader's key is gone with its lease).
    fn elect(&mut self) {
        if self.store.leader.is_some() {
            return;
        }
        let Some(h) = (0..self.hosts.len())
            .find(|&h| self.hosts[h].connected && self.hosts[h].node.is_some())
        else {
            return;
        };
        let term = self.store.elect(h);
        let name = self.hosts[h].name.clone();
        self.log.push(format!(
            "{} {name} elected controller (term {term})",
            self.now
        ));
        self.input(h, NodeInput::Leadership(Some(term)));
    }

    /// Advances time by `ms`, waking nodes and firing timers on the way.
    pub fn advance(&mut self, ms: u64) {
        let target = self.now.plus_ms(ms);
        let mut guard = 0usize;
        loop {
            let mut next: Option<Timestamp> = self.timers.first().map(|t| t.0);
            for h in &self.hosts {
                if let Some(t) = h.node.as_ref().and_then(Node::poll_timeout) {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
            let Some(t) = next.filter(|t| *t <= target) else {
                break;
            };
            guard += 1;
            if guard > MAX_STEPS {
                self.violations
                    .push(format!("{} livelock: timers never settle", self.now));
                break;
            }
            self.now = self.now.max(t);
            let now = self.now;
            while let Some(first) = self.timers.first().cloned() {
                if first.0 > now {
                    break;
                }
                self.timers.remove(&first);
                self.fire(first.2);
            }
            for h in 0..self.hosts.len() {
                if let Some(node) = self.hosts[h].node.as_mut()
                    && node.poll_timeout().is_some_and(|x| x <= now)
                {
                    node.handle_timeout(now);
                }
            }
            self.settle();
        }
        self.now = target;
    }

    fn fire(&mut self, t: Timer) {
        match t {
            Timer::GuestUp { host, vm } => {
                // The guest agent runs from now on; the engine finds out by pinging it.
                if self.hosts[host].running.contains(&vm)
                    && !self.guests.get(&vm).is_some_and(|g| g.hung || g.boot_hang)
                {
                    self.hosts[host].guest_up.insert(vm);
                }
            }
            Timer::Migration { host, vm } => self.end_migration(host, &vm),
            Timer::MigrationSeen { host, id } => {
                if self.hosts[host].node.is_some() {
                    let figures = crate::host_io::MigrationFigures {
                        total_ms: MIGRATE_MS,
                        downtime_ms: MIGRATE_DOWNTIME_MS,
                    };
                    let result = Ok(figures);
                    self.host_input(host, HostInput::MigrationResult { id, result });
                }
            }
            Timer::Fence { host, epoch } => {
                if self.hosts[host].epoch == epoch && self.hosts[host].node.is_some() {
                    self.host_input(host, HostInput::Lease { live: false });
                }
            }
            Timer::LeaseExpire { host, epoch } => {
                if self.hosts[host].epoch == epoch {
                    let changes = self.store.expire(host);
                    self.publish(changes);
                    self.elect();
                }
            }
        }
    }

    /// Delivers every queued input and drives every node until nothing moves.
    fn settle(&mut self) {
        for _ in 0..MAX_STEPS {
            let mut progress = false;
            for h in 0..self.hosts.len() {
                progress |= self.drive(h);
            }
            self.check_single_run();
            if let Some((h, delivery)) = self.inbox.pop_front() {
                let now = self.now;
                if let Some(node) = self.hosts[h].node.as_mut() {
                    match delivery {
                        Delivery::Input(input) => node.handle(now, input),
                        Delivery::Command(origin, cmd) => node.command(now, origin, cmd),
                    }
                }
                continue;
            }
            if !progress {
                self.check_persisted();
                return;
            }
        }
        self.violations
            .push(format!("{} livelock: inputs never settle", self.now));
    }

    /// Drives host `h`'s node as the daemon does: ready → commit → advance → effects.
    fn drive(&mut self, h: usize) -> bool {
        let mut any = false;
        loop {
            let Some(node) = self.hosts[h].node.as_mut() else {
                return any;
            };
            let Some(ready) = node.ready() else {
                return any;
            };
            any = true;
            self.effects(h, ready.run_now);
            if ready.id == 0 {
                continue;
            }
            let name = self.hosts[h].name.clone();
            let connected = self.hosts[h].connected;
            let (outcome, changes) = self.store.commit(h, &name, connected, &ready.persist);
            let committed = outcome == crate::node::Commit::Ok;
            if committed {
                for (key, result) in &ready.persist.replies {
                    self.answer_forwarded(key, result);
                }
            }
            self.publish(changes);
            let Some(node) = self.hosts[h].node.as_mut() else {
                return any;
            };
            let effects = node.advance(ready.id, outcome);
            self.effects(h, effects);
            self.log_decisions(h);
        }
    }

    fn effects(&mut self, h: usize, effects: Effects) {
        for e in &effects.events {
            self.log.push(e.to_string());
        }
        for action in effects.host_actions {
            self.host_action(h, action);
        }
        for (term, action) in effects.controller_actions {
            self.controller_action(h, term, action.id, action.kind, &action.reason);
        }
        for (id, result) in effects.replies {
            let text = self.pending.remove(&(h, id)).unwrap_or_default();
            self.admin_result(&text, &result);
        }
        for f in effects.forwards {
            let target = match &f.to {
                Receiver::Controller => self.store.leader.map(|(l, _)| l),
                Receiver::Host(name) => self.host_idx(name),
            };
            let reachable = |s: &Sim, x: usize| s.hosts[x].connected && s.hosts[x].node.is_some();
            match target.filter(|&t| reachable(self, t) && reachable(self, h)) {
                Some(t) => {
                    let key = format!("{}/{}", self.hosts[h].name, f.id);
                    self.forwarded.insert(key.clone(), (h, f.id));
                    self.inbox
                        .push_back((t, Delivery::Command(CommandOrigin::Remote(key), f.command)));
                }
                None => {
                    let text = self.pending.remove(&(h, f.id)).unwrap_or_default();
                    let who = match f.to {
                        Receiver::Controller => "the cluster controller".to_string(),
                        Receiver::Host(n) => format!("host {n}"),
                    };
                    let e = crate::CommandError::NotTaken(who);
                    self.admin_result(&text, &Err(e));
                }
            }
        }
    }

    fn answer_forwarded(&mut self, key: &str, result: &Result<(), crate::CommandError>) {
        if let Some((h, id)) = self.forwarded.remove(key) {
            let text = self.pending.remove(&(h, id)).unwrap_or_default();
            self.admin_result(&text, result);
        }
    }

    fn admin_result(&mut self, text: &str, result: &Result<(), crate::CommandError>) {
        let now = self.now;
        match result {
            Ok(()) => self.log.push(format!("{now} admin {text}: ok")),
            Err(e) => self.log.push(format!("{now} admin {text}: error: {e}")),
        }
    }

    /// Logs decision-agent runs that changed nothing (those that did are event reasons).
    fn log_decisions(&mut self, h: usize) {
        let Some(node) = self.hosts[h].node.as_ref() else {
            return;
        };
        let host = self.hosts[h].name.clone();
        for vm in node.agent().status().vms {
            let Some(last) = vm.decisions.last() else {
                continue;
            };
            let key = (host.clone(), vm.name.clone());
            let seen = (last.time, last.reason.clone());
            if self.decisions.get(&key) == Some(&seen) {
                continue;
            }
            if last.verdict == crate::Verdict::NoAction {
                self.log.push(format!(
                    "{} {host} {} decision: {}",
                    last.time, vm.name, last.reason
                ));
            }
            self.decisions.insert(key, seen);
        }
    }

    fn guest_reachable(&self, h: usize, vm: &Name) -> bool {
        self.hosts[h].running.contains(vm)
            && self.hosts[h].guest_up.contains(vm)
            && !self
                .guests
                .get(vm)
                .is_some_and(|g| g.hung || g.qemu_hung || g.paused.is_some())
    }

    /// How the guest agent of `vm` on host `h` answers a guest-exec: refused when it is out of
    /// reach or blocks `guest-exec`.
    fn guest_exec(&self, h: usize, vm: &Name) -> Result<(), ActionError> {
        if !self.guest_reachable(h, vm) {
            return Err(unreachable());
        }
        if self.guests.get(vm).is_some_and(|g| g.hostile) {
            return Err(ActionError::GuestHostile {
                detail: "sent more than 4259840 bytes while vmha waited for guest-sync-delimited"
                    .to_string(),
            });
        }
        if self.guests.get(vm).is_some_and(|g| g.exec_blocked) {
            return Err(exec_blocked());
        }
        Ok(())
    }

    fn host_action(&mut self, h: usize, a: HostAction) {
        let host = self.hosts[h].name.clone();
        self.check_action(h, &a);
        self.actions.push((self.now, host.clone(), a.clone()));
        let now = self.now;
        let id = a.id;
        let line = |what: &str| format!("{now} {host} action {what}");
        match a.kind {
            HostActionKind::Probe { vm, checks } => {
                if self.log_probes {
                    let apps: Vec<&str> = checks.iter().map(|c| c.app.as_str()).collect();
                    self.log
                        .push(line(&format!("probe {vm}: {}", apps.join(", "))));
                }
                if let Err(e) = self.guest_exec(h, &vm) {
                    let result = Err(e);
                    self.host_input(h, HostInput::ActionResult { id, result });
                    return;
                }
                let outcomes = checks
                    .into_iter()
                    .map(|c| {
                        let o = self.check_outcome(&vm, &c.app);
                        (c.app, o)
                    })
                    .collect();
                self.host_input(h, HostInput::ProbeResult { id, vm, outcomes });
            }
            HostActionKind::Watch { vm, targets, .. } => {
                let apps: Vec<&str> = targets.iter().map(|t| t.app.as_str()).collect();
                self.log
                    .push(line(&format!("watch {vm}: {}", apps.join(", "))));
                if let Err(e) = self.guest_exec(h, &vm) {
                    let result = Err(e);
                    self.host_input(h, HostInput::ActionResult { id, result });
                    return;
                }
                // A process not running is not found, nor one named in a way the guest does
                // not know (a pid file or process name ending in `.missing`, by convention
                // of the simulation); the others are waited on.
                let guest = self.guests.get(&vm);
                let (found, not_found): (Vec<crate::WatchTarget>, Vec<crate::WatchTarget>) =
                    targets.into_iter().partition(|t| {
                        let named = match &t.process {
                            crate::ProcessRef::PidFile(x) | crate::ProcessRef::Name(x) => x,
                        };
                        !named.ends_with(".missing")
                            && guest
                                .and_then(|g| g.apps.get(&t.app))
                                .is_some_and(|m| m.running)
                    });
                let found: Vec<Name> = found.into_iter().map(|t| t.app).collect();
                let not_found: Vec<Name> = not_found.into_iter().map(|t| t.app).collect();
                // The new watcher replaces the old one, whose poll ends.
                if let Some((old, _)) = self.watchers.remove(&(h, vm.clone())) {
                    let result = Err(ActionError::GuestUnreachable {
                        detail: "replaced by a new watcher".into(),
                    });
                    self.host_input(h, HostInput::ActionResult { id: old, result });
                }
                if not_found.is_empty() {
                    self.watchers.insert((h, vm), (id, found));
                } else {
                    // As the real watcher: a target not found ends it at once.
                    let report = crate::WatchReport {
                        end: crate::WatchEnd::NotFound,
                        not_found,
                        checked: None,
                    };
                    self.host_input(h, HostInput::WatchResult { id, vm, report });
                }
            }
            HostActionKind::PingGuest { vm, check_exec, .. } => {
                let result = match self.guest_exec(h, &vm) {
                    Err(ActionError::ExecBlocked { .. }) if !check_exec => Ok(()),
                    other => other,
                };
                self.host_input(h, HostInput::ActionResult { id, result });
            }
            HostActionKind::StartApp { vm, app, .. } => {
                self.log.push(line(&format!("start-app {vm}/{app}")));
                let result = self.guest_exec(h, &vm).and_then(|()| {
                    self.app_model(&vm, &app)
                        .map_or(Err(unreachable()), AppModel::start)
                });
                self.host_input(h, HostInput::ActionResult { id, result });
            }
            HostActionKind::StopApp { vm, app, .. } => {
                self.log.push(line(&format!("stop-app {vm}/{app}")));
                let result = self.guest_exec(h, &vm).and_then(|()| {
                    self.app_model(&vm, &app).map_or(Err(unreachable()), |m| {
                        m.running = false;
                        Ok(())
                    })
                });
                self.host_input(h, HostInput::ActionResult { id, result });
            }
            HostActionKind::StartVm { vm } => {
                self.log.push(line(&format!("start-vm {vm}")));
                if self.hosts[h].running.contains(&vm) {
                    self.violations.push(format!(
                        "{now} {host} started {vm} while its previous process still runs there"
                    ));
                }
                if a.reason.starts_with("restart") {
                    self.restarts.push(Restart {
                        seq: self.actions.len() - 1,
                        time: now,
                        host: host.clone(),
                        vm: vm.clone(),
                        app: None,
                    });
                }
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.fresh_boot();
                }
                self.hosts[h].running.insert(vm.clone());
                self.hosts[h].guest_up.remove(&vm);
                self.timer(now.plus_ms(self.boot_ms), Timer::GuestUp { host: h, vm });
                self.host_input(h, HostInput::ActionResult { id, result: Ok(()) });
            }
            HostActionKind::PrepareIncoming { vm } => {
                self.log.push(line(&format!("prepare-incoming {vm}")));
                let busy = self.hosts[h].running.contains(&vm)
                    || self.hosts[h].incoming.contains(&vm)
                    || self.hosts[h].migrated.contains(&vm);
                if busy {
                    self.violations.push(format!(
                        "{now} {host} prepared an incoming {vm} while a QEMU of it is there"
                    ));
                }
                self.hosts[h].incoming.insert(vm.clone());
                let uri = format!("tcp:{host}:49152");
                self.host_input(
                    h,
                    HostInput::IncomingResult {
                        id,
                        result: Ok(uri),
                    },
                );
                let kind = VmObservation::Paused {
                    reason: vmha_model::PauseReason::Migration,
                };
                self.host_input(h, HostInput::VmObserved { vm, kind });
            }
            HostActionKind::Migrate { vm, uri } => {
                self.log.push(line(&format!("migrate {vm} {uri}")));
                let target = uri
                    .strip_prefix("tcp:")
                    .and_then(|r| r.rsplit_once(':'))
                    .and_then(|(t, _)| self.host_idx(&Name::new(t).ok()?));
                match target {
                    Some(t) => {
                        self.migrations.insert((h, vm.clone()), (id, t));
                        self.timer(now.plus_ms(MIGRATE_MS), Timer::Migration { host: h, vm });
                    }
                    None => {
                        let result = Err(ActionError::Driver {
                            detail: format!("bad migration URI {uri}"),
                        });
                        self.host_input(h, HostInput::MigrationResult { id, result });
                    }
                }
            }
            HostActionKind::CancelMigration { vm } => {
                self.log.push(line(&format!("cancel-migration {vm}")));
                if let Some((mid, _)) = self.migrations.remove(&(h, vm)) {
                    let result = Err(ActionError::Driver {
                        detail: "migration cancelled".to_string(),
                    });
                    self.host_input(h, HostInput::MigrationResult { id: mid, result });
                }
                self.host_input(h, HostInput::ActionResult { id, result: Ok(()) });
            }
            HostActionKind::StopVm { ref vm, .. } | HostActionKind::KillVm { ref vm } => {
                let vm = vm.clone();
                let what = match (&a.kind, a.reason.starts_with("self-fencing")) {
                    (HostActionKind::StopVm { .. }, _) => "stop-vm",
                    (_, true) => "kill-vm (self-fencing)",
                    _ => "kill-vm",
                };
                self.log.push(line(&format!("{what} {vm}")));
                self.vm_down(h, &vm);
                self.host_input(
                    h,
                    HostInput::VmObserved {
                        vm,
                        kind: VmObservation::Gone,
                    },
                );
                self.host_input(h, HostInput::ActionResult { id, result: Ok(()) });
            }
        }
    }

    /// A live migration from host `h` ends: it completes when both QEMUs are still there and
    /// both hosts can reach each other (both connected), else it fails and the source runs on.
    fn end_migration(&mut self, h: usize, vm: &Name) {
        let Some((id, t)) = self.migrations.remove(&(h, vm.clone())) else {
            return;
        };
        let now = self.now;
        let sending = self.hosts[h].node.is_some() && self.hosts[h].running.contains(vm);
        let cut = !self.hosts[h].connected || !self.hosts[t].connected;
        if sending && cut {
            // A host cut off: the stream stalls (no reset reaches the source, whatever
            // happens behind the cut) until the source cancels it or its QEMU goes.
            self.migrations.insert((h, vm.clone()), (id, t));
            let again = Timer::Migration {
                host: h,
                vm: vm.clone(),
            };
            self.timer(now.plus_ms(MIGRATE_MS), again);
            return;
        }
        let ok = self.hosts[h].node.is_some()
            && self.hosts[t].node.is_some()
            && self.hosts[h].connected
            && self.hosts[t].connected
            && self.hosts[h].running.contains(vm)
            && self.hosts[t].incoming.contains(vm);
        if !ok {
            self.log.push(format!(
                "{now} {} migration of {vm} to {} failed",
                self.hosts[h].name, self.hosts[t].name
            ));
            let result = Err(ActionError::Driver {
                detail: "migration failed: connection to the target lost".to_string(),
            });
            if self.hosts[h].node.is_some() {
                self.host_input(h, HostInput::MigrationResult { id, result });
            }
            return;
        }
        self.log.push(format!(
            "{now} {} migration of {vm} to {} completed",
            self.hosts[h].name, self.hosts[t].name
        ));
        // The source's vCPUs stop before the target's start: never two running.
        self.hosts[h].running.remove(vm);
        self.hosts[h].migrated.insert(vm.clone());
        let was_up = self.hosts[h].guest_up.remove(vm);
        let paused = VmObservation::Paused {
            reason: vmha_model::PauseReason::Migration,
        };
        self.host_input(
            h,
            HostInput::VmObserved {
                vm: vm.clone(),
                kind: paused,
            },
        );
        // Its follower polls: it sees the completion a little after the target resumed.
        let seen = Timer::MigrationSeen { host: h, id };
        self.timer(now.plus_ms(MIGRATE_POLL_MS), seen);
        self.hosts[t].incoming.remove(vm);
        self.hosts[t].running.insert(vm.clone());
        if was_up {
            self.hosts[t].guest_up.insert(vm.clone());
        }
        let resumed = VmObservation::Resumed;
        self.host_input(
            t,
            HostInput::VmObserved {
                vm: vm.clone(),
                kind: resumed,
            },
        );
    }

    fn vm_down(&mut self, h: usize, vm: &Name) {
        self.hosts[h].incoming.remove(vm);
        self.hosts[h].migrated.remove(vm);
        if self.hosts[h].running.remove(vm)
            && let Some(g) = self.guests.get_mut(vm)
        {
            g.apps_down();
            g.paused = None;
        }
        self.hosts[h].guest_up.remove(vm);
    }

    fn controller_action(
        &mut self,
        h: usize,
        term: u64,
        id: ActionId,
        kind: ControllerActionKind,
        reason: &str,
    ) {
        let now = self.now;
        match kind {
            ControllerActionKind::Alert { vm } => {
                self.log
                    .push(format!("{now} controller ALERT {vm}: {reason}"));
            }
            ControllerActionKind::CasOwner {
                vm,
                expected_revision,
                record,
            } => {
                let owner = record.owner.as_ref().and_then(|o| self.host_idx(o));
                let connected = self.hosts[h].connected;
                let writer = store::Writer {
                    host: h,
                    connected,
                    term,
                };
                let (revision, changes) =
                    self.store
                        .cas_owner(writer, &vm, expected_revision, &record, owner);
                if connected && self.store.leader.map(|(_, t)| t) != Some(term) {
                    // The election task sees the term is over.
                    self.input(h, NodeInput::Leadership(None));
                }
                if revision.is_some() {
                    self.log.push(format!(
                        "{now} controller cas {vm}: {}",
                        record_text(&record)
                    ));
                }
                self.input(h, NodeInput::CasResult { id, revision });
                self.publish(changes);
            }
        }
    }

    fn app_model(&mut self, vm: &Name, app: &Name) -> Option<&mut AppModel> {
        self.guests.get_mut(vm).and_then(|g| g.apps.get_mut(app))
    }

    /// What `app`'s check says in `vm`'s guest now.
    fn check_outcome(&self, vm: &Name, app: &Name) -> ProbeOutcome {
        match self.guests.get(vm).and_then(|g| g.apps.get(app)) {
            Some(m) if m.hang => ProbeOutcome::TimedOut,
            Some(m) if m.garbled => ProbeOutcome::Unreadable(Unreadable::Missing),
            Some(m) if m.running => ProbeOutcome::Running,
            Some(m) => ProbeOutcome::NotRunning(ExitStatus::Code(m.exit)),
            None => ProbeOutcome::NotRunning(ExitStatus::Code(127)),
        }
    }

    /// The watchers waiting on `app` of `vm` end: its process is gone, and, as the real
    /// watcher, they run its check at once and report its outcome.
    fn watched_app_gone(&mut self, vm: &Name, app: &Name) {
        let checked = Some(self.check_outcome(vm, app));
        self.end_watchers(vm, checked, |apps| {
            apps.contains(app)
                .then(|| crate::WatchEnd::Gone(app.clone()))
        });
    }

    /// Ends the watchers of `vm` for which `end` says how (`checked`: the outcome of the
    /// gone app's check).
    fn end_watchers(
        &mut self,
        vm: &Name,
        checked: Option<ProbeOutcome>,
        end: impl Fn(&[Name]) -> Option<crate::WatchEnd>,
    ) {
        let keys: Vec<(usize, Name)> = self
            .watchers
            .iter()
            .filter(|((_, v), (_, apps))| v == vm && end(apps).is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let Some((id, apps)) = self.watchers.remove(&key) else {
                continue;
            };
            let Some(end) = end(&apps) else {
                continue;
            };
            let report = crate::WatchReport {
                end,
                not_found: Vec::new(),
                checked,
            };
            let vm = key.1.clone();
            self.host_input(key.0, HostInput::WatchResult { id, vm, report });
        }
    }

    /// Applies one command at the current time and lets the cluster settle.
    pub fn apply(&mut self, cmd: SimCommand) {
        let now = self.now;
        match cmd {
            SimCommand::Tick => {}
            SimCommand::LogProbes(on) => self.log_probes = on,
            SimCommand::AppFail { vm, app, exit } => {
                if let Some(m) = self.app_model(&vm, &app) {
                    m.running = false;
                    m.exit = exit;
                }
                self.watched_app_gone(&vm, &app);
            }
            SimCommand::WatchKill { vm } => {
                let ended = crate::WatchEnd::Ended("watcher killed by signal 9".into());
                self.end_watchers(&vm, None, |_| Some(ended.clone()));
            }
            SimCommand::AppRecover { vm, app } => {
                let up = self.hosts.iter().any(|h| h.guest_up.contains(&vm));
                if let Some(m) = self.app_model(&vm, &app)
                    && up
                {
                    m.running = true;
                }
            }
            SimCommand::AppHang { vm, app, on } => {
                if let Some(m) = self.app_model(&vm, &app) {
                    m.hang = on;
                }
            }
            SimCommand::AppGarble { vm, app, on } => {
                if let Some(m) = self.app_model(&vm, &app) {
                    m.garbled = on;
                }
            }
            SimCommand::AppStart { vm, app, behaviour } => {
                if let Some(m) = self.app_model(&vm, &app) {
                    m.on_start = behaviour;
                }
            }
            SimCommand::VmCrash { vm, kind } => {
                for h in 0..self.hosts.len() {
                    if self.hosts[h].running.contains(&vm) {
                        self.vm_down(h, &vm);
                        let kind = match kind {
                            CrashKind::Panic => VmObservation::Panicked,
                            CrashKind::Shutdown => VmObservation::Stopped { by_guest: true },
                            CrashKind::Gone => VmObservation::Gone,
                        };
                        let vm = vm.clone();
                        self.host_input(h, HostInput::VmObserved { vm, kind });
                    }
                }
            }
            SimCommand::VmReset { vm } => {
                for h in 0..self.hosts.len() {
                    if self.hosts[h].running.contains(&vm) {
                        if let Some(g) = self.guests.get_mut(&vm) {
                            g.apps_down();
                        }
                        self.hosts[h].guest_up.remove(&vm);
                        let kind = VmObservation::Reset;
                        let v = vm.clone();
                        self.host_input(h, HostInput::VmObserved { vm: v, kind });
                        let t = Timer::GuestUp {
                            host: h,
                            vm: vm.clone(),
                        };
                        self.timer(now.plus_ms(self.boot_ms), t);
                    }
                }
            }
            SimCommand::GuestHang { vm, on } => {
                // The engine finds out by its next ping or probe.
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.hung = on;
                }
                if !on {
                    for h in 0..self.hosts.len() {
                        if self.hosts[h].running.contains(&vm) {
                            self.hosts[h].guest_up.insert(vm.clone());
                        }
                    }
                }
            }
            SimCommand::QemuHang { vm } => {
                // The daemon finds out by its next ping or probe, or at adoption.
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.qemu_hung = true;
                }
            }
            SimCommand::QemuResume { vm } => {
                // The daemon's next safety poll adopts it (observed as it is: running).
                if let Some(g) = self.guests.get_mut(&vm)
                    && std::mem::take(&mut g.qemu_hung)
                {
                    for h in 0..self.hosts.len() {
                        if self.hosts[h].running.contains(&vm) {
                            let kind = VmObservation::Running;
                            let vm = vm.clone();
                            self.host_input(h, HostInput::VmObserved { vm, kind });
                        }
                    }
                }
            }
            SimCommand::VmPause { vm, reason } => {
                for h in 0..self.hosts.len() {
                    if self.hosts[h].running.contains(&vm) {
                        if let Some(g) = self.guests.get_mut(&vm) {
                            g.paused = Some(reason);
                        }
                        let kind = VmObservation::Paused { reason };
                        let vm = vm.clone();
                        self.host_input(h, HostInput::VmObserved { vm, kind });
                    }
                }
            }
            SimCommand::VmResume { vm } => {
                for h in 0..self.hosts.len() {
                    if self.hosts[h].running.contains(&vm)
                        && let Some(g) = self.guests.get_mut(&vm)
                        && g.paused.take().is_some()
                    {
                        let kind = VmObservation::Resumed;
                        let vm = vm.clone();
                        self.host_input(h, HostInput::VmObserved { vm, kind });
                    }
                }
            }
            SimCommand::GuestHostile { vm, on } => {
                // The engine finds out by its next ping or probe.
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.hostile = on;
                }
            }
            SimCommand::BootHang { vm, on } => {
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.boot_hang = on;
                }
            }
            SimCommand::HostCrash(host) => {
                if let Some(h) = self.host_idx(&host)
                    && self.hosts[h].node.take().is_some()
                {
                    for vm in std::mem::take(&mut self.hosts[h].running) {
                        if let Some(g) = self.guests.get_mut(&vm) {
                            g.apps_down();
                        }
                    }
                    self.hosts[h].incoming.clear();
                    self.hosts[h].migrated.clear();
                    self.migrations.retain(|(x, _), _| *x != h);
                    self.hosts[h].guest_up.clear();
                    self.inbox.retain(|(x, _)| *x != h);
                    if self.hosts[h].connected {
                        self.disconnect(h, false);
                    }
                    self.log.push(format!("{now} {host} crashed"));
                }
            }
            SimCommand::HostIsolate(host) => {
                if let Some(h) = self.host_idx(&host)
                    && self.hosts[h].connected
                    && self.hosts[h].node.is_some()
                {
                    self.disconnect(h, true);
                    self.log
                        .push(format!("{now} {host} isolated from the cluster store"));
                }
            }
            SimCommand::HostRecover(host) => {
                if let Some(h) = self.host_idx(&host) {
                    if self.hosts[h].node.is_none() {
                        self.hosts[h].incarnation += 1;
                        self.restart_node(h);
                        self.log.push(format!("{now} {host} restarted"));
                    } else if !self.hosts[h].connected {
                        // Its lease may have ended meanwhile: it comes back with a new one.
                        self.hosts[h].incarnation += 1;
                        let inc = self.hosts[h].incarnation;
                        self.input(h, NodeInput::Incarnation(inc));
                        self.log.push(format!("{now} {host} reconnected"));
                    } else {
                        return self.settle();
                    }
                    self.connect_host(h);
                }
            }
            SimCommand::ExecBlocked { vm, on } => {
                // The engine finds out from its next probe, guest command or ping.
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.exec_blocked = on;
                }
            }
            SimCommand::DaemonRestart(host) => {
                if let Some(h) = self.host_idx(&host)
                    && self.hosts[h].node.is_some()
                {
                    // Killed and started again: only what it committed survives.
                    self.inbox.retain(|(x, _)| *x != h);
                    if self.store.leader.is_some_and(|(l, _)| l == h) {
                        self.store.leader = None;
                    }
                    self.restart_node(h);
                    self.log
                        .push(format!("{now} {host} daemon restarted (VMs keep running)"));
                    self.connect_host(h);
                }
            }
            SimCommand::HostMemory(host, memory_mb) => {
                if let Some(h) = self.host_idx(&host)
                    && self.hosts[h].connected
                {
                    let inc = self.incarnation(h);
                    let changes = self.store.register(h, &host, Some(memory_mb), inc);
                    self.publish(changes);
                }
            }
            SimCommand::StoreFail { on } => {
                self.store.failing = on;
                let what = if on { "fails" } else { "works again" };
                self.log.push(format!("{now} cluster store {what}"));
            }
            SimCommand::Admin { via, command } => self.admin(via, command),
        }
        self.settle();
    }

    /// A new node for host `h` from what it committed to the store.
    fn restart_node(&mut self, h: usize) {
        let name = self.hosts[h].name.clone();
        let saved = self.store.node_state(&name);
        let incarnation = self.hosts[h].incarnation;
        match Node::new(self.config.clone(), name, incarnation, saved, self.now) {
            Ok(node) => self.hosts[h].node = Some(node),
            Err(e) => self.violations.push(e.to_string()),
        }
    }

    /// Host `h` loses the store: its lease expires `ttl` later; an isolated host that still
    /// runs fences itself at `ttl - fence_margin`.
    fn disconnect(&mut self, h: usize, fences: bool) {
        let now = self.now;
        self.hosts[h].connected = false;
        self.hosts[h].epoch += 1;
        let epoch = self.hosts[h].epoch;
        if fences {
            let at = now.plus_ms(self.ttl_ms.saturating_sub(self.fence_ms));
            self.timer(at, Timer::Fence { host: h, epoch });
        }
        self.timer(
            now.plus_ms(self.ttl_ms),
            Timer::LeaseExpire { host: h, epoch },
        );
    }

    fn admin(&mut self, via: Option<Name>, command: AdminCommand) {
        let text = admin_text(&command);
        let host = match via {
            Some(v) => self.host_idx(&v),
            None => (0..self.hosts.len())
                .find(|&h| self.hosts[h].connected && self.hosts[h].node.is_some()),
        };
        let Some(h) = host.filter(|&h| self.hosts[h].node.is_some()) else {
            let now = self.now;
            self.log
                .push(format!("{now} admin {text}: error: no host takes commands"));
            return;
        };
        self.next_command += 1;
        let id = self.next_command;
        self.pending.insert((h, id), text);
        self.inbox
            .push_back((h, Delivery::Command(CommandOrigin::Local(id), command)));
    }

    /// Applies a new configuration to every live node, as `vmha config apply` does, once each
    /// is idle; the hosts then report what runs on them, as the daemon does after a reload.
    /// Returns each host's outcome.
    pub fn reconfigure(
        &mut self,
        config: Arc<Config>,
    ) -> Vec<(
        Name,
        Result<crate::node::ConfigChange, crate::node::ReconfigureError>,
    )> {
        self.settle();
        for v in &config.vms {
            self.guests
                .entry(v.name.clone())
                .or_insert_with(|| GuestModel::new(v));
        }
        self.config = Arc::clone(&config);
        let now = self.now;
        let mut outcomes = Vec::new();
        for h in 0..self.hosts.len() {
            let name = self.hosts[h].name.clone();
            self.hosts[h].vms = config
                .vms
                .iter()
                .filter(|v| v.hosts.contains(&name))
                .map(|v| v.name.clone())
                .collect();
            let Some(node) = self.hosts[h].node.as_mut() else {
                continue;
            };
            let outcome = node.reconfigure(now, Arc::clone(&config));
            if outcome.is_ok() {
                for vm in self.hosts[h].vms.clone() {
                    let kind = if self.hosts[h].running.contains(&vm) {
                        VmObservation::Running
                    } else {
                        VmObservation::Gone
                    };
                    self.host_input(h, HostInput::VmObserved { vm, kind });
                }
            }
            outcomes.push((name, outcome));
        }
        self.settle();
        outcomes
    }

    /// Runs a script (see [`parse_script`] for the language).
    pub fn run_script(&mut self, script: &str) -> Result<(), SimError> {
        let parsed = parse_script(script)?;
        for (delay, cmd) in parsed {
            self.advance(delay);
            self.apply(cmd);
        }
        Ok(())
    }
}

/// What a driver answers when the guest agent does not.
fn unreachable() -> ActionError {
    ActionError::GuestUnreachable {
        detail: "the guest agent did not answer".to_string(),
    }
}

/// What a driver answers when the guest agent blocks `guest-exec`.
fn exec_blocked() -> ActionError {
    ActionError::ExecBlocked {
        detail: "guest-exec is disabled".to_string(),
    }
}

/// `owner=kvm1 desired=run move_to=kvm2 parked`, as the log shows ownership writes.
fn record_text(record: &crate::controller::OwnerRecord) -> String {
    let mut text = format!(
        "owner={} desired={}",
        record.owner.as_ref().map_or("none", Name::as_str),
        match record.desired {
            crate::Desired::Run => "run",
            crate::Desired::Stop => "stop",
        }
    );
    if let Some(t) = &record.move_to {
        text.push_str(&format!(" move_to={t}"));
    }
    if let Some(m) = &record.migrate {
        text.push_str(&format!(" migrate_to={}", m.to));
        if let Some(uri) = &m.uri {
            text.push_str(&format!(" uri={uri}"));
        }
    }
    if record.parked {
        text.push_str(" parked");
    }
    text
}
