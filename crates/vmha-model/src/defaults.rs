//! Every configuration default, written once. `docs/config.md` documents the same values;
//! the resolved configuration (`vmha config show`) prints them explicitly.

use std::time::Duration;

/// Directory for the embedded store, the event log and the daemon's API socket.
pub const STATE_DIR: &str = "/var/lib/vmha";
/// Directory for per-VM runtime files (QMP/QGA sockets, pidfiles, console logs).
pub const RUNTIME_DIR: &str = "/run/vmha";
/// etcd lease time-to-live of a host (etcd's minimum is 2 s).
pub const TTL: Duration = Duration::from_secs(3);
/// A host that has not renewed its lease for `ttl - fence_margin` kills its HA VMs.
pub const FENCE_MARGIN: Duration = Duration::from_secs(1);

/// Application priority when none is given (the lowest allowed).
pub const APP_PRIORITY: u32 = 1;
/// Period between two probes of an app (SPEC §4.1).
pub const APP_INTERVAL: Duration = Duration::from_secs(2);
/// Time a single check may take inside the guest before it counts as a timeout.
pub const APP_TIMEOUT: Duration = Duration::from_secs(2);
/// Restarts of an app inside the guest allowed within `restart_window`.
pub const APP_RESTART_LIMIT: u32 = 3;
/// Window over which app restarts are counted.
pub const APP_RESTART_WINDOW: Duration = Duration::from_secs(10 * 60);
/// An app online for this long gets its restart counter reset.
pub const APP_STABLE_AFTER: Duration = Duration::from_secs(5 * 60);
/// Consecutive probe timeouts before a timeout counts as a failure.
pub const APP_PROBE_FAILURES: u32 = 3;

/// VM restarts on the same host allowed within `vm_restart_window`.
pub const VM_RESTART_LIMIT: u32 = 3;
/// Window over which VM restarts on one host are counted.
pub const VM_RESTART_WINDOW: Duration = Duration::from_secs(60 * 60);
/// Time a graceful VM stop may take before the VM is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Time the guest channel may be unreachable while the VM runs before `on_guest_loss` applies.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a started VM has to bring its guest channel up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU memory in MiB.
pub const QEMU_MEMORY_MB: u64 = 1024;
/// QEMU virtual CPUs.
pub const QEMU_CPUS: u32 = 1;
/// libvirt connection URI.
pub const LIBVIRT_URI: &str = "qemu:///system";
