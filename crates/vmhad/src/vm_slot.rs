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
use vmha_api::GuestOutput;
use vmha_engine::{ActionError, ExitStatus, HostInput, ProbeCheck, ProbeOutcome, VmObservation};
use vmha_model::{Accel, Driver, Name, Vm};
use vmha_qemu::{
    DriverConfig, ExecRequest, LaunchSpec, QemuVm, QgaClient, QgaError, QmpClient, VmEvent,
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
    /// The daemon is exiting with `--stop-vms-on-exit`: no VM is started any more.
    #[error("VM {0} not started: vmhad is exiting and stopping its VMs")]
    Exiting(Name),
    /// This host has fenced itself (or its lease is overdue): no VM may start.
    #[error("VM {0} not started: this host's lease is not live (self-fenced)")]
    Fenced(Name),
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
            SlotError::Guest(e) => guest_error(e),
            SlotError::Vm(_) | SlotError::Exiting(_) | SlotError::Fenced(_) => {
                ActionError::Driver {
                    detail: e.to_string(),
                }
            }
        }
    }
}

/// What a guest-channel error means: a refused `guest-exec` is the agent's configuration, an
/// error the agent returned for `guest-exec` is the command's (it could not be started), a
/// command still running at its deadline timed out, an agent disconnected for sending too much
/// is hostile (the engine reports it in an event); anything else is the channel failing.
fn guest_error(e: QgaError) -> ActionError {
    match e {
        QgaError::ExecBlocked { detail } => ActionError::ExecBlocked { detail },
        QgaError::Remote { command, error } if command == "guest-exec" => {
            ActionError::CommandFailed {
                status: None,
                stderr: error.to_string(),
            }
        }
        QgaError::Hostile { reason, .. } => ActionError::GuestHostile { detail: reason },
        other => ActionError::GuestUnreachable {
            detail: other.to_string(),
        },
    }
}

/// The `kind` label of `vmha_guest_channel_errors_total` for a guest-channel error.
fn guest_error_kind(e: &QgaError) -> &'static str {
    match e {
        QgaError::Connect { .. } => "connect",
        QgaError::Timeout { .. } => "timeout",
        QgaError::Disconnected => "disconnected",
        QgaError::Remote { .. } => "agent-error",
        QgaError::Malformed { .. } => "malformed",
        QgaError::WrongId { .. } => "wrong-id",
        QgaError::LineTooLong { .. } => "line-too-long",
        QgaError::ExecBlocked { .. } => "exec-blocked",
        QgaError::ExecDeadline { .. } => "exec-deadline",
        QgaError::Write(_) => "write",
        QgaError::Hostile { .. } => "hostile",
    }
}

/// Time a start/stop command of an app may take in the guest.
const APP_COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// Output kept of an app's start/stop command (its stderr goes into the reason).
const APP_COMMAND_OUTPUT: usize = 4096;
/// Output kept of an operator's guest command.
const OPERATOR_OUTPUT: usize = 64 << 10;
/// Time a QEMU whose QMP socket closed gets to exit before a start gives up on it.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// Time the guest channel's own round trips may add to a probe's longest check.
const PROBE_SLACK: Duration = Duration::from_secs(2);

/// One VM of this host.
pub struct VmSlot {
    name: Name,
    /// How to launch it (changed by a new configuration; used at the next start).
    spec: std::sync::Mutex<Option<LaunchSpec>>,
    runtime_dir: PathBuf,
    driver: DriverConfig,
    qemu: Mutex<Option<QemuVm>>,
    qga: std::sync::Mutex<Option<Arc<QgaClient>>>,
    /// Bumped on every launch/adopt (under the `qga` lock, together with the new client) so
    /// the pump of an earlier QEMU falls silent.
    generation: AtomicU64,
    /// Set when the daemon stops its VMs on exit: a start still in flight must not launch.
    closing: AtomicBool,
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
            closing: AtomicBool::new(false),
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

    fn qga(&self) -> Option<Arc<QgaClient>> {
        self.qga.lock().ok().and_then(|g| g.clone())
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
        if let Some(events) = vm.take_events() {
            let qmp = vm.qmp().clone();
            tokio::spawn(pump(Arc::clone(self), generation, qmp, events));
        }
        *slot = Some(vm);
    }

    /// Reattaches to a QEMU left running by an earlier daemon and reports what it found, as
    /// it is (running, paused with its reason, unresponsive, or gone).
    pub async fn adopt(self: &Arc<Self>) {
        let mut guard = self.qemu.lock().await;
        let observation =
            match QemuVm::adopt(&self.runtime_dir, self.name.as_str(), &self.driver).await {
                Ok(vm) => {
                    let obs = vm.status().await;
                    tracing::info!(vm = %self.name, pid = vm.pid(), "adopted running VM: {obs:?}");
                    self.install(&mut guard, vm);
                    obs
                }
                Err(e) => {
                    tracing::debug!(vm = %self.name, "nothing to adopt: {e}");
                    VmObservation::Gone
                }
            };
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
            Some(vm) => vm.status().await,
            None => VmObservation::Gone,
        };
        self.send(HostInput::VmObserved {
            vm: self.name.clone(),
            kind,
        })
        .await;
        drop(guard);
    }

    /// A guest-channel error of an engine's action: counted in the metrics, then translated.
    fn guest_failed(&self, e: QgaError) -> ActionError {
        crate::metrics::METRICS.guest_error(self.name.as_str(), guest_error_kind(&e));
        guest_error(e)
    }

    fn guest(&self) -> Result<Arc<QgaClient>, ActionError> {
        self.qga()
            .ok_or_else(|| SlotError::NoGuest(self.name.clone()).into())
    }

    /// Runs an app's start or stop command in the guest; `Ok` iff it exits 0.
    pub async fn run_app_command(&self, argv: &[String]) -> Result<(), ActionError> {
        let qga = self.guest()?;
        let request = exec_request(argv, APP_COMMAND_DEADLINE, APP_COMMAND_OUTPUT);
        let out = match qga.exec(&request).await {
            Ok(out) => out,
            Err(QgaError::ExecDeadline { .. }) => {
                return Err(ActionError::CommandTimedOut {
                    after_ms: vmha_model::duration::millis(APP_COMMAND_DEADLINE),
                });
            }
            Err(e) => return Err(self.guest_failed(e)),
        };
        if out.status == ExitStatus::Code(0) {
            return Ok(());
        }
        // Guest text goes into event reasons: no control or format characters, bounded.
        let stderr = vmha_qemu::guest_text::guest_bytes(&out.stderr);
        Err(ActionError::CommandFailed {
            status: Some(out.status),
            stderr: stderr.trim().to_string(),
        })
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
        let out = qga
            .exec(&exec_request(argv, deadline, OPERATOR_OUTPUT))
            .await?;
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

    /// Runs the checks of all due apps in one guest round trip; the outcomes as the guest
    /// gave them (an unreadable answer is [`ProbeOutcome::Unreadable`], judged by the engine).
    pub async fn probe(
        &self,
        checks: &[ProbeCheck],
    ) -> Result<Vec<(Name, ProbeOutcome)>, ActionError> {
        let qga = self.guest()?;
        qga.probe(checks, PROBE_SLACK)
            .await
            .map_err(|vmha_qemu::ProbeError::Channel(e)| self.guest_failed(e))
    }

    /// Pings the guest agent within `timeout`; with `check_exec`, also reads `guest-info` (in
    /// `timeout` again) and answers [`ActionError::ExecBlocked`] when `guest-exec` is blocked.
    /// Each call is bounded by the QGA client itself, which resyncs after any failed call.
    pub async fn ping(&self, timeout: Duration, check_exec: bool) -> Result<(), ActionError> {
        let qga = self.guest()?;
        qga.ping_within(timeout)
            .await
            .map_err(|e| self.guest_failed(e))?;
        if check_exec {
            let info = qga
                .info_within(timeout)
                .await
                .map_err(|e| self.guest_failed(e))?;
            info.check_exec().map_err(|e| self.guest_failed(e))?;
        }
        Ok(())
    }
}

/// A guest command as the driver runs it: the one place an engine's or an operator's argv
/// becomes a `vmha_qemu::ExecRequest`.
fn exec_request(argv: &[String], deadline: Duration, output_cap: usize) -> ExecRequest {
    let mut request = ExecRequest::new(argv.iter().cloned());
    request.deadline = deadline;
    request.output_cap = output_cap;
    request
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::inbox::Msg;
    use tokio::sync::mpsc;

    #[test]
    fn a_hostile_guest_is_its_own_error_kind_with_the_reason() {
        let e = guest_error(QgaError::Hostile {
            reason: "sent more than 42 bytes".into(),
            retry_in: Duration::from_secs(1),
        });
        assert_eq!(
            e,
            ActionError::GuestHostile {
                detail: "sent more than 42 bytes".into()
            }
        );
        assert!(matches!(
            guest_error(QgaError::Disconnected),
            ActionError::GuestUnreachable { .. }
        ));
    }

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
