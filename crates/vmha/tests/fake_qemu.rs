//! `vmha-fake-qemu` as a process: it serves the paths of the qemu driver's own command line,
//! and its host `qemu-ga` never outlives it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fake QEMU started with the command line the qemu driver writes for VM `v` under
/// `runtime`, once its agent runs and its socket is there; killed when dropped.
struct Fake {
    child: Child,
    paths: vmha_qemu::VmPaths,
    /// The agent's pid.
    agent: i32,
}

impl Fake {
    fn start(runtime: &Path) -> Fake {
        let paths = vmha_qemu::VmPaths::new(runtime, "v").unwrap();
        std::fs::create_dir_all(&paths.dir).unwrap();
        let spec = vmha_qemu::LaunchSpec {
            name: "v".into(),
            memory_mb: 64,
            cpus: 1,
            disks: Vec::new(),
            kernel: None,
            initrd: None,
            append: None,
            accel: vmha_qemu::Accel::Tcg,
            extra_args: Vec::new(),
            emulator: None,
        };
        let child = Command::new(env!("CARGO_BIN_EXE_vmha-fake-qemu"))
            .args(vmha_qemu::vm::qemu_args(&spec, &paths))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pidfile = paths.dir.join("qga.pid");
        wait_for("qga.pid", || pidfile.exists());
        let agent: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_for("the agent's socket", || {
            Path::new(&paths.qga).exists() && alive(agent)
        });
        Fake {
            child,
            paths,
            agent,
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// It reads the driver's command line as the driver writes it (a runtime path with a comma,
/// escaped): QMP on vmhad's monitor socket, not the observers' one; the agent on the VM's
/// guest-agent socket; its own pid in the VM's pidfile.
#[test]
fn serves_the_paths_of_the_drivers_command_line() {
    let dir = tempfile::Builder::new().prefix("a,b").tempdir().unwrap();
    let fake = Fake::start(dir.path());
    let paths = &fake.paths;
    wait_for("QMP on vmhad's monitor socket", || {
        UnixStream::connect(&paths.qmp).is_ok()
    });
    let mut greeting = String::new();
    BufReader::new(UnixStream::connect(&paths.qmp).unwrap())
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    assert!(
        !paths.observe.exists(),
        "vmhad's monitor, not the observers'"
    );
    let pid = std::fs::read_to_string(&paths.pidfile).unwrap();
    assert_eq!(pid.trim(), fake.child.id().to_string());
}

/// A fake QEMU killed with SIGKILL (as vmhad kills a QEMU that does not stop, or a fence does)
/// takes its agent with it: no orphaned qemu-ga keeps the test's inherited descriptors.
#[test]
fn a_killed_fake_qemu_leaves_no_agent_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut fake = Fake::start(dir.path());
    fake.child.kill().unwrap();
    fake.child.wait().unwrap();
    let agent = fake.agent;
    wait_for("the agent to die with the fake QEMU", || !alive(agent));
}
