//! Property tests over random input sequences on small random clusters (simulated):
//! - a VM group never runs on two hosts (running: its vCPUs run; the incoming QEMU of a live
//!   migration and the source's QEMU paused after one are not running); a frozen group gets no start/stop/kill action; an app
//!   never starts before what it requires is online; persisted state never changes without its
//!   dirty mark (all checked by the simulator) — also while the cluster store fails, daemons
//!   restart and commands arrive through any host;
//! - app and VM restarts never exceed their budget in any window;
//! - determinism: the same sequence twice gives the identical log;
//! - an app is `faulted` only with its restart budget spent, or when it cannot be restarted (a
//!   required app down, the group frozen): a failed start with budget left is never a fault.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use proptest::prelude::*;
use vmha_engine::AdminCommand;
use vmha_engine::sim::{CrashKind, Sim, SimCommand, StartBehaviour};
use vmha_model::{Config, Name, PauseReason};

#[derive(Debug, Clone)]
struct AppSpec {
    priority: u32,
    requires: Vec<usize>,
    restart_limit: u32,
    critical: bool,
}

#[derive(Debug, Clone)]
struct VmSpec {
    hosts: Vec<usize>,
    policy: usize,
    vm_restart_limit: u32,
    apps: Vec<AppSpec>,
}

#[derive(Debug, Clone)]
struct ClusterSpec {
    hosts: usize,
    vms: Vec<VmSpec>,
}

const POLICIES: [&str; 4] = [
    "highest-priority",
    "weighted",
    "weighted-with-offline",
    "critical",
];

fn app_spec(index: usize) -> impl Strategy<Value = AppSpec> {
    (
        1u32..200,
        proptest::collection::vec(0..index.max(1), 0..=index.min(2)),
        0u32..4,
        any::<bool>(),
    )
        .prop_map(move |(priority, mut requires, restart_limit, critical)| {
            requires.retain(|r| *r < index);
            requires.sort();
            requires.dedup();
            AppSpec {
                priority,
                requires,
                restart_limit,
                critical,
            }
        })
}

fn vm_spec(hosts: usize) -> impl Strategy<Value = VmSpec> {
    (
        Just((0..hosts).collect::<Vec<_>>()).prop_shuffle(),
        1..=hosts,
        0usize..4,
        0u32..3,
        1usize..=4,
    )
        .prop_flat_map(|(order, n, policy, vm_restart_limit, napps)| {
            let apps: Vec<_> = (0..napps).map(app_spec).collect();
            (
                Just(order[..n].to_vec()),
                Just(policy),
                Just(vm_restart_limit),
                apps,
            )
        })
        .prop_map(|(hosts, policy, vm_restart_limit, apps)| VmSpec {
            hosts,
            policy,
            vm_restart_limit,
            apps,
        })
}

fn cluster_spec() -> impl Strategy<Value = ClusterSpec> {
    (2usize..=3).prop_flat_map(|hosts| {
        proptest::collection::vec(vm_spec(hosts), 1..=2)
            .prop_map(move |vms| ClusterSpec { hosts, vms })
    })
}

fn toml(spec: &ClusterSpec) -> String {
    let mut s = String::from(
        "[cluster]\nname = \"p\"\nstore = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n\n",
    );
    for h in 0..spec.hosts {
        s.push_str(&format!("[[host]]\nname = \"h{h}\"\n\n"));
    }
    for (v, vm) in spec.vms.iter().enumerate() {
        let hosts: Vec<String> = vm.hosts.iter().map(|h| format!("\"h{h}\"")).collect();
        s.push_str(&format!(
            "[[vm]]\nname = \"v{v}\"\nhosts = [{}]\npolicy = \"{}\"\nvm_restart_limit = {}\n\
             guest_timeout = \"6s\"\nboot_timeout = \"10s\"\nstop_timeout = \"5s\"\n{}\
             [vm.qemu]\nmemory_mb = 64\ndisk = \"/d/v{v}.qcow2\"\n\n",
            hosts.join(", "),
            POLICIES[vm.policy],
            vm.vm_restart_limit,
            // Every other VM migrates live on drains and moves (a paused or incoming QEMU
            // of it on a second host is not a second run).
            if v % 2 == 0 {
                "migrate = true\nshared_storage = true\n"
            } else {
                ""
            },
        ));
        for (a, app) in vm.apps.iter().enumerate() {
            let req: Vec<String> = app.requires.iter().map(|r| format!("\"a{r}\"")).collect();
            s.push_str(&format!(
                "[[vm.app]]\nname = \"a{a}\"\npriority = {}\ncritical = {}\nrequires = [{}]\n\
                 check = [\"c\"]\nstart = [\"s\"]\nstop = [\"t\"]\nrestart_limit = {}\n\
                 restart_window = \"30s\"\nstable_after = \"1h\"\nprobe_failures = 2\n\n",
                app.priority,
                app.critical || (a == 0 && vm.policy == 3),
                req.join(", "),
                app.restart_limit
            ));
        }
    }
    s
}

fn n(s: String) -> Name {
    Name::new(&s).unwrap()
}

/// A random world/admin command over names that exist (plus the odd unknown one).
/// `budget_safe` leaves out what legitimately re-arms budgets (clear, budget changes, admin
/// restarts, host restarts, guest resets, a store failure or a host cut off from the store across
/// which a daemon restarts) —
/// daemon restarts with a working store stay in: a restart counted before it ran is never
/// counted again, nor lost.
fn command(budget_safe: bool) -> impl Strategy<Value = SimCommand> {
    let vm = (0usize..3).prop_map(|v| n(format!("v{v}")));
    let app = (0usize..5).prop_map(|a| n(format!("a{a}")));
    let host = (0usize..3).prop_map(|h| n(format!("h{h}")));
    let world = prop_oneof![
        4 => (vm.clone(), app.clone(), 1i32..9).prop_map(|(vm, app, exit)| SimCommand::AppFail { vm, app, exit }),
        2 => (vm.clone(), app.clone()).prop_map(|(vm, app)| SimCommand::AppRecover { vm, app }),
        1 => (vm.clone(), app.clone(), any::<bool>()).prop_map(|(vm, app, on)| SimCommand::AppHang { vm, app, on }),
        1 => (vm.clone(), app.clone(), 0usize..3).prop_map(|(vm, app, b)| SimCommand::AppStart {
            vm, app, behaviour: [StartBehaviour::Ok, StartBehaviour::Fails, StartBehaviour::Noop][b] }),
        2 => (vm.clone(), 0usize..3).prop_map(|(vm, k)| SimCommand::VmCrash {
            vm, kind: [CrashKind::Panic, CrashKind::Shutdown, CrashKind::Gone][k] }),
        1 => (vm.clone(), any::<bool>()).prop_map(|(vm, on)| SimCommand::GuestHang { vm, on }),
        1 => (vm.clone(), any::<bool>()).prop_map(|(vm, hang)| if hang {
            SimCommand::QemuHang { vm }
        } else {
            SimCommand::QemuResume { vm }
        }),
        1 => (vm.clone(), any::<bool>()).prop_map(|(vm, on)| SimCommand::ExecBlocked { vm, on }),
        1 => (vm.clone(), app.clone(), any::<bool>()).prop_map(|(vm, app, on)| SimCommand::AppGarble { vm, app, on }),
        1 => (vm.clone(), 0usize..4).prop_map(|(vm, r)| SimCommand::VmPause {
            vm, reason: [PauseReason::Admin, PauseReason::Debug, PauseReason::IoError, PauseReason::GuestPanicked][r] }),
        1 => vm.clone().prop_map(|vm| SimCommand::VmResume { vm }),
        1 => (vm.clone(), any::<bool>()).prop_map(|(vm, on)| SimCommand::BootHang { vm, on }),
        1 => host.clone().prop_map(SimCommand::HostRecover),
        1 => host.clone().prop_map(SimCommand::DaemonRestart),
        1 => (host.clone(), vm.clone(), any::<bool>()).prop_map(|(via, vm, f)| SimCommand::Admin {
            via: Some(via),
            command: if f { AdminCommand::Freeze { vm } } else { AdminCommand::Unfreeze { vm } },
        }),
        1 => (vm.clone(), any::<bool>()).prop_map(|(vm, f)| SimCommand::admin(
            if f { AdminCommand::Freeze { vm } } else { AdminCommand::Unfreeze { vm } })),
        1 => (vm.clone(), app.clone(), any::<bool>()).prop_map(|(vm, app, auto_clear)|
            SimCommand::admin(AdminCommand::AppOffline { vm, app, auto_clear })),
        1 => (vm.clone(), app.clone()).prop_map(|(vm, app)| SimCommand::admin(AdminCommand::AppOnline { vm, app })),
        1 => (vm.clone(), app.clone()).prop_map(|(vm, app)| SimCommand::admin(AdminCommand::AppStop { vm, app })),
        1 => (vm.clone(), app.clone()).prop_map(|(vm, app)| SimCommand::admin(AdminCommand::AppStart { vm, app })),
        1 => (vm.clone(), host.clone(), any::<bool>()).prop_map(|(vm, to, restart)| SimCommand::admin(AdminCommand::VmMove { vm, to, restart })),
        1 => (host.clone(), any::<bool>()).prop_map(|(host, on)| SimCommand::admin(AdminCommand::HostMaintenance { host, on })),
        1 => vm.clone().prop_map(|vm| SimCommand::admin(AdminCommand::VmStop { vm })),
        1 => vm.clone().prop_map(|vm| SimCommand::admin(AdminCommand::VmStart { vm })),
        1 => (vm.clone(), app.clone(), 1u32..300).prop_map(|(vm, app, priority)|
            SimCommand::admin(AdminCommand::SetPriority { vm, app, priority })),
    ];
    let rearming = prop_oneof![
        host.clone().prop_map(SimCommand::HostCrash),
        // While the store fails (or a host is cut off from it), counters live only in memory: a
        // daemon restart then loses them (availability first, documented).
        any::<bool>().prop_map(|on| SimCommand::StoreFail { on }),
        host.clone().prop_map(SimCommand::HostIsolate),
        (host.clone(), vm.clone()).prop_map(|(via, vm)| SimCommand::Admin {
            via: Some(via),
            command: AdminCommand::VmRestart { vm },
        }),
        vm.clone().prop_map(|vm| SimCommand::VmReset { vm }),
        vm.clone()
            .prop_map(|vm| SimCommand::admin(AdminCommand::Clear { vm })),
        vm.clone()
            .prop_map(|vm| SimCommand::admin(AdminCommand::VmRestart { vm })),
    ];
    if budget_safe {
        world.boxed()
    } else {
        prop_oneof![6 => world, 1 => rearming].boxed()
    }
}

fn script(budget_safe: bool) -> impl Strategy<Value = Vec<(u64, SimCommand)>> {
    proptest::collection::vec((0u64..6_000, command(budget_safe)), 1..40)
}

fn run(spec: &ClusterSpec, steps: &[(u64, SimCommand)]) -> Sim {
    let config = Config::from_toml_str(&toml(spec), "prop.toml").unwrap();
    let mut sim = Sim::new(Arc::new(config)).unwrap();
    for (delay, cmd) in steps {
        sim.advance(*delay);
        sim.apply(cmd.clone());
    }
    sim.advance(30_000);
    sim
}

/// Why an app event `… → faulted: REASON` in a log line is not allowed, if it is not.
fn bad_app_fault(line: &str) -> Option<String> {
    let mut words = line.splitn(4, ' ');
    let (_, _, object, rest) = (words.next()?, words.next()?, words.next()?, words.next()?);
    let reason = rest.split_once(" → faulted: ")?.1;
    if !object.contains('/') {
        return None;
    }
    if let Some((_, after)) = reason.rsplit_once("restart budget ") {
        let used = after.split_whitespace().next()?;
        let (n, limit) = used.split_once('/')?;
        let (n, limit): (u32, u32) = (n.parse().ok()?, limit.parse().ok()?);
        return (n < limit).then(|| format!("faulted with budget left ({used}): {line}"));
    }
    let blocked = reason.contains("requires ") || reason.contains("frozen");
    (!blocked).then(|| format!("faulted without a spent budget: {line}"))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn safety_rules_hold(spec in cluster_spec(), steps in script(false)) {
        let sim = run(&spec, &steps);
        prop_assert!(sim.violations().is_empty(), "{:?}\n{}", sim.violations(), sim.log().join("\n"));
    }

    #[test]
    fn apps_fault_only_with_budget_spent_or_blocked(spec in cluster_spec(), steps in script(false)) {
        let sim = run(&spec, &steps);
        let bad: Vec<String> = sim.log().iter().filter_map(|l| bad_app_fault(l)).collect();
        prop_assert!(bad.is_empty(), "{}\n{}", bad.join("\n"), sim.log().join("\n"));
    }

    #[test]
    fn deterministic(spec in cluster_spec(), steps in script(false)) {
        let a = run(&spec, &steps);
        let b = run(&spec, &steps);
        prop_assert_eq!(a.log(), b.log());
        prop_assert_eq!(a.actions(), b.actions());
    }

    #[test]
    fn restarts_stay_within_budget(spec in cluster_spec(), steps in script(true)) {
        let sim = run(&spec, &steps);
        let restarts = sim.restarts();
        // App budgets: counted since the VM last booted on that host (a fresh guest re-arms them).
        let boots: Vec<(usize, &Name, &Name)> = sim
            .actions()
            .iter()
            .enumerate()
            .filter_map(|(i, (_, h, a))| match &a.kind {
                vmha_engine::HostActionKind::StartVm { vm } => Some((i, h, vm)),
                _ => None,
            })
            .collect();
        for (v, vm) in spec.vms.iter().enumerate() {
            let vname = format!("v{v}");
            for (a, app) in vm.apps.iter().enumerate() {
                let aname = format!("a{a}");
                let times: Vec<(usize, u64, &Name)> = restarts
                    .iter()
                    .filter(|r| r.vm.as_str() == vname && r.app.as_ref().is_some_and(|x| x.as_str() == aname))
                    .map(|r| (r.seq, r.time.0, &r.host))
                    .collect();
                for &(seq, t, host) in &times {
                    let boot = boots
                        .iter()
                        .filter(|(bi, bh, bv)| *bi < seq && *bh == host && bv.as_str() == vname)
                        .map(|(bi, _, _)| *bi)
                        .max()
                        .unwrap_or(0);
                    let in_window = times
                        .iter()
                        .filter(|(s, x, h)| *h == host && *s <= seq && *s > boot && t - *x < 30_000)
                        .count();
                    prop_assert!(in_window as u32 <= app.restart_limit,
                        "{vname}/{aname}: {in_window} restarts in 30s > {}\n{}", app.restart_limit, sim.log().join("\n"));
                }
            }
            let vm_times: Vec<(u64, &Name)> = restarts
                .iter()
                .filter(|r| r.vm.as_str() == vname && r.app.is_none())
                .map(|r| (r.time.0, &r.host))
                .collect();
            for &(t, host) in &vm_times {
                let in_window = vm_times.iter().filter(|(x, h)| *h == host && *x <= t && t - *x < 3_600_000).count();
                prop_assert!(in_window as u32 <= vm.vm_restart_limit,
                    "{vname}: {in_window} VM restarts > {}\n{}", vm.vm_restart_limit, sim.log().join("\n"));
            }
        }
    }
}
