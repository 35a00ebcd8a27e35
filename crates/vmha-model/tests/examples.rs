//! The shipped examples parse, and `show` output parses back to the same configuration.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use vmha_model::{Config, Driver, Policy, Store};

fn example(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    Config::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn single_host_example_resolves_defaults() {
    let c = example("single-host.toml");
    assert_eq!(c.cluster.store, Store::Embedded);
    assert_eq!(c.vms.len(), 2);
    let shop = c.vm("shop").unwrap();
    assert_eq!(shop.apps.len(), 3);
    assert_eq!(shop.app("web").unwrap().requires[0].as_str(), "db");
    // Defaults come from the defaults module.
    assert_eq!(
        shop.app("db").unwrap().interval,
        vmha_model::defaults::APP_INTERVAL
    );
    assert_eq!(c.vm("billing").unwrap().policy, Policy::Weighted);
    assert!(matches!(&c.vm("billing").unwrap().driver, Driver::Qemu(q) if q.disks.len() == 1));
}

#[test]
fn etcd_example_resolves() {
    let c = example("three-hosts-etcd.toml");
    assert!(matches!(&c.cluster.store, Store::Etcd { endpoints, .. } if endpoints.len() == 3));
    assert_eq!(c.hosts.len(), 3);
    assert!(
        matches!(&c.vm("legacy").unwrap().driver, Driver::Libvirt(l) if l.domain == "legacy-erp")
    );
}

#[test]
fn show_output_parses_back_equal() {
    for name in ["single-host.toml", "three-hosts-etcd.toml"] {
        let c = example(name);
        let toml = c.to_toml();
        let back = Config::from_toml_str(&toml, "<show>").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(c, back, "{name}");
    }
}

#[test]
fn json_output_is_valid_json_with_all_defaults() {
    let c = example("single-host.toml");
    let v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
    assert_eq!(v["vm"][0]["app"][0]["timeout"], "2s");
    assert_eq!(v["vm"][0]["on_guest_loss"], "restart-vm");
}
