//! A cold start of the cluster (`[cluster] startup_wait`): the first host up must not collect
//! every VM. A VM placed for the first time waits for the hosts it prefers to take their
//! leases, at most until the startup wait ends; failovers never wait.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use vmha_engine::{Controller, ControllerActionKind, ControllerInput, Timestamp};
use vmha_model::{Config, Name};

fn config(placement: &str) -> Arc<Config> {
    let text = format!(
        r#"[cluster]
name = "t"
store = "etcd"
endpoints = ["http://127.0.0.1:2379"]

[[host]]
name = "kvm1"

[[host]]
name = "kvm2"

[[host]]
name = "kvm3"

[[vm]]
name = "shop"
hosts = ["kvm1", "kvm2", "kvm3"]
placement = "{placement}"

[vm.qemu]
memory_mb = 256
disk = "/shared/shop.qcow2"
"#
    );
    Arc::new(Config::from_toml_str(&text, "t.toml").unwrap())
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn lease(host: &str, up: bool) -> ControllerInput {
    ControllerInput::HostLease {
        host: name(host),
        up,
        incarnation: u64::from(up),
    }
}

/// A controller elected at 0 that waits until 10 s, fed the election listing: `up` hosts with
/// a live lease, `down` ones without, `shop` unowned with no admin record.
fn elected(placement: &str, up: &[&str], down: &[&str]) -> Controller {
    let mut c = Controller::new(config(placement), None, Timestamp(0));
    c.wait_for_hosts_until(Timestamp(10_000));
    let mut inputs: Vec<ControllerInput> = up.iter().map(|h| lease(h, true)).collect();
    inputs.extend(down.iter().map(|h| lease(h, false)));
    inputs.push(ControllerInput::Ownership {
        vm: name("shop"),
        record: None,
        revision: 0,
    });
    inputs.push(ControllerInput::Admin {
        vm: name("shop"),
        admin: None,
    });
    c.handle_inputs(Timestamp(0), inputs);
    c
}

/// The owner of the first ownership write the controller asks for, if any.
fn placed_on(c: &mut Controller) -> Option<String> {
    while let Some(a) = c.poll_action() {
        if let ControllerActionKind::CasOwner { record, .. } = a.kind {
            return record.owner.map(|o| o.to_string());
        }
    }
    None
}

fn note(c: &Controller) -> String {
    c.status().vms[0].note.clone().unwrap_or_default()
}

#[test]
fn a_vm_waits_for_its_preferred_host_to_join() {
    let mut c = elected("priority", &["kvm2", "kvm3"], &[]);
    assert_eq!(placed_on(&mut c), None, "placed before kvm1 joined");
    assert!(
        note(&c).contains("waiting up to 10s for kvm1 to join"),
        "{}",
        note(&c)
    );
    assert_eq!(c.poll_timeout(), Some(Timestamp(10_000)));
    c.handle_input(Timestamp(3_000), lease("kvm1", true));
    assert_eq!(placed_on(&mut c).as_deref(), Some("kvm1"));
}

#[test]
fn a_host_without_a_lease_at_election_is_waited_for_too() {
    let mut c = elected("priority", &["kvm2", "kvm3"], &["kvm1"]);
    assert_eq!(placed_on(&mut c), None);
    c.handle_input(Timestamp(2_000), lease("kvm1", true));
    assert_eq!(placed_on(&mut c).as_deref(), Some("kvm1"));
}

#[test]
fn the_wait_ends_and_the_next_host_takes_it() {
    let mut c = elected("priority", &["kvm2", "kvm3"], &["kvm1"]);
    c.handle_timeout(Timestamp(9_999));
    assert_eq!(placed_on(&mut c), None);
    c.handle_timeout(Timestamp(10_000));
    assert_eq!(placed_on(&mut c).as_deref(), Some("kvm2"));
    assert_eq!(c.poll_timeout(), None, "nothing left to wait for");
}

#[test]
fn the_preferred_host_up_is_used_at_once() {
    let mut c = elected("priority", &["kvm1"], &[]);
    assert_eq!(placed_on(&mut c).as_deref(), Some("kvm1"));
}

#[test]
fn least_loaded_waits_for_every_host() {
    let mut c = elected("least-loaded", &["kvm1", "kvm2"], &[]);
    assert_eq!(placed_on(&mut c), None);
    assert!(note(&c).contains("kvm3"), "{}", note(&c));
    c.handle_input(Timestamp(1_000), lease("kvm3", true));
    assert!(placed_on(&mut c).is_some());
}

#[test]
fn no_wait_after_the_startup_window() {
    let mut c = Controller::new(config("priority"), None, Timestamp(20_000));
    c.wait_for_hosts_until(Timestamp(10_000));
    c.handle_inputs(
        Timestamp(20_000),
        [
            lease("kvm1", false),
            lease("kvm2", true),
            ControllerInput::Ownership {
                vm: name("shop"),
                record: None,
                revision: 0,
            },
            ControllerInput::Admin {
                vm: name("shop"),
                admin: None,
            },
        ],
    );
    assert_eq!(placed_on(&mut c).as_deref(), Some("kvm2"));
}
