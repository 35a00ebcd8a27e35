//! Level-triggered reconcile: bring the VM in line with ownership and desired state whenever
//! no plan runs.

use super::*;

impl VmMonitor {
    /// Records a VM found running on this host without a plan as online and probes its apps
    /// at once (no-op unless its state is still `unknown` or `offline`).
    pub(super) fn adopt(&mut self, out: &mut Out<'_>, reason: &str) {
        if matches!(self.state, VmState::Unknown | VmState::Offline) {
            for a in &mut self.apps {
                a.next_probe = out.now;
            }
            match self.paused {
                Some((why, _)) => {
                    let r = format!(
                        "{reason}; {}: probes and guest-loss timers suspended until it resumes",
                        guest::pause_text(why)
                    );
                    self.set_state(out, VmState::Online, &r);
                }
                None => self.set_state(out, VmState::Online, reason),
            }
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
        if !mine {
            // Whether it ran here before says nothing once another host (or none) owns it.
            self.restored_running = false;
            if self.reconcile_target(out) {
                return;
            }
        } else if self.reconcile_source(out) {
            return;
        }
        if mine && self.desired == Some(Desired::Run) {
            match self.run {
                Run::Stopped | Run::Crashed => {
                    if self.fault.is_some() {
                        return;
                    }
                    if std::mem::take(&mut self.restored_running) && !self.restored_restart {
                        // It ran here when the daemon last saved its state, and it does not
                        // run now: it failed while nobody watched (a restart, counted).
                        self.dirty.local = true;
                        self.restart_or_fault(
                            out,
                            "VM found not running when vmhad started (it ran before)",
                            true,
                        );
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
                    self.restored_running = false;
                    if self.restored_restart {
                        self.set_state(
                            out,
                            VmState::Restarting,
                            "resuming the restart in progress",
                        );
                        self.begin(out, Intent::Restart, &[Step::WaitGuest, Step::StartApps]);
                    } else if self.unresponsive {
                        self.adopted_unanswered = true;
                        self.adopt(
                            out,
                            "a QEMU of this VM runs here but does not answer: taken as running \
                             (never started twice) until the guest channel decides",
                        );
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
            Some(other) if std::mem::take(&mut self.outgoing_sent) => {
                let r = format!(
                    "migrated live to {other}, which owns it now: killing the paused QEMU here"
                );
                self.set_state(out, VmState::Stopping, &r);
                self.begin(out, Intent::Release, &[Step::KillVm]);
            }
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
}
