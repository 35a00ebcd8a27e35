//! What the VM monitor is told: ownership, lease, hypervisor observations, the guest channel,
//! probe and action results.

use super::*;

impl VmMonitor {
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
            self.dirty.local = true;
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
                    self.set_run(Run::Running);
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
                if let Some(plan) = self.plan.as_mut() {
                    plan.fresh_guest = true;
                }
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
                    self.set_run(Run::Stopped);
                } else if self.run != Run::Stopped {
                    self.set_run(Run::Crashed);
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

    pub(super) fn cancel_stops(&mut self) {
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

    pub(super) fn finish_probe(&mut self) -> Option<Probe> {
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

    pub(super) fn after_app_changes(&mut self, out: &mut Out<'_>, changed: bool) {
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
    pub(super) fn apps_unprobeable(&mut self, out: &mut Out<'_>) {
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
                self.set_run(Run::Stopped);
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
                if let Some(plan) = self.plan.as_mut() {
                    plan.fresh_guest = true;
                }
                self.set_run(Run::Running);
                self.guest_up = None;
                self.exec_blocked = false;
                self.guest_down_since = None;
                self.guest_lost = false;
                self.paused = false;
                self.advance(out);
            }
            (Step::StartVm, Err(e)) => {
                self.set_run(Run::Crashed);
                self.plan = None;
                self.dirty.local = true;
                self.vm_failed(out, &format!("VM start failed: {e}"));
            }
            _ => {}
        }
    }

    pub(super) fn on_app_result(
        &mut self,
        out: &mut Out<'_>,
        i: usize,
        result: Result<(), String>,
    ) {
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
}
