//! Live migration, both sides (the controller writes [`crate::controller::Migration`] into the
//! ownership record; see docs/safety.md):
//! - target (`migrate.to` is this host, another host owns the VM): prepare an incoming QEMU
//!   and report its URI; once the migration completed it runs here, still not owned, until the
//!   controller passes ownership. An incoming QEMU whose migration is withdrawn, or that is
//!   still incomplete when this host becomes the owner, is killed.
//! - source (the owner): once the record carries the target's URI, run `migrate` while the
//!   VM keeps running and its apps stay monitored; a failure is reported and the VM runs on
//!   here; a migration withdrawn while in flight is cancelled; a completed migration leaves
//!   the QEMU here paused for good, killed once ownership has passed.
//!
//! Never two running: the source's QEMU stops its vCPUs before the target's start them, and
//! nothing here ever resumes a source that completed.

use super::*;
use crate::controller::Migration;
use crate::host_io::{MigrationFigures, MigrationNote};

/// The target side of a migration on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Incoming {
    /// The incoming QEMU is being started.
    Preparing(ActionId),
    /// It waits for the stream at this URI.
    Waiting(String),
    /// The migration completed: the VM runs here, waiting for ownership.
    Arrived,
}

impl VmMonitor {
    /// The migration in the record is to this host.
    pub(super) fn migrating_here(&self, host: &Name) -> bool {
        self.migrate.as_ref().is_some_and(|m| &m.to == host)
    }

    /// Whether `running` in reports must say no: an incoming QEMU that has not completed its
    /// migration runs nothing.
    pub(super) fn incoming_incomplete(&self) -> bool {
        matches!(
            self.incoming,
            Some(Incoming::Preparing(_) | Incoming::Waiting(_))
        )
    }

    /// The record's migration changed (or not): notes from an older one are forgotten.
    pub(super) fn on_migration_record(&mut self, migrate: Option<Migration>) {
        let same_target = self.migrate.as_ref().map(|m| &m.to) == migrate.as_ref().map(|m| &m.to);
        if !same_target {
            self.migration_note = None;
        }
        if let Some(m) = &migrate {
            self.migration_target = Some(m.to.clone());
        }
        self.migrate = migrate;
    }

    /// Reconcile for a host that does not own the VM. `true`: the migration decided (the rest
    /// of reconcile must not run).
    pub(super) fn reconcile_target(&mut self, out: &mut Out<'_>) -> bool {
        let here = self.migrating_here(out.host);
        let owner = self.owner.clone().flatten();
        if self.outgoing.is_some() {
            // Ownership passed while our `migrate` still follows the migration: its answer
            // (due at once, the migration completed) comes first, the kill after it.
            return true;
        }
        if !here {
            if self.incoming.take().is_some() && self.run != Run::Stopped {
                let r = "live migration withdrawn: killing the incoming QEMU here";
                self.set_state(out, VmState::Stopping, r);
                self.begin(out, Intent::Release, &[Step::KillVm]);
                return true;
            }
            return false;
        }
        let from = owner.map_or_else(|| "its owner".to_string(), |o| o.to_string());
        match &self.incoming {
            Some(_) => true,
            None if self.run == Run::Stopped && self.migration_note.is_none() => {
                let id = out.act(
                    HostActionKind::PrepareIncoming {
                        vm: self.name.clone(),
                    },
                    format!("live migration from {from}: preparing the incoming QEMU"),
                );
                self.incoming = Some(Incoming::Preparing(id));
                let r = format!("live migration from {from}: preparing the incoming QEMU");
                self.set_state(out, VmState::Starting, &r);
                true
            }
            // A QEMU left here from before (killed by the usual rule first), or a failed
            // preparation (reported; the controller withdraws the migration).
            None => false,
        }
    }

    /// Reconcile for the owner while the record carries a migration. `true`: handled.
    pub(super) fn reconcile_source(&mut self, out: &mut Out<'_>) -> bool {
        if self.incoming.take().is_some() {
            if self.run == Run::Running && self.paused.is_none() {
                // The migration completed here: it runs, and it is ours now.
                for a in &mut self.apps {
                    a.next_probe = out.now;
                }
                self.next_ping = out.now;
                self.set_state(
                    out,
                    VmState::Online,
                    "live migration completed: running here, ownership passed",
                );
                return true;
            }
            if self.run != Run::Stopped {
                let r = "owner now, but the incoming migration never completed: killing the incomplete QEMU before starting afresh";
                self.set_state(out, VmState::Stopping, r);
                self.begin(out, Intent::Release, &[Step::KillVm]);
                return true;
            }
        }
        let Some(m) = self.migrate.clone() else {
            if self.outgoing_sent {
                // The migration completed, then was withdrawn (its target went away with the
                // VM): the QEMU here is paused for good, the VM must start afresh.
                self.outgoing_sent = false;
                self.vm_failed(
                    out,
                    "live migration completed but its target lost the VM before taking it over",
                );
                return true;
            }
            let held = matches!(self.paused, Some((PauseReason::Migration, _)));
            if held && self.outgoing.is_none() && self.run == Run::Running {
                // Paused by a migration nobody asks for any more (found so after a daemon
                // restart: a source done sending, or an incoming QEMU that never completed):
                // QEMU will never resume it by itself.
                self.set_run(Run::Crashed);
                self.vm_failed(
                    out,
                    "VM held paused by a live migration that is no longer asked for",
                );
                return true;
            }
            return false;
        };
        if self.desired != Some(Desired::Run) || self.run != Run::Running {
            return false;
        }
        if self.outgoing.is_some()
            || self.outgoing_sent
            || self.migration_note.is_some()
            || self.plan.is_some()
        {
            return true;
        }
        match m.uri {
            None => {
                let r = format!("live migration to {}: waiting for its incoming QEMU", m.to);
                self.set_state(out, VmState::Migrating, &r);
            }
            Some(uri) => {
                let r = format!("live migration to {} ({uri}): sending", m.to);
                let id = out.act(
                    HostActionKind::Migrate {
                        vm: self.name.clone(),
                        uri,
                    },
                    r.clone(),
                );
                self.outgoing = Some(id);
                self.set_state(out, VmState::Migrating, &r);
            }
        }
        true
    }

    /// A migration in flight from here whose record no longer asks for it (and that did not
    /// pass ownership: then it completed) is cancelled.
    pub(super) fn cancel_withdrawn(&mut self, out: &mut Out<'_>) {
        if self.outgoing.is_some()
            && self.migrate.is_none()
            && self.cancel.is_none()
            && self.mine(out.host)
        {
            let id = out.act(
                HostActionKind::CancelMigration {
                    vm: self.name.clone(),
                },
                "live migration withdrawn: cancelling it",
            );
            self.cancel = Some(id);
        }
    }

    /// Whether `id` is a migration action of this VM.
    pub(super) fn owns_migration(&self, id: ActionId) -> bool {
        self.outgoing == Some(id)
            || self.cancel == Some(id)
            || self.incoming == Some(Incoming::Preparing(id))
    }

    /// The answer to a `prepare-incoming` (the URI, or why not) or a `cancel-migration`.
    pub fn on_migration_result(
        &mut self,
        out: &mut Out<'_>,
        id: ActionId,
        result: Result<Option<String>, ActionError>,
    ) {
        if self.cancel == Some(id) {
            self.cancel = None;
            return;
        }
        if self.incoming == Some(Incoming::Preparing(id)) {
            match result {
                Ok(Some(uri)) => {
                    let r = format!("incoming QEMU waits for the live migration at {uri}");
                    self.migration_note = Some(MigrationNote::Incoming { uri: uri.clone() });
                    self.incoming = Some(Incoming::Waiting(uri));
                    // Its QEMU is there, holding the VM's vCPUs until the stream completes.
                    self.set_run(Run::Running);
                    self.guest_forget(out.now);
                    self.hold_paused(out, PauseReason::Migration);
                    let state = self.state.as_str();
                    out.event(ObjectRef::Vm(self.name.clone()), state, state, &r);
                    self.report(out, &r);
                }
                Ok(None) | Err(_) => {
                    let why = match result {
                        Err(e) => format!("incoming QEMU could not be prepared: {e}"),
                        _ => "incoming QEMU could not be prepared: no address".to_string(),
                    };
                    self.incoming = None;
                    self.migration_note = Some(MigrationNote::Failed { why: why.clone() });
                    self.set_state(out, VmState::Offline, &why);
                    self.reconcile(out);
                }
            }
        }
    }

    /// The answer to this host's `migrate`.
    pub fn on_migrated(
        &mut self,
        out: &mut Out<'_>,
        id: ActionId,
        result: Result<MigrationFigures, ActionError>,
    ) {
        if self.outgoing != Some(id) {
            return;
        }
        self.outgoing = None;
        self.cancel = None;
        let to = self
            .migration_target
            .as_ref()
            .map_or_else(|| "its target".to_string(), Name::to_string);
        match result {
            Ok(f) => {
                self.outgoing_sent = true;
                let r = format!(
                    "live migration to {to} completed in {} ms (guest paused {} ms): the QEMU here stays paused for good",
                    f.total_ms, f.downtime_ms
                );
                let state = self.state.as_str();
                out.event(ObjectRef::Vm(self.name.clone()), state, state, &r);
            }
            Err(e) if self.mine(out.host) => {
                let why = format!("live migration to {to} failed: {e}");
                if self.migrate.is_some() {
                    // Still asked for: the controller learns it failed from this note.
                    self.migration_note = Some(MigrationNote::Failed { why: why.clone() });
                }
                self.set_state(out, VmState::Online, &format!("{why}; it runs on here"));
            }
            // Ownership passed (the target runs it): the migration completed, whatever its
            // follower last heard.
            Err(_) => self.outgoing_sent = true,
        }
        self.reconcile(out);
    }

    /// The incoming QEMU's VM started running: the migration completed here.
    pub(super) fn incoming_arrived(&mut self, out: &mut Out<'_>) {
        if !matches!(self.incoming, Some(Incoming::Waiting(_))) {
            return;
        }
        self.incoming = Some(Incoming::Arrived);
        self.migration_note = None;
        self.set_state(
            out,
            VmState::Online,
            "live migration completed: the VM runs here, waiting for ownership",
        );
    }

    /// The VM was seen stopped or gone here: an incoming QEMU that had started waiting died
    /// or stopped before completing; it is forgotten, reported failed. While it is still being
    /// prepared, such an observation says nothing about it: the daemon's safety poll may have
    /// found the slot empty just before the preparation took it (the preparation's own
    /// answer tells whether it runs).
    pub(super) fn incoming_lost(&mut self) {
        if matches!(self.incoming, Some(Incoming::Preparing(_))) {
            return;
        }
        if self.incoming.take().is_some() {
            self.migration_note = Some(MigrationNote::Failed {
                why: "incoming QEMU exited before the migration completed".to_string(),
            });
        }
    }
}
