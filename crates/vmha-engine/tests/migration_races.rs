//! The target host of a live migration, told things in the order the daemon can deliver them:
//! its periodic safety poll may find the VM's slot empty ("gone") after the engine decided to
//! prepare the incoming QEMU but before the preparation took the slot. That "gone" is about the
//! slot before the incoming QEMU existed; it must not fail the migration (CI once saw the
//! migration withdrawn this way, and the source never sent it). A QEMU lost once it waits is a
//! failure, and the controller hears of it at once.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use vmha_engine::{
    ActionError, ActionId, Desired, HostActionKind, HostAgent, HostInput, Migration, MigrationNote,
    OwnerRecord, Record, Timestamp, VmObservation, VmReport,
};
use vmha_model::{Config, Name};

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

const CONFIG: &str = r#"
[cluster]
name = "c"
store = "etcd"
endpoints = ["http://127.0.0.1:2379"]

[[host]]
name = "kvm1"

[[host]]
name = "kvm2"

[[vm]]
name = "shop"
hosts = ["kvm1", "kvm2"]
migrate = true
shared_storage = true
[vm.qemu]
memory_mb = 256
disk = "/shared/shop.qcow2"
[[vm.app]]
name = "db"
priority = 100
check = ["check", "db"]
start = ["start", "db"]
stop = ["stop", "db"]
"#;

const URI: &str = "tcp:10.0.0.2:49152";

/// kvm2's agent, `shop` owned by kvm1 and not running here, at `now` ms.
struct Target {
    agent: HostAgent,
    now: u64,
}

impl Target {
    fn new() -> Target {
        let config = Arc::new(Config::from_toml_str(CONFIG, "c.toml").unwrap());
        let agent = HostAgent::new(config, name("kvm2"), None, Timestamp(0)).unwrap();
        let mut t = Target { agent, now: 0 };
        t.input(HostInput::Lease { live: true });
        t.record(1, None);
        t.observe(VmObservation::Gone);
        t.drain();
        t
    }

    fn input(&mut self, input: HostInput) {
        self.now += 10;
        self.agent.handle_input(Timestamp(self.now), input);
    }

    fn observe(&mut self, kind: VmObservation) {
        self.input(HostInput::VmObserved {
            vm: name("shop"),
            kind,
        });
    }

    /// The ownership record at `revision`: kvm1 owns shop, migrating it to `to` if any.
    fn record(&mut self, revision: u64, to: Option<&str>) {
        self.now += 10;
        let record = OwnerRecord {
            owner: Some(name("kvm1")),
            desired: Desired::Run,
            move_to: None,
            parked: false,
            migrate: to.map(|t| Migration {
                to: name(t),
                uri: None,
            }),
        };
        self.agent.handle_record(
            Timestamp(self.now),
            &Record::Owner {
                vm: name("shop"),
                record: Some(record),
                revision,
            },
        );
    }

    /// The record asks for a migration here: the id of the `prepare-incoming` that follows.
    fn migration_asked(&mut self) -> ActionId {
        self.record(2, Some("kvm2"));
        let mut prepare = None;
        while let Some(a) = self.agent.poll_action() {
            if let HostActionKind::PrepareIncoming { .. } = a.kind {
                prepare = Some(a.id);
            }
        }
        prepare.expect("no prepare-incoming for a migration to this host")
    }

    /// Reports made since the last call (actions and events dropped).
    fn drain(&mut self) -> Vec<VmReport> {
        while self.agent.poll_action().is_some() {}
        while self.agent.poll_event().is_some() {}
        std::iter::from_fn(|| self.agent.poll_report())
            .map(|(_, r)| r)
            .collect()
    }
}

fn failed(reports: &[VmReport]) -> Option<&String> {
    reports.iter().find_map(|r| match &r.migration {
        Some(MigrationNote::Failed { why }) => Some(why),
        _ => None,
    })
}

#[test]
fn a_safety_poll_from_before_the_incoming_qemu_does_not_fail_the_migration() {
    let mut t = Target::new();
    let id = t.migration_asked();
    // The poll ran before the preparation took the slot: nothing ran here yet.
    t.observe(VmObservation::Gone);
    t.input(HostInput::IncomingResult {
        id,
        result: Ok(URI.to_string()),
    });
    let reports = t.drain();
    assert_eq!(failed(&reports), None, "{reports:#?}");
    let last = reports
        .last()
        .expect("the target reports its incoming QEMU");
    assert_eq!(
        last.migration,
        Some(MigrationNote::Incoming {
            uri: URI.to_string()
        }),
        "{reports:#?}"
    );
}

#[test]
fn a_preparation_that_fails_after_a_stale_gone_is_reported_failed() {
    let mut t = Target::new();
    let id = t.migration_asked();
    t.observe(VmObservation::Gone);
    t.input(HostInput::IncomingResult {
        id,
        result: Err(ActionError::Driver {
            detail: "no free port".to_string(),
        }),
    });
    let reports = t.drain();
    let why = failed(&reports).expect("the failed preparation is reported");
    assert!(why.contains("no free port"), "{why}");
}

#[test]
fn an_incoming_qemu_lost_while_it_waits_is_reported_failed_at_once() {
    let mut t = Target::new();
    let id = t.migration_asked();
    t.input(HostInput::IncomingResult {
        id,
        result: Ok(URI.to_string()),
    });
    t.drain();
    t.observe(VmObservation::Gone);
    let reports = t.drain();
    let why = failed(&reports).expect("the lost incoming QEMU is reported without waiting");
    assert!(
        why.contains("exited before the migration completed"),
        "{why}"
    );
}
