//! The driver boundary: what vmhad does with a VM of this host, whatever runs it. The core,
//! the executor and the API see only [`VmDriver`]; each VM's driver is chosen once, from its
//! configuration, by [`for_vm`]: `qemu` ([`crate::vm_slot::VmSlot`], QEMU launched by vmhad)
//! or `libvirt` (`crate::libvirt_slot::LibvirtSlot`, a libvirt domain; only in builds with
//! the `libvirt` feature — without it such a VM faults with a clear error at its first start).
//!
//! Every operation is idempotent (starting a running VM, stopping a stopped one or killing a
//! dead one succeeds without doing anything), and every observation goes to the core as a
//! `HostInput::VmObserved`, reported as it is.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use vmha_api::GuestOutput;
use vmha_engine::{ActionError, ProbeCheck, ProbeOutcome, WatchReport, WatchTarget};
use vmha_model::{Name, Vm};

use crate::fence::Fence;
use crate::inbox::HostInputs;
use crate::vm_slot::{SlotError, VmSlot};

/// The drivers this build includes: a configuration that uses another one is refused when it
/// is loaded, applied or reloaded.
pub const DRIVERS: vmha_model::Drivers = vmha_model::Drivers {
    libvirt: cfg!(feature = "libvirt"),
};

/// A boxed future borrowing its driver (the trait is used as `dyn VmDriver`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One VM of this host as a driver runs it.
pub trait VmDriver: Send + Sync {
    /// The VM's definition changed (a new configuration): its next start uses it.
    fn set_vm(&self, vm: &Vm);
    /// Reattaches to the VM if it runs (after a daemon restart) and reports what it found.
    fn adopt(&self) -> BoxFut<'_, ()>;
    /// Starts the VM; `Ok` once it runs (the guest may still be booting).
    fn start(&self) -> BoxFut<'_, Result<(), SlotError>>;
    /// Stops the VM gracefully (guest agent, then ACPI), forcing after `timeout`.
    fn stop(&self, timeout: Duration) -> BoxFut<'_, Result<(), SlotError>>;
    /// Stops the VM as the daemon exits: nothing starts it afterwards.
    fn stop_for_exit(&self, timeout: Duration) -> BoxFut<'_, Result<(), SlotError>>;
    /// Stops the VM at once (no grace); `Ok` once it is gone.
    fn kill(&self) -> BoxFut<'_, Result<(), SlotError>>;
    /// Reports the VM's state (the periodic safety poll); skipped while the VM is busy.
    fn poll_status(&self) -> BoxFut<'_, ()>;
    /// Runs an app's start or stop command in the guest; `Ok` iff it exits 0.
    fn run_app_command<'a>(&'a self, argv: &'a [String]) -> BoxFut<'a, Result<(), ActionError>>;
    /// Runs an operator's command in the guest (capped output, bounded time).
    fn exec<'a>(
        &'a self,
        argv: &'a [String],
        deadline: Duration,
    ) -> BoxFut<'a, Result<GuestOutput, SlotError>>;
    /// Runs the checks of all due apps in one guest round trip.
    fn probe<'a>(
        &'a self,
        checks: &'a [ProbeCheck],
    ) -> BoxFut<'a, Result<Vec<(Name, ProbeOutcome)>, ActionError>>;
    /// Pings the guest agent within `timeout` (and checks `guest-exec` with `check_exec`).
    fn ping(&self, timeout: Duration, check_exec: bool) -> BoxFut<'_, Result<(), ActionError>>;
    /// Target side of a live migration: an incoming VM listening on `address`; its URI.
    fn prepare_incoming<'a>(
        &'a self,
        address: Option<&'a str>,
    ) -> BoxFut<'a, Result<String, SlotError>>;
    /// Source side of a live migration: sends the running VM to `uri`, `Ok` once completed.
    fn migrate<'a>(
        &'a self,
        uri: &'a str,
    ) -> BoxFut<'a, Result<vmha_qemu::MigrationStats, SlotError>>;
    /// Cancels the live migration in flight, if any (`Ok` also when none runs).
    fn cancel_migration(&self) -> BoxFut<'_, Result<(), SlotError>>;
    /// Runs the VM's watcher of `targets` in the guest, polled every `period`, until it ends.
    fn watch<'a>(
        &'a self,
        targets: &'a [WatchTarget],
        period: Duration,
    ) -> BoxFut<'a, Result<WatchReport, ActionError>>;
}

/// The driver of `vm` on this host, reporting to the core through `tx`; it starts nothing
/// while `fence` says the host may not run VMs.
pub fn for_vm(
    vm: &Vm,
    runtime_dir: PathBuf,
    tx: HostInputs,
    fence: Arc<Fence>,
) -> Arc<dyn VmDriver> {
    #[cfg(feature = "libvirt")]
    if let vmha_model::Driver::Libvirt(spec) = &vm.driver {
        return crate::libvirt_slot::LibvirtSlot::new(&vm.name, spec, tx, fence);
    }
    Arc::new(QemuDriver(VmSlot::new(vm, runtime_dir, tx, fence)))
}

/// The `qemu` driver: a [`VmSlot`].
pub struct QemuDriver(pub Arc<VmSlot>);

impl VmDriver for QemuDriver {
    fn set_vm(&self, vm: &Vm) {
        self.0.set_vm(vm);
    }
    fn prepare_incoming<'a>(
        &'a self,
        address: Option<&'a str>,
    ) -> BoxFut<'a, Result<String, SlotError>> {
        Box::pin(self.0.prepare_incoming(address))
    }
    fn migrate<'a>(
        &'a self,
        uri: &'a str,
    ) -> BoxFut<'a, Result<vmha_qemu::MigrationStats, SlotError>> {
        Box::pin(self.0.migrate(uri))
    }
    fn cancel_migration(&self) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(self.0.cancel_migration())
    }
    fn watch<'a>(
        &'a self,
        targets: &'a [WatchTarget],
        period: Duration,
    ) -> BoxFut<'a, Result<WatchReport, ActionError>> {
        Box::pin(self.0.watch(targets, period))
    }
    fn adopt(&self) -> BoxFut<'_, ()> {
        Box::pin(self.0.adopt())
    }
    fn start(&self) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(self.0.start())
    }
    fn stop(&self, timeout: Duration) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(self.0.stop(timeout))
    }
    fn stop_for_exit(&self, timeout: Duration) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(self.0.stop_for_exit(timeout))
    }
    fn kill(&self) -> BoxFut<'_, Result<(), SlotError>> {
        Box::pin(self.0.kill())
    }
    fn poll_status(&self) -> BoxFut<'_, ()> {
        Box::pin(self.0.poll_status())
    }
    fn run_app_command<'a>(&'a self, argv: &'a [String]) -> BoxFut<'a, Result<(), ActionError>> {
        Box::pin(self.0.run_app_command(argv))
    }
    fn exec<'a>(
        &'a self,
        argv: &'a [String],
        deadline: Duration,
    ) -> BoxFut<'a, Result<GuestOutput, SlotError>> {
        Box::pin(self.0.exec(argv, deadline))
    }
    fn probe<'a>(
        &'a self,
        checks: &'a [ProbeCheck],
    ) -> BoxFut<'a, Result<Vec<(Name, ProbeOutcome)>, ActionError>> {
        Box::pin(self.0.probe(checks))
    }
    fn ping(&self, timeout: Duration, check_exec: bool) -> BoxFut<'_, Result<(), ActionError>> {
        Box::pin(self.0.ping(timeout, check_exec))
    }
}
