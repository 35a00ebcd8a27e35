//! Fuzz-style harness (cargo-fuzz needs nightly): arbitrary input, command and timeout
//! sequences — unknown names, stale and random action ids, odd timestamps — fed straight into
//! a host agent and a controller must never panic, and their persistent state must round-trip
//! through serde into a working engine; a refused admin command changes nothing.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use proptest::prelude::*;
use vmha_engine::{
    ActionId, AdminCommand, Controller, ControllerInput, ControllerState, Desired, HostAgent,
    HostAgentState, HostInput, OwnerRecord, ProbeOutcome, Timestamp, VmObservation, VmReport,
};
use vmha_model::{Config, Name, Policy, Tie, VmState};

const CONFIG: &str = r#"
[cluster]
name = "f"
store = "etcd"
endpoints = ["http://127.0.0.1:2379"]
[[host]]
name = "h0"
memory_mb = 1024
[[host]]
name = "h1"
[[vm]]
name = "v0"
hosts = ["h0", "h1"]
failback = true
requires = ["v1"]
[vm.qemu]
memory_mb = 512
disk = "/d/v0.qcow2"
[[vm.app]]
name = "a0"
check = ["c"]
start = ["s"]
stop = ["t"]
[[vm.app]]
name = "a1"
requires = ["a0"]
check = ["c"]
start = ["s"]
probe_failures = 1
[[vm]]
name = "v1"
hosts = ["h0"]
policy = "weighted"
[vm.qemu]
memory_mb = 256
disk = "/d/v1.qcow2"
[[vm.app]]
name = "a0"
check = ["c"]
start = ["s"]
stop = ["t"]
"#;

fn name() -> impl Strategy<Value = Name> {
    prop_oneof![
        Just("v0"),
        Just("v1"),
        Just("v9"),
        Just("a0"),
        Just("a1"),
        Just("h0"),
        Just("h1"),
        Just("h9")
    ]
    .prop_map(|s| Name::new(s).unwrap())
}

fn outcome() -> impl Strategy<Value = ProbeOutcome> {
    prop_oneof![
        Just(ProbeOutcome::Running),
        any::<i32>().prop_map(|exit| ProbeOutcome::NotRunning { exit }),
        Just(ProbeOutcome::TimedOut),
    ]
}

fn observation() -> impl Strategy<Value = VmObservation> {
    prop_oneof![
        Just(VmObservation::Running),
        any::<bool>().prop_map(|by_guest| VmObservation::Stopped { by_guest }),
        Just(VmObservation::Reset),
        Just(VmObservation::Paused),
        Just(VmObservation::Resumed),
        Just(VmObservation::Panicked),
        Just(VmObservation::Gone),
    ]
}

fn host_input() -> impl Strategy<Value = HostInput> {
    let id = (0u64..40).prop_map(ActionId);
    prop_oneof![
        (
            id.clone(),
            name(),
            proptest::collection::vec((name(), outcome()), 0..4)
        )
            .prop_map(|(id, vm, outcomes)| HostInput::ProbeResult { id, vm, outcomes }),
        name().prop_map(|vm| HostInput::GuestUnreachable { vm }),
        (id, proptest::option::of(".{0,8}")).prop_map(|(id, e)| HostInput::ActionResult {
            id,
            result: e.map_or(Ok(()), Err)
        }),
        (name(), observation()).prop_map(|(vm, kind)| HostInput::VmObserved { vm, kind }),
        (name(), any::<bool>()).prop_map(|(vm, up)| HostInput::GuestChannel { vm, up }),
        any::<bool>().prop_map(|live| HostInput::Lease { live }),
        (name(), proptest::option::of(name()), any::<bool>(), 0u64..5).prop_map(
            |(vm, owner, run, revision)| HostInput::Ownership {
                vm,
                owner,
                desired: if run { Desired::Run } else { Desired::Stop },
                revision,
            }
        ),
    ]
}

fn command() -> impl Strategy<Value = AdminCommand> {
    prop_oneof![
        (name(), name(), any::<bool>()).prop_map(|(vm, app, auto_clear)| {
            AdminCommand::AppOffline {
                vm,
                app,
                auto_clear,
            }
        }),
        (name(), name()).prop_map(|(vm, app)| AdminCommand::AppOnline { vm, app }),
        (name(), name()).prop_map(|(vm, app)| AdminCommand::AppStart { vm, app }),
        (name(), name()).prop_map(|(vm, app)| AdminCommand::AppStop { vm, app }),
        name().prop_map(|vm| AdminCommand::VmStart { vm }),
        name().prop_map(|vm| AdminCommand::VmStop { vm }),
        name().prop_map(|vm| AdminCommand::VmRestart { vm }),
        (name(), name()).prop_map(|(vm, to)| AdminCommand::VmMove { vm, to }),
        (name(), any::<bool>()).prop_map(|(host, on)| AdminCommand::HostMaintenance { host, on }),
        name().prop_map(|vm| AdminCommand::Freeze { vm }),
        name().prop_map(|vm| AdminCommand::Unfreeze { vm }),
        name().prop_map(|vm| AdminCommand::Clear { vm }),
        (name(), name(), any::<u32>()).prop_map(|(vm, app, priority)| AdminCommand::SetPriority {
            vm,
            app,
            priority
        }),
        (name(), name(), any::<u32>(), any::<u64>()).prop_map(
            |(vm, app, restart_limit, restart_window_ms)| AdminCommand::SetAppBudget {
                vm,
                app,
                restart_limit,
                restart_window_ms
            }
        ),
        (name(), any::<u32>(), any::<u64>()).prop_map(
            |(vm, vm_restart_limit, vm_restart_window_ms)| AdminCommand::SetVmBudget {
                vm,
                vm_restart_limit,
                vm_restart_window_ms
            }
        ),
        (
            name(),
            prop_oneof![
                Just(Policy::HighestPriority),
                Just(Policy::Weighted),
                Just(Policy::WeightedWithOffline),
                Just(Policy::Critical)
            ],
            proptest::option::of(prop_oneof![Just(Tie::Restart), Just(Tie::NoAction)])
        )
            .prop_map(|(vm, policy, tie)| AdminCommand::SetPolicy { vm, policy, tie }),
    ]
}

fn ctl_input() -> impl Strategy<Value = ControllerInput> {
    let state = prop_oneof![
        Just(VmState::Online),
        Just(VmState::Offline),
        Just(VmState::Faulted),
        Just(VmState::Starting),
        Just(VmState::Unknown)
    ];
    prop_oneof![
        (name(), any::<bool>()).prop_map(|(host, up)| ControllerInput::HostLease { host, up }),
        (name(), any::<u64>())
            .prop_map(|(host, memory_mb)| ControllerInput::HostCapacity { host, memory_mb }),
        (name(), name(), state, any::<bool>(), 0u64..6).prop_map(
            |(host, vm, state, running, revision)| ControllerInput::Report {
                host,
                vm,
                report: VmReport {
                    state,
                    running,
                    reason: String::new(),
                    revision
                },
            }
        ),
        (
            name(),
            proptest::option::of((
                proptest::option::of(name()),
                any::<bool>(),
                proptest::option::of(name()),
                any::<bool>()
            )),
            0u64..6
        )
            .prop_map(|(vm, rec, revision)| ControllerInput::Ownership {
                vm,
                record: rec.map(|(owner, run, move_to, parked)| OwnerRecord {
                    owner,
                    desired: if run { Desired::Run } else { Desired::Stop },
                    move_to,
                    parked,
                }),
                revision,
            }),
        ((0u64..40).prop_map(ActionId), proptest::option::of(0u64..8))
            .prop_map(|(id, revision)| ControllerInput::CasResult { id, revision }),
    ]
}

#[derive(Debug, Clone)]
enum HostStep {
    Input(HostInput),
    Command(AdminCommand),
    Wait(u64),
}

#[derive(Debug, Clone)]
enum CtlStep {
    Input(ControllerInput),
    Command(AdminCommand),
    Wait(u64),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn host_agent_never_panics(steps in proptest::collection::vec(prop_oneof![
        4 => host_input().prop_map(HostStep::Input),
        1 => command().prop_map(HostStep::Command),
        2 => (0u64..200_000).prop_map(HostStep::Wait),
    ], 0..80)) {
        let config = Arc::new(Config::from_toml_str(CONFIG, "f.toml").unwrap());
        let host = Name::new("h0").unwrap();
        let mut agent = HostAgent::new(config.clone(), host.clone(), None, Timestamp(5)).unwrap();
        let mut now = Timestamp(5);
        for step in steps {
            match step {
                HostStep::Input(i) => agent.handle_input(now, i),
                HostStep::Command(c) => {
                    let (state, status) = (agent.state(), agent.status());
                    if agent.command(now, c).is_err() {
                        // Refused: nothing changed, nothing to do.
                        prop_assert_eq!(agent.state(), state);
                        prop_assert_eq!(agent.status(), status);
                        prop_assert!(agent.poll_action().is_none());
                        prop_assert!(agent.poll_event().is_none());
                    }
                }
                HostStep::Wait(ms) => {
                    now = now.plus_ms(ms);
                    if agent.poll_timeout().is_some_and(|t| t <= now) {
                        agent.handle_timeout(now);
                    }
                }
            }
            while agent.poll_action().is_some() {}
            while agent.poll_event().is_some() {}
            let _ = agent.status();
        }
        let json = serde_json::to_string(&agent.state()).unwrap();
        let back: HostAgentState = serde_json::from_str(&json).unwrap();
        let restored = HostAgent::new(config, host, Some(back.clone()), now).unwrap();
        prop_assert_eq!(restored.state(), back);
    }

    #[test]
    fn controller_never_panics(steps in proptest::collection::vec(prop_oneof![
        4 => ctl_input().prop_map(CtlStep::Input),
        1 => command().prop_map(CtlStep::Command),
        1 => (0u64..4_000_000).prop_map(CtlStep::Wait),
    ], 0..80)) {
        let config = Arc::new(Config::from_toml_str(CONFIG, "f.toml").unwrap());
        let mut ctl = Controller::new(config.clone(), None, Timestamp(0));
        let mut now = Timestamp(0);
        for step in steps {
            match step {
                CtlStep::Input(i) => ctl.handle_input(now, i),
                CtlStep::Command(c) => {
                    let (state, status) = (ctl.state(), ctl.status());
                    if ctl.command(now, c).is_err() {
                        prop_assert_eq!(ctl.state(), state);
                        prop_assert_eq!(ctl.status(), status);
                        prop_assert!(ctl.poll_action().is_none());
                        prop_assert!(ctl.poll_event().is_none());
                    }
                }
                CtlStep::Wait(ms) => {
                    now = now.plus_ms(ms);
                    if ctl.poll_timeout().is_some_and(|t| t <= now) {
                        ctl.handle_timeout(now);
                    }
                }
            }
            while ctl.poll_action().is_some() {}
            while ctl.poll_event().is_some() {}
            let _ = ctl.status();
        }
        let json = serde_json::to_string(&ctl.state()).unwrap();
        let back: ControllerState = serde_json::from_str(&json).unwrap();
        let restored = Controller::new(config, Some(back.clone()), now);
        prop_assert_eq!(restored.state(), back);
    }
}
