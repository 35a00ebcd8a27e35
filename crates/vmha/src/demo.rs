//! `vmha demo`: the main job on one host. Starts vmhad with two TCG VMs on the embedded store,
//! injects failures one by one, narrates what vmha does and why (from its own events), and ends
//! with the measured detection and recovery times.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use crate::harness::local::{demo_app, guest_vm, one_host};
use crate::harness::{self, Ev, Local, now_ms};
use crate::narrate::{self, figures_json, say};
use crate::output::print_json;

/// Arguments of `vmha demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The vmhad binary.
    #[arg(long, default_value = "target/release/vmhad")]
    vmhad: PathBuf,
    /// Directory with the test guest (`scripts/build-guest-image.sh` output).
    #[arg(long, default_value = ".cache/guest")]
    guest: PathBuf,
    /// Scratch directory for the demo's config, state and VM runtime files (recreated).
    #[arg(long, default_value = "/tmp/vmha-demo")]
    workdir: PathBuf,
    /// After the story, repeat the app-kill and QEMU-kill drills until each figure has this
    /// many samples, and report medians (a benchmark of detection and recovery).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// The multi-host demo instead: three hosts as network namespaces, a 3-member etcd, a host
    /// killed, a host cut off, a host drained — failover narrated and timed (needs root).
    #[arg(long)]
    cluster: bool,
    /// Narrate on stderr and print on stdout only a JSON summary of what was measured: each
    /// figure's samples and median (ms), and for the single-host demo vmhad's idle CPU and RSS
    /// (the cluster demo: the double-run checker's samples).
    #[arg(long)]
    json: bool,
}

struct Demo {
    local: Local,
    figures: Vec<(String, Vec<u64>)>,
}

impl Demo {
    /// Waits for the first event matching `pred`, printing every event seen meanwhile.
    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Ev) -> bool,
    ) -> anyhow::Result<Ev> {
        self.local.wait(what, timeout, |ev| {
            say!("    │ {}", short(ev));
            pred(ev)
        })
    }

    /// Prints events that arrive within `quiet`, failing if one matches `forbidden`.
    fn expect_quiet(
        &mut self,
        quiet: Duration,
        forbidden: impl Fn(&Ev) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + quiet;
        while let Ok(ev) = self
            .local
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            say!("    │ {}", short(&ev));
            if forbidden(&ev) {
                bail!("unexpected: {}", ev.text);
            }
        }
        Ok(())
    }

    fn guest(&self, vm: &str, argv: &[&str]) -> anyhow::Result<()> {
        harness::guest_exec(&self.local.client, vm, argv)
    }

    fn command(&self, body: Value) -> anyhow::Result<()> {
        self.local.client.post("/v1/commands", &body)?;
        Ok(())
    }

    fn app_state(&self, vm: &str, app: &str) -> anyhow::Result<String> {
        let status = self.local.client.get("/v1/status")?;
        let state = status["agent"]["vms"]
            .as_array()
            .and_then(|vms| vms.iter().find(|v| v["name"] == vm))
            .and_then(|v| v["apps"].as_array())
            .and_then(|apps| apps.iter().find(|a| a["name"] == app))
            .and_then(|a| a["state"].as_str())
            .unwrap_or("?")
            .to_string();
        Ok(state)
    }

    fn qemu_pid(&self, vm: &str) -> anyhow::Result<u32> {
        self.local.qemu_pid(vm)
    }

    fn figure(&mut self, name: &str, ms: u64) {
        say!("    ⏱  {name}: {ms} ms");
        match self.figures.iter_mut().find(|(n, _)| n == name) {
            Some((_, samples)) => samples.push(ms),
            None => self.figures.push((name.to_string(), vec![ms])),
        }
    }

    /// Kills an app in the guest and measures detection and recovery.
    fn app_kill_drill(&mut self, vm: &str, app: &str) -> anyhow::Result<()> {
        let t = now_ms();
        self.guest(vm, &["/opt/demo/app", "kill", app])?;
        let detected = self.wait("app failure detected", Duration::from_secs(20), |e| {
            e.is_app(vm, app) && e.from == "online"
        })?;
        let back = self.wait("app online", Duration::from_secs(20), |e| {
            e.is_app(vm, app) && e.to == "online"
        })?;
        self.figure("app kill → detected", detected.time.saturating_sub(t));
        self.figure("app kill → running again", back.time.saturating_sub(t));
        Ok(())
    }

    /// Kills a VM's QEMU and measures detection and recovery.
    fn qemu_kill_drill(&mut self, vm: &str) -> anyhow::Result<()> {
        let pid = self.qemu_pid(vm)?;
        let t = now_ms();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()?;
        let detected = self.wait("VM failure detected", Duration::from_secs(10), |e| {
            e.is_vm(vm) && e.from == "online"
        })?;
        let back = self.wait("VM online", Duration::from_secs(120), |e| {
            e.is_vm(vm) && e.to == "online" && e.reason.starts_with("restarted")
        })?;
        self.figure("QEMU kill → detected", detected.time.saturating_sub(t));
        self.figure(
            "QEMU kill → VM and apps online again",
            back.time.saturating_sub(t),
        );
        Ok(())
    }
}

fn short(ev: &Ev) -> String {
    let object = match &ev.app {
        Some(app) => format!("{}/{app}", ev.vm),
        None => ev.vm.clone(),
    };
    format!("{object}: {} → {}: {}", ev.from, ev.to, ev.reason)
}

fn step(n: u32, title: &str) {
    say!("\n━━ {n}. {title}");
}

fn config(guest: &Path, dir: &Path) -> String {
    let app = |name: &str, priority: u32, requires: &[&str], extra: &str| {
        let requires: Vec<String> = requires.iter().map(|r| format!("\"{r}\"")).collect();
        demo_app(
            name,
            "1s",
            &format!(
                "priority = {priority}\nrequires = [{}]\npid_file = \"/run/demo/{name}.pid\"\n{extra}",
                requires.join(", ")
            ),
        )
    };
    let vm = |name: &str, policy: &str, vm_restart_limit: u32| {
        guest_vm(
            name,
            guest,
            "auto",
            &format!(
                "policy = \"{policy}\"\nvm_restart_limit = {vm_restart_limit}\n\
                 stop_timeout = \"5s\"\nboot_timeout = \"60s\"\n"
            ),
        )
    };
    [
        one_host("demo", "vmha demo", dir),
        vm("shop", "highest-priority", 3),
        app("db", 100, &[], "restart_limit = 1\n"),
        app("web", 50, &["db"], ""),
        app("worker", 10, &["web"], "restart_limit = 1\n"),
        // billing is the target of the repeated QEMU-kill drills: a larger budget.
        vm("billing", "weighted", 20),
        app("ledger", 80, &[], ""),
        app("reports", 20, &[], ""),
    ]
    .concat()
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.json {
        narrate::to_stderr();
    }
    if args.cluster {
        return crate::cluster_demo::run(&args.vmhad, &args.guest, args.rounds, args.json);
    }
    let started = Instant::now();
    for f in ["vmlinux", "initrd.img"] {
        let p = args.guest.join(f);
        if !p.exists() {
            bail!(
                "{} is missing: run scripts/build-guest-image.sh first",
                p.display()
            );
        }
    }
    let guest = std::fs::canonicalize(&args.guest)?;
    // The config is checked with the parser vmhad uses before vmhad starts.
    let local = Local::start(
        &args.vmhad,
        &args.workdir,
        &config(&guest, &args.workdir),
        Duration::from_secs(20),
    )?;
    say!("vmha demo — one host, embedded store, two VMs under TCG");
    say!("  config:  {}", local.config.display());
    say!("  shop:    db (priority 100) ← web (50) ← worker (10), policy highest-priority");
    say!("  billing: ledger (80), reports (20), policy weighted");
    let pid = local.daemon.pid();
    say!("  vmhad:   pid {pid} (log {})", local.log.display());
    let mut demo = Demo {
        local,
        figures: Vec::new(),
    };

    step(
        0,
        "vmhad starts both VMs and their apps in dependency order",
    );
    let mut online = std::collections::BTreeSet::new();
    demo.wait("both VMs online", Duration::from_secs(120), |ev| {
        if ev.app.is_none() && ev.to == "online" {
            online.insert(ev.vm.clone());
        }
        online.len() == 2
    })?;

    step(
        1,
        "kill web in shop: the app monitor restarts it in the guest",
    );
    let shop_pid = demo.qemu_pid("shop")?;
    demo.app_kill_drill("shop", "web")?;
    say!(
        "    the VM was not touched: QEMU pid {} → {}",
        shop_pid,
        demo.qemu_pid("shop")?
    );

    step(
        2,
        "worker (priority 10) keeps failing: faulted, but the VM is left alone",
    );
    demo.guest("shop", &["/opt/demo/app", "break", "worker"])?;
    demo.guest("shop", &["/opt/demo/app", "kill", "worker"])?;
    demo.wait("worker faulted", Duration::from_secs(30), |e| {
        e.is_app("shop", "worker") && e.to == "faulted"
    })?;
    demo.expect_quiet(Duration::from_secs(3), |e| e.is_vm("shop"))?;
    let explain = demo.local.client.get("/v1/vms/shop/explain")?;
    if let Some(d) = explain["vm"]["decisions"].as_array().and_then(|d| d.last()) {
        say!(
            "    decision agent: {}",
            d["reason"].as_str().unwrap_or_default()
        );
    }
    say!(
        "    shop stays online (QEMU pid {}); worker stays faulted until `vmha clear`",
        demo.qemu_pid("shop")?
    );

    step(
        3,
        "db (priority 100) keeps failing: the VM is restarted and its apps started in order",
    );
    demo.guest("shop", &["/opt/demo/app", "break", "db"])?;
    let t = now_ms();
    demo.guest("shop", &["/opt/demo/app", "kill", "db"])?;
    demo.wait("shop restarting", Duration::from_secs(30), |e| {
        e.is_vm("shop") && e.to == "restarting"
    })?;
    let back = demo.wait("shop online", Duration::from_secs(120), |e| {
        e.is_vm("shop") && e.to == "online"
    })?;
    demo.figure(
        "top app fails for good → VM restarted, apps online",
        back.time.saturating_sub(t),
    );
    say!(
        "    new QEMU pid {} (was {shop_pid}); /run was reset by the reboot, so nothing is broken any more",
        demo.qemu_pid("shop")?
    );

    step(
        4,
        "mark web offline, then kill it: intentional, so nothing happens",
    );
    demo.command(
        json!({"command": "app-offline", "vm": "shop", "app": "web", "auto_clear": false}),
    )?;
    demo.wait("web offline", Duration::from_secs(10), |e| {
        e.is_app("shop", "web") && e.to == "offline"
    })?;
    demo.guest("shop", &["/opt/demo/app", "stop", "worker"])?;
    demo.guest("shop", &["/opt/demo/app", "kill", "web"])?;
    demo.expect_quiet(Duration::from_secs(4), |e| {
        e.is_app("shop", "web") && e.to != "offline" || e.is_vm("shop")
    })?;
    say!(
        "    web is {} — no restart, no VM action",
        demo.app_state("shop", "web")?
    );
    demo.command(json!({"command": "app-online", "vm": "shop", "app": "web"}))?;
    demo.command(json!({"command": "app-start", "vm": "shop", "app": "web"}))?;
    demo.wait("web online again", Duration::from_secs(20), |e| {
        e.is_app("shop", "web") && e.to == "online"
    })?;

    step(
        5,
        "kill -9 the QEMU of billing: the VM monitor sees it at once and starts it again",
    );
    demo.qemu_kill_drill("billing")?;

    if args.rounds > 1 {
        let more = args.rounds - 1;
        step(6, &format!("drills: {more} more app kills and QEMU kills"));
        for _ in 0..more {
            demo.app_kill_drill("billing", "reports")?;
            demo.qemu_kill_drill("billing")?;
        }
    }

    step(7, "vmhad at rest");
    let (cpu, rss) = harness::usage(pid, Duration::from_secs(5))?;
    say!("    vmhad: {cpu:.1}% of one core over 5 s idle, RSS {rss} MiB");

    if args.json {
        print_json(&json!({
            "demo": "host",
            "rounds": args.rounds,
            "seconds": started.elapsed().as_secs(),
            "figures": figures_json(&demo.figures),
            "vmhad_idle_cpu_percent": cpu,
            "vmhad_rss_mib": rss,
        }))?;
    }
    say!(
        "\n━━ summary (this run, {} s in all)",
        started.elapsed().as_secs()
    );
    for (name, samples) in &demo.figures {
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        if let [_] = sorted.as_slice() {
            say!("  {name:<52} {median:>6} ms");
        } else {
            let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
            let n = sorted.len();
            say!("  {name:<52} {median:>6} ms  (median of {n}, min {min}, max {max})");
        }
    }
    say!(
        "  {:<52} {cpu:>6.1} %",
        "vmhad CPU while idle (2 VMs, 5 apps probed every 1 s)"
    );
    say!("  {:<52} {rss:>6} MiB", "vmhad RSS");
    say!("\nstopping vmhad and its VMs…");
    drop(demo);
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_demo_configuration_is_what_the_story_tells() {
        let text = config(Path::new("/g"), Path::new("/tmp/demo"));
        let c = vmha_model::Config::from_toml_str(&text, "demo.toml").unwrap();
        let names = |vm: usize| -> Vec<String> {
            c.vms[vm].apps.iter().map(|a| a.name.to_string()).collect()
        };
        assert_eq!(c.vms.len(), 2);
        assert_eq!(names(0), ["db", "web", "worker"]);
        assert_eq!(names(1), ["ledger", "reports"]);
        let web = &c.vms[0].apps[1];
        assert_eq!((web.priority, web.requires[0].as_str()), (50, "db"));
        assert_eq!(web.pid_file.as_deref(), Some("/run/demo/web.pid"));
        assert!(text.contains("state_dir = \"/tmp/demo/state\""));
    }
}
