//! The default configuration the Debian package installs (`packaging/vmha.toml`) is valid for a
//! single host on the embedded store with no VMs, in the places the unit and tmpfiles.d expect;
//! and its commented example VM, uncommented, is valid too.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use vmha_model::{Config, Store};

fn text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/vmha.toml");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn the_default_configuration_is_one_host_on_the_embedded_store_without_vms() {
    let c = Config::from_toml_str(&text(), "packaging/vmha.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.cluster.store, Store::Embedded);
    assert_eq!(c.hosts.len(), 1);
    assert!(c.vms.is_empty());
    assert_eq!(c.cluster.state_dir, PathBuf::from("/var/lib/vmha"));
    assert_eq!(c.cluster.runtime_dir, PathBuf::from("/run/vmha"));
}

#[test]
fn its_commented_example_vm_is_valid_once_uncommented() {
    let mut example = false;
    let uncommented: Vec<String> = text()
        .lines()
        .map(|l| {
            example |= l.starts_with("# [[vm]]");
            match l {
                "#" if example => String::new(),
                _ if example => l.strip_prefix("# ").unwrap_or(l).to_string(),
                _ => l.to_string(),
            }
        })
        .collect();
    assert!(example, "no commented [[vm]] example");
    let c = Config::from_toml_str(&uncommented.join("\n"), "uncommented")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.vms.len(), 1);
    assert!(!c.vms[0].apps.is_empty());
}
