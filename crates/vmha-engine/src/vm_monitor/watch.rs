//! The watch (SPEC §4.1, issue 14): one long-running watcher per VM in the guest waits on the
//! processes of the apps that name one and ends the moment one is gone, running that app's
//! normal check at once (the check stays the truth, the watch only brings it forward).
//!
//! The engine decides when a watcher runs and what its end means; the driver runs it:
//! - armed while the VM is monitored, the guest channel answers, no probe and no app start or
//!   stop is in flight and at least one app naming its process is `online`; armed again (a new
//!   watcher replaces the old one) whenever that set of apps changes — so an app restarted by
//!   vmha is watched again with its new pid;
//! - `gone APP` with the outcome of APP's check, which the watcher ran the moment it saw the
//!   process gone → that outcome counts as a probe's (no probe: the detection waits for nothing
//!   more);
//! - `gone APP` without that outcome → that app probed now, alone (its check is all its
//!   detection waits for; other apps keep their schedule, and the next watcher finds any other
//!   dead process at once);
//! - either way the watcher is armed again once the app's check has answered (if it finds the
//!   app running, the `gone` was wrong: armed again only after the backoff below, so a hostile
//!   guest cannot make vmha probe or re-arm in a loop);
//! - `gone APP` for an app started or stopped since the watcher was armed (a probe saw the
//!   death first, and vmha is restarting it), or not checked now → nothing: old news, not a
//!   false alarm (no backoff);
//! - ended otherwise (killed in the guest, unreadable, the channel failed) → no app event;
//!   armed again after [`WATCH_RETRY_MS`], doubling per such end in a row up to
//!   [`WATCH_RETRY_CAP_MS`];
//! - an app whose process a watcher cannot find is checked at once (it may have died since
//!   its check); not found again after a passing check, it is left to interval checks (with
//!   an event) until it is started again or the guest restarts;
//! - a guest that refuses the watcher's `guest-exec` → watch off for this guest, with an event.

use crate::host_io::{ProcessRef, WatchEnd, WatchReport, WatchTarget};

use super::*;

/// First wait before a watcher that ended without news is started again.
pub const WATCH_RETRY_MS: u64 = 1_000;
/// Longest wait before a watcher is started again.
pub const WATCH_RETRY_CAP_MS: u64 = 60_000;

/// The watch of one VM.
#[derive(Debug, Clone, Default)]
pub(crate) struct Watch {
    /// The watcher running: its action and the apps it waits on.
    pub running: Option<(ActionId, Vec<usize>)>,
    /// Apps whose process a watcher could not find once (checked at once: they may have died
    /// since their check).
    pub missed: Vec<usize>,
    /// Apps whose process watchers could not find twice in a row, the check passing in
    /// between (a wrong `pid_file` or `process`): left to interval checks.
    pub unfound: Vec<usize>,
    /// Watchers ended without news in a row.
    pub ended: u32,
    /// No watcher before this time.
    pub not_before: Timestamp,
    /// Why the watch is off for this guest, if it is.
    pub off: Option<String>,
    /// The last watcher said an app was gone: the next probe tells whether it was right.
    pub fired: bool,
}

fn process_of(app: &AppMonitor) -> Option<ProcessRef> {
    match (&app.cfg.pid_file, &app.cfg.process) {
        (Some(path), _) => Some(ProcessRef::PidFile(path.clone())),
        (None, Some(name)) => Some(ProcessRef::Name(name.clone())),
        (None, None) => None,
    }
}

impl VmMonitor {
    /// The apps a watcher should wait on now (empty: none should run).
    fn watchable(&self) -> Vec<usize> {
        if !self.cfg.watch
            || self.watch.off.is_some()
            || !self.probing()
            || self.guest_up != Some(true)
            // Not while an app is being started or stopped: the set is about to change.
            || self.apps.iter().any(|a| a.op.is_some())
        {
            return Vec::new();
        }
        (0..self.apps.len())
            .filter(|&i| {
                let a = &self.apps[i];
                process_of(a).is_some()
                    && a.state == AppState::Online
                    && a.probe_eligible()
                    && !self.watch.unfound.contains(&i)
            })
            .collect()
    }

    /// When a watcher should be (re)started, if one should.
    pub(super) fn watch_due(&self) -> Option<Timestamp> {
        let want = self.watchable();
        if want.is_empty() {
            return None;
        }
        match &self.watch.running {
            Some((_, apps)) if *apps == want => None,
            _ => Some(self.watch.not_before),
        }
    }

    /// Starts a watcher when one is due.
    pub(super) fn arm_watch(&mut self, out: &mut Out<'_>) {
        if self.watch_due().is_none_or(|t| t > out.now) {
            return;
        }
        let apps = self.watchable();
        let targets = apps
            .iter()
            .filter_map(|&i| {
                process_of(&self.apps[i]).map(|process| WatchTarget {
                    app: self.apps[i].name.clone(),
                    process,
                    check: self.apps[i].cfg.check.clone(),
                    timeout: self.apps[i].cfg.timeout,
                })
            })
            .collect();
        let reason = if self.watch.running.is_some() {
            "watched apps changed"
        } else {
            "watch the apps' processes"
        };
        let id = out.act(
            HostActionKind::Watch {
                vm: self.name.clone(),
                targets,
                period: self.cfg.watch_period,
            },
            reason,
        );
        self.watch.running = Some((id, apps));
    }

    /// Whether `id` is the watcher running.
    pub(super) fn owns_watch(&self, id: ActionId) -> bool {
        self.watch.running.as_ref().is_some_and(|(x, _)| *x == id)
    }

    /// A watcher ended with `report`.
    pub fn on_watch_result(&mut self, out: &mut Out<'_>, id: ActionId, report: &WatchReport) {
        if !self.owns_watch(id) {
            return;
        }
        let Some((_, apps)) = self.watch.running.take() else {
            return;
        };
        for name in &report.not_found {
            let Some(i) = self.apps.iter().position(|a| &a.name == name) else {
                continue;
            };
            if !apps.contains(&i) || self.watch.unfound.contains(&i) {
                continue;
            }
            if !self.watch.missed.contains(&i) {
                self.watch.missed.push(i);
                self.apps[i].next_probe = out.now;
                continue;
            }
            self.watch.unfound.push(i);
            let state = self.apps[i].state.as_str();
            out.event(
                app_ref(&self.name, &self.apps[i].name),
                state,
                state,
                "watch cannot find its process (pid_file or process): interval checks only",
            );
        }
        match &report.end {
            WatchEnd::Gone(name) => {
                // The app named, alone: its check is all the detection waits for. A name that
                // is not one of the watched apps (a confused guest) brings them all forward.
                let named = apps
                    .iter()
                    .copied()
                    .find(|&i| self.apps.get(i).is_some_and(|a| &a.name == name));
                if let Some(i) = named
                    && !self.apps[i].answered_by(id)
                {
                    // Started or stopped since the watcher was armed (a probe saw the death
                    // first, or an admin acted), or not checked now: old news, and no false
                    // alarm either. The next watcher comes when the apps settle, no backoff.
                    return;
                }
                self.watch.fired = true;
                if let (Some(i), Some(outcome)) = (named, &report.checked) {
                    self.watch_checked(out, i, outcome);
                    return;
                }
                let due: Vec<usize> = named.map_or(apps, |i| vec![i]);
                for i in due {
                    if let Some(a) = self.apps.get_mut(i) {
                        a.next_probe = a.next_probe.min(out.now);
                    }
                }
            }
            WatchEnd::NotFound => self.watch.ended = 0,
            WatchEnd::Ended(_) => self.watch_ended(out.now),
        }
    }

    /// The watcher ran app `i`'s check the moment it saw its process gone: the outcome counts
    /// as a probe's (the check stays the truth; it just ran sooner). An app found running
    /// (the `gone` was wrong, or the app is back under another pid) gets the backoff of
    /// [`Self::after_watch_probe`], so a guest cannot make vmha re-arm in a loop.
    fn watch_checked(&mut self, out: &mut Out<'_>, i: usize, outcome: &ProbeOutcome) {
        let before = self.apps[i].state;
        let (observed, change) = self.apps[i].observe(out.now, *outcome);
        let mut changed = self.app_event(out, i, change);
        if let Observed::Failed(cause) = observed {
            self.app_failed(
                out,
                i,
                format!("{cause}: checked by the watch as its process ended"),
            );
        }
        changed |= self.apps[i].state != before;
        self.after_watch_probe(out.now, *outcome != ProbeOutcome::Running);
        self.after_app_changes(out, changed);
    }

    /// The watcher's action failed: the guest refuses it (watch off, with an event) or the
    /// channel failed (started again later; the guest channel is judged by probes and pings).
    pub(super) fn on_watch_failed(&mut self, out: &mut Out<'_>, error: &ActionError) {
        self.watch.running = None;
        if let ActionError::ExecBlocked { detail } = error {
            let why = format!(
                "watch off: the guest refuses its guest-exec ({detail}); apps are checked every interval"
            );
            self.watch.off = Some(why.clone());
            let state = self.state.as_str();
            out.event(ObjectRef::Vm(self.name.clone()), state, state, &why);
        } else {
            self.watch_ended(out.now);
        }
    }

    /// A probe answered: after a watcher said an app was gone, a probe that finds every app
    /// running means it was wrong (a hostile or confused guest): the next watcher waits as
    /// after a watcher that ended without news, so a guest cannot make vmha probe in a loop.
    pub(super) fn after_watch_probe(&mut self, now: Timestamp, any_down: bool) {
        if !std::mem::take(&mut self.watch.fired) {
            return;
        }
        if any_down {
            self.watch.ended = 0;
        } else {
            self.watch_ended(now);
        }
    }

    fn watch_ended(&mut self, now: Timestamp) {
        self.watch.ended = self.watch.ended.saturating_add(1);
        let doublings = self.watch.ended.saturating_sub(1).min(16);
        let wait = WATCH_RETRY_MS
            .saturating_mul(1 << doublings)
            .min(WATCH_RETRY_CAP_MS);
        self.watch.not_before = now.plus_ms(wait);
    }

    /// A fresh guest (or none): everything known of the watch is forgotten.
    pub(super) fn watch_forget(&mut self) {
        self.watch = Watch::default();
    }

    /// App `i` was (re)started: its process may be found again.
    pub(super) fn watch_app_started(&mut self, i: usize) {
        self.watch.unfound.retain(|&x| x != i);
        self.watch.missed.retain(|&x| x != i);
    }
}
