//! The testbed: slot claiming, namespaces, bridge and veths, processes, faults, teardown.
//!
//! Naming (slot `S`, 0..=255, claimed by an exclusive `flock` on
//! `/run/vmha-testbed/slot-S.lock`, so it is unique among live testbeds of every process):
//! bridge `vmtbS`, root-side veth of host `i` `vmtbShi` (at most 11 characters, under the
//! 15-character interface name limit), namespace `vmtbS-HOST`, subnet `10.213.S.0/24` with the
//! root namespace on `.1` and host `i` on `.(i+2)`. The kernel drops a `flock` when its owner
//! dies, so "slot lock free but objects named after the slot exist" means "leftovers of a
//! crashed run": they are removed before a slot is reused and by [`cleanup_stale`].

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::etcd::Member;
use crate::netns::{
    find_program, ip, kill_netns_processes, link_is_up, list_links, list_netns, ns_inode, ns_path,
    pids_in_netns, run_in_netns,
};
use crate::proc::Proc;

/// Where slot lock files live.
const STATE_DIR: &str = "/run/vmha-testbed";
/// Prefix of every bridge, veth and namespace name.
const PREFIX: &str = "vmtb";
/// The first two octets of every testbed subnet.
const NET: [u8; 2] = [10, 213];
/// Number of slots (one /24 each).
const SLOTS: u32 = 256;
/// Most hosts per testbed (addresses .2 ..= .201).
const MAX_HOSTS: usize = 200;
/// Longest host name.
const MAX_HOST_NAME: usize = 32;
/// Set (non-empty, not `0`) to keep the testbed directory after teardown.
const KEEP_ENV: &str = "VMHA_KEEP_TESTBED";
/// How long SIGKILLed processes may take to leave a namespace.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Spreads the first slot tried by the testbeds of one process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One simulated hypervisor host.
#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) name: String,
    pub(crate) ns: String,
    veth: String,
    pub(crate) addr: Ipv4Addr,
    dir: PathBuf,
}

/// A set of network namespaces acting as hypervisor hosts, joined by a bridge in the root
/// namespace, optionally with a real etcd cluster across them. See the crate documentation.
///
/// All methods take `&self` (a `Testbed` can be shared across threads, e.g. in an `Arc`).
/// Methods taking a host name panic (getters) or fail (fallible methods) on a name that is not
/// part of the testbed.
///
/// Dropping the testbed (also while unwinding from a panic) kills every process in its
/// namespaces, deletes its namespaces, veths and bridge, and removes its directory unless
/// `VMHA_KEEP_TESTBED` is set to something other than empty or `0` (then the path is printed
/// to stderr). Errors during drop are printed; use [`Testbed::teardown`] to get them.
#[derive(Debug)]
pub struct Testbed {
    slot: u32,
    pub(crate) hosts: Vec<Host>,
    dir: PathBuf,
    tempdir: Option<tempfile::TempDir>,
    pub(crate) etcd: Mutex<Vec<Member>>,
    pub(crate) etcd_token: String,
    pub(crate) etcd_startup: Option<Duration>,
    seq: AtomicU64,
    torn_down: bool,
    lock: Option<Flock<File>>,
}

impl Testbed {
    /// Creates a testbed with one namespace per name in `hosts` (each `[A-Za-z0-9_-]`, at most
    /// 32 characters, unique; at most 200 hosts) and, if `etcd_members > 0`, an etcd cluster
    /// whose member `i` runs on host `i` (`etcd_members <= hosts.len()`).
    ///
    /// Returns only once every host has its address, `lo` and `eth0` up, and every etcd member
    /// answers `GET /health` with `"health":"true"` from the root namespace.
    ///
    /// Fails with a clear message when not run as root, when `ip` (Debian `iproute2`) or —
    /// with `etcd_members > 0` — `etcd` (Debian `etcd-server`) is missing, or when no slot is
    /// free. Removes leftovers of crashed earlier testbeds first (see [`cleanup_stale`]).
    /// Whatever was set up before a failure is torn down again.
    pub fn new(hosts: &[&str], etcd_members: usize) -> Result<Testbed> {
        validate_hosts(hosts)?;
        if etcd_members > hosts.len() {
            bail!(
                "{etcd_members} etcd members need as many hosts, the testbed has {}",
                hosts.len()
            );
        }
        require_root()?;
        ip(&["-V"])?;
        if etcd_members > 0 && find_program("etcd").is_none() {
            bail!(
                "`etcd` not found in PATH: install the Debian package etcd-server \
                 (it provides /usr/bin/etcd 3.4)"
            );
        }
        if let Err(e) = cleanup_stale() {
            eprintln!("vmha-testbed: cleaning up leftovers of crashed testbeds: {e:#}");
        }
        let (slot, lock) = claim_slot()?;
        let tempdir = tempfile::Builder::new()
            .prefix(&format!("vmha-testbed-{slot}-"))
            .tempdir()
            .context("creating the testbed directory")?;
        let dir = tempdir.path().to_owned();
        write_record(
            &lock,
            &format!(
                "pid={}\ndir={}\nkeep={}\n",
                std::process::id(),
                dir.display(),
                u8::from(keep_requested())
            ),
        )?;
        let hosts: Vec<Host> = hosts
            .iter()
            .enumerate()
            .map(|(i, name)| Host {
                name: (*name).to_owned(),
                ns: format!("{PREFIX}{slot}-{name}"),
                veth: format!("{PREFIX}{slot}h{i}"),
                addr: host_addr(slot, i),
                dir: dir.join("hosts").join(name),
            })
            .collect();
        for sub in [dir.join("logs"), dir.join("etcd")]
            .iter()
            .chain(hosts.iter().map(|h| &h.dir))
        {
            std::fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        let mut tb = Testbed {
            slot,
            hosts,
            dir,
            tempdir: Some(tempdir),
            etcd: Mutex::new(Vec::new()),
            etcd_token: format!("{PREFIX}{slot}-{}-{}", std::process::id(), unique()),
            etcd_startup: None,
            seq: AtomicU64::new(0),
            torn_down: false,
            lock: Some(lock),
        };
        // From here on, an error drops `tb`, which tears down what exists.
        tb.setup_network()?;
        if etcd_members > 0 {
            tb.start_etcd_cluster(etcd_members)?;
        }
        Ok(tb)
    }

    fn setup_network(&self) -> Result<()> {
        // The first `ip netns add` after boot turns /run/netns into a shared mount point,
        // which is racy between concurrent callers: serialise set-ups (a few ms each).
        let _setup = setup_lock()?;
        let bridge = self.bridge_name();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.root_addr()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for h in &self.hosts {
            ip(&["netns", "add", &h.ns])?;
            ip(&[
                "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.ns,
            ])?;
            ip(&["link", "set", &h.veth, "master", &bridge, "up"])?;
            ip(&[
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/24", h.addr),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub(crate) fn host_index(&self, host: &str) -> Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .with_context(|| format!("unknown host {host:?}; the testbed has {:?}", self.hosts()))
    }

    fn host(&self, host: &str) -> Result<&Host> {
        Ok(&self.hosts[self.host_index(host)?])
    }

    fn host_or_panic(&self, host: &str) -> &Host {
        match self.host(host) {
            Ok(h) => h,
            Err(e) => panic!("{e:#}"),
        }
    }

    pub(crate) fn lock_etcd(&self) -> MutexGuard<'_, Vec<Member>> {
        self.etcd.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The host names, in the order given to [`Testbed::new`].
    pub fn hosts(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    /// The address of `host` on the testbed subnet (`10.213.S.(i+2)` for host `i`). Panics for
    /// an unknown host.
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        self.host_or_panic(host).addr
    }

    /// The root namespace's address on the testbed bridge (`10.213.S.1`).
    pub fn root_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], slot_octet(self.slot), 1)
    }

    /// The testbed subnet, e.g. `10.213.7.0/24`; no other testbed uses it while this one lives.
    pub fn subnet(&self) -> String {
        format!(
            "{NET0}.{NET1}.{}.0/24",
            self.slot,
            NET0 = NET[0],
            NET1 = NET[1]
        )
    }

    /// The name of `host`'s network namespace (usable with `ip netns exec`). Panics for an
    /// unknown host.
    pub fn netns(&self, host: &str) -> &str {
        &self.host_or_panic(host).ns
    }

    /// Every network namespace of this testbed.
    pub fn namespaces(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.ns.clone()).collect()
    }

    /// Every interface this testbed created in the root namespace: the bridge, then the
    /// root-side veth of each host.
    pub fn interfaces(&self) -> Vec<String> {
        std::iter::once(self.bridge_name())
            .chain(self.hosts.iter().map(|h| h.veth.clone()))
            .collect()
    }

    /// The root-side veth of `host` (what [`Testbed::cut`] takes down). Panics for an unknown
    /// host.
    pub fn veth(&self, host: &str) -> &str {
        &self.host_or_panic(host).veth
    }

    fn bridge_name(&self) -> String {
        format!("{PREFIX}{}", self.slot)
    }

    /// The testbed's temporary directory (logs under `logs/`, etcd data under `etcd/`, host
    /// directories under `hosts/`). Removed at teardown unless `VMHA_KEEP_TESTBED` is set.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An existing, initially empty directory for `host` (e.g. for its vmhad's runtime and
    /// state directories), removed with the testbed. Panics for an unknown host.
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.host_or_panic(host).dir.clone()
    }

    /// The API socket of the vmhad that [`Testbed::vmhad_command`] runs as `host`.
    pub fn vmhad_socket(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("state").join("vmhad.sock")
    }

    /// The command that runs the `vmhad` binary as `host` of the cluster configured in
    /// `config`, with its state and runtime directories `state/` and `run/` in
    /// [`Testbed::host_dir`]; give it to [`Testbed::spawn`]. The API socket an earlier vmhad
    /// of the host left behind is removed first.
    pub fn vmhad_command(&self, vmhad: &Path, config: &Path, host: &str) -> Command {
        let dir = self.host_dir(host);
        let _ = std::fs::remove_file(self.vmhad_socket(host));
        let mut cmd = Command::new(vmhad);
        cmd.arg("--config")
            .arg(config)
            .arg("--host")
            .arg(host)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--runtime-dir")
            .arg(dir.join("run"));
        cmd
    }

    /// Starts `command` inside `host`'s network namespace, with stdin `/dev/null` and stdout and
    /// stderr appended to a fresh log file `logs/HOST-PROGRAM-N.log` (which starts with one
    /// `# vmha-testbed:` header line naming the command).
    ///
    /// The command is spawned from a helper thread that joined the namespace, so every setting
    /// of `command` except stdio is kept (environment, `env_clear`, working directory, `arg0`,
    /// …) and the pid of the returned [`Proc`] is the program's own. Unlike `ip netns exec`, the
    /// process keeps this process's mount namespace (its `/sys/class/net` shows the root
    /// namespace's interfaces; `/proc/net` is right). Everything it starts inherits the
    /// namespace, so [`Testbed::kill_host`] reaches its descendants too.
    pub fn spawn(&self, host: &str, mut command: Command) -> Result<Proc> {
        let h = self.host(host)?;
        let program = command.get_program().to_string_lossy().into_owned();
        let label: String = Path::new(&program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let log_path = self
            .dir
            .join("logs")
            .join(format!("{host}-{label}-{seq}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        log.write_all_at(
            format!("# vmha-testbed: on {host}: {command:?}\n").as_bytes(),
            0,
        )
        .with_context(|| format!("writing {}", log_path.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file")?)
            .stderr(log);
        let child = run_in_netns(&h.ns, move || command.spawn())?
            .with_context(|| format!("starting {program} on host {host}"))?;
        Ok(Proc::new(child, host, log_path))
    }

    /// Runs `f` on a helper thread inside `host`'s network namespace and returns its result.
    /// Sockets `f` creates (listeners, connections) belong to that namespace and stay there
    /// when used from other threads later. A panic in `f` is resumed on the caller.
    pub fn run_in<T, F>(&self, host: &str, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        run_in_netns(&self.host(host)?.ns, f)
    }

    /// A TCP listener on `host`'s address and `port` (0: any free port), inside its
    /// namespace. Connections complete (into the backlog) even if nobody accepts.
    pub fn listen(&self, host: &str, port: u16) -> Result<TcpListener> {
        let addr = SocketAddr::from((self.host(host)?.addr, port));
        self.run_in(host, || TcpListener::bind(addr))?
            .with_context(|| format!("listening on {addr} on host {host}"))
    }

    /// Opens a TCP connection to `to` from `from`'s namespace, or from the root namespace
    /// when `from` is `None`, giving up after `timeout`.
    pub fn connect(
        &self,
        from: Option<&str>,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let result = match from {
            None => TcpStream::connect_timeout(&to, timeout),
            Some(host) => self.run_in(host, || TcpStream::connect_timeout(&to, timeout))?,
        };
        result.with_context(|| {
            format!(
                "connecting to {to} from {}",
                from.unwrap_or("the root namespace")
            )
        })
    }

    /// The live (non-zombie) processes in `host`'s namespace, sorted.
    pub fn host_pids(&self, host: &str) -> Result<Vec<u32>> {
        let ns = &self.host(host)?.ns;
        let ino = ns_inode(ns).with_context(|| format!("network namespace {ns} is gone"))?;
        Ok(pids_in_netns(ino))
    }

    /// SIGKILLs every process in `host`'s namespace, its etcd member included, until none is
    /// left (QEMUs started by a daemon in the namespace inherit it, so they die too). Returns
    /// how many processes were signalled. Same as `kill_host_processes(host, false)`.
    pub fn kill_host(&self, host: &str) -> Result<usize> {
        self.kill_host_processes(host, false)
    }

    /// SIGKILLs every process in `host`'s namespace except, with `keep_etcd`, the host's etcd
    /// member, repeating until none is left (fails if some survive 10 s). A killed etcd
    /// member is reaped and can be started again with [`Testbed::restart_etcd`]. Returns how
    /// many processes were signalled. [`Proc`]s of killed processes stay zombies until waited
    /// for or dropped.
    pub fn kill_host_processes(&self, host: &str, keep_etcd: bool) -> Result<usize> {
        let index = self.host_index(host)?;
        let mut members = self.lock_etcd();
        let keep: Vec<u32> = if keep_etcd {
            members
                .get_mut(index)
                .and_then(Member::running_pid)
                .into_iter()
                .collect()
        } else {
            Vec::new()
        };
        let killed = kill_netns_processes(&self.hosts[index].ns, &keep, KILL_TIMEOUT)?;
        if !keep_etcd {
            if let Some(member) = members.get_mut(index) {
                member.reap();
            }
        }
        Ok(killed)
    }

    /// Cuts `host` off the network: takes its root-side veth down, so it reaches neither the
    /// other hosts nor the root namespace (etcd peers and clients included) and nobody
    /// reaches it; its processes keep running and still reach themselves on `lo` and on the
    /// host's own address.
    pub fn cut(&self, host: &str) -> Result<()> {
        ip(&["link", "set", &self.host(host)?.veth, "down"])?;
        Ok(())
    }

    /// Undoes [`Testbed::cut`]: takes `host`'s root-side veth up again. Traffic flows again at
    /// once (the bridge runs no STP); connections that timed out meanwhile stay broken.
    pub fn restore(&self, host: &str) -> Result<()> {
        ip(&["link", "set", &self.host(host)?.veth, "up"])?;
        Ok(())
    }

    /// Whether `host` is cut off (its root-side veth is down), as the kernel reports it.
    /// Panics for an unknown host.
    pub fn is_cut(&self, host: &str) -> bool {
        link_is_up(&self.host_or_panic(host).veth) == Some(false)
    }

    /// Tears the testbed down now (what drop does) and reports every error instead of
    /// printing it: kills every process of its namespaces, reaps the etcd members, deletes the
    /// namespaces, veths and bridge, removes (or, with `VMHA_KEEP_TESTBED`, keeps and prints)
    /// the directory, and releases the slot.
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        if let Err(e) = purge_slot(self.slot) {
            errors.push(format!("{e:#}"));
        }
        for member in self.lock_etcd().iter_mut() {
            member.reap();
        }
        if let Some(tempdir) = self.tempdir.take() {
            if keep_requested() {
                let kept = tempdir.keep();
                eprintln!(
                    "vmha-testbed: kept the testbed directory {}",
                    kept.display()
                );
            } else if let Err(e) = tempdir.close() {
                errors.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        if let Some(lock) = self.lock.take() {
            if errors.is_empty() {
                if let Err(e) = write_record(&lock, "") {
                    errors.push(format!("{e:#}"));
                }
            }
            drop(lock);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "tearing down testbed slot {}: {}",
                self.slot,
                errors.join("; ")
            )
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!("vmha-testbed: {e:#}");
        }
    }
}

/// Removes the leftovers of testbeds whose owning process died without tearing down (killed,
/// aborted, or stopped by a test runner's timeout): the processes in their namespaces, the
/// namespaces, veths and bridge, and their directories (unless they were created with
/// `VMHA_KEEP_TESTBED`). Never touches a testbed whose owner is alive: ownership is a `flock`
/// the kernel drops when the owner dies. Returns how many stale testbeds were cleaned.
/// [`Testbed::new`] calls this first; requires root.
pub fn cleanup_stale() -> Result<usize> {
    require_root()?;
    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let mut slots = BTreeSet::new();
    slots.extend(list_netns().iter().filter_map(|n| slot_of_netns(n)));
    slots.extend(list_links()?.iter().filter_map(|l| slot_of_link(l)));
    if let Ok(entries) = std::fs::read_dir(STATE_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(slot) = name
                .to_str()
                .and_then(|n| n.strip_prefix("slot-")?.strip_suffix(".lock")?.parse().ok())
            else {
                continue;
            };
            if entry.metadata().is_ok_and(|m| m.len() > 0) {
                slots.insert(slot);
            }
        }
    }
    let mut cleaned = 0;
    let mut errors = Vec::new();
    for slot in slots.into_iter().filter(|&s| s < SLOTS) {
        let Some(guard) = try_lock(slot)? else {
            continue; // a live testbed
        };
        match clean_slot(slot, &guard) {
            Ok(true) => cleaned += 1,
            Ok(false) => {}
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if errors.is_empty() {
        Ok(cleaned)
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// Purges everything of `slot`, whose lock the caller holds, and its recorded directory.
/// Returns whether there was anything to clean.
fn clean_slot(slot: u32, guard: &Flock<File>) -> Result<bool> {
    let record = std::fs::read_to_string(lock_path(slot)).unwrap_or_default();
    let found = purge_slot(slot)?;
    remove_recorded_dir(&record);
    write_record(guard, "")?;
    Ok(found || !record.trim().is_empty())
}

/// Kills every process in the namespaces of `slot`, then deletes its veths, bridge and
/// namespaces. Returns whether anything existed. The caller holds the slot's lock.
fn purge_slot(slot: u32) -> Result<bool> {
    let namespaces: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| slot_of_netns(n) == Some(slot))
        .collect();
    let mut links: Vec<String> = list_links()?
        .into_iter()
        .filter(|l| slot_of_link(l) == Some(slot))
        .collect();
    let found = !namespaces.is_empty() || !links.is_empty();
    let mut errors = Vec::new();
    let mut stuck = BTreeSet::new();
    for ns in &namespaces {
        if let Err(e) = kill_netns_processes(ns, &[], KILL_TIMEOUT) {
            errors.push(format!("{e:#}"));
            stuck.insert(ns);
        }
    }
    // Veths (longer names) before the bridge.
    links.sort_by_key(|l| std::cmp::Reverse(l.len()));
    for link in &links {
        if let Err(e) = ip(&["link", "del", link]) {
            if list_links()?.contains(link) {
                errors.push(format!("{e:#}"));
            }
        }
    }
    for ns in namespaces.iter().filter(|ns| !stuck.contains(ns)) {
        if let Err(e) = ip(&["netns", "del", ns]) {
            if ns_path(ns).exists() {
                errors.push(format!("{e:#}"));
            }
        }
    }
    if errors.is_empty() {
        Ok(found)
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// Claims a free slot whose subnet does not overlap anything of this machine.
fn claim_slot() -> Result<(u32, Flock<File>)> {
    let start = std::process::id()
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed))
        .wrapping_mul(7)
        % SLOTS;
    let mut skipped = Vec::new();
    for k in 0..SLOTS {
        let slot = (start + k) % SLOTS;
        let Some(guard) = try_lock(slot)? else {
            continue;
        };
        if let Err(e) = clean_slot(slot, &guard) {
            skipped.push(format!("slot {slot}: cleaning leftovers: {e:#}"));
            continue;
        }
        if let Some(conflict) = subnet_conflict(slot)? {
            skipped.push(format!(
                "slot {slot}: 10.213.{slot}.0/24 overlaps `{conflict}`"
            ));
            continue;
        }
        return Ok((slot, guard));
    }
    bail!(
        "no free testbed slot: all {SLOTS} subnets of 10.213.0.0/16 are used by live testbeds \
         or unusable ({})",
        skipped.join("; ")
    )
}

/// A route or address of the root namespace overlapping `slot`'s subnet, if any (the default
/// route aside).
fn subnet_conflict(slot: u32) -> Result<Option<String>> {
    let ours = (
        u32::from(Ipv4Addr::new(NET[0], NET[1], slot_octet(slot), 0)),
        24,
    );
    let routes = ip(&["-4", "-o", "route", "show", "table", "all"])?;
    for line in routes.lines() {
        let mut tokens = line.split_whitespace();
        let mut dest = tokens.next();
        if matches!(
            dest,
            Some(
                "unicast"
                    | "local"
                    | "broadcast"
                    | "multicast"
                    | "anycast"
                    | "blackhole"
                    | "unreachable"
                    | "prohibit"
                    | "throw"
                    | "nat"
            )
        ) {
            dest = tokens.next();
        }
        if let Some(net) = dest.and_then(parse_cidr) {
            if overlaps(net, ours) {
                return Ok(Some(line.trim().to_owned()));
            }
        }
    }
    let addrs = ip(&["-4", "-o", "addr", "show"])?;
    for line in addrs.lines() {
        let mut tokens = line.split_whitespace().skip_while(|t| *t != "inet");
        if let Some((addr, _)) = tokens.nth(1).and_then(parse_cidr) {
            if overlaps((addr, 32), ours) {
                return Ok(Some(line.trim().to_owned()));
            }
        }
    }
    Ok(None)
}

/// Parses `a.b.c.d/len` or `a.b.c.d` (a /32).
fn parse_cidr(text: &str) -> Option<(u32, u8)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, len.parse().ok()?),
        None => (text, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    (len <= 32).then_some((u32::from(addr), len))
}

/// Whether two IPv4 networks share an address.
fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    a.0 & mask == b.0 & mask
}

fn lock_path(slot: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("slot-{slot}.lock"))
}

/// Takes `slot`'s lock without blocking: `None` if a live testbed holds it. Lock files are
/// never deleted (deleting would let two processes lock two different files of one slot).
fn try_lock(slot: u32) -> Result<Option<Flock<File>>> {
    let path = lock_path(slot);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(guard) => Ok(Some(guard)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Waits for and takes the lock that serialises network set-ups of all testbeds.
fn setup_lock() -> Result<Flock<File>> {
    let path = Path::new(STATE_DIR).join("setup.lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", path.display()))
}

/// Replaces the owner record in a held lock file.
fn write_record(lock: &Flock<File>, text: &str) -> Result<()> {
    let file: &File = lock;
    file.set_len(0)
        .and_then(|()| file.write_all_at(text.as_bytes(), 0))
        .context("writing the testbed owner record")
}

/// Removes the directory named in a dead owner's record, unless it asked to keep it. Only a
/// directory named like ours (`…/vmha-testbed-*`) is ever removed.
fn remove_recorded_dir(record: &str) {
    let field = |key: &str| {
        record
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    };
    if field("keep") == Some("1") {
        return;
    }
    let Some(dir) = field("dir").map(Path::new) else {
        return;
    };
    let ours = dir.is_absolute()
        && dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vmha-testbed-"));
    if ours && dir.is_dir() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!(
                "vmha-testbed: removing stale directory {}: {e}",
                dir.display()
            );
        }
    }
}

/// Splits `vmtb<slot><rest>` (slot without leading zeros, below [`SLOTS`]).
fn split_slot(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || (digits > 1 && rest.starts_with('0')) {
        return None;
    }
    let slot: u32 = rest[..digits].parse().ok()?;
    (slot < SLOTS).then_some((slot, &rest[digits..]))
}

/// The slot of a testbed interface name: `vmtbS` (bridge) or `vmtbShI` (veth).
fn slot_of_link(name: &str) -> Option<u32> {
    let (slot, rest) = split_slot(name)?;
    if rest.is_empty() {
        return Some(slot);
    }
    let index = rest.strip_prefix('h')?;
    (!index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())).then_some(slot)
}

/// The slot of a testbed namespace name: `vmtbS-HOST`.
fn slot_of_netns(name: &str) -> Option<u32> {
    let (slot, rest) = split_slot(name)?;
    let host = rest.strip_prefix('-')?;
    (!host.is_empty()).then_some(slot)
}

fn slot_octet(slot: u32) -> u8 {
    u8::try_from(slot).unwrap_or(u8::MAX)
}

fn host_addr(slot: u32, index: usize) -> Ipv4Addr {
    let last = u8::try_from(index + 2).unwrap_or(u8::MAX);
    Ipv4Addr::new(NET[0], NET[1], slot_octet(slot), last)
}

fn keep_requested() -> bool {
    std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// A number unique within this process.
fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "vmha-testbed needs root: it creates network namespaces, veth pairs and a bridge \
             (run the multi-host tests as root, as CI does; they fail rather than skip)"
        );
    }
    Ok(())
}

fn validate_hosts(hosts: &[&str]) -> Result<()> {
    if hosts.is_empty() {
        bail!("a testbed needs at least one host");
    }
    if hosts.len() > MAX_HOSTS {
        bail!("at most {MAX_HOSTS} hosts per testbed, not {}", hosts.len());
    }
    let mut seen = BTreeSet::new();
    for name in hosts {
        let valid = !name.is_empty()
            && name.len() <= MAX_HOST_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            bail!(
                "invalid host name {name:?}: use 1 to {MAX_HOST_NAME} characters of \
                 [A-Za-z0-9_-]"
            );
        }
        if !seen.insert(*name) {
            bail!("host name {name:?} given twice");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_testbed_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Testbed>();
        assert_send_sync::<Proc>();
        assert_send_sync::<crate::DoubleRunChecker>();
    }

    #[test]
    fn names_fit_the_interface_limit_and_parse_back() {
        let longest_veth = format!("{PREFIX}{}h{}", SLOTS - 1, MAX_HOSTS - 1);
        assert!(longest_veth.len() <= 15, "{longest_veth}");
        assert_eq!(slot_of_link("vmtb255h199"), Some(255));
        assert_eq!(slot_of_link("vmtb7"), Some(7));
        assert_eq!(slot_of_link("vmtb7h0"), Some(7));
        assert_eq!(slot_of_link("vmtb7x"), None);
        assert_eq!(slot_of_link("vmtb07"), None);
        assert_eq!(slot_of_link("vmtb256"), None);
        assert_eq!(slot_of_link("vmtb7h"), None);
        assert_eq!(slot_of_link("eth0"), None);
        assert_eq!(slot_of_netns("vmtb7-h1"), Some(7));
        assert_eq!(slot_of_netns("vmtb77-h1"), Some(77));
        assert_eq!(slot_of_netns("vmtb7-"), None);
        assert_eq!(slot_of_netns("vmtb7h1"), None);
    }

    #[test]
    fn cidr_overlap() {
        let ours = parse_cidr("10.213.5.0/24").unwrap();
        assert!(overlaps(parse_cidr("10.0.0.0/8").unwrap(), ours));
        assert!(overlaps(parse_cidr("10.213.5.77").unwrap(), ours));
        assert!(!overlaps(parse_cidr("10.213.6.0/24").unwrap(), ours));
        assert!(!overlaps(parse_cidr("192.0.2.0/24").unwrap(), ours));
        assert!(overlaps(parse_cidr("0.0.0.0/0").unwrap(), ours));
        assert_eq!(parse_cidr("default"), None);
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
    }

    #[test]
    fn host_names_are_validated() {
        assert!(validate_hosts(&["h1", "h-2", "H_3"]).is_ok());
        assert!(validate_hosts(&[]).is_err());
        assert!(validate_hosts(&["h1", "h1"]).is_err());
        assert!(validate_hosts(&["a b"]).is_err());
        assert!(validate_hosts(&["a/b"]).is_err());
        assert!(validate_hosts(&[&"x".repeat(33)]).is_err());
    }

    #[test]
    fn recorded_dirs_are_removed_only_when_ours() {
        let parent = tempfile::tempdir().unwrap();
        let ours = parent.path().join("vmha-testbed-3-abc");
        let other = parent.path().join("precious");
        std::fs::create_dir(&ours).unwrap();
        std::fs::create_dir(&other).unwrap();
        remove_recorded_dir(&format!("pid=1\ndir={}\nkeep=0\n", other.display()));
        assert!(other.exists());
        remove_recorded_dir(&format!("pid=1\ndir={}\nkeep=1\n", ours.display()));
        assert!(ours.exists());
        remove_recorded_dir(&format!("pid=1\ndir={}\nkeep=0\n", ours.display()));
        assert!(!ours.exists());
    }
}
