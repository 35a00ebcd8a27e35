//! A local vmhad driven from outside, shared by `vmha demo` and `vmha bench`: vmhad as a child
//! process, its event stream as typed events, guest commands, and what /proc says about a
//! process (CPU ticks, RSS); [`local`]: the one-host setup on the test guest built from these.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::client::Client;

pub mod local;

pub use local::Local;

/// vmhad as a child process, stopped (with its VMs) when dropped.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `vmhad --config config --stop-vms-on-exit` (log to `log`), then waits up to
    /// `timeout` until its API answers at `socket`; returns it and a client of that socket.
    pub fn start(
        vmhad: &Path,
        config: &Path,
        log: &Path,
        socket: PathBuf,
        timeout: Duration,
    ) -> anyhow::Result<(Daemon, Client)> {
        let log_file = std::fs::File::create(log)?;
        let child = Command::new(vmhad)
            .arg("--config")
            .arg(config)
            .arg("--stop-vms-on-exit")
            .env("VMHA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", vmhad.display()))?;
        let daemon = Daemon { child };
        let client = Client::new(socket);
        let t0 = Instant::now();
        while client.get("/v1/status").is_err() {
            if t0.elapsed() > timeout {
                bail!("vmhad did not come up; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((daemon, client))
    }

    /// vmhad's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: vmhad stops its VMs (--stop-vms-on-exit) and exits.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..600 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Milliseconds since the epoch (the clock of vmhad's event times).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An event of vmhad's stream.
#[derive(Debug, Clone)]
pub struct Ev {
    /// When (ms since the epoch).
    pub time: u64,
    /// The VM it is about.
    pub vm: String,
    /// The app, for an app's event.
    pub app: Option<String>,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// Why.
    pub reason: String,
    /// The whole line as vmhad words it.
    pub text: String,
}

impl Ev {
    /// The event of one JSON line of `/v1/events`; `None` if it is not a state change.
    pub fn parse(v: &Value) -> Option<Ev> {
        let object = &v["object"];
        let (vm, app) = if let Some(vm) = object["vm"].as_str() {
            (vm.to_string(), None)
        } else if let Some(app) = object.get("app") {
            (
                app["vm"].as_str()?.to_string(),
                Some(app["app"].as_str()?.to_string()),
            )
        } else {
            (String::new(), None)
        };
        Some(Ev {
            time: v["time"].as_u64()?,
            vm,
            app,
            from: v["from"].as_str()?.to_string(),
            to: v["to"].as_str()?.to_string(),
            reason: v["reason"].as_str().unwrap_or_default().to_string(),
            text: v["text"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// Whether it is about `app` of `vm`.
    pub fn is_app(&self, vm: &str, app: &str) -> bool {
        self.vm == vm && self.app.as_deref() == Some(app)
    }

    /// Whether it is about `vm` itself (not one of its apps).
    pub fn is_vm(&self, vm: &str) -> bool {
        self.vm == vm && self.app.is_none()
    }
}

/// vmhad's new events (from now on), read by a background thread.
pub fn follow_events(client: &Client) -> mpsc::Receiver<Ev> {
    let (tx, rx) = mpsc::channel();
    let follower = client.clone();
    std::thread::spawn(move || {
        let _ = follower.follow("/v1/events?limit=0&follow=true", |v| {
            Ev::parse(&v).is_none_or(|ev| tx.send(ev).is_ok())
        });
    });
    rx
}

/// Runs `argv` in `vm`'s guest through vmhad; fails unless it exits 0.
pub fn guest_exec(client: &Client, vm: &str, argv: &[&str]) -> anyhow::Result<()> {
    let out = client.post(&format!("/v1/vms/{vm}/exec"), &json!({ "argv": argv }))?;
    if out["exit"].as_i64() != Some(0) {
        bail!("`{}` in {vm} failed: {out}", argv.join(" "));
    }
    Ok(())
}

/// The pid of `vm`'s QEMU, from its pidfile under `runtime_dir`.
pub fn qemu_pid(runtime_dir: &Path, vm: &str) -> anyhow::Result<u32> {
    let path = runtime_dir.join(vm).join("qemu.pid");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().parse()?)
}

/// CPU time of `pid` in clock ticks (USER_HZ, 100 a second): its own, plus that of its waited-for
/// children when `children`.
pub fn cpu_ticks(pid: u32, children: bool) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        Ok(f.get(i).context("short /proc/PID/stat")?.parse()?)
    };
    let own = field(11)? + field(12)?;
    Ok(if children {
        own + field(13)? + field(14)?
    } else {
        own
    })
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// CPU share (% of one core) and RSS (MiB) of `pid` over `window`.
pub fn usage(pid: u32, window: Duration) -> anyhow::Result<(f64, u64)> {
    let before = cpu_ticks(pid, false)?;
    std::thread::sleep(window);
    let used = cpu_ticks(pid, false)? - before;
    // USER_HZ is 100 on Linux: ticks per second = percent of one core.
    let cpu = used as f64 / window.as_secs_f64();
    Ok((cpu, rss_kib(pid)? / 1024))
}
