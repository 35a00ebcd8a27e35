//! One VM of this host as the driver sees it: its QEMU (launched or adopted), the pump that
//! turns its QMP events into VM monitor inputs, and the watcher of its guest channel.
//!
//! Every operation here is idempotent: starting a running VM, stopping a stopped one or
//! killing a dead one succeeds without doing anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use vmha_api::GuestOutput;
use vmha_engine::{HostInput, VmObservation};
use vmha_model::{Accel, Driver, Name, Vm};
use vmha_qemu::{
    DriverConfig, ExecRequest, ExitStatus, LaunchSpec, ProbeResult, QemuVm, QgaClient, QgaError,
    QmpEvent, RunStatus, VmEvent, VmStatus,
};

use crate::fence::Fence;
use crate::inbox::HostInputs;

/// Why a driver operation failed (reported to the engine as the action's error text).
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The VM's driver is not supported by this build.
    #[error("VM {0}: driver `libvirt` is not supported by this vmhad build")]
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
    /// A guest command failed.
    #[error("{0}")]
    Command(String),
    /// The daemon is exiting with `--stop-vms-on-exit`: no VM is started any more.
    #[error("VM {0} not started: vmhad is exiting and stopping its VMs")]
    Exiting(Name),
    /// This host has fenced itself (or its lease is overdue): no VM may start.
    #[error("VM {0} not started: this host's lease is not live (self-fenced)")]
    Fenced(Name),
    /// The guest agent refuses `guest-exec` (its configuration blocks it).
    #[error("guest agent of VM {vm} blocks guest-exec: {detail}")]
    ExecBlocked {
        /// The VM.
        vm: Name,
        /// What the agent said.
        detail: String,
    },
}

/// Time a start/stop command of an app may take in the guest.
const APP_COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// Time a QEMU whose QMP socket closed gets to exit before a start gives up on it.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// Guest channel ping period while it is down (boot, agent restart).
const GUEST_DOWN_PERIOD: Duration = Duration::from_millis(250);
/// Guest channel ping period while it is up and no probe proved it recently.
const GUEST_UP_PERIOD: Duration = Duration::from_secs(2);

/// One VM of this host.
pub struct VmSlot {
    name: Name,
    spec: Option<LaunchSpec>,
    runtime_dir: PathBuf,
    driver: DriverConfig,
    qemu: Mutex<Option<QemuVm>>,
    qga: std::sync::Mutex<Option<Arc<QgaClient>>>,
    /// Bumped on every launch/adopt (under the `qga` lock, together with the new client) so
    /// the pump and guest-channel reports about an earlier QEMU fall silent.
    generation: AtomicU64,
    /// Set when the daemon stops its VMs on exit: a start still in flight must not launch.
    closing: AtomicBool,
    guest_up: AtomicBool,
    /// The guest agent refuses `guest-exec` (as last reported to the engine).
    exec_blocked: AtomicBool,
    /// Milliseconds (monotonic, since daemon start) of the last proof of a live guest channel.
    guest_seen: AtomicU64,
    poke: Notify,
    tx: HostInputs,
    fence: Arc<Fence>,
    epoch: tokio::time::Instant,
}

impl VmSlot {
    /// A slot for `vm`, reporting to the core through `tx`; it starts nothing while `fence`
    /// says the host may not run VMs.
    pub fn new(vm: &Vm, runtime_dir: PathBuf, tx: HostInputs, fence: Arc<Fence>) -> Arc<Self> {
        let slot = Arc::new(VmSlot {
            name: vm.name.clone(),
            spec: launch_spec(vm),
            runtime_dir,
            driver: DriverConfig::default(),
            qemu: Mutex::new(None),
            qga: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            guest_up: AtomicBool::new(false),
            exec_blocked: AtomicBool::new(false),
            guest_seen: AtomicU64::new(0),
            poke: Notify::new(),
            tx,
            fence,
            epoch: tokio::time::Instant::now(),
        });
        tokio::spawn(guest_watcher(Arc::clone(&slot)));
        slot
    }

    async fn send(&self, input: HostInput) {
        // The core is gone only when the daemon exits.
        let _ = self.tx.send(input).await;
    }

    fn qga(&self) -> Option<Arc<QgaClient>> {
        self.qga.lock().ok().and_then(|g| g.clone())
    }

    /// The current guest channel with the generation of the QEMU it belongs to.
    fn current_qga(&self) -> Option<(u64, Arc<QgaClient>)> {
        let g = self.qga.lock().ok()?;
        let qga = g.clone()?;
        Some((self.generation.load(Ordering::SeqCst), qga))
    }

    /// Whether the guest channel of QEMU `generation` is still the current, live one.
    fn qga_is_current(&self, generation: u64) -> bool {
        self.qga
            .lock()
            .is_ok_and(|g| g.is_some() && self.generation.load(Ordering::SeqCst) == generation)
    }

    fn mark_guest_seen(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.guest_seen.store(ms, Ordering::Relaxed);
    }

    /// Installs a launched or adopted QEMU and starts pumping its events.
    fn install(self: &Arc<Self>, slot: &mut Option<QemuVm>, mut vm: QemuVm) {
        let generation = match self.qga.lock() {
            Ok(mut g) => {
                *g = Some(vm.qga());
                self.generation.fetch_add(1, Ordering::SeqCst) + 1
            }
            Err(_) => self.generation.fetch_add(1, Ordering::SeqCst) + 1,
        };
        self.guest_up.store(false, Ordering::SeqCst);
        if let Some(events) = vm.take_events() {
            tokio::spawn(pump(Arc::clone(self), generation, events));
        }
        *slot = Some(vm);
        self.poke.notify_one();
    }

    /// Reattaches to a QEMU left running by an earlier daemon and reports what it found.
    pub async fn adopt(self: &Arc<Self>) {
        let mut guard = self.qemu.lock().await;
        let observation =
            match QemuVm::adopt(&self.runtime_dir, self.name.as_str(), &self.driver).await {
                Ok(vm) => {
                    let obs = observation_of(&vm.status().await);
                    tracing::info!(vm = %self.name, pid = vm.pid(), "adopted running VM");
                    self.install(&mut guard, vm);
                    obs
                }
                Err(e) => {
                    tracing::debug!(vm = %self.name, "nothing to adopt: {e}");
                    VmObservation::Gone
                }
            };
        drop(guard);
        if observation == VmObservation::Paused {
            // The engine learns of a paused VM as a running one whose vCPUs are stopped;
            // `Paused` alone would leave it unknown (and unmanaged) for as long as it is paused.
            self.send(HostInput::VmObserved {
                vm: self.name.clone(),
                kind: VmObservation::Running,
            })
            .await;
        }
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
            .as_ref()
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
        match QemuVm::launch(spec, &self.runtime_dir, &self.driver).await {
            Ok(vm) => {
                tracing::info!(vm = %self.name, pid = vm.pid(), "QEMU started");
                self.install(&mut guard, vm);
                Ok(())
            }
            Err(vmha_qemu::VmError::AlreadyRunning(_)) if self.reattach(&mut guard).await => Ok(()),
            Err(e) => Err(e.into()),
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

    /// Stops the VM gracefully, forcing after `timeout`; `Ok` once QEMU is gone.
    pub async fn stop(self: &Arc<Self>, timeout: Duration) -> Result<(), SlotError> {
        let mut guard = self.qemu.lock().await;
        self.reattach(&mut guard).await;
        if let Some(vm) = guard.as_mut() {
            let how = vm.stop(timeout).await?;
            tracing::info!(vm = %self.name, ?how, "VM stopped");
        }
        *guard = None;
        Ok(())
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
    /// up behind a hung QEMU, nor delay a kill.
    pub async fn poll_status(&self) {
        let Ok(guard) = self.qemu.try_lock() else {
            tracing::debug!(vm = %self.name, "slot busy: safety poll skipped");
            return;
        };
        let kind = match guard.as_ref() {
            Some(vm) => observation_of(&vm.status().await),
            None => VmObservation::Gone,
        };
        self.send(HostInput::VmObserved {
            vm: self.name.clone(),
            kind,
        })
        .await;
        drop(guard);
    }

    /// Runs an app's start or stop command in the guest; `Ok` iff it exits 0.
    pub async fn run_app_command(&self, argv: &[String]) -> Result<(), SlotError> {
        let qga = self
            .qga()
            .ok_or_else(|| SlotError::NoGuest(self.name.clone()))?;
        let mut request = ExecRequest::new(argv.iter().cloned());
        request.deadline = APP_COMMAND_DEADLINE;
        request.output_cap = 4096;
        let out = qga.exec(&request).await.map_err(|e| self.guest_error(e))?;
        self.mark_guest_seen();
        match out.status {
            ExitStatus::Code(0) => Ok(()),
            status => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stderr: String = stderr
                    .chars()
                    .filter(|c| !c.is_control() || *c == ' ')
                    .take(200)
                    .collect();
                let how = match status {
                    ExitStatus::Code(c) => format!("exited {c}"),
                    ExitStatus::Signal(s) => format!("killed by signal {s}"),
                };
                Err(SlotError::Command(if stderr.trim().is_empty() {
                    format!("`{}` {how}", argv.join(" "))
                } else {
                    format!("`{}` {how}: {}", argv.join(" "), stderr.trim())
                }))
            }
        }
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
        let mut request = ExecRequest::new(argv.iter().cloned());
        request.deadline = deadline;
        request.output_cap = 64 << 10;
        let out = qga.exec(&request).await?;
        self.mark_guest_seen();
        let (exit, signal) = match out.status {
            ExitStatus::Code(c) => (Some(c), None),
            ExitStatus::Signal(s) => (None, Some(s)),
        };
        Ok(GuestOutput {
            exit,
            signal,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            truncated: out.stdout_truncated || out.stderr_truncated,
        })
    }

    /// Runs the checks of all due apps in one guest round trip.
    pub async fn probe(
        &self,
        checks: &[vmha_engine::ProbeCheck],
    ) -> Result<Vec<(Name, vmha_engine::ProbeOutcome)>, SlotError> {
        use vmha_engine::ProbeOutcome as O;
        let qga = self
            .qga()
            .ok_or_else(|| SlotError::NoGuest(self.name.clone()))?;
        let driver_checks: Vec<vmha_qemu::ProbeCheck> = checks
            .iter()
            .map(|c| vmha_qemu::ProbeCheck {
                name: c.app.to_string(),
                argv: c.argv.clone(),
                timeout: c.timeout,
            })
            .collect();
        let outcomes = qga
            .probe(&driver_checks, Duration::from_secs(2))
            .await
            .map_err(|vmha_qemu::ProbeError::Channel(e)| self.guest_error(e))?;
        self.mark_guest_seen();
        Ok(checks
            .iter()
            .zip(outcomes)
            .map(|(check, outcome)| {
                let o = match outcome.result {
                    ProbeResult::Running => O::Running,
                    ProbeResult::NotRunning(ExitStatus::Code(c)) => O::NotRunning { exit: c },
                    ProbeResult::NotRunning(ExitStatus::Signal(s)) => {
                        O::NotRunning { exit: 128 + s }
                    }
                    // Unknown = no trustworthy answer: counts like a timeout (probe_failures).
                    ProbeResult::TimedOut | ProbeResult::Unknown(_) => O::TimedOut,
                };
                (check.app.clone(), o)
            })
            .collect())
    }

    /// Classifies a guest channel error: a refused `guest-exec` is not a channel failure.
    fn guest_error(&self, e: QgaError) -> SlotError {
        match e {
            QgaError::ExecBlocked { detail } => SlotError::ExecBlocked {
                vm: self.name.clone(),
                detail,
            },
            other => SlotError::Guest(other),
        }
    }

    /// Tells the engine whether `guest-exec` is allowed, when that changed (or `force`).
    async fn report_exec(&self, allowed: bool, force: bool) {
        let was_blocked = self.exec_blocked.swap(!allowed, Ordering::SeqCst);
        if force || was_blocked == allowed {
            if !allowed {
                tracing::warn!(vm = %self.name, "the guest agent blocks guest-exec: apps cannot be monitored");
            }
            self.send(HostInput::GuestExec {
                vm: self.name.clone(),
                allowed,
            })
            .await;
        }
    }

    /// Reports a refused `guest-exec` (answers a probe in flight, see the engine's contract).
    pub async fn exec_refused(&self) {
        self.report_exec(false, true).await;
    }

    /// Whether the guest channel is believed up.
    pub fn guest_up(&self) -> bool {
        self.guest_up.load(Ordering::SeqCst)
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
    })
}

/// The config spelling of a unit enum (`"qcow2"`, `"none"`), as QEMU also spells it.
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn observation_of(status: &VmStatus) -> VmObservation {
    match status {
        VmStatus::Qemu(RunStatus { running: true, .. }) => VmObservation::Running,
        VmStatus::Qemu(RunStatus { status, .. }) if status == "shutdown" => {
            VmObservation::Stopped { by_guest: true }
        }
        VmStatus::Qemu(RunStatus { status, .. })
            if status == "guest-panicked" || status == "internal-error" =>
        {
            VmObservation::Panicked
        }
        VmStatus::Qemu(_) => VmObservation::Paused,
        VmStatus::Gone => VmObservation::Gone,
        // A QEMU that does not answer QMP properly is still there; the next poll decides.
        VmStatus::Unresponsive(_) => VmObservation::Running,
    }
}

/// Turns one QEMU's events into VM monitor inputs until it is gone.
async fn pump(
    slot: Arc<VmSlot>,
    generation: u64,
    mut events: tokio::sync::mpsc::Receiver<VmEvent>,
) {
    while let Some(event) = events.recv().await {
        if slot.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let kind = match event {
            VmEvent::Exited(_) | VmEvent::Qmp(QmpEvent::Gone) => Some(VmObservation::Gone),
            VmEvent::Qmp(QmpEvent::Shutdown { guest, .. }) => {
                Some(VmObservation::Stopped { by_guest: guest })
            }
            VmEvent::Qmp(QmpEvent::Reset { .. }) => Some(VmObservation::Reset),
            VmEvent::Qmp(QmpEvent::Stop) => Some(VmObservation::Paused),
            VmEvent::Qmp(QmpEvent::Resume) => Some(VmObservation::Resumed),
            VmEvent::Qmp(QmpEvent::GuestPanicked { .. } | QmpEvent::Watchdog { .. }) => {
                Some(VmObservation::Panicked)
            }
            VmEvent::Qmp(QmpEvent::VserportChange { .. }) => {
                slot.poke.notify_one();
                None
            }
            VmEvent::Qmp(_) => None,
        };
        if let Some(kind) = kind {
            let gone = kind == VmObservation::Gone;
            if gone {
                if let Ok(mut g) = slot.qga.lock() {
                    // Never the channel of a successor installed meanwhile.
                    if slot.generation.load(Ordering::SeqCst) != generation {
                        return;
                    }
                    *g = None;
                }
                slot.guest_up.store(false, Ordering::SeqCst);
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
}

/// Watches the guest channel: pings it while it is down (boot) or while no probe proved it
/// alive recently, and reports each up/down transition.
async fn guest_watcher(slot: Arc<VmSlot>) {
    loop {
        let up = slot.guest_up();
        let period = if up {
            GUEST_UP_PERIOD
        } else {
            GUEST_DOWN_PERIOD
        };
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = slot.poke.notified() => {}
        }
        if slot.tx.is_closed() {
            return;
        }
        let Some((generation, qga)) = slot.current_qga() else {
            continue;
        };
        let now_ms = u64::try_from(slot.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let seen = slot.guest_seen.load(Ordering::Relaxed);
        let blocked = slot.exec_blocked.load(Ordering::SeqCst);
        if up && !blocked && now_ms.saturating_sub(seen) < 2_000 {
            continue;
        }
        // While up, a long probe may hold the channel: only a long silence counts as loss.
        let timeout = if up {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(800)
        };
        let alive = matches!(
            tokio::time::timeout(timeout, qga.call("guest-ping", None, timeout)).await,
            Ok(Ok(_))
        );
        if alive {
            slot.mark_guest_seen();
        }
        let coming_up = alive && !slot.guest_up();
        if alive && (coming_up || blocked) {
            // Whether guest-exec is allowed: on every connect (before "up", so the engine
            // never tries to start apps it cannot), and again while it is blocked.
            let info = tokio::time::timeout(timeout, qga.info()).await;
            let allowed = match info {
                Ok(Ok(info)) => info.check_exec().is_ok(),
                _ => !blocked,
            };
            // Nothing about a QEMU that was replaced (or died) during the calls above.
            if !slot.qga_is_current(generation) {
                continue;
            }
            slot.report_exec(allowed, coming_up).await;
        }
        if alive != slot.guest_up() && slot.qga_is_current(generation) {
            slot.guest_up.store(alive, Ordering::SeqCst);
            slot.send(HostInput::GuestChannel {
                vm: slot.name.clone(),
                up: alive,
            })
            .await;
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
        let fence = Fence::new(Duration::from_secs(60), false, Vec::new());
        let slot = VmSlot::new(&config.vms[0], dir.path().to_path_buf(), tx, fence);
        (slot, rx, dir)
    }

    /// Safety polls must not queue up behind a long start/stop/kill holding the slot: with a
    /// hung QEMU they would pile up without bound and delay a fencing kill behind them.
    #[tokio::test]
    async fn safety_polls_do_not_queue_behind_a_busy_slot() {
        let (slot, mut rx, _dir) = slot();
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
