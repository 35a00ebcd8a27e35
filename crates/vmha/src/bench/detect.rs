//! Detection and recovery on one host with a real TCG VM: each failure is injected at a random
//! phase of the probe cycle (seeded), many times, at each app interval.
//!
//! A probe is "seen" when vmhad's `vmha_probe_duration_seconds_count` for the VM goes up
//! (polled every [`POLL`]); the injection follows after a random fraction of the interval.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::BenchArgs;
use super::stats::{Rng, ms_row};
use crate::harness::local::{demo_app, guest_vm, interval_ms, one_host};
use crate::harness::{self, Ev, Local, now_ms};

/// How often /metrics is read to see a probe.
const POLL: Duration = Duration::from_millis(20);
/// The VM of the detection and watch runs.
pub const VM: &str = "bench";
/// Its one app.
const APP: &str = "db";
/// `guest_timeout` of the benchmark VM (the default, 15 s, would make the hang runs long).
const GUEST_TIMEOUT_S: u64 = 5;

/// A failure the benchmark injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Failure {
    /// The app killed in the guest (`kill -9`, through the guest channel).
    AppKill,
    /// QEMU killed on the host (`kill -9`).
    QemuKill,
    /// The guest agent stopped in the guest (SIGSTOP).
    AgentHang,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::AppKill => "app killed",
            Failure::QemuKill => "QEMU killed",
            Failure::AgentHang => "guest agent hung",
        }
    }
}

/// One measured figure of one run.
struct Sample {
    interval: f64,
    failure: Failure,
    run: u32,
    phase: f64,
    figure: &'static str,
    ms: u64,
}

fn config(guest: &Path, dir: &Path, interval: f64) -> String {
    [
        one_host("bench", "vmha bench", dir),
        guest_vm(
            VM,
            guest,
            "tcg",
            &format!(
                "vm_restart_limit = 100\nguest_timeout = \"{GUEST_TIMEOUT_S}s\"\n\
                 stop_timeout = \"5s\"\nboot_timeout = \"60s\"\n"
            ),
        ),
        demo_app(
            APP,
            &interval_ms(interval),
            "priority = 100\nrestart_limit = 1000\n",
        ),
    ]
    .concat()
}

/// The test guest's directory, resolved; a clear error if it is not there.
pub fn guest_dir(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(&args.guest).with_context(|| {
        format!(
            "{}: run scripts/build-guest-image.sh first",
            args.guest.display()
        )
    })
}

/// The number of probes vmhad has run for `vm` (every result), from /metrics.
pub fn probe_count(text: &str, vm: &str) -> u64 {
    let label = format!("vm=\"{vm}\"");
    text.lines()
        .filter(|l| l.starts_with("vmha_probe_duration_seconds_count{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The mark the app kill writes to the guest's kernel log just before the kill: printed at
/// once on the serial console (`console.log`, a plain file on the host), whose growth the
/// bench watches.
const KILL_MARK: &str = "vmha-bench-kill";

/// Watches `console` (a VM's serial console log, `len` bytes long before the kill) for
/// [`KILL_MARK`], every millisecond for at most 10 s; the host time (ms) it was first seen.
fn watch_console(console: PathBuf, len: u64) -> std::thread::JoinHandle<Option<u64>> {
    std::thread::spawn(move || {
        use std::io::{Read as _, Seek as _};
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tail = Vec::new();
        while Instant::now() < deadline {
            let grown = std::fs::metadata(&console).is_ok_and(|m| m.len() > len);
            if grown && let Ok(mut f) = std::fs::File::open(&console) {
                let seen = now_ms();
                tail.clear();
                if f.seek(std::io::SeekFrom::Start(len)).is_ok()
                    && f.read_to_end(&mut tail).is_ok()
                    && String::from_utf8_lossy(&tail).contains(KILL_MARK)
                {
                    return Some(seen);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    })
}

/// vmhad running the VM [`VM`] at one app interval, with the failures the sections inject.
pub struct Bench {
    /// vmhad and its events.
    pub local: Local,
    /// The app interval, seconds.
    interval: f64,
    /// The app the app kill kills.
    app: &'static str,
}

impl Bench {
    /// Starts vmhad on `config` (one VM named [`VM`], whose apps are probed every `interval`
    /// seconds) in `dir`; `app` is the one [`Bench::app_kill`] kills.
    pub fn start(
        args: &BenchArgs,
        dir: &Path,
        config: &str,
        interval: f64,
        app: &'static str,
    ) -> anyhow::Result<Bench> {
        Ok(Bench {
            local: Local::start(&args.vmhad, dir, config, Duration::from_secs(20))?,
            interval,
            app,
        })
    }

    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Ev) -> bool,
    ) -> anyhow::Result<Ev> {
        self.local.wait(what, timeout, pred)
    }

    /// Waits until the VM and all its apps are online, then forgets the events so far.
    pub fn settle(&self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            let status = self.local.client.get("/v1/status")?;
            let vm = status["agent"]["vms"]
                .as_array()
                .and_then(|vms| vms.iter().find(|v| v["name"] == VM))
                .cloned()
                .unwrap_or(Value::Null);
            let app_online = vm["apps"]
                .as_array()
                .is_some_and(|a| a.iter().all(|a| a["state"] == "online"));
            if vm["state"] == "online" && app_online {
                break;
            }
            if t0.elapsed() > Duration::from_secs(180) {
                bail!("{VM} did not come online: {vm}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.local.drain();
        Ok(())
    }

    /// Waits for the next probe of the VM to finish; returns when it was seen (ms).
    fn next_probe(&self) -> anyhow::Result<u64> {
        let count = || -> anyhow::Result<u64> {
            Ok(probe_count(&self.local.client.get_text("/metrics")?, VM))
        };
        let before = count()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            std::thread::sleep(POLL);
            if count()? > before {
                return Ok(now_ms());
            }
        }
        bail!("no probe of {VM} for 30 s")
    }

    fn sleep_phase(&self, phase: f64) {
        std::thread::sleep(Duration::from_secs_f64(phase * self.interval));
    }

    fn qemu_pid(&self) -> anyhow::Result<u32> {
        self.local.qemu_pid(VM)
    }

    /// Waits until a QEMU other than `old` has written its pidfile; returns when (ms).
    fn new_qemu(&self, old: u32) -> anyhow::Result<u64> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(pid) = self.qemu_pid()
                && pid != old
                && Path::new(&format!("/proc/{pid}")).exists()
            {
                return Ok(now_ms());
            }
            std::thread::sleep(POLL);
        }
        bail!("no new QEMU for {VM} within 60 s")
    }

    /// Kills the app (`kill -KILL` of the pid in its pid file) `phase` of an interval after a
    /// probe finished; returns the kill's guest exec round trip, the times from the kill's exec
    /// to its failure event (detected) and to its `online` event (running again), and the time
    /// from the kill in the guest (its [`KILL_MARK`] on the serial console, written just before
    /// it) to its failure event.
    pub fn app_kill(&self, phase: f64) -> anyhow::Result<Vec<(&'static str, u64)>> {
        self.next_probe()?;
        self.sleep_phase(phase);
        let console = self.local.run_dir.join(VM).join("console.log");
        let len = std::fs::metadata(&console)
            .with_context(|| format!("{}", console.display()))?
            .len();
        let marked = watch_console(console, len);
        // Builtins only: the mark, then at once the kill. The kernel prints a message of level
        // 2 on the console before the write to /dev/kmsg returns: the mark is in the file
        // before the kill.
        let kill = format!(
            "read -r p </run/demo/\"$1\".pid && echo '<2>{KILL_MARK}' >/dev/kmsg && kill -KILL \"$p\""
        );
        let t0 = now_ms();
        harness::guest_exec(
            &self.local.client,
            VM,
            &["/bin/sh", "-c", &kill, "sh", self.app],
        )?;
        let sent = now_ms();
        let killed = marked
            .join()
            .ok()
            .flatten()
            .context("the kill's mark never reached the serial console")?;
        let vm_app = |e: &Ev| e.is_app(VM, self.app);
        let detected = self.wait("app failure seen", Duration::from_secs(30), |e| {
            vm_app(e) && e.from == "online"
        })?;
        let back = self.wait("app online", Duration::from_secs(60), |e| {
            vm_app(e) && e.to == "online"
        })?;
        Ok(vec![
            ("kill's guest exec round trip", sent.saturating_sub(t0)),
            ("detected", detected.time.saturating_sub(t0)),
            ("running again", back.time.saturating_sub(t0)),
            (
                "detected, from the kill's mark on the console",
                detected.time.saturating_sub(killed),
            ),
        ])
    }

    fn qemu_kill(&self, phase: f64) -> anyhow::Result<Vec<(&'static str, u64)>> {
        self.next_probe()?;
        self.sleep_phase(phase);
        let pid = self.qemu_pid()?;
        let t0 = now_ms();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()?;
        let detected = self.wait("VM failure seen", Duration::from_secs(10), |e| {
            e.is_vm(VM) && e.from == "online"
        })?;
        let started = self.new_qemu(pid)?;
        let back = self.wait("VM online", Duration::from_secs(120), |e| {
            e.is_vm(VM) && e.to == "online"
        })?;
        Ok(vec![
            ("detected", detected.time.saturating_sub(t0)),
            ("new QEMU running", started.saturating_sub(t0)),
            ("VM and app online again", back.time.saturating_sub(t0)),
        ])
    }

    fn agent_hang(&self, phase: f64) -> anyhow::Result<Vec<(&'static str, u64)>> {
        self.next_probe()?;
        // The stop is scheduled in the guest (a background `sleep` then SIGSTOP) so that the
        // guest command returns before the agent stops: it lands `delay` after the exec is sent.
        let delay = 0.5 + phase * self.interval;
        let script =
            format!("(sleep {delay:.3}; kill -STOP $(pidof qemu-ga)) </dev/null >/dev/null 2>&1 &");
        let sent = now_ms();
        harness::guest_exec(&self.local.client, VM, &["/bin/sh", "-c", &script])?;
        let t0 = sent + (delay * 1000.0).round() as u64;
        let detected = self.wait("guest loss seen", Duration::from_secs(60), |e| {
            e.vm == VM && e.from == "online"
        })?;
        let back = self.wait("VM online", Duration::from_secs(180), |e| {
            e.is_vm(VM) && e.to == "online"
        })?;
        Ok(vec![
            ("detected", detected.time.saturating_sub(t0)),
            ("VM and app online again", back.time.saturating_sub(t0)),
        ])
    }
}

/// Runs the detection section; writes `raw/detection.csv`, returns the Markdown.
pub fn run(args: &BenchArgs, raw: &Path) -> anyhow::Result<String> {
    let guest = guest_dir(args)?;
    let mut rng = Rng::new(args.seed);
    let mut samples = Vec::new();
    let failures = &args.failures;
    for &interval in &args.intervals {
        let dir = args.workdir.join(format!("detect-{interval}s"));
        let bench = Bench::start(args, &dir, &config(&guest, &dir, interval), interval, APP)?;
        for &failure in failures {
            for run in 1..=args.runs {
                bench.settle()?;
                let phase = rng.fraction();
                let figures = match failure {
                    Failure::AppKill => bench.app_kill(phase),
                    Failure::QemuKill => bench.qemu_kill(phase),
                    Failure::AgentHang => bench.agent_hang(phase),
                }
                .with_context(|| {
                    format!("{} run {run} at interval {interval} s", failure.name())
                })?;
                let line: Vec<String> = figures
                    .iter()
                    .map(|(f, ms)| format!("{f} {ms} ms"))
                    .collect();
                println!(
                    "  {interval} s, {} #{run} (phase {phase:.2}): {}",
                    failure.name(),
                    line.join(", ")
                );
                samples.extend(figures.into_iter().map(|(figure, ms)| Sample {
                    interval,
                    failure,
                    run,
                    phase,
                    figure,
                    ms,
                }));
            }
        }
    }
    write_csv(&raw.join("detection.csv"), &samples)?;
    Ok(markdown(args, &samples))
}

fn write_csv(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut csv = String::from("interval_s,failure,run,phase,figure,ms\n");
    for s in samples {
        let _ = writeln!(
            csv,
            "{},{},{},{:.3},{},{}",
            s.interval,
            s.failure.name(),
            s.run,
            s.phase,
            s.figure,
            s.ms
        );
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

fn markdown(args: &BenchArgs, samples: &[Sample]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 1. Detection and recovery (one host, real TCG VM)\n\n\
         Method: vmhad (embedded store) runs one TCG VM (the test guest, 256 MiB, 1 vCPU) with one \
         app `{APP}` (`/opt/demo/app`, check `timeout = \"2s\"`), `guest_timeout = \"{GUEST_TIMEOUT_S}s\"` \
         (the default is 15 s). Each run waits until VM and app are online, waits for the next \
         probe to finish (vmhad's `vmha_probe_duration_seconds_count` for the VM goes up; read \
         every {poll} ms), sleeps a random fraction (seeded, seed {seed}) of the interval, then \
         injects the failure. Times run from the injection to the event vmhad records (its \
         event time, same clock).\n\n\
         - **app killed**: `kill -KILL` of the pid in `/run/demo/{APP}.pid` (shell builtins) \
           through vmhad's guest exec — the kill goes \
           through the same guest channel as the probes, so it waits for a probe in flight and \
           the next probe waits for it; the time starts when the exec is sent (its round trip is \
           listed: the kill happens within it). Detected = the app leaves `online`; running \
           again = back to `online`. \"Detected, from the kill's mark on the console\" starts at \
           the kill itself: the exec writes a mark to the guest's kernel log just before it, which \
           the kernel prints on the serial console (a file on the host, polled every ms) before \
           the write returns, so that figure leaves out the kill's exec and is at most about a \
           ms short.\n\
         - **QEMU killed**: `kill -9` of QEMU's pid on the host. Detected = the VM leaves \
           `online` (QMP socket closed / child exited); new QEMU = its pidfile names a new live \
           process (polled every {poll} ms); online again = the VM is `online` (its app started).\n\
         - **guest agent hung**: `qemu-ga` in the guest gets SIGSTOP from a background `sleep` \
           scheduled through guest exec right after a probe (the stop lands 0.5 s plus the random \
           fraction of the interval after the exec is sent; the time starts there). Detected = \
           the first state change of the VM or its app (`guest_timeout` of silence makes the app \
           `unknown` and restarts the VM, `on_guest_loss = restart-vm`); online again = the VM \
           restarted and `online`.\n",
        poll = POLL.as_millis(),
        seed = args.seed,
    );
    let _ = writeln!(
        md,
        "{} runs per failure and interval. Raw samples: `bench/detection.csv`.\n",
        args.runs
    );
    md.push_str("| interval | failure | figure | median | p90 | max | runs |\n|---|---|---|---|---|---|---|\n");
    for &interval in &args.intervals {
        for &failure in &args.failures {
            let mut figures: Vec<&str> = Vec::new();
            for s in samples
                .iter()
                .filter(|s| s.interval == interval && s.failure == failure)
            {
                if !figures.contains(&s.figure) {
                    figures.push(s.figure);
                }
            }
            for figure in figures {
                let values: Vec<f64> = samples
                    .iter()
                    .filter(|s| {
                        s.interval == interval && s.failure == failure && s.figure == figure
                    })
                    .map(|s| s.ms as f64)
                    .collect();
                let cells = format!("{interval} s | {} | {figure}", failure.name());
                if let Some(row) = ms_row(&cells, &values) {
                    let _ = writeln!(md, "{row}");
                }
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_detection_configuration_is_valid() {
        let text = config(Path::new("/g"), Path::new("/tmp/d"), 1.5);
        let c = vmha_model::Config::from_toml_str(&text, "d.toml").unwrap();
        assert_eq!(c.vms[0].name.as_str(), VM);
        assert_eq!(c.vms[0].apps[0].name.as_str(), APP);
        assert!(text.contains("interval = \"1500ms\""));
        assert!(text.contains("guest_timeout = \"5s\""));
    }

    #[test]
    fn probe_count_sums_the_vms_results_only() {
        let text = "# TYPE vmha_probe_duration_seconds histogram\n\
            vmha_probe_duration_seconds_count{vm=\"bench\",result=\"ok\"} 7\n\
            vmha_probe_duration_seconds_count{vm=\"bench\",result=\"error\"} 2\n\
            vmha_probe_duration_seconds_count{vm=\"benchmark\",result=\"ok\"} 50\n\
            vmha_probe_duration_seconds_sum{vm=\"bench\",result=\"ok\"} 0.3\n";
        assert_eq!(probe_count(text, "bench"), 9);
        assert_eq!(probe_count(text, "other"), 0);
    }
}
