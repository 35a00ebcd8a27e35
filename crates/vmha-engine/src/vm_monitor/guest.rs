//! The guest channel as the engine judges it (SPEC §4.1 guest loss, §4.3 boot and pauses).
//!
//! The driver reports raw facts — a ping, a probe or a guest command answered, refused, or
//! not answered — and the engine keeps every timer:
//! - while the channel is not known up (the guest boots, or the last attempt failed) it asks
//!   for a ping [`PING_DOWN_MS`] after the last answer, with a short timeout (an agent that
//!   is not running yet never answers);
//! - while it is up, a ping only when nothing proved it for [`PING_UP_MS`] (probes prove it
//!   every monitor period), with a longer timeout (a busy agent may answer late), and
//!   whether `guest-exec` is allowed is asked on every ping while it is blocked;
//! - the channel is failing since the first failed attempt of a streak was sent (never
//!   before the last answer); it is lost once it keeps failing for `guest_timeout`
//!   (a start plan waits `boot_timeout` instead);
//! - while the VM is paused on purpose nothing is pinged, failures do not count, and the
//!   guest deadlines move on by the time it stayed paused.

use super::*;

/// Ping period while the guest channel is not known up.
pub(super) const PING_DOWN_MS: u64 = 250;
/// A ping once nothing proved the channel for this long (also the period once it is lost).
pub(super) const PING_UP_MS: u64 = 2_000;
/// Time a ping may take while the channel is not known up.
const PING_TIMEOUT_DOWN_MS: u64 = 800;
/// Time a ping may take while the channel is up (at most `guest_timeout`).
const PING_TIMEOUT_UP_MS: u64 = 5_000;

/// A ping in flight.
#[derive(Debug, Clone)]
pub(super) struct Ping {
    pub id: ActionId,
    pub sent: Timestamp,
    pub timeout_ms: u64,
    pub check_exec: bool,
}

/// Why the VM's vCPUs stopped, for reasons.
pub(super) fn pause_text(reason: PauseReason) -> &'static str {
    match reason {
        PauseReason::Admin => "paused by an admin (QMP stop)",
        PauseReason::Debug => "paused by a debugger",
        PauseReason::Suspended => "suspended by its guest (S3)",
        PauseReason::IoError => "paused on a disk I/O error (io-error)",
        PauseReason::InternalError => "paused on an emulation error (internal-error)",
        PauseReason::GuestPanicked => "paused after a guest panic (guest-panicked)",
        PauseReason::Watchdog => "paused by the guest watchdog",
        PauseReason::Migration => "paused for a migration",
        PauseReason::Snapshot => "paused for a snapshot",
        PauseReason::Prelaunch => "not started yet (prelaunch)",
        PauseReason::Other => "paused (a run state this vmha does not know)",
    }
}

/// A pause that is a failure of the VM (SPEC §4.3), not someone holding it on purpose.
pub(super) fn pause_is_failure(reason: PauseReason) -> bool {
    matches!(
        reason,
        PauseReason::IoError
            | PauseReason::InternalError
            | PauseReason::GuestPanicked
            | PauseReason::Watchdog
    )
}

impl VmMonitor {
    /// Forgets what was known of the guest channel: a fresh guest (started, reset) or none
    /// (stopped). A ping in flight no longer counts.
    pub(super) fn guest_forget(&mut self, now: Timestamp) {
        self.guest_up = None;
        self.guest_seen = None;
        self.guest_down_since = None;
        self.guest_lost = false;
        self.guest_hostile = false;
        self.exec_blocked = false;
        self.watch_forget();
        self.ping = None;
        self.next_ping = now;
    }

    /// The guest agent answered (a ping, a probe, a guest command that ran or was refused).
    pub(super) fn guest_answered(&mut self, out: &mut Out<'_>) {
        let was_up = self.guest_up == Some(true);
        self.guest_hostile = false;
        self.guest_seen = Some(out.now);
        self.guest_up = Some(true);
        self.guest_down_since = None;
        if std::mem::take(&mut self.guest_lost) {
            for a in &mut self.apps {
                a.next_probe = out.now;
            }
        } else if !was_up {
            // Apps whose state was lost with the channel are probed at once.
            for a in &mut self.apps {
                if a.state == AppState::Unknown {
                    a.next_probe = out.now;
                }
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
    }

    /// An attempt sent at `sent` found the guest channel unusable. Not counted while the VM
    /// is paused on purpose (its guest cannot answer).
    pub(super) fn guest_failed(&mut self, out: &mut Out<'_>, sent: Timestamp) {
        if self.paused.is_some() {
            return;
        }
        self.guest_up = Some(false);
        let since = sent.max(self.guest_seen.unwrap_or(Timestamp::ZERO));
        self.guest_down_since.get_or_insert(since);
        let period = if self.guest_lost {
            PING_UP_MS
        } else {
            PING_DOWN_MS
        };
        self.next_ping = out.now.plus_ms(period);
    }

    /// A guest agent disconnected as hostile is reported in an event, once per streak (until
    /// it answers again); the failure itself counts like any channel failure.
    pub(super) fn note_hostile(&mut self, out: &mut Out<'_>, error: &ActionError) {
        if !matches!(error, ActionError::GuestHostile { .. }) || self.guest_hostile {
            return;
        }
        self.guest_hostile = true;
        let r = format!("{error}: the guest channel counts as failing until it answers again");
        let state = self.state.as_str();
        out.event(ObjectRef::Vm(self.name.clone()), state, state, &r);
    }

    /// The guest agent refuses `guest-exec` (a probe, a guest command or a ping said so).
    /// The channel itself is fine (no guest loss); apps become `unknown` and are neither
    /// probed, started nor stopped until it is allowed again; the VM is left alone.
    pub(super) fn exec_refused(&mut self, out: &mut Out<'_>) {
        let newly = !self.exec_blocked;
        self.exec_blocked = true;
        // A probe in flight is refused too: its answer no longer counts.
        self.finish_probe();
        if newly {
            self.apps_unprobeable(out);
            // Stops still to send would be refused as well.
            self.to_stop.iter_mut().for_each(|s| *s = false);
        }
        self.guest_answered(out);
        if newly {
            // A start plan waiting for its apps is done: they cannot be started.
            self.after_app_changes(out, false);
        }
    }

    /// The guest agent allows `guest-exec` again: apps are probed at once.
    pub(super) fn exec_allowed(&mut self, out: &mut Out<'_>) {
        if std::mem::take(&mut self.exec_blocked) {
            for a in &mut self.apps {
                a.next_probe = out.now;
            }
        }
    }

    /// Marks every app not seen intentionally offline `unknown` because `guest-exec` is
    /// blocked, cancelling pending starts (an app flagged offline whose stop was refused is
    /// `unknown` too: nobody knows whether it runs).
    pub(super) fn apps_unprobeable(&mut self, out: &mut Out<'_>) {
        for i in 0..self.apps.len() {
            self.apps[i].pending = None;
            // A start in flight will be refused too: its answer no longer counts.
            if matches!(self.apps[i].op, Some(AppOp::Start(..))) {
                self.apps[i].op = None;
            }
            if self.apps[i].state != AppState::Offline {
                self.set_app(out, i, AppState::Unknown, EXEC_BLOCKED);
                // Already unknown (e.g. before the first probe): the reason still says why.
                self.apps[i].reason = EXEC_BLOCKED.to_string();
            }
        }
    }

    /// The answer to the ping in flight.
    pub(super) fn on_ping_result(&mut self, out: &mut Out<'_>, result: Result<(), ActionError>) {
        let Some(ping) = self.ping.take() else {
            return;
        };
        match result {
            Ok(()) => {
                if ping.check_exec {
                    self.exec_allowed(out);
                }
                self.guest_answered(out);
            }
            Err(ActionError::ExecBlocked { .. }) => self.exec_refused(out),
            Err(e) => {
                self.note_hostile(out, &e);
                // It was failing at least since its timeout began to run.
                let waited = Timestamp(out.now.0.saturating_sub(ping.timeout_ms));
                self.guest_failed(out, ping.sent.max(waited));
            }
        }
    }

    /// Whether the guest channel is watched now: the VM runs, is not paused on purpose, and
    /// no plan holds the channel (only monitoring and waiting for the guest ping it).
    fn watching_guest(&self) -> bool {
        self.run == Run::Running
            && self.paused.is_none()
            && (self.monitoring()
                || matches!(
                    self.plan.as_ref().and_then(|p| p.cur),
                    Some(Cur::Until(_, Step::WaitGuest) | Cur::Open(Step::WaitGuest))
                ))
    }

    /// When the next ping is due, if one is wanted.
    pub(super) fn ping_due(&self) -> Option<Timestamp> {
        if self.ping.is_some() || !self.watching_guest() {
            return None;
        }
        match (self.guest_up, self.guest_seen) {
            (Some(true), Some(seen)) => {
                // A probe in flight will prove it (or fail) soon enough.
                let last = self.probe.as_ref().map_or(seen, |p| p.sent.max(seen));
                Some(last.plus_ms(PING_UP_MS))
            }
            _ => Some(self.next_ping),
        }
    }

    /// Asks the driver to ping the guest agent.
    pub(super) fn send_ping(&mut self, out: &mut Out<'_>) {
        let up = self.guest_up == Some(true);
        let check_exec = !up || self.exec_blocked;
        let timeout_ms = if up {
            PING_TIMEOUT_UP_MS.min(millis(self.cfg.guest_timeout))
        } else {
            PING_TIMEOUT_DOWN_MS
        };
        let reason = if self.exec_blocked {
            "guest-exec blocked: is it allowed again?".to_string()
        } else if up {
            format!("no answer from the guest agent for {}", human(PING_UP_MS))
        } else {
            "waiting for the guest agent".to_string()
        };
        let id = out.act(
            HostActionKind::PingGuest {
                vm: self.name.clone(),
                timeout: std::time::Duration::from_millis(timeout_ms),
                check_exec,
            },
            reason,
        );
        self.ping = Some(Ping {
            id,
            sent: out.now,
            timeout_ms,
            check_exec,
        });
    }

    /// The VM is held paused on purpose: an event (its state stays), no probes, no pings,
    /// guest deadlines suspended until it resumes. Nothing if it already is.
    pub(super) fn hold_paused(&mut self, out: &mut Out<'_>, reason: PauseReason) {
        if self.paused.is_some() {
            return;
        }
        self.paused = Some((reason, out.now));
        if self.state == VmState::Unknown {
            // Found paused before its group is known here: adopting it says so.
            return;
        }
        let r = format!(
            "VM {}: probes and guest-loss timers suspended until it resumes; no action",
            pause_text(reason)
        );
        let state = self.state.as_str();
        out.event(ObjectRef::Vm(self.name.clone()), state, state, &r);
    }

    /// The VM runs again after a pause on purpose: its guest deadlines move on by the time
    /// it stayed paused, and the channel is checked at once.
    pub(super) fn resume(&mut self, out: &mut Out<'_>) {
        let Some((reason, since)) = self.paused.take() else {
            return;
        };
        let held = out.now.since(since);
        if let Some(t) = self.guest_down_since.as_mut() {
            *t = t.plus_ms(held);
        }
        if let Some(plan) = self.plan.as_mut()
            && let Some(Cur::Until(t, Step::WaitGuest)) = plan.cur
        {
            plan.cur = Some(Cur::Until(t.plus_ms(held), Step::WaitGuest));
        }
        self.next_ping = out.now;
        let r = format!(
            "VM resumed after being {} for {}: monitoring again",
            pause_text(reason),
            human(held)
        );
        let state = self.state.as_str();
        out.event(ObjectRef::Vm(self.name.clone()), state, state, &r);
    }
}
