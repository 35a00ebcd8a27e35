//! Acknowledged means durable (issue "Save, then act, then answer"), against the real vmhad:
//!
//! - admin commands in a loop while vmhad is SIGKILLed at random moments (20 rounds): every
//!   command answered 200 is there after the restart;
//! - SIGKILL between a VM-restart decision and its action, again and again: never more VM
//!   restarts than the budget allows;
//! - the state dir on a full disk (a small tmpfs, needs root): commands refused with 503 and
//!   nothing changed, the store shown degraded, recovery by itself once space is free.
//!
//! Figures (acknowledged / lost) are printed; run with `--nocapture` to see them.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Vmhad, vm_test_lock};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

const VM: &str = "shop";

/// A small deterministic generator (xorshift), seeded per run, printed for reproduction.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("DURABILITY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| common::now_ms() | 1);
        println!("DURABILITY_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn boot(vms: &[&str]) -> Vmhad {
    let mut h = Vmhad::new(vms);
    h.start();
    if !vms.is_empty() {
        h.wait_for(0, VM, "starting", "online");
    }
    h
}

/// Every command answered 200 survives a SIGKILL that follows it at any moment.
#[test]
fn acknowledged_commands_survive_sigkill() {
    let _lock = vm_test_lock();
    let mut h = boot(&[VM]);
    let mut rng = Rng::seeded();
    let (mut acknowledged, mut lost, mut refused) = (0u64, 0u64, 0u64);
    let mut priority = 1u64;
    for round in 0..20 {
        // A client sends priority changes as fast as vmhad answers them.
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
        let sent: Arc<Mutex<u64>> = Arc::new(Mutex::new(priority));
        let socket = h.socket();
        let client = {
            let (stop, acked, sent) = (stop.clone(), acked.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut p = *sent.lock().unwrap();
                while !stop.load(Ordering::SeqCst) {
                    p += 1;
                    *sent.lock().unwrap() = p;
                    let body =
                        json!({"command": "set-priority", "vm": VM, "app": "web", "priority": p});
                    let status = try_post(&socket, &body.to_string());
                    match status {
                        Some(200) => {
                            *acked.lock().unwrap() = Some(p);
                            n += 1;
                        }
                        // vmhad went away mid-request: not acknowledged.
                        _ => break,
                    }
                }
                n
            })
        };
        std::thread::sleep(Duration::from_millis(rng.between(30, 700)));
        let status = h.signal_and_wait(Signal::SIGKILL);
        assert!(!status.success());
        stop.store(true, Ordering::SeqCst);
        let answered = client.join().unwrap();
        acknowledged += answered;
        let last_acked = *acked.lock().unwrap();
        let last_sent = *sent.lock().unwrap();
        h.start();
        let got = h.app_status(VM, "web")["priority"].as_u64().unwrap();
        match last_acked {
            // The last acknowledged value, or the one in flight at the kill (never answered:
            // it may or may not have been committed).
            Some(a) if got == a || got == last_sent => {}
            Some(a) => {
                lost += 1;
                println!("round {round}: acknowledged priority {a} lost (found {got})");
            }
            None => refused += 1,
        }
        priority = last_sent.max(got);
        if let Some(a) = last_acked {
            assert!(
                got == a || got == last_sent,
                "round {round}: acknowledged priority {a} lost after SIGKILL: found {got}"
            );
        }
    }
    println!(
        "FIGURES kill -9 loop, 20 rounds: {acknowledged} commands acknowledged, {lost} lost \
         ({refused} rounds with no answer before the kill)"
    );
    assert_eq!(lost, 0);
    assert!(
        acknowledged > 20,
        "too few commands got through to mean anything"
    );
}

/// `POST /v1/commands` → the status code, or `None` when vmhad went away mid-request.
fn try_post(socket: &std::path::Path, body: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let head = format!(
        "POST /v1/commands HTTP/1.0\r\nHost: vmhad\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// The VM's QEMU pid (one process).
fn qemu(h: &Vmhad) -> i32 {
    h.qemu_pid(VM)
}

/// A SIGKILL right after vmhad decided a VM restart never yields more restarts than the
/// budget: the restart is counted in the commit that releases it.
#[test]
fn a_kill_between_decision_and_action_never_exceeds_the_budget() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&[VM]);
    // vm_restart_limit 2 (the demo VM has 5).
    let config = std::fs::read_to_string(&h.config)
        .unwrap()
        .replace("vm_restart_limit = 5", "vm_restart_limit = 2");
    std::fs::write(&h.config, config).unwrap();
    h.start();
    h.wait_for(0, VM, "starting", "online");
    let mut rng = Rng::seeded();
    let mut launched = Vec::new();
    for round in 0..3 {
        let before = qemu(&h);
        let m = h.mark();
        kill(Pid::from_raw(before), Signal::SIGKILL).unwrap();
        // vmhad decides at once (QMP socket closed); kill it within the next few ms.
        std::thread::sleep(Duration::from_millis(rng.between(0, 40)));
        h.signal_and_wait(Signal::SIGKILL);
        println!(
            "round {round}: vmhad killed; events before: {}",
            h.events_text(m)
        );
        h.start();
        // Settles: online again (restart taken from the budget), or faulted (spent).
        let deadline = Instant::now() + common::WAIT;
        loop {
            let state = h.vm_status(VM)["state"].as_str().unwrap_or("").to_string();
            if state == "online" || state == "faulted" {
                break;
            }
            assert!(Instant::now() < deadline, "never settled: {state}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let pids = h.qemu_processes(VM);
        assert!(pids.len() <= 1, "{pids:?}");
        if let Some(&p) = pids.first()
            && p != before
            && !launched.contains(&p)
        {
            launched.push(p);
        }
        let vm = h.vm_status(VM);
        println!(
            "round {round}: state {}, restarts in window {}, QEMUs launched so far {}",
            vm["state"],
            vm["vm_restarts_in_window"],
            launched.len()
        );
        assert!(vm["vm_restarts_in_window"].as_u64().unwrap() <= 2);
    }
    assert!(
        launched.len() <= 2,
        "{} VM restarts with a budget of 2",
        launched.len()
    );
    assert_eq!(launched.len(), 2, "the budget allows two restarts");
    assert_eq!(
        h.vm_status(VM)["state"],
        "faulted",
        "third crash: budget spent"
    );
}

/// Runs a shell command, panicking with its output when it fails.
fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts the tmpfs even when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn maintenance(h: &Vmhad) -> String {
    let status = h.status();
    status["cluster_view"]["hosts"][0]["state"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// The state dir on a full disk: commands are refused with 503 and change nothing, the store
/// shows degraded; once space is free vmhad recovers by itself and commits again.
#[test]
fn a_full_disk_refuses_commands_and_recovers() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs: run it as root (CI does)"
    );
    let mut h = Vmhad::new(&[]);
    std::fs::create_dir_all(&h.state).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=4m,mode=0700 tmpfs {}",
        h.state.display()
    ));
    let _mount = Mount(h.state.clone());
    h.start();
    // Committed while there is space.
    h.command_ok(&json!({"command": "host-maintenance", "host": "kvm1", "on": true}));
    assert_eq!(maintenance(&h), "maintenance");

    // Fill the disk.
    let filler = h.state.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    // redb may still find room inside its file: toggle maintenance (each a real write) until
    // the store refuses, then check the refusals change nothing.
    let mut on = true;
    let mut refusals = 0;
    for _ in 0..2_000 {
        let (status, body) =
            h.command(&json!({"command": "host-maintenance", "host": "kvm1", "on": !on}));
        match status {
            200 => on = !on,
            503 => {
                assert_eq!(
                    body["command_error"]["error"], "store-unavailable",
                    "{body}"
                );
                refusals += 1;
                let want = if on { "maintenance" } else { "up" };
                assert_eq!(maintenance(&h), want, "a refused command changed state");
                if refusals == 5 {
                    break;
                }
            }
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert_eq!(refusals, 5, "commands were not refused on a full disk");
    let degraded = h.status()["store"]["degraded"].clone();
    assert!(
        degraded.is_string(),
        "status does not show the store degraded"
    );
    println!("degraded: {degraded}");

    // Space again: vmhad recovers by itself (no restart), commands commit again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) =
            h.command(&json!({"command": "host-maintenance", "host": "kvm1", "on": !on}));
        if status == 200 {
            on = !on;
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(h.status()["store"]["degraded"].is_null());
    let want = if on { "maintenance" } else { "up" };
    assert_eq!(maintenance(&h), want);

    // And it is durable: after SIGKILL the acknowledged state is there.
    h.signal_and_wait(Signal::SIGKILL);
    h.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while maintenance(&h) == "?" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(maintenance(&h), want);
}
