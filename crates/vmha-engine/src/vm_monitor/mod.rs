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

mod admin;
mod guest;
mod inputs;
mod migration;
mod ordering;
mod plan;
mod reconcile;
mod status;
mod timers;
mod watch;

use std::collections::VecDeque;

use vmha_model::{AppState, Name, OnGuestLoss, Policy, Tie, Vm, VmState};

use crate::app_monitor::{AppMonitor, AppOp, Change, FaultKind, Observed, StartWhy, StopWhy};
use crate::budget::Budget;
use crate::command::CommandError;
use crate::controller::Migration;
use crate::decision_agent::{AppView, Verdict, explain};
use crate::event::{Event, ObjectRef, Origin};
use crate::host_io::{
    ActionError, Desired, HostAction, HostActionKind, MigrationNote, PauseReason, ProbeCheck,
    ProbeOutcome, VmObservation, VmReport,
};
use crate::ids::ActionId;
use crate::persist::{Dirty, PlanIntent, VmLocal};
use crate::records::{AppSettings, VmAdmin, VmSettings};
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
    pub reports: &'a mut VecDeque<(Name, VmReport)>,
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
    /// The guest booted afresh in this plan (started, or reset itself): its apps' in-guest
    /// restart budgets are re-armed. A plan resumed after a daemon restart keeps counting.
    fresh_guest: bool,
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
    /// Paused on purpose (an admin, a debugger, a migration), and since when: no probes, no
    /// guest-loss timers until it resumes.
    paused: Option<(PauseReason, Timestamp)>,
    fault: Option<String>,
    owner: Option<Option<Name>>,
    desired: Option<Desired>,
    run: Run,
    /// The guest channel as the engine judges it: `None` no news since the guest (re)started,
    /// `Some(true)` it answered last, `Some(false)` it failed last.
    guest_up: Option<bool>,
    /// When the guest agent last answered anything.
    guest_seen: Option<Timestamp>,
    /// When the current streak of failed attempts began.
    guest_down_since: Option<Timestamp>,
    guest_lost: bool,
    /// The guest agent was found hostile (reported once) and has not answered since.
    guest_hostile: bool,
    /// The ping in flight.
    ping: Option<guest::Ping>,
    /// When the next ping is due while the channel is not known up.
    next_ping: Timestamp,
    /// The guest agent answers but refuses `guest-exec` (blocked by its configuration): apps
    /// cannot be probed or started, which is no reason to restart the VM.
    exec_blocked: bool,
    probe: Option<Probe>,
    /// The watch of the apps' processes.
    watch: watch::Watch,
    plan: Option<Plan>,
    to_stop: Vec<bool>,
    decisions: VecDeque<DecisionRecord>,
    last_report: Option<(VmState, bool, u64, Option<MigrationNote>)>,
    /// The live migration the ownership record carries, if any.
    migrate: Option<Migration>,
    /// Target side: the incoming QEMU on this host.
    incoming: Option<migration::Incoming>,
    /// Source side: the `migrate` action in flight.
    outgoing: Option<ActionId>,
    /// Source side: the migration completed; the QEMU here is paused for good.
    outgoing_sent: bool,
    /// Source side: the `migrate_cancel` in flight.
    cancel: Option<ActionId>,
    /// What this host reports about its side of the migration.
    migration_note: Option<MigrationNote>,
    /// The target of the latest migration the record carried (for reasons).
    migration_target: Option<Name>,
    revision: u64,
    restored_restart: bool,
    /// The admin record's `clear` generation this host has applied.
    clear_seen: u64,
    /// The VM ran here when the previous run of the daemon last persisted its state.
    restored_running: bool,
    /// The latest observation of QEMU was `Unresponsive` (taken as running, not known to be):
    /// said so in the reason when such a VM is adopted.
    unresponsive: bool,
    /// The VM was adopted as running while its QEMU did not answer (that adoption's reason
    /// says so), and no other observation came since: a `Running` one is said as the QEMU
    /// answering again.
    adopted_unanswered: bool,
    /// Run-time settings were applied from the store (or changed here) at least once.
    settings_known: bool,
    /// What changed in persisted data (host-local state, settings) since it was handed out.
    dirty: Dirty,
}

fn app_ref(vm: &Name, app: &Name) -> ObjectRef {
    ObjectRef::App {
        vm: vm.clone(),
        app: app.clone(),
    }
}

impl VmMonitor {
    /// The monitor of `cfg` on this host, with its host-local state from an earlier run.
    /// Run-time settings and admin flags arrive later as records ([`VmMonitor::apply_settings`],
    /// [`VmMonitor::on_admin`]).
    pub fn new(cfg: &Vm, local: Option<&VmLocal>, now: Timestamp) -> Self {
        let apps: Vec<AppMonitor> = cfg
            .apps
            .iter()
            .map(|a| AppMonitor::new(a, local.and_then(|l| l.app_restarts.get(&a.name)), now))
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
            paused: None,
            fault: None,
            owner: None,
            desired: None,
            run: Run::Unknown,
            guest_up: None,
            guest_seen: None,
            guest_down_since: None,
            guest_lost: false,
            guest_hostile: false,
            ping: None,
            next_ping: now,
            exec_blocked: false,
            probe: None,
            watch: watch::Watch::default(),
            plan: None,
            decisions: VecDeque::new(),
            last_report: None,
            migrate: None,
            incoming: None,
            outgoing: None,
            outgoing_sent: false,
            cancel: None,
            migration_note: None,
            migration_target: None,
            revision: 0,
            restored_restart: false,
            clear_seen: 0,
            restored_running: false,
            unresponsive: false,
            adopted_unanswered: false,
            settings_known: false,
            dirty: Dirty::default(),
        };
        if let Some(l) = local {
            m.budget.times = l.vm_restarts.clone();
            m.fault = l.fault.clone();
            if m.fault.is_some() {
                m.state = VmState::Faulted;
            }
            m.restored_restart = l.plan == Some(PlanIntent::Restart);
            m.clear_seen = l.clear_seen;
            m.restored_running = l.running;
        }
        m
    }

    /// What the hypervisor says about the VM here; a change of whether it runs is persisted.
    fn set_run(&mut self, run: Run) {
        let before = self.ran();
        self.run = run;
        if self.ran() != before {
            self.dirty.local = true;
        }
    }

    /// Whether the VM runs here, as persisted (not observed yet: what the previous run of the
    /// daemon knew still holds).
    fn ran(&self) -> bool {
        self.run == Run::Running || (self.run == Run::Unknown && self.restored_running)
    }

    /// The host-local state to persist.
    pub fn local(&self) -> VmLocal {
        let plan = match self.plan.as_ref().map(|p| p.intent) {
            Some(Intent::Restart) => Some(PlanIntent::Restart),
            _ if self.restored_restart => Some(PlanIntent::Restart),
            _ => None,
        };
        VmLocal {
            vm_restarts: self.budget.times.clone(),
            fault: self.fault.clone(),
            plan,
            running: self.ran(),
            clear_seen: self.clear_seen,
            app_restarts: self
                .apps
                .iter()
                .filter(|a| !a.budget.times.is_empty())
                .map(|a| (a.name.clone(), a.budget.times.clone()))
                .collect(),
        }
    }

    /// The run-time settings of the group and its apps (what the owner persists).
    pub fn settings(&self) -> VmSettings {
        VmSettings {
            policy: self.policy_override,
            tie: self.tie_override,
            vm_restart_limit: self.budget_override.then_some(self.budget.limit),
            vm_restart_window_ms: self.budget_override.then_some(self.budget.window_ms),
            apps: self
                .apps
                .iter()
                .map(|a| (a.name.clone(), a.settings()))
                .filter(|(_, s)| !s.is_empty())
                .collect(),
        }
    }

    /// Applies the group's stored run-time settings. The owner host is their only writer and
    /// keeps its own once it knows them (an echo of an older write must not undo a newer one);
    /// every other host follows the store, so it has them when the group moves to it.
    pub fn apply_settings(&mut self, out: &mut Out<'_>, settings: &VmSettings) {
        if self.settings_known && self.mine(out.host) {
            return;
        }
        self.settings_known = true;
        self.policy_override = settings.policy;
        self.policy = settings.policy.unwrap_or(self.cfg.policy);
        self.tie_override = settings.tie;
        self.tie = settings.tie.unwrap_or(self.cfg.tie);
        self.budget_override =
            settings.vm_restart_limit.is_some() || settings.vm_restart_window_ms.is_some();
        self.budget.limit = settings
            .vm_restart_limit
            .unwrap_or(self.cfg.vm_restart_limit);
        self.budget.window_ms = settings
            .vm_restart_window_ms
            .unwrap_or_else(|| millis(self.cfg.vm_restart_window))
            .max(1);
        let none = AppSettings::default();
        for a in &mut self.apps {
            a.apply_settings(settings.apps.get(&a.name).unwrap_or(&none));
        }
    }

    /// Takes the marks of what changed in persisted data since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        let mut d = std::mem::take(&mut self.dirty);
        for a in &mut self.apps {
            d.merge(std::mem::take(&mut a.dirty));
        }
        d
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
        // An incoming QEMU whose migration has not completed runs nothing.
        let running = if self.incoming_incomplete() {
            self.plan.is_some()
        } else {
            self.run != Run::Stopped
                || self.plan.is_some()
                || matches!(self.state, VmState::Starting | VmState::Restarting)
        };
        let note = self.migration_note.clone();
        let key = (self.state, running, self.revision, note.clone());
        if self.last_report.as_ref() == Some(&key) {
            return;
        }
        self.last_report = Some(key);
        out.reports.push_back((
            self.name.clone(),
            VmReport {
                state: self.state,
                running,
                reason: reason.to_string(),
                revision: self.revision,
                migration: note,
            },
        ));
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

    /// Like `set_app`, but a restart or retry that leaves the app `restarting` is an event too
    /// (every restart taken from the budget and every failed start shows, with its reason).
    fn note_app(&mut self, out: &mut Out<'_>, i: usize, to: AppState, reason: &str) -> bool {
        if self.apps[i].state == to && to == AppState::Restarting {
            self.apps[i].reason = reason.to_string();
            let s = to.as_str();
            out.event(app_ref(&self.name, &self.apps[i].name), s, s, reason);
            return false;
        }
        let changed = self.set_app(out, i, to, reason);
        self.apps[i].reason = reason.to_string();
        changed
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
            self.apps[i].clear_streak();
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
}
