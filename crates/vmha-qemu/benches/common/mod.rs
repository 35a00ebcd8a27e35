//! What the qemu-ga benches share: a real host `qemu-ga` on a socket in a temp dir, the batched
//! five-app probe they time, percentiles, and the CPU time of a process from /proc.

// Each bench uses its own part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmha_qemu::ProbeCheck;

/// Where Debian installs the agent.
const QEMU_GA: &str = "/usr/sbin/qemu-ga";

/// A real `qemu-ga` in unix-listen mode on `sock`, with its pid and state files in `dir`;
/// killed when dropped.
pub struct HostAgent {
    child: Child,
    /// Its pid, as /proc names it.
    pub pid: String,
    /// Its socket.
    pub sock: PathBuf,
    /// The temp dir it lives in (removed when dropped).
    pub dir: tempfile::TempDir,
}

impl HostAgent {
    /// Starts the agent and waits until its socket accepts; `None` (after printing `SKIPPED`)
    /// when it is not installed.
    pub fn start() -> Option<HostAgent> {
        if !std::path::Path::new(QEMU_GA).exists() {
            println!("SKIPPED: {QEMU_GA} is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let child = Command::new(QEMU_GA)
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-f")
            .arg(dir.path().join("pid"))
            .arg("-t")
            .arg(dir.path().join("state"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(HostAgent {
            pid: child.id().to_string(),
            child,
            sock,
            dir,
        })
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The probe the benches time: five apps, checks that pass, fail and exit 3.
pub fn five_checks() -> Vec<ProbeCheck> {
    let check = |name: &str, argv: &[&str]| ProbeCheck {
        app: vmha_model::Name::new(name).unwrap(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(5),
    };
    vec![
        check("a", &["true"]),
        check("b", &["false"]),
        check("c", &["sh", "-c", "exit 3"]),
        check("d", &["test", "-d", "/"]),
        check("e", &["true"]),
    ]
}

/// The `p` percentile (0 to 1, nearest index) of sorted, non-empty `samples`.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// utime + stime (+ cutime + cstime with `children`) of process `pid` (or `self`), in seconds.
pub fn cpu_seconds(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
    // Fields 14..17 of stat(5) are at 11..14 here (counting from field 3, the state).
    let ticks = f[11] + f[12] + if children { f[13] + f[14] } else { 0 };
    ticks as f64 / 100.0
}
