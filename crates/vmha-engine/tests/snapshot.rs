//! `Sim::from_snapshot`: a simulation started from a cluster's state (what `vmha simulate
//! --from-cluster` does) carries its placements, flags, maintenance and budget counters, and
//! goes on from there as the original cluster would; an impossible state is reported.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use vmha_engine::sim::{ClusterSnapshot, Placement, Sim};
use vmha_model::{Config, HostState};

fn example() -> Arc<Config> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-hosts-etcd.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    Arc::new(Config::from_toml_str(&text, "three-hosts-etcd.toml").unwrap())
}

/// Where each VM is, without the cluster-wide state (a restored controller may still be
/// catching up on reports when the two are compared).
fn where_(p: &[Placement]) -> Vec<String> {
    p.iter()
        .map(|v| {
            format!(
                "{} owner={:?} desired={:?} on={:?} frozen={}",
                v.vm, v.owner, v.desired, v.running_on, v.frozen
            )
        })
        .collect()
}

fn restarts_of(sim: &Sim, host: &str, vm: &str, app: &str) -> u32 {
    let status = sim.agent(host).unwrap().status();
    let vm = status.vms.iter().find(|v| v.name.as_str() == vm).unwrap();
    vm.apps
        .iter()
        .find(|a| a.name.as_str() == app)
        .unwrap()
        .restarts_in_window
}

#[test]
fn a_restored_cluster_keeps_placements_flags_maintenance_and_budgets() {
    let config = example();
    let mut live = Sim::new(Arc::clone(&config)).unwrap();
    live.run_script(
        "+10s admin maintenance kvm3 on\n\
         +10s admin freeze app01\n\
         +1s app-fail db01 postgres\n\
         +10s tick\n",
    )
    .unwrap();
    assert!(live.violations().is_empty(), "{:?}", live.violations());
    assert_eq!(restarts_of(&live, "kvm1", "db01", "postgres"), 1);
    let snapshot = live.snapshot();

    // Through its wire form, as vmhad hands it out.
    let wire = serde_json::to_string(&snapshot).unwrap();
    let snapshot: ClusterSnapshot = serde_json::from_str(&wire).unwrap();
    let mut restored = Sim::from_snapshot(Arc::clone(&config), &snapshot).unwrap();

    assert!(
        restored.violations().is_empty(),
        "{:?}",
        restored.violations()
    );
    assert_eq!(restored.now(), live.now());
    assert_eq!(where_(&restored.placements()), where_(&live.placements()));
    let kvm3 = restored.host_lines().into_iter().nth(2).unwrap();
    assert_eq!(kvm3.state, Some(HostState::Maintenance));
    assert!(
        restored
            .placements()
            .iter()
            .any(|p| p.vm.as_str() == "app01" && p.frozen)
    );
    // The legacy VM was drained off kvm3 to kvm1 before the snapshot, and stays there.
    let legacy = restored
        .placements()
        .into_iter()
        .find(|p| p.vm.as_str() == "legacy")
        .unwrap();
    assert_eq!(legacy.running_on.len(), 1);
    assert_eq!(legacy.running_on[0].as_str(), "kvm1");
    assert_eq!(restarts_of(&restored, "kvm1", "db01", "postgres"), 1);

    // The same what-if on both ends in the same place.
    let what_if = "+1s host-crash kvm1\n+20s tick\n";
    live.run_script(what_if).unwrap();
    restored.run_script(what_if).unwrap();
    assert!(
        restored.violations().is_empty(),
        "{:?}",
        restored.violations()
    );
    assert_eq!(where_(&restored.placements()), where_(&live.placements()));
    let db01 = restored
        .placements()
        .into_iter()
        .find(|p| p.vm.as_str() == "db01")
        .unwrap();
    assert_eq!(db01.running_on.len(), 1);
    assert_eq!(db01.running_on[0].as_str(), "kvm2");
}

#[test]
fn a_restored_host_that_is_down_stays_down_until_recovered() {
    let config = example();
    let mut live = Sim::new(Arc::clone(&config)).unwrap();
    live.run_script("+5s host-crash kvm3\n+10s tick\n").unwrap();
    let mut restored = Sim::from_snapshot(Arc::clone(&config), &live.snapshot()).unwrap();
    let kvm3 = restored.host_lines().into_iter().nth(2).unwrap();
    assert!(!kvm3.running);
    assert_eq!(kvm3.state, Some(HostState::Down));
    restored
        .run_script("+1s host-recover kvm3\n+5s tick\n")
        .unwrap();
    let kvm3 = restored.host_lines().into_iter().nth(2).unwrap();
    assert!(kvm3.running);
    assert_eq!(kvm3.state, Some(HostState::Up));
    assert!(
        restored.violations().is_empty(),
        "{:?}",
        restored.violations()
    );
}

#[test]
fn a_snapshot_with_a_vm_on_two_hosts_is_reported_as_a_violation() {
    let config = example();
    let mut live = Sim::new(Arc::clone(&config)).unwrap();
    live.run_script("+5s tick\n").unwrap();
    let mut wire = serde_json::to_value(live.snapshot()).unwrap();
    // kvm2 also claims to run db01 (which runs on kvm1).
    let records = wire["records"].as_array_mut().unwrap();
    let kvm2 = records
        .iter_mut()
        .find(|r| r["kind"] == "agent" && r["host"] == "kvm2")
        .unwrap();
    kvm2["state"]["agent"]["vms"]["db01"] = serde_json::json!({ "running": true });
    let snapshot: ClusterSnapshot = serde_json::from_value(wire).unwrap();
    let restored = Sim::from_snapshot(config, &snapshot).unwrap();
    assert!(
        restored
            .violations()
            .iter()
            .any(|v| v.contains("db01 runs on kvm1 and kvm2")),
        "{:?}",
        restored.violations()
    );
}

/// The live cluster's daemons run since long: a what-if places a VM at once, with no
/// cold-start wait (`startup_wait`) for a preferred host that is down.
#[test]
fn a_restored_controller_does_not_wait_as_at_a_cold_start() {
    let config = example();
    let mut live = Sim::new(Arc::clone(&config)).unwrap();
    live.run_script("+5s admin vm-stop legacy\n+5s host-crash kvm3\n+10s tick\n")
        .unwrap();
    let mut restored = Sim::from_snapshot(Arc::clone(&config), &live.snapshot()).unwrap();
    restored
        .run_script("+1s admin vm-start legacy\n+1s tick\n")
        .unwrap();
    let legacy = restored
        .placements()
        .into_iter()
        .find(|p| p.vm.as_str() == "legacy")
        .unwrap();
    assert_eq!(
        legacy.owner.as_ref().map(|o| o.as_str()),
        Some("kvm1"),
        "{legacy:?}"
    );
}
