//! What a probe costs a TCG guest beyond its checks: the floor under the watch section's
//! "QEMU per check". The same VM runs with its apps' checks replaced by the shell builtin
//! `true` (the probe's shell forks for each, nothing is exec'd), for one app and for three, at
//! a 1 s interval with the watch off, and once with its apps checked once an hour (the idle
//! guest). Each case's QEMU CPU over the section's window, less the idle guest's over the same
//! time, is divided by its probes. Against the section's case of three demo checks at 1 s with
//! the watch off, the differences give what a fork, the probe around its checks, and a demo
//! check cost the guest.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::BenchArgs;
use super::detect::Bench;
use super::watch::{Checks, Cpu, SETTLE, measure};

/// The app interval of the idle case, seconds: longer than the case runs.
const QUIET_S: f64 = 3600.0;
/// The app interval of the builtin cases, seconds.
const INTERVAL_S: f64 = 1.0;

/// The idle guest's CPU and the builtin cases'.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    /// The idle case (no probe in its window).
    idle: Cpu,
    /// One builtin check per probe.
    one: Cpu,
    /// Three builtin checks per probe.
    three: Cpu,
}

/// QEMU's CPU per probe of `c`, less the idle guest's over the same window, ms (never below 0).
fn per_probe(c: &Cpu, idle: &Cpu) -> f64 {
    let idle_ms = idle.qemu_ms / idle.window_s.max(1e-3) * c.window_s;
    ((c.qemu_ms - idle_ms) / c.io[1].max(1) as f64).max(0.0)
}

/// Runs the three cases in directories under `args.workdir`; `config` builds the watch
/// section's configuration (watch off) for an app interval in seconds and the checks.
pub fn run(
    args: &BenchArgs,
    config: impl Fn(&Path, f64, Checks) -> String,
) -> anyhow::Result<Floor> {
    let window = Duration::from_secs(args.window);
    let case = |name: &str, interval: f64, checks: Checks| -> anyhow::Result<Cpu> {
        let dir = args.workdir.join(format!("watch-{name}"));
        let bench = Bench::start(args, &dir, &config(&dir, interval, checks), interval, "a2")?;
        bench
            .settle()
            .with_context(|| format!("probe cost: {name}"))?;
        std::thread::sleep(SETTLE);
        let c = measure(&bench, interval, false, checks, window)?;
        println!(
            "    {name}: {} checks in {} guest execs; QEMU {:.0} ms",
            c.io[0], c.io[1], c.qemu_ms
        );
        Ok(c)
    };
    Ok(Floor {
        idle: case("idle", QUIET_S, Checks::Demo)?,
        one: case("builtin-1", INTERVAL_S, Checks::Builtin(1))?,
        three: case("builtin-3", INTERVAL_S, Checks::Builtin(3))?,
    })
}

/// The cases' lines of the section's CPU table (the idle case's checks and probes are those
/// of its start-up, before the window: none in it).
pub fn cpu_rows(floor: &Floor) -> [&Cpu; 3] {
    [&floor.idle, &floor.one, &floor.three]
}

/// The Markdown after the section's CPU table: per probe net of the idle guest, and by
/// difference against `demo`, the section's three demo checks at 1 s with the watch off.
pub fn markdown(floor: &Floor, demo: Option<&Cpu>) -> String {
    let idle = &floor.idle;
    let one = per_probe(&floor.one, idle);
    let three = per_probe(&floor.three, idle);
    let mut md = format!(
        "\nThe floor under \"QEMU per check\" (the last three lines above): the idle guest \
         (apps checked once an hour: no probe in the window; vmhad pings its agent every 2 s \
         then, which probes make needless at 1 s) used {rate:.1} ms of QEMU CPU a \
         second. Net of it, per probe (guest exec): one check `true` (the probe's shell forks \
         for it, nothing is exec'd) {one:.1} ms, three {three:.1} ms",
        rate = idle.qemu_ms / idle.window_s.max(1e-3),
    );
    let fork = (three - one) / 2.0;
    match demo {
        Some(d) => {
            let demo = per_probe(d, idle);
            let _ = write!(
                md,
                ", three demo checks {demo:.1} ms. By difference: a fork of the probe's shell \
                 {fork:.1} ms; the probe around its checks (the agent's spawn of the shell, the \
                 shell, the status polls) {floor:.1} ms; a demo check (its fork and the exec of \
                 `/opt/demo/app`, a busybox `sh` script) {check:.1} ms.",
                floor = one - fork,
                check = (demo - three) / 3.0 + fork,
            );
        }
        None => {
            let _ = write!(
                md,
                ". By difference, a fork of the probe's shell {fork:.1} ms."
            );
        }
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cpu(checks: Checks, qemu_ms: f64, probes: u64) -> Cpu {
        Cpu {
            interval: 1.0,
            watch: false,
            checks,
            window_s: 60.0,
            vmhad_ms: 0.0,
            qemu_ms,
            io: [probes * checks.apps() as u64, probes, 0, 0],
        }
    }

    #[test]
    fn the_floor_is_net_of_the_idle_guest_and_the_rest_comes_by_difference() {
        let floor = Floor {
            // 10 ms a second: 600 ms of every 60 s window is the idle guest's.
            idle: cpu(Checks::Demo, 600.0, 0),
            one: cpu(Checks::Builtin(1), 600.0 + 60.0 * 40.0, 60),
            three: cpu(Checks::Builtin(3), 600.0 + 60.0 * 50.0, 60),
        };
        let demo = cpu(Checks::Demo, 600.0 + 60.0 * 110.0, 60);
        let md = markdown(&floor, Some(&demo));
        assert!(md.contains("10.0 ms of QEMU CPU a second"), "{md}");
        assert!(md.contains("one check `true`"), "{md}");
        assert!(
            md.contains("nothing is exec'd) 40.0 ms, three 50.0 ms"),
            "{md}"
        );
        assert!(md.contains("three demo checks 110.0 ms"), "{md}");
        // (50 − 40) / 2; 40 − 5; (110 − 50) / 3 + 5.
        assert!(md.contains("a fork of the probe's shell 5.0 ms"), "{md}");
        assert!(md.contains("status polls) 35.0 ms"), "{md}");
        assert!(md.contains("busybox `sh` script) 25.0 ms."), "{md}");
        // Less than the idle guest's CPU: never below 0.
        assert_eq!(
            per_probe(&cpu(Checks::Builtin(1), 300.0, 60), &floor.idle),
            0.0
        );
        assert!(markdown(&floor, None).ends_with("a fork of the probe's shell 5.0 ms.\n"));
    }
}
