//! Shared helpers for the integration tests: real peers with kill-on-drop guards.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

pub mod fake_agent;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// True if `binary` is on PATH (or an absolute existing path); prints why a test is skipped.
pub fn have(binary: &str) -> bool {
    let found = if binary.starts_with('/') {
        Path::new(binary).exists()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(binary).exists()))
            .unwrap_or(false)
    };
    if !found {
        println!("SKIPPED: {binary} is not installed");
    }
    found
}

/// Kills the process (SIGKILL) and reaps it when dropped, even if the test fails.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILLs a non-child pid when dropped (for QEMUs started in their own process group).
pub struct PidGuard(pub u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

pub fn wait_for_socket(path: &Path) {
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not appear", path.display());
}

/// A real `qemu-ga` listening on a unix socket on this host.
pub struct HostAgent {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub child: ChildGuard,
}

impl HostAgent {
    /// Sends `signal` to the agent (e.g. SIGSTOP to make it hang, SIGCONT to resume it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.0.id() as i32), signal)
            .unwrap();
    }
}

pub fn host_agent() -> Option<HostAgent> {
    if !have("/usr/sbin/qemu-ga") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let child = Command::new("/usr/sbin/qemu-ga")
        .arg("-m")
        .arg("unix-listen")
        .arg("-p")
        .arg(&sock)
        .arg("-f")
        .arg(dir.path().join("qga.pid"))
        .arg("-t")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = ChildGuard(child);
    wait_for_socket(&sock);
    Some(HostAgent {
        dir,
        sock,
        child: guard,
    })
}

/// A diskless, paused (`-S`) QEMU with only a QMP socket.
pub struct BareQemu {
    pub dir: tempfile::TempDir,
    pub qmp: PathBuf,
    pub child: ChildGuard,
}

pub fn bare_qemu() -> Option<BareQemu> {
    if !have("qemu-system-x86_64") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = ChildGuard(child);
    wait_for_socket(&qmp);
    Some(BareQemu { dir, qmp, child })
}
