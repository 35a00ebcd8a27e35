//! Restart plans of the VM monitor: ordered steps (stop apps, stop or kill the VM, start it,
//! wait for the guest channel, start apps), failures, and the decision agent's verdicts.

use super::*;

impl VmMonitor {
    // ----- plans ---------------------------------------------------------------------------

    pub(super) fn begin(&mut self, out: &mut Out<'_>, intent: Intent, steps: &[Step]) {
        self.cancel_plan();
        self.dirty.local = true;
        self.plan = Some(Plan {
            fresh_guest: false,
            intent,
            steps: steps.iter().copied().collect(),
            cur: None,
        });
        self.advance(out);
    }

    /// Drops the plan in flight; results of its actions will be ignored. A VM whose start was
    /// in flight may be running: it is treated as needing a kill.
    pub(super) fn cancel_plan(&mut self) {
        self.dirty.local |= self.plan.is_some();
        if let Some(plan) = self.plan.take()
            && let Some(Cur::Action(_, Step::StartVm)) = plan.cur
        {
            self.set_run(Run::Crashed);
        }
        for a in &mut self.apps {
            if matches!(a.op, Some(AppOp::Stop(_, StopWhy::Plan))) {
                a.op = None;
            }
        }
        self.to_stop.iter_mut().for_each(|s| *s = false);
    }

    pub(super) fn start_steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.run == Run::Crashed {
            steps.push(Step::KillVm);
        }
        steps.extend([Step::StartVm, Step::WaitGuest, Step::StartApps]);
        steps
    }

    pub(super) fn advance(&mut self, out: &mut Out<'_>) {
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
    pub(super) fn begin_step(&mut self, out: &mut Out<'_>, step: Step) -> Option<Cur> {
        let vm = self.name.clone();
        match step {
            Step::StopApps => {
                // Nothing can be run in the guest: no channel, exec blocked, or vCPUs held.
                if self.run != Run::Running
                    || self.guest_up != Some(true)
                    || self.exec_blocked
                    || self.paused.is_some()
                {
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
                let fresh = self.plan.as_ref().is_some_and(|p| p.fresh_guest);
                for i in 0..self.apps.len() {
                    self.apps[i].op = None;
                    self.apps[i].clear_streak();
                    if fresh {
                        // A fresh guest re-arms the in-guest restart budget.
                        self.apps[i].budget.reset();
                        self.dirty.local = true;
                    }
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

    pub(super) fn intent_text(&self) -> &'static str {
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

    pub(super) fn finish_plan(&mut self, out: &mut Out<'_>) {
        let Some(plan) = self.plan.take() else {
            return;
        };
        self.restored_restart = false;
        self.dirty.local = true;
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

    // ----- failures and decisions ------------------------------------------------------------

    /// The VM failed (stopped, crashed, never brought its guest up, lost its guest).
    pub(super) fn vm_failed(&mut self, out: &mut Out<'_>, why: &str) {
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
    pub(super) fn restart_or_fault(&mut self, out: &mut Out<'_>, why: &str, crashed: bool) {
        let now = out.now;
        self.dirty.local = true;
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
    pub(super) fn decide(&mut self, out: &mut Out<'_>) {
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
    pub(super) fn app_failed(&mut self, out: &mut Out<'_>, i: usize, cause: String) {
        if self.frozen {
            let r = format!("{cause}; frozen: no restart");
            self.fault_app(out, i, FaultKind::Retry, &r);
            return;
        }
        self.apps[i].reason = cause;
        self.apps[i].pending = Some(StartWhy::Restart);
        self.drive_pending(out);
    }
}
