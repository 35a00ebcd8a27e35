//! The `libvirt` driver: one libvirt domain (`[vm.libvirt]`), started, stopped and destroyed
//! through libvirt, watched through libvirt's lifecycle events (the core's periodic status
//! poll is the safety net), its guest reached through libvirt's agent passthrough.
//!
//! The domain is adopted when it exists (a domain left running by an earlier vmhad, or one
//! an admin defined) and defined from `xml` when it does not. Its events are reported as they
//! are; the engine judges them — with one exception: a graceful shutdown that vmhad did not
//! ask for (`virsh shutdown`, or a poweroff inside the guest: libvirt reports both as a
//! guest shutdown) is an admin's intentional stop. The slot then issues `vm-stop` for the VM
//! group and withholds the stop observations until the engine acts on it (its stop finds the
//! domain already shut off), so the VM ends `offline`, not restarted. Were `vm-stop` refused,
//! the observations go to the engine as they are (a failure). A destroyed domain or a killed
//! QEMU is a failure, as with `qemu`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use vmha_api::GuestOutput;
use vmha_engine::{ActionError, HostInput, ProbeCheck, ProbeOutcome, VmObservation};
use vmha_libvirt::{Agent, Domain};
use vmha_model::{LibvirtSpec, Name, Vm};
use vmha_qemu::QgaConfig;

use crate::driver::{BoxFut, VmDriver};
use crate::fence::Fence;
use crate::inbox::HostInputs;
use crate::vm_slot::SlotError;

/// One libvirt domain of this host.
pub struct LibvirtSlot {
    name: Name,
    domain: Domain,
    agent: Agent,
    /// Serialises start/stop/kill; safety polls skip a busy slot.
    busy: Mutex<()>,
    /// Set when the daemon stops its VMs on exit: a start still in flight must not start.
    closing: AtomicBool,
    /// vmhad stopped or destroyed the domain (until it starts it again): its stop events are
    /// vmhad's own.
    own_stop: AtomicBool,
    /// An admin shut the domain down and `vm-stop` was issued: stop observations are withheld
    /// until the engine acts (its next start, stop or kill).
    admin_stop: AtomicBool,
    tx: HostInputs,
    fence: Arc<Fence>,
}

impl LibvirtSlot {
    /// A slot for the domain of `spec`, reporting to the core through `tx`; its events are
    /// forwarded from now on (once connected, at the first call).
    pub fn new(name: &Name, spec: &LibvirtSpec, tx: HostInputs, fence: Arc<Fence>) -> Arc<Self> {
        let (domain, mut events) = Domain::new(&spec.uri, &spec.domain, spec.xml.as_deref());
        let slot = Arc::new(LibvirtSlot {
            name: name.clone(),
            agent: Agent::new(domain.clone(), QgaConfig::default()),
            domain,
            busy: Mutex::new(()),
            closing: AtomicBool::new(false),
            own_stop: AtomicBool::new(false),
            admin_stop: AtomicBool::new(false),
            tx,
            fence,
        });
        let weak = Arc::downgrade(&slot);
        tokio::spawn(async move {
            while let Some(kind) = events.recv().await {
                let Some(slot) = weak.upgrade() else { return };
                if slot.tx.is_closed() {
                    return;
                }
                slot.on_event(kind).await;
            }
        });
        slot
    }

    /// One observation from libvirt's events (see the module doc for the admin shutdown).
    async fn on_event(&self, kind: VmObservation) {
        let admin_pending = self.admin_stop.load(Ordering::SeqCst);
        match kind {
            VmObservation::Stopped { by_guest: true }
                if !self.own_stop.load(Ordering::SeqCst) && !admin_pending =>
            {
                self.admin_stop.store(true, Ordering::SeqCst);
                tracing::warn!(vm = %self.name, domain = self.domain.name(),
                    "domain shut down outside vmha: stopping the VM group intentionally (vm-stop)");
                if let Err(e) = self.tx.stop_vm(&self.name).await {
                    tracing::warn!(vm = %self.name, "vm-stop refused ({e}): the shutdown is a failure");
                    self.admin_stop.store(false, Ordering::SeqCst);
                    self.observed(kind).await;
                }
            }
            VmObservation::Stopped { .. } | VmObservation::Gone if admin_pending => {
                tracing::debug!(vm = %self.name, "withheld while vm-stop is applied: {kind:?}");
            }
            _ => self.observed(kind).await,
        }
    }

    async fn observed(&self, kind: VmObservation) {
        // The core is gone only when the daemon exits.
        let _ = self
            .tx
            .send(HostInput::VmObserved {
                vm: self.name.clone(),
                kind,
            })
            .await;
    }

    async fn do_stop(&self, timeout: Duration) -> Result<(), SlotError> {
        let _busy = self.busy.lock().await;
        self.own_stop.store(true, Ordering::SeqCst);
        self.admin_stop.store(false, Ordering::SeqCst);
        let how = self.domain.stop(timeout).await?;
        tracing::info!(vm = %self.name, ?how, "libvirt domain stopped");
        Ok(())
    }
}

impl LibvirtSlot {
    /// The refusal of a live migration step.
    fn no_migration(&self) -> SlotError {
        SlotError::MigrationState {
            vm: self.name.clone(),
            detail: "live migration is not supported by the libvirt driver".into(),
        }
    }
}

impl VmDriver for LibvirtSlot {
    // Live migration is the qemu driver's (the configuration refuses `migrate` on a libvirt
    // VM): a request that reaches this driver anyway is refused, and nothing runs to cancel.
    fn prepare_incoming<'a>(
        &'a self,
        _address: Option<&'a str>,
    ) -> BoxFut<'a, Result<String, SlotError>> {
        Box::pin(async move { Err(self.no_migration()) })
    }
    fn migrate<'a>(
        &'a self,
        _uri: &'a str,
    ) -> BoxFut<'a, Result<vmha_qemu::MigrationStats, SlotError>> {
        Box::pin(async move { Err(self.no_migration()) })
    }
    fn cancel_migration(&self) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(async { Ok(()) })
    }
    // The watcher needs `guest-exec-status` of a running process, which the agent passthrough
    // would poll through libvirt: not done yet, so this driver's apps keep interval checks.
    fn watch<'a>(
        &'a self,
        _targets: &'a [vmha_engine::WatchTarget],
        _period: Duration,
    ) -> BoxFut<'a, Result<vmha_engine::WatchReport, ActionError>> {
        Box::pin(async {
            Err(ActionError::Driver {
                detail: "the libvirt driver runs no watcher: interval checks only".into(),
            })
        })
    }
    fn set_vm(&self, vm: &Vm) {
        // The domain's connection and name are fixed for the slot's life; the domain's own
        // definition is libvirt's.
        if !matches!(&vm.driver, vmha_model::Driver::Libvirt(s) if s.domain == self.domain.name()) {
            tracing::warn!(vm = %self.name, "a changed [vm.libvirt] takes effect after a vmhad restart");
        }
    }

    fn adopt(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _busy = self.busy.lock().await;
            let kind = self.domain.status().await;
            tracing::info!(vm = %self.name, domain = self.domain.name(), "libvirt domain found: {kind:?}");
            self.observed(kind).await;
        })
    }

    fn start(&self) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(async move {
            let _busy = self.busy.lock().await;
            if self.closing.load(Ordering::SeqCst) {
                return Err(SlotError::Exiting(self.name.clone()));
            }
            self.admin_stop.store(false, Ordering::SeqCst);
            if self.domain.is_active().await? {
                return Ok(());
            }
            if !self.fence.may_run() {
                return Err(SlotError::Fenced(self.name.clone()));
            }
            self.own_stop.store(false, Ordering::SeqCst);
            self.domain.start().await?;
            tracing::info!(vm = %self.name, domain = self.domain.name(), "libvirt domain started");
            Ok(())
        })
    }

    fn stop(&self, timeout: Duration) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(self.do_stop(timeout))
    }

    fn stop_for_exit(&self, timeout: Duration) -> BoxFut<'_, Result<(), SlotError>> {
        self.closing.store(true, Ordering::SeqCst);
        Box::pin(self.do_stop(timeout))
    }

    fn kill(&self) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(async move {
            let _busy = self.busy.lock().await;
            self.own_stop.store(true, Ordering::SeqCst);
            self.admin_stop.store(false, Ordering::SeqCst);
            self.domain.destroy().await?;
            tracing::warn!(vm = %self.name, "libvirt domain destroyed");
            Ok(())
        })
    }

    fn poll_status(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let Ok(busy) = self.busy.try_lock() else {
                tracing::debug!(vm = %self.name, "slot busy: safety poll skipped");
                return;
            };
            let kind = self.domain.status().await;
            // A shut-off domain whose vm-stop the engine has not acted on yet is not reported.
            if !(self.admin_stop.load(Ordering::SeqCst) && kind == VmObservation::Gone) {
                self.observed(kind).await;
            }
            drop(busy);
        })
    }

    fn run_app_command<'a>(&'a self, argv: &'a [String]) -> BoxFut<'a, Result<(), ActionError>> {
        Box::pin(crate::guest::run_app_command(&self.name, &self.agent, argv))
    }

    fn exec<'a>(
        &'a self,
        argv: &'a [String],
        deadline: Duration,
    ) -> BoxFut<'a, Result<GuestOutput, SlotError>> {
        Box::pin(async move { Ok(crate::guest::exec(&self.agent, argv, deadline).await?) })
    }

    fn probe<'a>(
        &'a self,
        checks: &'a [ProbeCheck],
    ) -> BoxFut<'a, Result<Vec<(Name, ProbeOutcome)>, ActionError>> {
        Box::pin(crate::guest::probe(&self.name, &self.agent, checks))
    }

    fn ping(&self, timeout: Duration, check_exec: bool) -> BoxFut<'_, Result<(), ActionError>> {
        Box::pin(crate::guest::ping(
            &self.name,
            &self.agent,
            timeout,
            check_exec,
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::inbox::{ApiRequest, Msg};
    use tokio::sync::mpsc;
    use vmha_engine::AdminCommand;

    /// A slot on a libvirt URI nobody serves (nothing here connects).
    fn slot() -> (Arc<LibvirtSlot>, mpsc::Receiver<Msg>) {
        let (tx, rx) = HostInputs::for_test();
        let fence = Fence::new(crate::fence::FenceRule::Never, Vec::new());
        let spec = LibvirtSpec {
            domain: "d1".into(),
            uri: "test:///nonexistent".into(),
            xml: None,
        };
        let slot = LibvirtSlot::new(&Name::new("vm1").unwrap(), &spec, tx, fence);
        (slot, rx)
    }

    fn observed(msg: Option<Msg>) -> VmObservation {
        match msg {
            Some(Msg::Host(HostInput::VmObserved { kind, .. })) => kind,
            other => panic!("expected an observation, got {other:?}"),
        }
    }

    /// The domain shut down from inside (stopped by the guest, then gone, then `after`), fed to
    /// the slot in the background: that task, and the reply channel of the vm-stop of `vm1`
    /// the slot sends for it.
    async fn guest_shutdown(
        slot: &Arc<LibvirtSlot>,
        rx: &mut mpsc::Receiver<Msg>,
        after: Option<VmObservation>,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Sender<Result<(), vmha_engine::CommandError>>,
    ) {
        let events = {
            let slot = Arc::clone(slot);
            tokio::spawn(async move {
                slot.on_event(VmObservation::Stopped { by_guest: true })
                    .await;
                slot.on_event(VmObservation::Gone).await;
                if let Some(after) = after {
                    slot.on_event(after).await;
                }
            })
        };
        match rx.recv().await {
            Some(Msg::Api(ApiRequest::Command(AdminCommand::VmStop { vm }, reply))) => {
                assert_eq!(vm.as_str(), "vm1");
                (events, reply)
            }
            other => panic!("expected vm-stop, got {other:?}"),
        }
    }

    /// An admin's shutdown: vm-stop is issued and, once committed, the stop observations are
    /// withheld (the engine's own stop finds the domain shut off).
    #[tokio::test]
    async fn an_admin_shutdown_issues_vm_stop_and_withholds_the_stop() {
        let (slot, mut rx) = slot();
        let (events, reply) = guest_shutdown(&slot, &mut rx, Some(VmObservation::Running)).await;
        reply.send(Ok(())).unwrap();
        events.await.unwrap();
        // Stopped and Gone withheld; what follows is reported as it is.
        assert_eq!(observed(rx.recv().await), VmObservation::Running);
    }

    /// A refused vm-stop leaves the shutdown to the engine as it is (a failure).
    #[tokio::test]
    async fn a_refused_vm_stop_reports_the_shutdown() {
        let (slot, mut rx) = slot();
        let (events, reply) = guest_shutdown(&slot, &mut rx, None).await;
        reply
            .send(Err(vmha_engine::CommandError::UnknownVm(
                Name::new("vm1").unwrap(),
            )))
            .unwrap();
        events.await.unwrap();
        assert_eq!(
            observed(rx.recv().await),
            VmObservation::Stopped { by_guest: true }
        );
        assert_eq!(observed(rx.recv().await), VmObservation::Gone);
    }

    /// A destroy (host-initiated stop) and vmhad's own stop are reported as they are.
    #[tokio::test]
    async fn destroys_and_own_stops_are_reported_as_they_are() {
        let (slot, mut rx) = slot();
        slot.on_event(VmObservation::Stopped { by_guest: false })
            .await;
        assert_eq!(
            observed(rx.recv().await),
            VmObservation::Stopped { by_guest: false }
        );
        slot.own_stop.store(true, Ordering::SeqCst);
        slot.on_event(VmObservation::Stopped { by_guest: true })
            .await;
        assert_eq!(
            observed(rx.recv().await),
            VmObservation::Stopped { by_guest: true }
        );
        assert!(rx.try_recv().is_err(), "nothing else was sent");
    }
}
