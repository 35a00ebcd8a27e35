//! VM lifecycle: launch QEMU as a child, or adopt a running one; watch it; stop or kill it.
//!
//! Each VM gets `runtime_dir/<name>/` holding `qmp.sock` (vmhad's monitor), `observe.sock` (a second one for
//! observers), `qga.sock`, `qemu.pid`, `console.log`
//! (the serial console) and `qemu.log` (QEMU's own stdout/stderr). A launched QEMU runs in its own
//! process group and is not killed when the daemon exits, so the daemon can restart and
//! [`QemuVm::adopt`] it. Death is learnt at once: from the child's exit for a launched VM and
//! from the QMP socket closing for both kinds (never by polling `kill -0`).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use vmha_model::{ExitStatus, VmObservation};

use crate::doorbell::{Bell, Doorbell};
use crate::qga::{QgaClient, QgaConfig};
use crate::qmp::{QmpClient, QmpConfig, QmpError, QmpEvent, typed_reply};

/// Errors of the VM driver.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM name is not usable as a directory name (allowed: `A-Za-z0-9_.-`, not starting
    /// with `.`, at most 64 characters).
    #[error("invalid VM name {0:?}")]
    InvalidName(String),
    /// A socket path would exceed the unix socket limit (107 bytes).
    #[error("socket path {0} too long for a unix socket")]
    PathTooLong(PathBuf),
    /// A QEMU already answers on this VM's QMP socket.
    #[error("VM {0} is already running (its QMP socket answers)")]
    AlreadyRunning(String),
    /// Creating the runtime directory or log file failed.
    #[error("preparing {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Starting the QEMU binary failed.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The cause.
        source: std::io::Error,
    },
    /// QEMU exited during start-up.
    #[error("QEMU exited during start-up ({status:?}): {log_tail}")]
    StartupExit {
        /// How it ended.
        status: Option<ExitStatus>,
        /// The end of its log.
        log_tail: String,
    },
    /// QEMU's QMP socket did not answer in time after start.
    #[error("QMP socket did not come up within {0:?}")]
    StartupTimeout(Duration),
    /// The QMP connection failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The pidfile is missing or does not name this VM's QEMU.
    #[error("pidfile {path}: {detail}")]
    Pid {
        /// The pidfile.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Sending a signal failed.
    #[error("signalling QEMU pid {pid}: {source}")]
    Signal {
        /// The pid.
        pid: u32,
        /// The cause.
        source: nix::errno::Errno,
    },
    /// QEMU did not exit even after SIGKILL.
    #[error("QEMU pid {0} still running after SIGKILL")]
    StillRunning(u32),
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM if `/dev/kvm` opens read-write and the CPU has `vmx`/`svm` (with TCG as QEMU's
    /// fallback if KVM fails to initialise), else TCG.
    #[default]
    Auto,
    /// KVM only.
    Kvm,
    /// TCG (software emulation) only.
    Tcg,
}

/// One disk of a VM (a virtio block device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Image path (commas are escaped for QEMU).
    pub path: PathBuf,
    /// Image format, e.g. `qcow2` or `raw`.
    pub format: String,
    /// Cache mode, e.g. `none` (required for safe failover on shared storage) or `writeback`.
    pub cache: String,
}

/// Everything needed to start a VM. The daemon maps its configuration onto this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// VM name: the runtime directory name and QEMU's `-name`.
    pub name: String,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Disks, in order.
    pub disks: Vec<Disk>,
    /// Kernel for direct boot, if any.
    pub kernel: Option<PathBuf>,
    /// Initrd for direct boot, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line, if any.
    pub append: Option<String>,
    /// Accelerator choice.
    pub accel: Accel,
    /// Extra arguments appended verbatim.
    pub extra_args: Vec<String>,
    /// The binary to run instead of [`DriverConfig::qemu_binary`], if any.
    pub emulator: Option<PathBuf>,
}

/// The files of one VM under the runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// `runtime_dir/<name>/`.
    pub dir: PathBuf,
    /// The QMP socket (vmhad's).
    pub qmp: PathBuf,
    /// A second QMP socket for observers (a double-run checker asking `query-status`, an
    /// operator): vmhad never connects to it, so it never takes vmhad's monitor away.
    pub observe: PathBuf,
    /// The guest agent socket.
    pub qga: PathBuf,
    /// The watch doorbell's socket (see [`crate::doorbell`]).
    pub bell: PathBuf,
    /// QEMU's pidfile.
    pub pidfile: PathBuf,
    /// The serial console log.
    pub console_log: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
}

const MAX_SOCKET_PATH: usize = 107;

impl VmPaths {
    /// The paths for VM `name` under `runtime_dir`; validates the name and socket path lengths.
    pub fn new(runtime_dir: &Path, name: &str) -> Result<Self, VmError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return Err(VmError::InvalidName(name.to_owned()));
        }
        let dir = runtime_dir.join(name);
        let paths = Self {
            qmp: dir.join("qmp.sock"),
            observe: dir.join("observe.sock"),
            qga: dir.join("qga.sock"),
            bell: dir.join("bell.sock"),
            pidfile: dir.join("qemu.pid"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            dir,
        };
        for sock in [&paths.qmp, &paths.observe, &paths.qga, &paths.bell] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmError::PathTooLong(sock.clone()));
            }
        }
        Ok(paths)
    }
}

/// Creates the VM's runtime directory owner-only (0700, whatever the umask), or makes an
/// existing one owner-only: its QMP and guest agent sockets give control of the VM.
fn private_dir(dir: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let io = |source| VmError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Escapes a value for a QEMU `key=value,…` option (commas doubled).
fn opt_escape(path: &Path) -> OsString {
    let text = path.as_os_str().to_string_lossy().replace(',', ",,");
    OsString::from(text)
}

/// KVM can run an ordinary guest: `/dev/kvm` opens read-write AND the CPU offers hardware
/// virtualisation (`vmx` or `svm`). A `/dev/kvm` without either (e.g. served by the `kvm_pvm`
/// module inside a cloud VM) accepts QEMU but never runs a stock kernel: the guest hangs.
fn kvm_usable() -> bool {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    opens
        && std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|info| cpu_has_hardware_virtualisation(&info))
}

/// Whether a `/proc/cpuinfo` text lists the `vmx` (Intel) or `svm` (AMD) flag.
fn cpu_has_hardware_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The QEMU arguments for `spec` (without the binary). Mirrors `scripts/run-guest.sh`:
/// `-nodefaults -display none`, serial console to a file, a virtio-serial guest agent port
/// named `org.qemu.guest_agent.0`, a dedicated QMP socket and a pidfile; and, beyond that
/// script, the watch doorbell's port ([`crate::doorbell::PORT_NAME`]).
pub fn qemu_args(spec: &LaunchSpec, paths: &VmPaths) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |a: &str| args.push(OsString::from(a));
    push("-name");
    push(&spec.name);
    push("-accel");
    match spec.accel {
        Accel::Tcg => push("tcg"),
        Accel::Kvm => push("kvm"),
        Accel::Auto if kvm_usable() => {
            push("kvm");
            push("-accel");
            push("tcg");
        }
        Accel::Auto => push("tcg"),
    }
    push("-m");
    push(&spec.memory_mb.to_string());
    push("-smp");
    push(&spec.cpus.to_string());
    push("-nodefaults");
    push("-display");
    push("none");
    args.push("-serial".into());
    let mut serial = OsString::from("file:");
    serial.push(paths.console_log.as_os_str());
    args.push(serial);
    for (flag, value) in [("-kernel", &spec.kernel), ("-initrd", &spec.initrd)] {
        if let Some(v) = value {
            args.push(flag.into());
            args.push(v.into());
        }
    }
    if let Some(append) = &spec.append {
        args.push("-append".into());
        args.push(append.into());
    }
    for disk in &spec.disks {
        let mut d = OsString::from("file=");
        d.push(opt_escape(&disk.path));
        d.push(format!(
            ",format={},cache={},if=virtio",
            disk.format.replace(',', ",,"),
            disk.cache.replace(',', ",,")
        ));
        args.push("-drive".into());
        args.push(d);
    }
    args.push("-device".into());
    args.push("virtio-serial-pci".into());
    serial_port(&mut args, &paths.qga, "qga0", "org.qemu.guest_agent.0");
    serial_port(
        &mut args,
        &paths.bell,
        BELL_CHARDEV,
        crate::doorbell::PORT_NAME,
    );
    let mut qmp = OsString::from("unix:");
    qmp.push(opt_escape(&paths.qmp));
    qmp.push(",server=on,wait=off");
    args.push("-qmp".into());
    args.push(qmp);
    let mut observe = OsString::from("unix:");
    observe.push(opt_escape(&paths.observe));
    observe.push(",server=on,wait=off");
    args.push("-qmp".into());
    args.push(observe);
    args.push("-pidfile".into());
    args.push(paths.pidfile.clone().into());
    args.extend(spec.extra_args.iter().map(OsString::from));
    args
}

/// Adds a virtio-serial port named `name` whose host side QEMU serves on the Unix socket
/// `path` (chardev `id`; not waiting for a client).
fn serial_port(args: &mut Vec<OsString>, path: &Path, id: &str, name: &str) {
    let mut chardev = OsString::from("socket,path=");
    chardev.push(opt_escape(path));
    chardev.push(format!(",server=on,wait=off,id={id}"));
    args.push("-chardev".into());
    args.push(chardev);
    args.push("-device".into());
    args.push(format!("virtserialport,chardev={id},name={name}").into());
}

/// The chardev id of the doorbell's port ([`crate::doorbell`]), on QEMU's command line or
/// hot-plugged by [`plug_doorbell`].
const BELL_CHARDEV: &str = "vmhabell0";

/// What [`plug_doorbell`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DoorbellPort {
    /// QEMU has the port already (launched with it, or plugged by an earlier adoption).
    Present,
    /// The port was hot-plugged now.
    Plugged,
    /// QEMU waits for an incoming migration: its devices must stay those of the source.
    Incoming,
}

/// Gives a running QEMU the doorbell's port if it lacks it (a QEMU launched by a vmhad from
/// before the doorbell): `chardev-add` of the socket at `path`, then `device_add` of the
/// `virtserialport`, which the guest sees as a hot-plugged port. A QEMU launched by this
/// driver gets the same port number (the next after the agent's) on its command line, so the
/// two can live-migrate to each other. A QEMU waiting for an incoming migration is left as it
/// is. The port counts as present only when a `virtserialport` is bound to the doorbell's
/// chardev ([`bell_port_bound`]): a chardev left without its port (an earlier adoption
/// cancelled between the two commands) gets its port now. A `device_add` that fails (QEMU
/// refuses hot-plug while it migrates) removes the chardev again, so a later adoption tries
/// anew.
async fn plug_doorbell(qmp: &QmpClient, path: &Path) -> Result<DoorbellPort, QmpError> {
    #[derive(serde::Deserialize)]
    struct Chardev {
        label: String,
    }
    let chardevs: Vec<Chardev> =
        typed_reply(qmp.execute("query-chardev", None).await?, "query-chardev")?;
    let has_chardev = chardevs.iter().any(|c| c.label == BELL_CHARDEV);
    if has_chardev && bell_port_bound(qmp).await? {
        return Ok(DoorbellPort::Present);
    }
    if qmp.query_status().await?.status == "inmigrate" {
        return Ok(DoorbellPort::Incoming);
    }
    if !has_chardev {
        let backend = serde_json::json!({
            "type": "socket",
            "data": {
                "addr": {"type": "unix", "data": {"path": path.to_string_lossy()}},
                "server": true,
                "wait": false,
            },
        });
        qmp.execute(
            "chardev-add",
            Some(serde_json::json!({"id": BELL_CHARDEV, "backend": backend})),
        )
        .await?;
    }
    let device = serde_json::json!({
        "driver": "virtserialport",
        "chardev": BELL_CHARDEV,
        "name": crate::doorbell::PORT_NAME,
    });
    if let Err(e) = qmp.execute("device_add", Some(device)).await {
        let remove = serde_json::json!({"id": BELL_CHARDEV});
        if let Err(undo) = qmp.execute("chardev-remove", Some(remove)).await {
            tracing::warn!(error = %undo, "removing the doorbell's chardev after a failed device_add");
        }
        return Err(e);
    }
    Ok(DoorbellPort::Plugged)
}

/// Whether a `virtserialport` of this QEMU is bound to the doorbell's chardev: the QOM
/// children of `/machine/peripheral-anon` (devices without an id, as this driver adds them)
/// and `/machine/peripheral` (with one) of type `virtserialport`, each asked for its
/// `chardev` (`qom-list`, `qom-get`).
async fn bell_port_bound(qmp: &QmpClient) -> Result<bool, QmpError> {
    #[derive(serde::Deserialize)]
    struct Child {
        name: String,
        #[serde(rename = "type")]
        kind: String,
    }
    for parent in ["/machine/peripheral-anon", "/machine/peripheral"] {
        let args = serde_json::json!({"path": parent});
        let children: Vec<Child> =
            typed_reply(qmp.execute("qom-list", Some(args)).await?, "qom-list")?;
        for child in children
            .iter()
            .filter(|c| c.kind == "child<virtserialport>")
        {
            let args = serde_json::json!({
                "path": format!("{parent}/{}", child.name),
                "property": "chardev",
            });
            let chardev: String =
                typed_reply(qmp.execute("qom-get", Some(args)).await?, "qom-get")?;
            if chardev == BELL_CHARDEV {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Tunables of the driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// How long QEMU may take to open its QMP socket after start.
    pub startup_timeout: Duration,
    /// QMP tunables.
    pub qmp: QmpConfig,
    /// Guest agent tunables.
    pub qga: QgaConfig,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            startup_timeout: Duration::from_secs(10),
            qmp: QmpConfig::default(),
            qga: QgaConfig::default(),
        }
    }
}

/// What the VM's event stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// An event from QMP; [`QmpEvent::Gone`] means the QMP socket closed (QEMU is gone).
    Qmp(QmpEvent),
    /// The launched QEMU process exited (launched VMs only; adopted ones only get `Qmp(Gone)`).
    Exited(ExitStatus),
}

impl VmEvent {
    /// What this event tells the VM monitor, as it is (`None`: nothing about whether or how
    /// the VM runs). `STOP` carries no reason and `Lagged` means events were lost: for both,
    /// `query-status` through `qmp` says how the VM is now.
    pub async fn observation(&self, qmp: &QmpClient) -> Option<VmObservation> {
        Some(match self {
            VmEvent::Exited(_) | VmEvent::Qmp(QmpEvent::Gone) => VmObservation::Gone,
            VmEvent::Qmp(QmpEvent::Shutdown { guest, .. }) => {
                VmObservation::Stopped { by_guest: *guest }
            }
            VmEvent::Qmp(QmpEvent::Reset { .. }) => VmObservation::Reset,
            VmEvent::Qmp(QmpEvent::Stop | QmpEvent::Lagged { .. }) => query(qmp).await,
            VmEvent::Qmp(QmpEvent::Resume) => VmObservation::Resumed,
            VmEvent::Qmp(QmpEvent::GuestPanicked { .. } | QmpEvent::Watchdog { .. }) => {
                VmObservation::Panicked
            }
            VmEvent::Qmp(
                QmpEvent::VserportChange { .. }
                | QmpEvent::BlockIoError { .. }
                | QmpEvent::Other { .. },
            ) => return None,
        })
    }
}

/// `query-status` as an observation: `Gone` once the QMP socket closed, `Unresponsive` when
/// QEMU does not answer it properly.
async fn query(qmp: &QmpClient) -> VmObservation {
    match qmp.query_status().await {
        Ok(s) => s.observation(),
        Err(QmpError::Gone) => VmObservation::Gone,
        Err(e) => {
            tracing::warn!(error = %e, "query-status failed");
            VmObservation::Unresponsive
        }
    }
}

/// How [`QemuVm::stop`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// It was already gone.
    AlreadyGone,
    /// The guest shut down after `guest-shutdown` through the agent.
    GuestAgent,
    /// The guest shut down after an ACPI power button press.
    Acpi,
    /// QEMU exited on QMP `quit` after the guest did not shut down in time.
    Quit,
    /// QEMU was killed with SIGKILL.
    Killed,
}

/// A running VM: its QMP connection, its guest channel and its death signal.
#[derive(Debug)]
pub struct QemuVm {
    name: String,
    paths: VmPaths,
    pid: u32,
    qmp: QmpClient,
    qga: Arc<QgaClient>,
    doorbell: Doorbell,
    events: Option<mpsc::Receiver<VmEvent>>,
    dead: watch::Receiver<bool>,
    kill_child: Option<oneshot::Sender<()>>,
}

impl QemuVm {
    /// Starts QEMU for `spec` as a child in its own process group (it survives the daemon),
    /// waits until its QMP socket answers, and connects. Refuses if a QEMU already answers on
    /// the VM's QMP socket. On any failure after spawn, the child is killed.
    pub async fn launch(
        spec: &LaunchSpec,
        runtime_dir: &Path,
        config: &DriverConfig,
    ) -> Result<Self, VmError> {
        let paths = VmPaths::new(runtime_dir, &spec.name)?;
        private_dir(&paths.dir)?;
        // Anyone accepting on the QMP socket (even a busy QEMU that would never greet us), a
        // live QEMU named by the pidfile, or any live process naming this VM's QMP socket (a QEMU
        // still starting, launched by a daemon that died meanwhile) means this VM already runs:
        // never start a second one.
        if tokio::net::UnixStream::connect(&paths.qmp).await.is_ok()
            || verified_pid(&paths).is_ok()
            || !qemu_processes(&paths).is_empty()
        {
            return Err(VmError::AlreadyRunning(spec.name.clone()));
        }
        for stale in [
            &paths.qmp,
            &paths.observe,
            &paths.qga,
            &paths.bell,
            &paths.pidfile,
        ] {
            // A stale file from a dead QEMU; absence is fine.
            let _ = std::fs::remove_file(stale);
        }
        let log = std::fs::File::create(&paths.qemu_log).map_err(|source| VmError::Io {
            path: paths.qemu_log.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| VmError::Io {
            path: paths.qemu_log.clone(),
            source,
        })?;
        let binary = spec.emulator.as_ref().unwrap_or(&config.qemu_binary);
        let mut child = tokio::process::Command::new(binary)
            .args(qemu_args(spec, &paths))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|source| VmError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        let deadline = Instant::now() + config.startup_timeout;
        let (qmp, qmp_events) = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmError::StartupExit {
                    status: Some(exit_status(status)),
                    log_tail: log_tail(&paths.qemu_log),
                });
            }
            match QmpClient::connect(&paths.qmp, config.qmp.clone()).await {
                Ok(pair) => break pair,
                Err(QmpError::Connect { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    // Best effort: the child must not outlive a failed launch.
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(match e {
                        QmpError::Connect { .. } => VmError::StartupTimeout(config.startup_timeout),
                        other => VmError::Qmp(other),
                    });
                }
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let (dead_tx, dead_rx) = watch::channel(false);
        let (kill_tx, kill_rx) = oneshot::channel();
        tokio::spawn(watch_child(child, kill_rx, tx.clone(), dead_tx));
        tokio::spawn(forward(qmp_events, tx, None));
        Ok(Self {
            name: spec.name.clone(),
            qga: Arc::new(QgaClient::new(&paths.qga, config.qga.clone())),
            doorbell: Doorbell::open(&paths.bell),
            paths,
            pid,
            qmp,
            events: Some(rx),
            dead: dead_rx,
            kill_child: Some(kill_tx),
        })
    }

    /// Reattaches to a running VM from its QMP socket and pidfile. The pidfile's process must
    /// name this VM's QMP socket on its command line (guards against pid reuse). Death is then
    /// signalled by the QMP socket closing. A QEMU without the watch doorbell's port gets it
    /// hot-plugged (see `plug_doorbell`); if that fails the VM is adopted all the same, without
    /// a doorbell (logged).
    pub async fn adopt(
        runtime_dir: &Path,
        name: &str,
        config: &DriverConfig,
    ) -> Result<Self, VmError> {
        let paths = VmPaths::new(runtime_dir, name)?;
        // A QEMU of this VM that is still starting (pidfile or QMP socket not there yet, e.g.
        // launched by a daemon killed meanwhile) gets `startup_timeout` to come up.
        let deadline = Instant::now() + config.startup_timeout;
        let starting = || Instant::now() < deadline && !qemu_processes(&paths).is_empty();
        let pid = loop {
            match verified_pid(&paths) {
                Ok(pid) => break pid,
                Err(_) if starting() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e),
            }
        };
        let (qmp, qmp_events) = loop {
            match QmpClient::connect(&paths.qmp, config.qmp.clone()).await {
                Ok(pair) => break pair,
                Err(QmpError::Connect { .. }) if starting() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        match plug_doorbell(&qmp, &paths.bell).await {
            Ok(DoorbellPort::Present) => {}
            Ok(DoorbellPort::Plugged) => {
                tracing::info!(vm = %name, "adopted QEMU had no watch doorbell: hot-plugged its port");
            }
            Ok(DoorbellPort::Incoming) => {
                tracing::info!(vm = %name, "adopted QEMU waits for a migration: its devices stay as they are (no watch doorbell)");
            }
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "could not give the adopted QEMU the watch doorbell; its watcher is polled every watch_period");
            }
        }
        let (tx, rx) = mpsc::channel(64);
        let (dead_tx, dead_rx) = watch::channel(false);
        tokio::spawn(forward(qmp_events, tx, Some(dead_tx)));
        Ok(Self {
            name: name.to_owned(),
            qga: Arc::new(QgaClient::new(&paths.qga, config.qga.clone())),
            doorbell: Doorbell::open(&paths.bell),
            paths,
            pid,
            qmp,
            events: Some(rx),
            dead: dead_rx,
            kill_child: None,
        })
    }

    /// The VM name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The VM's files.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// The QMP client (shared connection).
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The guest channel, shareable with an app-monitor task.
    pub fn qga(&self) -> Arc<QgaClient> {
        Arc::clone(&self.qga)
    }

    /// The watch doorbell's rings from now on (one handle per watcher).
    pub fn bell(&self) -> Bell {
        self.doorbell.bell()
    }

    /// Takes the event stream (once; `None` afterwards). It carries QMP events, then
    /// `Qmp(Gone)` and, for a launched VM, `Exited` — whichever comes first means QEMU is gone.
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<VmEvent>> {
        self.events.take()
    }

    /// True once QEMU is known to be gone.
    pub fn is_gone(&self) -> bool {
        *self.dead.borrow()
    }

    /// The VM as `query-status` shows it (see [`RunStatus::observation`]), `Gone` once QEMU
    /// is gone, `Unresponsive` when it does not answer properly.
    ///
    /// [`RunStatus::observation`]: crate::RunStatus::observation
    pub async fn status(&self) -> VmObservation {
        if self.is_gone() {
            return VmObservation::Gone;
        }
        query(&self.qmp).await
    }

    /// Waits until QEMU is gone or `timeout` passes; true if gone.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let mut dead = self.dead.clone();
        tokio::time::timeout(timeout, dead.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Graceful stop: `guest-shutdown` through the agent if it answers a ping quickly, else an
    /// ACPI power button press; if QEMU is still there after `timeout`, QMP `quit` (2 s), then
    /// SIGKILL. Returns how the VM ended.
    pub async fn stop(&mut self, timeout: Duration) -> Result<StopOutcome, VmError> {
        if self.is_gone() {
            return Ok(StopOutcome::AlreadyGone);
        }
        let ping_timeout = (timeout / 4).min(Duration::from_secs(1));
        let via_agent = self
            .qga
            .call("guest-ping", None, ping_timeout)
            .await
            .is_ok()
            && self.qga.shutdown().await.is_ok();
        let graceful = if via_agent {
            StopOutcome::GuestAgent
        } else {
            if let Err(e) = self.qmp.system_powerdown().await {
                tracing::warn!(vm = %self.name, error = %e, "system_powerdown failed");
            }
            StopOutcome::Acpi
        };
        if self.wait_gone(timeout).await {
            return Ok(graceful);
        }
        tracing::warn!(vm = %self.name, "guest did not shut down in {timeout:?}; quitting QEMU");
        if let Err(e) = self.qmp.quit().await {
            tracing::warn!(vm = %self.name, error = %e, "quit failed");
        }
        if self.wait_gone(Duration::from_secs(2)).await {
            return Ok(StopOutcome::Quit);
        }
        self.kill().await?;
        Ok(StopOutcome::Killed)
    }

    /// SIGKILL to QEMU, then waits (5 s at most) until it is gone. For an adopted VM the pid is
    /// re-verified against the pidfile and command line first.
    pub async fn kill(&mut self) -> Result<(), VmError> {
        if self.is_gone() {
            return Ok(());
        }
        match self.kill_child.take() {
            Some(tx) => {
                // The watcher may already have seen the exit; then there is nothing to kill.
                let _ = tx.send(());
            }
            None => {
                let pid = verified_pid(&self.paths)?;
                let target =
                    nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(|_| VmError::Pid {
                        path: self.paths.pidfile.clone(),
                        detail: "pid out of range".into(),
                    })?);
                match nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(source) => return Err(VmError::Signal { pid, source }),
                }
            }
        }
        if self.wait_gone(Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(VmError::StillRunning(self.pid))
        }
    }
}

fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        (None, None) => ExitStatus::Code(-1),
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    String::from_utf8_lossy(&text[start..]).trim().to_owned()
}

/// Live (not zombie) processes other than this one whose command line names this VM's QMP
/// socket: its QEMU, whoever started it and however far its start-up got.
pub fn qemu_processes(paths: &VmPaths) -> Vec<u32> {
    let needle = paths.qmp.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| !needle.is_empty() && c.windows(needle.len()).any(|w| w == needle))
        })
        .filter(|pid| {
            // "pid (comm) S ...": the state follows the last ')'.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state != "Z" && state != "X")
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs every process naming this VM's QMP socket that no [`QemuVm`] handle owns (e.g. a
/// QEMU launched by a daemon that died before it could adopt it) and waits up to `timeout`
/// for them to end; returns how many there were.
pub async fn kill_strays(
    runtime_dir: &Path,
    name: &str,
    timeout: Duration,
) -> Result<usize, VmError> {
    let paths = VmPaths::new(runtime_dir, name)?;
    let strays = qemu_processes(&paths);
    for &pid in &strays {
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => return Err(VmError::Signal { pid, source }),
        }
    }
    let deadline = Instant::now() + timeout;
    while !qemu_processes(&paths).is_empty() {
        if Instant::now() >= deadline {
            return Err(VmError::StillRunning(
                strays.first().copied().unwrap_or_default(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(strays.len())
}

/// Reads the pidfile and checks that the process's command line names this VM's QMP socket.
fn verified_pid(paths: &VmPaths) -> Result<u32, VmError> {
    let err = |detail: String| VmError::Pid {
        path: paths.pidfile.clone(),
        detail,
    };
    let text = std::fs::read_to_string(&paths.pidfile).map_err(|e| err(e.to_string()))?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| err("not a pid".to_owned()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| err(format!("process {pid}: {e}")))?;
    let needle = paths.qmp.as_os_str().as_encoded_bytes();
    if cmdline.windows(needle.len()).any(|w| w == needle) {
        Ok(pid)
    } else {
        Err(err(format!("process {pid} is not this VM's QEMU")))
    }
}

async fn watch_child(
    mut child: tokio::process::Child,
    kill: oneshot::Receiver<()>,
    tx: mpsc::Sender<VmEvent>,
    dead: watch::Sender<bool>,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        Ok(()) = kill => {
            if let Err(e) = child.start_kill() {
                tracing::warn!(error = %e, "SIGKILL to QEMU failed");
            }
            child.wait().await
        }
    };
    dead.send_replace(true);
    let status = match status {
        Ok(s) => exit_status(s),
        Err(e) => {
            tracing::warn!(error = %e, "waiting for QEMU failed");
            ExitStatus::Code(-1)
        }
    };
    // The receiver may have been dropped; the exit is still recorded in `dead`.
    let _ = tx.send(VmEvent::Exited(status)).await;
}

async fn forward(
    mut events: mpsc::Receiver<QmpEvent>,
    tx: mpsc::Sender<VmEvent>,
    dead: Option<watch::Sender<bool>>,
) {
    while let Some(event) = events.recv().await {
        if event == QmpEvent::Gone {
            if let Some(dead) = &dead {
                dead.send_replace(true);
            }
        }
        // Nobody may listen; keep draining so the death signal is still recorded.
        let _ = tx.send(VmEvent::Qmp(event)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            name: "vm1".into(),
            memory_mb: 256,
            cpus: 1,
            disks: vec![Disk {
                path: "/shared/a,b.qcow2".into(),
                format: "qcow2".into(),
                cache: "none".into(),
            }],
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            append: Some("console=ttyS0 quiet".into()),
            accel: Accel::Tcg,
            extra_args: vec!["-S".into()],
            emulator: None,
        }
    }

    #[test]
    fn the_vm_dir_is_owner_only_whatever_the_umask_or_its_old_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let base = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let new = base.path().join("run/vm1");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        let old = base.path().join("run/vm2");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
    }

    #[test]
    fn hardware_virtualisation_is_read_from_the_cpu_flags() {
        assert!(cpu_has_hardware_virtualisation(
            "processor\t: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpu_has_hardware_virtualisation("flags\t\t: fpu svm\n"));
        assert!(!cpu_has_hardware_virtualisation(
            "flags\t\t: fpu hypervisor sse4_2\nmodel name\t: vmx-like\n"
        ));
        assert!(!cpu_has_hardware_virtualisation(""));
    }

    #[test]
    fn args_match_run_guest_script() {
        let paths = VmPaths::new(Path::new("/run/vmha"), "vm1").unwrap();
        let args: Vec<String> = qemu_args(&spec(), &paths)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for part in [
            "-accel tcg -m 256 -smp 1 -nodefaults -display none",
            "-serial file:/run/vmha/vm1/console.log",
            "-kernel /k -initrd /i -append console=ttyS0 quiet",
            "-drive file=/shared/a,,b.qcow2,format=qcow2,cache=none,if=virtio",
            "-device virtio-serial-pci -chardev socket,path=/run/vmha/vm1/qga.sock,server=on,wait=off,id=qga0",
            "-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-chardev socket,path=/run/vmha/vm1/bell.sock,server=on,wait=off,id=vmhabell0",
            "-device virtserialport,chardev=vmhabell0,name=org.vmha.watch.0",
            "-qmp unix:/run/vmha/vm1/qmp.sock,server=on,wait=off",
            "-qmp unix:/run/vmha/vm1/observe.sock,server=on,wait=off",
            "-pidfile /run/vmha/vm1/qemu.pid -S",
        ] {
            assert!(joined.contains(part), "missing {part:?} in {joined}");
        }
    }

    #[test]
    fn rejects_bad_names_and_long_paths() {
        for bad in ["", ".x", "a/b", "a b", "a,b"] {
            assert!(matches!(
                VmPaths::new(Path::new("/run"), bad),
                Err(VmError::InvalidName(_))
            ));
        }
        let long = "d".repeat(100);
        assert!(matches!(
            VmPaths::new(Path::new(&format!("/{long}")), "vm"),
            Err(VmError::PathTooLong(_))
        ));
    }
}
