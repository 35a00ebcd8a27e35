//! The VM monitor's view for `vmha status` and `vmha explain`.

use super::*;

impl VmMonitor {
    pub fn status(&self, now: Timestamp) -> VmStatus {
        VmStatus {
            name: self.name.clone(),
            state: self.state,
            owner: self.owner.clone().flatten(),
            desired: self.desired,
            frozen: self.frozen,
            paused: self.paused.is_some(),
            pause_reason: self.paused.map(|(r, _)| r),
            qemu_unresponsive: self.unresponsive,
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
