//! `vmha simulate --from-cluster` against a real vmhad running the test guest (a TCG VM: run
//! under the heavy-test lock): the simulation starts from the cluster's state as vmhad hands
//! it out (`GET /v1/snapshot`) — where the VM runs, the restart budget already used, the
//! freeze flag — and the live cluster is left untouched.
//!
//! Needs the `vmha` binary next to vmhad (`cargo build -p vmha`).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Vmhad, vm_test_lock};
use serde_json::{Value, json};

const VM: &str = "shop";

fn vmha_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_vmhad")).with_file_name("vmha");
    assert!(
        path.is_file(),
        "this test needs vmha next to vmhad: run `cargo build -p vmha` first"
    );
    path
}

/// `vmha simulate --from-cluster SCRIPT --json` against `h`: the exit code and the outcome.
fn simulate(h: &Vmhad, script: &str) -> (Option<i32>, Value) {
    let file = h.config.with_file_name("what-if.txt");
    std::fs::write(&file, script).unwrap();
    let out = Command::new(vmha_binary())
        .arg("--socket")
        .arg(h.socket())
        .args(["simulate", "--from-cluster", "--json"])
        .arg(&file)
        .env_remove("VMHA_SOCKET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let outcome = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "vmha simulate printed no JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), outcome)
}

/// The log lines the script produced.
fn script_log(outcome: &Value) -> Vec<String> {
    let from = outcome["script_from"].as_u64().unwrap() as usize;
    outcome["log"].as_array().unwrap()[from..]
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

fn placement(outcome: &Value) -> Value {
    outcome["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == VM)
        .cloned()
        .unwrap()
}

fn worker_restarts(h: &Vmhad) -> u64 {
    h.app_status(VM, "worker")["restarts_in_window"]
        .as_u64()
        .unwrap()
}

#[test]
fn from_cluster_starts_from_the_live_state_and_leaves_it_alone() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&[VM]);
    h.start();
    let (i, _) = h.wait_for(0, VM, "starting", "online");
    h.wait_for_event(i, "the controller's view: VM online", |e| {
        e.origin == "controller" && e.object == VM && e.to == "online"
    });

    // One of worker's two restarts is used up on the live cluster.
    let m = h.mark();
    assert_eq!(h.app(VM, "kill", "worker"), 0);
    h.wait_for(m, "shop/worker", "online", "restarting");
    h.wait_for(m, "shop/worker", "restarting", "online");
    assert_eq!(worker_restarts(&h), 1);
    let qemu = h.qemu_pid(VM);
    let quiet = h.mark();

    // What if worker fails again, twice? The simulation counts from the live budget: its next
    // restart is the 2nd of 2, and the one after that finds the budget spent.
    let (code, outcome) = simulate(
        &h,
        "+1s app-fail shop worker\n+10s tick\n+1s app-fail shop worker\n+10s tick\n",
    );
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["source"]["kind"], "cluster");
    assert_eq!(outcome["source"]["host"], "kvm1");
    assert_eq!(outcome["violations"], json!([]));
    let log = script_log(&outcome).join("\n");
    assert!(
        log.contains("kvm1 shop/worker online → restarting: check exited 3; restart 2/2 in"),
        "{log}"
    );
    assert!(log.contains("restart budget 2/2 in"), "{log}");
    let restore = outcome["log"].as_array().unwrap()
        [..outcome["script_from"].as_u64().unwrap() as usize]
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        restore.contains("kvm1 shop unknown → online: VM already running here: adopted"),
        "{restore}"
    );
    let shop = placement(&outcome);
    assert_eq!(shop["owner"], "kvm1");
    assert_eq!(shop["running_on"], json!(["kvm1"]));
    assert_eq!(shop["frozen"], false);

    // The live cluster did not notice.
    assert_eq!(worker_restarts(&h), 1);
    assert_eq!(h.qemu_pid(VM), qemu);
    assert_eq!(h.app_status(VM, "worker")["state"], "online");
    assert!(
        !h.since(quiet).iter().any(|e| e.object.starts_with(VM)),
        "{}",
        h.events_text(quiet)
    );

    // Frozen on the live cluster: frozen in the simulation, where nothing acts on it.
    h.command_ok(&json!({"command": "freeze", "vm": VM}));
    let (code, outcome) = simulate(&h, "+1s app-fail shop worker\n+10s tick\n");
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(placement(&outcome)["frozen"], true);
    let log = script_log(&outcome).join("\n");
    assert!(!log.contains("action start-app"), "{log}");
    assert_eq!(outcome["violations"], json!([]));
}
