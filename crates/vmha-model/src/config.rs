//! The resolved configuration: every default filled in, every reference checked.
//!
//! All types here serialize to the same schema the parser reads, so `vmha config show` output
//! parses back to an equal [`Config`]. Construction from outside this crate only goes through
//! parsing: the top-level [`Config`] is `#[non_exhaustive]`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeStruct;

use crate::duration::serde_str;
use crate::name::Name;

/// A whole vmha cluster configuration (SPEC §5), valid by construction.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Config {
    /// Cluster-wide settings.
    pub cluster: Cluster,
    /// Hosts, in file order (at least one).
    #[serde(rename = "host")]
    pub hosts: Vec<Host>,
    /// The API.
    pub api: ApiConfig,
    /// VM groups, in file order.
    #[serde(rename = "vm")]
    pub vms: Vec<Vm>,
}

impl Config {
    /// Looks a host up by name.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name.as_str() == name)
    }

    /// Looks a VM up by name.
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name.as_str() == name)
    }

    /// Renders the resolved configuration as TOML (parses back to an equal `Config`).
    pub fn to_toml(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Renders the resolved configuration as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Cluster-wide settings (`[cluster]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Cluster name.
    pub name: Name,
    /// Where desired config, runtime state, admin flags and events live.
    pub store: Store,
    /// Local state: the embedded store, the API socket.
    pub state_dir: PathBuf,
    /// Per-VM runtime files: QMP/QGA sockets, pidfiles, console logs.
    pub runtime_dir: PathBuf,
    /// Default of each VM's `migrate`.
    pub migrate: bool,
}

/// The cluster store.
#[derive(Debug, Clone, PartialEq)]
pub enum Store {
    /// A single host with an embedded store in `state_dir`.
    Embedded,
    /// A multi-host cluster on etcd.
    Etcd {
        /// Client URLs (`http://` or `https://`), at least one.
        endpoints: Vec<String>,
        /// Host lease time-to-live (≥ 2 s).
        ttl: Duration,
        /// Self-fencing margin: a host fences after `ttl - fence_margin` without renewal.
        fence_margin: Duration,
        /// A freshly started controller waits up to this long for a VM's preferred hosts to
        /// take their leases before it first places the VM on another host.
        startup_wait: Duration,
    },
}

impl Serialize for Cluster {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("cluster", 9)?;
        st.serialize_field("name", &self.name)?;
        match &self.store {
            Store::Embedded => st.serialize_field("store", "embedded")?,
            Store::Etcd {
                endpoints,
                ttl,
                fence_margin,
                startup_wait,
            } => {
                st.serialize_field("store", "etcd")?;
                st.serialize_field("endpoints", endpoints)?;
                st.serialize_field("ttl", &crate::duration::format(*ttl))?;
                st.serialize_field("fence_margin", &crate::duration::format(*fence_margin))?;
                st.serialize_field("startup_wait", &crate::duration::format(*startup_wait))?;
            }
        }
        st.serialize_field("state_dir", &self.state_dir)?;
        st.serialize_field("runtime_dir", &self.runtime_dir)?;
        st.serialize_field("migrate", &self.migrate)?;
        st.end()
    }
}

/// A hypervisor host (`[[host]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// Host name; `vmhad --host NAME` selects which entry a daemon is.
    pub name: Name,
    /// Address other hosts and the CLI use to reach this host's API, if any.
    pub address: Option<String>,
    /// Memory available to VMs in MiB; when absent the host reports its own at run time.
    pub memory_mb: Option<u64>,
    /// Hardware watchdog device (absolute path, typically `/dev/watchdog`) that vmhad opens and
    /// feeds while its core loop is alive, so that the device resets the host when vmhad hangs.
    /// `None`: no hardware watchdog.
    pub watchdog: Option<PathBuf>,
    /// How long vmhad may stop feeding `watchdog` before the device resets the host. vmhad sets
    /// the device's timeout to it when the device supports `WDIOC_SETTIMEOUT`; otherwise the
    /// device keeps its own timeout. With `store = "etcd"` it is shorter than
    /// `ttl - fence_margin`. Only meaningful with `watchdog` (the default otherwise).
    pub watchdog_timeout: Duration,
}

impl Serialize for Host {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("host", 5)?;
        st.serialize_field("name", &self.name)?;
        if let Some(address) = &self.address {
            st.serialize_field("address", address)?;
        }
        if let Some(memory_mb) = &self.memory_mb {
            st.serialize_field("memory_mb", memory_mb)?;
        }
        // `watchdog_timeout` is only accepted together with `watchdog`.
        if let Some(watchdog) = &self.watchdog {
            st.serialize_field("watchdog", watchdog)?;
            st.serialize_field(
                "watchdog_timeout",
                &crate::duration::format(self.watchdog_timeout),
            )?;
        }
        st.end()
    }
}

/// The HTTP API (`[api]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ApiConfig {
    /// TCP listen addresses (`ip:port`); the Unix socket in `state_dir` is always served.
    pub listen: Vec<String>,
    /// Bearer tokens accepted on TCP listeners.
    #[serde(rename = "token")]
    pub tokens: Vec<ApiToken>,
    /// PEM file of the TLS certificate chain served on the TCP listeners; set together with
    /// `tls_key` (both or neither): with them the TCP API speaks only HTTPS, without plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

/// A bearer token of the API (`[[api.token]]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiToken {
    /// Token name, shown in logs and events.
    pub name: Name,
    /// What the token may do.
    pub role: TokenRole,
    /// A file holding the secret (first line).
    pub secret_file: PathBuf,
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenRole {
    /// Status, events, metrics.
    ReadOnly,
    /// Everything, including admin commands.
    Admin,
}

/// Decision-agent policy (SPEC §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Only the apps holding the highest priority count.
    HighestPriority,
    /// Σ priority(faulted) vs Σ priority(online).
    Weighted,
    /// Σ priority(online + offline) vs Σ priority(faulted).
    WeightedWithOffline,
    /// Restart if any `critical` app is faulted.
    Critical,
}

/// What a weighted policy does when both sums are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tie {
    /// Restart the VM.
    Restart,
    /// Leave the VM alone.
    NoAction,
}

/// What happens when the guest channel is lost while the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnGuestLoss {
    /// Restart the VM (within its budget).
    RestartVm,
    /// Mark the apps unknown and wait.
    Ignore,
}

/// Placement policy of the cluster controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// First acceptable host in the VM's `hosts` order.
    Priority,
    /// The acceptable host with the most free memory.
    LeastLoaded,
}

/// A VM group (`[[vm]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    /// VM name.
    pub name: Name,
    /// Acceptable hosts in priority order (non-empty, each a known host, no repeats).
    pub hosts: Vec<Name>,
    /// Decision-agent policy.
    pub policy: Policy,
    /// Tie rule of the weighted policies.
    pub tie: Tie,
    /// VM restarts on one host allowed within `vm_restart_window`.
    pub vm_restart_limit: u32,
    /// Window of the VM restart budget.
    pub vm_restart_window: Duration,
    /// Graceful stop time before the VM is killed.
    pub stop_timeout: Duration,
    /// Guest channel silence tolerated while the VM runs.
    pub guest_timeout: Duration,
    /// Time a started VM has to bring its guest channel up.
    pub boot_timeout: Duration,
    /// Reaction to guest channel loss.
    pub on_guest_loss: OnGuestLoss,
    /// Placement policy.
    pub placement: Placement,
    /// Move back to the preferred host when it returns.
    pub failback: bool,
    /// A drain or `vmha vm move` of the running VM is a live migration (when
    /// [`Vm::live_migratable`]), not a stop and start.
    pub migrate: bool,
    /// The VM's disks are on storage every acceptable host sees (NFS, SAN, Ceph): a live
    /// migration moves only memory and device state.
    pub shared_storage: bool,
    /// Watch the processes of the apps that name one (`pid_file`, `process`): their death
    /// brings the next check forward.
    pub watch: bool,
    /// How often vmhad asks the guest agent about the watcher.
    pub watch_period: Duration,
    /// VMs that must be online before this one starts (cluster-wide start order).
    pub requires: Vec<Name>,
    /// Hypervisor driver and its settings.
    pub driver: Driver,
    /// Apps, in file order.
    pub apps: Vec<App>,
}

impl Vm {
    /// Looks an app up by name.
    pub fn app(&self, name: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.name.as_str() == name)
    }

    /// Whether a drain or a move of the running VM migrates it live: `migrate` is on, the
    /// driver is `qemu`, and its disks are on shared storage (or it has none: a kernel and
    /// initrd only).
    pub fn live_migratable(&self) -> bool {
        self.migrate && self.storage_shared()
    }

    /// Whether every disk of the VM is on shared storage (trivially so without disks).
    pub fn storage_shared(&self) -> bool {
        match &self.driver {
            Driver::Qemu(q) => self.shared_storage || q.disks.is_empty(),
            Driver::Libvirt(_) => false,
        }
    }

    /// Memory the VM needs on a host, in MiB (0 when the driver does not say).
    pub fn memory_mb(&self) -> u64 {
        match &self.driver {
            Driver::Qemu(q) => q.memory_mb,
            Driver::Libvirt(_) => 0,
        }
    }
}

impl Serialize for Vm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("vm", 19)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field(
            "driver",
            match self.driver {
                Driver::Qemu(_) => "qemu",
                Driver::Libvirt(_) => "libvirt",
            },
        )?;
        st.serialize_field("hosts", &self.hosts)?;
        st.serialize_field("policy", &self.policy)?;
        st.serialize_field("tie", &self.tie)?;
        st.serialize_field("vm_restart_limit", &self.vm_restart_limit)?;
        let d = crate::duration::format;
        st.serialize_field("vm_restart_window", &d(self.vm_restart_window))?;
        st.serialize_field("stop_timeout", &d(self.stop_timeout))?;
        st.serialize_field("guest_timeout", &d(self.guest_timeout))?;
        st.serialize_field("boot_timeout", &d(self.boot_timeout))?;
        st.serialize_field("on_guest_loss", &self.on_guest_loss)?;
        st.serialize_field("placement", &self.placement)?;
        st.serialize_field("failback", &self.failback)?;
        st.serialize_field("migrate", &self.migrate)?;
        st.serialize_field("shared_storage", &self.shared_storage)?;
        st.serialize_field("watch", &self.watch)?;
        st.serialize_field("watch_period", &d(self.watch_period))?;
        st.serialize_field("requires", &self.requires)?;
        match &self.driver {
            Driver::Qemu(q) => st.serialize_field("qemu", q)?,
            Driver::Libvirt(l) => st.serialize_field("libvirt", l)?,
        }
        st.serialize_field("app", &self.apps)?;
        st.end()
    }
}

/// The hypervisor driver of a VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Driver {
    /// vmhad starts QEMU itself.
    Qemu(QemuSpec),
    /// A libvirt domain.
    Libvirt(LibvirtSpec),
}

/// QEMU settings (`[vm.qemu]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QemuSpec {
    /// Guest memory in MiB (≥ 16).
    pub memory_mb: u64,
    /// Virtual CPUs (1–255).
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Kernel for direct boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initrd for direct boot (requires `kernel`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (requires `kernel`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// Extra QEMU arguments, appended verbatim.
    pub extra_args: Vec<String>,
    /// The QEMU binary to run instead of `qemu-system-x86_64` from `PATH` (absolute; e.g. a
    /// wrapper, or the benchmarks' fake QEMU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emulator: Option<PathBuf>,
    /// Disks, in order.
    pub disks: Vec<QemuDisk>,
}

/// QEMU accelerator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// KVM when `/dev/kvm` works, else TCG.
    Auto,
    /// KVM only.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// A QEMU disk (`[[vm.qemu.disks]]`, or the `disk = "path"` shorthand).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QemuDisk {
    /// Image path (shared storage for multi-host clusters).
    pub path: PathBuf,
    /// Image format.
    pub format: DiskFormat,
    /// Cache mode.
    pub cache: Cache,
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    /// qcow2 (default).
    Qcow2,
    /// raw.
    Raw,
}

/// Disk cache mode (QEMU's `cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cache {
    /// O_DIRECT, safe for shared storage and live failover (default).
    None,
    /// Host page cache, flushes honoured.
    Writeback,
    /// Host page cache, write-through.
    Writethrough,
    /// O_DIRECT and no flush to disk on guest flush.
    Directsync,
    /// Ignores flushes: test only.
    Unsafe,
}

/// libvirt settings (`[vm.libvirt]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LibvirtSpec {
    /// Domain name (defaults to the VM name).
    pub domain: String,
    /// Connection URI.
    pub uri: String,
    /// Domain XML file that defines the domain when it does not exist (else it must exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xml: Option<PathBuf>,
}

/// An app inside a VM (`[[vm.app]]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct App {
    /// App name, unique within its VM.
    pub name: Name,
    /// Priority (≥ 1, higher = more important).
    pub priority: u32,
    /// Check command (argv, run in the guest; exit 0 = running).
    pub check: Vec<String>,
    /// Start command (argv, run in the guest).
    pub start: Vec<String>,
    /// Stop command (argv, run in the guest); apps without one cannot be stopped by vmha.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Probe period.
    #[serde(with = "serde_str")]
    pub interval: Duration,
    /// Check timeout.
    #[serde(with = "serde_str")]
    pub timeout: Duration,
    /// Restarts in the guest allowed within `restart_window`.
    pub restart_limit: u32,
    /// Window of the restart budget.
    #[serde(with = "serde_str")]
    pub restart_window: Duration,
    /// Online this long → restart counter reset.
    #[serde(with = "serde_str")]
    pub stable_after: Duration,
    /// Consecutive timeouts before a timeout counts as a failure.
    pub probe_failures: u32,
    /// The `critical` policy restarts the VM when this app is faulted.
    pub critical: bool,
    /// The file in the guest holding the app's pid (absolute path), for the watch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<String>,
    /// The app's process name in the guest (as `pidof` finds it), for the watch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Apps of the same VM that must be online before this one starts.
    pub requires: Vec<Name>,
}
