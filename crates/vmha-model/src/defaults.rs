//! Every configuration default and every allowed range, written once. `docs/config.md`
//! documents the same values; the resolved configuration (`vmha config show`) prints every
//! default explicitly. The parser (`resolve.rs`) takes its defaults and ranges only from here.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::config::{Accel, Cache, DiskFormat, OnGuestLoss, Placement, Policy, Tie};

const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const WEEK: Duration = Duration::from_secs(7 * 86_400);

// ---- [cluster] ----

/// Directory for the embedded store, the event log and the daemon's API socket.
pub const STATE_DIR: &str = "/var/lib/vmha";
/// Directory for per-VM runtime files (QMP/QGA sockets, pidfiles, console logs).
pub const RUNTIME_DIR: &str = "/run/vmha";
/// etcd lease time-to-live of a host.
pub const TTL: Duration = Duration::from_secs(5);
/// Allowed `ttl` (etcd's minimum lease is 2 s).
pub const TTL_RANGE: RangeInclusive<Duration> = Duration::from_secs(2)..=HOUR;
/// A host that has not renewed its lease for `ttl - fence_margin` kills its HA VMs.
pub const FENCE_MARGIN: Duration = Duration::from_millis(1500);
/// Allowed `fence_margin` (and it must also be shorter than `ttl`).
pub const FENCE_MARGIN_RANGE: RangeInclusive<Duration> = Duration::from_millis(100)..=HOUR;
/// How long a freshly started controller waits for a VM's preferred hosts to join before it
/// first places the VM elsewhere (a cold start of the cluster).
pub const STARTUP_WAIT: Duration = Duration::from_secs(10);
/// Allowed `startup_wait` (0 = place at once on whatever hosts are up).
pub const STARTUP_WAIT_RANGE: RangeInclusive<Duration> = Duration::ZERO..=HOUR;

// ---- [[host]] ----

/// Allowed host `memory_mb`.
pub const HOST_MEMORY_MB_RANGE: RangeInclusive<u64> = 16..=(u32::MAX as u64);
/// Time vmhad may stop feeding a host's hardware `watchdog` before the device resets the host
/// (set on the device when it supports `WDIOC_SETTIMEOUT`).
pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(10);
/// Allowed host `watchdog_timeout` (with `store = "etcd"` it must also be shorter than
/// `ttl - fence_margin`).
pub const WATCHDOG_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(2)..=Duration::from_secs(300);

// ---- [[vm]] ----

/// Decision-agent policy (SPEC §4.2).
pub const POLICY: Policy = Policy::HighestPriority;
/// What the weighted policies do when both sums are equal.
pub const TIE: Tie = Tie::Restart;
/// VM restarts on the same host allowed within `vm_restart_window`.
pub const VM_RESTART_LIMIT: u32 = 3;
/// Allowed `vm_restart_limit` (0: never restart on the same host, fail over at once).
pub const VM_RESTART_LIMIT_RANGE: RangeInclusive<u32> = 0..=100;
/// Window over which VM restarts on one host are counted.
pub const VM_RESTART_WINDOW: Duration = HOUR;
/// Allowed `vm_restart_window`.
pub const VM_RESTART_WINDOW_RANGE: RangeInclusive<Duration> = SEC..=WEEK;
/// Time a graceful VM stop may take before the VM is killed.
pub const STOP_TIMEOUT: Duration = MIN;
/// Allowed `stop_timeout`.
pub const STOP_TIMEOUT_RANGE: RangeInclusive<Duration> = SEC..=HOUR;
/// Time the guest channel may be unreachable while the VM runs before `on_guest_loss` applies.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Allowed `guest_timeout`.
pub const GUEST_TIMEOUT_RANGE: RangeInclusive<Duration> = SEC..=HOUR;
/// Time a started VM has to bring its guest channel up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Allowed `boot_timeout`.
pub const BOOT_TIMEOUT_RANGE: RangeInclusive<Duration> = SEC..=HOUR;
/// Reaction to a lost guest channel.
pub const ON_GUEST_LOSS: OnGuestLoss = OnGuestLoss::RestartVm;
/// Placement policy of the cluster controller.
pub const PLACEMENT: Placement = Placement::Priority;
/// Whether a VM moves back to its preferred host when that host returns.
pub const FAILBACK: bool = false;
/// Default of `migrate` (cluster-wide and per VM): drains and moves stop and start VMs.
pub const MIGRATE: bool = false;
/// Default of `shared_storage`: disks are assumed local to a host (never migrated live).
pub const SHARED_STORAGE: bool = false;

// ---- [vm.qemu] ----

/// QEMU memory in MiB.
pub const QEMU_MEMORY_MB: u64 = 1024;
/// Allowed QEMU `memory_mb` (16 MiB to 16 TiB).
pub const QEMU_MEMORY_MB_RANGE: RangeInclusive<u64> = 16..=16 * 1024 * 1024;
/// QEMU virtual CPUs.
pub const QEMU_CPUS: u32 = 1;
/// Allowed QEMU `cpus`.
pub const QEMU_CPUS_RANGE: RangeInclusive<u32> = 1..=255;
/// QEMU accelerator.
pub const QEMU_ACCEL: Accel = Accel::Auto;
/// Disk image format.
pub const DISK_FORMAT: DiskFormat = DiskFormat::Qcow2;
/// Disk cache mode: `none` (O_DIRECT) is the safe choice on shared storage.
pub const DISK_CACHE: Cache = Cache::None;

// ---- [vm.libvirt] ----

/// libvirt connection URI. The domain name defaults to the VM name.
pub const LIBVIRT_URI: &str = "qemu:///system";

// ---- [[vm.app]] ----

/// Application priority when none is given (the lowest allowed).
pub const APP_PRIORITY: u32 = 1;
/// Allowed app `priority` (higher = more important).
pub const APP_PRIORITY_RANGE: RangeInclusive<u32> = 1..=1_000_000;
/// Period between two probes of an app (SPEC §4.1).
pub const APP_INTERVAL: Duration = Duration::from_secs(2);
/// Allowed app `interval`.
pub const APP_INTERVAL_RANGE: RangeInclusive<Duration> = Duration::from_millis(100)..=HOUR;
/// Time a single check may take inside the guest before it counts as a timeout.
pub const APP_TIMEOUT: Duration = Duration::from_secs(2);
/// Allowed app `timeout`.
pub const APP_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);
/// Restarts of an app inside the guest allowed within `restart_window`.
pub const APP_RESTART_LIMIT: u32 = 3;
/// Allowed app `restart_limit` (0: a failed app is faulted at once).
pub const APP_RESTART_LIMIT_RANGE: RangeInclusive<u32> = 0..=1000;
/// Window over which app restarts are counted.
pub const APP_RESTART_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Allowed app `restart_window`.
pub const APP_RESTART_WINDOW_RANGE: RangeInclusive<Duration> = SEC..=WEEK;
/// An app online for this long gets its restart counter reset.
pub const APP_STABLE_AFTER: Duration = Duration::from_secs(5 * 60);
/// Allowed app `stable_after`.
pub const APP_STABLE_AFTER_RANGE: RangeInclusive<Duration> = Duration::ZERO..=WEEK;
/// Consecutive probe timeouts before a timeout counts as a failure.
pub const APP_PROBE_FAILURES: u32 = 3;
/// Allowed app `probe_failures`.
pub const APP_PROBE_FAILURES_RANGE: RangeInclusive<u32> = 1..=100;
/// Whether an app is critical for the `critical` policy.
pub const APP_CRITICAL: bool = false;
/// Whether the processes of a VM's apps that name one (`pid_file`, `process`) are watched.
pub const VM_WATCH: bool = true;
/// How often vmhad asks the guest agent whether the watcher still runs.
pub const VM_WATCH_PERIOD: Duration = Duration::from_millis(200);
/// Allowed VM `watch_period`.
pub const VM_WATCH_PERIOD_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(10);
/// Longest app `pid_file` path, in bytes.
pub const APP_PID_FILE_MAX: usize = 1024;
/// Longest app `process` name, in bytes (the kernel keeps 15 bytes of a process name).
pub const APP_PROCESS_MAX: usize = 15;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_lie_inside_their_ranges() {
        assert!(TTL_RANGE.contains(&TTL));
        assert!(FENCE_MARGIN_RANGE.contains(&FENCE_MARGIN) && FENCE_MARGIN < TTL);
        assert!(WATCHDOG_TIMEOUT_RANGE.contains(&WATCHDOG_TIMEOUT));
        assert!(VM_RESTART_LIMIT_RANGE.contains(&VM_RESTART_LIMIT));
        assert!(VM_RESTART_WINDOW_RANGE.contains(&VM_RESTART_WINDOW));
        assert!(STOP_TIMEOUT_RANGE.contains(&STOP_TIMEOUT));
        assert!(GUEST_TIMEOUT_RANGE.contains(&GUEST_TIMEOUT));
        assert!(BOOT_TIMEOUT_RANGE.contains(&BOOT_TIMEOUT));
        assert!(QEMU_MEMORY_MB_RANGE.contains(&QEMU_MEMORY_MB));
        assert!(QEMU_CPUS_RANGE.contains(&QEMU_CPUS));
        assert!(APP_PRIORITY_RANGE.contains(&APP_PRIORITY));
        assert!(APP_INTERVAL_RANGE.contains(&APP_INTERVAL));
        assert!(APP_TIMEOUT_RANGE.contains(&APP_TIMEOUT));
        assert!(APP_RESTART_LIMIT_RANGE.contains(&APP_RESTART_LIMIT));
        assert!(APP_RESTART_WINDOW_RANGE.contains(&APP_RESTART_WINDOW));
        assert!(APP_STABLE_AFTER_RANGE.contains(&APP_STABLE_AFTER));
        assert!(APP_PROBE_FAILURES_RANGE.contains(&APP_PROBE_FAILURES));
    }
}
