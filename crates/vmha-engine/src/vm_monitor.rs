//! The VM monitor (SPEC §4.3, the patent's "VM monitoring agent"), one per VM group this host
//! may run. It owns the group's app monitors and asks the decision agent when an app faults.
//!
//! Plans are ordered steps, one at a time:
//! - start: start VM → wait for the guest channel (`boot_timeout`) → start apps in dependency
//!   order (an app starts only when everything it requires is online);
//! - restart (VM failed, or decision "restart", within `vm_restart_limit` per
//!   `vm_restart_window`): stop apps in reverse dependency order (best effort, bounded by
//!   `stop_timeout`) → stop VM (graceful, forced after `stop_timeout`) → start plan;
//!   a crashed VM is killed instead of stopped;
//! - stop (desired `stop`), release (another owner) and fence (lease lost) end stopped;
//! - budget spent → the group is `faulted` on this host and reported; the controller moves it.
//!
//! Guarantees: never a second probe for a VM while one is in flight; a frozen group gets no
//! start/stop/kill action (probes and reports continue: it is monitored); a VM is only started
//! while this host owns it with desired `run` and holds a live lease.

use std::collections::VecDeque;

use vmha_model::{AppState, Name, OnGuestLoss, Policy, Tie, Vm, VmState};

use crate::app_monitor::{AppMonitor, AppOp, Change, FaultKind, Observed, StartWhy, StopWhy};
use crate::budget::Budget;
use crate::command::CommandError;
use crate::decision_agent::{AppView, Verdict, explain};
use crate::event::{Event, ObjectRef, Origin};
use crate::host_io::{
    Desired, HostAction, HostActionKind, ProbeCheck, ProbeOutcome, VmObservation, VmReport,
};
use crate::ids::ActionId;
use crate::persist::{PlanIntent, VmPersist};
use crate::status::{DecisionRecord, OfflineFlag, VmStatus};
use crate::time::{Timestamp, human, millis};

/// How many decisions `vmha explain` keeps per VM.
const DECISIONS_KEPT: usize = 8;
/// Delay before retrying a failed kill.
const KILL_RETRY_MS: u64 = 1_000;
/// Why apps are `unknown` while the guest agent refuses `guest-exec`.
const EXEC_BLOCKED: &str =
    "guest-exec is blocked by the guest agent's configuration: cannot probe or start apps";

/// Where actions and events go, and the facts of the host every VM needs.
pub(crate) struct Out<'a> {
    pub now: Timestamp,
    pub host: &'a Name,
    pub lease_live: bool,
    pub actions: &'a mut VecDeque<HostAction>,
    pub events: &'a mut VecDeque<Event>,
    pub next_id: &'a mut u64,
}

impl Out<'_> {
    fn act(&mut self, kind: HostActionKind, reason: impl Into<String>) -> ActionId {
        *self.next_id = self.next_id.saturating_add(1);
        let id = ActionId(*self.next_id);
        self.actions.push_back(HostAction {
            id,
            kind,
            reason: reason.into(),
        });
        id
    }

    fn event(&mut self, object: ObjectRef, from: &str, to: &str, reason: &str) {
        self.events.push_back(Event {
            time: self.now,
            origin: Origin::Host(self.host.clone()),
            object,
            from: from.to_string(),
            to: to.to_string(),
            reason: reason.to_string(),
        });
    }
}

/// What the hypervisor says about the VM process on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// Not observed yet.
    Unknown,
    /// Running.
    Running,
    /// Stopped, shut down or panicked, but the process may linger: needs a kill.
    Crashed,
    /// Not running here.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Start,
    Restart,
    Stop,
    Release,
    Fault,
    Fence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    StopApps,
    StopVm,
    KillVm,
    StartVm,
    WaitGuest,
    StartApps,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cur {
    /// An action of this step is in flight.
    Action(ActionId, Step),
    /// Waiting until a deadline (stop apps, wait guest) or a retry time (kill).
    Until(Timestamp, Step),
    /// Waiting with no deadline (guest channel with `on_guest_loss = ignore`, apps starting).
    Open(Step),
}

#[derive(Debug, Clone)]
struct Plan {
    intent: Intent,
    steps: VecDeque<Step>,
    cur: Option<Cur>,
}

#[derive(Debug, Clone)]
struct Probe {
    id: ActionId,
    sent: Timestamp,
    apps: Vec<usize>,
}

/// One VM group on this host.
#[derive(Debug, Clone)]
pub(crate) struct VmMonitor {
    pub name: Name,
    cfg: Vm,
    pub apps: Vec<AppMonitor>,
    requires: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    pub state: VmState,
    policy: Policy,
    tie: Tie,
    policy_override: Option<Policy>,
    tie_override: Option<Tie>,
    budget: Budget,
    budget_override: bool,
    pub frozen: bool,
    paused: bool,
    fault: Option<String>,
    owner: Option<Option<Name>>,
    desired: Option<Desired>,
    run: Run,
    guest_up: Option<bool>,
    guest_down_since: Option<Timestamp>,
    guest_lost: bool,
    /// The guest agent answers but refuses `guest-exec` (blocked by its configuration): apps
    /// cannot be probed or started, which is no reason to restart the VM.
    exec_blocked: bool,
    probe: Option<Probe>,
    plan: Option<Plan>,
    to_stop: Vec<bool>,
    decisions: VecDeque<DecisionRecord>,
    last_report: Option<(VmState, bool, u64)>,
    revision: u64,
    restored_restart: bool,
}

fn app_ref(vm: &Name, app: &Name) -> ObjectRef {
    ObjectRef::App {
        vm: vm.clone(),
        app: app.clone(),
    }
}

impl VmMonitor {
    pub fn new(cfg: &Vm, restored: Option<&VmPersist>, now: Timestamp) -> Self {
        let apps: Vec<AppMonitor> = cfg
            .apps
            .iter()
            .map(|a| AppMonitor::new(a, restored.and_then(|r| r.apps.get(&a.name)), now))
            .collect();
        let index = |n: &Name| cfg.apps.iter().position(|a| &a.name == n);
        let requires: Vec<Vec<usize>> = cfg
            .apps
            .iter()
            .map(|a| a.requires.iter().filter_map(index).collect())
            .collect();
        let mut dependents = vec![Vec::new(); apps.len()];
        for (i, reqs) in requires.iter().enumerate() {
            for &r in reqs {
                dependents[r].push(i);
            }
        }
        let mut m = VmMonitor {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            to_stop: vec![false; apps.len()],
            apps,
            requires,
            dependents,
            state: VmState::Unknown,
            policy: cfg.policy,
            tie: cfg.tie,
            policy_override: None,
            tie_override: None,
            budget: Budget::new(cfg.vm_restart_limit, millis(cfg.vm_restart_window)),
            budget_override: false,
            frozen: false,
            paused: false,
            fault: None,
            owner: None,
            desired: None,
            run: Run::Unknown,
            guest_up: None,
            guest_down_since: None,
            guest_lost: false,
            exec_blocked: false,
            probe: None,
            plan: None,
            decisions: VecDeque::new(),
            last_report: None,
            revision: 0,
            restored_restart: false,
        };
        if let Some(p) = restored {
            m.frozen = p.frozen;
            if let Some(pol) = p.policy {
                m.policy = pol;
                m.policy_override = Some(pol);
            }
            if let Some(t) = p.tie {
                m.tie = t;
                m.tie_override = Some(t);
            }
            if p.vm_restart_limit.is_some() || p.vm_restart_window_ms.is_some() {
                m.budget_override = true;
                m.budget.limit = p.vm_restart_limit.unwrap_or(m.budget.limit);
                m.budget.window_ms = p.vm_restart_window_ms.unwrap_or(m.budget.window_ms).max(1);
            }
            m.budget.times = p.vm_restarts.clone();
            m.fault = p.fault.clone();
            if m.fault.is_some() {
                m.state = VmState::Faulted;
            }
            m.restored_restart = p.plan == Some(PlanIntent::Restart);
        }
        m
    }

    pub fn persist(&self) -> VmPersist {
        let plan = match self.plan.as_ref().map(|p| p.intent) {
            Some(Intent::Restart) => Some(PlanIntent::Restart),
            _ if self.restored_restart => Some(PlanIntent::Restart),
            _ => None,
        };
        VmPersist {
            frozen: self.frozen,
            policy: self.policy_override,
            tie: self.tie_override,
            vm_restart_limit: self.budget_override.then_some(self.budget.limit),
            vm_restart_window_ms: self.budget_override.then_some(self.budget.window_ms),
            vm_restarts: self.budget.times.clone(),
            fault: self.fault.clone(),
            plan,
            apps: self
                .apps
                .iter()
                .map(|a| (a.name.clone(), a.persist()))
                .filter(|(_, p)| *p != Default::default())
                .collect(),
        }
    }

    // ----- small helpers -------------------------------------------------------------------

    fn mine(&self, host: &Name) -> bool {
        matches!(&self.owner, Some(Some(o)) if o == host)
    }

    fn should_run(&self, out: &Out<'_>) -> bool {
        out.lease_live && self.mine(out.host) && self.desired == Some(Desired::Run)
    }

    fn set_state(&mut self, out: &mut Out<'_>, to: VmState, reason: &str) {
        if self.state != to {
            let from = self.state;
            self.state = to;
            out.event(
                ObjectRef::Vm(self.name.clone()),
                from.as_str(),
                to.as_str(),
                reason,
            );
        }
        self.report(out, reason);
    }

    /// Reports the group's state to the cluster store when it differs from the last report.
    fn report(&mut self, out: &mut Out<'_>, reason: &str) {
        if !out.lease_live || self.owner.is_none() {
            return;
        }
        // `running = false` is the controller's licence to start the VM elsewhere: only when it
        // is stopped here and no plan could start it.
        let running = self.run != Run::Stopped
            || self.plan.is_some()
            || matches!(self.state, VmState::Starting | VmState::Restarting);
        if self.last_report == Some((self.state, running, self.revision)) {
            return;
        }
        self.last_report = Some((self.state, running, self.revision));
        out.act(
            HostActionKind::Report {
                vm: self.name.clone(),
                report: VmReport {
                    state: self.state,
                    running,
                    reason: reason.to_string(),
                    revision: self.revision,
                },
            },
            reason.to_string(),
        );
    }

    fn app_event(&self, out: &mut Out<'_>, i: usize, change: Option<Change>) -> bool {
        match change {
            Some(c) => {
                out.event(
                    app_ref(&self.name, &self.apps[i].name),
                    c.from.as_str(),
                    c.to.as_str(),
                    &c.reason,
                );
                true
            }
            None => false,
        }
    }

    fn set_app(&mut self, out: &mut Out<'_>, i: usize, to: AppState, reason: &str) -> bool {
        let change = self.apps[i].set(to, reason);
        self.app_event(out, i, change)
    }

    fn fault_app(&mut self, out: &mut Out<'_>, i: usize, kind: FaultKind, reason: &str) -> bool {
        let changed = self.set_app(out, i, AppState::Faulted, reason);
        self.apps[i].fault = Some(kind);
        changed
    }

    /// Every app to `unknown` (or `offline` when flagged), operations forgotten.
    fn apps_down(&mut self, out: &mut Out<'_>, reason: &str) {
        for i in 0..self.apps.len() {
            self.apps[i].op = None;
            self.apps[i].pending = None;
            self.apps[i].timeouts = 0;
            self.to_stop[i] = false;
            if self.apps[i].offline.is_some() {
                self.set_app(out, i, AppState::Offline, "intentionally offline");
            } else {
                self.set_app(out, i, AppState::Unknown, reason);
            }
        }
        self.probe = None;
    }

    fn views(&self) -> Vec<AppView<'_>> {
        self.apps
            .iter()
            .map(|a| AppView {
                name: a.name.as_str(),
                state: a.state,
                priority: a.priority,
                critical: a.cfg.critical,
            })
            .collect()
    }

    // ----- plans ---------------------------------------------------------------------------

    fn begin(&mut self, out: &mut Out<'_>, intent: Intent, steps: &[Step]) {
        self.cancel_plan();
        self.plan = Some(Plan {
            intent,
            steps: steps.iter().copied().collect(),
            cur: None,
        });
        self.advance(out);
    }

    /// Drops the plan in flight; results of its actions will be ignored. A VM whose start was
    /// in flight may be running: it is treated as needing a kill.
    fn cancel_plan(&mut self) {
        if let Some(plan) = self.plan.take()
            && let Some(Cur::Action(_, Step::StartVm)) = plan.cur
        {
            self.run = Run::Crashed;
        }
        for a in &mut self.apps {
            if matches!(a.op, Some(AppOp::Stop(_, StopWhy::Plan))) {
                a.op = None;
            }
        }
        self.to_stop.iter_mut().for_each(|s| *s = false);
    }

    fn start_steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.run == Run::Crashed {
            steps.push(Step::KillVm);
        }
        steps.extend([Step::StartVm, Step::WaitGuest, Step::StartApps]);
        steps
    }

    fn advance(&mut self, out: &mut Out<'_>) {
        loop {
            let Some(plan) = self.plan.as_mut() else {
                return;
            };
            if plan.cur.is_some() {
                return;
            }
            // Frozen: the plan pauses between steps (self-fencing excepted).
            if self.frozen && plan.intent != Intent::Fence {
                return;
            }
            let Some(step) = plan.steps.pop_front() else {
                self.finish_plan(out);
                return;
            };
            let cur = self.begin_step(out, step);
            if let Some(plan) = self.plan.as_mut() {
                plan.cur = cur;
            }
        }
    }

    /// Starts a step; `None` when it is already done (skipped).
    fn begin_step(&mut self, out: &mut Out<'_>, step: Step) -> Option<Cur> {
        let vm = self.name.clone();
        match step {
            Step::StopApps => {
                if self.run != Run::Running || self.guest_up != Some(true) {
                    return None;
                }
                for i in 0..self.apps.len() {
                    self.apps[i].pending = None;
                    self.to_stop[i] = matches!(
                        self.apps[i].state,
                        AppState::Online | AppState::Starting | AppState::Restarting
                    ) || matches!(self.apps[i].op, Some(AppOp::Start(..)));
                    if matches!(self.apps[i].op, Some(AppOp::Start(..))) {
                        self.apps[i].op = None;
                    }
                }
                self.probe = None;
                self.drive_stops(out);
                if self.stops_done() {
                    None
                } else {
                    Some(Cur::Until(
                        out.now.plus(self.cfg.stop_timeout),
                        Step::StopApps,
                    ))
                }
            }
            Step::StopVm => {
                if self.run == Run::Stopped {
                    return None;
                }
                self.probe = None;
                let id = out.act(
                    HostActionKind::StopVm {
                        vm,
                        timeout: self.cfg.stop_timeout,
                    },
                    format!(
                        "{}: graceful stop, forced after {}",
                        self.intent_text(),
                        human(millis(self.cfg.stop_timeout))
                    ),
                );
                Some(Cur::Action(id, Step::StopVm))
            }
            Step::KillVm => {
                if self.run == Run::Stopped {
                    return None;
                }
                self.probe = None;
                let id = out.act(
                    HostActionKind::KillVm { vm },
                    self.intent_text().to_string(),
                );
                Some(Cur::Action(id, Step::KillVm))
            }
            Step::StartVm => {
                let id = out.act(
                    HostActionKind::StartVm { vm },
                    self.intent_text().to_string(),
                );
                Some(Cur::Action(id, Step::StartVm))
            }
            Step::WaitGuest => {
                if self.guest_up == Some(true) {
                    return None;
                }
                match self.cfg.on_guest_loss {
                    OnGuestLoss::RestartVm => Some(Cur::Until(
                        out.now.plus(self.cfg.boot_timeout),
                        Step::WaitGuest,
                    )),
                    OnGuestLoss::Ignore => Some(Cur::Open(Step::WaitGuest)),
                }
            }
            Step::StartApps => {
                if self.exec_blocked {
                    self.apps_unprobeable(out);
                    return None;
                }
                for i in 0..self.apps.len() {
                    self.apps[i].op = None;
                    self.apps[i].timeouts = 0;
                    // A fresh guest re-arms the in-guest restart budget.
                    self.apps[i].budget.reset();
                    if self.apps[i].offline.is_some() {
                        self.set_app(
                            out,
                            i,
                            AppState::Offline,
                            "intentionally offline: not started",
                        );
                        self.apps[i].next_probe = out.now;
                    } else {
                        self.apps[i].pending = Some(StartWhy::Boot);
                    }
                }
                self.drive_pending(out);
                if self.starts_done() {
                    None
                } else {
                    Some(Cur::Open(Step::StartApps))
                }
            }
        }
    }

    fn intent_text(&self) -> &'static str {
        match self.plan.as_ref().map(|p| p.intent) {
            Some(Intent::Start) => "start VM group",
            Some(Intent::Restart) => "restart VM group",
            Some(Intent::Stop) => "stop VM group (desired stop)",
            Some(Intent::Release) => "release VM group (not the owner)",
            Some(Intent::Fault) => "VM group faulted",
            Some(Intent::Fence) => "self-fencing (lease lost)",
            None => "VM group",
        }
    }

    fn finish_plan(&mut self, out: &mut Out<'_>) {
        let Some(plan) = self.plan.take() else {
            return;
        };
        self.restored_restart = false;
        match plan.intent {
            Intent::Start | Intent::Restart => {
                let reason = match plan.intent {
                    Intent::Start => "started: VM running, guest channel up, apps started",
                    _ => "restarted: VM running, guest channel up, apps started",
                };
                self.set_state(out, VmState::Online, reason);
                self.decide(out);
            }
            Intent::Stop => self.set_state(out, VmState::Offline, "stopped (desired stop)"),
            Intent::Release => {
                self.set_state(out, VmState::Offline, "stopped: owned by another host")
            }
            Intent::Fault => {
                let reason = self.fault.clone().unwrap_or_default();
                self.set_state(out, VmState::Faulted, &reason);
                // Report again now that the VM is known not to run here.
                self.report(out, &reason);
            }
            Intent::Fence => self.set_state(out, VmState::Unknown, "self-fenced: VM killed"),
        }
        self.reconcile(out);
    }

    fn stops_done(&self) -> bool {
        !self.to_stop.iter().any(|s| *s)
            && !self
                .apps
                .iter()
                .any(|a| matches!(a.op, Some(AppOp::Stop(_, StopWhy::Plan))))
    }

    fn starts_done(&self) -> bool {
        !self.apps.iter().any(|a| {
            a.pending.is_some()
                || matches!(a.op, Some(AppOp::Start(..)))
                || matches!(a.state, AppState::Starting | AppState::Restarting)
        })
    }

    /// Stops, in reverse dependency order, every app marked to stop whose dependents are done.
    fn drive_stops(&mut self, out: &mut Out<'_>) {
        if self.frozen {
            return;
        }
        loop {
            let mut progress = false;
            for i in 0..self.apps.len() {
                if !self.to_stop[i] {
                    continue;
                }
                let blocked = self.dependents[i]
                    .iter()
                    .any(|&d| self.to_stop[d] || matches!(self.apps[d].op, Some(AppOp::Stop(..))));
                if blocked {
                    continue;
                }
                self.to_stop[i] = false;
                progress = true;
                if let Some(argv) = self.apps[i].cfg.stop.clone() {
                    let id = out.act(
                        HostActionKind::StopApp {
                            vm: self.name.clone(),
                            app: self.apps[i].name.clone(),
                            argv,
                        },
                        format!(
                            "{}: stop apps in reverse dependency order",
                            self.intent_text()
                        ),
                    );
                    self.apps[i].op = Some(AppOp::Stop(id, StopWhy::Plan));
                    self.set_app(out, i, AppState::Stopping, "stopping before the VM stops");
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Starts every pending app whose requirements are online; settles apps whose
    /// requirements cannot come online.
    fn drive_pending(&mut self, out: &mut Out<'_>) {
        if self.frozen {
            return;
        }
        for i in 0..self.apps.len() {
            let Some(why) = self.apps[i].pending else {
                continue;
            };
            let mut waiting = Vec::new();
            let mut offline = Vec::new();
            let mut broken = Vec::new();
            for &r in &self.requires[i] {
                let a = &self.apps[r];
                match a.state {
                    AppState::Online => {}
                    AppState::Offline => offline.push(a.name.to_string()),
                    AppState::Faulted | AppState::Unknown => {
                        broken.push(format!("{} ({})", a.name, a.state))
                    }
                    AppState::Starting | AppState::Restarting | AppState::Stopping => {
                        waiting.push(a.name.to_string())
                    }
                }
            }
            let verb = if why == StartWhy::Restart {
                "restart"
            } else {
                "start"
            };
            if !offline.is_empty() {
                self.apps[i].pending = None;
                let r = format!(
                    "not started: requires {} which is intentionally offline",
                    offline.join(", ")
                );
                self.set_app(out, i, AppState::Offline, &r);
            } else if !broken.is_empty() {
                self.apps[i].pending = None;
                let r = format!("cannot {verb}: requires {}", broken.join(", "));
                self.fault_app(out, i, FaultKind::Retry, &r);
            } else if !waiting.is_empty() {
                let to = if why == StartWhy::Restart {
                    AppState::Restarting
                } else {
                    AppState::Starting
                };
                let r = format!("{verb} waits for {}", waiting.join(", "));
                self.set_app(out, i, to, &r);
            } else {
                self.apps[i].pending = None;
                let reason = self.apps[i].reason.clone();
                self.start_app(out, i, why, &reason);
            }
        }
    }

    /// Issues the start of app `i` (a restart takes one unit of its budget, or faults it).
    fn start_app(&mut self, out: &mut Out<'_>, i: usize, why: StartWhy, cause: &str) {
        let now = out.now;
        let (to, reason) = match why {
            StartWhy::Restart => {
                if !self.apps[i].budget.try_take(now) {
                    let r = format!(
                        "{cause}; restart budget {} spent",
                        self.apps[i].budget.describe(now)
                    );
                    self.fault_app(out, i, FaultKind::Sticky, &r);
                    return;
                }
                (
                    AppState::Restarting,
                    format!("{cause}; restart {}", self.apps[i].budget.describe(now)),
                )
            }
            StartWhy::Boot => (
                AppState::Starting,
                "starting (requirements online)".to_string(),
            ),
            StartWhy::Admin => (AppState::Starting, "started by admin".to_string()),
        };
        let id = out.act(
            HostActionKind::StartApp {
                vm: self.name.clone(),
                app: self.apps[i].name.clone(),
                argv: self.apps[i].cfg.start.clone(),
            },
            reason.clone(),
        );
        self.apps[i].op = Some(AppOp::Start(id, why));
        self.set_app(out, i, to, &reason);
        self.apps[i].reason = reason;
    }

    // ----- failures and decisions ------------------------------------------------------------

    /// The VM failed (stopped, crashed, never brought its guest up, lost its guest).
    fn vm_failed(&mut self, out: &mut Out<'_>, why: &str) {
        self.cancel_plan();
        self.apps_down(out, "VM not running");
        if self.frozen {
            let r = format!("{why}; frozen: no action");
            self.set_state(out, VmState::Faulted, &r);
            return;
        }
        if !self.should_run(out) {
            self.set_state(out, VmState::Offline, why);
            self.reconcile(out);
            return;
        }
        self.restart_or_fault(out, why, true);
    }

    /// Restarts the VM within its budget, or faults the group on this host.
    fn restart_or_fault(&mut self, out: &mut Out<'_>, why: &str, crashed: bool) {
        let now = out.now;
        if self.budget.try_take(now) {
            let r = format!("{why}; VM restart {}", self.budget.describe(now));
            if self.state == VmState::Restarting {
                // A restart that failed again (e.g. boot timeout): no state change, but every
                // restart taken from the budget is an event with its reason.
                out.event(
                    ObjectRef::Vm(self.name.clone()),
                    VmState::Restarting.as_str(),
                    VmState::Restarting.as_str(),
                    &r,
                );
            }
            self.set_state(out, VmState::Restarting, &r);
            let steps = if crashed {
                self.start_steps()
            } else {
                let mut s = vec![Step::StopApps, Step::StopVm];
                s.extend([Step::StartVm, Step::WaitGuest, Step::StartApps]);
                s
            };
            self.begin(out, Intent::Restart, &steps);
        } else {
            let r = format!(
                "{why}; VM restart budget {} spent → faulted on {}",
                self.budget.describe(now),
                out.host
            );
            self.fault = Some(r.clone());
            self.set_state(out, VmState::Faulted, &r);
            if crashed && self.run != Run::Stopped {
                self.begin(out, Intent::Fault, &[Step::KillVm]);
            }
        }
    }

    /// Runs the decision agent when an app is faulted and acts on "restart".
    fn decide(&mut self, out: &mut Out<'_>) {
        if self.plan.is_some()
            || self.run != Run::Running
            || !self.apps.iter().any(|a| a.state == AppState::Faulted)
        {
            return;
        }
        let (verdict, arithmetic) = explain(self.policy, self.tie, &self.views());
        let faulted: Vec<&str> = self
            .apps
            .iter()
            .filter(|a| a.state == AppState::Faulted)
            .map(|a| a.name.as_str())
            .collect();
        let s = if faulted.len() == 1 { "" } else { "s" };
        let reason = format!("app{s} {} faulted; {arithmetic}", faulted.join(", "));
        if self.decisions.len() == DECISIONS_KEPT {
            self.decisions.pop_front();
        }
        self.decisions.push_back(DecisionRecord {
            time: out.now,
            verdict,
            reason: reason.clone(),
        });
        if verdict != Verdict::RestartVm || self.state == VmState::Faulted {
            return;
        }
        if self.frozen || !self.should_run(out) {
            return;
        }
        self.restart_or_fault(out, &reason, false);
    }

    /// Handles a failed app: restart within budget once its requirements are online.
    fn app_failed(&mut self, out: &mut Out<'_>, i: usize, cause: String) {
        if self.frozen {
            let r = format!("{cause}; frozen: no restart");
            self.fault_app(out, i, FaultKind::Retry, &r);
            return;
        }
        self.apps[i].reason = cause;
        self.apps[i].pending = Some(StartWhy::Restart);
        self.drive_pending(out);
    }

    // ----- inputs ----------------------------------------------------------------------------

    pub fn on_ownership(
        &mut self,
        out: &mut Out<'_>,
        owner: Option<Name>,
        desired: Desired,
        revision: u64,
    ) {
        self.revision = revision;
        let was_mine = self.mine(out.host);
        let now_mine = owner.as_ref() == Some(out.host);
        if now_mine && (!was_mine || self.owner.is_none()) {
            self.last_report = None;
        }
        if now_mine && !was_mine && self.owner.is_some() {
            // A fresh assignment to this host re-arms a fault seen here earlier.
            self.fault = None;
        }
        self.owner = Some(owner);
        self.desired = Some(desired);
        if let Some(plan) = &self.plan
            && matches!(plan.intent, Intent::Start | Intent::Restart)
            && !self.should_run(out)
            && !self.frozen
        {
            self.cancel_plan();
        }
        self.reconcile(out);
        if now_mine {
            // Answer every record revision, so the controller never acts on a stale report.
            let reason = format!("ownership revision {revision} seen");
            self.report(out, &reason);
        }
    }

    pub fn on_lease(&mut self, out: &mut Out<'_>) {
        if out.lease_live {
            self.last_report = None;
            self.reconcile(out);
            return;
        }
        // Whatever ownership we knew may be stale once the lease is lost: nothing is started
        // again before a fresh record arrives.
        self.owner = None;
        self.desired = None;
        if self.run == Run::Stopped {
            self.cancel_plan();
            return;
        }
        self.apps_down(out, "lease lost");
        self.set_state(out, VmState::Unknown, "lease lost: self-fencing");
        self.begin(out, Intent::Fence, &[Step::KillVm]);
    }

    pub fn on_observed(&mut self, out: &mut Out<'_>, kind: VmObservation) {
        match kind {
            VmObservation::Running => {
                if self.run == Run::Stopped || self.run == Run::Unknown {
                    self.run = Run::Running;
                }
                self.paused = false;
                self.reconcile(out);
            }
            VmObservation::Paused => self.paused = true,
            VmObservation::Resumed => self.paused = false,
            VmObservation::Reset => {
                if self.run != Run::Running || self.plan.is_some() {
                    return;
                }
                self.guest_up = None;
                self.exec_blocked = false;
                self.guest_down_since = None;
                self.guest_lost = false;
                self.apps_down(out, "VM reset (guest reboot)");
                if self.frozen || !self.should_run(out) {
                    return;
                }
                self.set_state(
                    out,
                    VmState::Restarting,
                    "guest reset itself: waiting for the guest channel, then starting apps",
                );
                self.begin(out, Intent::Start, &[Step::WaitGuest, Step::StartApps]);
            }
            VmObservation::Stopped { .. } | VmObservation::Panicked | VmObservation::Gone => {
                let gone = kind == VmObservation::Gone;
                let expected = matches!(
                    self.plan.as_ref().and_then(|p| p.cur),
                    Some(Cur::Action(_, Step::StopVm | Step::KillVm | Step::StartVm))
                ) || self.run == Run::Stopped
                    || self.run == Run::Unknown && self.plan.is_none();
                let was_unknown = self.run == Run::Unknown;
                if gone {
                    self.run = Run::Stopped;
                } else if self.run != Run::Stopped {
                    self.run = Run::Crashed;
                }
                if expected {
                    if was_unknown {
                        self.reconcile(out);
                    }
                    return;
                }
                let why = match kind {
                    VmObservation::Stopped { by_guest: true } => "VM shut down by the guest",
                    VmObservation::Stopped { by_guest: false } => "VM stopped unexpectedly",
                    VmObservation::Panicked => "guest panicked",
                    _ => "VM process gone",
                };
                let intent = self.plan.as_ref().map(|p| p.intent);
                match intent {
                    Some(Intent::Stop | Intent::Release | Intent::Fault | Intent::Fence) => {
                        // Already stopping: the stop steps skip or kill what is left.
                        if let Some(plan) = self.plan.as_mut()
                            && let Some(Cur::Until(_, Step::StopApps)) = plan.cur
                        {
                            plan.cur = None;
                        }
                        self.cancel_stops();
                        self.advance(out);
                    }
                    _ => self.vm_failed(out, why),
                }
            }
        }
    }

    fn cancel_stops(&mut self) {
        self.to_stop.iter_mut().for_each(|s| *s = false);
        for a in &mut self.apps {
            if matches!(a.op, Some(AppOp::Stop(_, StopWhy::Plan))) {
                a.op = None;
            }
        }
    }

    pub fn on_guest_channel(&mut self, out: &mut Out<'_>, up: bool) {
        if up {
            self.guest_up = Some(true);
            self.guest_down_since = None;
            if self.guest_lost {
                self.guest_lost = false;
                for a in &mut self.apps {
                    a.next_probe = out.now;
                }
            }
            if let Some(plan) = self.plan.as_mut()
                && matches!(
                    plan.cur,
                    Some(Cur::Until(_, Step::WaitGuest) | Cur::Open(Step::WaitGuest))
                )
            {
                plan.cur = None;
                self.advance(out);
            }
        } else {
            self.guest_up = Some(false);
            self.guest_down_since.get_or_insert(out.now);
        }
    }

    pub fn owns_probe(&self, id: ActionId) -> bool {
        self.probe.as_ref().is_some_and(|p| p.id == id)
    }

    /// Whether `id` is an action of this VM still awaited.
    pub fn owns(&self, id: ActionId) -> bool {
        self.owns_probe(id)
            || self.apps.iter().any(
                |a| matches!(a.op, Some(AppOp::Start(x, _)) | Some(AppOp::Stop(x, _)) if x == id),
            )
            || matches!(
                self.plan.as_ref().and_then(|p| p.cur),
                Some(Cur::Action(x, _)) if x == id
            )
    }

    fn finish_probe(&mut self) -> Option<Probe> {
        let probe = self.probe.take()?;
        for &i in &probe.apps {
            let interval = self.apps[i].cfg.interval;
            self.apps[i].next_probe = probe.sent.plus(interval);
        }
        Some(probe)
    }

    pub fn on_probe_result(
        &mut self,
        out: &mut Out<'_>,
        id: ActionId,
        outcomes: &[(Name, ProbeOutcome)],
    ) {
        if !self.owns_probe(id) {
            return;
        }
        let Some(probe) = self.finish_probe() else {
            return;
        };
        self.guest_up = Some(true);
        self.guest_down_since = None;
        self.guest_lost = false;
        let mut changed = false;
        for (name, outcome) in outcomes {
            let Some(i) = self.apps.iter().position(|a| &a.name == name) else {
                continue;
            };
            if !probe.apps.contains(&i) || !self.apps[i].probe_eligible() {
                continue;
            }
            let before = self.apps[i].state;
            let (observed, change) = self.apps[i].observe(out.now, *outcome);
            changed |= self.app_event(out, i, change);
            if let Observed::Failed(cause) = observed {
                self.app_failed(out, i, cause);
            }
            changed |= self.apps[i].state != before;
        }
        self.after_app_changes(out, changed);
    }

    fn after_app_changes(&mut self, out: &mut Out<'_>, changed: bool) {
        self.drive_pending(out);
        if let Some(plan) = self.plan.as_mut()
            && plan.cur == Some(Cur::Open(Step::StartApps))
            && self.starts_done()
        {
            if let Some(plan) = self.plan.as_mut() {
                plan.cur = None;
            }
            self.advance(out);
            return;
        }
        if changed {
            self.decide(out);
        }
    }

    /// The guest agent allows `guest-exec` again, or refuses it (its configuration blocks it).
    /// Blocked: the channel itself is fine (no guest loss), apps become `unknown` and are
    /// neither probed nor started until it is allowed again; the VM is left alone.
    pub fn on_guest_exec(&mut self, out: &mut Out<'_>, allowed: bool) {
        if allowed != self.exec_blocked {
            return;
        }
        self.exec_blocked = !allowed;
        if allowed {
            for a in &mut self.apps {
                a.next_probe = out.now;
            }
            return;
        }
        self.finish_probe();
        self.guest_up = Some(true);
        self.guest_down_since = None;
        self.guest_lost = false;
        self.apps_unprobeable(out);
        // A start plan waiting for its apps is done: they cannot be started.
        self.after_app_changes(out, false);
    }

    /// Marks every app that is not intentionally offline `unknown` because `guest-exec` is
    /// blocked, cancelling pending starts.
    fn apps_unprobeable(&mut self, out: &mut Out<'_>) {
        for i in 0..self.apps.len() {
            self.apps[i].pending = None;
            // A start in flight will be refused too: its answer no longer counts.
            if matches!(self.apps[i].op, Some(AppOp::Start(..))) {
                self.apps[i].op = None;
            }
            if self.apps[i].offline.is_none() {
                self.set_app(out, i, AppState::Unknown, EXEC_BLOCKED);
                // Already unknown (e.g. before the first probe): the reason still says why.
                self.apps[i].reason = EXEC_BLOCKED.to_string();
            }
        }
    }

    pub fn on_guest_unreachable(&mut self, out: &mut Out<'_>) {
        self.finish_probe();
        self.guest_up = Some(false);
        self.guest_down_since.get_or_insert(out.now);
    }

    pub fn on_action_result(
        &mut self,
        out: &mut Out<'_>,
        id: ActionId,
        result: Result<(), String>,
    ) {
        if self.owns_probe(id) {
            if result.is_err() {
                self.on_guest_unreachable(out);
            }
            return;
        }
        if let Some(i) = self.apps.iter().position(
            |a| matches!(a.op, Some(AppOp::Start(x, _)) | Some(AppOp::Stop(x, _)) if x == id),
        ) {
            self.on_app_result(out, i, result);
            return;
        }
        let Some(Cur::Action(_, step)) = self.plan.as_ref().and_then(|p| p.cur) else {
            return;
        };
        if let Some(plan) = self.plan.as_mut() {
            plan.cur = None;
        }
        match (step, result) {
            (Step::StopVm | Step::KillVm, Ok(())) => {
                self.run = Run::Stopped;
                self.guest_up = None;
                self.exec_blocked = false;
                self.guest_down_since = None;
                self.guest_lost = false;
                self.paused = false;
                self.apps_down(out, "VM stopped");
                self.advance(out);
            }
            (Step::StopVm, Err(_)) => {
                if let Some(plan) = self.plan.as_mut() {
                    plan.steps.push_front(Step::KillVm);
                }
                self.advance(out);
            }
            (Step::KillVm, Err(_)) => {
                if let Some(plan) = self.plan.as_mut() {
                    plan.cur = Some(Cur::Until(out.now.plus_ms(KILL_RETRY_MS), Step::KillVm));
                }
            }
            (Step::StartVm, Ok(())) => {
                self.run = Run::Running;
                self.guest_up = None;
                self.exec_blocked = false;
                self.guest_down_since = None;
                self.guest_lost = false;
                self.paused = false;
                self.advance(out);
            }
            (Step::StartVm, Err(e)) => {
                self.run = Run::Crashed;
                self.plan = None;
                self.vm_failed(out, &format!("VM start failed: {e}"));
            }
            _ => {}
        }
    }

    fn on_app_result(&mut self, out: &mut Out<'_>, i: usize, result: Result<(), String>) {
        let op = self.apps[i].op.take();
        let mut changed = false;
        match (op, result) {
            (Some(AppOp::Start(..)), Ok(())) => self.apps[i].next_probe = out.now,
            (Some(AppOp::Start(_, why)), Err(e)) => {
                let what = if why == StartWhy::Restart {
                    "restart"
                } else {
                    "start"
                };
                let r = format!("{what} command failed: {e}");
                changed |= self.fault_app(out, i, FaultKind::Sticky, &r);
            }
            (Some(AppOp::Stop(_, StopWhy::Admin)), Ok(())) => {
                changed |= self.set_app(out, i, AppState::Offline, "stopped by admin");
                self.apps[i].next_probe = out.now.plus(self.apps[i].cfg.interval);
            }
            (Some(AppOp::Stop(_, StopWhy::Admin)), Err(_)) => self.apps[i].next_probe = out.now,
            (Some(AppOp::Stop(_, StopWhy::Plan)), _) => {
                self.drive_stops(out);
                if self.stops_done()
                    && let Some(plan) = self.plan.as_mut()
                    && matches!(plan.cur, Some(Cur::Until(_, Step::StopApps)))
                {
                    plan.cur = None;
                    self.advance(out);
                }
                return;
            }
            (None, _) => return,
        }
        self.after_app_changes(out, changed);
    }

    /// Records a VM found running on this host without a plan as online and probes its apps
    /// at once (no-op unless its state is still `unknown` or `offline`).
    fn adopt(&mut self, out: &mut Out<'_>, reason: &str) {
        if matches!(self.state, VmState::Unknown | VmState::Offline) {
            for a in &mut self.apps {
                a.next_probe = out.now;
            }
            self.set_state(out, VmState::Online, reason);
        }
    }

    /// Brings the VM in line with ownership and desired state when no plan runs.
    pub fn reconcile(&mut self, out: &mut Out<'_>) {
        if self.plan.is_some() || self.owner.is_none() || self.run == Run::Unknown {
            return;
        }
        if !out.lease_live {
            return;
        }
        let mine = self.mine(out.host);
        if self.frozen {
            // Monitor, never act: a frozen VM found running is still recorded as online.
            if mine && self.run == Run::Running && !self.restored_restart {
                self.adopt(out, "VM already running here: adopted (frozen)");
            }
            return;
        }
        if mine && self.desired == Some(Desired::Run) {
            match self.run {
                Run::Stopped | Run::Crashed => {
                    if self.fault.is_some() {
                        return;
                    }
                    if self.restored_restart {
                        self.set_state(
                            out,
                            VmState::Restarting,
                            "resuming the restart in progress",
                        );
                        let steps = self.start_steps();
                        self.begin(out, Intent::Restart, &steps);
                        return;
                    }
                    let r = if self.state == VmState::Faulted {
                        format!("fault cleared; owner {}, desired run: starting", out.host)
                    } else {
                        format!("owner {}, desired run: starting", out.host)
                    };
                    self.set_state(out, VmState::Starting, &r);
                    let steps = self.start_steps();
                    self.begin(out, Intent::Start, &steps);
                }
                Run::Running => {
                    if self.restored_restart {
                        self.set_state(
                            out,
                            VmState::Restarting,
                            "resuming the restart in progress",
                        );
                        self.begin(out, Intent::Restart, &[Step::WaitGuest, Step::StartApps]);
                    } else {
                        self.adopt(out, "VM already running here: adopted");
                    }
                }
                Run::Unknown => {}
            }
            return;
        }
        if mine {
            // Desired stop.
            if self.run == Run::Stopped {
                if self.state != VmState::Faulted {
                    self.set_state(out, VmState::Offline, "desired stop");
                }
                self.report(out, "desired stop: not running");
            } else {
                self.set_state(out, VmState::Stopping, "desired stop: stopping apps and VM");
                self.begin(out, Intent::Stop, &[Step::StopApps, Step::StopVm]);
            }
            return;
        }
        // Not the owner.
        if self.run == Run::Stopped {
            if !matches!(self.state, VmState::Offline | VmState::Faulted) {
                let r = match self.owner.clone().flatten() {
                    Some(o) => format!("owned by {o}"),
                    None => "no owner assigned yet".to_string(),
                };
                self.set_state(out, VmState::Offline, &r);
            }
            return;
        }
        match self.owner.clone().flatten() {
            Some(other) => {
                let r = format!("owned by {other}: killing it here at once");
                self.set_state(out, VmState::Stopping, &r);
                self.begin(out, Intent::Release, &[Step::KillVm]);
            }
            None => {
                self.set_state(out, VmState::Stopping, "no owner: stopping it here");
                self.begin(out, Intent::Release, &[Step::StopApps, Step::StopVm]);
            }
        }
    }

    // ----- timers ----------------------------------------------------------------------------

    /// No plan, or a plan waiting for its apps to start: apps are probed, the guest watched.
    fn monitoring(&self) -> bool {
        matches!(
            self.plan.as_ref().map(|p| p.cur),
            None | Some(Some(Cur::Open(Step::StartApps)))
        )
    }

    fn probing(&self) -> bool {
        self.run == Run::Running
            && !self.paused
            && !self.exec_blocked
            && self.probe.is_none()
            && self.monitoring()
    }

    fn guest_deadline(&self) -> Option<Timestamp> {
        if self.run != Run::Running || self.guest_lost {
            return None;
        }
        let in_monitoring = self.monitoring();
        if !in_monitoring {
            return None;
        }
        self.guest_down_since
            .map(|t| t.plus(self.cfg.guest_timeout))
    }

    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut t: Option<Timestamp> = None;
        let mut consider = |x: Timestamp| t = Some(t.map_or(x, |y| y.min(x)));
        if self.probing() {
            for a in &self.apps {
                if a.probe_eligible() {
                    consider(a.next_probe);
                }
            }
        }
        if let Some(Some(Cur::Until(x, _))) = self.plan.as_ref().map(|p| p.cur) {
            consider(x);
        }
        if let Some(x) = self.guest_deadline() {
            consider(x);
        }
        t
    }

    pub fn on_timeout(&mut self, out: &mut Out<'_>) {
        let now = out.now;
        if let Some(Some(Cur::Until(t, step))) = self.plan.as_ref().map(|p| p.cur)
            && t <= now
        {
            match step {
                Step::StopApps => {
                    self.cancel_stops();
                    if let Some(plan) = self.plan.as_mut() {
                        plan.cur = None;
                    }
                    self.advance(out);
                }
                Step::WaitGuest => {
                    let why = format!(
                        "guest channel not up within boot_timeout {}",
                        human(millis(self.cfg.boot_timeout))
                    );
                    // The QEMU process still runs a guest that never came up: it must be
                    // killed before the VM is started again (or left faulted).
                    if self.run == Run::Running {
                        self.run = Run::Crashed;
                    }
                    self.vm_failed(out, &why);
                }
                Step::KillVm => {
                    if let Some(plan) = self.plan.as_mut() {
                        plan.cur = None;
                        plan.steps.push_front(Step::KillVm);
                    }
                    self.advance(out);
                }
                _ => {}
            }
        }
        if let Some(deadline) = self.guest_deadline()
            && deadline <= now
        {
            self.guest_lost = true;
            let lost = format!(
                "guest channel unreachable for {}",
                human(millis(self.cfg.guest_timeout))
            );
            for i in 0..self.apps.len() {
                if self.apps[i].offline.is_none() && self.apps[i].op.is_none() {
                    self.apps[i].pending = None;
                    self.set_app(out, i, AppState::Unknown, &lost);
                }
            }
            if !self.frozen
                && self.cfg.on_guest_loss == OnGuestLoss::RestartVm
                && self.should_run(out)
            {
                let why = format!("{lost} (on_guest_loss = restart-vm)");
                self.cancel_plan();
                self.restart_or_fault(out, &why, false);
            }
        }
        if self.probing() {
            let due: Vec<usize> = (0..self.apps.len())
                .filter(|&i| self.apps[i].probe_eligible() && self.apps[i].next_probe <= now)
                .collect();
            if !due.is_empty() {
                let checks = due
                    .iter()
                    .map(|&i| ProbeCheck {
                        app: self.apps[i].name.clone(),
                        argv: self.apps[i].cfg.check.clone(),
                        timeout: self.apps[i].cfg.timeout,
                    })
                    .collect();
                let id = out.act(
                    HostActionKind::Probe {
                        vm: self.name.clone(),
                        checks,
                    },
                    "monitor period",
                );
                self.probe = Some(Probe {
                    id,
                    sent: now,
                    apps: due,
                });
            }
        }
    }

    // ----- admin -----------------------------------------------------------------------------

    fn app_index(&self, app: &Name) -> Result<usize, CommandError> {
        self.apps
            .iter()
            .position(|a| &a.name == app)
            .ok_or_else(|| CommandError::UnknownApp {
                vm: self.name.clone(),
                app: app.clone(),
            })
    }

    pub fn check_owner(&self, host: &Name) -> Result<(), CommandError> {
        if self.mine(host) {
            Ok(())
        } else {
            Err(CommandError::NotOwner {
                vm: self.name.clone(),
                host: host.clone(),
            })
        }
    }

    fn check_acting(&self) -> Result<(), CommandError> {
        if self.frozen {
            return Err(CommandError::Frozen(self.name.clone()));
        }
        if self.run != Run::Running || self.guest_up != Some(true) {
            return Err(CommandError::VmNotRunning(self.name.clone()));
        }
        if self.exec_blocked {
            return Err(CommandError::GuestExecBlocked(self.name.clone()));
        }
        if self.plan.is_some() {
            return Err(CommandError::Busy(self.name.clone()));
        }
        Ok(())
    }

    pub fn app_offline(
        &mut self,
        out: &mut Out<'_>,
        app: &Name,
        auto_clear: bool,
    ) -> Result<(), CommandError> {
        let i = self.app_index(app)?;
        self.apps[i].offline = Some(OfflineFlag { auto_clear });
        let a = &self.apps[i];
        if a.op.is_none()
            && matches!(
                a.state,
                AppState::Faulted | AppState::Restarting | AppState::Unknown
            )
        {
            self.apps[i].pending = None;
            let changed = self.set_app(
                out,
                i,
                AppState::Offline,
                "marked intentionally offline by admin",
            );
            self.after_app_changes(out, changed);
        }
        Ok(())
    }

    pub fn app_online(&mut self, out: &mut Out<'_>, app: &Name) -> Result<(), CommandError> {
        let i = self.app_index(app)?;
        self.apps[i].offline = None;
        self.apps[i].next_probe = out.now;
        Ok(())
    }

    /// Refuses an admin operation on app `i` while another operation on it is in flight.
    fn app_idle(&self, i: usize) -> Result<(), CommandError> {
        match self.apps[i].op {
            Some(_) => Err(CommandError::AppBusy {
                vm: self.name.clone(),
                app: self.apps[i].name.clone(),
                state: self.apps[i].state.to_string(),
            }),
            None => Ok(()),
        }
    }

    pub fn app_start(&mut self, out: &mut Out<'_>, app: &Name) -> Result<(), CommandError> {
        let i = self.app_index(app)?;
        self.check_acting()?;
        self.app_idle(i)?;
        let missing: Vec<Name> = self.requires[i]
            .iter()
            .filter(|&&r| self.apps[r].state != AppState::Online)
            .map(|&r| self.apps[r].name.clone())
            .collect();
        if !missing.is_empty() {
            return Err(CommandError::RequirementsDown {
                vm: self.name.clone(),
                app: app.clone(),
                missing,
            });
        }
        self.apps[i].offline = None;
        self.apps[i].pending = None;
        self.apps[i].fault = None;
        self.start_app(out, i, StartWhy::Admin, "started by admin");
        Ok(())
    }

    pub fn app_stop(&mut self, out: &mut Out<'_>, app: &Name) -> Result<(), CommandError> {
        let i = self.app_index(app)?;
        let Some(argv) = self.apps[i].cfg.stop.clone() else {
            return Err(CommandError::NoStopCommand {
                vm: self.name.clone(),
                app: app.clone(),
            });
        };
        self.check_acting()?;
        self.app_idle(i)?;
        let dependents: Vec<Name> = self.dependents[i]
            .iter()
            .filter(|&&d| {
                matches!(
                    self.apps[d].state,
                    AppState::Online
                        | AppState::Starting
                        | AppState::Restarting
                        | AppState::Stopping
                )
            })
            .map(|&d| self.apps[d].name.clone())
            .collect();
        if !dependents.is_empty() {
            return Err(CommandError::RequiredBy {
                vm: self.name.clone(),
                app: app.clone(),
                dependents,
            });
        }
        self.apps[i].offline = Some(OfflineFlag { auto_clear: true });
        self.apps[i].pending = None;
        let id = out.act(
            HostActionKind::StopApp {
                vm: self.name.clone(),
                app: app.clone(),
                argv,
            },
            "stopped by admin",
        );
        self.apps[i].op = Some(AppOp::Stop(id, StopWhy::Admin));
        self.set_app(out, i, AppState::Stopping, "stopping (admin)");
        Ok(())
    }

    pub fn vm_restart(&mut self, out: &mut Out<'_>) -> Result<(), CommandError> {
        if self.frozen {
            return Err(CommandError::Frozen(self.name.clone()));
        }
        if self.plan.is_some() {
            return Err(CommandError::Busy(self.name.clone()));
        }
        if self.run != Run::Running || !self.should_run(out) {
            return Err(CommandError::VmNotRunning(self.name.clone()));
        }
        self.set_state(out, VmState::Restarting, "restart requested by admin");
        self.begin(
            out,
            Intent::Restart,
            &[
                Step::StopApps,
                Step::StopVm,
                Step::StartVm,
                Step::WaitGuest,
                Step::StartApps,
            ],
        );
        Ok(())
    }

    pub fn freeze(&mut self, on: bool, out: &mut Out<'_>) {
        if self.frozen == on {
            return;
        }
        self.frozen = on;
        if !on {
            self.drive_stops(out);
            self.drive_pending(out);
            if let Some(plan) = self.plan.as_mut()
                && plan.cur == Some(Cur::Open(Step::StartApps))
                && self.starts_done()
                && let Some(plan) = self.plan.as_mut()
            {
                plan.cur = None;
            }
            self.advance(out);
            self.reconcile(out);
            self.decide(out);
        }
    }

    pub fn clear(&mut self, out: &mut Out<'_>) {
        self.budget.reset();
        self.fault = None;
        for a in &mut self.apps {
            a.budget.reset();
            if a.state == AppState::Faulted {
                a.fault = Some(FaultKind::Retry);
                a.next_probe = out.now;
            }
        }
        self.reconcile(out);
        if self.state == VmState::Faulted && self.plan.is_none() {
            let next = if self.run == Run::Running {
                VmState::Online
            } else {
                VmState::Offline
            };
            self.set_state(out, next, "fault cleared by admin: budgets re-armed");
        }
    }

    pub fn set_priority(
        &mut self,
        out: &mut Out<'_>,
        app: &Name,
        priority: u32,
    ) -> Result<(), CommandError> {
        if priority == 0 {
            return Err(CommandError::InvalidValue("priority must be ≥ 1".into()));
        }
        let i = self.app_index(app)?;
        self.apps[i].priority = priority;
        self.apps[i].priority_override = Some(priority);
        self.decide(out);
        Ok(())
    }

    pub fn set_app_budget(
        &mut self,
        app: &Name,
        limit: u32,
        window_ms: u64,
    ) -> Result<(), CommandError> {
        if window_ms == 0 {
            return Err(CommandError::InvalidValue(
                "restart window must be > 0".into(),
            ));
        }
        let i = self.app_index(app)?;
        self.apps[i].budget.limit = limit;
        self.apps[i].budget.window_ms = window_ms;
        self.apps[i].budget_override = true;
        Ok(())
    }

    pub fn set_vm_budget(&mut self, limit: u32, window_ms: u64) -> Result<(), CommandError> {
        if window_ms == 0 {
            return Err(CommandError::InvalidValue(
                "VM restart window must be > 0".into(),
            ));
        }
        self.budget.limit = limit;
        self.budget.window_ms = window_ms;
        self.budget_override = true;
        Ok(())
    }

    pub fn set_policy(&mut self, out: &mut Out<'_>, policy: Policy, tie: Option<Tie>) {
        self.policy = policy;
        self.policy_override = Some(policy);
        if let Some(t) = tie {
            self.tie = t;
            self.tie_override = Some(t);
        }
        self.decide(out);
    }

    // ----- status ----------------------------------------------------------------------------

    pub fn status(&self, now: Timestamp) -> VmStatus {
        VmStatus {
            name: self.name.clone(),
            state: self.state,
            owner: self.owner.clone().flatten(),
            desired: self.desired,
            frozen: self.frozen,
            paused: self.paused,
            guest_channel_up: self.guest_up,
            guest_exec_blocked: self.exec_blocked,
            policy: self.policy,
            tie: self.tie,
            vm_restarts_in_window: self.budget.used(now),
            vm_restart_limit: self.budget.limit,
            vm_restart_window_ms: self.budget.window_ms,
            plan: self.plan.as_ref().map(|p| {
                let step = match p.cur {
                    Some(Cur::Action(_, s) | Cur::Until(_, s) | Cur::Open(s)) => step_name(s),
                    None => "between steps",
                };
                format!("{}: {step}", self.intent_text())
            }),
            fault: self.fault.clone(),
            decisions: self.decisions.iter().cloned().collect(),
            apps: self.apps.iter().map(|a| a.status(now)).collect(),
        }
    }
}

fn step_name(s: Step) -> &'static str {
    match s {
        Step::StopApps => "stopping apps",
        Step::StopVm => "stopping VM",
        Step::KillVm => "killing VM",
        Step::StartVm => "starting VM",
        Step::WaitGuest => "waiting for guest channel",
        Step::StartApps => "starting apps",
    }
}
