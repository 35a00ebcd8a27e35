//! The double-run checker: which hosts run each VM, sampled from `/proc`.
//!
//! vmhad starts a VM's QEMU with `-qmp unix:<runtime_dir>/<vm>/qmp.sock,…` (`VmPaths` in
//! vmha-qemu). A VM has a QEMU on host H while a live process — not a zombie; a stopped
//! (SIGSTOP) process does count: it still holds the disk — has a command line containing
//! `<H's runtime dir>/<vm>/qmp.sock`. This is the same rule as `vmha_qemu::qemu_processes`,
//! applied to every host at once ([`vm_placement`]).
//!
//! A live migration has a QEMU of the VM on two hosts by design: the target's waits
//! (`inmigrate`) while the source runs, then the source's stays paused (`postmigrate`) after
//! the target took over. So when a VM has QEMUs on several hosts, each is asked its run state
//! on its observer socket (`<runtime>/<vm>/observe.sock`, see [`crate::run_state`]): one in a
//! migration state does not run the VM; any other state counts, and so does a live QEMU that
//! does not answer (stopped, hung) or has no socket listening for longer than a starting QEMU
//! needs; a QEMU being torn down (killed, exiting) does not. A violation is a VM *running* on two hosts, confirmed by a second pass in reverse
//! host order (the source stops its vCPUs for good before the target starts them, so a
//! migration completing between two questions never looks like a double run twice).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// One sample in which a VM ran on more than one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Wall-clock time of the sample.
    pub at: SystemTime,
    /// Time from [`DoubleRunChecker::start`] to the start of the sample.
    pub since_start: Duration,
    /// The VM.
    pub vm: String,
    /// The hosts it ran on (sorted, at least two).
    pub hosts: Vec<String>,
    /// The matching processes, as `(host, pid)`.
    pub processes: Vec<(String, u32)>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unix_ms = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        write!(
            f,
            "{:.1} s after start (unix {unix_ms} ms): VM {} ran on {} (processes {:?})",
            self.since_start.as_secs_f64(),
            self.vm,
            self.hosts.join(" and "),
            self.processes
        )
    }
}

/// For every VM in `vms` (each a key of the result, possibly with no entry), the `(host, pid)`
/// of every live, non-zombie process whose command line contains
/// `<host's runtime dir>/<vm>/qmp.sock`, `hosts` being `(host, runtime dir)` pairs. Reads
/// `/proc` once; this process itself is never counted. Sorted by host, then pid.
pub fn vm_placement(
    vms: &[String],
    hosts: &[(String, PathBuf)],
) -> BTreeMap<String, Vec<(String, u32)>> {
    let needles: Vec<(&str, &str, Vec<u8>)> = vms
        .iter()
        .flat_map(|vm| {
            hosts.iter().map(move |(host, runtime)| {
                let sock = runtime.join(vm).join("qmp.sock");
                (
                    vm.as_str(),
                    host.as_str(),
                    sock.into_os_string().into_encoded_bytes(),
                )
            })
        })
        .collect();
    let mut placement: BTreeMap<String, Vec<(String, u32)>> =
        vms.iter().map(|vm| (vm.clone(), Vec::new())).collect();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return placement;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        // A zombie's command line is empty; the state check below covers the rest.
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let matches: Vec<&(&str, &str, Vec<u8>)> = needles
            .iter()
            .filter(|(_, _, needle)| {
                !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
            })
            .collect();
        if matches.is_empty() || !is_live(pid) {
            continue;
        }
        for (vm, host, _) in matches {
            if let Some(on) = placement.get_mut(*vm) {
                on.push(((*host).to_owned(), pid));
            }
        }
    }
    for on in placement.values_mut() {
        on.sort();
    }
    placement
}

/// Whether `pid` exists and is neither a zombie nor dead ("pid (comm) S …": the state follows
/// the last `)`). A stopped process is live.
fn is_live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The kernel's `PF_EXITING` task flag (`/proc/PID/stat` field 9): the process is in `exit`.
const PF_EXITING: u64 = 0x4;

/// Whether `pid` is gone, a zombie, already exiting, or has a SIGKILL pending: a process the
/// kernel is tearing down (its sockets may already be closed) runs no guest any more.
fn is_dying(pid: u32) -> bool {
    if !is_live(pid) {
        return true;
    }
    let exiting = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok())
            .is_some_and(|flags| flags & PF_EXITING != 0)
    });
    let sigkill = 1u64 << (SIGKILL - 1);
    let kill_pending = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
        st.lines().any(|l| {
            l.strip_prefix("ShdPnd:")
                .or_else(|| l.strip_prefix("SigPnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|mask| mask & sigkill != 0)
        })
    });
    exiting || kill_pending
}

/// SIGKILL's number (9 on every Linux architecture).
const SIGKILL: u32 = 9;

#[derive(Debug, Default)]
struct State {
    stop: bool,
    samples: u64,
    violations: Vec<Violation>,
    last: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Samples every [`DoubleRunChecker::INTERVAL`] on a background thread which hosts run each
/// VM (see [`vm_placement`]) and records every sample in which a VM runs on more than one
/// host. Stops when dropped.
#[derive(Debug)]
pub struct DoubleRunChecker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DoubleRunChecker {
    /// Time between the starts of two samples.
    pub const INTERVAL: Duration = Duration::from_millis(100);

    /// Starts sampling `vms` on `hosts`, given as `(host name, that host's vmhad runtime
    /// directory)`; the first sample is taken at once. Panics if two hosts share a runtime
    /// directory (every VM would count twice).
    pub fn start(vms: Vec<String>, hosts: Vec<(String, PathBuf)>) -> Self {
        for (i, (host, dir)) in hosts.iter().enumerate() {
            if let Some((other, _)) = hosts[..i].iter().find(|(_, d)| d == dir) {
                panic!(
                    "hosts {other} and {host} share the runtime directory {}",
                    dir.display()
                );
            }
        }
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("double-run-chk".into())
                .spawn(move || sample_loop(&shared, &vms, &hosts))
                .ok()
        };
        assert!(thread.is_some(), "starting the double-run checker thread");
        Self { shared, thread }
    }

    /// Every violation recorded so far, oldest first (one per VM per offending sample).
    pub fn violations(&self) -> Vec<Violation> {
        self.shared.lock().violations.clone()
    }

    /// How many samples have been completed.
    pub fn samples(&self) -> u64 {
        self.shared.lock().samples
    }

    /// The latest sample: for every VM, the hosts with a live QEMU of it (sorted; empty if on
    /// none), whether it runs there or waits for (or finished) a live migration.
    pub fn last_sample(&self) -> BTreeMap<String, Vec<String>> {
        self.shared.lock().last.clone()
    }

    /// Waits until `n` more samples have been completed after this call (so the last of them
    /// started after the call), at most `timeout`; returns whether they were.
    pub fn wait_samples(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        // The sample in progress may have started before the call: wait for one more.
        let target = state.samples + n + 1;
        while state.samples < target {
            let now = Instant::now();
            if now >= deadline || state.stop {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Stops sampling and joins the thread; idempotent. Recorded data stays readable.
    pub fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Panics, listing every violation, if any sample so far saw a VM on more than one host.
    /// Does not stop the checker.
    pub fn assert_never_double(&self) {
        let state = self.shared.lock();
        if state.violations.is_empty() {
            return;
        }
        let list: Vec<String> = state.violations.iter().map(|v| format!("  {v}")).collect();
        let (count, samples) = (state.violations.len(), state.samples);
        drop(state);
        panic!(
            "a VM ran on more than one host: {count} violation(s) in {samples} samples:\n{}",
            list.join("\n")
        );
    }
}

impl Drop for DoubleRunChecker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How old a live QEMU may be with no observer socket listening (still starting: QEMU creates
/// its monitor sockets before it starts the guest) before it counts as running.
const NOT_LISTENING_GRACE: Duration = Duration::from_secs(2);

/// The unit of `/proc/PID/stat` start times (`USER_HZ`: 100 on Linux).
const USER_HZ: f64 = 100.0;

/// How long ago `pid` started, if it still exists.
fn age(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Field 22 (starttime); `rest` starts at field 3.
    let start: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let up: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64((up - start / USER_HZ).max(0.0)))
}

/// Whether a QEMU runs its VM, from its answers to `ask`, whether it is still `alive` (not
/// dying) and whether it is still `young` (within [`NOT_LISTENING_GRACE`] of its start): its
/// run state when it gives one (a migration state does not run the VM); no answer from a
/// connected socket (stopped, hung) counts while it lives; while nothing listens, it is asked
/// again until it answers, dies (not counted) or is no longer young (counted: the strict side).
fn runs_vm(
    mut ask: impl FnMut() -> crate::run_state::Answer,
    alive: impl Fn() -> bool,
    young: impl Fn() -> bool,
) -> bool {
    use crate::run_state::Answer;
    loop {
        match ask() {
            Answer::State(s) => return !crate::run_state::is_migration_state(&s),
            Answer::NoAnswer => return alive(),
            Answer::NotListening => {
                if !alive() {
                    return false;
                }
                if !young() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Of the hosts `on` (sorted, each with a live QEMU of `vm` among `processes`), those where
/// it runs the VM ([`runs_vm`]), asked twice (forward, then backward) and kept only if both
/// passes say so.
fn running_on(
    vm: &str,
    on: &[String],
    processes: &[(String, u32)],
    hosts: &[(String, PathBuf)],
) -> Vec<String> {
    let sock = |host: &str| {
        hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, dir)| dir.join(vm).join("observe.sock"))
    };
    let asks = |host: &String| {
        let Some(sock) = sock(host) else {
            return true;
        };
        let mine = || processes.iter().filter(|(h, _)| h == host).map(|(_, p)| *p);
        let alive = || mine().any(|pid| !is_dying(pid));
        // Young while every process of it is (the oldest decides); gone ones are not young.
        let young = || mine().all(|pid| age(pid).is_some_and(|a| a < NOT_LISTENING_GRACE));
        runs_vm(
            || crate::run_state::ask(&sock, crate::run_state::QUERY_TIMEOUT),
            alive,
            young,
        )
    };
    let first: Vec<&String> = on.iter().filter(|h| asks(h)).collect();
    if first.len() < 2 {
        return Vec::new();
    }
    let mut second: Vec<String> = first
        .into_iter()
        .rev()
        .filter(|h| asks(h))
        .cloned()
        .collect();
    second.reverse();
    second
}

fn sample_loop(shared: &Shared, vms: &[String], hosts: &[(String, PathBuf)]) {
    let start = Instant::now();
    loop {
        let began = Instant::now();
        let placement = vm_placement(vms, hosts);
        let at = SystemTime::now();
        let mut violations = Vec::new();
        let mut last = BTreeMap::new();
        for (vm, processes) in placement {
            let mut on: Vec<String> = processes.iter().map(|(h, _)| h.clone()).collect();
            on.dedup(); // sorted by host already
            if on.len() > 1 {
                let running = running_on(&vm, &on, &processes, hosts);
                if running.len() > 1 {
                    violations.push(Violation {
                        at,
                        since_start: began - start,
                        vm: vm.clone(),
                        hosts: running,
                        processes,
                    });
                }
            }
            last.insert(vm, on);
        }
        let mut state = shared.lock();
        state.samples += 1;
        state.violations.extend(violations);
        state.last = last;
        shared.changed.notify_all();
        let next = began + DoubleRunChecker::INTERVAL;
        loop {
            if state.stop {
                return;
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            state = shared
                .changed
                .wait_timeout(state, next - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn violation_display_names_vm_and_hosts() {
        let v = Violation {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1500),
            since_start: Duration::from_millis(2300),
            vm: "vm1".into(),
            hosts: vec!["h1".into(), "h2".into()],
            processes: vec![("h1".into(), 10), ("h2".into(), 20)],
        };
        let text = v.to_string();
        assert!(text.contains("2.3 s after start"), "{text}");
        assert!(text.contains("VM vm1 ran on h1 and h2"), "{text}");
        assert!(text.contains("1500 ms"), "{text}");
    }

    #[test]
    fn a_killed_process_is_dying_a_running_one_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(!is_dying(pid), "a sleeping process is not dying");
        child.kill().unwrap();
        // Not reaped yet: a zombie (or still exiting) until wait().
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_dying(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(is_dying(pid), "a killed, unreaped process is dying");
        child.wait().unwrap();
        assert!(is_dying(pid), "a reaped process is gone");
    }

    #[test]
    fn run_states_decide_and_the_unaskable_count_only_while_alive() {
        use crate::run_state::Answer;
        let state = |s: &str| Answer::State(s.into());
        let old = || false;
        assert!(runs_vm(|| state("running"), || true, old));
        assert!(runs_vm(|| state("paused"), || true, old));
        assert!(!runs_vm(|| state("inmigrate"), || true, old));
        assert!(!runs_vm(|| state("postmigrate"), || true, old));
        assert!(runs_vm(|| Answer::NoAnswer, || true, old), "a hung QEMU");
        assert!(!runs_vm(|| Answer::NoAnswer, || false, old), "a dying QEMU");
        assert!(!runs_vm(|| Answer::NotListening, || false, || true));
        assert!(
            runs_vm(|| Answer::NotListening, || true, old),
            "an old QEMU with no socket counts"
        );
        // Starting: not listening at first, then an incoming migration's state.
        let mut answers = vec![
            state("inmigrate"),
            Answer::NotListening,
            Answer::NotListening,
        ];
        assert!(!runs_vm(|| answers.pop().unwrap(), || true, || true));
        // Starting, then old enough without a socket: counts.
        let asked = std::cell::Cell::new(0);
        assert!(runs_vm(
            || {
                asked.set(asked.get() + 1);
                Answer::NotListening
            },
            || true,
            || asked.get() < 3
        ));
        assert_eq!(asked.get(), 3);
    }

    #[test]
    fn a_process_has_an_age() {
        let me = age(std::process::id()).unwrap();
        assert!(me < Duration::from_secs(3600), "{me:?}");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(age(child.id()).unwrap() <= me + Duration::from_secs(1));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(age(child.id()), None);
    }

    #[test]
    fn nothing_runs_in_an_empty_runtime_dir() {
        let dir = tempfile::tempdir().unwrap();
        let placement = vm_placement(&["vm1".into()], &[("h1".into(), dir.path().join("h1"))]);
        assert_eq!(placement.get("vm1"), Some(&Vec::new()));
    }
}
