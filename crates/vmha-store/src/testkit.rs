//! Test helpers (feature `testkit`): a real `etcd` on loopback, for this crate's tests and for
//! other crates' (the daemon's) tests.
//!
//! [`EtcdServer::start`] runs one member, [`EtcdServer::start_cluster`] several, each on
//! `127.0.0.1` with its own free client and peer ports, in a temporary directory, with
//! `--heartbeat-interval 100 --election-timeout 1000 --pre-vote`. Start-up waits until every
//! member reports healthy. Dropping the server kills the members and deletes the directory, also
//! when a test panics. The `etcd` binary comes from Debian's `etcd-server` package (or `$VMHA_ETCD_BIN`); if
//! it is missing, starting fails with [`TestkitError::EtcdMissing`], which names the package.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::etcd::{EtcdOptions, EtcdStore};
use crate::store::StoreError;

/// Overrides the `etcd` binary (default: `etcd` on `PATH`).
pub const ETCD_BIN_ENV: &str = "VMHA_ETCD_BIN";

/// If set (to anything), dropping an [`EtcdServer`] keeps its directory (data and member logs)
/// and prints where it is: for debugging a failed test.
pub const KEEP_ENV: &str = "VMHA_TESTKIT_KEEP";

/// How long members may take to become healthy.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// How long [`EtcdServer::freeze`] waits for every thread of a member to stop.
const FREEZE_PATIENCE: Duration = Duration::from_secs(10);

/// Whether every thread of `pid` is stopped (state `T` or `t` in `/proc/PID/task/TID/stat`);
/// false when they cannot be read.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks {
        let Ok(task) = task else { return false };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return false;
        };
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if !matches!(state, Some('T' | 't')) {
            return false;
        }
        any = true;
    }
    any
}

/// How many times start-up is tried with fresh ports (another process may take a port between
/// picking it and etcd binding it).
const START_ATTEMPTS: usize = 5;

/// Errors of the test helpers.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// No `etcd` binary.
    #[error(
        "the `etcd` binary was not found (looked for ${ETCD_BIN_ENV}, then `etcd` on PATH): \
         install the Debian package etcd-server (scripts/install-deps.sh does)"
    )]
    EtcdMissing,
    /// etcd did not start or did not become healthy.
    #[error("etcd did not start: {0}")]
    Start(String),
    /// A member index out of range.
    #[error("no etcd member {0}")]
    NoSuchMember(usize),
    /// Local I/O (temporary directory, log files, spawning).
    #[error("testkit I/O error: {0}")]
    Io(#[from] std::io::Error),
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running etcd (one member or a cluster) on loopback, killed and deleted on drop.
pub struct EtcdServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
}

impl EtcdServer {
    /// Starts a single-member etcd and waits until it is healthy.
    pub fn start() -> Result<EtcdServer, TestkitError> {
        Self::start_cluster(1)
    }

    /// Starts a cluster of `size` members (at least 1) and waits until each is healthy.
    pub fn start_cluster(size: usize) -> Result<EtcdServer, TestkitError> {
        let binary = find_etcd()?;
        let size = size.max(1);
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let mut server = EtcdServer {
                binary: binary.clone(),
                dir: tempfile::Builder::new().prefix("vmha-etcd-").tempdir()?,
                token: unique_token(),
                members: Vec::with_capacity(size),
            };
            let ports = free_ports(2 * size)?;
            for (i, pair) in ports.chunks(2).enumerate() {
                server.members.push(Member {
                    // Unique across processes: a health check can tell our member from another
                    // test's etcd that got the same "free" port first.
                    name: format!("{}-m{i}", server.token),
                    client_port: pair[0],
                    peer_port: pair[1],
                    child: None,
                });
            }
            match server.launch_all() {
                Ok(()) => return Ok(server),
                Err(TestkitError::Start(reason)) => {
                    tracing::warn!(attempt, %reason, "etcd did not start; retrying with new ports");
                    last = reason;
                }
                Err(e) => return Err(e),
            }
        }
        Err(TestkitError::Start(format!(
            "gave up after {START_ATTEMPTS} attempts; last: {last}"
        )))
    }

    fn launch_all(&mut self) -> Result<(), TestkitError> {
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        let deadline = Instant::now() + START_PATIENCE;
        for i in 0..self.members.len() {
            self.wait_healthy(i, deadline)?;
        }
        Ok(())
    }

    fn member_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) -> Result<(), TestkitError> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let member = &self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let mut command = Command::new(&self.binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                command.env_remove(key);
            }
        }
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.member_dir(i))
            .arg("--listen-client-urls")
            .arg(member.client_url())
            .arg("--advertise-client-urls")
            .arg(member.client_url())
            .arg("--listen-peer-urls")
            .arg(member.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(member.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            // A restarted member must not disrupt the cluster with a needless election.
            .arg("--pre-vote")
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TestkitError::EtcdMissing,
            _ => TestkitError::Io(e),
        })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until member `i` answers `/health` with `"health":"true"` (it has a leader).
    fn wait_healthy(&mut self, i: usize, deadline: Instant) -> Result<(), TestkitError> {
        let port = self.members[i].client_port;
        loop {
            if let Some(child) = self.members[i].child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.members[i].child = None;
                    return Err(TestkitError::Start(format!(
                        "member {} exited with {status}; log:\n{}",
                        self.members[i].name,
                        self.log_tail(i)
                    )));
                }
            }
            if healthy(port) && is_member(port, &self.members[i].name) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestkitError::Start(format!(
                    "member {} not healthy within {START_PATIENCE:?}; log:\n{}",
                    self.members[i].name,
                    self.log_tail(i)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path(i)) {
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn check(&self, i: usize) -> Result<(), TestkitError> {
        if i < self.members.len() {
            Ok(())
        } else {
            Err(TestkitError::NoSuchMember(i))
        }
    }

    /// The client URLs of every member (killed ones included), e.g. `http://127.0.0.1:43121`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> Result<String, TestkitError> {
        self.check(i)?;
        Ok(self.members[i].client_url())
    }

    /// How many members the cluster has.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Whether member `i` runs (was not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.members.get(i).is_some_and(|m| m.child.is_some())
    }

    /// The temporary directory holding the members' data and logs (`<member>.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills member `i` (SIGKILL) and reaps it. Killing a killed member does nothing.
    pub fn kill(&mut self, i: usize) -> Result<(), TestkitError> {
        self.check(i)?;
        if let Some(mut child) = self.members[i].child.take() {
            // Already exited is fine.
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// Freezes member `i` (SIGSTOP): its connections stay open but nothing answers, as when the
    /// network to it is cut. Returns once every thread of the member is stopped: the kernel
    /// stops a multi-threaded process only once the thread it picked runs, and until then the
    /// others still answer (under load, a request sent right after `kill` was served about one
    /// time in ten). [`EtcdServer::thaw`] resumes it; dropping the server kills it anyway.
    pub fn freeze(&mut self, i: usize) -> Result<(), TestkitError> {
        self.signal(i, "-STOP")?;
        let pid = self.members[i].child.as_ref().map_or(0, Child::id);
        let deadline = Instant::now() + FREEZE_PATIENCE;
        while !all_threads_stopped(pid) {
            if Instant::now() >= deadline {
                return Err(TestkitError::Start(format!(
                    "member {} was not stopped {FREEZE_PATIENCE:?} after SIGSTOP",
                    self.members[i].name
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Resumes member `i` after [`EtcdServer::freeze`] (SIGCONT).
    pub fn thaw(&mut self, i: usize) -> Result<(), TestkitError> {
        self.signal(i, "-CONT")
    }

    fn signal(&mut self, i: usize, signal: &str) -> Result<(), TestkitError> {
        self.check(i)?;
        let Some(child) = self.members[i].child.as_ref() else {
            return Err(TestkitError::Start(format!(
                "member {} is not running",
                self.members[i].name
            )));
        };
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(TestkitError::Start(format!(
                "kill {signal} failed: {status}"
            )))
        }
    }

    /// Restarts member `i` (killed before) on its old ports and data, and waits until it is healthy
    /// (back in the cluster, with a leader).
    pub fn restart(&mut self, i: usize) -> Result<(), TestkitError> {
        self.check(i)?;
        if self.members[i].child.is_some() {
            return Ok(());
        }
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            self.spawn(i)?;
            match self.wait_healthy(i, Instant::now() + START_PATIENCE) {
                Ok(()) => return Ok(()),
                Err(TestkitError::Start(reason)) => {
                    self.kill(i)?;
                    last = reason;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
        Err(TestkitError::Start(last))
    }

    /// A store on every member with default [`EtcdOptions`].
    pub async fn store(&self) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect(&self.endpoints(), EtcdOptions::default()).await
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::env::var_os(KEEP_ENV).is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("etcd test directory kept: {}", self.dir.path().display());
        }
        // The temporary directory removes itself after this.
    }
}

/// The `etcd` binary: `$VMHA_ETCD_BIN`, else `etcd` on `PATH`.
fn find_etcd() -> Result<PathBuf, TestkitError> {
    if let Some(path) = std::env::var_os(ETCD_BIN_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(TestkitError::EtcdMissing)
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .ok_or(TestkitError::EtcdMissing)
}

/// `count` distinct loopback ports that were free a moment ago (etcd cannot bind port 0 and report
/// it). They are picked at random *below* the kernel's ephemeral range and checked by binding
/// them: the kernel never hands those out for port 0 or outgoing connections, so other tests'
/// connections cannot take them before etcd binds them, nor while a killed member is down.
/// Falls back to binding port 0 where that range is too small.
fn free_ports(count: usize) -> Result<Vec<u16>, TestkitError> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    let mut listeners = Vec::with_capacity(count);
    if ephemeral_start > LOW + 1_000 {
        let span = u64::from(ephemeral_start - LOW);
        let mut random = Random::new();
        for _ in 0..count * 200 {
            if listeners.len() == count {
                break;
            }
            let offset = u16::try_from(random.next() % span).unwrap_or(0);
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, LOW + offset)) {
                listeners.push(listener);
            }
        }
    }
    while listeners.len() < count {
        listeners.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?);
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A small xorshift generator seeded from the clock, the process and a counter: enough to spread
/// port picks of concurrent test processes.
struct Random(u64);

impl Random {
    fn new() -> Random {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Random(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A loopback port that refuses connections for as long as this value lives: it is the local port
/// of a connection held open here, so nothing else can listen on it meanwhile (a port that was
/// merely free a moment ago could be taken by another test's etcd). For "unreachable endpoint"
/// tests.
pub struct RefusedPort {
    port: u16,
    _client: TcpStream,
    _server: TcpStream,
}

impl RefusedPort {
    /// Reserves such a port.
    pub fn new() -> Result<RefusedPort, TestkitError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok(RefusedPort {
            port: client.local_addr()?.port(),
            _client: client,
            _server: server,
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "vmha-test-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether etcd on `port` answers `GET /health` with `"health":"true"` (it has a leader).
fn healthy(port: u16) -> bool {
    http(
        port,
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .is_some_and(|response| response.contains("\"health\":\"true\""))
}

/// Whether the etcd answering on `port` belongs to the cluster that has the member `name` (names
/// are unique per test cluster), through the gRPC gateway's member list.
fn is_member(port: u16, name: &str) -> bool {
    let request = "POST /v3/cluster/member/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                   Content-Type: application/json\r\nContent-Length: 2\r\n\
                   Connection: close\r\n\r\n{}";
    http(port, request).is_some_and(|response| response.contains(&format!("\"name\":\"{name}\"")))
}

/// Sends one raw HTTP/1.1 request to `127.0.0.1:port`; the whole response, if any.
fn http(port: u16, request: &str) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let timeout = Some(Duration::from_secs(2));
    stream.set_read_timeout(timeout).ok()?;
    stream.set_write_timeout(timeout).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.take(64 * 1024).read_to_string(&mut response);
    Some(response)
}
