//! Timers of the VM monitor: probe schedule, plan deadlines, guest pings, guest-channel loss.

use super::*;

impl VmMonitor {
    // ----- timers ----------------------------------------------------------------------------

    /// No plan, or a plan waiting for its apps to start: apps are probed, the guest watched.
    pub(super) fn monitoring(&self) -> bool {
        matches!(
            self.plan.as_ref().map(|p| p.cur),
            None | Some(Some(Cur::Open(Step::StartApps)))
        )
    }

    pub(super) fn probing(&self) -> bool {
        self.run == Run::Running
            && self.paused.is_none()
            && !self.exec_blocked
            && self.probe.is_none()
            && self.monitoring()
    }

    pub(super) fn guest_deadline(&self) -> Option<Timestamp> {
        if self.run != Run::Running || self.guest_lost || self.paused.is_some() {
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
        if let Some((x, _)) = self.plan_deadline() {
            consider(x);
        }
        if let Some(x) = self.guest_deadline() {
            consider(x);
        }
        if let Some(x) = self.ping_due() {
            consider(x);
        }
        t
    }

    /// The deadline of the plan's step; waiting for the guest is suspended while the VM is
    /// paused on purpose.
    fn plan_deadline(&self) -> Option<(Timestamp, Step)> {
        match self.plan.as_ref().and_then(|p| p.cur) {
            Some(Cur::Until(_, Step::WaitGuest)) if self.paused.is_some() => None,
            Some(Cur::Until(t, step)) => Some((t, step)),
            _ => None,
        }
    }

    pub fn on_timeout(&mut self, out: &mut Out<'_>) {
        let now = out.now;
        if let Some((t, step)) = self.plan_deadline()
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
                        self.set_run(Run::Crashed);
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
            self.next_ping = now.plus_ms(guest::PING_UP_MS);
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
        if self.ping_due().is_some_and(|t| t <= now) {
            self.send_ping(out);
        }
    }
}
