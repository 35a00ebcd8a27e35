//! Admin commands applied by the owner host's VM monitor (SPEC §4.7).

use super::*;

impl VmMonitor {
    /// Marks the run-time settings changed here (the owner writes them; it keeps its own).
    fn settings_changed(&mut self) {
        self.dirty.settings = true;
        self.settings_known = true;
    }

    /// Applies the group's admin record: freeze / unfreeze, and a new `clear` generation
    /// (each generation is applied once per host, also across restarts).
    pub fn on_admin(&mut self, out: &mut Out<'_>, admin: &VmAdmin) {
        if admin.clear > self.clear_seen {
            self.clear_seen = admin.clear;
            self.dirty.local = true;
            self.clear(out);
        }
        self.freeze(admin.frozen, out);
    }

    pub(super) fn app_index(&self, app: &Name) -> Result<usize, CommandError> {
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

    pub(super) fn check_acting(&self) -> Result<(), CommandError> {
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
        self.settings_changed();
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
        self.settings_changed();
        self.apps[i].next_probe = out.now;
        Ok(())
    }

    /// Refuses an admin operation on app `i` while another operation on it is in flight.
    pub(super) fn app_idle(&self, i: usize) -> Result<(), CommandError> {
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
        self.settings_changed();
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
        self.settings_changed();
        self.apps[i].pending = None;
        let id = out.act(
            HostActionKind::StopApp {
                vm: self.name.clone(),
                app: app.clone(),
                argv,
            },
            "stopped by admin",
        );
        self.apps[i].begin(AppOp::Stop(id, StopWhy::Admin));
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

    fn freeze(&mut self, on: bool, out: &mut Out<'_>) {
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

    fn clear(&mut self, out: &mut Out<'_>) {
        self.budget.reset();
        self.fault = None;
        self.dirty.local = true;
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
        // In range: checked by `AdminCommand::check_values` before the command got here.
        let i = self.app_index(app)?;
        self.apps[i].priority = priority;
        self.apps[i].priority_override = Some(priority);
        self.settings_changed();
        self.decide(out);
        Ok(())
    }

    pub fn set_app_budget(
        &mut self,
        app: &Name,
        limit: u32,
        window_ms: u64,
    ) -> Result<(), CommandError> {
        // In range: checked by `AdminCommand::check_values` before the command got here.
        let i = self.app_index(app)?;
        self.apps[i].budget.limit = limit;
        self.apps[i].budget.window_ms = window_ms;
        self.apps[i].budget_override = true;
        self.settings_changed();
        Ok(())
    }

    pub fn set_vm_budget(&mut self, limit: u32, window_ms: u64) {
        // In range: checked by `AdminCommand::check_values` before the command got here.
        self.budget.limit = limit;
        self.budget.window_ms = window_ms;
        self.budget_override = true;
        self.settings_changed();
    }

    pub fn set_policy(&mut self, out: &mut Out<'_>, policy: Policy, tie: Option<Tie>) {
        self.policy = policy;
        self.policy_override = Some(policy);
        if let Some(t) = tie {
            self.tie = t;
            self.tie_override = Some(t);
        }
        self.settings_changed();
        self.decide(out);
    }
}
