//! `vmha-fake-qemu` as a process: its host `qemu-ga` never outlives it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
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

/// A fake QEMU killed with SIGKILL (as vmhad kills a QEMU that does not stop, or a fence does)
/// takes its agent with it: no orphaned qemu-ga keeps the test's inherited descriptors.
#[test]
fn a_killed_fake_qemu_leaves_no_agent_behind() {
    let dir = tempfile::tempdir().unwrap();
    let paths = vmha_qemu::VmPaths::new(dir.path(), "v").unwrap();
    std::fs::create_dir_all(dir.path().join("v")).unwrap();
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
    let mut fake = Command::new(env!("CARGO_BIN_EXE_vmha-fake-qemu"))
        .args(vmha_qemu::vm::qemu_args(&spec, &paths))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pidfile = dir.path().join("v").join("qga.pid");
    wait_for("qga.pid", || pidfile.exists());
    let agent: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the agent's socket", || {
        Path::new(&paths.qga).exists() && alive(agent)
    });
    fake.kill().unwrap();
    fake.wait().unwrap();
    wait_for("the agent to die with the fake QEMU", || !alive(agent));
}
