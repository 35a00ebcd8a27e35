//! A deterministic simulated cluster: N [`HostAgent`]s and one [`Controller`] wired through an
//! in-memory cluster store (ownership records applied by compare-and-swap, host leases that
//! expire `ttl` after a host stops renewing, self-fencing at `ttl - fence_margin`), with a
//! model of the VMs and of the apps inside them. Used by the scenario tests, the property
//! tests and the benchmarks; like raft-rs's harness, everything happens in one thread in a
//! fixed order, so a script always gives the same log.
//!
//! While it runs, the simulator checks the safety rules and records every breach in
//! [`Sim::violations`]: a VM running on two hosts, an action other than a probe or report on
//! a frozen group (self-fencing excepted), an app started before what it requires is online,
//! a VM started on a host where its previous process still runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use vmha_model::{AppState, Config, Name, Policy, Store, Tie};

use crate::command::{AdminCommand, Route};
use crate::controller::{Controller, ControllerActionKind, ControllerInput, OwnerRecord};
use crate::host_agent::{HostAgent, HostAgentError};
use crate::host_io::{Desired, HostAction, HostActionKind, HostInput, ProbeOutcome, VmObservation};
use crate::persist::HostAgentState;
use crate::time::{Timestamp, millis};

/// Why a simulation could not be built or a script line not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// A host agent could not be created.
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

/// How a VM dies in [`SimCommand::VmCrash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// `GUEST_PANICKED`.
    Panic,
    /// The guest powered off by itself.
    Shutdown,
    /// The QEMU process vanished.
    Gone,
}

/// What an app's start command does in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartBehaviour {
    /// Starts the app.
    Ok,
    /// Exits non-zero.
    Fails,
    /// Exits 0 but the app does not come up.
    Noop,
}

/// One thing that happens in the simulated world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimCommand {
    /// Nothing (time passes).
    Tick,
    /// The app stops running; its check exits `exit`.
    AppFail {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Exit code of its check.
        exit: i32,
    },
    /// The app runs again by itself.
    AppRecover {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
    },
    /// The app's check hangs (times out) or stops hanging.
    AppHang {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Hanging.
        on: bool,
    },
    /// What the app's start command does from now on.
    AppStart {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Behaviour.
        behaviour: StartBehaviour,
    },
    /// The VM dies on whichever host runs it.
    VmCrash {
        /// VM.
        vm: Name,
        /// How.
        kind: CrashKind,
    },
    /// The guest reboots by itself.
    VmReset {
        /// VM.
        vm: Name,
    },
    /// The guest channel hangs (`on`) or comes back.
    GuestHang {
        /// VM.
        vm: Name,
        /// Hanging.
        on: bool,
    },
    /// From now on, booting the VM never brings its guest channel up (`on`), or does again.
    BootHang {
        /// VM.
        vm: Name,
        /// Hanging.
        on: bool,
    },
    /// The host dies (its VMs with it); its lease expires `ttl` later.
    HostCrash(Name),
    /// The host loses the cluster store: it self-fences at `ttl - fence_margin`, its lease
    /// expires at `ttl`.
    HostIsolate(Name),
    /// The host is back (restarted with its persisted state, or reconnected).
    HostRecover(Name),
    /// The host's daemon restarts with its persisted state while its VMs keep running.
    DaemonRestart(Name),
    /// The guest agent of the VM starts (`on`) or stops refusing `guest-exec`; the driver
    /// reports it as [`HostInput::GuestExec`].
    ExecBlocked {
        /// VM.
        vm: Name,
        /// Blocked.
        on: bool,
    },
    /// The host reports its memory for VMs.
    HostMemory(Name, u64),
    /// An admin command, routed as a daemon would.
    Admin(AdminCommand),
}

#[derive(Debug, Clone)]
struct AppModel {
    running: bool,
    exit: i32,
    hang: bool,
    start: StartBehaviour,
}

#[derive(Debug, Clone, Default)]
struct GuestModel {
    apps: BTreeMap<Name, AppModel>,
    hung: bool,
    boot_hang: bool,
}

#[derive(Debug)]
struct SimHost {
    name: Name,
    agent: Option<HostAgent>,
    saved: HostAgentState,
    connected: bool,
    epoch: u64,
    running: BTreeSet<Name>,
    guest_up: BTreeSet<Name>,
    vms: Vec<Name>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    GuestUp { host: usize, vm: Name },
    Fence { host: usize, epoch: u64 },
    LeaseExpire { host: usize, epoch: u64 },
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
    controller: Controller,
    store: BTreeMap<Name, (OwnerRecord, u64)>,
    revision: u64,
    guests: BTreeMap<Name, GuestModel>,
    timers: BTreeSet<(Timestamp, u64, Timer)>,
    seq: u64,
    boot_ms: u64,
    ttl_ms: u64,
    fence_ms: u64,
    host_inputs: VecDeque<(usize, HostInput)>,
    ctl_inputs: VecDeque<ControllerInput>,
    log: Vec<String>,
    violations: Vec<String>,
    restarts: Vec<Restart>,
    actions: Vec<(Timestamp, Name, HostAction)>,
    decisions: BTreeMap<(Name, Name), (Timestamp, String)>,
}

/// Time a simulated guest takes to bring its channel up after the VM starts.
pub const BOOT_MS: u64 = 1_000;

/// Settle-loop bound: more steps than this at one instant is reported as a livelock.
const MAX_STEPS: usize = 200_000;

impl Sim {
    /// Builds the cluster at time 0: every host up with a live lease, no VM running, no
    /// ownership record; then lets the controller place everything.
    pub fn new(config: Arc<Config>) -> Result<Sim, SimError> {
        let (ttl_ms, fence_ms) = match &config.cluster.store {
            Store::Etcd {
                ttl, fence_margin, ..
            } => (millis(*ttl), millis(*fence_margin)),
            Store::Embedded => (
                millis(vmha_model::defaults::TTL),
                millis(vmha_model::defaults::FENCE_MARGIN),
            ),
        };
        let mut hosts = Vec::new();
        for h in &config.hosts {
            let agent = HostAgent::new(config.clone(), h.name.clone(), None, Timestamp::ZERO)?;
            hosts.push(SimHost {
                name: h.name.clone(),
                agent: Some(agent),
                saved: HostAgentState::default(),
                connected: true,
                epoch: 0,
                running: BTreeSet::new(),
                guest_up: BTreeSet::new(),
                vms: config
                    .vms
                    .iter()
                    .filter(|v| v.hosts.contains(&h.name))
                    .map(|v| v.name.clone())
                    .collect(),
            });
        }
        let guests = config
            .vms
            .iter()
            .map(|v| {
                let apps = v
                    .apps
                    .iter()
                    .map(|a| {
                        (
                            a.name.clone(),
                            AppModel {
                                running: false,
                                exit: 3,
                                hang: false,
                                start: StartBehaviour::Ok,
                            },
                        )
                    })
                    .collect();
                (
                    v.name.clone(),
                    GuestModel {
                        apps,
                        ..GuestModel::default()
                    },
                )
            })
            .collect();
        let controller = Controller::new(config.clone(), None, Timestamp::ZERO);
        let mut sim = Sim {
            config,
            now: Timestamp::ZERO,
            hosts,
            controller,
            store: BTreeMap::new(),
            revision: 0,
            guests,
            timers: BTreeSet::new(),
            seq: 0,
            boot_ms: BOOT_MS,
            ttl_ms,
            fence_ms,
            host_inputs: VecDeque::new(),
            ctl_inputs: VecDeque::new(),
            log: Vec::new(),
            violations: Vec::new(),
            restarts: Vec::new(),
            actions: Vec::new(),
            decisions: BTreeMap::new(),
        };
        for h in 0..sim.hosts.len() {
            sim.connect_host(h);
        }
        for v in sim.config.vms.clone() {
            sim.ctl_inputs.push_back(ControllerInput::Ownership {
                vm: v.name.clone(),
                record: None,
                revision: 0,
            });
        }
        sim.settle();
        Ok(sim)
    }

    /// Current simulated time.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The log so far: events, actions other than probes and reports, CAS writes, alerts and
    /// admin results, one per line.
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

    /// The agent of a host, if the host is alive.
    pub fn agent(&self, host: &str) -> Option<&HostAgent> {
        self.hosts
            .iter()
            .find(|h| h.name.as_str() == host)
            .and_then(|h| h.agent.as_ref())
    }

    /// The controller.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Hosts the VM runs on right now (more than one is a violation).
    pub fn running_on(&self, vm: &str) -> Vec<Name> {
        self.hosts
            .iter()
            .filter(|h| h.running.iter().any(|v| v.as_str() == vm))
            .map(|h| h.name.clone())
            .collect()
    }

    fn host_idx(&self, name: &Name) -> Option<usize> {
        self.hosts.iter().position(|h| &h.name == name)
    }

    fn timer(&mut self, at: Timestamp, t: Timer) {
        self.seq += 1;
        self.timers.insert((at, self.seq, t));
    }

    fn connect_host(&mut self, h: usize) {
        self.hosts[h].connected = true;
        self.hosts[h].epoch += 1;
        self.host_inputs
            .push_back((h, HostInput::Lease { live: true }));
        for vm in self.hosts[h].vms.clone() {
            let kind = if self.hosts[h].running.contains(&vm) {
                VmObservation::Running
            } else {
                VmObservation::Gone
            };
            self.host_inputs.push_back((
                h,
                HostInput::VmObserved {
                    vm: vm.clone(),
                    kind,
                },
            ));
            let (owner, desired, revision) = match self.store.get(&vm) {
                Some((rec, rev)) => (rec.owner.clone(), rec.desired, *rev),
                None => (None, Desired::Run, 0),
            };
            self.host_inputs.push_back((
                h,
                HostInput::Ownership {
                    vm,
                    owner,
                    desired,
                    revision,
                },
            ));
        }
        let host = self.hosts[h].name.clone();
        self.ctl_inputs
            .push_back(ControllerInput::HostLease { host, up: true });
    }

    /// Advances time by `ms`, waking engines and firing timers on the way.
    pub fn advance(&mut self, ms: u64) {
        let target = self.now.plus_ms(ms);
        let mut guard = 0usize;
        loop {
            let mut next: Option<Timestamp> = self.timers.first().map(|t| t.0);
            let mut take = |t: Option<Timestamp>| {
                if let Some(t) = t {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            };
            for h in &self.hosts {
                take(h.agent.as_ref().and_then(HostAgent::poll_timeout));
            }
            take(self.controller.poll_timeout());
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
                if let Some(agent) = self.hosts[h].agent.as_mut()
                    && agent.poll_timeout().is_some_and(|x| x <= now)
                {
                    agent.handle_timeout(now);
                }
            }
            if self.controller.poll_timeout().is_some_and(|x| x <= now) {
                self.controller.handle_timeout(now);
            }
            self.settle();
        }
        self.now = target;
    }

    fn fire(&mut self, t: Timer) {
        match t {
            Timer::GuestUp { host, vm } => {
                if self.hosts[host].running.contains(&vm)
                    && !self.guests.get(&vm).is_some_and(|g| g.hung || g.boot_hang)
                {
                    self.hosts[host].guest_up.insert(vm.clone());
                    self.host_inputs
                        .push_back((host, HostInput::GuestChannel { vm, up: true }));
                }
            }
            Timer::Fence { host, epoch } => {
                if self.hosts[host].epoch == epoch && self.hosts[host].agent.is_some() {
                    self.host_inputs
                        .push_back((host, HostInput::Lease { live: false }));
                }
            }
            Timer::LeaseExpire { host, epoch } => {
                if self.hosts[host].epoch == epoch {
                    let name = self.hosts[host].name.clone();
                    self.ctl_inputs.push_back(ControllerInput::HostLease {
                        host: name,
                        up: false,
                    });
                }
            }
        }
    }

    /// Delivers every queued input and performs every action until nothing moves.
    fn settle(&mut self) {
        for _ in 0..MAX_STEPS {
            let mut progress = false;
            for h in 0..self.hosts.len() {
                if let Some(agent) = self.hosts[h].agent.as_mut() {
                    let mut any = false;
                    while let Some(e) = agent.poll_event() {
                        self.log.push(e.to_string());
                        any = true;
                    }
                    if agent.take_state_changed() {
                        self.hosts[h].saved = agent.state();
                        any = true;
                    }
                    if any {
                        self.log_decisions(h);
                    }
                }
                while let Some(action) = self.hosts[h]
                    .agent
                    .as_mut()
                    .and_then(HostAgent::poll_action)
                {
                    progress = true;
                    self.host_action(h, action);
                }
            }
            while let Some(e) = self.controller.poll_event() {
                self.log.push(e.to_string());
            }
            while let Some(a) = self.controller.poll_action() {
                progress = true;
                self.controller_action(a.id, a.kind, &a.reason);
            }
            self.check_single_run();
            if let Some((h, input)) = self.host_inputs.pop_front() {
                if let Some(agent) = self.hosts[h].agent.as_mut() {
                    agent.handle_input(self.now, input);
                }
                continue;
            }
            if let Some(input) = self.ctl_inputs.pop_front() {
                self.controller.handle_input(self.now, input);
                continue;
            }
            if !progress {
                return;
            }
        }
        self.violations
            .push(format!("{} livelock: inputs never settle", self.now));
    }

    /// Logs decision-agent runs that changed nothing (those that did are event reasons).
    fn log_decisions(&mut self, h: usize) {
        let Some(agent) = self.hosts[h].agent.as_ref() else {
            return;
        };
        let host = self.hosts[h].name.clone();
        for vm in agent.status().vms {
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

    fn check_single_run(&mut self) {
        for v in &self.config.vms {
            let on = self.running_on(v.name.as_str());
            if on.len() > 1 {
                let hosts: Vec<&str> = on.iter().map(Name::as_str).collect();
                let msg = format!("{} {} runs on {}", self.now, v.name, hosts.join(" and "));
                if !self.violations.contains(&msg) {
                    self.violations.push(msg);
                }
            }
        }
    }

    fn push_host(&mut self, h: usize, input: HostInput) {
        self.host_inputs.push_back((h, input));
    }

    fn guest_reachable(&self, h: usize, vm: &Name) -> bool {
        self.hosts[h].running.contains(vm)
            && self.hosts[h].guest_up.contains(vm)
            && !self.guests.get(vm).is_some_and(|g| g.hung)
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
                if !self.guest_reachable(h, &vm) {
                    self.push_host(h, HostInput::GuestUnreachable { vm });
                    return;
                }
                let guest = self.guests.get(&vm);
                let outcomes = checks
                    .into_iter()
                    .map(|c| {
                        let m = guest.and_then(|g| g.apps.get(&c.app));
                        let o = match m {
                            Some(m) if m.hang => ProbeOutcome::TimedOut,
                            Some(m) if m.running => ProbeOutcome::Running,
                            Some(m) => ProbeOutcome::NotRunning { exit: m.exit },
                            None => ProbeOutcome::NotRunning { exit: 127 },
                        };
                        (c.app, o)
                    })
                    .collect();
                self.push_host(h, HostInput::ProbeResult { id, vm, outcomes });
            }
            HostActionKind::StartApp { vm, app, .. } => {
                self.log.push(line(&format!("start-app {vm}/{app}")));
                let reachable = self.guest_reachable(h, &vm);
                let result = match self.guests.get_mut(&vm).and_then(|g| g.apps.get_mut(&app)) {
                    Some(m) if reachable => match m.start {
                        StartBehaviour::Ok => {
                            m.running = true;
                            Ok(())
                        }
                        StartBehaviour::Fails => Err("exit 1".to_string()),
                        StartBehaviour::Noop => Ok(()),
                    },
                    _ => Err("guest unreachable".to_string()),
                };
                self.push_host(h, HostInput::ActionResult { id, result });
            }
            HostActionKind::StopApp { vm, app, .. } => {
                self.log.push(line(&format!("stop-app {vm}/{app}")));
                let reachable = self.guest_reachable(h, &vm);
                let result = match self.guests.get_mut(&vm).and_then(|g| g.apps.get_mut(&app)) {
                    Some(m) if reachable => {
                        m.running = false;
                        Ok(())
                    }
                    _ => Err("guest unreachable".to_string()),
                };
                self.push_host(h, HostInput::ActionResult { id, result });
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
                    // A fresh boot: apps down, a hung guest agent is gone with the old guest.
                    g.apps.values_mut().for_each(|m| m.running = false);
                    g.hung = false;
                }
                self.hosts[h].running.insert(vm.clone());
                self.hosts[h].guest_up.remove(&vm);
                self.timer(now.plus_ms(self.boot_ms), Timer::GuestUp { host: h, vm });
                self.push_host(h, HostInput::ActionResult { id, result: Ok(()) });
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
                self.push_host(
                    h,
                    HostInput::VmObserved {
                        vm,
                        kind: VmObservation::Gone,
                    },
                );
                self.push_host(h, HostInput::ActionResult { id, result: Ok(()) });
            }
            HostActionKind::Report { vm, report } => {
                if self.hosts[h].connected {
                    self.ctl_inputs.push_back(ControllerInput::Report {
                        host: host.clone(),
                        vm,
                        report,
                    });
                }
            }
        }
    }

    fn vm_down(&mut self, h: usize, vm: &Name) {
        if self.hosts[h].running.remove(vm) {
            if let Some(g) = self.guests.get_mut(vm) {
                g.apps.values_mut().for_each(|m| m.running = false);
            }
        }
        self.hosts[h].guest_up.remove(vm);
    }

    fn check_action(&mut self, h: usize, a: &HostAction) {
        let Some(agent) = self.hosts[h].agent.as_ref() else {
            return;
        };
        let (vm, app) = match &a.kind {
            HostActionKind::Probe { .. } | HostActionKind::Report { .. } => return,
            HostActionKind::StartApp { vm, app, .. } => (vm, Some(app)),
            HostActionKind::StopApp { vm, .. }
            | HostActionKind::StartVm { vm }
            | HostActionKind::StopVm { vm, .. }
            | HostActionKind::KillVm { vm } => (vm, None),
        };
        let status = agent.status();
        let Some(vs) = status.vms.iter().find(|v| &v.name == vm) else {
            return;
        };
        if vs.frozen && !a.reason.starts_with("self-fencing") {
            self.violations.push(format!(
                "{} {} acted on frozen {vm}: {:?}",
                self.now, self.hosts[h].name, a.kind
            ));
        }
        let Some(app) = app else {
            return;
        };
        let Some(cfg) = self
            .config
            .vm(vm.as_str())
            .and_then(|v| v.app(app.as_str()))
        else {
            return;
        };
        for r in &cfg.requires {
            let online = vs
                .apps
                .iter()
                .any(|s| &s.name == r && s.state == AppState::Online);
            if !online {
                self.violations.push(format!(
                    "{} {vm}/{app} started while {r} is not online",
                    self.now
                ));
            }
        }
        if vs
            .apps
            .iter()
            .any(|s| &s.name == app && s.state == AppState::Restarting)
        {
            self.restarts.push(Restart {
                seq: self.actions.len(),
                time: self.now,
                host: self.hosts[h].name.clone(),
                vm: vm.clone(),
                app: Some(app.clone()),
            });
        }
    }

    fn controller_action(
        &mut self,
        id: crate::ids::ActionId,
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
                let current = self.store.get(&vm).map_or(0, |(_, r)| *r);
                if current != expected_revision {
                    self.ctl_inputs
                        .push_back(ControllerInput::CasResult { id, revision: None });
                    return;
                }
                self.revision += 1;
                let rev = self.revision;
                let mut text = format!(
                    "{now} controller cas {vm}: owner={} desired={}",
                    record.owner.as_ref().map_or("none", Name::as_str),
                    match record.desired {
                        Desired::Run => "run",
                        Desired::Stop => "stop",
                    }
                );
                if let Some(t) = &record.move_to {
                    text.push_str(&format!(" move_to={t}"));
                }
                if record.parked {
                    text.push_str(" parked");
                }
                self.log.push(text);
                self.store.insert(vm.clone(), (record.clone(), rev));
                self.ctl_inputs.push_back(ControllerInput::CasResult {
                    id,
                    revision: Some(rev),
                });
                for h in 0..self.hosts.len() {
                    if self.hosts[h].connected && self.hosts[h].vms.contains(&vm) {
                        self.push_host(
                            h,
                            HostInput::Ownership {
                                vm: vm.clone(),
                                owner: record.owner.clone(),
                                desired: record.desired,
                                revision: rev,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Applies one command at the current time and lets the cluster settle.
    pub fn apply(&mut self, cmd: SimCommand) {
        let now = self.now;
        match cmd {
            SimCommand::Tick => {}
            SimCommand::AppFail { vm, app, exit } => {
                if let Some(m) = self.app_model(&vm, &app) {
                    m.running = false;
                    m.exit = exit;
                }
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
            SimCommand::AppStart { vm, app, behaviour } => {
                if let Some(m) = self.app_model(&vm, &app) {
                    m.start = behaviour;
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
                        self.push_host(
                            h,
                            HostInput::VmObserved {
                                vm: vm.clone(),
                                kind,
                            },
                        );
                    }
                }
            }
            SimCommand::VmReset { vm } => {
                for h in 0..self.hosts.len() {
                    if self.hosts[h].running.contains(&vm) {
                        if let Some(g) = self.guests.get_mut(&vm) {
                            g.apps.values_mut().for_each(|m| m.running = false);
                        }
                        self.hosts[h].guest_up.remove(&vm);
                        self.push_host(
                            h,
                            HostInput::GuestChannel {
                                vm: vm.clone(),
                                up: false,
                            },
                        );
                        self.push_host(
                            h,
                            HostInput::VmObserved {
                                vm: vm.clone(),
                                kind: VmObservation::Reset,
                            },
                        );
                        self.timer(
                            now.plus_ms(self.boot_ms),
                            Timer::GuestUp {
                                host: h,
                                vm: vm.clone(),
                            },
                        );
                    }
                }
            }
            SimCommand::GuestHang { vm, on } => {
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.hung = on;
                }
                for h in 0..self.hosts.len() {
                    if self.hosts[h].running.contains(&vm) {
                        if on {
                            self.push_host(
                                h,
                                HostInput::GuestChannel {
                                    vm: vm.clone(),
                                    up: false,
                                },
                            );
                        } else {
                            self.hosts[h].guest_up.insert(vm.clone());
                            self.push_host(
                                h,
                                HostInput::GuestChannel {
                                    vm: vm.clone(),
                                    up: true,
                                },
                            );
                        }
                    }
                }
            }
            SimCommand::BootHang { vm, on } => {
                if let Some(g) = self.guests.get_mut(&vm) {
                    g.boot_hang = on;
                }
            }
            SimCommand::HostCrash(host) => {
                if let Some(h) = self.host_idx(&host)
                    && let Some(agent) = self.hosts[h].agent.take()
                {
                    self.hosts[h].saved = agent.state();
                    for vm in std::mem::take(&mut self.hosts[h].running) {
                        self.vm_down(h, &vm);
                        if let Some(g) = self.guests.get_mut(&vm) {
                            g.apps.values_mut().for_each(|m| m.running = false);
                        }
                    }
                    self.hosts[h].guest_up.clear();
                    self.host_inputs.retain(|(x, _)| *x != h);
                    if self.hosts[h].connected {
                        self.hosts[h].connected = false;
                        self.hosts[h].epoch += 1;
                        let epoch = self.hosts[h].epoch;
                        self.timer(
                            now.plus_ms(self.ttl_ms),
                            Timer::LeaseExpire { host: h, epoch },
                        );
                    }
                    self.log.push(format!("{now} {host} crashed"));
                }
            }
            SimCommand::HostIsolate(host) => {
                if let Some(h) = self.host_idx(&host)
                    && self.hosts[h].connected
                    && self.hosts[h].agent.is_some()
                {
                    self.hosts[h].connected = false;
                    self.hosts[h].epoch += 1;
                    let epoch = self.hosts[h].epoch;
                    self.timer(
                        now.plus_ms(self.ttl_ms.saturating_sub(self.fence_ms)),
                        Timer::Fence { host: h, epoch },
                    );
                    self.timer(
                        now.plus_ms(self.ttl_ms),
                        Timer::LeaseExpire { host: h, epoch },
                    );
                    self.log
                        .push(format!("{now} {host} isolated from the cluster store"));
                }
            }
            SimCommand::HostRecover(host) => {
                if let Some(h) = self.host_idx(&host) {
                    if self.hosts[h].agent.is_none() {
                        let saved = self.hosts[h].saved.clone();
                        match HostAgent::new(self.config.clone(), host.clone(), Some(saved), now) {
                            Ok(agent) => self.hosts[h].agent = Some(agent),
                            Err(e) => self.violations.push(e.to_string()),
                        }
                        self.log.push(format!("{now} {host} restarted"));
                    } else if !self.hosts[h].connected {
                        self.log.push(format!("{now} {host} reconnected"));
                    } else {
                        return self.settle();
                    }
                    self.connect_host(h);
                }
            }
            SimCommand::ExecBlocked { vm, on } => {
                for h in 0..self.hosts.len() {
                    if self.hosts[h].running.contains(&vm) {
                        let vm = vm.clone();
                        self.push_host(h, HostInput::GuestExec { vm, allowed: !on });
                    }
                }
            }
            SimCommand::DaemonRestart(host) => {
                if let Some(h) = self.host_idx(&host)
                    && let Some(agent) = self.hosts[h].agent.as_ref()
                {
                    let saved = agent.state();
                    match HostAgent::new(self.config.clone(), host.clone(), Some(saved), now) {
                        Ok(agent) => self.hosts[h].agent = Some(agent),
                        Err(e) => self.violations.push(e.to_string()),
                    }
                    self.log
                        .push(format!("{now} {host} daemon restarted (VMs keep running)"));
                    self.connect_host(h);
                }
            }
            SimCommand::HostMemory(host, memory_mb) => {
                self.ctl_inputs
                    .push_back(ControllerInput::HostCapacity { host, memory_mb });
            }
            SimCommand::Admin(cmd) => self.admin(cmd),
        }
        self.settle();
    }

    fn app_model(&mut self, vm: &Name, app: &Name) -> Option<&mut AppModel> {
        self.guests.get_mut(vm).and_then(|g| g.apps.get_mut(app))
    }

    fn admin(&mut self, cmd: AdminCommand) {
        let now = self.now;
        let text = admin_text(&cmd);
        let owner = cmd
            .vm()
            .and_then(|vm| self.store.get(vm))
            .and_then(|(rec, _)| rec.owner.clone())
            .and_then(|o| self.host_idx(&o))
            .filter(|&h| self.hosts[h].connected);
        let result = match cmd.route() {
            Route::Controller => self.controller.command(now, cmd),
            Route::Both => self.controller.command(now, cmd.clone()).and_then(|()| {
                match owner.and_then(|h| self.hosts[h].agent.as_mut()) {
                    Some(agent) => agent.command(now, cmd),
                    None => Ok(()),
                }
            }),
            Route::OwnerHost => match owner.and_then(|h| self.hosts[h].agent.as_mut()) {
                Some(agent) => agent.command(now, cmd),
                None => match cmd.vm() {
                    Some(vm) if self.config.vm(vm.as_str()).is_none() => {
                        Err(crate::CommandError::UnknownVm(vm.clone()))
                    }
                    Some(vm) => Err(crate::CommandError::Busy(vm.clone())),
                    None => Err(crate::CommandError::WrongReceiver("cluster controller")),
                },
            },
        };
        match result {
            Ok(()) => self.log.push(format!("{now} admin {text}: ok")),
            Err(e) => self.log.push(format!("{now} admin {text}: error: {e}")),
        }
    }

    /// Runs a script: one command per line, each prefixed by `+DELAY` (milliseconds, or a
    /// duration like `2s`) after the previous line; `#` starts a comment. Commands:
    /// `tick`, `app-fail VM APP [exit:N]`, `app-recover VM APP`, `app-hang VM APP`,
    /// `app-unhang VM APP`, `app-start-fails VM APP`, `app-start-noop VM APP`,
    /// `app-start-ok VM APP`, `vm-crash VM [panic|shutdown|gone]`, `vm-reset VM`,
    /// `guest-hang VM`, `guest-recover VM`, `boot-hang VM`, `boot-ok VM`, `host-crash H`,
    /// `host-isolate H`, `host-recover H`, `host-memory H MIB`, and `admin ...`:
    /// `app-offline VM/APP [sticky]`, `app-online VM/APP`, `app-start VM/APP`,
    /// `app-stop VM/APP`, `vm-start VM`, `vm-stop VM`, `vm-restart VM`, `move VM HOST`,
    /// `maintenance HOST on|off`, `freeze VM`, `unfreeze VM`, `clear VM`,
    /// `priority VM/APP N`, `app-budget VM/APP LIMIT WINDOW`, `vm-budget VM LIMIT WINDOW`,
    /// `policy VM POLICY [TIE]`.
    pub fn run_script(&mut self, script: &str) -> Result<(), SimError> {
        let parsed = parse_script(script)?;
        for (delay, cmd) in parsed {
            self.advance(delay);
            self.apply(cmd);
        }
        Ok(())
    }
}

fn admin_text(cmd: &AdminCommand) -> String {
    use AdminCommand as C;
    match cmd {
        C::AppOffline {
            vm,
            app,
            auto_clear,
        } => format!(
            "app-offline {vm}/{app}{}",
            if *auto_clear { "" } else { " sticky" }
        ),
        C::AppOnline { vm, app } => format!("app-online {vm}/{app}"),
        C::AppStart { vm, app } => format!("app-start {vm}/{app}"),
        C::AppStop { vm, app } => format!("app-stop {vm}/{app}"),
        C::VmStart { vm } => format!("vm-start {vm}"),
        C::VmStop { vm } => format!("vm-stop {vm}"),
        C::VmRestart { vm } => format!("vm-restart {vm}"),
        C::VmMove { vm, to } => format!("move {vm} {to}"),
        C::HostMaintenance { host, on } => {
            format!("maintenance {host} {}", if *on { "on" } else { "off" })
        }
        C::Freeze { vm } => format!("freeze {vm}"),
        C::Unfreeze { vm } => format!("unfreeze {vm}"),
        C::Clear { vm } => format!("clear {vm}"),
        C::SetPriority { vm, app, priority } => format!("priority {vm}/{app} {priority}"),
        C::SetAppBudget {
            vm,
            app,
            restart_limit,
            restart_window_ms,
        } => format!("app-budget {vm}/{app} {restart_limit} {restart_window_ms}ms"),
        C::SetVmBudget {
            vm,
            vm_restart_limit,
            vm_restart_window_ms,
        } => format!("vm-budget {vm} {vm_restart_limit} {vm_restart_window_ms}ms"),
        C::SetPolicy { vm, policy, tie } => format!(
            "policy {vm} {}{}",
            crate::decision_agent::policy_name(*policy),
            match tie {
                Some(Tie::Restart) => " restart",
                Some(Tie::NoAction) => " no-action",
                None => "",
            }
        ),
    }
}

fn ms_of(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    vmha_model::duration::parse(s)
        .map(millis)
        .map_err(|e| format!("bad duration `{s}`: {e}"))
}

fn name(s: &str) -> Result<Name, String> {
    Name::new(s).map_err(|e| e.to_string())
}

fn vm_app(s: &str) -> Result<(Name, Name), String> {
    let (vm, app) = s
        .split_once('/')
        .ok_or_else(|| format!("expected VM/APP, got `{s}`"))?;
    Ok((name(vm)?, name(app)?))
}

/// Parses a script (see [`Sim::run_script`]) into delays and commands.
pub fn parse_script(script: &str) -> Result<Vec<(u64, SimCommand)>, SimError> {
    let mut out = Vec::new();
    for (n, raw) in script.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |msg: String| SimError::Script { line: n + 1, msg };
        let mut words = line.split_whitespace();
        let delay = words.next().unwrap_or("");
        let Some(delay) = delay.strip_prefix('+') else {
            return Err(err(format!("expected `+DELAY`, got `{delay}`")));
        };
        let delay = ms_of(delay).map_err(err)?;
        let words: Vec<&str> = words.collect();
        let cmd = parse_command(&words).map_err(err)?;
        out.push((delay, cmd));
    }
    Ok(out)
}

fn parse_command(w: &[&str]) -> Result<SimCommand, String> {
    let arg = |i: usize| -> Result<&str, String> {
        w.get(i)
            .copied()
            .ok_or_else(|| format!("`{}` needs more arguments", w.join(" ")))
    };
    let vm = |i: usize| arg(i).and_then(name);
    let va = |i: usize| -> Result<(Name, Name), String> { Ok((vm(i)?, vm(i + 1)?)) };
    let cmd = match arg(0)? {
        "tick" => SimCommand::Tick,
        "app-fail" => {
            let (vm, app) = va(1)?;
            let exit = match w.get(3) {
                Some(x) => x
                    .strip_prefix("exit:")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("expected exit:N, got `{x}`"))?,
                None => 3,
            };
            SimCommand::AppFail { vm, app, exit }
        }
        "app-recover" => {
            let (vm, app) = va(1)?;
            SimCommand::AppRecover { vm, app }
        }
        "app-hang" | "app-unhang" => {
            let (vm, app) = va(1)?;
            SimCommand::AppHang {
                vm,
                app,
                on: w[0] == "app-hang",
            }
        }
        "app-start-fails" | "app-start-noop" | "app-start-ok" => {
            let (vm, app) = va(1)?;
            let behaviour = match w[0] {
                "app-start-fails" => StartBehaviour::Fails,
                "app-start-noop" => StartBehaviour::Noop,
                _ => StartBehaviour::Ok,
            };
            SimCommand::AppStart { vm, app, behaviour }
        }
        "vm-crash" => SimCommand::VmCrash {
            vm: vm(1)?,
            kind: match w.get(2).copied().unwrap_or("gone") {
                "panic" => CrashKind::Panic,
                "shutdown" => CrashKind::Shutdown,
                "gone" => CrashKind::Gone,
                x => return Err(format!("unknown crash kind `{x}`")),
            },
        },
        "vm-reset" => SimCommand::VmReset { vm: vm(1)? },
        "guest-hang" => SimCommand::GuestHang {
            vm: vm(1)?,
            on: true,
        },
        "guest-recover" => SimCommand::GuestHang {
            vm: vm(1)?,
            on: false,
        },
        "boot-hang" => SimCommand::BootHang {
            vm: vm(1)?,
            on: true,
        },
        "boot-ok" => SimCommand::BootHang {
            vm: vm(1)?,
            on: false,
        },
        "host-crash" => SimCommand::HostCrash(vm(1)?),
        "host-isolate" => SimCommand::HostIsolate(vm(1)?),
        "host-recover" => SimCommand::HostRecover(vm(1)?),
        "daemon-restart" => SimCommand::DaemonRestart(vm(1)?),
        "exec-blocked" => SimCommand::ExecBlocked {
            vm: vm(1)?,
            on: true,
        },
        "exec-allowed" => SimCommand::ExecBlocked {
            vm: vm(1)?,
            on: false,
        },
        "host-memory" => SimCommand::HostMemory(
            vm(1)?,
            arg(2)?
                .parse()
                .map_err(|_| "memory must be an integer".to_string())?,
        ),
        "admin" => SimCommand::Admin(parse_admin(&w[1..])?),
        other => return Err(format!("unknown command `{other}`")),
    };
    Ok(cmd)
}

fn parse_admin(w: &[&str]) -> Result<AdminCommand, String> {
    use AdminCommand as C;
    let arg = |i: usize| -> Result<&str, String> {
        w.get(i)
            .copied()
            .ok_or_else(|| format!("`admin {}` needs more arguments", w.join(" ")))
    };
    let num = |i: usize| -> Result<u32, String> {
        arg(i)?
            .parse()
            .map_err(|_| format!("`{}` is not a number", w[i]))
    };
    Ok(match arg(0)? {
        "app-offline" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppOffline {
                vm,
                app,
                auto_clear: w.get(2) != Some(&"sticky"),
            }
        }
        "app-online" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppOnline { vm, app }
        }
        "app-start" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppStart { vm, app }
        }
        "app-stop" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppStop { vm, app }
        }
        "vm-start" => C::VmStart { vm: name(arg(1)?)? },
        "vm-stop" => C::VmStop { vm: name(arg(1)?)? },
        "vm-restart" => C::VmRestart { vm: name(arg(1)?)? },
        "move" => C::VmMove {
            vm: name(arg(1)?)?,
            to: name(arg(2)?)?,
        },
        "maintenance" => C::HostMaintenance {
            host: name(arg(1)?)?,
            on: match arg(2)? {
                "on" => true,
                "off" => false,
                x => return Err(format!("expected on|off, got `{x}`")),
            },
        },
        "freeze" => C::Freeze { vm: name(arg(1)?)? },
        "unfreeze" => C::Unfreeze { vm: name(arg(1)?)? },
        "clear" => C::Clear { vm: name(arg(1)?)? },
        "priority" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::SetPriority {
                vm,
                app,
                priority: num(2)?,
            }
        }
        "app-budget" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::SetAppBudget {
                vm,
                app,
                restart_limit: num(2)?,
                restart_window_ms: ms_of(arg(3)?)?,
            }
        }
        "vm-budget" => C::SetVmBudget {
            vm: name(arg(1)?)?,
            vm_restart_limit: num(2)?,
            vm_restart_window_ms: ms_of(arg(3)?)?,
        },
        "policy" => C::SetPolicy {
            vm: name(arg(1)?)?,
            policy: match arg(2)? {
                "highest-priority" => Policy::HighestPriority,
                "weighted" => Policy::Weighted,
                "weighted-with-offline" => Policy::WeightedWithOffline,
                "critical" => Policy::Critical,
                x => return Err(format!("unknown policy `{x}`")),
            },
            tie: match w.get(3).copied() {
                None => None,
                Some("restart") => Some(Tie::Restart),
                Some("no-action") => Some(Tie::NoAction),
                Some(x) => return Err(format!("unknown tie `{x}`")),
            },
        },
        other => return Err(format!("unknown admin command `{other}`")),
    })
}
