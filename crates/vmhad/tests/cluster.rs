//! Multi-host end-to-end tests (issue "Many hosts on etcd"): three hosts as network namespaces,
//! a 3-member etcd, one vmhad per host, real TCG VMs. Every test runs the double-run checker
//! (QEMU processes sampled every 100 ms) and ends asserting that no VM ever ran on two hosts.
//!
//! Needs root (namespaces); CI runs as root. Timings are printed, never asserted.

#![allow(clippy::unwrap_used)]

mod common;
mod multihost;

use std::time::{Duration, Instant};

use multihost::{Cluster, vm, vm_cmd};
use serde_json::json;
use vmha_testbed::Signal;

const VM: &str = "shop";
/// Long enough for a TCG boot on a loaded 2-core machine; a hang guard, not a target.
const BOOT: Duration = Duration::from_secs(180);

fn kill_qemu(c: &Cluster, host: &str) {
    let pid = c.qemu_pid(host, VM).expect("QEMU running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Restart budget spent on kvm1 → shop starts on kvm2, apps in dependency order; settings and
/// admin decisions made through other hosts hold after the failover: priority, offline flag,
/// stop, freeze.
#[test]
fn budget_failover_keeps_admin_state() {
    let mut c = Cluster::new(
        &[VM],
        &[vm(VM, &["kvm1", "kvm2", "kvm3"], "vm_restart_limit = 1")],
    );
    c.wait("shop online on kvm1", BOOT, || c.online_on("kvm1", VM));

    // Settings changed through other hosts: forwarded to the owner, answered once committed.
    c.command_ok(
        "kvm3",
        &json!({"command": "set-priority", "vm": VM, "app": "db", "priority": 55}),
    );
    c.command_ok(
        "kvm2",
        &json!({"command": "app-offline", "vm": VM, "app": "worker", "auto_clear": false}),
    );

    // Two crashes: restart 1/1 on kvm1, then faulted there → the controller moves it.
    kill_qemu(&c, "kvm1");
    c.wait("shop restarted on kvm1", BOOT, || {
        c.vm_on("kvm1", VM)
            .is_some_and(|v| v["state"] == "online" && v["vm_restarts_in_window"] == 1)
    });
    kill_qemu(&c, "kvm1");
    let t0 = Instant::now();
    c.wait("shop online on kvm2", BOOT, || {
        c.vm_on("kvm2", VM).is_some_and(|v| v["state"] == "online")
    });
    println!(
        "LATENCY budget spent on kvm1 → online on kvm2: {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(c.running_on(VM), vec!["kvm2".to_string()]);
    let events = c.events("kvm2", 400).join("\n");
    let pos = |needle: &str| {
        events
            .find(needle)
            .unwrap_or_else(|| panic!("no `{needle}` in\n{events}"))
    };
    // Apps in dependency order on kvm2: db before web; worker intentionally offline.
    assert!(pos("kvm2 shop/db starting → online") < pos("kvm2 shop/web starting → online"));
    let shop = c.vm_on("kvm2", VM).unwrap();
    let app = |name: &str| {
        shop["apps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(app("db")["priority"], 55, "priority lost in the failover");
    assert_eq!(app("worker")["state"], "offline", "offline flag lost");

    // Freeze through kvm1 (not the owner any more): kvm2 must not restart a crash.
    c.command_ok("kvm1", &vm_cmd("freeze", VM));
    c.wait("kvm2 knows shop is frozen", Duration::from_secs(10), || {
        c.vm_on("kvm2", VM).is_some_and(|v| v["frozen"] == true)
    });
    kill_qemu(&c, "kvm2");
    c.wait("kvm2 sees the crash", Duration::from_secs(10), || {
        c.vm_on("kvm2", VM).is_some_and(|v| v["state"] == "faulted")
    });
    std::thread::sleep(Duration::from_secs(5));
    assert!(c.running_on(VM).is_empty(), "a frozen VM was restarted");
    c.command_ok("kvm3", &vm_cmd("unfreeze", VM));
    c.wait("shop online again after unfreeze", BOOT, || {
        c.running_on(VM).len() == 1 && c.online_on(&c.running_on(VM)[0], VM)
    });

    // Stop through kvm3; then the owner dies: the stop holds (not started anywhere).
    let owner = c.running_on(VM)[0].clone();
    c.command_ok("kvm3", &vm_cmd("vm-stop", VM));
    c.wait("shop stopped", Duration::from_secs(60), || {
        c.running_on(VM).is_empty()
    });
    if owner != "kvm3" {
        c.kill_host(&owner);
    }
    std::thread::sleep(Duration::from_secs(10));
    assert!(c.running_on(VM).is_empty(), "a stopped VM was started");
    c.command_ok("kvm3", &vm_cmd("vm-start", VM));
    c.wait("shop started again", BOOT, || c.running_on(VM).len() == 1);
    c.checker.assert_never_double();
}

/// The host a VM runs on, waiting until it runs on exactly one.
fn placed(c: &Cluster, vm: &str) -> String {
    c.wait(&format!("{vm} runs on one host"), BOOT, || {
        c.running_on(vm).len() == 1
    });
    c.running_on(vm)[0].clone()
}

/// The current leader, as all live hosts agree.
fn leader(c: &Cluster, hosts: &[&str]) -> String {
    let mut l = None;
    c.wait(
        "one leader all hosts agree on",
        Duration::from_secs(30),
        || {
            let seen: Vec<Option<String>> = hosts.iter().map(|h| c.leader(h)).collect();
            l = seen[0].clone();
            l.is_some() && seen.iter().all(|s| *s == l)
        },
    );
    l.unwrap()
}

/// Moves `vm` to `to` (two phases: stopped where it runs, then started there).
fn move_to(c: &Cluster, via: &str, vm: &str, to: &str) {
    c.command_ok(via, &json!({"command": "vm-move", "vm": vm, "to": to}));
    c.wait(&format!("{vm} online on {to}"), BOOT, || {
        c.online_on(to, vm)
    });
}

/// A host is killed → its VM starts on another host once the lease expired; then the
/// controller's own host is killed with a VM on it → another host is elected and finishes
/// that failover.
#[test]
fn host_loss_and_controller_loss() {
    let mut c = Cluster::new(&[VM], &[vm(VM, &["kvm1", "kvm2", "kvm3"], "")]);
    let mut live = vec!["kvm1", "kvm2", "kvm3"];
    let owner = placed(&c, VM);
    c.wait("shop online", BOOT, || c.online_on(&owner, VM));
    let l = leader(&c, &live);
    // 1. The VM's host is not the controller's: kill it.
    let owner = if owner == l {
        let other = live.iter().find(|h| **h != l).unwrap().to_string();
        move_to(&c, &l, VM, &other);
        other
    } else {
        owner
    };
    let t0 = Instant::now();
    c.kill_host(&owner);
    live.retain(|h| *h != owner);
    let new = placed(&c, VM);
    let started = t0.elapsed();
    c.wait("shop online elsewhere", BOOT, || c.online_on(&new, VM));
    println!(
        "LATENCY host killed → VM started on {new}: {} ms; → online: {} ms",
        started.as_millis(),
        t0.elapsed().as_millis()
    );
    assert_ne!(new, owner);

    // 2. The VM on the controller's host; kill that host.
    let l = leader(&c, &live);
    if new != l {
        move_to(&c, &new, VM, &l);
    }
    let t0 = Instant::now();
    // Two of three etcd members gone would leave no quorum: this host's member stays.
    c.kill_host_but_etcd(&l);
    live.retain(|h| *h != l);
    let survivor = live[0];
    c.wait("a new leader", Duration::from_secs(30), || {
        c.leader(survivor).is_some_and(|x| x != l)
    });
    let last = placed(&c, VM);
    c.wait("shop online on the survivor", BOOT, || {
        c.online_on(&last, VM)
    });
    println!(
        "LATENCY controller's host killed → VM online on {last}: {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(last, survivor);
    c.checker.assert_never_double();
}

/// A host cut off from the network (and so from etcd) kills its VMs before its lease can
/// expire (self-fencing), and only then does another host start them; it rejoins cleanly.
/// One etcd member lost: nothing fails over, nothing stops.
#[test]
fn cut_off_host_fences_and_etcd_member_loss_changes_nothing() {
    let c = Cluster::new(&[VM], &[vm(VM, &["kvm1", "kvm2", "kvm3"], "")]);
    let owner = placed(&c, VM);
    c.wait("shop online", BOOT, || c.online_on(&owner, VM));

    let t0 = Instant::now();
    c.bed.cut(&owner).unwrap();
    c.wait(
        "the cut-off host killed its VM",
        Duration::from_secs(10),
        || c.qemu_pid(&owner, VM).is_none(),
    );
    let fenced_after = t0.elapsed();
    c.wait(
        "the cut-off host reports fenced",
        Duration::from_secs(10),
        || {
            c.try_status(&owner)
                .is_some_and(|s| s["host_state"] == "fenced")
        },
    );
    let new = placed(&c, VM);
    let started_after = t0.elapsed();
    println!(
        "LATENCY host cut off → its VM killed: {} ms; → started on {new}: {} ms",
        fenced_after.as_millis(),
        started_after.as_millis()
    );
    assert_ne!(new, owner);
    c.wait("shop online elsewhere", BOOT, || c.online_on(&new, VM));
    println!("{}", c.events(&new, 60).join("\n"));

    // It comes back: a new lease, up again, leaves the VM where it is.
    c.bed.restore(&owner).unwrap();
    c.wait("the host rejoined", Duration::from_secs(30), || {
        c.try_status(&owner)
            .is_some_and(|s| s["host_state"] == "up")
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.running_on(VM), vec![new.clone()]);

    // One etcd member dies (not the owner's): nothing moves, nothing stops.
    let pid = c.qemu_pid(&new, VM).unwrap();
    let member = (0..3).find(|&i| c.bed.etcd_host(i) != new).unwrap();
    c.bed.kill_etcd(member).unwrap();
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(c.running_on(VM), vec![new.clone()]);
    assert_eq!(c.qemu_pid(&new, VM), Some(pid), "the VM was restarted");
    for h in ["kvm1", "kvm2", "kvm3"] {
        let s = c.status(h);
        assert_eq!(
            s["host_state"], "up",
            "{h} fenced with one etcd member down"
        );
    }
    c.bed.restart_etcd(member).unwrap();
    c.checker.assert_never_double();
}

/// Maintenance drains a host (its VM moves away, two phases); when maintenance ends, a VM with
/// `failback = true` moves back to its preferred host.
#[test]
fn maintenance_drain_and_failback() {
    let c = Cluster::new(&[VM], &[vm(VM, &["kvm1", "kvm2"], "failback = true")]);
    c.wait("shop online on kvm1", BOOT, || c.online_on("kvm1", VM));

    // Steady monitoring writes nothing: apps probed every second, no commit on any host.
    let commits = |c: &Cluster| -> Vec<u64> {
        ["kvm1", "kvm2", "kvm3"]
            .iter()
            .map(|h| c.status(h)["store"]["commits"].as_u64().unwrap())
            .collect()
    };
    let mut last = commits(&c);
    c.wait(
        "the store writes to settle",
        Duration::from_secs(30),
        || {
            std::thread::sleep(Duration::from_millis(1500));
            let now = commits(&c);
            std::mem::replace(&mut last, now.clone()) == now
        },
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        commits(&c),
        last,
        "commits during 5 s of steady probing (5 probes of each app)"
    );

    let t0 = Instant::now();
    c.command_ok(
        "kvm3",
        &json!({"command": "host-maintenance", "host": "kvm1", "on": true}),
    );
    c.wait("shop online on kvm2", BOOT, || c.online_on("kvm2", VM));
    println!(
        "LATENCY drain → VM online on kvm2: {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(c.running_on(VM), vec!["kvm2".to_string()]);
    c.command_ok(
        "kvm2",
        &json!({"command": "host-maintenance", "host": "kvm1", "on": false}),
    );
    c.wait("shop back on kvm1", BOOT, || c.online_on("kvm1", VM));
    assert_eq!(c.running_on(VM), vec!["kvm1".to_string()]);
    c.checker.assert_never_double();
}

/// vmhad restarted quickly (an upgrade, a crash): the VM keeps running, nothing moves. vmhad
/// stopped for good: its fence guard kills the VM before the lease can expire, and only then
/// another host starts it.
#[test]
fn a_restarted_vmhad_keeps_its_vms_and_a_stopped_one_is_fenced() {
    let mut c = Cluster::new(&[VM], &[vm(VM, &["kvm1", "kvm2", "kvm3"], "")]);
    let owner = placed(&c, VM);
    c.wait("shop online", BOOT, || c.online_on(&owner, VM));
    let pid = c.qemu_pid(&owner, VM).unwrap();

    // SIGKILL and an immediate restart: the lease is kept, the VM adopted.
    c.stop_vmhad(&owner, Signal::SIGKILL);
    c.start(&owner);
    c.wait_api(&owner);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(c.running_on(VM), vec![owner.clone()]);
    assert_eq!(c.qemu_pid(&owner, VM), Some(pid), "the VM was restarted");
    c.wait("shop adopted online", BOOT, || c.online_on(&owner, VM));

    // SIGTERM, no restart: the guard fences at ttl - fence_margin, then another host runs it.
    let t0 = Instant::now();
    c.stop_vmhad(&owner, Signal::SIGTERM);
    c.wait(
        "the stopped host's VM killed",
        Duration::from_secs(20),
        || c.qemu_pid(&owner, VM).is_none(),
    );
    let killed = t0.elapsed();
    let new = placed(&c, VM);
    println!(
        "LATENCY vmhad stopped → its VM killed by the guard: {} ms; → started on {new}: {} ms",
        killed.as_millis(),
        t0.elapsed().as_millis()
    );
    assert_ne!(new, owner);
    c.wait("shop online elsewhere", BOOT, || c.online_on(&new, VM));
    c.checker.assert_never_double();
}
