//! One VM of this host as the driver sees it: its QEMU (launched or adopted), the pump that
//! turns its QMP events into VM monitor inputs, and its guest channel.
//!
//! The slot reports what it observes as it is (a paused VM with its run state, a QEMU that does
//! not answer, each guest call answered, refused or not) and judges nothing: the engine owns
//! every guest-liveness timer and asks for pings (`PingGuest`) when it wants to know.
//!
//! Every operation here is idempotent: starting a running VM, stopping a stopped one or
//! killing a dead one succeeds without doing anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use vmha_api::GuestOutput;
use vmha_engine::{
    ActionError, HostInput, ProbeCheck, ProbeOutcome, VmObservation, WatchReport, WatchTarget,
};
use vmha_model::{Accel, Driver, Name, Vm};
use vmha_qemu::doorbell::{Bell, Ring};
use vmha_qemu::{DriverConfig, LaunchSpec, QemuVm, QgaClient, QmpClient, VmEvent};

use crate::fence::Fence;
use crate::inbox::HostInputs;
use crate::watch_polls::WatchPolls;

/// Why a driver operation failed (reported to the engine as the action's error text).
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The VM's driver is not supported by this build.
    #[error(
        "VM {0}: driver `libvirt` is not supported by this vmhad build (build it with --features libvirt)"
    )]
    UnsupportedDriver(Name),
    /// The guest channel is not connected.
    #[error("guest channel of VM {0} is not available")]
    NoGuest(Name),
    /// QEMU failed.
    #[error(transparent)]
    Vm(#[from] vmha_qemu::VmError),
    /// The guest agent failed.
    #[error(transparent)]
    Guest(#[from] vmha_qemu::QgaError),
    /// The daemon is exiting with `--stop-vms-on-exit`: no VM is started any more.
    #[error("VM {0} not started: vmhad is exiting and stopping its VMs")]
    Exiting(Name),
    /// libvirt failed (the `libvirt` driver).
    #[cfg(feature = "libvirt")]
    #[error(transparent)]
    Libvirt(#[from] vmha_libvirt::DomainError),
    /// This host has fenced itself (or its lease is overdue): no VM may start.
    #[error("VM {0} not started: this host's lease is not live (self-fenced)")]
    Fenced(Name),
    /// A live migration step failed.
    #[error(transparent)]
    Migration(#[from] vmha_qemu::MigrationError),
    /// An incoming migration needs a QEMU-free slot, or an outgoing one a running QEMU.
    #[error("VM {vm}: {detail}")]
    MigrationState {
        /// The VM.
        vm: Name,
        /// What is in the way.
        detail: String,
    },
    /// This host has no `address` to receive a live migration on.
    #[error(
        "VM {0}: this host has no `address` in the configuration to receive a live migration on"
    )]
    NoAddress(Name),
}

/// What a failed driver operation means for the engine: the one place where the driver's
/// errors become [`ActionError`]s.
impl From<SlotError> for ActionError {
    fn from(e: SlotError) -> ActionError {
        match e {
            SlotError::UnsupportedDriver(_) => ActionError::NotConfigured {
                detail: e.to_string(),
            },
            SlotError::NoGuest(_) => ActionError::GuestUnreachable {
                detail: e.to_string(),
            },
            SlotError::Guest(e) => crate::guest::guest_error(e),
            #[cfg(feature = "libvirt")]
            SlotError::Libvirt(vmha_libvirt::DomainError::NoDomain(_)) => {
                ActionError::NotConfigured {
                    detail: e.to_string(),
                }
            }
            #[cfg(feature = "libvirt")]
            SlotError::Libvirt(_) => ActionError::Driver {
                detail: e.to_string(),
            },
            SlotError::Vm(_)
            | SlotError::Exiting(_)
            | SlotError::Fenced(_)
            | SlotError::Migration(_)
            | SlotError::MigrationState { .. }
            | SlotError::NoAddress(_) => ActionError::Driver {
                detail: e.to_string(),
            },
        }
    }
}

/// Time a QEMU whose QMP socket closed gets to exit before a start gives up on it.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// Bound on each call of a watcher (its start, each status poll).
const WATCH_CALL_DEADLINE: Duration = Duration::from_secs(5);
/// The ways into a running QEMU's guest: its agent channel and its watch doorbell.
#[derive(Clone)]
struct GuestLink {
    qga: Arc<QgaClient>,
    bell: Bell,
}

/// One VM of this host.
pub struct VmSlot {
    name: Name,
    /// How to launch it (changed by a new configuration; used at the next start).
    spec: std::sync::Mutex<Option<LaunchSpec>>,
    runtime_dir: PathBuf,
    driver: DriverConfig,
    qemu: Mutex<Option<QemuVm>>,
    qga: std::sync::Mutex<Option<GuestLink>>,
    /// Bumped on every launch/adopt (under the `qga` lock, together with the new link) so
    /// the pump of an earlier QEMU falls silent.
    generation: AtomicU64,
    /// Bumped by every watcher started: an older one stops polling.
    watch_generation: AtomicU64,
    /// Set when the daemon stops its VMs on exit: a start still in flight must not launch.
    closing: AtomicBool,
    /// The slot has looked for a QEMU left running (adoption) or launched one. Before, it has
    /// no handle but knows nothing: a safety poll then reports nothing (not "gone").
    looked: AtomicBool,
    tx: HostInputs,
    fence: Arc<Fence>,
}

impl VmSlot {
    /// A slot for `vm`, reporting to the core through `tx`; it starts nothing while `fence`
    /// says the host may not run VMs.
    pub fn new(vm: &Vm, runtime_dir: PathBuf, tx: HostInputs, fence: Arc<Fence>) -> Arc<Self> {
        Arc::new(VmSlot {
            name: vm.name.clone(),
            spec: std::sync::Mutex::new(launch_spec(vm)),
            runtime_dir,
            driver: DriverConfig::default(),
            qemu: Mutex::new(None),
            qga: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            watch_generation: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            looked: AtomicBool::new(false),
            tx,
            fence,
        })
    }

    /// The VM's definition changed (a new configuration): its next start uses it. A running
    /// QEMU keeps what it was started with.
    pub fn set_vm(&self, vm: &Vm) {
        if let Ok(mut spec) = self.spec.lock() {
            *spec = launch_spec(vm);
        }
    }

    async fn send(&self, input: HostInput) {
        // The core is gone only when the daemon exits.
        let _ = self.tx.send(input).await;
    }

    fn link(&self) -> Option<GuestLink> {
        self.qga.lock().ok().and_then(|g| g.clone())
    }

    fn qga(&self) -> Option<Arc<QgaClient>> {
        self.link().map(|l| l.qga)
    }

    /// Installs a launched or adopted QEMU and starts pumping its events.
    fn install(self: &Arc<Self>, slot: &mut Option<QemuVm>, mut vm: QemuVm) {
        let generation = match self.qga.lock() {
            Ok(mut g) => {
                *g = Some(GuestLink {
                    qga: vm.qga(),
                    bell: vm.bell(),
                });
                self.generation.fetch_add(1, Ordering::SeqCst) + 1
            }
            Err(_) => self.generation.fetch_add(1, Ordering::SeqCst) + 1,
        };
        if let Some(events) = vm.take_events() {
            let qmp = vm.qmp().clone();
            tokio::spawn(pump(Arc::clone(self), generation, qmp, events));
        }
        *slot = Some(vm);
        self.looked.store(true, Ordering::SeqCst);
    }

    /// Reattaches to a QEMU left running by an earlier daemon and reports what it found, as
    /// it is (running, paused with its reason, unresponsive, or gone).
    pub async fn adopt(self: &Arc<Self>) {
        #[cfg(debug_assertions)]
        test_hold_adoption().await;
        let mut guard = self.qemu.lock().await;
        let observation = match QemuVm::adopt(&self.runtime_dir, self.name.as_str(), &self.driver)
            .await
        {
            Ok(vm) => {
                let obs = vm.status().await;
                tracing::info!(vm = %self.name, pid = vm.pid(), "adopted running VM: {obs:?}");
                self.install(&mut guard, vm);
                obs
            }
            Err(e) => {
                let observation = self.without_handle();
                if observation == VmObservation::Gone {
                    tracing::debug!(vm = %self.name, "nothing to adopt: {e}");
                } else {
                    tracing::warn!(vm = %self.name, "a QEMU of this VM runs but cannot be adopted ({e}): taken as running, unresponsive");
                }
                observation
            }
        };
        self.looked.store(true, Ordering::SeqCst);
        drop(guard);
        self.send(HostInput::VmObserved {
            vm: self.name.clone(),
            kind: observation,
        })
        .await;
    }

    /// Starts the VM; `Ok` once QEMU runs (the guest may still be booting).
    pub async fn start(self: &Arc<Self>) -> Result<(), SlotError> {
        let spec = self
            .spec
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| SlotError::UnsupportedDriver(self.name.clone()))?;
        let mut guard = self.qemu.lock().await;
        if self.closing.load(Ordering::SeqCst) {
            return Err(SlotError::Exiting(self.name.clone()));
        }
        if let Some(vm) = guard.as_ref() {
            // A closed QMP socket means QEMU is on its way out: wait for the process itself to
            // end before starting its successor (the start is a request to run, not a no-op).
            if !vm.is_gone() && vm.qmp().is_closed() {
                vm.wait_gone(EXIT_GRACE).await;
            }
            if !vm.is_gone() {
                return Ok(());
            }
        }
        // This VM's QEMU may run without our handle (launched by a daemon killed before it
        // could adopt it): a start request finding it running adopts it.
        if self.reattach(&mut guard).await {
            return Ok(());
        }
        // Checked last, right before launching: the fence may have struck meanwhile.
        if !self.fence.may_run() {
            return Err(SlotError::Fenced(self.name.clone()));
        }
        match QemuVm::launch(&spec, &self.runtime_dir, &self.driver).await {
            Ok(vm) => {
                tracing::info!(vm = %self.name, pid = vm.pid(), "QEMU started");
                self.install(&mut guard, vm);
                Ok(())
            }
            Err(vmha_qemu::VmError::AlreadyRunning(_)) if self.reattach(&mut guard).await => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// What the slot sees of its VM while it holds no handle on a QEMU: `Gone`, unless a QEMU
    /// of this VM runs all the same (one that could not be adopted, e.g. stopped by a signal or
    /// stuck so that its QMP socket never greets): that one is `Unresponsive`, so that the VM
    /// monitor takes it as running (never starting a second QEMU, nor letting the controller
    /// start the VM elsewhere) until it is killed. Every safety poll of a VM not running here
    /// asks this, so `/proc` is scanned only when the VM's QMP socket file is there (a QEMU
    /// of it creates it first thing; a stuck one keeps it).
    fn without_handle(&self) -> VmObservation {
        let runs = vmha_qemu::VmPaths::new(&self.runtime_dir, self.name.as_str())
            .is_ok_and(|paths| paths.qmp.exists() && !vmha_qemu::qemu_processes(&paths).is_empty());
        if runs {
            VmObservation::Unresponsive
        } else {
            VmObservation::Gone
        }
    }

    /// Adopts this VM's QEMU when one runs without a handle of ours; true if the slot now
    /// holds a live QEMU.
    async fn reattach(self: &Arc<Self>, slot: &mut Option<QemuVm>) -> bool {
        if slot.as_ref().is_some_and(|vm| !vm.is_gone()) {
            return true;
        }
        let paths = match vmha_qemu::VmPaths::new(&self.runtime_dir, self.name.as_str()) {
            Ok(p) => p,
            Err(_) => return false,
        };
        if vmha_qemu::qemu_processes(&paths).is_empty() {
            return false;
        }
        match QemuVm::adopt(&self.runtime_dir, self.name.as_str(), &self.driver).await {
            Ok(vm) => {
                tracing::warn!(vm = %self.name, pid = vm.pid(), "adopted a QEMU of this VM that had no handle");
                self.install(slot, vm);
                true
            }
            Err(e) => {
                tracing::warn!(vm = %self.name, "a QEMU of this VM runs but cannot be adopted: {e}");
                false
            }
        }
    }

    /// Target side of a live migration: starts QEMU with the same launch spec plus
    /// `-incoming defer` and has it listen on `address` (a free port); returns the URI the
    /// source sends to. Refused when a QEMU of this VM is already here, when this host is
    /// fenced, or when it has no address.
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        address: Option<&str>,
    ) -> Result<String, SlotError> {
        let address = address.ok_or_else(|| SlotError::NoAddress(self.name.clone()))?;
        let mut spec = self
            .spec
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| SlotError::UnsupportedDriver(self.name.clone()))?;
        spec.extra_args
            .extend(["-incoming".to_string(), "defer".to_string()]);
        let mut guard = self.qemu.lock().await;
        if self.closing.load(Ordering::SeqCst) {
            return Err(SlotError::Exiting(self.name.clone()));
        }
        if self.reattach(&mut guard).await {
            return Err(SlotError::MigrationState {
                vm: self.name.clone(),
                detail: "a QEMU of this VM already runs here: no incoming migration".to_string(),
            });
        }
        if !self.fence.may_run() {
            return Err(SlotError::Fenced(self.name.clone()));
        }
        let vm = QemuVm::launch(&spec, &self.runtime_dir, &self.driver).await?;
        tracing::info!(vm = %self.name, pid = vm.pid(), "incoming QEMU started");
        let qmp = vm.qmp().clone();
        self.install(&mut guard, vm);
        match vmha_qemu::migration::listen_incoming(&qmp, address).await {
            Ok(uri) => {
                tracing::info!(vm = %self.name, %uri, "waiting for the live migration");
                Ok(uri)
            }
            Err(e) => {
                // An incoming QEMU that cannot listen is of no use: it goes at once.
                if let Some(vm) = guard.as_mut() {
                    let _ = vm.kill().await;
                }
                *guard = None;
                Err(e.into())
            }
        }
    }

    /// Source side: sends the running VM to `uri` and follows the migration to its end
    /// (`Ok`: completed, the QEMU here is paused for good). The slot is not held meanwhile:
    /// a kill (self-fencing) or a cancel goes through at any time.
    pub async fn migrate(&self, uri: &str) -> Result<vmha_qemu::MigrationStats, SlotError> {
        let qmp = {
            let guard = self.qemu.lock().await;
            match guard.as_ref() {
                Some(vm) if !vm.is_gone() => vm.qmp().clone(),
                _ => {
                    return Err(SlotError::MigrationState {
                        vm: self.name.clone(),
                        detail: "no QEMU of this VM runs here to migrate".to_string(),
                    });
                }
            }
        };
        let limits = vmha_qemu::MigrationLimits::default();
        let stats = vmha_qemu::migration::send(&qmp, uri, limits).await?;
        tracing::info!(
            vm = %self.name,
            %uri,
            total_ms = stats.total_ms,
            downtime_ms = stats.downtime_ms,
            setup_ms = stats.setup_ms,
            transferred = stats.transferred,
            "live migration completed: total-time {} ms, downtime {} ms",
            stats.total_ms,
            stats.downtime_ms
        );
        Ok(stats)
    }

    /// Cancels the migration in flight, if any (`Ok` also when none runs or QEMU is gone).
    pub async fn cancel_migration(&self) -> Result<(), SlotError> {
        let qmp = {
            let guard = self.qemu.lock().await;
            match guard.as_ref() {
                Some(vm) if !vm.is_gone() => vm.qmp().clone(),
                _ => return Ok(()),
            }
        };
        vmha_qemu::migration::cancel(&qmp).await?;
        tracing::warn!(vm = %self.name, "live migration cancelled");
        Ok(())
    }

    /// Stops the VM gracefully, forcing after `timeout`; `Ok` once QEMU is gone. A QEMU of
    /// this VM that cannot be adopted (its QMP socket does not answer) is killed.
    pub async fn stop(self: &Arc<Self>, timeout: Duration) -> Result<(), SlotError> {
        let mut guard = self.qemu.lock().await;
        self.reattach(&mut guard).await;
        if let Some(vm) = guard.as_mut() {
            let how = vm.stop(timeout).await?;
            tracing::info!(vm = %self.name, ?how, "VM stopped");
        }
        *guard = None;
        // A QEMU of this VM that could not be adopted cannot be asked to stop: it is killed.
        self.kill_strays().await
    }

    /// Stops the VM as the daemon exits (`--stop-vms-on-exit`): a start still in flight or
    /// queued behind this stop launches nothing afterwards.
    pub async fn stop_for_exit(self: &Arc<Self>, timeout: Duration) -> Result<(), SlotError> {
        self.closing.store(true, Ordering::SeqCst);
        self.stop(timeout).await
    }

    /// Kills QEMU at once; `Ok` once it is gone.
    pub async fn kill(&self) -> Result<(), SlotError> {
        let mut guard = self.qemu.lock().await;
        if let Some(vm) = guard.as_mut() {
            vm.kill().await?;
            tracing::warn!(vm = %self.name, "VM killed");
        }
        *guard = None;
        // Also any QEMU of this VM without a handle (launched by a daemon that died).
        self.kill_strays().await
    }

    /// Kills every QEMU of this VM that the slot holds no handle on (launched by a daemon that
    /// died, or one that could not be adopted); `Ok` once they are gone.
    async fn kill_strays(&self) -> Result<(), SlotError> {
        let strays =
            vmha_qemu::kill_strays(&self.runtime_dir, self.name.as_str(), EXIT_GRACE).await?;
        if strays > 0 {
            tracing::warn!(vm = %self.name, strays, "killed QEMU processes of this VM without a handle");
        }
        Ok(())
    }

    /// Reports `query-status` as a VM monitor observation (the periodic safety poll). The
    /// observation is queued while the slot is locked, so it can never overtake the result
    /// of a later start: a stale "gone" about a dead QEMU cannot land after its successor runs.
    /// A slot busy with a start/stop/kill (or an earlier poll) is skipped: polls never queue
    /// up behind a hung QEMU, nor delay a kill by more than one adoption try. So is one that has
    /// not looked for a running QEMU yet (adoption not begun): its lack of a handle would read
    /// as "gone". A QEMU of this VM that runs without a handle (it could not be adopted) is
    /// tried again ([`VmSlot::adopt_again`]): one that answers again (resumed by
    /// `SIGCONT`, its storage back) is adopted and observed as it is, so its VM is not
    /// restarted for a guest channel that nobody listened to.
    pub async fn poll_status(self: &Arc<Self>) {
        let Ok(mut guard) = self.qemu.try_lock() else {
            tracing::debug!(vm = %self.name, "slot busy: safety poll skipped");
            return;
        };
        if !self.looked.load(Ordering::SeqCst) {
            tracing::debug!(vm = %self.name, "not adopted yet: safety poll skipped");
            return;
        }
        let kind = match guard.as_ref() {
            Some(vm) => vm.status().await,
            None => match self.without_handle() {
                VmObservation::Unresponsive => self.adopt_again(&mut guard).await,
                gone => gone,
            },
        };
        self.send(HostInput::VmObserved {
            vm: self.name.clone(),
            kind,
        })
        .await;
        drop(guard);
    }

    /// Tries once more to adopt this VM's QEMU that runs without a handle; what the slot then
    /// sees: the adopted QEMU's status, else `Unresponsive` again. The try waits for no QEMU
    /// still starting, so a QEMU still stopped costs one QMP greeting timeout (2 s), and it is
    /// never cancelled half-way (a doorbell half plugged would stay so).
    async fn adopt_again(self: &Arc<Self>, slot: &mut Option<QemuVm>) -> VmObservation {
        let config = vmha_qemu::DriverConfig {
            startup_timeout: Duration::ZERO,
            ..self.driver.clone()
        };
        match QemuVm::adopt(&self.runtime_dir, self.name.as_str(), &config).await {
            Ok(vm) => {
                let obs = vm.status().await;
                tracing::warn!(vm = %self.name, pid = vm.pid(), "a QEMU of this VM that did not answer does again: adopted ({obs:?})");
                self.install(slot, vm);
                obs
            }
            Err(e) => {
                tracing::debug!(vm = %self.name, "its QEMU still cannot be adopted: {e}");
                VmObservation::Unresponsive
            }
        }
    }

    fn guest(&self) -> Result<Arc<QgaClient>, ActionError> {
        self.qga()
            .ok_or_else(|| SlotError::NoGuest(self.name.clone()).into())
    }

    /// Runs an app's start or stop command in the guest; `Ok` iff it exits 0.
    pub async fn run_app_command(&self, argv: &[String]) -> Result<(), ActionError> {
        crate::guest::run_app_command(&self.name, &*self.guest()?, argv).await
    }

    /// Runs an operator's command in the guest (capped output, bounded time).
    pub async fn exec(
        &self,
        argv: &[String],
        deadline: Duration,
    ) -> Result<GuestOutput, SlotError> {
        let qga = self
            .qga()
            .ok_or_else(|| SlotError::NoGuest(self.name.clone()))?;
        Ok(crate::guest::exec(&*qga, argv, deadline).await?)
    }

    /// Runs the checks of all due apps in one guest round trip; the outcomes as the guest
    /// gave them (an unreadable answer is [`ProbeOutcome::Unreadable`], judged by the engine).
    pub async fn probe(
        &self,
        checks: &[ProbeCheck],
    ) -> Result<Vec<(Name, ProbeOutcome)>, ActionError> {
        crate::guest::probe(&self.name, &*self.guest()?, checks).await
    }

    /// Runs the VM's watcher for `targets` (replacing any earlier one, in the guest and here)
    /// and asks for its `guest-exec-status` until it ends; its answer as `vmha_qemu::watch`
    /// reads it (untrusted, capped). It asks when [`WatchPolls`] says, from `period` and the
    /// VM's doorbell rings. A watcher replaced by a newer one ends with
    /// [`ActionError::GuestUnreachable`] (the engine ignores it).
    pub async fn watch(
        &self,
        targets: &[WatchTarget],
        period: Duration,
    ) -> Result<WatchReport, ActionError> {
        let mine = self.watch_generation.fetch_add(1, Ordering::SeqCst) + 1;
        let link = self
            .link()
            .ok_or_else(|| ActionError::from(SlotError::NoGuest(self.name.clone())))?;
        let qga = link.qga;
        // This watcher's rings only, not an earlier one's.
        let mut bell = link.bell.later();
        let nonce = vmha_qemu::watch::nonce();
        // The guest looks at the processes three times per poll period: a death waits a third
        // of a period on average before the watcher has ended.
        let tick = (period / 3).max(Duration::from_millis(50));
        let request = vmha_qemu::watch::watch_request(targets, nonce, tick, WATCH_CALL_DEADLINE);
        crate::guest_io::COUNTERS.watcher();
        let pid = qga
            .exec_spawn(&request)
            .await
            .map_err(|e| crate::guest::failed(&self.name, e))?;
        let mut timer = vmha_qemu::timer::Timer::new();
        let mut polls = WatchPolls::new(Instant::now(), period);
        loop {
            let wait = polls.next_poll().saturating_duration_since(Instant::now());
            let ring = tokio::select! {
                () = timer.sleep(wait) => None,
                ring = bell.ring() => Some(ring),
            };
            if let Some(ring) = ring {
                if ring == Ring::Ended {
                    crate::guest_io::COUNTERS.watch_ring();
                }
                if !polls.ring(Instant::now(), ring) {
                    continue;
                }
            }
            crate::guest_io::COUNTERS.watch_poll();
            let status = qga
                .exec_status(pid, &request)
                .await
                .map_err(|e| crate::guest::failed(&self.name, e))?;
            if let Some(output) = status {
                return Ok(vmha_qemu::watch::parse_watch(targets, nonce, &output));
            }
            if self.watch_generation.load(Ordering::SeqCst) != mine {
                // Killed in the guest by its successor; reaped by a last poll when it has
                // exited, so the agent keeps no record of it.
                return Err(ActionError::GuestUnreachable {
                    detail: "replaced by a newer watcher".into(),
                });
            }
            // Rung before the agent saw the exit (a busy guest), or for nothing (a confused or
            // hostile guest, a late ring of an earlier watcher), or not rung at all.
            polls.still_running(Instant::now(), bell.armed());
        }
    }

    /// Pings the guest agent within `timeout`; with `check_exec`, also reads `guest-info` (in
    /// `timeout` again) and answers [`ActionError::ExecBlocked`] when `guest-exec` is blocked.
    /// Each call is bounded by the QGA client itself, which resyncs after any failed call.
    pub async fn ping(&self, timeout: Duration, check_exec: bool) -> Result<(), ActionError> {
        crate::guest::ping(&self.name, &*self.guest()?, timeout, check_exec).await
    }
}

/// Maps the configuration of a `qemu` VM onto the driver's launch spec (`None` for libvirt).
fn launch_spec(vm: &Vm) -> Option<LaunchSpec> {
    let Driver::Qemu(q) = &vm.driver else {
        return None;
    };
    Some(LaunchSpec {
        name: vm.name.to_string(),
        memory_mb: u32::try_from(q.memory_mb).unwrap_or(u32::MAX),
        cpus: q.cpus,
        disks: q
            .disks
            .iter()
            .map(|d| vmha_qemu::Disk {
                path: d.path.clone(),
                format: serde_plain(&d.format),
                cache: serde_plain(&d.cache),
            })
            .collect(),
        kernel: q.kernel.clone(),
        initrd: q.initrd.clone(),
        append: q.append.clone(),
        accel: match q.accel {
            Accel::Auto => vmha_qemu::Accel::Auto,
            Accel::Kvm => vmha_qemu::Accel::Kvm,
            Accel::Tcg => vmha_qemu::Accel::Tcg,
        },
        extra_args: q.extra_args.clone(),
        emulator: q.emulator.clone(),
    })
}

/// The config spelling of a unit enum (`"qcow2"`, `"none"`), as QEMU also spells it.
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Turns one QEMU's events into VM monitor inputs, as they are, until it is gone.
async fn pump(
    slot: Arc<VmSlot>,
    generation: u64,
    qmp: QmpClient,
    mut events: tokio::sync::mpsc::Receiver<VmEvent>,
) {
    while let Some(event) = events.recv().await {
        // Nothing to report about a replaced QEMU, nor to a core that is gone (vmhad exits).
        if slot.generation.load(Ordering::SeqCst) != generation || slot.tx.is_closed() {
            return;
        }
        // `STOP` carries no reason: the driver asks `query-status` for it.
        let Some(kind) = event.observation(&qmp).await else {
            continue;
        };
        let gone = kind == VmObservation::Gone;
        if let Ok(mut g) = slot.qga.lock() {
            // Nothing about a QEMU replaced meanwhile, never the channel of its successor.
            if slot.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            if gone {
                *g = None;
            }
        }
        slot.send(HostInput::VmObserved {
            vm: slot.name.clone(),
            kind,
        })
        .await;
        if gone {
            return;
        }
    }
}

/// Test hook, in debug builds only: while the file named by `$VMHAD_TEST_HOLD_ADOPTION` exists,
/// adoptions wait before they look for their VM (as behind a slow QMP socket), so that tests
/// can see `READY=1` wait for every adoption.
#[cfg(debug_assertions)]
async fn test_hold_adoption() {
    if let Some(file) = std::env::var_os("VMHAD_TEST_HOLD_ADOPTION") {
        let file = std::path::PathBuf::from(file);
        while file.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::inbox::Msg;
    use tokio::sync::mpsc;

    fn slot() -> (Arc<VmSlot>, mpsc::Receiver<Msg>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = vmha_model::Config::from_toml_str(
            r#"
[cluster]
name = "t"
store = "embedded"

[[host]]
name = "kvm1"

[[vm]]
name = "vm1"
driver = "qemu"
hosts = ["kvm1"]

[vm.qemu]
memory_mb = 64
kernel = "/nonexistent/vmlinuz"
"#,
            "test.toml",
        )
        .unwrap();
        let (tx, rx) = HostInputs::for_test();
        let fence = Fence::new(crate::fence::FenceRule::Never, Vec::new());
        let slot = VmSlot::new(&config.vms[0], dir.path().to_path_buf(), tx, fence);
        (slot, rx, dir)
    }

    /// A daemon restarted next to its running VM: a safety poll that comes before the slot
    /// has looked for that VM must not report it gone (the engine would restart it).
    #[tokio::test]
    async fn no_safety_poll_before_adoption() {
        let (slot, mut rx, _dir) = slot();
        slot.poll_status().await;
        assert!(rx.try_recv().is_err(), "a poll before adoption reported");
        // Nothing to adopt here: adoption says so, and polls report from then on.
        Arc::clone(&slot).adopt().await;
        let Some(Msg::Host(HostInput::VmObserved { kind, .. })) = rx.recv().await else {
            panic!("expected adoption's observation");
        };
        assert_eq!(kind, VmObservation::Gone);
        slot.poll_status().await;
        assert!(matches!(
            rx.recv().await,
            Some(Msg::Host(HostInput::VmObserved { .. }))
        ));
    }

    /// Safety polls must not queue up behind a long start/stop/kill holding the slot: with a
    /// hung QEMU they would pile up without bound and delay a fencing kill behind them.
    #[tokio::test]
    async fn safety_polls_do_not_queue_behind_a_busy_slot() {
        let (slot, mut rx, _dir) = slot();
        slot.looked.store(true, Ordering::SeqCst);
        let busy = slot.qemu.lock().await;
        let polls: Vec<_> = (0..3)
            .map(|_| {
                let slot = Arc::clone(&slot);
                tokio::spawn(async move { slot.poll_status().await })
            })
            .collect();
        for poll in polls {
            tokio::time::timeout(Duration::from_secs(2), poll)
                .await
                .expect("a poll waited for the busy slot")
                .unwrap();
        }
        drop(busy);
        // An idle slot is polled as usual.
        slot.poll_status().await;
        let Some(Msg::Host(HostInput::VmObserved { kind, .. })) = rx.recv().await else {
            panic!("expected an observation");
        };
        assert_eq!(kind, VmObservation::Gone);
        assert!(rx.try_recv().is_err(), "skipped polls must report nothing");
    }
}
