//! The watch (issue 14) on one host with a real TCG VM: an app killed at a random phase of the
//! probe cycle (seeded) → detected and → running again, with the VM's watch on and off, at app
//! intervals of 1 s and 10 s; and what it costs: vmhad's and QEMU's CPU per check with the watch
//! on, off, and with checks every 200 ms instead; and the floor under those checks (the idle
//! guest, probes whose checks exec nothing: [`super::probe_cost`]).
//!
//! The runs are those of the detection section ([`Bench`]), on a VM whose three apps name their
//! pid file; the configurations of a case pair differ in `watch` only.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use super::BenchArgs;
use super::detect::{Bench, VM, guest_dir};
use super::probe_cost;
use super::stats::{Rng, ms_row};
use crate::harness::cpu_ticks;
use crate::harness::local::{demo_app, guest_vm, interval_ms, one_host};

/// The VM's apps.
const APPS: [&str; 3] = ["a1", "a2", "a3"];
/// The one killed.
const KILLED: &str = "a2";
/// Quiet time after start-up before the CPU window.
pub(super) const SETTLE: Duration = Duration::from_secs(5);
/// The app interval of the "check often instead" case, seconds.
const OFTEN_S: f64 = 0.2;

/// What the apps' checks run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Checks {
    /// `/opt/demo/app check NAME` for each of [`APPS`]: a busybox `sh` script, exec'd.
    Demo,
    /// The shell builtin `true` for the first N of [`APPS`] (the others not configured): the
    /// probe's shell forks for each, nothing is exec'd.
    Builtin(usize),
}

impl Checks {
    /// How many apps (checks per probe).
    pub(super) fn apps(self) -> usize {
        match self {
            Checks::Demo => APPS.len(),
            Checks::Builtin(n) => n.min(APPS.len()),
        }
    }

    /// The table's words for it.
    fn label(self) -> String {
        match self {
            Checks::Demo => format!("{} × demo", APPS.len()),
            Checks::Builtin(n) => format!("{n} × `true`"),
        }
    }
}

fn config(guest: &Path, dir: &Path, interval: f64, watch: bool, checks: Checks) -> String {
    let mut parts = vec![
        one_host("bench", "vmha bench", dir),
        guest_vm(
            VM,
            guest,
            "tcg",
            &format!("vm_restart_limit = 100\nboot_timeout = \"120s\"\nwatch = {watch}\n"),
        ),
    ];
    for app in &APPS[..checks.apps()] {
        let demo = demo_app(
            app,
            &interval_ms(interval),
            &format!("restart_limit = 1000\npid_file = \"/run/demo/{app}.pid\"\n"),
        );
        parts.push(match checks {
            Checks::Demo => demo,
            Checks::Builtin(_) => demo.replace(
                &format!("check = [\"/opt/demo/app\", \"check\", \"{app}\"]"),
                "check = [\"true\"]",
            ),
        });
    }
    parts.concat()
}

/// One figure of one app kill.
struct Kill {
    interval: f64,
    watch: bool,
    run: u32,
    phase: f64,
    figure: &'static str,
    ms: u64,
}

/// What one case cost over the CPU window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Cpu {
    pub(super) interval: f64,
    pub(super) watch: bool,
    pub(super) checks: Checks,
    pub(super) window_s: f64,
    /// vmhad's CPU time, ms.
    pub(super) vmhad_ms: f64,
    /// QEMU's CPU time, ms.
    pub(super) qemu_ms: f64,
    /// vmhad's `guest_io` counters over the window: checks, probes (guest execs), watchers
    /// started, watcher polls.
    pub(super) io: [u64; 4],
}

fn on_off(watch: bool) -> &'static str {
    if watch { "on" } else { "off" }
}

/// vmhad's and QEMU's CPU and vmhad's guest I/O counters over `window`.
pub(super) fn measure(
    bench: &Bench,
    interval: f64,
    watch: bool,
    checks: Checks,
    window: Duration,
) -> anyhow::Result<Cpu> {
    let local = &bench.local;
    let qemu = local.qemu_pid(VM)?;
    let io = |s: &Value| {
        let g = &s["guest_io"];
        ["checks", "probes", "watchers", "watch_polls"].map(|k| g[k].as_u64().unwrap_or(0))
    };
    let vmhad = local.daemon.pid();
    let (v0, q0, c0) = (
        cpu_ticks(vmhad, false)?,
        cpu_ticks(qemu, false)?,
        io(&local.client.get("/v1/status")?),
    );
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (v1, q1, c1) = (
        cpu_ticks(vmhad, false)?,
        cpu_ticks(qemu, false)?,
        io(&local.client.get("/v1/status")?),
    );
    // USER_HZ is 100 on Linux: 10 ms a tick.
    Ok(Cpu {
        interval,
        watch,
        checks,
        window_s: t0.elapsed().as_secs_f64(),
        vmhad_ms: v1.saturating_sub(v0) as f64 * 10.0,
        qemu_ms: q1.saturating_sub(q0) as f64 * 10.0,
        io: [0, 1, 2, 3].map(|i| c1[i].saturating_sub(c0[i])),
    })
}

/// Runs the watch section; writes `raw/watch.csv` and `raw/watch-cpu.csv`, returns the Markdown.
pub fn run(args: &BenchArgs, raw: &Path) -> anyhow::Result<String> {
    let guest = guest_dir(args)?;
    let mut rng = Rng::new(args.seed);
    let (mut kills, mut cpu) = (Vec::new(), Vec::new());
    let mut cases: Vec<(f64, bool, u32)> = Vec::new();
    for &interval in &args.watch_intervals {
        for watch in [true, false] {
            cases.push((interval, watch, args.watch_runs(interval)));
        }
    }
    cases.push((OFTEN_S, false, 0));
    for (interval, watch, runs) in cases {
        let label = format!("interval {interval} s, watch {}", on_off(watch));
        println!(
            "  {label}: CPU over {} s, then app kills: {runs}",
            args.window
        );
        let dir = args
            .workdir
            .join(format!("watch-{interval}s-{}", on_off(watch)));
        let bench = Bench::start(
            args,
            &dir,
            &config(&guest, &dir, interval, watch, Checks::Demo),
            interval,
            KILLED,
        )?;
        bench.settle().with_context(|| label.clone())?;
        std::thread::sleep(SETTLE);
        let c = measure(
            &bench,
            interval,
            watch,
            Checks::Demo,
            Duration::from_secs(args.window),
        )?;
        println!(
            "    {} checks in {} guest execs, {} watchers, {} watcher polls; vmhad {:.0} ms, QEMU {:.0} ms",
            c.io[0], c.io[1], c.io[2], c.io[3], c.vmhad_ms, c.qemu_ms
        );
        cpu.push(c);
        for run in 1..=runs {
            bench.settle()?;
            let phase = rng.fraction();
            let figures = bench
                .app_kill(phase)
                .with_context(|| format!("{label}: app kill {run}"))?;
            let line: Vec<String> = figures
                .iter()
                .map(|(f, ms)| format!("{f} {ms} ms"))
                .collect();
            println!("    kill #{run} (phase {phase:.2}): {}", line.join(", "));
            kills.extend(figures.into_iter().map(|(figure, ms)| Kill {
                interval,
                watch,
                run,
                phase,
                figure,
                ms,
            }));
        }
    }
    println!("  the probe's floor: the idle guest, then checks that exec nothing");
    let floor = probe_cost::run(args, |dir, interval, checks| {
        config(&guest, dir, interval, false, checks)
    })?;
    let demo = cpu
        .iter()
        .find(|c| (c.interval, c.watch, c.checks) == (1.0, false, Checks::Demo))
        .copied();
    cpu.extend(probe_cost::cpu_rows(&floor).map(|c| *c));
    write_csv(raw, &kills, &cpu)?;
    let mut md = markdown(args, &kills, &cpu);
    md.push_str(&probe_cost::markdown(&floor, demo.as_ref()));
    Ok(md)
}

fn write_csv(raw: &Path, kills: &[Kill], cpu: &[Cpu]) -> anyhow::Result<()> {
    let mut csv = String::from("interval_s,watch,run,phase,figure,ms\n");
    for k in kills {
        let _ = writeln!(
            csv,
            "{},{},{},{:.3},{},{}",
            k.interval,
            on_off(k.watch),
            k.run,
            k.phase,
            k.figure,
            k.ms
        );
    }
    let path = raw.join("watch.csv");
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
    let mut csv = String::from(
        "interval_s,watch,check_kind,window_s,checks,guest_execs,watchers,watcher_polls,vmhad_cpu_ms,qemu_cpu_ms\n",
    );
    for c in cpu {
        let _ = writeln!(
            csv,
            "{},{},{},{:.1},{},{},{},{},{:.0},{:.0}",
            c.interval,
            on_off(c.watch),
            match c.checks {
                Checks::Demo => "demo".to_owned(),
                Checks::Builtin(n) => format!("builtin-{n}"),
            },
            c.window_s,
            c.io[0],
            c.io[1],
            c.io[2],
            c.io[3],
            c.vmhad_ms,
            c.qemu_ms
        );
    }
    let path = raw.join("watch-cpu.csv");
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))
}

fn markdown(args: &BenchArgs, kills: &[Kill], cpu: &[Cpu]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 5. The watch: app failure detection with and without it (one host, real TCG VM)\n\n\
         Method: vmhad (embedded store) runs one TCG VM (the test guest, 256 MiB, 1 vCPU) with \
         three apps {apps} (`/opt/demo/app`, each naming its `pid_file`, check `timeout = \"2s\"`), \
         once per case: app interval {intervals}, each with `watch = true` and `watch = false` \
         (`watch_period` 200 ms, the default; the two configurations differ in nothing else). \
         Each run waits until VM and apps are online, waits for the next probe to finish (as in \
         section 1), sleeps a random fraction (seeded, seed {seed}) of the interval, then kills \
         `{KILLED}` (`kill -KILL` of the pid in `/run/demo/{KILLED}.pid`, shell builtins, \
         through vmhad's guest exec; the time starts when the exec is sent, its round trip is \
         listed; \"detected, from the kill's mark on the console\" starts at the kill itself: \
         the exec writes a mark to the guest's kernel log just before the kill, which the \
         kernel prints on the serial console, a file on the host, before the write returns; \
         the bench polls that file every ms, so that figure leaves out the kill's exec and is \
         at most about a ms short). Detected = `{KILLED}` leaves `online` (with the watch on, \
         the watcher in the guest sees the process gone and runs its check at once; off, the \
         next interval check finds it); running again = back to `online` \
         (vmhad's event times, same clock).\n",
        apps = APPS.map(|a| format!("`{a}`")).join(", "),
        intervals = args
            .watch_intervals
            .iter()
            .map(|i| format!("{i} s"))
            .collect::<Vec<_>>()
            .join(" and "),
        seed = args.seed,
    );
    let _ = writeln!(
        md,
        "{} runs per interval and watch setting{}. Raw samples: `bench/watch.csv`.\n",
        args.runs,
        if args.smoke {
            " (smoke: 1 run at an interval over 2 s)"
        } else {
            ""
        }
    );
    md.push_str(
        "| interval | watch | figure | median | p90 | max | runs |\n|---|---|---|---|---|---|---|\n",
    );
    let mut cases: Vec<(f64, bool)> = Vec::new();
    for k in kills {
        if !cases.contains(&(k.interval, k.watch)) {
            cases.push((k.interval, k.watch));
        }
    }
    for (interval, watch) in cases {
        let mut figures: Vec<&str> = Vec::new();
        for k in kills
            .iter()
            .filter(|k| (k.interval, k.watch) == (interval, watch))
        {
            if !figures.contains(&k.figure) {
                figures.push(k.figure);
            }
        }
        for figure in figures {
            let values: Vec<f64> = kills
                .iter()
                .filter(|k| (k.interval, k.watch, k.figure) == (interval, watch, figure))
                .map(|k| k.ms as f64)
                .collect();
            let cells = format!("{interval} s | {} | {figure}", on_off(watch));
            if let Some(row) = ms_row(&cells, &values) {
                let _ = writeln!(md, "{row}");
            }
        }
    }
    let _ = writeln!(
        md,
        "\nCost: in each case, once VM and apps are online and {settle} s more (before the \
         kills), vmhad's and the VM's QEMU's CPU time (utime + stime from /proc/PID/stat) over a \
         window of {window} s, with the checks, guest execs (one per probe of the VM's due \
         apps), watchers started and watcher polls (`guest-exec-status`) in it, from vmhad's \
         `guest_io` counters (`GET /v1/status`); per check = CPU time / checks. The case at \
         {often} ms checks that often with the watch off: checking often instead of watching. \
         The last three (the watch off) measure the floor under the checks: the idle guest \
         (apps checked once an hour), and probes whose checks are the shell builtin `true` \
         (the probe's shell forks for each; nothing is exec'd). QEMU's CPU includes the \
         guest's (the checks, the watcher, the idle guest under TCG). Raw: \
         `bench/watch-cpu.csv`.\n\n\
         | interval | watch | each probe | checks | guest execs | watchers | watcher polls | vmhad CPU | vmhad per check | QEMU CPU | QEMU per check | QEMU, % of a core |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|",
        settle = SETTLE.as_secs(),
        window = args.window,
        often = (OFTEN_S * 1000.0).round(),
    );
    for c in cpu {
        // No check in the window (the idle guest): nothing to divide by.
        let per = |ms: f64, digits: usize| match c.io[0] {
            0 => "—".to_owned(),
            n => format!("{:.digits$} ms", ms / n as f64),
        };
        let _ = writeln!(
            md,
            "| {} s | {} | {} | {} | {} | {} | {} | {:.0} ms | {} | {:.0} ms | {} | {:.1} % |",
            c.interval,
            on_off(c.watch),
            c.checks.label(),
            c.io[0],
            c.io[1],
            c.io[2],
            c.io[3],
            c.vmhad_ms,
            per(c.vmhad_ms, 3),
            c.qemu_ms,
            per(c.qemu_ms, 1),
            c.qemu_ms / (c.window_s * 10.0)
        );
    }
    md
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let argv = std::iter::once("vmha").chain(extra.iter().copied());
        Cli::parse_from(argv).bench.effective()
    }

    #[test]
    fn the_cases_differ_in_the_watch_only_and_are_valid() {
        let dir = Path::new("/tmp/w");
        let on = config(Path::new("/g"), dir, 10.0, true, Checks::Demo);
        let off = config(Path::new("/g"), dir, 10.0, false, Checks::Demo);
        for text in [&on, &off] {
            let c = vmha_model::Config::from_toml_str(text, "w.toml").unwrap();
            assert_eq!(c.vms[0].apps.len(), 3);
        }
        assert!(
            vmha_model::Config::from_toml_str(&on, "w.toml")
                .unwrap()
                .vms[0]
                .watch
        );
        assert!(
            !vmha_model::Config::from_toml_str(&off, "w.toml")
                .unwrap()
                .vms[0]
                .watch
        );
        assert_eq!(on.replace("watch = true", "watch = false"), off);
    }

    #[test]
    fn builtin_checks_replace_the_demo_check_and_nothing_else() {
        let dir = Path::new("/tmp/w");
        let text = config(Path::new("/g"), dir, 1.0, false, Checks::Builtin(1));
        let c = vmha_model::Config::from_toml_str(&text, "w.toml").unwrap();
        let apps = &c.vms[0].apps;
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].check, vec!["true".to_owned()]);
        assert_eq!(apps[0].start[0], "/opt/demo/app");
        let three = config(Path::new("/g"), dir, 1.0, false, Checks::Builtin(3));
        let demo = config(Path::new("/g"), dir, 1.0, false, Checks::Demo);
        let restored = APPS.iter().fold(three, |t, app| {
            t.replacen(
                "check = [\"true\"]",
                &format!("check = [\"/opt/demo/app\", \"check\", \"{app}\"]"),
                1,
            )
        });
        assert_eq!(restored, demo);
    }

    #[test]
    fn the_section_renders_from_its_samples() {
        let args = args(&[]);
        let kill = |interval, watch, run, figure, ms| Kill {
            interval,
            watch,
            run,
            phase: 0.5,
            figure,
            ms,
        };
        let kills = [
            kill(1.0, true, 1, "detected", 300),
            kill(1.0, true, 2, "detected", 500),
            kill(1.0, false, 1, "detected", 900),
            kill(10.0, false, 1, "running again", 7_000),
        ];
        let cpu = [Cpu {
            interval: 0.2,
            watch: false,
            checks: Checks::Demo,
            window_s: 60.0,
            vmhad_ms: 600.0,
            qemu_ms: 6_000.0,
            io: [900, 300, 0, 0],
        }];
        let md = markdown(&args, &kills, &cpu);
        assert!(md.starts_with("## 5. The watch"), "{md}");
        assert!(
            md.contains("| 1 s | on | detected | 500 ms | 500 ms | 500 ms | 2 |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 s | off | detected | 900 ms | 900 ms | 900 ms | 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| 10 s | off | running again | 7.00 s | 7.00 s | 7.00 s | 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| 0.2 s | off | 3 × demo | 900 | 300 | 0 | 0 | 600 ms | 0.667 ms | 6000 ms | 6.7 ms | 10.0 % |"),
            "{md}"
        );
        assert!(
            md.contains("seed 13") && md.contains("1 s and 10 s"),
            "{md}"
        );
    }

    #[test]
    fn smoke_keeps_the_slow_interval_to_one_run() {
        let smoke = args(&["--smoke"]);
        assert!(smoke.runs(crate::bench::Section::Watch));
        assert_eq!((smoke.watch_runs(1.0), smoke.watch_runs(10.0)), (2, 1));
        let full = args(&[]);
        assert_eq!((full.watch_runs(1.0), full.watch_runs(10.0)), (20, 20));
        assert_eq!(full.watch_intervals, vec![1.0, 10.0]);
    }
}
