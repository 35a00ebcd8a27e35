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
        migrate: Option<Migration>,
    ) {
        self.revision = revision;
        self.on_migration_record(migrate);
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
        self.cancel_withdrawn(out);
        if now_mine || self.migrating_here(out.host) {
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
        self.incoming = None;
        if self.run == Run::Stopped {
            self.cancel_plan();
            return;
        }
        self.apps_down(out, "lease lost");
        self.set_state(out, VmState::Unknown, "lease lost: self-fencing");
        self.begin(out, Intent::Fence, &[Step::KillVm]);
    }

    pub fn on_observed(&mut self, out: &mut Out<'_>, kind: VmObservation) {
        self.unresponsive = kind == VmObservation::Unresponsive;
        // Any other observation ends "taken as running while it did not answer".
        let answers_again = !self.unresponsive && std::mem::take(&mut self.adopted_unanswered);
        match kind {
            VmObservation::Running | VmObservation::Resumed => {
                if answers_again && self.run == Run::Running && self.plan.is_none() {
                    self.answers_again(out);
                }
                self.found_running(out);
                self.resume(out);
                self.incoming_arrived(out);
            }
            VmObservation::Unresponsive => {
                // QEMU is there but does not answer: whether the VM runs is not known. A VM
                // not known to run here is taken as running (never started twice); otherwise
                // nothing changes, and if its guest stops answering the guest-channel timers
                // decide (on_guest_loss).
                self.found_running(out);
            }
            VmObservation::Paused { reason } if !guest::pause_is_failure(reason) => {
                if self.run == Run::Crashed {
                    return;
                }
                // Adopted paused, or paused while running: it runs, held on purpose.
                self.found_running(out);
                self.hold_paused(out, reason);
                if reason == PauseReason::Migration {
                    // Held by a migration: one this host no longer takes part in is a failure
                    // (see `reconcile_source`).
                    self.reconcile(out);
                }
            }
            VmObservation::Reset => {
                if self.run != Run::Running || self.plan.is_some() {
                    return;
                }
                self.guest_forget(out.now);
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
            VmObservation::Stopped { .. }
            | VmObservation::Panicked
            | VmObservation::Gone
            | VmObservation::Paused { .. } => {
                self.incoming_lost();
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
                self.paused = None;
                if expected {
                    if was_unknown {
                        self.reconcile(out);
                    }
                    return;
                }
                let paused;
                let why = match kind {
                    VmObservation::Stopped { by_guest: true } => "VM shut down by the guest",
                    VmObservation::Stopped { by_guest: false } => "VM stopped unexpectedly",
                    VmObservation::Panicked => "guest panicked",
                    VmObservation::Paused { reason } => {
                        paused = format!("VM {}", guest::pause_text(reason));
                        paused.as_str()
                    }
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

    /// A QEMU adopted as running while it did not answer (`Unresponsive`) answers again,
    /// adopted by the daemon after all: said so, as an event of the VM in the state it keeps
    /// (the reason it was taken as running with is no longer true); nothing else changes.
    fn answers_again(&mut self, out: &mut Out<'_>) {
        let reason = "its QEMU answers again: adopted";
        let state = self.state.as_str();
        out.event(ObjectRef::Vm(self.name.clone()), state, state, reason);
        self.last_report = None;
        self.report(out, reason);
    }

    /// The VM's QEMU is there: a VM not known to run here (not observed yet, or believed
    /// stopped) runs, and is reconciled with ownership.
    fn found_running(&mut self, out: &mut Out<'_>) {
        if self.run == Run::Stopped || self.run == Run::Unknown {
            self.set_run(Run::Running);
            self.next_ping = out.now;
            self.reconcile(out);
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

    pub fn owns_probe(&self, id: ActionId) -> bool {
        self.probe.as_ref().is_some_and(|p| p.id == id)
    }

    /// Whether `id` is an action of this VM still awaited.
    pub fn owns(&self, id: ActionId) -> bool {
        self.owns_probe(id)
            || self.owns_watch(id)
            || self.ping.as_ref().is_some_and(|p| p.id == id)
            || self.apps.iter().any(
                |a| matches!(a.op, Some(AppOp::Start(x, _)) | Some(AppOp::Stop(x, _)) if x == id),
            )
            || matches!(
                self.plan.as_ref().and_then(|p| p.cur),
                Some(Cur::Action(x, _)) if x == id
            )
            || self.owns_migration(id)
    }

    pub(super) fn finish_probe(&mut self) -> Option<Probe> {
        let probe = self.probe.take()?;
        let phase = timers::grid_phase(&self.name);
        for &i in &probe.apps {
            // Never earlier than already planned (a backoff set while the probe ran).
            let interval = millis(self.apps[i].cfg.interval);
            let next =
                timers::next_on_grid(probe.sent, interval, phase).max(self.apps[i].next_probe);
            self.apps[i].next_probe = next;
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
        self.guest_answered(out);
        let mut changed = false;
        let mut any_down = false;
        for (name, outcome) in outcomes {
            let Some(i) = self.apps.iter().position(|a| &a.name == name) else {
                continue;
            };
            if !probe.apps.contains(&i) || !self.apps[i].answered_by(probe.id) {
                continue;
            }
            let before = self.apps[i].state;
            if *outcome != ProbeOutcome::Running {
                any_down = true;
            }
            let (observed, change) = self.apps[i].observe(out.now, *outcome);
            changed |= self.app_event(out, i, change);
            if let Observed::Failed(cause) = observed {
                self.app_failed(out, i, cause);
            }
            changed |= self.apps[i].state != before;
        }
        self.after_watch_probe(out.now, any_down);
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

    pub fn on_action_result(
        &mut self,
        out: &mut Out<'_>,
        id: ActionId,
        result: Result<(), ActionError>,
    ) {
        if self.owns_watch(id) {
            // A watcher answers with a WatchResult; an action result is its failure.
            let error = result.err().unwrap_or(ActionError::GuestUnreachable {
                detail: "watcher ended without a report".into(),
            });
            self.on_watch_failed(out, &error);
            return;
        }
        if self.owns_probe(id) {
            // A probe that could not run (its outcomes come as a ProbeResult).
            let Some(probe) = self.finish_probe() else {
                return;
            };
            match result {
                Ok(()) => {}
                Err(ActionError::ExecBlocked { .. }) => self.exec_refused(out),
                Err(e) => {
                    self.note_hostile(out, &e);
                    self.guest_failed(out, probe.sent);
                }
            }
            return;
        }
        if self.ping.as_ref().is_some_and(|p| p.id == id) {
            self.on_ping_result(out, result);
            return;
        }
        if self.outgoing == Some(id) {
            // A `migrate` answered as a plain action (e.g. no slot for it): no figures.
            let figures = crate::host_io::MigrationFigures {
                total_ms: 0,
                downtime_ms: 0,
            };
            self.on_migrated(out, id, result.map(|()| figures));
            return;
        }
        if self.owns_migration(id) {
            self.on_migration_result(out, id, result.map(|()| None));
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
                self.guest_forget(out.now);
                self.paused = None;
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
                self.guest_forget(out.now);
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
        result: Result<(), ActionError>,
    ) {
        let op = self.apps[i].op.take();
        if op.is_none() {
            return;
        }
        // What the answer says about the guest channel: not the app's business.
        match &result {
            Ok(())
            | Err(ActionError::CommandFailed { .. } | ActionError::CommandTimedOut { .. }) => {
                self.guest_answered(out)
            }
            Err(ActionError::ExecBlocked { .. }) => {}
            Err(_) => self.guest_failed(out, out.now),
        }
        let mut changed = false;
        match (op, result) {
            (Some(AppOp::Stop(_, StopWhy::Plan)), result) => {
                if matches!(result, Err(ActionError::ExecBlocked { .. })) {
                    self.exec_refused(out);
                }
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
            (_, Err(ActionError::ExecBlocked { .. })) => {
                // Blocked is the agent's configuration, not the app's fault: the app is
                // unknown like every other, and the VM is left alone.
                self.exec_refused(out);
                return;
            }
            (Some(AppOp::Start(..)), Ok(())) => {
                self.apps[i].next_probe = out.now;
                self.watch_app_started(i);
            }
            (Some(AppOp::Start(_, why)), Err(e)) => {
                let what = if why == StartWhy::Restart {
                    "restart"
                } else {
                    "start"
                };
                if command_ran(&e) {
                    changed |= self.start_failed(out, i, &format!("{what} command failed: {e}"));
                } else {
                    // The guest channel failed under it (the command may or may not have
                    // run): not the app's fault; the next probe tells.
                    let r = format!("{what} command did not reach the guest: {e}");
                    changed |= self.set_app(out, i, AppState::Unknown, &r);
                    self.apps[i].next_probe = out.now;
                }
            }
            (Some(AppOp::Stop(_, StopWhy::Admin)), Ok(())) => {
                changed |= self.set_app(out, i, AppState::Offline, "stopped by admin");
                self.apps[i].next_probe = out.now.plus(self.apps[i].cfg.interval);
            }
            (Some(AppOp::Stop(_, StopWhy::Admin)), Err(_)) => self.apps[i].next_probe = out.now,
            (None, _) => return,
        }
        self.after_app_changes(out, changed);
    }
}

/// Whether a failed guest command ran in the guest (its failure is the app's), as opposed to
/// a channel or driver failure (nobody knows whether it ran).
fn command_ran(e: &ActionError) -> bool {
    matches!(
        e,
        ActionError::CommandFailed { .. } | ActionError::CommandTimedOut { .. }
    )
}
