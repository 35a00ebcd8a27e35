//! App ordering inside a VM (SPEC §4.5): apps start when everything they require is online,
//! and stop in reverse dependency order.

use super::*;

impl VmMonitor {
    pub(super) fn stops_done(&self) -> bool {
        !self.to_stop.iter().any(|s| *s)
            && !self
                .apps
                .iter()
                .any(|a| matches!(a.op, Some(AppOp::Stop(_, StopWhy::Plan))))
    }

    /// Every app's start has settled: none pending or in flight, none `starting` or
    /// `restarting` — except an app waiting out the backoff after a failed start (a VM start
    /// plan does not wait for its retries).
    pub(super) fn starts_done(&self) -> bool {
        !self.apps.iter().any(|a| {
            a.pending.is_some()
                || matches!(a.op, Some(AppOp::Start(..)))
                || (matches!(a.state, AppState::Starting | AppState::Restarting)
                    && !a.awaits_retry())
        })
    }

    /// Stops, in reverse dependency order, every app marked to stop whose dependents are done.
    pub(super) fn drive_stops(&mut self, out: &mut Out<'_>) {
        if self.frozen {
            return;
        }
        loop {
            let mut progress = false;
            for i in 0..self.apps.len() {
                if !self.to_stop[i] {
                    continue;
                }
                let blocked = self.dependents[i]
                    .iter()
                    .any(|&d| self.to_stop[d] || matches!(self.apps[d].op, Some(AppOp::Stop(..))));
                if blocked {
                    continue;
                }
                self.to_stop[i] = false;
                progress = true;
                if let Some(argv) = self.apps[i].cfg.stop.clone() {
                    let id = out.act(
                        HostActionKind::StopApp {
                            vm: self.name.clone(),
                            app: self.apps[i].name.clone(),
                            argv,
                        },
                        format!(
                            "{}: stop apps in reverse dependency order",
                            self.intent_text()
                        ),
                    );
                    self.apps[i].begin(AppOp::Stop(id, StopWhy::Plan));
                    self.set_app(out, i, AppState::Stopping, "stopping before the VM stops");
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Starts every pending app whose requirements are online; settles apps whose
    /// requirements cannot come online.
    pub(super) fn drive_pending(&mut self, out: &mut Out<'_>) {
        if self.frozen {
            return;
        }
        for i in 0..self.apps.len() {
            let Some(why) = self.apps[i].pending else {
                continue;
            };
            let mut waiting = Vec::new();
            let mut offline = Vec::new();
            let mut broken = Vec::new();
            for &r in &self.requires[i] {
                let a = &self.apps[r];
                match a.state {
                    AppState::Online => {}
                    // Unknown because the guest channel failed: not broken, wait for it.
                    AppState::Unknown if self.guest_up == Some(false) => {
                        waiting.push(a.name.to_string())
                    }
                    AppState::Offline => offline.push(a.name.to_string()),
                    AppState::Faulted | AppState::Unknown => {
                        broken.push(format!("{} ({})", a.name, a.state))
                    }
                    AppState::Starting | AppState::Restarting | AppState::Stopping => {
                        waiting.push(a.name.to_string())
                    }
                }
            }
            let verb = if why == StartWhy::Restart {
                "restart"
            } else {
                "start"
            };
            if !offline.is_empty() {
                self.apps[i].pending = None;
                let r = format!(
                    "not started: requires {} which is intentionally offline",
                    offline.join(", ")
                );
                self.set_app(out, i, AppState::Offline, &r);
            } else if !broken.is_empty() {
                self.apps[i].pending = None;
                let r = format!("cannot {verb}: requires {}", broken.join(", "));
                self.fault_app(out, i, FaultKind::Retry, &r);
            } else if !waiting.is_empty() {
                let to = if why == StartWhy::Restart {
                    AppState::Restarting
                } else {
                    AppState::Starting
                };
                let r = format!("{verb} waits for {}", waiting.join(", "));
                self.set_app(out, i, to, &r);
            } else {
                self.apps[i].pending = None;
                let waits = format!("{verb} waits for ");
                let reason = if self.apps[i].reason.starts_with(&waits) {
                    let names: Vec<&str> = self.requires[i]
                        .iter()
                        .map(|&r| self.apps[r].name.as_str())
                        .collect();
                    format!("{} online", names.join(", "))
                } else {
                    self.apps[i].reason.clone()
                };
                self.start_app(out, i, why, &reason);
            }
        }
    }

    /// Issues the start of app `i` (a restart takes one unit of its budget, or faults it).
    pub(super) fn start_app(&mut self, out: &mut Out<'_>, i: usize, why: StartWhy, cause: &str) {
        let now = out.now;
        let (to, reason) = match why {
            StartWhy::Restart => {
                self.dirty.local = true;
                if !self.apps[i].budget.try_take(now) {
                    let r = format!(
                        "{cause}; restart budget {} spent",
                        self.apps[i].budget.describe(now)
                    );
                    self.fault_app(out, i, FaultKind::Sticky, &r);
                    return;
                }
                (
                    AppState::Restarting,
                    format!("{cause}; restart {}", self.apps[i].budget.describe(now)),
                )
            }
            StartWhy::Boot => (
                AppState::Starting,
                "starting (requirements online)".to_string(),
            ),
            StartWhy::Admin => (AppState::Starting, "started by admin".to_string()),
        };
        let id = out.act(
            HostActionKind::StartApp {
                vm: self.name.clone(),
                app: self.apps[i].name.clone(),
                argv: self.apps[i].cfg.start.clone(),
            },
            reason.clone(),
        );
        self.apps[i].begin(AppOp::Start(id, why));
        self.note_app(out, i, to, &reason);
    }

    /// A start command of app `i` ran and failed. With restart budget left the app stays (or
    /// becomes) `restarting` and is probed again after its backoff — a probe that finds it
    /// down restarts it, taking one unit of the budget; with the budget spent it is `faulted`
    /// (the decision agent weighs it). Returns whether the app's state changed.
    pub(super) fn start_failed(&mut self, out: &mut Out<'_>, i: usize, cause: &str) -> bool {
        let now = out.now;
        let budget = self.apps[i].budget.describe(now);
        if self.apps[i].budget.used(now) >= self.apps[i].budget.limit {
            let r = format!("{cause}; restart budget {budget} spent");
            return self.fault_app(out, i, FaultKind::Sticky, &r);
        }
        // Counted before the state is set: entering `restarting` keeps the count.
        let backoff = self.apps[i].start_failed_backoff();
        self.apps[i].next_probe = now.plus_ms(backoff);
        let r = format!("{cause}; retry in {} (restart {budget})", human(backoff));
        self.note_app(out, i, AppState::Restarting, &r)
    }
}
