//! A new configuration on a running vmhad (SIGHUP, `vmha config reload`, `vmha config apply`):
//! validated first — a bad file changes nothing and is reported in the log and in `vmha
//! status` —, then applied: a new VM is placed and started, the running one is left alone, a
//! removed one is released and left running.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Vmhad, cluster_config, demo_vm, vm_test_lock};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn write_config(h: &Vmhad, vms: &[&str]) {
    let sections: Vec<String> = vms.iter().map(|v| demo_vm(v)).collect();
    let dir = h.config.parent().unwrap();
    std::fs::write(&h.config, cluster_config(dir, &sections)).unwrap();
}

fn sighup(h: &Vmhad) {
    kill(Pid::from_raw(h.pid()), Signal::SIGHUP).unwrap();
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + common::WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vmha(h: &Vmhad, args: &[&str]) -> std::process::Output {
    let vmha = std::path::Path::new(env!("CARGO_BIN_EXE_vmhad")).with_file_name("vmha");
    Command::new(vmha)
        .args(args)
        .arg("--state-dir")
        .arg(&h.state)
        .output()
        .unwrap()
}

#[test]
fn configuration_reloads_are_validated_then_applied() {
    let _lock = vm_test_lock();
    // Both VMs are the harness's (killed at the end, even on failure); the file starts with one.
    let mut h = Vmhad::new(&["shop", "blog"]);
    write_config(&h, &["shop"]);
    h.start();
    h.wait_for(0, "shop", "starting", "online");
    let shop = h.qemu_pid("shop");

    // A bad file: nothing changes; the log and the status say why.
    std::fs::write(&h.config, "[cluster]\nname = \"e2e\"\nbogus = 1\n").unwrap();
    sighup(&h);
    wait("the refusal in status", || {
        h.status()["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("bogus"))
    });
    h.assert_running();
    assert_eq!(h.qemu_pid("shop"), shop);

    // A FIFO in place of the file: refused unopened (it used to hang the daemon's core loop).
    std::fs::remove_file(&h.config).unwrap();
    nix::unistd::mkfifo(&h.config, nix::sys::stat::Mode::S_IRWXU).unwrap();
    sighup(&h);
    wait("the FIFO's refusal in status", || {
        h.status()["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("is a named pipe (FIFO), not a configuration file"))
    });
    h.assert_running();
    assert_eq!(h.qemu_pid("shop"), shop);
    std::fs::remove_file(&h.config).unwrap();

    // A VM added: SIGHUP applies it; the running VM is left alone.
    write_config(&h, &["shop", "blog"]);
    let m = h.mark();
    sighup(&h);
    h.wait_for(m, "blog", "*", "online");
    assert!(h.status()["config_error"].is_null(), "{}", h.status());
    assert_eq!(h.qemu_pid("shop"), shop, "reloading restarted a running VM");
    let applied = h
        .since(m)
        .into_iter()
        .find(|e| e.reason.contains("new configuration applied"))
        .expect("an event announcing the new configuration");
    assert!(applied.reason.contains("added blog"), "{}", applied.reason);

    // `vmha config apply` of a file without blog: released, left running.
    let blog = h.qemu_pid("blog");
    let other = h.config.with_file_name("other.toml");
    let sections = vec![demo_vm("shop")];
    std::fs::write(
        &other,
        cluster_config(h.config.parent().unwrap(), &sections),
    )
    .unwrap();
    let out = vmha(&h, &["config", "apply", other.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("removed blog"), "{text}");
    wait("blog no longer managed", || {
        h.status()["agent"]["vms"]
            .as_array()
            .is_some_and(|v| v.iter().all(|vm| vm["name"] != "blog"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(h.qemu_pid("blog"), blog, "a released VM was stopped");
    assert_eq!(h.qemu_pid("shop"), shop);

    // An invalid file is refused by the CLI before anything is sent.
    std::fs::write(&other, "[cluster]\nname = 3\n").unwrap();
    let out = vmha(&h, &["config", "apply", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    // The stored configuration survives a restart: it runs, not the file.
    h.signal_and_wait(Signal::SIGTERM);
    h.start();
    std::thread::sleep(Duration::from_secs(3));
    let names: Vec<String> = h.status()["agent"]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["shop".to_string()]);
}

/// SIGUSR1/2 are logged and change nothing; SIGQUIT stops vmhad cleanly like SIGTERM: it exits
/// 0, removes its API socket and leaves the VMs running.
#[test]
fn other_signals_have_a_defined_behaviour() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&["shop"]);
    write_config(&h, &["shop"]);
    h.start();
    h.wait_for(0, "shop", "starting", "online");
    let shop = h.qemu_pid("shop");
    for signal in [Signal::SIGUSR1, Signal::SIGUSR2] {
        kill(Pid::from_raw(h.pid()), signal).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(h.status()["host"], "kvm1", "vmhad answers after SIGUSR1/2");
    assert_eq!(h.qemu_pid("shop"), shop);
    let status = h.signal_and_wait(Signal::SIGQUIT);
    assert!(status.success(), "SIGQUIT: {status}");
    assert!(!h.socket().exists(), "the API socket was left behind");
    assert_eq!(
        h.qemu_processes("shop"),
        vec![shop],
        "SIGQUIT stopped the VM"
    );
}
