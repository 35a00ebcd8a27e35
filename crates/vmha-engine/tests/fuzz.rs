//! Fuzz-style harness (cargo-fuzz needs nightly): arbitrary input, record, command, timeout and
//! commit-outcome sequences — unknown names, stale and random action ids, odd timestamps,
//! failing and fenced commits — fed straight into a node (the core vmhad runs) and a
//! controller must never panic; their persistent state must round-trip through serde into a
//! working engine; a command refused by the engine or undone by a failed commit changes
//! nothing; every command is answered exactly once.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use proptest::prelude::*;
use std::collections::BTreeMap;

use vmha_engine::{
    ActionError, ActionId, AdminCommand, AppSettings, CommandError, CommandOrigin, Commit,
    Controller, ControllerInput, ControllerState, Desired, ExitStatus, HostInput, HostMember,
    HostReport, Node, NodeInput, NodeState, OwnerRecord, PauseReason, ProbeOutcome, Record,
    Timestamp, Unreadable, VmAdmin, VmObservation, VmReport, VmSettings,
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
        any::<i32>().prop_map(|c| ProbeOutcome::NotRunning(ExitStatus::Code(c))),
        any::<i32>().prop_map(|s| ProbeOutcome::NotRunning(ExitStatus::Signal(s))),
        Just(ProbeOutcome::TimedOut),
        Just(ProbeOutcome::Unreadable(Unreadable::Missing)),
    ]
}

fn observation() -> impl Strategy<Value = VmObservation> {
    prop_oneof![
        Just(VmObservation::Running),
        any::<bool>().prop_map(|by_guest| VmObservation::Stopped { by_guest }),
        Just(VmObservation::Reset),
        prop_oneof![
            Just(PauseReason::Admin),
            Just(PauseReason::Debug),
            Just(PauseReason::IoError),
            Just(PauseReason::GuestPanicked),
            Just(PauseReason::Migration),
            Just(PauseReason::Other),
        ]
        .prop_map(|reason| VmObservation::Paused { reason }),
        Just(VmObservation::Resumed),
        Just(VmObservation::Panicked),
        Just(VmObservation::Gone),
        Just(VmObservation::Unresponsive),
    ]
}

fn action_error() -> impl Strategy<Value = ActionError> {
    let detail = ".{0,8}";
    prop_oneof![
        detail.prop_map(|detail| ActionError::ExecBlocked { detail }),
        detail.prop_map(|detail| ActionError::GuestUnreachable { detail }),
        detail.prop_map(|detail| ActionError::GuestHostile { detail }),
        (proptest::option::of(any::<i32>()), detail).prop_map(|(code, stderr)| {
            ActionError::CommandFailed {
                status: code.map(ExitStatus::Code),
                stderr,
            }
        }),
        any::<u64>().prop_map(|after_ms| ActionError::CommandTimedOut { after_ms }),
        detail.prop_map(|detail| ActionError::Driver { detail }),
        detail.prop_map(|detail| ActionError::NotConfigured { detail }),
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
        (id, proptest::option::of(action_error())).prop_map(|(id, e)| HostInput::ActionResult {
            id,
            result: e.map_or(Ok(()), Err)
        }),
        (name(), observation()).prop_map(|(vm, kind)| HostInput::VmObserved { vm, kind }),
        any::<bool>().prop_map(|live| HostInput::Lease { live }),
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
        (name(), name()).prop_map(|(vm, to)| AdminCommand::VmMove {
            vm,
            to,
            restart: false
        }),
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
        (name(), any::<bool>(), 0u64..3).prop_map(|(host, up, incarnation)| {
            ControllerInput::HostLease {
                host,
                up,
                incarnation,
            }
        }),
        (name(), any::<u64>())
            .prop_map(|(host, memory_mb)| ControllerInput::HostCapacity { host, memory_mb }),
        (name(), name(), state, any::<bool>(), 0u64..6).prop_map(
            |(host, vm, state, running, revision)| ControllerInput::Report {
                host,
                incarnation: revision % 3,
                vm,
                report: VmReport {
                    state,
                    running,
                    reason: String::new(),
                    revision,
                    migration: None,
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
                    migrate: None,
                }),
                revision,
            }),
        ((0u64..40).prop_map(ActionId), proptest::option::of(0u64..8))
            .prop_map(|(id, revision)| ControllerInput::CasResult { id, revision }),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    let desired = any::<bool>().prop_map(|run| if run { Desired::Run } else { Desired::Stop });
    prop_oneof![
        (
            name(),
            proptest::option::of(proptest::option::of(1u64..9000))
        )
            .prop_map(|(host, member)| Record::Host {
                host,
                member: member.map(|memory_mb| HostMember {
                    memory_mb,
                    incarnation: 1
                }),
            }),
        (
            name(),
            proptest::option::of((
                proptest::option::of(name()),
                desired.clone(),
                proptest::option::of(name()),
                any::<bool>()
            )),
            0u64..6
        )
            .prop_map(|(vm, rec, revision)| Record::Owner {
                vm,
                record: rec.map(|(owner, desired, move_to, parked)| OwnerRecord {
                    owner,
                    desired,
                    move_to,
                    parked,
                    migrate: None,
                }),
                revision,
            }),
        (
            name(),
            proptest::option::of((desired, any::<bool>(), 0u64..3))
        )
            .prop_map(|(vm, a)| Record::Admin {
                vm,
                admin: a.map(|(desired, frozen, clear)| VmAdmin {
                    desired,
                    frozen,
                    clear
                }),
            }),
        (
            name(),
            proptest::option::of((name(), any::<bool>(), 0u32..300))
        )
            .prop_map(|(vm, s)| Record::Settings {
                vm,
                settings: s.map(|(app, offline, priority)| {
                    let mut apps = BTreeMap::new();
                    apps.insert(
                        app,
                        AppSettings {
                            offline: offline
                                .then_some(vmha_engine::OfflineFlag { auto_clear: true }),
                            priority: Some(priority),
                            ..AppSettings::default()
                        },
                    );
                    VmSettings {
                        apps,
                        ..VmSettings::default()
                    }
                }),
            }),
        (name(), name(), any::<bool>(), 0u64..6).prop_map(|(vm, host, running, revision)| {
            Record::Report {
                vm,
                report: Some(HostReport {
                    host,
                    incarnation: revision % 2,
                    report: VmReport {
                        state: VmState::Online,
                        running,
                        reason: String::new(),
                        revision,
                        migration: None,
                    },
                }),
            }
        }),
    ]
}

fn node_input() -> impl Strategy<Value = NodeInput> {
    prop_oneof![
        6 => host_input().prop_map(NodeInput::Host),
        3 => (proptest::collection::vec(record(), 0..5), any::<bool>())
            .prop_map(|(records, full)| NodeInput::Records { records, full }),
        1 => proptest::option::of(1u64..4).prop_map(NodeInput::Leadership),
        1 => ((0u64..40).prop_map(ActionId), proptest::option::of(0u64..8))
            .prop_map(|(id, revision)| NodeInput::CasResult { id, revision }),
    ]
}

fn commit() -> impl Strategy<Value = Commit> {
    prop_oneof![
        6 => Just(Commit::Ok),
        2 => ".{0,6}".prop_map(Commit::Failed),
        1 => Just(Commit::Deposed),
    ]
}

#[derive(Debug, Clone)]
enum CtlStep {
    Input(ControllerInput),
    Command(AdminCommand),
    Wait(u64),
}

#[derive(Debug, Clone)]
enum NodeStep {
    Input(NodeInput),
    Command(bool, AdminCommand),
    Wait(u64),
    Ready(Commit),
}

/// What a node persists, for comparisons.
fn persisted(
    node: &Node,
) -> (
    vmha_engine::HostAgentState,
    Vec<Option<VmSettings>>,
    Option<ControllerState>,
) {
    let settings = node
        .config()
        .vms
        .iter()
        .map(|v| node.agent().settings(&v.name))
        .collect();
    (
        node.agent().state(),
        settings,
        node.controller().map(Controller::state),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn node_never_panics_and_answers_every_command(steps in proptest::collection::vec(prop_oneof![
        6 => node_input().prop_map(NodeStep::Input),
        2 => (any::<bool>(), command()).prop_map(|(local, c)| NodeStep::Command(local, c)),
        2 => (0u64..200_000).prop_map(NodeStep::Wait),
        3 => commit().prop_map(NodeStep::Ready),
    ], 0..80)) {
        let config = Arc::new(Config::from_toml_str(CONFIG, "f.toml").unwrap());
        let host = Name::new("h0").unwrap();
        let mut node = Node::new(config.clone(), host.clone(), 1, None, Timestamp(5)).unwrap();
        let mut now = Timestamp(5);
        let mut asked = 0u64;
        let mut answers: BTreeMap<u64, usize> = BTreeMap::new();
        let mut remote = 0u64;
        let count = |effects: &vmha_engine::Effects, answers: &mut BTreeMap<u64, usize>| {
            for (id, _) in &effects.replies {
                *answers.entry(*id).or_default() += 1;
            }
            for f in &effects.forwards {
                *answers.entry(f.id).or_default() += 1;
            }
        };
        let step_ready = |node: &mut Node, outcome: Commit, answers: &mut BTreeMap<u64, usize>|
            -> Result<(), TestCaseError> {
            let before = persisted(node);
            let Some(ready) = node.ready() else { return Ok(()) };
            count(&ready.run_now, answers);
            let undone = ready.commands && outcome != Commit::Ok;
            let effects = node.advance(ready.id, outcome.clone());
            count(&effects, answers);
            if undone {
                let after = persisted(node);
                prop_assert_eq!(&after.0, &before.0, "undone commands left host-local state");
                prop_assert_eq!(&after.1, &before.1, "undone commands left settings");
                if outcome != Commit::Deposed {
                    prop_assert_eq!(&after.2, &before.2, "undone commands left controller state");
                }
                for (_, r) in &effects.replies {
                    if let Err(e) = r {
                        prop_assert!(!matches!(e, CommandError::Overloaded));
                    }
                }
            }
            Ok(())
        };
        for step in steps {
            match step {
                NodeStep::Input(i) => node.handle(now, i),
                NodeStep::Command(local, c) => {
                    let origin = if local {
                        asked += 1;
                        CommandOrigin::Local(asked)
                    } else {
                        remote += 1;
                        CommandOrigin::Remote(format!("h1/{remote}"))
                    };
                    node.command(now, origin, c);
                }
                NodeStep::Wait(ms) => {
                    now = now.plus_ms(ms);
                    if node.poll_timeout().is_some_and(|t| t <= now) {
                        node.handle_timeout(now);
                    }
                }
                NodeStep::Ready(outcome) => step_ready(&mut node, outcome, &mut answers)?,
            }
            let _ = node.status();
        }
        // Once the store works, every command is answered exactly once.
        for _ in 0..200 {
            step_ready(&mut node, Commit::Ok, &mut answers)?;
        }
        prop_assert!(node.ready().is_none(), "output left after the store recovered");
        for id in 1..=asked {
            prop_assert_eq!(answers.get(&id).copied().unwrap_or(0), 1, "command {} answered {:?} times", id, answers.get(&id));
        }
        let state = NodeState { agent: node.agent().state(), next_event: 0 };
        let json = serde_json::to_string(&state).unwrap();
        let back: NodeState = serde_json::from_str(&json).unwrap();
        let restored = Node::new(config, host, 1, Some(back.clone()), now).unwrap();
        prop_assert_eq!(restored.agent().state(), back.agent);
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
