//! Timers of the VM monitor: probe schedule, plan deadlines, guest pings, guest-channel loss.
//!
//! Probe schedule (SPEC §4.1, one guest round trip per VM per interval): the apps of a VM
//! are probed on one grid per VM, `phase + k × interval` (the phase spreads VMs over the
//! second, the same for all apps of a VM, so apps with intervals that divide each other
//! meet). After a probe, an app is next probed at the grid point nearest to one interval
//! later (so once, after a start or a backoff, a gap can be as short as half an interval);
//! a probe takes every eligible app due within [`BATCH_WINDOW_MS`] (at most a quarter of
//! its interval) of now.

use super::*;

/// Apps due within this many ms of a probe go with it (at most a quarter of their interval).
pub const BATCH_WINDOW_MS: u64 = 250;

/// The phase of a VM's probe grid in ms (0..1000), a stable hash of its name.
pub(super) fn grid_phase(vm: &Name) -> u64 {
    // FNV-1a: stable across builds and platforms (the std hasher is not promised to be).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % 1000
}

/// The grid point `phase + k × interval_ms` nearest to `sent + interval_ms`: always after
/// `sent` (at least half an interval later).
pub(super) fn next_on_grid(sent: Timestamp, interval_ms: u64, phase: u64) -> Timestamp {
    let target = sent.0.saturating_add(interval_ms);
    if interval_ms == 0 {
        return Timestamp(target);
    }
    let rel = i128::from(target) - i128::from(phase % interval_ms);
    let i = i128::from(interval_ms);
    let k = (rel + i / 2).div_euclid(i);
    let next = i128::from(phase % interval_ms) + k * i;
    Timestamp(
        u64::try_from(next)
            .unwrap_or(target)
            .max(sent.0.saturating_add(1)),
    )
}

/// How early an app with this interval may be probed to join a batch.
fn batch_window(interval_ms: u64) -> u64 {
    BATCH_WINDOW_MS.min(interval_ms / 4)
}

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
        if let Some(x) = self.watch_due() {
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
            let eligible = |i: &usize| self.apps[*i].probe_eligible();
            let any_due = (0..self.apps.len())
                .filter(eligible)
                .any(|i| self.apps[i].next_probe <= now);
            let due: Vec<usize> = (0..self.apps.len())
                .filter(eligible)
                .filter(|&i| {
                    let window = batch_window(millis(self.apps[i].cfg.interval));
                    self.apps[i].next_probe <= now.plus_ms(window)
                })
                .collect();
            if any_due {
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
        self.arm_watch(out);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn grid_points_are_nearest_to_one_interval_later() {
        // Phase 300, interval 1 s: grid 300, 1300, 2300…
        assert_eq!(next_on_grid(Timestamp(300), 1000, 300), Timestamp(1300));
        assert_eq!(next_on_grid(Timestamp(700), 1000, 300), Timestamp(1300));
        assert_eq!(next_on_grid(Timestamp(850), 1000, 300), Timestamp(2300));
        // Intervals that divide each other meet on the same points.
        assert_eq!(next_on_grid(Timestamp(1300), 5000, 300), Timestamp(5300));
        // Small times and zero intervals stay sane.
        assert_eq!(next_on_grid(Timestamp(0), 1000, 999), Timestamp(999));
        assert_eq!(next_on_grid(Timestamp(5), 0, 3), Timestamp(5));
        assert_eq!(next_on_grid(Timestamp(0), 1, 0), Timestamp(1));
        assert_eq!(
            next_on_grid(Timestamp(u64::MAX - 10), 1000, 5),
            Timestamp(u64::MAX)
        );
    }

    #[test]
    fn the_phase_is_stable_and_spread() {
        let a = grid_phase(&Name::new("shop").unwrap());
        assert_eq!(a, grid_phase(&Name::new("shop").unwrap()));
        assert!(a < 1000);
        assert_ne!(a, grid_phase(&Name::new("billing").unwrap()));
    }

    #[test]
    fn the_batch_window_is_at_most_a_quarter_interval() {
        assert_eq!(batch_window(1000), 250);
        assert_eq!(batch_window(10_000), BATCH_WINDOW_MS);
        assert_eq!(batch_window(200), 50);
    }
}
