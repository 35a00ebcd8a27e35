//! Property: any valid configuration, written as TOML text with random optional keys left out,
//! parses; the parsed values are the ones written (or the defaults); and the resolved
//! configuration's `show` output — TOML and JSON — parses back to an equal `Config`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::fmt::Write as _;
use std::time::Duration;

use proptest::prelude::*;
use vmha_model::duration::millis;
use vmha_model::{Config, Driver, Store, defaults as d};

/// A TOML string literal (escaped).
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn q_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", inner.join(", "))
}

/// A duration written in one of the accepted spellings.
#[derive(Debug, Clone)]
struct Dur {
    ms: u64,
    compact: bool,
}

impl Dur {
    fn text(&self) -> String {
        if self.compact {
            vmha_model::duration::format(Duration::from_millis(self.ms))
        } else {
            format!("{}ms", self.ms)
        }
    }
    fn get(&self) -> Duration {
        Duration::from_millis(self.ms)
    }
}

fn dur(range: std::ops::RangeInclusive<Duration>) -> impl Strategy<Value = Dur> {
    let lo = millis(*range.start());
    let hi = millis(*range.end());
    // Mostly whole seconds (compact spellings like "1m30s"), sometimes odd milliseconds.
    prop_oneof![
        (lo.div_ceil(1000)..=hi / 1000).prop_map(|s| s * 1000),
        lo..=hi,
    ]
    .prop_flat_map(|ms| any::<bool>().prop_map(move |compact| Dur { ms, compact }))
}

fn argv() -> impl Strategy<Value = Vec<String>> {
    ("\\PC{1,12}", prop::collection::vec("\\PC{0,12}", 0..4)).prop_map(|(first, mut rest)| {
        rest.insert(0, first);
        rest
    })
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_.-]{0,10}"
}

#[derive(Debug, Clone)]
struct GenApp {
    name: String,
    priority: Option<u32>,
    check: Vec<String>,
    start: Vec<String>,
    stop: Option<Vec<String>>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    restart_limit: Option<u32>,
    restart_window: Option<Dur>,
    stable_after: Option<Dur>,
    probe_failures: Option<u32>,
    critical: Option<bool>,
    /// Bit i set: requires the i-th earlier app.
    requires: u8,
}

prop_compose! {
    fn gen_app()(
        name in name(),
        priority in prop::option::of(d::APP_PRIORITY_RANGE),
        check in argv(),
        start in argv(),
        stop in prop::option::of(argv()),
        (interval, timeout) in (prop::option::of(dur(d::APP_INTERVAL_RANGE)), prop::option::of(dur(d::APP_TIMEOUT_RANGE))),
        restart_limit in prop::option::of(d::APP_RESTART_LIMIT_RANGE),
        restart_window in prop::option::of(dur(d::APP_RESTART_WINDOW_RANGE)),
        stable_after in prop::option::of(dur(d::APP_STABLE_AFTER_RANGE)),
        probe_failures in prop::option::of(d::APP_PROBE_FAILURES_RANGE),
        critical in prop::option::of(any::<bool>()),
        requires in any::<u8>(),
    ) -> GenApp {
        GenApp { name, priority, check, start, stop, interval, timeout, restart_limit,
                 restart_window, stable_after, probe_failures, critical, requires }
    }
}

#[derive(Debug, Clone)]
struct GenDisk {
    path: String,
    format: Option<&'static str>,
    cache: Option<&'static str>,
}

#[derive(Debug, Clone)]
enum Boot {
    /// `disk = "path"`
    Disk(String),
    /// `disks = [...]`, inline or as `[[vm.qemu.disks]]` tables.
    Disks(Vec<GenDisk>, bool),
    /// `kernel = ...` with optional initrd and append.
    Kernel(Option<String>, Option<String>),
}

#[derive(Debug, Clone)]
enum GenDriver {
    Qemu {
        explicit: bool,
        memory_mb: Option<u64>,
        cpus: Option<u32>,
        accel: Option<&'static str>,
        boot: Boot,
        extra_args: Vec<String>,
    },
    Libvirt {
        domain: Option<String>,
        uri: Option<String>,
    },
}

fn path() -> impl Strategy<Value = String> {
    "/[a-z0-9]{1,8}(/[a-z0-9._-]{1,8}){0,2}"
}

fn gen_driver() -> impl Strategy<Value = GenDriver> {
    let disk = (
        path(),
        prop::option::of(prop::sample::select(vec!["qcow2", "raw"])),
        prop::option::of(prop::sample::select(vec![
            "none",
            "writeback",
            "writethrough",
            "directsync",
            "unsafe",
        ])),
    )
        .prop_map(|(path, format, cache)| GenDisk {
            path,
            format,
            cache,
        });
    let boot = prop_oneof![
        path().prop_map(Boot::Disk),
        (prop::collection::vec(disk, 1..3), any::<bool>()).prop_map(|(d, t)| Boot::Disks(d, t)),
        (prop::option::of(path()), prop::option::of("\\PC{0,20}"))
            .prop_map(|(i, a)| Boot::Kernel(i, a)),
    ];
    prop_oneof![
        (
            any::<bool>(),
            prop::option::of(16u64..=65536),
            prop::option::of(d::QEMU_CPUS_RANGE),
            prop::option::of(prop::sample::select(vec!["auto", "kvm", "tcg"])),
            boot,
            prop::collection::vec("\\PC{0,10}", 0..3),
        )
            .prop_map(|(explicit, memory_mb, cpus, accel, boot, extra_args)| {
                GenDriver::Qemu {
                    explicit,
                    memory_mb,
                    cpus,
                    accel,
                    boot,
                    extra_args,
                }
            }),
        (
            prop::option::of("[a-zA-Z0-9_-]{1,12}"),
            prop::option::of("qemu\\+ssh://[a-z]{1,6}/system")
        )
            .prop_map(|(domain, uri)| GenDriver::Libvirt { domain, uri }),
    ]
}

#[derive(Debug, Clone)]
struct GenVm {
    name: String,
    /// Indices into the host list (taken modulo its length, repeats dropped).
    hosts: Vec<u8>,
    policy: Option<&'static str>,
    tie: Option<&'static str>,
    vm_restart_limit: Option<u32>,
    vm_restart_window: Option<Dur>,
    stop_timeout: Option<Dur>,
    guest_timeout: Option<Dur>,
    boot_timeout: Option<Dur>,
    on_guest_loss: Option<&'static str>,
    placement: Option<&'static str>,
    failback: Option<bool>,
    /// Bit i set: requires the i-th earlier VM.
    requires: u8,
    driver: GenDriver,
    apps: Vec<GenApp>,
}

prop_compose! {
    fn gen_vm()(
        name in name(),
        hosts in prop::collection::vec(any::<u8>(), 1..4),
        policy in prop::option::of(prop::sample::select(vec!["highest-priority", "weighted", "weighted-with-offline", "critical"])),
        tie in prop::option::of(prop::sample::select(vec!["restart", "no-action"])),
        vm_restart_limit in prop::option::of(d::VM_RESTART_LIMIT_RANGE),
        (vm_restart_window, stop_timeout, guest_timeout, boot_timeout) in (
            prop::option::of(dur(d::VM_RESTART_WINDOW_RANGE)),
            prop::option::of(dur(d::STOP_TIMEOUT_RANGE)),
            prop::option::of(dur(d::GUEST_TIMEOUT_RANGE)),
            prop::option::of(dur(d::BOOT_TIMEOUT_RANGE)),
        ),
        on_guest_loss in prop::option::of(prop::sample::select(vec!["restart-vm", "ignore"])),
        placement in prop::option::of(prop::sample::select(vec!["priority", "least-loaded"])),
        failback in prop::option::of(any::<bool>()),
        requires in any::<u8>(),
        driver in gen_driver(),
        apps in prop::collection::vec(gen_app(), 0..5),
    ) -> GenVm {
        GenVm { name, hosts, policy, tie, vm_restart_limit, vm_restart_window, stop_timeout,
                guest_timeout, boot_timeout, on_guest_loss, placement, failback, requires,
                driver, apps }
    }
}

type GenHost = (
    String,
    Option<u8>,
    Option<u64>,
    Option<(String, Option<Dur>)>,
);

#[derive(Debug, Clone)]
struct GenConfig {
    cluster: String,
    /// Host names, addresses, memory and watchdog (device, timeout).
    hosts: Vec<GenHost>,
    /// Etcd settings (forced when there are several hosts): ttl, fence margin as a fraction.
    etcd: Option<(u8, Option<Dur>, Option<u16>)>,
    explicit_embedded: bool,
    state_dir: Option<String>,
    listen: Vec<u16>,
    tokens: Vec<(String, bool)>,
    vms: Vec<GenVm>,
}

prop_compose! {
    fn gen_config()(
        cluster in name(),
        hosts in prop::collection::vec((
            name(),
            prop::option::of(any::<u8>()),
            prop::option::of(65536u64..=1_000_000),
            prop::option::of((path(), prop::option::of(dur(d::WATCHDOG_TIMEOUT_RANGE)))),
        ), 1..4),
        etcd in prop::option::of((1u8..4, prop::option::of(dur(Duration::from_secs(2)..=Duration::from_secs(60))), prop::option::of(1u16..1000))),
        explicit_embedded in any::<bool>(),
        state_dir in prop::option::of(path()),
        listen in prop::collection::vec(1024u16.., 0..3),
        tokens in prop::collection::vec((name(), any::<bool>()), 0..3),
        vms in prop::collection::vec(gen_vm(), 0..4),
    ) -> GenConfig {
        GenConfig { cluster, hosts, etcd, explicit_embedded, state_dir, listen, tokens, vms }
    }
}

/// Names made unique by their position.
fn unique(names: impl Iterator<Item = String>) -> Vec<String> {
    names.enumerate().map(|(i, n)| format!("{n}-{i}")).collect()
}

fn earlier(mask: u8, before: usize, names: &[String]) -> Vec<String> {
    (0..before.min(8))
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| names[i].clone())
        .collect()
}

/// The etcd `ttl` and `fence_margin` the rendered file resolves to, or `None` when embedded.
fn lease(g: &GenConfig) -> Option<(Duration, Duration)> {
    if g.etcd.is_none() && g.hosts.len() == 1 {
        return None;
    }
    let (_, ttl, margin) = g.etcd.clone().unwrap_or((1, None, None));
    let ttl = ttl.as_ref().map_or(d::TTL, Dur::get);
    // A margin strictly below the ttl, at least 100 ms.
    let margin = margin.map_or(d::FENCE_MARGIN, |m| {
        Duration::from_millis((millis(ttl) * u64::from(m) / 1000).max(100))
    });
    Some((ttl, margin))
}

/// The watchdog host `i` is rendered with. On etcd the timeout must be shorter than
/// `ttl - fence_margin`: a generated (or default) timeout that is not is folded below that
/// bound, and the watchdog is left out when no timeout in range fits.
fn watchdog(g: &GenConfig, i: usize) -> Option<(String, Option<Dur>)> {
    let (path, timeout) = g.hosts[i].3.clone()?;
    let Some((ttl, margin)) = lease(g) else {
        return Some((path, timeout));
    };
    let limit = millis(ttl - margin);
    let lo = millis(*d::WATCHDOG_TIMEOUT_RANGE.start());
    if limit <= lo {
        return None;
    }
    let want = timeout
        .as_ref()
        .map_or(millis(d::WATCHDOG_TIMEOUT), |t| t.ms);
    if want < limit {
        return Some((path, timeout));
    }
    let compact = timeout.as_ref().is_some_and(|t| t.compact);
    let ms = lo + (want - lo) % (limit - lo);
    Some((path, Some(Dur { ms, compact })))
}

fn opt_line(out: &mut String, key: &str, value: Option<String>) {
    if let Some(v) = value {
        writeln!(out, "{key} = {v}").unwrap();
    }
}

/// Renders the generated configuration as a TOML file a person could have written.
fn render(g: &GenConfig) -> String {
    let mut out = String::new();
    let host_names = unique(g.hosts.iter().map(|h| h.0.clone()));
    writeln!(out, "[cluster]\nname = {}", q(&g.cluster)).unwrap();
    match (&g.etcd, host_names.len()) {
        (None, 1) => {
            if g.explicit_embedded {
                writeln!(out, "store = \"embedded\"").unwrap();
            }
        }
        (etcd, _) => {
            let (n, ttl, margin) = etcd.clone().unwrap_or((1, None, None));
            let endpoints: Vec<String> = (0..n)
                .map(|i| format!("http://10.0.0.{}:2379", i + 1))
                .collect();
            writeln!(out, "store = \"etcd\"\nendpoints = {}", q_list(&endpoints)).unwrap();
            opt_line(&mut out, "ttl", ttl.map(|t| q(&t.text())));
            let (_, fence_margin) = lease(g).unwrap();
            opt_line(
                &mut out,
                "fence_margin",
                margin.map(|_| format!("\"{}ms\"", fence_margin.as_millis())),
            );
        }
    }
    opt_line(&mut out, "state_dir", g.state_dir.as_deref().map(q));
    for (i, ((_, address, memory, _), name)) in g.hosts.iter().zip(&host_names).enumerate() {
        writeln!(out, "\n[[host]]\nname = {}", q(name)).unwrap();
        opt_line(
            &mut out,
            "address",
            address.map(|a| q(&format!("10.1.0.{a}"))),
        );
        opt_line(&mut out, "memory_mb", memory.map(|m| m.to_string()));
        if let Some((path, timeout)) = watchdog(g, i) {
            writeln!(out, "watchdog = {}", q(&path)).unwrap();
            opt_line(&mut out, "watchdog_timeout", timeout.map(|t| q(&t.text())));
        }
    }
    if !g.listen.is_empty() || !g.tokens.is_empty() {
        writeln!(out, "\n[api]").unwrap();
        let listen: Vec<String> = g.listen.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        writeln!(out, "listen = {}", q_list(&listen)).unwrap();
        for ((token, admin), tname) in g
            .tokens
            .iter()
            .zip(unique(g.tokens.iter().map(|t| t.0.clone())))
        {
            let role = if *admin { "admin" } else { "read-only" };
            writeln!(
                out,
                "\n[[api.token]]\nname = {}\nrole = \"{role}\"\nsecret_file = {}",
                q(&tname),
                q(&format!("/etc/vmha/{token}.token"))
            )
            .unwrap();
        }
    }
    let vm_names = unique(g.vms.iter().map(|v| v.name.clone()));
    for (i, vm) in g.vms.iter().enumerate() {
        render_vm(&mut out, vm, &vm_names, i, &host_names);
    }
    out
}

fn render_vm(out: &mut String, vm: &GenVm, vm_names: &[String], i: usize, host_names: &[String]) {
    writeln!(out, "\n[[vm]]\nname = {}", q(&vm_names[i])).unwrap();
    let mut hosts: Vec<String> = Vec::new();
    for h in &vm.hosts {
        let name = host_names[usize::from(*h) % host_names.len()].clone();
        if !hosts.contains(&name) {
            hosts.push(name);
        }
    }
    writeln!(out, "hosts = {}", q_list(&hosts)).unwrap();
    let s = |v: Option<&str>| v.map(q);
    let dq = |v: &Option<Dur>| v.as_ref().map(|d| q(&d.text()));
    opt_line(out, "policy", s(vm.policy));
    opt_line(out, "tie", s(vm.tie));
    opt_line(
        out,
        "vm_restart_limit",
        vm.vm_restart_limit.map(|n| n.to_string()),
    );
    opt_line(out, "vm_restart_window", dq(&vm.vm_restart_window));
    opt_line(out, "stop_timeout", dq(&vm.stop_timeout));
    opt_line(out, "guest_timeout", dq(&vm.guest_timeout));
    opt_line(out, "boot_timeout", dq(&vm.boot_timeout));
    opt_line(out, "on_guest_loss", s(vm.on_guest_loss));
    opt_line(out, "placement", s(vm.placement));
    opt_line(out, "failback", vm.failback.map(|b| b.to_string()));
    let requires = earlier(vm.requires, i, vm_names);
    if !requires.is_empty() {
        writeln!(out, "requires = {}", q_list(&requires)).unwrap();
    }
    match &vm.driver {
        GenDriver::Qemu {
            explicit,
            memory_mb,
            cpus,
            accel,
            boot,
            extra_args,
        } => {
            if *explicit {
                writeln!(out, "driver = \"qemu\"").unwrap();
            }
            writeln!(out, "[vm.qemu]").unwrap();
            opt_line(out, "memory_mb", memory_mb.map(|m| m.to_string()));
            opt_line(out, "cpus", cpus.map(|c| c.to_string()));
            opt_line(out, "accel", s(*accel));
            if !extra_args.is_empty() {
                writeln!(out, "extra_args = {}", q_list(extra_args)).unwrap();
            }
            match boot {
                Boot::Disk(p) => writeln!(out, "disk = {}", q(p)).unwrap(),
                Boot::Kernel(initrd, append) => {
                    writeln!(out, "kernel = \"/boot/vmlinuz\"").unwrap();
                    opt_line(out, "initrd", initrd.as_deref().map(q));
                    opt_line(out, "append", append.as_deref().map(q));
                }
                Boot::Disks(disks, false) => {
                    let items: Vec<String> = disks
                        .iter()
                        .map(|d| {
                            let mut t = format!("{{ path = {}", q(&d.path));
                            if let Some(f) = d.format {
                                write!(t, ", format = \"{f}\"").unwrap();
                            }
                            if let Some(c) = d.cache {
                                write!(t, ", cache = \"{c}\"").unwrap();
                            }
                            t + " }"
                        })
                        .collect();
                    writeln!(out, "disks = [{}]", items.join(", ")).unwrap();
                }
                Boot::Disks(disks, true) => {
                    for d in disks {
                        writeln!(out, "[[vm.qemu.disks]]\npath = {}", q(&d.path)).unwrap();
                        opt_line(out, "format", d.format.map(q));
                        opt_line(out, "cache", d.cache.map(q));
                    }
                }
            }
        }
        GenDriver::Libvirt { domain, uri } => {
            writeln!(out, "driver = \"libvirt\"").unwrap();
            if domain.is_some() || uri.is_some() {
                writeln!(out, "[vm.libvirt]").unwrap();
                opt_line(out, "domain", domain.as_deref().map(q));
                opt_line(out, "uri", uri.as_deref().map(q));
            }
        }
    }
    let app_names = unique(vm.apps.iter().map(|a| a.name.clone()));
    // The `critical` policy needs a critical app: the generator makes the first one critical.
    let force_critical = vm.policy == Some("critical");
    for (j, app) in vm.apps.iter().enumerate() {
        writeln!(out, "\n[[vm.app]]\nname = {}", q(&app_names[j])).unwrap();
        opt_line(out, "priority", app.priority.map(|p| p.to_string()));
        writeln!(
            out,
            "check = {}\nstart = {}",
            q_list(&app.check),
            q_list(&app.start)
        )
        .unwrap();
        opt_line(out, "stop", app.stop.as_deref().map(q_list));
        opt_line(out, "interval", dq(&app.interval));
        opt_line(out, "timeout", dq(&app.timeout));
        opt_line(
            out,
            "restart_limit",
            app.restart_limit.map(|n| n.to_string()),
        );
        opt_line(out, "restart_window", dq(&app.restart_window));
        opt_line(out, "stable_after", dq(&app.stable_after));
        opt_line(
            out,
            "probe_failures",
            app.probe_failures.map(|n| n.to_string()),
        );
        let critical = if force_critical && j == 0 {
            Some(true)
        } else {
            app.critical
        };
        opt_line(out, "critical", critical.map(|b| b.to_string()));
        let requires = earlier(app.requires, j, &app_names);
        if !requires.is_empty() {
            writeln!(out, "requires = {}", q_list(&requires)).unwrap();
        }
    }
}

/// The parsed configuration holds what was written, or the documented default.
fn check_values(g: &GenConfig, c: &Config) {
    assert_eq!(c.hosts.len(), g.hosts.len());
    assert_eq!(c.vms.len(), g.vms.len());
    assert_eq!(
        matches!(c.cluster.store, Store::Etcd { .. }),
        g.etcd.is_some() || g.hosts.len() > 1
    );
    let host_names = unique(g.hosts.iter().map(|h| h.0.clone()));
    for (i, (gh, h)) in g.hosts.iter().zip(&c.hosts).enumerate() {
        assert_eq!(h.name.as_str(), host_names[i]);
        assert_eq!(h.address, gh.1.map(|a| format!("10.1.0.{a}")));
        assert_eq!(h.memory_mb, gh.2);
        let (device, timeout) = watchdog(g, i).unzip();
        assert_eq!(h.watchdog, device.map(std::path::PathBuf::from));
        assert_eq!(
            h.watchdog_timeout,
            timeout
                .flatten()
                .as_ref()
                .map_or(d::WATCHDOG_TIMEOUT, Dur::get)
        );
        if let (Some(_), Some((ttl, margin))) = (&h.watchdog, lease(g)) {
            assert!(h.watchdog_timeout < ttl - margin);
        }
    }
    let vm_names = unique(g.vms.iter().map(|v| v.name.clone()));
    for ((gv, v), i) in g.vms.iter().zip(&c.vms).zip(0..) {
        assert_eq!(v.name.as_str(), vm_names[i]);
        let want: Vec<String> = earlier(gv.requires, i, &vm_names);
        let got: Vec<&str> = v.requires.iter().map(|n| n.as_str()).collect();
        assert_eq!(got, want);
        assert_eq!(
            v.vm_restart_limit,
            gv.vm_restart_limit.unwrap_or(d::VM_RESTART_LIMIT)
        );
        assert_eq!(
            v.stop_timeout,
            gv.stop_timeout.as_ref().map_or(d::STOP_TIMEOUT, Dur::get)
        );
        assert_eq!(v.failback, gv.failback.unwrap_or(d::FAILBACK));
        match (&gv.driver, &v.driver) {
            (
                GenDriver::Qemu {
                    memory_mb, cpus, ..
                },
                Driver::Qemu(q),
            ) => {
                assert_eq!(q.memory_mb, memory_mb.unwrap_or(d::QEMU_MEMORY_MB));
                assert_eq!(q.cpus, cpus.unwrap_or(d::QEMU_CPUS));
            }
            (GenDriver::Libvirt { domain, .. }, Driver::Libvirt(l)) => {
                assert_eq!(&l.domain, domain.as_ref().unwrap_or(&vm_names[i]));
            }
            (g, c) => panic!("driver mismatch: {g:?} vs {c:?}"),
        }
        let app_names = unique(gv.apps.iter().map(|a| a.name.clone()));
        for ((ga, a), j) in gv.apps.iter().zip(&v.apps).zip(0..) {
            assert_eq!(a.name.as_str(), app_names[j]);
            assert_eq!(a.priority, ga.priority.unwrap_or(d::APP_PRIORITY));
            assert_eq!(a.check, ga.check);
            assert_eq!(a.stop, ga.stop);
            assert_eq!(
                a.interval,
                ga.interval.as_ref().map_or(d::APP_INTERVAL, Dur::get)
            );
            assert_eq!(
                a.stable_after,
                ga.stable_after
                    .as_ref()
                    .map_or(d::APP_STABLE_AFTER, Dur::get)
            );
            let want: Vec<String> = earlier(ga.requires, j, &app_names);
            let got: Vec<&str> = a.requires.iter().map(|n| n.as_str()).collect();
            assert_eq!(got, want);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_configs_parse_and_show_round_trips(g in gen_config()) {
        let text = render(&g);
        let config = Config::from_toml_str(&text, "<generated>")
            .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        check_values(&g, &config);

        let shown = config.to_toml();
        let back = Config::from_toml_str(&shown, "<show>")
            .unwrap_or_else(|e| panic!("{e}\n---\n{shown}"));
        prop_assert_eq!(&back, &config);

        let json: serde_json::Value = serde_json::from_str(&config.to_json()).unwrap();
        let from_json = Config::from_toml_str(&toml::to_string(&json).unwrap(), "<show --json>")
            .unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(&from_json, &config);
    }
}
