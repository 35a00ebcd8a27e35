//! Fixtures shared by the engine's integration tests that drive one host agent by hand.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use vmha_engine::{
    AppStatus, Desired, HostAgent, HostInput, OwnerRecord, Record, Timestamp, VmObservation,
};
use vmha_model::{Config, Name};

/// A valid name (panics on a bad one: test data).
pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// The host agent of `kvm1` on `config`, at time 0: its lease live, owning `vm` (desired to
/// run), told the VM is stopped — so it starts it.
pub fn owning_agent(config: &str, vm: &str) -> HostAgent {
    let config = Arc::new(Config::from_toml_str(config, "c.toml").unwrap());
    let mut agent = HostAgent::new(config, name("kvm1"), None, Timestamp(0)).unwrap();
    agent.handle_input(Timestamp(0), HostInput::Lease { live: true });
    agent.handle_record(
        Timestamp(0),
        &Record::Owner {
            vm: name(vm),
            record: Some(OwnerRecord {
                owner: Some(name("kvm1")),
                desired: Desired::Run,
                move_to: None,
                parked: false,
                migrate: None,
            }),
            revision: 1,
        },
    );
    agent.handle_input(
        Timestamp(0),
        HostInput::VmObserved {
            vm: name(vm),
            kind: VmObservation::Stopped { by_guest: false },
        },
    );
    agent
}

/// Moves `now` on by `ms`; the agent handles its timeout if it is due by then.
pub fn advance(agent: &mut HostAgent, now: &mut u64, ms: u64) {
    *now += ms;
    if agent.poll_timeout().is_some_and(|t| t <= Timestamp(*now)) {
        agent.handle_timeout(Timestamp(*now));
    }
}

/// The status of `app` in the agent's first VM.
pub fn app_status(agent: &HostAgent, app: &str) -> AppStatus {
    let vm = agent.status().vms.into_iter().next().unwrap();
    vm.apps
        .into_iter()
        .find(|a| a.name.as_str() == app)
        .unwrap()
}
