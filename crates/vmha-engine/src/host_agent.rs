//! The host agent: one per host. It holds the VM monitor, the app monitors and the decision
//! agent of every VM group this host may run, and is driven like a sans-IO state machine:
//!
//! 1. feed inputs ([`HostAgent::handle_input`]), records of the cluster store
//!    ([`HostAgent::handle_record`]), admin commands ([`HostAgent::command`]) and timeouts
//!    ([`HostAgent::handle_timeout`] once [`HostAgent::poll_timeout`] is reached);
//! 2. drain [`HostAgent::poll_action`], [`HostAgent::poll_event`] and [`HostAgent::poll_report`];
//! 3. persist what [`HostAgent::take_dirty`] names ([`HostAgent::state`], settings per VM).
//!
//! [`crate::Node`] does all of this for a daemon or the simulator.
//!
//! Same inputs at the same times → same actions and events, always.

use std::collections::VecDeque;
use std::sync::Arc;

use vmha_model::{Config, Name};

use crate::command::{AdminCommand, CommandError};
use crate::event::Event;
use crate::host_io::VmReport;
use crate::host_io::{HostAction, HostInput};
use crate::persist::HostAgentState;
use crate::records::{Record, VmSettings};
use crate::status::HostStatus;
use crate::time::Timestamp;
use crate::vm_monitor::{Out, VmMonitor};

/// Why a host agent could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostAgentError {
    /// The host is not in the configuration.
    #[error("host `{0}` is not in the configuration")]
    UnknownHost(Name),
}

/// The agents of one host (see the module documentation for the driving protocol).
#[derive(Debug, Clone)]
pub struct HostAgent {
    config: Arc<Config>,
    host: Name,
    vms: Vec<VmMonitor>,
    lease_live: bool,
    next_id: u64,
    now: Timestamp,
    actions: VecDeque<HostAction>,
    events: VecDeque<Event>,
    reports: VecDeque<(Name, VmReport)>,
}

/// What changed in a host agent's persisted data since the last [`HostAgent::take_dirty`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentDirty {
    /// The host-local state ([`HostAgent::state`]).
    pub local: bool,
    /// VMs whose run-time settings ([`HostAgent::settings`]) changed here.
    pub settings: Vec<Name>,
}

impl HostAgent {
    /// Creates the agent of `host`, restoring budget counters, faults on this host and plans
    /// from `restored` (entries for VMs and apps no longer configured are ignored). Every VM
    /// starts in state `unknown`; nothing is started or stopped before the VM's ownership
    /// ([`Record::Owner`]), a [`HostInput::VmObserved`] and a live [`HostInput::Lease`] arrive.
    pub fn new(
        config: Arc<Config>,
        host: Name,
        restored: Option<HostAgentState>,
        now: Timestamp,
    ) -> Result<HostAgent, HostAgentError> {
        if config.host(host.as_str()).is_none() {
            return Err(HostAgentError::UnknownHost(host));
        }
        let restored = restored.unwrap_or_default();
        let vms: Vec<VmMonitor> = config
            .vms
            .iter()
            .filter(|v| v.hosts.contains(&host))
            .map(|v| VmMonitor::new(v, restored.vms.get(&v.name), now))
            .collect();
        Ok(HostAgent {
            config,
            host,
            vms,
            lease_live: false,
            next_id: 0,
            now,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            reports: VecDeque::new(),
        })
    }

    /// Whether this host's lease is live, as last told.
    pub fn lease_live(&self) -> bool {
        self.lease_live
    }

    /// This host's name.
    pub fn host(&self) -> &Name {
        &self.host
    }

    /// The configuration the agent runs.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    fn with_vm<R>(
        &mut self,
        now: Timestamp,
        i: usize,
        f: impl FnOnce(&mut VmMonitor, &mut Out<'_>) -> R,
    ) -> R {
        self.now = self.now.max(now);
        let mut out = Out {
            now: self.now,
            host: &self.host,
            lease_live: self.lease_live,
            actions: &mut self.actions,
            events: &mut self.events,
            reports: &mut self.reports,
            next_id: &mut self.next_id,
        };
        f(&mut self.vms[i], &mut out)
    }

    fn vm_index(&self, vm: &Name) -> Option<usize> {
        self.vms.iter().position(|v| &v.name == vm)
    }

    /// Feeds one input observed at `now`. Inputs about unknown VMs, unknown apps or stale
    /// action ids are ignored.
    pub fn handle_input(&mut self, now: Timestamp, input: HostInput) {
        match input {
            HostInput::Lease { live } => {
                if self.lease_live == live {
                    return;
                }
                self.lease_live = live;
                for i in 0..self.vms.len() {
                    self.with_vm(now, i, |v, out| v.on_lease(out));
                }
            }
            HostInput::ProbeResult { id, vm, outcomes } => {
                if let Some(i) = self.vm_index(&vm) {
                    self.with_vm(now, i, |v, out| v.on_probe_result(out, id, &outcomes));
                }
            }
            HostInput::WatchResult { id, vm, report } => {
                if let Some(i) = self.vm_index(&vm) {
                    self.with_vm(now, i, |v, out| v.on_watch_result(out, id, &report));
                }
            }
            HostInput::ActionResult { id, result } => {
                if let Some(i) = self.vms.iter().position(|v| v.owns(id)) {
                    self.with_vm(now, i, |v, out| v.on_action_result(out, id, result));
                }
            }
            HostInput::IncomingResult { id, result } => {
                if let Some(i) = self.vms.iter().position(|v| v.owns(id)) {
                    self.with_vm(now, i, |v, out| {
                        v.on_migration_result(out, id, result.map(Some))
                    });
                }
            }
            HostInput::MigrationResult { id, result } => {
                if let Some(i) = self.vms.iter().position(|v| v.owns(id)) {
                    self.with_vm(now, i, |v, out| v.on_migrated(out, id, result));
                }
            }
            HostInput::VmObserved { vm, kind } => {
                if let Some(i) = self.vm_index(&vm) {
                    self.with_vm(now, i, |v, out| v.on_observed(out, kind));
                }
            }
        }
    }

    /// Applies a record of the cluster store that concerns this host's VM groups (ownership,
    /// admin record, run-time settings); other records are ignored.
    pub fn handle_record(&mut self, now: Timestamp, record: &Record) {
        match record {
            Record::Owner {
                vm,
                record,
                revision,
            } => {
                if let Some(i) = self.vm_index(vm) {
                    let owner = record.as_ref().and_then(|r| r.owner.clone());
                    let desired = record.as_ref().map_or(crate::Desired::Run, |r| r.desired);
                    let migrate = record.as_ref().and_then(|r| r.migrate.clone());
                    let revision = *revision;
                    self.with_vm(now, i, |v, out| {
                        v.on_ownership(out, owner, desired, revision, migrate)
                    });
                }
            }
            Record::Admin { vm, admin } => {
                if let Some(i) = self.vm_index(vm) {
                    let admin = admin.clone().unwrap_or_default();
                    self.with_vm(now, i, |v, out| v.on_admin(out, &admin));
                }
            }
            Record::Settings { vm, settings } => {
                if let Some(i) = self.vm_index(vm) {
                    let settings = settings.clone().unwrap_or_default();
                    self.with_vm(now, i, |v, out| v.apply_settings(out, &settings));
                }
            }
            _ => {}
        }
    }

    /// Applies an admin command routed to this host ([`crate::Route::OwnerHost`]). On `Err`
    /// nothing changed.
    pub fn command(&mut self, now: Timestamp, cmd: AdminCommand) -> Result<(), CommandError> {
        use AdminCommand as C;
        cmd.check_values()?;
        if cmd.route() == crate::Route::Controller {
            return Err(CommandError::WrongReceiver(
                "cluster controller".to_string(),
            ));
        }
        let Some(vm) = cmd.vm().cloned() else {
            return Err(CommandError::WrongReceiver(
                "cluster controller".to_string(),
            ));
        };
        let Some(i) = self.vm_index(&vm) else {
            return Err(if self.config.vm(vm.as_str()).is_some() {
                CommandError::NotOwner {
                    vm,
                    host: self.host.clone(),
                }
            } else {
                CommandError::UnknownVm(vm)
            });
        };
        let host = self.host.clone();
        let before = self.now;
        let result = self.with_vm(now, i, |v, out| {
            {
                {
                    v.check_owner(&host)?;
                    match cmd {
                        C::AppOffline {
                            app, auto_clear, ..
                        } => v.app_offline(out, &app, auto_clear)?,
                        C::AppOnline { app, .. } => v.app_online(out, &app)?,
                        C::AppStart { app, .. } => v.app_start(out, &app)?,
                        C::AppStop { app, .. } => v.app_stop(out, &app)?,
                        C::VmRestart { .. } => v.vm_restart(out)?,
                        C::SetPriority { app, priority, .. } => {
                            v.set_priority(out, &app, priority)?
                        }
                        C::SetAppBudget {
                            app,
                            restart_limit,
                            restart_window_ms,
                            ..
                        } => v.set_app_budget(&app, restart_limit, restart_window_ms)?,
                        C::SetVmBudget {
                            vm_restart_limit,
                            vm_restart_window_ms,
                            ..
                        } => v.set_vm_budget(vm_restart_limit, vm_restart_window_ms),
                        C::SetPolicy { policy, tie, .. } => v.set_policy(out, policy, tie),
                        _ => {
                            return Err(CommandError::WrongReceiver(
                                "cluster controller".to_string(),
                            ));
                        }
                    }
                }
            }
            Ok(())
        });
        if result.is_err() {
            // Refused: not even the clock moved.
            self.now = before;
        }
        result
    }

    /// Call when `now` has reached [`HostAgent::poll_timeout`] (calling earlier or later is
    /// harmless: due work is done, nothing else).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        for i in 0..self.vms.len() {
            self.with_vm(now, i, |v, out| v.on_timeout(out));
        }
    }

    /// The earliest time the agent needs [`HostAgent::handle_timeout`], if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.vms.iter().filter_map(VmMonitor::poll_timeout).min()
    }

    /// The next action to perform, in the order decided.
    pub fn poll_action(&mut self) -> Option<HostAction> {
        self.actions.pop_front()
    }

    /// The next event, in the order of the state changes.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A view of every VM group and app on this host (budget counts as of the latest `now`).
    pub fn status(&self) -> HostStatus {
        HostStatus {
            host: self.host.clone(),
            vms: self.vms.iter().map(|v| v.status(self.now)).collect(),
        }
    }

    /// The next report for the cluster store (latest state of a VM group on this host).
    pub fn poll_report(&mut self) -> Option<(Name, VmReport)> {
        self.reports.pop_front()
    }

    /// The persistent, host-local state (see [`HostAgentState`]).
    pub fn state(&self) -> HostAgentState {
        HostAgentState {
            vms: self
                .vms
                .iter()
                .map(|v| (v.name.clone(), v.local()))
                .filter(|(_, l)| !l.is_empty())
                .collect(),
        }
    }

    /// The run-time settings of a VM group this host may run.
    pub fn settings(&self, vm: &Name) -> Option<VmSettings> {
        self.vm_index(vm).map(|i| self.vms[i].settings())
    }

    /// What changed in persisted data since the last call (the marks are reset). Every change
    /// marks it where it happens; nothing compares whole states.
    pub fn take_dirty(&mut self) -> AgentDirty {
        let mut dirty = AgentDirty::default();
        for v in &mut self.vms {
            let d = v.take_dirty();
            dirty.local |= d.local;
            if d.settings {
                dirty.settings.push(v.name.clone());
            }
        }
        dirty
    }
}
