//! `vmha demo --bench-watch N`: the watch benchmark (issue 14). One TCG VM with three demo
//! apps; for watch on and off, at app intervals of 1 s and 10 s: N kills of one app at a random
//! (seeded) phase, timed from just before the kill command to the app's failure event
//! (detected) and to its `online` event (running again). Then vmhad's and QEMU's CPU time per
//! check (from `/proc/PID/stat`, counts from `guest_io` in the status) with the watch on, off,
//! and with checks every 200 ms.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use crate::client::Client;
use crate::harness::{Daemon, Ev, cpu_ticks, follow_events, now_ms};

const VM: &str = "bench";
const APP: &str = "a2";

/// A small seeded generator (xorshift64*): the same seed, the same kill phases.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn config(guest: &Path, dir: &Path, interval: &str, watch: bool) -> String {
    let g = guest.display();
    let mut apps = String::new();
    for a in ["a1", "a2", "a3"] {
        let pid_file = if watch {
            format!("pid_file = \"/run/demo/{a}.pid\"\n")
        } else {
            String::new()
        };
        apps.push_str(&format!(
            r#"
[[vm.app]]
name = "{a}"
interval = "{interval}"
timeout = "2s"
restart_limit = 1000
check = ["/opt/demo/app", "check", "{a}"]
start = ["/opt/demo/app", "start", "{a}"]
stop = ["/opt/demo/app", "stop", "{a}"]
{pid_file}"#
        ));
    }
    format!(
        r#"[cluster]
name = "bench"
store = "embedded"
state_dir = "{state}"
runtime_dir = "{run}"

[[host]]
name = "kvm1"

[[vm]]
name = "{VM}"
hosts = ["kvm1"]
boot_timeout = "120s"
watch = {watch}

[vm.qemu]
memory_mb = 256
cpus = 1
accel = "auto"
kernel = "{g}/vmlinux"
initrd = "{g}/initrd.img"
append = "console=ttyS0 quiet"
{apps}"#,
        state = dir.join("state").display(),
        run = dir.join("run").display(),
    )
}

/// One vmhad with the bench VM, its events and its API.
struct Run {
    daemon: Daemon,
    client: Client,
    events: mpsc::Receiver<Ev>,
    run_dir: PathBuf,
}

impl Run {
    fn start(
        vmhad: &Path,
        guest: &Path,
        dir: &Path,
        interval: &str,
        watch: bool,
    ) -> anyhow::Result<Run> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let path = dir.join("vmha.toml");
        std::fs::write(&path, config(guest, dir, interval, watch))?;
        vmha_model::Config::from_file(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (daemon, client) = Daemon::start(
            vmhad,
            &path,
            &dir.join("vmhad.log"),
            dir.join("state").join("vmhad.sock"),
            Duration::from_secs(20),
        )?;
        let rx = follow_events(&client);
        let run = Run {
            daemon,
            client,
            events: rx,
            run_dir: dir.join("run"),
        };
        let t0 = Instant::now();
        while !run.all_online()? {
            if t0.elapsed() > Duration::from_secs(180) {
                bail!(
                    "apps not online within 180 s; see {}/vmhad.log",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(run)
    }

    fn status(&self) -> anyhow::Result<Value> {
        Ok(self.client.get("/v1/status")?)
    }

    fn all_online(&self) -> anyhow::Result<bool> {
        let s = self.status()?;
        let apps = s["agent"]["vms"][0]["apps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(apps.len() == 3 && apps.iter().all(|a| a["state"] == "online"))
    }

    fn wait(&self, timeout: Duration, pred: impl Fn(&Ev) -> bool) -> anyhow::Result<Ev> {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(ev) if pred(&ev) => return Ok(ev),
                Ok(_) => {}
                Err(_) => bail!("timed out after {timeout:?}"),
            }
        }
    }

    /// Kills the app at a random phase; returns (kill → detected, kill → running again).
    fn kill(&self, rng: &mut Rng, interval_ms: u64) -> anyhow::Result<(u64, u64)> {
        std::thread::sleep(Duration::from_millis(rng.below(interval_ms)));
        while self.events.try_recv().is_ok() {}
        let t = now_ms();
        let out = self.client.post(
            &format!("/v1/vms/{VM}/exec"),
            &json!({"argv": ["/bin/sh", "-c", format!("kill -9 $(cat /run/demo/{APP}.pid)")]}),
        )?;
        if out["exit"].as_i64() != Some(0) {
            bail!("kill failed: {out}");
        }
        let detected = self.wait(Duration::from_secs(30), |e| {
            e.is_app(VM, APP) && e.from == "online"
        })?;
        let back = self.wait(Duration::from_secs(30), |e| {
            e.is_app(VM, APP) && e.to == "online"
        })?;
        Ok((detected.time.saturating_sub(t), back.time.saturating_sub(t)))
    }

    /// vmhad and QEMU CPU ms over `window`, and the checks, probes, watchers and watcher
    /// polls in it.
    fn cpu(&self, window: Duration) -> anyhow::Result<(f64, f64, [u64; 4])> {
        let qemu: u32 = std::fs::read_to_string(self.run_dir.join(VM).join("qemu.pid"))?
            .trim()
            .parse()?;
        let io = |s: &Value| {
            let g = &s["guest_io"];
            ["checks", "probes", "watchers", "watch_polls"].map(|k| g[k].as_u64().unwrap_or(0))
        };
        let (v0, q0, c0) = (
            cpu_ticks(self.daemon.pid(), false)?,
            cpu_ticks(qemu, false)?,
            io(&self.status()?),
        );
        std::thread::sleep(window);
        let (v1, q1, c1) = (
            cpu_ticks(self.daemon.pid(), false)?,
            cpu_ticks(qemu, false)?,
            io(&self.status()?),
        );
        let counts = [0, 1, 2, 3].map(|i| c1[i].saturating_sub(c0[i]));
        // USER_HZ is 100 on Linux: 10 ms per tick.
        Ok(((v1 - v0) as f64 * 10.0, (q1 - q0) as f64 * 10.0, counts))
    }
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted.get(i).copied().unwrap_or(0)
}

/// Runs the benchmark.
pub fn run(
    vmhad: &Path,
    guest: &Path,
    workdir: &Path,
    runs: u32,
    seed: u64,
) -> anyhow::Result<std::process::ExitCode> {
    let guest = std::fs::canonicalize(guest)?;
    let mut rng = Rng(seed.max(1));
    let mut table = Vec::new();
    for (interval, interval_ms) in [("1s", 1_000), ("10s", 10_000)] {
        for watch in [true, false] {
            let label = format!(
                "interval {interval}, watch {}",
                if watch { "on" } else { "off" }
            );
            println!("━━ {label}: {runs} app kills at a random phase");
            let run = Run::start(vmhad, &guest, workdir, interval, watch)?;
            let (mut detected, mut back) = (Vec::new(), Vec::new());
            for i in 0..runs {
                let (d, b) = run.kill(&mut rng, interval_ms)?;
                println!("    kill {}: detected {d} ms, running again {b} ms", i + 1);
                detected.push(d);
                back.push(b);
            }
            detected.sort_unstable();
            back.sort_unstable();
            table.push((label, detected, back));
            drop(run);
        }
    }
    let mut cpu = Vec::new();
    for (label, interval, watch) in [
        ("checks every 1 s, watch on", "1s", true),
        ("checks every 1 s, watch off", "1s", false),
        ("checks every 200 ms, watch off", "200ms", false),
    ] {
        println!("━━ CPU: {label} (60 s)");
        let run = Run::start(vmhad, &guest, workdir, interval, watch)?;
        std::thread::sleep(Duration::from_secs(5));
        let (v, q, [checks, probes, watchers, polls]) = run.cpu(Duration::from_secs(60))?;
        cpu.push((label, v, q, checks, probes, watchers, polls));
        drop(run);
    }
    println!(
        "\n━━ summary (seed {seed}; times from just before the kill command, which itself takes one guest-exec round trip)"
    );
    println!(
        "  {:<28} {:>22} {:>22}",
        "", "kill → detected", "kill → running again"
    );
    println!(
        "  {:<28} {:>22} {:>22}",
        "", "median / p99 / max ms", "median / p99 / max ms"
    );
    for (label, d, b) in &table {
        println!(
            "  {label:<28} {:>8} / {:>5} / {:>5} {:>8} / {:>5} / {:>5}",
            percentile(d, 50),
            percentile(d, 99),
            d.last().copied().unwrap_or(0),
            percentile(b, 50),
            percentile(b, 99),
            b.last().copied().unwrap_or(0),
        );
    }
    println!("\n  CPU over 60 s (3 apps):");
    for (label, v, q, checks, probes, watchers, polls) in &cpu {
        let per = (*checks).max(1) as f64;
        println!(
            "  {label:<32} {checks} checks in {probes} guest-execs, {watchers} watchers, {polls} watcher polls; \
             vmhad {v:.0} ms ({:.3} ms/check), QEMU {q:.0} ms ({:.1} ms/check, {:.1} % of a core)",
            v / per,
            q / per,
            q / 600.0
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
