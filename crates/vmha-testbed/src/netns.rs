//! Low-level helpers: the `ip` tool, which processes live in a network namespace (from
//! `/proc`), and running code inside a namespace (a helper thread that `setns`es).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where `ip netns add` puts the namespace handles.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// The handle file of a named network namespace.
pub(crate) fn ns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Runs `ip ARGS…`, returning its stdout; fails with its stderr when it fails.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow!("the `ip` tool is missing: install the Debian package iproute2")
            } else {
                anyhow!(e).context("running `ip`")
            }
        })?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The names of all named network namespaces.
pub(crate) fn list_netns() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The names of all interfaces of the root network namespace.
pub(crate) fn list_links() -> Result<Vec<String>> {
    let out = ip(&["-o", "link", "show"])?;
    Ok(out.lines().filter_map(link_name).collect())
}

/// The interface name of one line of `ip -o link show` ("7: name@peer: <FLAGS> …").
fn link_name(line: &str) -> Option<String> {
    let name = line.split(": ").nth(1)?;
    let name = name.split('@').next()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// Whether interface `name` of the root namespace is administratively up; `None` if it does
/// not exist.
pub(crate) fn link_is_up(name: &str) -> Option<bool> {
    let out = ip(&["-o", "link", "show", "dev", name]).ok()?;
    let flags = out.split_once('<')?.1.split_once('>')?.0;
    Some(flags.split(',').any(|f| f == "UP"))
}

/// The inode of a named network namespace (what `/proc/PID/ns/net` links to), if it exists.
pub(crate) fn ns_inode(ns: &str) -> Option<u64> {
    std::fs::metadata(ns_path(ns)).ok().map(|m| m.ino())
}

/// Whether process `pid` lives in the network namespace with inode `ino`. Zombies have no
/// namespaces any more and never match.
fn pid_in_netns(pid: u32, ino: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .is_ok_and(|link| link.as_os_str().to_str() == Some(&format!("net:[{ino}]")))
}

/// Every live (non-zombie) process in the network namespace with inode `ino`, except this
/// process; sorted.
pub(crate) fn pids_in_netns(ino: u64) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid_in_netns(pid, ino))
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs every process of namespace `ns` except `keep`, repeating until none is left (a
/// process may fork while we kill), for at most `timeout`. Returns how many processes were
/// signalled. A namespace that does not exist has no processes.
pub(crate) fn kill_netns_processes(ns: &str, keep: &[u32], timeout: Duration) -> Result<usize> {
    let Some(ino) = ns_inode(ns) else {
        return Ok(0);
    };
    let deadline = Instant::now() + timeout;
    let mut killed = BTreeSet::new();
    loop {
        let pids: Vec<u32> = pids_in_netns(ino)
            .into_iter()
            .filter(|pid| !keep.contains(pid))
            .collect();
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() >= deadline {
            bail!("processes {pids:?} still in network namespace {ns} {timeout:?} after SIGKILL");
        }
        for pid in pids {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            // Check again right before the signal: narrows the window in which the pid could
            // have been reused by a process outside the namespace to almost nothing.
            if !pid_in_netns(pid, ino) {
                continue;
            }
            match kill(Pid::from_raw(raw), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => bail!("SIGKILL to pid {pid} in {ns}: {e}"),
            }
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on a helper thread that first joins network namespace `ns`. Sockets `f` creates
/// and processes it spawns belong to that namespace; the calling thread is not affected. A
/// panic in `f` is resumed on the calling thread.
pub(crate) fn run_in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let handle =
        File::open(ns_path(ns)).with_context(|| format!("opening network namespace {ns}"))?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("vmtb-netns".into())
            .spawn_scoped(scope, move || -> Result<T> {
                nix::sched::setns(&handle, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into network namespace {ns}"))?;
                Ok(f())
            })
            .context("starting a helper thread")?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The full path of `program` as `execvp` would find it in `PATH` (or itself if it contains a
/// slash and exists).
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_link_lines() {
        assert_eq!(
            link_name("7: vmtb3h0@if2: <BROADCAST,MULTICAST,UP> mtu 1500").as_deref(),
            Some("vmtb3h0")
        );
        assert_eq!(
            link_name("1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536").as_deref(),
            Some("lo")
        );
        assert_eq!(link_name("garbage"), None);
    }

    #[test]
    fn finds_programs() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some());
        assert!(find_program("surely-no-such-program-vmtb").is_none());
    }
}
