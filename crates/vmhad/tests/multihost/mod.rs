//! Harness of the multi-host tests: hosts as network namespaces (vmha-testbed), a 3-member
//! etcd, one real vmhad per host with its own state and runtime dirs, real TCG VMs, and the
//! double-run checker sampling every 100 ms. Everything is torn down when the [`Cluster`] is
//! dropped, also when a test fails (then the hosts' vmhad logs are printed).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmha_testbed::{DoubleRunChecker, Proc, Signal, Testbed};

use crate::common::{guest_image, http, try_http};

/// Lease TTL of these clusters: it must outlast an etcd leader election (~1–2 s with a 1 s
/// election timeout), during which no renewal succeeds, by the fencing margin.
pub const TTL: &str = "5s";
/// Self-fencing margin (hosts fence after 3.5 s without an acknowledged renewal).
pub const FENCE_MARGIN: &str = "1500ms";

/// A `[[vm]]` of the demo guest (apps db(100) ← web(50) ← worker(10), probed every second).
pub fn vm(name: &str, hosts: &[&str], extra: &str) -> String {
    let image = guest_image();
    let kernel = if image.join("vmlinux").exists() {
        image.join("vmlinux")
    } else {
        image.join("vmlinuz")
    };
    let app = |app: &str, priority: u32, more: &str| {
        format!(
            r#"
[[vm.app]]
name = "{app}"
priority = {priority}
interval = "1s"
{more}
check = ["/opt/demo/app", "check", "{app}"]
start = ["/opt/demo/app", "start", "{app}"]
stop = ["/opt/demo/app", "stop", "{app}"]
"#
        )
    };
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        r#"
[[vm]]
name = "{name}"
driver = "qemu"
hosts = [{hosts}]
stop_timeout = "5s"
boot_timeout = "90s"
{extra}

[vm.qemu]
memory_mb = 192
cpus = 1
accel = "tcg"
kernel = "{kernel}"
initrd = "{initrd}"
append = "console=ttyS0 quiet"
{db}{web}{worker}"#,
        hosts = hosts.join(", "),
        kernel = kernel.display(),
        initrd = image.join("initrd.img").display(),
        db = app("db", 100, "restart_limit = 2"),
        web = app("web", 50, "restart_limit = 5\nrequires = [\"db\"]"),
        worker = app("worker", 10, "restart_limit = 2\nrequires = [\"web\"]"),
    )
}

/// A cluster under test.
pub struct Cluster {
    /// The hosts and etcd (dropped last: it kills everything left).
    pub bed: Testbed,
    /// The cluster configuration file.
    pub config: PathBuf,
    hosts: Vec<String>,
    vms: Vec<String>,
    daemons: BTreeMap<String, Proc>,
    /// Samples which hosts run which VMs every 100 ms.
    pub checker: DoubleRunChecker,
    started: Instant,
}

impl Cluster {
    /// Three hosts kvm1..kvm3 with a 3-member etcd, and the VMs of `vm_sections`, named `vms`.
    /// Starts vmhad on every host.
    pub fn new(vms: &[&str], vm_sections: &[String]) -> Cluster {
        let hosts = ["kvm1", "kvm2", "kvm3"];
        let bed = Testbed::new(&hosts, 3).expect("building the testbed (needs root)");
        let config = bed.dir().join("vmha.toml");
        std::fs::write(
            &config,
            format!(
                "{}{}",
                bed.cluster_toml("t", TTL, FENCE_MARGIN),
                vm_sections.concat()
            ),
        )
        .expect("writing the config");
        let checker = DoubleRunChecker::start(
            vms.iter().map(|v| (*v).to_string()).collect(),
            hosts
                .iter()
                .map(|h| ((*h).to_string(), bed.host_dir(h).join("run")))
                .collect(),
        );
        let mut c = Cluster {
            bed,
            config,
            hosts: hosts.iter().map(|h| (*h).to_string()).collect(),
            vms: vms.iter().map(|v| (*v).to_string()).collect(),
            daemons: BTreeMap::new(),
            checker,
            started: Instant::now(),
        };
        for h in hosts {
            c.start(h);
        }
        for h in hosts {
            c.wait_api(h);
        }
        c
    }

    /// vmhad's API socket on `host`.
    pub fn socket(&self, host: &str) -> PathBuf {
        self.bed.vmhad_socket(host)
    }

    /// `host`'s runtime dir (QMP/QGA sockets of its VMs).
    pub fn runtime(&self, host: &str) -> PathBuf {
        self.bed.host_dir(host).join("run")
    }

    /// Starts vmhad on `host` (in its namespace).
    pub fn start(&mut self, host: &str) {
        let vmhad = Path::new(env!("CARGO_BIN_EXE_vmhad"));
        let mut cmd = self.bed.vmhad_command(vmhad, &self.config, host);
        cmd.env("VMHA_LOG", "info,vmhad=debug");
        let proc = self.bed.spawn(host, cmd).expect("starting vmhad");
        self.daemons.insert(host.to_string(), proc);
    }

    /// Waits until `host`'s API answers.
    pub fn wait_api(&self, host: &str) {
        self.wait(&format!("{host}'s API"), Duration::from_secs(60), || {
            self.try_status(host).is_some()
        });
    }

    /// Kills `host`: every process in its namespace (vmhad, its QEMUs, its etcd member).
    pub fn kill_host(&mut self, host: &str) {
        self.kill_host_processes(host, false);
    }

    /// Kills every process of `host` but its etcd member (as if etcd ran on other machines:
    /// a second host lost must not take etcd's quorum with it).
    pub fn kill_host_but_etcd(&mut self, host: &str) {
        self.kill_host_processes(host, true);
    }

    fn kill_host_processes(&mut self, host: &str, keep_etcd: bool) {
        self.bed
            .kill_host_processes(host, keep_etcd)
            .expect("killing the host");
        if let Some(mut p) = self.daemons.remove(host) {
            let _ = p.kill_and_wait();
        }
    }

    /// Stops vmhad on `host` with `signal` and waits for it to exit (its VMs keep running).
    pub fn stop_vmhad(&mut self, host: &str, signal: Signal) {
        if let Some(mut p) = self.daemons.remove(host) {
            p.signal(signal).expect("signalling vmhad");
            let _ = p.wait_timeout(Duration::from_secs(30));
            let _ = p.kill_and_wait();
        }
    }

    /// Seconds since the cluster was built (for logs).
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// `GET /v1/status` of `host`, if it answers.
    pub fn try_status(&self, host: &str) -> Option<Value> {
        let socket = self.socket(host);
        if !socket.exists() {
            return None;
        }
        match try_http(&socket, "GET", "/v1/status", None) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// `GET /v1/status` of `host`.
    pub fn status(&self, host: &str) -> Value {
        self.try_status(host)
            .unwrap_or_else(|| panic!("{host} does not answer"))
    }

    /// An admin command sent to `host`'s API → (HTTP status, body).
    pub fn command(&self, host: &str, cmd: &Value) -> (u16, Value) {
        let (status, body) = http(
            &self.socket(host),
            "POST",
            "/v1/commands",
            Some(&cmd.to_string()),
        );
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// An admin command that must be acknowledged.
    pub fn command_ok(&self, host: &str, cmd: &Value) {
        let (status, body) = self.command(host, cmd);
        assert_eq!(status, 200, "{cmd} via {host} refused: {body}");
    }

    /// The hosts whose live QEMU runs `vm` now.
    pub fn running_on(&self, vm: &str) -> Vec<String> {
        let hosts: Vec<(String, PathBuf)> = self
            .hosts
            .iter()
            .map(|h| (h.clone(), self.runtime(h)))
            .collect();
        vmha_testbed::vm_placement(&[vm.to_string()], &hosts)
            .remove(vm)
            .unwrap_or_default()
            .into_iter()
            .map(|(h, _)| h)
            .collect()
    }

    /// The pid of `vm`'s QEMU on `host`, if it runs there.
    pub fn qemu_pid(&self, host: &str, vm: &str) -> Option<u32> {
        let hosts = vec![(host.to_string(), self.runtime(host))];
        vmha_testbed::vm_placement(&[vm.to_string()], &hosts)
            .remove(vm)
            .and_then(|v| v.first().map(|(_, pid)| *pid))
    }

    /// `vm`'s group status on `host` (its agent's view), if `host` answers.
    pub fn vm_on(&self, host: &str, vm: &str) -> Option<Value> {
        let s = self.try_status(host)?;
        s["agent"]["vms"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == vm)
            .cloned()
    }

    /// Whether `vm` is online on `host` with every app online (or intentionally offline).
    pub fn online_on(&self, host: &str, vm: &str) -> bool {
        self.vm_on(host, vm).is_some_and(|v| {
            v["state"] == "online"
                && v["apps"].as_array().is_some_and(|a| {
                    a.iter()
                        .all(|app| app["state"] == "online" || app["state"] == "offline")
                })
        })
    }

    /// The host that leads the cluster, as `host` sees it.
    pub fn leader(&self, host: &str) -> Option<String> {
        self.try_status(host)?["leader"]
            .as_str()
            .map(str::to_string)
    }

    /// Polls `ok` every 100 ms until it holds, or fails the test after `timeout`.
    pub fn wait(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "[{:.1}s] timed out waiting for {what}",
                self.t()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("[{:.1}s] {what}", self.t());
    }

    /// Events of the whole cluster (read from `host`), oldest first, as text lines.
    pub fn events(&self, host: &str, limit: usize) -> Vec<String> {
        self.try_events(host, limit).expect("GET /v1/events")
    }

    /// [`Cluster::events`], or why there are none (the daemon does not answer).
    fn try_events(&self, host: &str, limit: usize) -> std::io::Result<Vec<String>> {
        let path = format!("/v1/events?limit={limit}");
        let (_, body) = try_http(&self.socket(host), "GET", &path, None)?;
        Ok(body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_string))
            .collect())
    }

    /// The last lines of `host`'s vmhad log above debug level (for failure messages: the
    /// debug lines of periodic probes would crowd out the transitions).
    pub fn logs(&self, host: &str) -> String {
        let Some(p) = self.daemons.get(host) else {
            return String::new();
        };
        let log = p.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The cluster's events as the first host that answers has them (for failure messages).
    fn any_events(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter_map(|h| self.try_events(h, 200).ok())
            .find(|e| !e.is_empty())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.checker.stop();
        if std::thread::panicking() {
            for h in &self.hosts {
                eprintln!("--- vmhad on {h} ---\n{}", self.logs(h));
            }
            eprintln!("--- cluster events ---\n{}", self.any_events().join("\n"));
        }
    }
}

/// A JSON admin command.
pub fn cmd(v: Value) -> Value {
    v
}

/// `{"command": "...", "vm": vm}`.
pub fn vm_cmd(command: &str, vm: &str) -> Value {
    json!({"command": command, "vm": vm})
}
