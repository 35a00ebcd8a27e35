//! A new configuration applied to running nodes (`Node::reconfigure`, driven through the
//! simulator as `vmha config apply` drives it): added VM groups are placed and started,
//! running ones are left alone, removed ones are no longer managed (and left running), changed
//! settings are in effect, and what cannot change live is refused without changing anything.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use vmha_engine::node::ReconfigureError;
use vmha_engine::sim::Sim;
use vmha_model::Config;

fn vm(name: &str, web_priority: u32) -> String {
    format!(
        r#"
[[vm]]
name = "{name}"
hosts = ["kvm1", "kvm2"]
[vm.qemu]
memory_mb = 256
disk = "/shared/{name}.qcow2"
[[vm.app]]
name = "db"
priority = 100
check = ["check", "db"]
start = ["start", "db"]
stop = ["stop", "db"]
[[vm.app]]
name = "web"
priority = {web_priority}
requires = ["db"]
check = ["check", "web"]
start = ["start", "web"]
stop = ["stop", "web"]
"#
    )
}

fn config(cluster: &str, vms: &[String]) -> Arc<Config> {
    let text = format!(
        r#"[cluster]
name = "{cluster}"
store = "etcd"
endpoints = ["http://127.0.0.1:2379"]
ttl = "3s"
fence_margin = "1s"

[[host]]
name = "kvm1"

[[host]]
name = "kvm2"
{}"#,
        vms.concat()
    );
    Arc::new(Config::from_toml_str(&text, "c.toml").unwrap())
}

fn since(sim: &Sim, from: usize) -> String {
    sim.log()[from..].join("\n")
}

#[test]
fn a_new_configuration_is_applied_to_the_running_cluster() {
    let mut sim = Sim::new(config("c", &[vm("shop", 50)])).unwrap();
    sim.advance(3_000);
    assert_eq!(sim.running_on("shop").len(), 1);

    // A VM added and an app's priority changed: the new VM is placed and started, the running
    // one is left alone, the new priority is in effect.
    let mark = sim.log().len();
    let outcomes = sim.reconfigure(config("c", &[vm("shop", 70), vm("blog", 50)]));
    assert!(outcomes.iter().all(|(_, o)| o.is_ok()), "{outcomes:?}");
    sim.advance(3_000);
    let log = since(&sim, mark);
    assert!(
        log.contains("new configuration applied: added blog; changed shop"),
        "{log}"
    );
    assert_eq!(sim.running_on("blog").len(), 1, "{log}");
    assert!(
        !log.contains("start-vm shop"),
        "the running VM was restarted:\n{log}"
    );
    assert!(
        !log.contains("stop-vm shop") && !log.contains("kill-vm shop"),
        "{log}"
    );
    let host = sim.running_on("shop")[0].clone();
    let status = sim.agent(host.as_str()).unwrap().status();
    let shop = status
        .vms
        .iter()
        .find(|v| v.name.as_str() == "shop")
        .unwrap();
    assert_eq!(shop.state, vmha_model::VmState::Online);
    let web = shop.apps.iter().find(|a| a.name.as_str() == "web").unwrap();
    assert_eq!(web.priority, 70);
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());

    // A VM removed: no longer managed, left running (not stopped, not killed).
    let mark = sim.log().len();
    let blog_host = sim.running_on("blog");
    let outcomes = sim.reconfigure(config("c", &[vm("shop", 70)]));
    assert!(outcomes.iter().all(|(_, o)| o.is_ok()), "{outcomes:?}");
    sim.advance(5_000);
    let log = since(&sim, mark);
    assert!(
        log.contains("removed blog (no longer managed, left running)"),
        "{log}"
    );
    // Nothing acts on it any more: no event or action names it after the announcement.
    let rest = log.replace("removed blog", "");
    assert!(!rest.contains("blog"), "{log}");
    assert_eq!(sim.running_on("blog"), blog_host);

    // What cannot change live is refused, nothing changed.
    let mark = sim.log().len();
    let outcomes = sim.reconfigure(config("other", &[vm("shop", 70)]));
    for (_, o) in &outcomes {
        assert!(matches!(o, Err(ReconfigureError::Fixed(_))), "{o:?}");
    }
    sim.advance(3_000);
    assert!(!since(&sim, mark).contains("configuration applied"));
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}
