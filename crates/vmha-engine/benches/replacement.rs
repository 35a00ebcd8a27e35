//! The controller's re-placement after a host loss in a simulated 1,000-host, 10,000-VM
//! cluster (target ≤ 50 ms): time from the "lease expired" input to every CAS decided; and
//! the newly elected controller's intake of the whole cluster (leases, records, reports).
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use vmha_engine::{
    Controller, ControllerActionKind, ControllerInput, Desired, OwnerRecord, Timestamp, VmReport,
};
use vmha_model::{Config, Name, VmState};

const HOSTS: usize = 1_000;
const VMS: usize = 10_000;

fn config() -> String {
    config_with(|v| vec![v % HOSTS, (v + 1) % HOSTS, (v + 7) % HOSTS])
}

/// VM `v` may run on `hosts(v)` (indices), in priority order.
fn config_with(hosts: impl Fn(usize) -> Vec<usize>) -> String {
    let mut s = String::from(
        "[cluster]\nname = \"big\"\nstore = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n",
    );
    for h in 0..HOSTS {
        s.push_str(&format!("[[host]]\nname = \"h{h}\"\nmemory_mb = 65536\n"));
    }
    for v in 0..VMS {
        let placement = if v % 2 == 0 {
            "priority"
        } else {
            "least-loaded"
        };
        let list: Vec<String> = hosts(v).iter().map(|h| format!("\"h{h}\"")).collect();
        s.push_str(&format!(
            "[[vm]]\nname = \"v{v}\"\nhosts = [{}]\nplacement = \"{placement}\"\n\
             [vm.qemu]\nmemory_mb = 1024\ndisk = \"/d/v{v}.qcow2\"\n\
             [[vm.app]]\nname = \"app\"\ncheck = [\"c\"]\nstart = [\"s\"]\n",
            list.join(", ")
        ));
    }
    s
}

/// Every host up, VM `i` online on host `i % HOSTS`, fed as one batch (the election listing).
fn steady(config: Arc<Config>) -> Controller {
    steady_on(config, |v| v % HOSTS)
}

/// Every host up, VM `v` online on host `owner(v)` (admin record absent: desired run), fed as
/// one batch.
fn steady_on(config: Arc<Config>, owner: impl Fn(usize) -> usize) -> Controller {
    let mut c = Controller::new(config, None, Timestamp(0));
    let mut inputs = Vec::new();
    for h in 0..HOSTS {
        inputs.push(ControllerInput::HostLease {
            host: Name::new(&format!("h{h}")).unwrap(),
            up: true,
            incarnation: 1,
        });
    }
    for v in 0..VMS {
        let vm = Name::new(&format!("v{v}")).unwrap();
        let host = Name::new(&format!("h{}", owner(v))).unwrap();
        inputs.push(ControllerInput::Ownership {
            vm: vm.clone(),
            record: Some(OwnerRecord {
                owner: Some(host.clone()),
                desired: Desired::Run,
                move_to: None,
                parked: false,
                migrate: None,
            }),
            revision: 1,
        });
        inputs.push(ControllerInput::Admin {
            vm: vm.clone(),
            admin: None,
        });
        inputs.push(ControllerInput::Report {
            incarnation: 1,
            host,
            vm,
            report: VmReport {
                state: VmState::Online,
                running: true,
                reason: "online".into(),
                revision: 1,
                migration: None,
            },
        });
    }
    c.handle_inputs(Timestamp(1), inputs);
    assert!(
        c.poll_action().is_none(),
        "a steady cluster needs no action"
    );
    while c.poll_event().is_some() {}
    c
}

fn bench(c: &mut Criterion) {
    let config = Arc::new(Config::from_toml_str(&config(), "big.toml").unwrap());
    let base = steady(config.clone());
    let lost = Name::new("h0").unwrap();
    let mut g = c.benchmark_group("controller_1000_hosts_10000_vms");
    g.sample_size(10);
    g.bench_function("replace_after_host_loss", |b| {
        b.iter_batched(
            || base.clone(),
            |mut ctl| {
                ctl.handle_input(
                    Timestamp(10_000),
                    ControllerInput::HostLease {
                        host: lost.clone(),
                        up: false,
                        incarnation: 1,
                    },
                );
                let mut cas = 0;
                while let Some(a) = ctl.poll_action() {
                    if let ControllerActionKind::CasOwner { .. } = a.kind {
                        cas += 1;
                    }
                }
                assert_eq!(cas, VMS / HOSTS);
                ctl
            },
            BatchSize::LargeInput,
        )
    });
    // Half the cluster dies at once: hosts h0..h499 held all 10,000 VMs (20 each), whose second
    // choice is h500..h999. Time from the 500 lease expirations to all 10,000 CAS decided.
    let half = HOSTS / 2;
    let pairs = Arc::new(
        Config::from_toml_str(
            &config_with(|v| vec![v % half, half + v % half]),
            "pairs.toml",
        )
        .unwrap(),
    );
    let crowded = steady_on(pairs, |v| v % half);
    let lost_half: Vec<ControllerInput> = (0..half)
        .map(|h| ControllerInput::HostLease {
            host: Name::new(&format!("h{h}")).unwrap(),
            up: false,
            incarnation: 1,
        })
        .collect();
    g.bench_function("replace_10000_vms_after_losing_500_hosts", |b| {
        b.iter_batched(
            || (crowded.clone(), lost_half.clone()),
            |(mut ctl, lost)| {
                ctl.handle_inputs(Timestamp(10_000), lost);
                let mut cas = 0;
                while let Some(a) = ctl.poll_action() {
                    if let ControllerActionKind::CasOwner { .. } = a.kind {
                        cas += 1;
                    }
                }
                assert_eq!(cas, VMS);
                ctl
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("election_listing_31000_inputs", |b| {
        b.iter(|| steady(config.clone()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
