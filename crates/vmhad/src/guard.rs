//! The fence guard: a small process vmhad starts beside itself on an etcd cluster, so that its
//! VMs are killed in time even when vmhad itself is gone — stopped for an upgrade, crashed,
//! killed. Without it, a vmhad that exits leaves its VMs running while its lease runs out,
//! and another host would start them: the same VM twice.
//!
//! vmhad tells the guard (on its stdin, one line each) the monotonic clock of its fence epoch,
//! the fence deadline and the lease's TTL, the VMs' QMP sockets, and every acknowledged
//! renewal's send time (before it lifts a fence, so the guard never kills a VM started under a
//! renewal it has not heard of).
//!
//! - While vmhad lives the guard watches for a *hung* vmhad: no renewal for halfway between
//!   the fence deadline and the lease's expiry (vmhad's own fence would have fired at the
//!   deadline) — it kills the VMs, and keeps listening.
//! - When its stdin closes (vmhad exited or died), the guard waits until
//!   `last renewal sent + ttl - fence_margin` and then kills every QEMU of those VMs — unless a
//!   new vmhad took over first: a new vmhad kills the previous guard (its pid is in
//!   `STATE_DIR/fence-guard.pid`) once it holds the lease and fences by itself.
//!
//! Protocol lines: `epoch MS`, `fence-after MS`, `lease-ttl MS`, `vm PATH` (replaces the list
//! when a `vms` line precedes), `vms`, `renewed MS` (ms after the epoch). Unknown lines are
//! ignored. Nothing is killed before the epoch, the deadline and a renewal were heard.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The command-line flag that runs vmhad as a fence guard.
pub const FLAG: &str = "--fence-guard";

/// How often the guard kills again while it fences (a start that was under way).
const TICK: Duration = Duration::from_millis(20);
/// The longest the guard sleeps otherwise: it wakes at its deadline, and at once on every line
/// from vmhad and when vmhad's end of the pipe closes.
const IDLE: Duration = Duration::from_secs(1);

/// Milliseconds of the system-wide monotonic clock (the same clock in every process).
pub fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let ms = ts.tv_sec() as i128 * 1_000 + ts.tv_nsec() as i128 / 1_000_000;
            u64::try_from(ms).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// What vmhad told the guard.
#[derive(Debug, Default, Clone)]
struct Watch {
    epoch: Option<u64>,
    fence_after: Option<u64>,
    lease_ttl: Option<u64>,
    renewed: Option<u64>,
    vms: Vec<PathBuf>,
    fresh_list: bool,
}

impl Watch {
    /// Takes in one protocol line.
    fn hear(&mut self, line: &str) {
        let mut words = line.splitn(2, ' ');
        let word = words.next().unwrap_or("");
        let arg = words.next().unwrap_or("");
        let number = arg.trim().parse::<u64>().ok();
        match word {
            "epoch" => self.epoch = number.or(self.epoch),
            "fence-after" => self.fence_after = number.or(self.fence_after),
            "lease-ttl" => self.lease_ttl = number.or(self.lease_ttl),
            "renewed" => self.renewed = self.renewed.max(number),
            "vms" => self.fresh_list = true,
            "vm" => {
                if self.fresh_list {
                    self.vms.clear();
                    self.fresh_list = false;
                }
                self.vms.push(PathBuf::from(arg));
            }
            _ => {}
        }
    }

    /// When vmhad's own fence fires (monotonic ms), once enough is known.
    fn fence_deadline(&self) -> Option<u64> {
        Some(
            self.epoch?
                .saturating_add(self.renewed?)
                .saturating_add(self.fence_after?),
        )
    }

    /// When a vmhad that is still there is taken for hung: halfway from its fence deadline to
    /// the lease's expiry.
    fn hung_deadline(&self) -> Option<u64> {
        let fence_after = self.fence_after?;
        let halfway = fence_after.saturating_add(self.lease_ttl?.saturating_sub(fence_after) / 2);
        Some(
            self.epoch?
                .saturating_add(self.renewed?)
                .saturating_add(halfway),
        )
    }
}

/// Runs the guard until it has fenced after vmhad left, or was replaced (killed by the next
/// vmhad).
pub fn run() -> ExitCode {
    let heard = Arc::new(Mutex::new(Watch::default()));
    let closed = Arc::new(AtomicBool::new(false));
    {
        let heard = Arc::clone(&heard);
        let closed = Arc::clone(&closed);
        let guard = std::thread::current();
        let reader = std::thread::Builder::new()
            .name("guard-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut w) = heard.lock() {
                        w.hear(&line);
                    }
                    guard.unpark();
                }
                closed.store(true, Ordering::SeqCst);
                guard.unpark();
            });
        if reader.is_err() {
            return ExitCode::FAILURE;
        }
    }
    loop {
        let gone = closed.load(Ordering::SeqCst);
        let Ok(w) = heard.lock().map(|w| w.clone()) else {
            return ExitCode::FAILURE;
        };
        let now = monotonic_ms();
        if gone {
            // vmhad is gone: its lease lives at least until `renewed + ttl`; fence before.
            let Some(deadline) = w.fence_deadline() else {
                return ExitCode::SUCCESS;
            };
            if deadline > now {
                std::thread::sleep(Duration::from_millis(deadline - now));
            }
            // Still here: no vmhad took over. Kill, and keep killing a little while (a start
            // that was under way).
            for _ in 0..50 {
                if !kill_all(&w.vms) {
                    break;
                }
                std::thread::sleep(TICK);
            }
            return ExitCode::SUCCESS;
        }
        let nap = match w.hung_deadline() {
            Some(d) if now >= d => {
                kill_all(&w.vms);
                TICK
            }
            // Milliseconds: one more, so it wakes past the deadline.
            Some(d) => Duration::from_millis(d - now + 1).min(IDLE),
            None => IDLE,
        };
        // Woken early by the reader; a spurious wake-up only looks again.
        std::thread::park_timeout(nap);
    }
}

/// SIGKILLs every QEMU of `vms`; whether there was any.
fn kill_all(vms: &[PathBuf]) -> bool {
    let mut any = false;
    for qmp in vms {
        for pid in processes_naming(qmp) {
            any = true;
            if let Ok(raw) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    any
}

/// Live processes whose command line names `qmp` (same matching as the fence thread).
fn processes_naming(qmp: &Path) -> Vec<u32> {
    let (Some(dir), Some(name)) = (
        qmp.parent().and_then(Path::parent),
        qmp.parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str()),
    ) else {
        return Vec::new();
    };
    match vmha_qemu::VmPaths::new(dir, name) {
        Ok(paths) => vmha_qemu::qemu_processes(&paths),
        Err(_) => Vec::new(),
    }
}

/// Kills the guard a previous vmhad of this host left (its pid in `pidfile`), once this vmhad
/// fences by itself; then records `pid` as the current guard.
pub fn take_over(pidfile: &Path, pid: u32) {
    if let Ok(text) = std::fs::read_to_string(pidfile)
        && let Ok(old) = text.trim().parse::<u32>()
        && old != pid
        && is_guard(old)
        && let Ok(raw) = i32::try_from(old)
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
        tracing::info!(pid = old, "took over from the previous vmhad's fence guard");
    }
    if let Err(e) = std::fs::write(pidfile, format!("{pid}\n")) {
        tracing::warn!(
            "cannot record the fence guard's pid in {}: {e}",
            pidfile.display()
        );
    }
}

/// Whether process `pid` is a fence guard (its command line carries [`FLAG`]).
fn is_guard(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == FLAG.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heard(lines: &[&str]) -> Watch {
        let mut w = Watch::default();
        for l in lines {
            w.hear(l);
        }
        w
    }

    #[test]
    fn nothing_is_due_before_the_epoch_the_deadline_and_a_renewal_were_heard() {
        assert_eq!(
            heard(&["epoch 1000", "fence-after 3500"]).fence_deadline(),
            None
        );
        assert_eq!(
            heard(&["renewed 10", "fence-after 3500"]).fence_deadline(),
            None
        );
        assert_eq!(
            heard(&["epoch 1000", "renewed 10", "fence-after 3500"]).hung_deadline(),
            None
        );
    }

    #[test]
    fn deadlines_run_from_the_latest_renewal() {
        let w = heard(&[
            "epoch 1000",
            "fence-after 3500",
            "lease-ttl 5000",
            "renewed 200",
            "renewed 100",
            "renewed garbage",
        ]);
        assert_eq!(w.fence_deadline(), Some(1000 + 200 + 3500));
        // Hung: halfway between the fence deadline and the lease's expiry.
        assert_eq!(w.hung_deadline(), Some(1000 + 200 + 4250));
    }

    #[test]
    fn a_vms_line_starts_a_new_list() {
        let w = heard(&["vm /a", "vm /b", "vms", "vm /c", "bogus line"]);
        assert_eq!(w.vms, vec![PathBuf::from("/c")]);
    }
}
