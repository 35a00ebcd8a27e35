//! vmha-qemu: the QEMU driver of vmha — QMP and QGA clients, batched app probes, and the VM
//! lifecycle (launch, adopt, stop, kill). Every byte from a guest is untrusted: lines are capped,
//! outputs are capped, every call has a timeout, and malformed input is an error for that VM
//! only, never a panic.

pub mod framing;
pub mod probe;
pub mod qga;
pub mod qmp;
pub mod reply;
pub mod vm;

pub use probe::{ProbeCheck, ProbeError, ProbeOutcome, ProbeResult, UnknownReason};
pub use qga::{ExecOutput, ExecRequest, ExitStatus, GuestInfo, QgaClient, QgaConfig, QgaError};
pub use qmp::{QmpClient, QmpConfig, QmpError, QmpEvent, QmpEvents, RunStatus};
pub use vm::{
    Accel, Disk, DriverConfig, LaunchSpec, QemuVm, StopOutcome, VmError, VmEvent, VmPaths, VmStatus,
};
