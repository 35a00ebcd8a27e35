//! A restarted daemon's controller keeps what the previous controller committed (maintenance,
//! fault history), whichever arrives first: the election or the first listing of the store.
//! (vmhad's election and its store follower are separate tasks: on the embedded store the
//! election usually wins.)
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use vmha_engine::{
    AdminCommand, CommandOrigin, Commit, HostInput, HostMember, Node, NodeInput, Persist, Record,
    Timestamp,
};
use vmha_model::{Config, HostState, Name};

fn config() -> Arc<Config> {
    let text = r#"[cluster]
name = "c"

[[host]]
name = "kvm1"
"#;
    Arc::new(Config::from_toml_str(text, "c.toml").unwrap())
}

fn kvm1() -> Name {
    Name::new("kvm1").unwrap()
}

/// kvm1's membership record in its life `incarnation` (bound to its lease in the store).
fn member(incarnation: u64) -> Record {
    Record::Host {
        host: kvm1(),
        member: Some(HostMember {
            memory_mb: None,
            incarnation,
        }),
    }
}

/// Commits every batch the node hands out; returns what was persisted.
fn commit_all(node: &mut Node) -> Vec<Persist> {
    let mut persisted = Vec::new();
    while let Some(ready) = node.ready() {
        node.advance(ready.id, Commit::Ok);
        persisted.push(ready.persist);
    }
    persisted
}

fn host_state(node: &Node) -> Option<HostState> {
    node.status().controller.unwrap().hosts[0].state
}

/// The controller records in what was persisted: the last one wins.
fn controller_record(persisted: &[Persist]) -> Option<Record> {
    persisted
        .iter()
        .rev()
        .find_map(|p| p.controller.as_ref()?.state.clone())
        .map(|state| Record::Controller { state: Some(state) })
}

/// A first life: the host put in maintenance; returns the committed controller record.
fn first_life() -> Record {
    let now = Timestamp(1_000);
    let mut node = Node::new(config(), kvm1(), 1, None, now).unwrap();
    node.handle(
        now,
        NodeInput::Records {
            records: vec![member(1)],
            full: true,
        },
    );
    node.handle(now, NodeInput::Host(HostInput::Lease { live: true }));
    node.handle(now, NodeInput::Leadership(Some(1)));
    commit_all(&mut node);
    node.command(
        now,
        CommandOrigin::Local(1),
        AdminCommand::HostMaintenance {
            host: kvm1(),
            on: true,
        },
    );
    let persisted = commit_all(&mut node);
    assert_eq!(host_state(&node), Some(HostState::Maintenance));
    controller_record(&persisted).expect("the maintenance was committed")
}

fn second_life(election_first: bool) {
    let stored = first_life();
    let now = Timestamp(60_000);
    let mut node = Node::new(config(), kvm1(), 2, None, now).unwrap();
    let listing = NodeInput::Records {
        records: vec![stored, member(2)],
        full: true,
    };
    let inputs = if election_first {
        [NodeInput::Leadership(Some(2)), listing]
    } else {
        [listing, NodeInput::Leadership(Some(2))]
    };
    for input in inputs {
        node.handle(now, input);
        commit_all(&mut node);
    }
    node.handle(now, NodeInput::Host(HostInput::Lease { live: true }));
    let persisted = commit_all(&mut node);
    assert_eq!(
        host_state(&node),
        Some(HostState::Maintenance),
        "the new controller forgot the maintenance"
    );
    if let Some(Record::Controller { state: Some(state) }) = controller_record(&persisted) {
        // What it writes back still holds it: a third life restores it.
        let mut third = Node::new(config(), kvm1(), 3, None, now).unwrap();
        third.handle(
            now,
            NodeInput::Records {
                records: vec![Record::Controller { state: Some(state) }, member(3)],
                full: true,
            },
        );
        third.handle(now, NodeInput::Leadership(Some(3)));
        assert_eq!(host_state(&third), Some(HostState::Maintenance));
    }
}

#[test]
fn maintenance_survives_a_restart_when_the_listing_comes_first() {
    second_life(false);
}

#[test]
fn maintenance_survives_a_restart_when_the_election_comes_first() {
    second_life(true);
}
