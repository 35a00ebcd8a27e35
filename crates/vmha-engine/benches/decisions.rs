//! App-state decisions for a VM with 10 apps: the decision agent alone (target ≥ 1,000,000/s),
//! the decision with its reason, and a whole monitor period through the host agent (a batched
//! probe of 10 apps answered, every app state updated, the decision agent consulted).
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vmha_engine::decision_agent::{AppView, decide, explain};
use vmha_engine::{
    Desired, HostActionKind, HostAgent, HostInput, OwnerRecord, ProbeOutcome, Record, Timestamp,
    VmObservation,
};
use vmha_model::{AppState, Config, Name, Policy, Tie};

const NAMES: [&str; 10] = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9"];

fn views() -> Vec<AppView<'static>> {
    let states = [
        AppState::Online,
        AppState::Faulted,
        AppState::Online,
        AppState::Offline,
        AppState::Restarting,
        AppState::Online,
        AppState::Faulted,
        AppState::Unknown,
        AppState::Online,
        AppState::Starting,
    ];
    NAMES
        .iter()
        .zip(states)
        .enumerate()
        .map(|(i, (name, state))| AppView {
            name,
            state,
            priority: 10 * (i as u32 + 1),
            critical: i == 6,
        })
        .collect()
}

fn config() -> String {
    let mut s = String::from(
        "[cluster]\nname = \"b\"\n[[host]]\nname = \"h\"\n[[vm]]\nname = \"v\"\nhosts = [\"h\"]\n\
         policy = \"weighted\"\n[vm.qemu]\nmemory_mb = 64\ndisk = \"/d.qcow2\"\n",
    );
    for (i, n) in NAMES.iter().enumerate() {
        s.push_str(&format!(
            "[[vm.app]]\nname = \"{n}\"\npriority = {}\ncheck = [\"c\"]\nstart = [\"s\"]\n",
            i + 1
        ));
    }
    s
}

fn bench(c: &mut Criterion) {
    let apps = views();
    let mut g = c.benchmark_group("decision_agent_10_apps");
    g.throughput(Throughput::Elements(1));
    for policy in [
        Policy::HighestPriority,
        Policy::Weighted,
        Policy::WeightedWithOffline,
        Policy::Critical,
    ] {
        g.bench_function(format!("decide/{policy:?}"), |b| {
            b.iter(|| decide(black_box(policy), Tie::Restart, black_box(&apps)))
        });
    }
    g.bench_function("explain/Weighted", |b| {
        b.iter(|| explain(black_box(Policy::Weighted), Tie::Restart, black_box(&apps)))
    });
    g.finish();

    // A whole monitor period through the host agent: 10 app states per period.
    let config = Arc::new(Config::from_toml_str(&config(), "b.toml").unwrap());
    let host = Name::new("h").unwrap();
    let vm = Name::new("v").unwrap();
    let mut agent = HostAgent::new(config, host.clone(), None, Timestamp(0)).unwrap();
    let t0 = Timestamp(0);
    agent.handle_input(t0, HostInput::Lease { live: true });
    agent.handle_record(
        t0,
        &Record::Owner {
            vm: vm.clone(),
            record: Some(OwnerRecord {
                owner: Some(host),
                desired: Desired::Run,
                move_to: None,
                parked: false,
                migrate: None,
            }),
            revision: 1,
        },
    );
    agent.handle_input(
        t0,
        HostInput::VmObserved {
            vm: vm.clone(),
            kind: VmObservation::Running,
        },
    );
    while agent.poll_action().is_some() {}
    while agent.poll_event().is_some() {}
    let outcomes: Vec<(Name, ProbeOutcome)> = NAMES
        .iter()
        .map(|n| (Name::new(n).unwrap(), ProbeOutcome::Running))
        .collect();
    let mut now = t0;
    let mut g = c.benchmark_group("host_agent_monitor_period_10_apps");
    g.throughput(Throughput::Elements(10));
    g.bench_function("probe_and_result", |b| {
        b.iter(|| {
            now = agent.poll_timeout().unwrap_or(now).max(now);
            agent.handle_timeout(now);
            let mut id = None;
            let mut pings = Vec::new();
            while let Some(a) = agent.poll_action() {
                match a.kind {
                    HostActionKind::Probe { .. } => id = Some(a.id),
                    HostActionKind::PingGuest { .. } => pings.push(a.id),
                    _ => {}
                }
            }
            for id in pings {
                agent.handle_input(now, HostInput::ActionResult { id, result: Ok(()) });
            }
            if let Some(id) = id {
                agent.handle_input(
                    now,
                    HostInput::ProbeResult {
                        id,
                        vm: vm.clone(),
                        outcomes: outcomes.clone(),
                    },
                );
            }
            while agent.poll_event().is_some() {}
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
