//! Edge cases the parser must accept (the rejections live in `tests/bad/`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::time::Duration;

use vmha_model::{Config, Driver, Policy};

fn parse(text: &str) -> Config {
    Config::from_toml_str(text, "<test>").unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

const ETCD: &str = "[cluster]\nname = \"c\"\nstore = \"etcd\"\nendpoints = [\"https://e:2379\"]\n";

#[test]
fn a_host_without_declared_memory_can_take_any_vm() {
    let c = parse(&format!(
        "{ETCD}[[host]]\nname = \"small\"\nmemory_mb = 128\n[[host]]\nname = \"unknown\"\n\
         [[vm]]\nname = \"big\"\nhosts = [\"small\", \"unknown\"]\n[vm.qemu]\nmemory_mb = 4096\ndisk = \"/b\"\n"
    ));
    assert_eq!(c.vm("big").unwrap().memory_mb(), 4096);
}

#[test]
fn driver_is_inferred_from_the_table_and_libvirt_needs_none() {
    let c = parse(
        "[cluster]\nname = \"c\"\n[[host]]\nname = \"h\"\n\
         [[vm]]\nname = \"q\"\nhosts = [\"h\"]\n[vm.qemu]\nkernel = \"/k\"\nappend = \"console=ttyS0\"\n\
         [[vm]]\nname = \"l\"\nhosts = [\"h\"]\ndriver = \"libvirt\"\n",
    );
    assert!(matches!(&c.vm("q").unwrap().driver, Driver::Qemu(q) if q.disks.is_empty()));
    assert!(matches!(&c.vm("l").unwrap().driver, Driver::Libvirt(l) if l.domain == "l"));
}

#[test]
fn critical_policy_without_apps_is_plain_vm_ha() {
    let c = parse(
        "[cluster]\nname = \"c\"\n[[host]]\nname = \"h\"\n\
         [[vm]]\nname = \"v\"\nhosts = [\"h\"]\npolicy = \"critical\"\n[vm.qemu]\ndisk = \"/v\"\n",
    );
    assert_eq!(c.vm("v").unwrap().policy, Policy::Critical);
}

#[test]
fn requires_may_form_a_diamond() {
    let app = |name: &str, requires: &str| {
        format!(
            "[[vm.app]]\nname = \"{name}\"\ncheck = [\"c\"]\nstart = [\"s\"]\nrequires = [{requires}]\n"
        )
    };
    let c = parse(&format!(
        "[cluster]\nname = \"c\"\n[[host]]\nname = \"h\"\n[[vm]]\nname = \"v\"\nhosts = [\"h\"]\n\
         [vm.qemu]\ndisk = \"/v\"\n{}{}{}{}",
        app("top", "\"left\", \"right\""),
        app("left", "\"base\""),
        app("right", "\"base\""),
        app("base", ""),
    ));
    assert_eq!(c.vm("v").unwrap().app("top").unwrap().requires.len(), 2);
}

#[test]
fn a_host_may_have_a_hardware_watchdog() {
    // On etcd the watchdog must reset a hung host before its lease expires:
    // watchdog_timeout < ttl - fence_margin (here 15s - 2s = 13s).
    let c = parse(
        "[cluster]\nname = \"c\"\nstore = \"etcd\"\nendpoints = [\"https://e:2379\"]\n\
         ttl = \"15s\"\nfence_margin = \"2s\"\n\
         [[host]]\nname = \"a\"\nwatchdog = \"/dev/watchdog\"\n\
         [[host]]\nname = \"b\"\nwatchdog = \"/dev/watchdog1\"\nwatchdog_timeout = \"12999ms\"\n\
         [[host]]\nname = \"c\"\n",
    );
    let a = c.host("a").unwrap();
    assert_eq!(a.watchdog.as_deref(), Some(Path::new("/dev/watchdog")));
    assert_eq!(a.watchdog_timeout, vmha_model::defaults::WATCHDOG_TIMEOUT);
    let b = c.host("b").unwrap();
    assert_eq!(b.watchdog.as_deref(), Some(Path::new("/dev/watchdog1")));
    assert_eq!(b.watchdog_timeout, Duration::from_millis(12_999));
    let none = c.host("c").unwrap();
    assert_eq!(none.watchdog, None);
    assert_eq!(
        none.watchdog_timeout,
        vmha_model::defaults::WATCHDOG_TIMEOUT
    );

    // `show` writes the timeout only with its watchdog, and parses back equal.
    let shown = c.to_toml();
    assert_eq!(shown.matches("watchdog_timeout").count(), 2, "{shown}");
    assert_eq!(parse(&shown), c);
}

#[test]
fn the_embedded_store_puts_no_bound_on_the_watchdog_timeout() {
    // A single host has no failover, so nothing can double-run: any timeout in range is fine.
    let c = parse(
        "[cluster]\nname = \"c\"\n\
         [[host]]\nname = \"h\"\nwatchdog = \"/dev/watchdog\"\nwatchdog_timeout = \"5m\"\n",
    );
    assert_eq!(c.hosts[0].watchdog_timeout, Duration::from_secs(300));
}

#[test]
fn cluster_migrate_default_applies_only_where_storage_is_shared() {
    let c = parse(&format!(
        "{ETCD}migrate = true\n[[host]]\nname = \"h\"\n\
         [[vm]]\nname = \"local\"\nhosts = [\"h\"]\n[vm.qemu]\ndisk = \"/l\"\n\
         [[vm]]\nname = \"shared\"\nhosts = [\"h\"]\nshared_storage = true\n[vm.qemu]\ndisk = \"/s\"\n\
         [[vm]]\nname = \"diskless\"\nhosts = [\"h\"]\n[vm.qemu]\nkernel = \"/k\"\n\
         [[vm]]\nname = \"off\"\nhosts = [\"h\"]\nmigrate = false\nshared_storage = true\n[vm.qemu]\ndisk = \"/o\"\n"
    ));
    let live = |n: &str| c.vm(n).unwrap().live_migratable();
    // The cluster default never makes a VM with local disks migrate: it is stopped and started.
    assert!(c.vm("local").unwrap().migrate);
    assert!(!live("local"));
    assert!(live("shared"));
    assert!(live("diskless"));
    assert!(!live("off"));
}
