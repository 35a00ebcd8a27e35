//! The fence guard: a small process vmhad starts beside itself on an etcd cluster, so that its
//! VMs are killed in time even when vmhad itself is gone — stopped for an upgrade, crashed,
//! killed. Without it, a vmhad that exits leaves its VMs running while its lease runs out,
//! and another host would start them: the same VM twice.
//!
//! vmhad tells the guard (on its stdin, one line each) the monotonic clock of its fence epoch,
//! the deadline after an acknowledged renewal, the VMs' QMP sockets, and every acknowledged
//! renewal's send time. While vmhad lives the guard only listens. When its stdin closes
//! (vmhad exited or died), the guard waits until `last renewal sent + ttl - fence_margin` and
//! then kills every QEMU of those VMs — unless a new vmhad took over first: a new vmhad kills
//! the previous guard (its pid is in `STATE_DIR/fence-guard.pid`) once it holds the lease and
//! fences by itself.
//!
//! Protocol lines: `epoch MS`, `fence-after MS`, `vm PATH` (replaces the list when a `vms` line
//! precedes), `vms`, `renewed MS` (ms after the epoch). Unknown lines are ignored.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The command-line flag that runs vmhad as a fence guard.
pub const FLAG: &str = "--fence-guard";

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

#[derive(Debug, Default)]
struct Watch {
    epoch: u64,
    fence_after: u64,
    renewed: u64,
    vms: Vec<PathBuf>,
}

/// Runs the guard until it has fenced or was replaced (killed by the next vmhad).
pub fn run() -> ExitCode {
    let mut w = Watch::default();
    let stdin = std::io::stdin();
    let mut fresh_list = false;
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.splitn(2, ' ');
        let word = words.next().unwrap_or("");
        let arg = words.next().unwrap_or("");
        let number = || arg.trim().parse::<u64>().ok();
        match word {
            "epoch" => w.epoch = number().unwrap_or(w.epoch),
            "fence-after" => w.fence_after = number().unwrap_or(w.fence_after),
            "renewed" => w.renewed = w.renewed.max(number().unwrap_or(0)),
            "vms" => fresh_list = true,
            "vm" => {
                if fresh_list {
                    w.vms.clear();
                    fresh_list = false;
                }
                w.vms.push(PathBuf::from(arg));
            }
            _ => {}
        }
    }
    // vmhad is gone: its lease lives at least until `renewed + ttl`; fence before.
    let deadline = w.epoch.saturating_add(w.renewed).saturating_add(w.fence_after);
    let now = monotonic_ms();
    if deadline > now {
        std::thread::sleep(Duration::from_millis(deadline - now));
    }
    // Still here: no vmhad took over. Kill, and keep killing a little while (a start that was
    // under way).
    for _ in 0..50 {
        let mut any = false;
        for qmp in &w.vms {
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
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ExitCode::SUCCESS
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
        tracing::warn!("cannot record the fence guard's pid in {}: {e}", pidfile.display());
    }
}

/// Whether process `pid` is a fence guard (its command line carries [`FLAG`]).
fn is_guard(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .any(|arg| arg == FLAG.as_bytes())
    })
}
