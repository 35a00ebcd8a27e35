//! Counters of the work done through guest agents (probes, checks, watchers, watcher polls, doorbell rings),
//! shown in `GET /v1/status` under `guest_io`: what one can count to see the cost of
//! monitoring (one guest-exec per probe, whatever the number of checks in it).

use std::sync::Mutex;

use vmha_api::GuestIoView;

/// The daemon's counters (all VMs), since it started.
pub static COUNTERS: GuestIo = GuestIo(Mutex::new(GuestIoView {
    probes: 0,
    checks: 0,
    watchers: 0,
    watch_polls: 0,
    watch_rings: 0,
}));

/// Monotonic counters, updated together (a view never shows a probe without its checks).
#[derive(Debug)]
pub struct GuestIo(Mutex<GuestIoView>);

impl GuestIo {
    fn update(&self, f: impl FnOnce(&mut GuestIoView)) {
        // A poisoned lock only means a panic elsewhere mid-update: the counts stay usable.
        let mut view = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut view);
    }

    /// One probe (one guest-exec) with `checks` checks was started.
    pub fn probe(&self, checks: usize) {
        self.update(|v| {
            v.probes = v.probes.saturating_add(1);
            v.checks = v
                .checks
                .saturating_add(u64::try_from(checks).unwrap_or(u64::MAX));
        });
    }

    /// One watcher (one guest-exec) was started.
    pub fn watcher(&self) {
        self.update(|v| v.watchers = v.watchers.saturating_add(1));
    }

    /// One `guest-exec-status` of a watcher was sent.
    pub fn watch_poll(&self) {
        self.update(|v| v.watch_polls = v.watch_polls.saturating_add(1));
    }

    /// A watcher rang the doorbell "ended" (the first time, it is asked for its status at
    /// once).
    pub fn watch_ring(&self) {
        self.update(|v| v.watch_rings = v.watch_rings.saturating_add(1));
    }

    /// The counters as `GET /v1/status` shows them.
    pub fn view(&self) -> GuestIoView {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
