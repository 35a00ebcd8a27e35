//! The app monitor (SPEC §4.1, the patent's "application monitoring agent"): one per app of a
//! VM on this host. It turns probe outcomes into app states, decides whether a failed app may
//! be restarted in the guest (its restart budget) and reports `faulted` apps to the decision
//! agent. Dependency gating (`requires`) is the VM monitor's job: it sees all apps of a VM.
//!
//! Rules, exactly as SPEC §4.1:
//! - running → `online` (an `offline` flag with auto-clear is cleared once the app runs again
//!   after being seen down);
//! - not running and flagged offline → `offline`, no action;
//! - not running, not flagged → failed: restart within `restart_limit` per `restart_window`
//!   (state `restarting`, probe again), else `faulted`;
//! - a start command that ran and failed, with restart budget left → still `restarting`, probed
//!   again after a backoff (the probe interval, doubling with each failed start in a row, capped
//!   at [`BACKOFF_CAP_MS`] or the interval if longer); the probe that finds it down restarts it,
//!   taking one unit of the budget. With the budget spent → `faulted`: only then does the
//!   decision agent weigh it;
//! - online for `stable_after` → the restart counter resets;
//! - a timeout counts as a failure only after `probe_failures` consecutive timeouts; an answer
//!   that cannot be read or trusted counts like a timeout, with its own reason.

use vmha_model::{App, AppState, Name};

use crate::budget::Budget;
use crate::host_io::{ProbeOutcome, Unreadable};
use crate::ids::ActionId;
use crate::persist::Dirty;
use crate::records::AppSettings;
use crate::status::{AppStatus, OfflineFlag};
use crate::time::{Timestamp, millis};

/// The longest backoff between failed starts of an app, unless its probe interval is longer.
pub const BACKOFF_CAP_MS: u64 = 60_000;

/// Why an app is being started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartWhy {
    /// After a failure, within the restart budget (state `restarting`).
    Restart,
    /// After the VM (re)started (state `starting`).
    Boot,
    /// An admin asked (state `starting`).
    Admin,
}

/// Why an app is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopWhy {
    /// Part of a VM stop plan.
    Plan,
    /// An admin asked (the offline flag is set).
    Admin,
}

/// An operation in the guest in flight for this app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppOp {
    Start(ActionId, StartWhy),
    Stop(ActionId, StopWhy),
}

/// How a `faulted` state came about: a spent budget is sticky while it is spent (waits for a
/// restart to leave the window, a clear, a VM restart or the app coming back by itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// Restart budget spent (by restarts, or by a last start that failed).
    Sticky,
    /// Could not be restarted because a required app is down, or the group is frozen: retried
    /// on the next failed probe.
    Retry,
}

/// What a probe outcome means for the VM monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Observed {
    /// Nothing to do (state may have changed; see the returned change).
    Settled,
    /// The app failed and is not flagged offline: the VM monitor decides how to restart it.
    Failed(String),
}

/// One app monitor.
#[derive(Debug, Clone)]
pub(crate) struct AppMonitor {
    pub name: Name,
    pub cfg: App,
    pub priority: u32,
    pub priority_override: Option<u32>,
    pub state: AppState,
    pub offline: Option<OfflineFlag>,
    pub budget: Budget,
    pub budget_override: bool,
    pub fault: Option<FaultKind>,
    pub online_since: Option<Timestamp>,
    /// Consecutive probes without a usable answer (timed out or unreadable).
    pub timeouts: u32,
    /// How many of those were unreadable, and why the last one was.
    unreadable: (u32, Option<Unreadable>),
    /// Start commands that ran and failed in a row while `restarting` (sets the backoff).
    failed_starts: u32,
    pub next_probe: Timestamp,
    /// The start or stop in flight (set with [`AppMonitor::begin`]).
    pub op: Option<AppOp>,
    /// The last start or stop issued: a probe sent before it ran its check before the command
    /// changed the app, so its outcome says nothing about the app now.
    last_op: Option<ActionId>,
    /// A start wanted once everything it requires is online.
    pub pending: Option<StartWhy>,
    pub reason: String,
    /// Persisted data changed by this monitor itself (auto-clear, stable_after).
    pub dirty: Dirty,
}

/// A state change to turn into an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub from: AppState,
    pub to: AppState,
    pub reason: String,
}

impl AppMonitor {
    /// A monitor for `cfg` with the in-guest restarts still counted (`restarts`, host-local).
    pub fn new(cfg: &App, restarts: Option<&Vec<Timestamp>>, now: Timestamp) -> Self {
        let mut budget = Budget::new(cfg.restart_limit, millis(cfg.restart_window));
        if let Some(times) = restarts {
            budget.times = times.clone();
        }
        AppMonitor {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            priority: cfg.priority,
            priority_override: None,
            state: AppState::Unknown,
            offline: None,
            budget,
            budget_override: false,
            fault: None,
            online_since: None,
            timeouts: 0,
            unreadable: (0, None),
            failed_starts: 0,
            next_probe: now,
            op: None,
            last_op: None,
            pending: None,
            reason: "not probed yet".to_string(),
            dirty: Dirty::default(),
        }
    }

    /// Applies stored run-time settings (what is not overridden returns to the config's value).
    pub fn apply_settings(&mut self, s: &AppSettings) {
        self.offline = s.offline;
        match s.priority.filter(|p| *p >= 1) {
            Some(p) => {
                self.priority = p;
                self.priority_override = Some(p);
            }
            None => {
                self.priority = self.cfg.priority;
                self.priority_override = None;
            }
        }
        self.budget_override = s.restart_limit.is_some() || s.restart_window_ms.is_some();
        self.budget.limit = s.restart_limit.unwrap_or(self.cfg.restart_limit);
        self.budget.window_ms = s
            .restart_window_ms
            .unwrap_or_else(|| millis(self.cfg.restart_window))
            .max(1);
    }

    /// The run-time settings of this app.
    pub fn settings(&self) -> AppSettings {
        AppSettings {
            offline: self.offline,
            priority: self.priority_override,
            restart_limit: self.budget_override.then_some(self.budget.limit),
            restart_window_ms: self.budget_override.then_some(self.budget.window_ms),
        }
    }

    /// Sets the state; returns the change when it is one. Leaving `restarting` ends a run of
    /// failed starts (the next failure starts from the shortest backoff again).
    pub fn set(&mut self, to: AppState, reason: impl Into<String>) -> Option<Change> {
        let reason = reason.into();
        if to != AppState::Restarting {
            self.failed_starts = 0;
        }
        if self.state == to {
            return None;
        }
        let from = self.state;
        self.state = to;
        self.reason = reason.clone();
        if to != AppState::Online {
            self.online_since = None;
        }
        if to != AppState::Faulted {
            self.fault = None;
        }
        Some(Change { from, to, reason })
    }

    /// Counts one more failed start in a row and returns the backoff before the app is probed
    /// (and, if down, restarted) again: the probe interval doubled per earlier failed start,
    /// capped at [`BACKOFF_CAP_MS`] or the interval if that is longer.
    pub fn start_failed_backoff(&mut self) -> u64 {
        self.failed_starts = self.failed_starts.saturating_add(1);
        let interval = millis(self.cfg.interval).max(1);
        let doublings = self.failed_starts.saturating_sub(1).min(32);
        interval
            .saturating_mul(1u64 << doublings)
            .min(BACKOFF_CAP_MS.max(interval))
    }

    /// Waits out the backoff after a failed start (`restarting`, nothing in flight): a VM start
    /// plan counts it as settled.
    pub fn awaits_retry(&self) -> bool {
        self.state == AppState::Restarting
            && self.failed_starts > 0
            && self.op.is_none()
            && self.pending.is_none()
    }

    /// Probed in the next batch when due: no operation in flight, no start pending.
    pub fn probe_eligible(&self) -> bool {
        self.op.is_none() && self.pending.is_none()
    }

    /// Issues `op` (a start or stop just sent to the guest) for this app.
    pub fn begin(&mut self, op: AppOp) {
        let (AppOp::Start(id, _) | AppOp::Stop(id, _)) = op;
        self.op = Some(op);
        self.last_op = Some(id);
    }

    /// Whether the outcome of `probe` tells this app's state now: nothing is in flight or
    /// pending, and no start or stop was issued after the probe was sent (its check may have
    /// run before that command changed the app — a check that saw an app an admin stopped a
    /// moment later would clear the offline flag, one that missed an app just started would
    /// count a failure).
    pub fn answered_by(&self, probe: ActionId) -> bool {
        self.probe_eligible() && self.last_op.is_none_or(|op| op < probe)
    }

    /// Forgets the probes without a usable answer counted so far.
    pub fn clear_streak(&mut self) {
        self.timeouts = 0;
        self.unreadable = (0, None);
    }

    /// Applies one probe outcome at `now`.
    pub fn observe(&mut self, now: Timestamp, outcome: ProbeOutcome) -> (Observed, Option<Change>) {
        let failure = match outcome {
            ProbeOutcome::TimedOut | ProbeOutcome::Unreadable(_) => {
                self.timeouts = self.timeouts.saturating_add(1);
                if let ProbeOutcome::Unreadable(why) = outcome {
                    self.unreadable = (self.unreadable.0.saturating_add(1), Some(why));
                }
                if self.timeouts < self.cfg.probe_failures {
                    return (Observed::Settled, None);
                }
                let n = self.timeouts;
                let failure = match self.unreadable {
                    (0, _) | (_, None) => format!("check timed out {n} times in a row"),
                    (u, Some(why)) if u == n => {
                        format!("check answer unreadable {n} times in a row ({why})")
                    }
                    (_, Some(why)) => format!(
                        "check timed out or unreadable {n} times in a row (last unreadable: {why})"
                    ),
                };
                self.clear_streak();
                failure
            }
            ProbeOutcome::NotRunning(status) => {
                self.clear_streak();
                format!("check {status}")
            }
            ProbeOutcome::Running => {
                self.clear_streak();
                return (Observed::Settled, self.on_running(now));
            }
        };
        self.online_since = None;
        if self.offline.is_some() {
            let change = self.set(
                AppState::Offline,
                format!("{failure}; intentionally offline: no action"),
            );
            return (Observed::Settled, change);
        }
        // A spent budget keeps the app faulted only while it is spent: `restart_limit` is per
        // sliding `restart_window`, so once a restart left the window the app is retried.
        if self.state == AppState::Faulted
            && self.fault == Some(FaultKind::Sticky)
            && self.budget.used(now) >= self.budget.limit
        {
            return (Observed::Settled, None);
        }
        (Observed::Failed(failure), None)
    }

    fn on_running(&mut self, now: Timestamp) -> Option<Change> {
        if let Some(flag) = self.offline {
            // Auto-clear once the app runs AGAIN after being taken offline (the patent: "detect
            // that the application has been restarted"): an app marked offline while still
            // running keeps its flag until it has been seen down, so an admin can mark it and
            // then stop it in the guest without the stop being taken for a failure.
            if flag.auto_clear && self.state != AppState::Online {
                self.offline = None;
                self.dirty.settings = true;
                self.online_since = Some(now);
                return self.set(
                    AppState::Online,
                    "check passed; intentionally-offline flag auto-cleared",
                );
            }
            if !flag.auto_clear {
                return self.set(
                    AppState::Offline,
                    "check passed but flagged offline (no auto-clear)",
                );
            }
        }
        let change = if self.state == AppState::Online {
            None
        } else {
            self.online_since = Some(now);
            self.set(AppState::Online, "check passed")
        };
        if let Some(since) = self.online_since
            && !self.budget.times.is_empty()
            && now.since(since) >= millis(self.cfg.stable_after)
        {
            self.budget.reset();
            self.dirty.local = true;
        }
        change
    }

    pub fn status(&self, now: Timestamp) -> AppStatus {
        AppStatus {
            name: self.name.clone(),
            state: self.state,
            priority: self.priority,
            critical: self.cfg.critical,
            offline: self.offline,
            restarts_in_window: self.budget.used(now),
            restart_limit: self.budget.limit,
            restart_window_ms: self.budget.window_ms,
            consecutive_timeouts: self.timeouts,
            reason: self.reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmha_model::Config;

    fn app(extra: &str) -> App {
        let text = format!(
            r#"
[cluster]
name = "t"
[[host]]
name = "h"
[[vm]]
name = "v"
hosts = ["h"]
[vm.qemu]
memory_mb = 64
disk = "/d.qcow2"
[[vm.app]]
name = "a"
check = ["c"]
start = ["s"]
{extra}
"#
        );
        let c = Config::from_toml_str(&text, "t").unwrap();
        c.vms[0].apps[0].clone()
    }

    #[test]
    fn timeouts_count_only_after_probe_failures() {
        let mut m = AppMonitor::new(&app("probe_failures = 3"), None, Timestamp(0));
        m.state = AppState::Online;
        assert_eq!(
            m.observe(Timestamp(1), ProbeOutcome::TimedOut).0,
            Observed::Settled
        );
        assert_eq!(
            m.observe(Timestamp(2), ProbeOutcome::TimedOut).0,
            Observed::Settled
        );
        assert_eq!(
            m.observe(Timestamp(3), ProbeOutcome::TimedOut).0,
            Observed::Failed("check timed out 3 times in a row".into())
        );
        // A success in between resets the count.
        m.observe(Timestamp(4), ProbeOutcome::TimedOut);
        m.observe(Timestamp(5), ProbeOutcome::Running);
        assert_eq!(
            m.observe(Timestamp(6), ProbeOutcome::TimedOut).0,
            Observed::Settled
        );
    }

    #[test]
    fn unreadable_answers_count_like_timeouts_with_their_own_reason() {
        let mut m = AppMonitor::new(&app("probe_failures = 2"), None, Timestamp(0));
        m.state = AppState::Online;
        let unreadable = ProbeOutcome::Unreadable(Unreadable::Missing);
        assert_eq!(m.observe(Timestamp(1), unreadable).0, Observed::Settled);
        assert_eq!(
            m.observe(Timestamp(2), unreadable).0,
            Observed::Failed(
                "check answer unreadable 2 times in a row (no status line for this check \
                 in the guest's answer)"
                    .into()
            )
        );
        m.observe(Timestamp(3), ProbeOutcome::TimedOut);
        assert_eq!(
            m.observe(Timestamp(4), unreadable).0,
            Observed::Failed(
                "check timed out or unreadable 2 times in a row (last unreadable: no status \
                 line for this check in the guest's answer)"
                    .into()
            )
        );
        // A signal death is not an exit code.
        let (o, _) = m.observe(
            Timestamp(5),
            ProbeOutcome::NotRunning(crate::ExitStatus::Signal(9)),
        );
        assert_eq!(o, Observed::Failed("check killed by signal 9".into()));
    }

    #[test]
    fn offline_flag_and_auto_clear() {
        let mut m = AppMonitor::new(&app(""), None, Timestamp(0));
        m.offline = Some(OfflineFlag { auto_clear: true });
        let (o, c) = m.observe(
            Timestamp(1),
            ProbeOutcome::NotRunning(crate::ExitStatus::Code(3)),
        );
        assert_eq!(o, Observed::Settled);
        assert_eq!(c.unwrap().to, AppState::Offline);
        let (_, c) = m.observe(Timestamp(2), ProbeOutcome::Running);
        assert_eq!(c.unwrap().to, AppState::Online);
        assert_eq!(m.offline, None);
    }

    #[test]
    fn start_backoff_doubles_up_to_the_cap_and_restarts_after_leaving_restarting() {
        let mut m = AppMonitor::new(&app(""), None, Timestamp(0));
        m.set(AppState::Restarting, "r");
        let got: Vec<u64> = (0..8).map(|_| m.start_failed_backoff()).collect();
        assert_eq!(
            got,
            [2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert!(m.awaits_retry());
        m.set(AppState::Online, "check passed");
        assert!(!m.awaits_retry());
        m.set(AppState::Restarting, "r");
        assert_eq!(m.start_failed_backoff(), 2_000);
        // An interval longer than the cap is the backoff.
        let mut slow = AppMonitor::new(&app(r#"interval = "2m""#), None, Timestamp(0));
        assert_eq!(slow.start_failed_backoff(), 120_000);
        assert_eq!(slow.start_failed_backoff(), 120_000);
    }

    #[test]
    fn stable_after_resets_the_counter() {
        let mut m = AppMonitor::new(&app(r#"stable_after = "10s""#), None, Timestamp(0));
        assert!(m.budget.try_take(Timestamp(0)));
        m.observe(Timestamp(1_000), ProbeOutcome::Running);
        m.observe(Timestamp(10_999), ProbeOutcome::Running);
        assert_eq!(m.budget.used(Timestamp(10_999)), 1);
        m.observe(Timestamp(11_000), ProbeOutcome::Running);
        assert_eq!(m.budget.used(Timestamp(11_000)), 0);
    }
}
