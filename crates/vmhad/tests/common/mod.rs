//! Harness for vmhad's end-to-end tests: the test guest image, a config in a tempdir, the real
//! `vmhad` binary as a child process, a tiny HTTP/1.0 client for its Unix-socket API, and an
//! event recorder that follows `GET /v1/events?follow=true` so tests can wait for (and check the
//! order of) events. Every vmhad and every QEMU started for a test is killed by [`Vmhad`]'s
//! `Drop`, even when the test fails; QEMUs are found by their command line naming the test's own
//! runtime dir, never by name.

#![allow(dead_code)]

pub mod cdp;
pub mod tcp;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// How long any single wait in these tests may take before the test fails. Generous: TCG boots
/// on a loaded 2-core machine vary a lot. This is a hang guard, not a performance assertion.
pub const WAIT: Duration = Duration::from_secs(180);

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The test guest image directory (built by `scripts/build-guest-image.sh`, cached).
pub fn guest_image() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts/build-guest-image.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/build-guest-image.sh");
        assert!(out.status.success(), "building the guest image failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(stdout.lines().last().expect("OUTDIR on stdout").trim());
        assert!(
            dir.join("initrd.img").exists(),
            "no initrd in {}",
            dir.display()
        );
        dir
    })
}

/// Serialises the tests that boot VMs: TCG is CPU-heavy and the machine has 2 cores.
pub fn vm_test_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Milliseconds since the Unix epoch (the clock of vmhad's event timestamps).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The `[[vm]]` section of the demo VM used by these tests: apps db(100) ← web(50) ←
/// worker(10), probed every second, booting the test guest under TCG.
pub fn demo_vm(name: &str) -> String {
    let image = guest_image();
    let kernel = if image.join("vmlinux").exists() {
        image.join("vmlinux")
    } else {
        image.join("vmlinuz")
    };
    let initrd = image.join("initrd.img");
    let app = |app: &str, priority: u32, extra: &str| {
        format!(
            r#"
[[vm.app]]
name = "{app}"
priority = {priority}
interval = "1s"
{extra}
check = ["/opt/demo/app", "check", "{app}"]
start = ["/opt/demo/app", "start", "{app}"]
stop = ["/opt/demo/app", "stop", "{app}"]
"#
        )
    };
    format!(
        r#"
[[vm]]
name = "{name}"
driver = "qemu"
hosts = ["kvm1"]
vm_restart_limit = 5
stop_timeout = "5s"
boot_timeout = "90s"

[vm.qemu]
memory_mb = 256
cpus = 1
accel = "tcg"
kernel = "{kernel}"
initrd = "{initrd}"
append = "console=ttyS0 quiet"
{db}{web}{worker}"#,
        kernel = kernel.display(),
        initrd = initrd.display(),
        db = app("db", 100, "restart_limit = 2"),
        web = app("web", 50, "restart_limit = 5\nrequires = [\"db\"]"),
        worker = app("worker", 10, "restart_limit = 2\nrequires = [\"web\"]"),
    )
}

/// A whole cluster config (one host `kvm1`, embedded store) around `vms`.
pub fn cluster_config(dir: &Path, vms: &[String]) -> String {
    format!(
        r#"[cluster]
name = "e2e"
store = "embedded"
state_dir = "{state}"
runtime_dir = "{run}"

[[host]]
name = "kvm1"
{vms}"#,
        state = dir.join("state").display(),
        run = dir.join("run").display(),
        vms = vms.concat(),
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.0 over the Unix socket

/// One HTTP/1.0 request; returns the status code and the body (panics if it cannot be made).
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_http(socket, method, path, body).expect("API request")
}

/// One HTTP/1.0 request; the status code and the body, or why there is none (a daemon not
/// listening, or gone mid-answer).
pub fn try_http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = open(socket, method, path, body)?;
    let status = read_head(&mut stream)?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok((status, text))
}

fn open(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<BufReader<UnixStream>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: vmhad\r\n");
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    Ok(BufReader::new(stream))
}

/// Reads the status line and headers; returns the status code.
fn read_head(reader: &mut BufReader<UnixStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            return Ok(status);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events

/// One event of vmhad's log, as served by `/v1/events`.
#[derive(Debug, Clone)]
pub struct Ev {
    /// Sequence number in the store.
    pub seq: u64,
    /// Milliseconds since the epoch.
    pub time: u64,
    /// `controller` or the host name.
    pub origin: String,
    /// `VM`, `VM/APP` or `host:NAME`.
    pub object: String,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// Why.
    pub reason: String,
    /// The one-line rendering.
    pub text: String,
}

impl Ev {
    fn parse(v: &Value) -> Option<Ev> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let origin = match v.get("origin")? {
            Value::String(s) => s.clone(),
            o => o.get("host")?.as_str()?.to_string(),
        };
        let o = v.get("object")?;
        let object = if let Some(vm) = o.get("vm").and_then(Value::as_str) {
            vm.to_string()
        } else if let Some(a) = o.get("app") {
            format!("{}/{}", a.get("vm")?.as_str()?, a.get("app")?.as_str()?)
        } else {
            format!("host:{}", o.get("host")?.as_str()?)
        };
        Some(Ev {
            seq: v.get("seq")?.as_u64()?,
            time: v.get("time")?.as_u64()?,
            origin,
            object,
            from: s("from")?,
            to: s("to")?,
            reason: s("reason")?,
            text: s("text")?,
        })
    }

    /// `object` changed `from` → `to` (`*` matches any state), as seen by a host agent.
    pub fn is(&self, object: &str, from: &str, to: &str) -> bool {
        self.origin != "controller"
            && self.object == object
            && (from == "*" || self.from == from)
            && (to == "*" || self.to == to)
    }
}

#[derive(Default)]
struct Log {
    events: Vec<Ev>,
    last_seq: Option<u64>,
}

/// Every event any run of the daemon wrote, in order, without duplicates.
#[derive(Clone, Default)]
pub struct Events(Arc<(Mutex<Log>, Condvar)>);

impl Events {
    fn push(&self, ev: Ev) {
        let (lock, cvar) = &*self.0;
        let mut log = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if log.last_seq.is_some_and(|s| ev.seq <= s) {
            return;
        }
        log.last_seq = Some(ev.seq);
        log.events.push(ev);
        cvar.notify_all();
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.0
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A cursor: the number of events recorded so far.
    pub fn mark(&self) -> usize {
        self.log().events.len()
    }

    /// The events recorded from cursor `from` on.
    pub fn since(&self, from: usize) -> Vec<Ev> {
        self.log().events.get(from..).unwrap_or_default().to_vec()
    }

    /// Waits (at most `timeout`) until `n` events are recorded; false on timeout.
    fn wait_len(&self, n: usize, timeout: Duration) -> bool {
        let (lock, cvar) = &*self.0;
        let guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |log| log.events.len() < n)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.events.len() >= n
    }
}

/// Follows `/v1/events?follow=true` until the connection ends; `ready` gets one message once
/// the stream's head arrived.
fn follow(socket: PathBuf, events: Events, ready: std::sync::mpsc::Sender<()>) {
    let Ok(mut stream) = open(&socket, "GET", "/v1/events?limit=10000&follow=true", None) else {
        return;
    };
    // Followers idle for as long as nothing happens.
    let _ = stream.get_ref().set_read_timeout(None);
    if read_head(&mut stream).ok() != Some(200) {
        return;
    }
    let _ = ready.send(());
    let mut line = String::new();
    loop {
        line.clear();
        match stream.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if let Some(ev) = serde_json::from_str::<Value>(&line)
                    .ok()
                    .as_ref()
                    .and_then(Ev::parse)
                {
                    events.push(ev);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// A test's vmhad: its tempdir (config, state dir, runtime dir, logs), the running process (if
/// any), and every event it wrote. Dropping it kills vmhad and every QEMU of its runtime dir.
pub struct Vmhad {
    dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// `--state-dir`.
    pub state: PathBuf,
    /// `--runtime-dir`.
    pub run: PathBuf,
    vms: Vec<String>,
    child: Option<Child>,
    runs: usize,
    /// Events of all runs.
    pub events: Events,
    follower: Option<std::thread::JoinHandle<()>>,
    /// Extra environment variables of vmhad (`NOTIFY_SOCKET`, …).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments of vmhad (`--stop-vms-on-exit`, …).
    pub args: Vec<String>,
}

impl Vmhad {
    /// A tempdir with a config holding `vms` (names of [`demo_vm`]s). Nothing runs yet.
    pub fn new(vms: &[&str]) -> Vmhad {
        let dir = tempfile::Builder::new()
            .prefix("vmhad-e2e.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let sections: Vec<String> = vms.iter().map(|v| demo_vm(v)).collect();
        let config = dir.path().join("vmha.toml");
        std::fs::write(&config, cluster_config(dir.path(), &sections)).expect("writing config");
        Vmhad {
            state: dir.path().join("state"),
            run: dir.path().join("run"),
            config,
            dir,
            vms: vms.iter().map(|s| (*s).to_string()).collect(),
            child: None,
            runs: 0,
            events: Events::default(),
            follower: None,
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.state.join("vmhad.sock")
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("vmhad.{run}.log"))
    }

    /// Starts vmhad (debug logs to a file) and waits until its event stream is followed.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "vmhad already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_vmhad"))
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--runtime-dir")
            .arg(&self.run)
            .args(&self.args)
            .env("VMHA_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning vmhad");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.assert_running();
            if self.socket().exists() {
                let (tx, rx) = std::sync::mpsc::channel();
                let (socket, events) = (self.socket(), self.events.clone());
                let handle = std::thread::spawn(move || follow(socket, events, tx));
                if rx.recv_timeout(Duration::from_secs(10)).is_ok() {
                    self.follower = Some(handle);
                    return;
                }
                let _ = handle.join();
            }
            assert!(Instant::now() < deadline, "vmhad's API never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics (with the log) if vmhad exited.
    pub fn assert_running(&mut self) {
        let exited = self.child.as_mut().map(|c| c.try_wait().expect("try_wait"));
        if let Some(Some(status)) = exited {
            self.child = None;
            panic!("vmhad exited unexpectedly: {status}\n{}", self.log_tail(80));
        }
    }

    /// The pid of the running vmhad.
    pub fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("vmhad not running");
        i32::try_from(child.id()).expect("pid")
    }

    /// Sends `signal` to vmhad and waits for it to exit; the follower ends with it.
    pub fn signal_and_wait(&mut self, signal: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("vmhad not running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        kill(pid, signal).expect("signalling vmhad");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vmhad did not exit on {signal}\n{}", self.log_tail(80));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(f) = self.follower.take() {
            let _ = f.join();
        }
        status
    }

    /// The last `n` lines of the current run's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(self.runs)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    // --- events ------------------------------------------------------------------------------

    /// A cursor into the event log.
    pub fn mark(&self) -> usize {
        self.events.mark()
    }

    /// Events from cursor `from` on.
    pub fn since(&self, from: usize) -> Vec<Ev> {
        self.events.since(from)
    }

    /// Waits for the first event at or after cursor `from` matching `pred`; returns its cursor
    /// and the event. Fails the test (with the events and the log) after [`WAIT`].
    pub fn wait_for_event(
        &mut self,
        from: usize,
        what: &str,
        pred: impl Fn(&Ev) -> bool,
    ) -> (usize, Ev) {
        let deadline = Instant::now() + WAIT;
        let mut checked = from;
        loop {
            let events = self.events.since(checked);
            for (i, ev) in events.iter().enumerate() {
                if pred(ev) {
                    return (checked + i, ev.clone());
                }
            }
            checked += events.len();
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; events since the mark:\n{}\nvmhad log:\n{}",
                    self.events_text(from),
                    self.log_tail(60)
                );
            }
            self.assert_running();
            self.events
                .wait_len(checked + 1, Duration::from_millis(500));
        }
    }

    /// Waits for `object from → to` (host agent's view, `*` = any).
    pub fn wait_for(&mut self, from: usize, object: &str, f: &str, t: &str) -> (usize, Ev) {
        self.wait_for_event(from, &format!("{object} {f} → {t}"), |e| {
            e.is(object, f, t)
        })
    }

    /// The events since `from`, one per line.
    pub fn events_text(&self, from: usize) -> String {
        self.since(from)
            .iter()
            .map(|e| format!("  [{}] {}", e.seq, e.text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    // --- API ---------------------------------------------------------------------------------

    /// `GET path` → (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = http(&self.socket(), "GET", path, None);
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// `POST path` with a raw body → (status, JSON body).
    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let (status, body) = http(&self.socket(), "POST", path, Some(body));
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// `POST /v1/commands`.
    pub fn command(&self, cmd: &Value) -> (u16, Value) {
        self.post_raw("/v1/commands", &cmd.to_string())
    }

    /// `POST /v1/commands`, which must succeed.
    pub fn command_ok(&self, cmd: &Value) {
        let (status, body) = self.command(cmd);
        assert_eq!(status, 200, "command {cmd} refused: {body}");
    }

    /// Runs `argv` in the guest of `vm`; returns the `{exit, signal, stdout, stderr}` answer.
    pub fn exec(&self, vm: &str, argv: &[&str]) -> Value {
        let body = json!({"argv": argv, "timeout_ms": 20_000});
        let (status, out) = self.post_raw(&format!("/v1/vms/{vm}/exec"), &body.to_string());
        assert_eq!(status, 200, "exec {argv:?} in {vm}: {out}");
        out
    }

    /// Runs a demo-app subcommand in the guest; returns its exit code.
    pub fn app(&self, vm: &str, cmd: &str, app: &str) -> i64 {
        let out = self.exec(vm, &["/opt/demo/app", cmd, app]);
        out["exit"].as_i64().unwrap_or(-1)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Value {
        let (status, body) = self.get("/v1/status");
        assert_eq!(status, 200, "status: {body}");
        body
    }

    /// This host's status of VM `vm`.
    pub fn vm_status(&self, vm: &str) -> Value {
        let status = self.status();
        status["agent"]["vms"]
            .as_array()
            .and_then(|vms| vms.iter().find(|v| v["name"] == vm))
            .cloned()
            .unwrap_or_else(|| panic!("no VM {vm} in {status}"))
    }

    /// The status of app `app` of `vm`.
    pub fn app_status(&self, vm: &str, app: &str) -> Value {
        let v = self.vm_status(vm);
        v["apps"]
            .as_array()
            .and_then(|apps| apps.iter().find(|a| a["name"] == app))
            .cloned()
            .unwrap_or_else(|| panic!("no app {app} in {v}"))
    }

    /// `(app, state)` of every app of `vm`.
    pub fn app_states(&self, vm: &str) -> Vec<(String, String)> {
        let v = self.vm_status(vm);
        v["apps"]
            .as_array()
            .map(|apps| {
                apps.iter()
                    .map(|a| {
                        (
                            a["name"].as_str().unwrap_or_default().to_string(),
                            a["state"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    // --- QEMU --------------------------------------------------------------------------------

    /// The pid in `R/<vm>/qemu.pid`.
    pub fn qemu_pid(&self, vm: &str) -> i32 {
        let path = self.run.join(vm).join("qemu.pid");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        text.trim().parse().expect("pid in pidfile")
    }

    /// Live (non-zombie) QEMU processes of `vm`: their command line names this test's QMP
    /// socket of `vm`.
    pub fn qemu_processes(&self, vm: &str) -> Vec<i32> {
        let needle = self.run.join(vm).join("qmp.sock");
        processes_naming(needle.to_str().expect("utf-8 path"))
    }
}

/// Live, non-zombie processes whose command line contains `needle`.
pub fn processes_naming(needle: &str) -> Vec<i32> {
    let mut found = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        if state != "Z" && state != "X" {
            found.insert(pid);
        }
    }
    found.into_iter().collect()
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, Some(s) if s != "Z" && s != "X")
}

impl Drop for Vmhad {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(f) = self.follower.take() {
            let _ = f.join();
        }
        for vm in &self.vms {
            for pid in self.qemu_processes(vm) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- vmhad log (run {}) ---\n{}",
                self.runs,
                self.log_tail(120)
            );
        }
        if std::env::var_os("VMHA_E2E_KEEP").is_some() {
            // Keep config, state and logs for a post-mortem.
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("placeholder tempdir"),
            );
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

/// Prints a measured latency (never asserted: timing targets belong in benchmarks).
pub fn latency(what: &str, from_ms: u64, to_ms: u64) {
    println!(
        "LATENCY {what}: {} ms",
        i128::from(to_ms) - i128::from(from_ms)
    );
}
