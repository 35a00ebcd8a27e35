//! vmha-qemu: the QEMU driver of vmha — the host daemon's eyes and hands on its VMs.
//!
//! Every byte from a guest is untrusted: lines are framed as raw bytes with a length cap,
//! captured output is capped, every call has a timeout, and malformed input is a typed error
//! for that VM only — never a panic, never a stall of another VM.
//!
//! # Use from a daemon (one task per VM)
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use vmha_qemu::*;
//!
//! let spec = LaunchSpec {
//!     name: "db01".into(), memory_mb: 2048, cpus: 2,
//!     disks: vec![Disk { path: "/shared/db01.qcow2".into(), format: "qcow2".into(), cache: "none".into() }],
//!     kernel: None, initrd: None, append: None, accel: Accel::Auto, extra_args: vec![], emulator: None,
//! };
//! let runtime_dir = std::path::Path::new("/run/vmha");
//! let mut vm = QemuVm::launch(&spec, runtime_dir, &DriverConfig::default()).await?;
//! // After a daemon restart instead: QemuVm::adopt(runtime_dir, "db01", &config).await?
//! let mut events = vm.take_events().expect("first take");   // VmEvent::Qmp(QmpEvent::…) / Exited
//! let qga = vm.qga();                                        // Arc<QgaClient>, shareable
//! let checks = vec![ProbeCheck {
//!     app: vmha_model::Name::new("postgres")?,
//!     argv: vec!["systemctl".into(), "is-active".into(), "--quiet".into(), "postgresql".into()],
//!     timeout: Duration::from_secs(5),
//! }];
//! let outcomes = qga.probe(&checks, Duration::from_secs(5)).await?; // one guest round trip
//! let _ = (outcomes, vm.status().await);                    // a VmObservation
//! vm.stop(Duration::from_secs(60)).await?;                  // agent/ACPI, then quit, then SIGKILL
//! # let _ = events.recv().await; Ok(()) }
//! ```
//!
//! What the driver observes is reported as it is, in the types it shares with the engine
//! (`vmha_model::observation`: [`ProbeOutcome`], [`VmObservation`] with its [`PauseReason`],
//! [`ExitStatus`]); the engine judges it.
//!
//! # Modules
//! - [`qmp`]: [`QmpClient`] — greeting with timeout, `qmp_capabilities`, one reader task,
//!   commands matched by `id`, typed [`QmpEvent`]s ending with [`QmpEvent::Gone`].
//! - [`qga`]: [`QgaClient`] — resync (`0xFF` + `guest-sync-delimited`) on every connect and after
//!   every dropped call, timeout or protocol error; only a reply with the request's id answers
//!   it; per-command line caps, typed parsing, byte budgets and a rate limit (a guest that
//!   exceeds them is [`QgaError::Hostile`]); `ping`, `info`, `exec`, `shutdown`.
//! - [`probe`]: [`QgaClient::probe`] — all app checks of a VM in one `guest-exec`.
//! - [`vm`]: [`QemuVm`] — launch (own process group), adopt, status, stop, kill, events.
//! - [`doorbell`]: [`doorbell::Doorbell`] — the watcher rings vmhad through a second
//!   virtio-serial port instead of waiting to be polled.
//! - [`timer`]: sleeps that wake the runtime once (a `timerfd`), not twice (tokio's wheel).
//! - [`framing`], [`reply`]: the byte-level line framer and the total reply parser.
//! - [`guest_text`]: guest strings made safe for errors, logs, events and API answers.

pub mod doorbell;
pub mod framing;
pub mod guest_text;
pub mod migration;
pub mod probe;
pub mod qga;
pub mod qmp;
pub mod reply;
pub mod timer;
pub mod vm;
pub mod watch;

pub use migration::{MigrationError, MigrationLimits, MigrationStats};
pub use probe::ProbeError;
pub use qga::{ExecOutput, ExecRequest, GuestInfo, QgaClient, QgaConfig, QgaError};
pub use qmp::{QmpClient, QmpConfig, QmpError, QmpEvent, QmpEvents, RunStatus, pause_reason};
pub use vm::{
    Accel, Disk, DriverConfig, LaunchSpec, QemuVm, StopOutcome, VmError, VmEvent, VmPaths,
};
pub use vm::{kill_strays, qemu_processes};
/// What the driver reports, in the vocabulary it shares with the engine (owned by
/// `vmha-model`).
pub use vmha_model::{
    ExitStatus, PauseReason, ProbeCheck, ProbeOutcome, Unreadable, VmObservation,
};
