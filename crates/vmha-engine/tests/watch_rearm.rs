//! A watcher that said an app was gone is replaced only once the probe it brought forward has
//! answered: a watcher started at once would only find the dead process, and would compete with
//! that probe for the guest channel and the guest's CPU on the detection's critical path. A
//! probe that fails does not keep the watch off. A watcher that ran the app's check itself
//! needs no probe: its outcome counts as the probe's would.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::name;

use vmha_engine::{
    ActionError, HostAction, HostActionKind, HostAgent, HostInput, ProbeOutcome, Timestamp,
    VmObservation, WatchEnd, WatchReport,
};
use vmha_model::{AppState, ExitStatus};

const CONFIG: &str = r#"
[cluster]
name = "c"

[[host]]
name = "kvm1"

[[vm]]
name = "shop"
hosts = ["kvm1"]
[vm.qemu]
memory_mb = 256
disk = "/shop.qcow2"
[[vm.app]]
name = "db"
interval = "1h"
check = ["check", "db"]
start = ["start", "db"]
stop = ["stop", "db"]
pid_file = "/run/db.pid"
[[vm.app]]
name = "worker"
interval = "1h"
check = ["check", "worker"]
start = ["start", "worker"]
stop = ["stop", "worker"]
pid_file = "/run/worker.pid"
"#;

/// A host agent running `shop`, its actions answered by hand, at time `now`.
struct Host {
    agent: HostAgent,
    now: u64,
    /// Whether the guest's worker runs (what probes answer).
    worker_up: bool,
}

impl Host {
    fn new() -> Host {
        Host {
            agent: common::owning_agent(CONFIG, "shop"),
            now: 0,
            worker_up: true,
        }
    }

    fn input(&mut self, input: HostInput) {
        self.agent.handle_input(Timestamp(self.now), input);
    }

    fn advance(&mut self, ms: u64) {
        common::advance(&mut self.agent, &mut self.now, ms);
    }

    /// The probe's answer as the guest stands.
    fn probe_result(&self, probe: &HostAction) -> HostInput {
        let HostActionKind::Probe { vm, checks } = &probe.kind else {
            panic!("not a probe: {probe:?}");
        };
        let outcomes = checks
            .iter()
            .map(|c| {
                let up = c.app.as_str() != "worker" || self.worker_up;
                let o = if up {
                    ProbeOutcome::Running
                } else {
                    ProbeOutcome::NotRunning(ExitStatus::Code(3))
                };
                (c.app.clone(), o)
            })
            .collect();
        HostInput::ProbeResult {
            id: probe.id,
            vm: vm.clone(),
            outcomes,
        }
    }

    /// Runs for `ms`, answering every action but watches (returned, unanswered) and, when
    /// `hold_probes`, probes (returned, unanswered).
    fn run(&mut self, ms: u64, hold_probes: bool) -> Vec<HostAction> {
        let mut held = Vec::new();
        for _ in 0..ms / 100 {
            while let Some(a) = self.agent.poll_action() {
                match &a.kind {
                    HostActionKind::Watch { .. } => held.push(a),
                    HostActionKind::Probe { .. } if hold_probes => held.push(a),
                    HostActionKind::Probe { .. } => {
                        let r = self.probe_result(&a);
                        self.input(r);
                    }
                    HostActionKind::StartVm { vm } => {
                        let vm = vm.clone();
                        self.input(HostInput::ActionResult {
                            id: a.id,
                            result: Ok(()),
                        });
                        self.input(HostInput::VmObserved {
                            vm,
                            kind: VmObservation::Running,
                        });
                    }
                    HostActionKind::StartApp { app, .. } => {
                        if app.as_str() == "worker" {
                            self.worker_up = true;
                        }
                        self.input(HostInput::ActionResult {
                            id: a.id,
                            result: Ok(()),
                        });
                    }
                    _ => self.input(HostInput::ActionResult {
                        id: a.id,
                        result: Ok(()),
                    }),
                }
            }
            self.advance(100);
        }
        held
    }

    fn state(&self, app: &str) -> AppState {
        common::app_status(&self.agent, app).state
    }

    /// Brings shop online and returns its watcher.
    fn watched() -> (Host, HostAction) {
        let mut h = Host::new();
        let held = h.run(5_000, false);
        assert_eq!(h.state("worker"), AppState::Online);
        let [watch] = <[HostAction; 1]>::try_from(held).unwrap();
        (h, watch)
    }

    /// The watcher says worker is gone (it was killed in the guest), with the outcome of the
    /// check it ran then (`None`: it ran none).
    fn worker_killed(&mut self, watch: &HostAction, checked: Option<ProbeOutcome>) {
        self.worker_up = false;
        self.worker_gone(watch, checked);
    }

    /// The watcher says worker is gone, with the outcome of the check it ran then.
    fn worker_gone(&mut self, watch: &HostAction, checked: Option<ProbeOutcome>) {
        self.input(HostInput::WatchResult {
            id: watch.id,
            vm: name("shop"),
            report: WatchReport {
                end: WatchEnd::Gone(name("worker")),
                not_found: Vec::new(),
                checked,
            },
        });
    }

    /// Within `ms`, worker is online again and a watcher is started (nothing else held).
    fn online_and_watched_again(&mut self, ms: u64) {
        let held = self.run(ms, false);
        assert_eq!(self.state("worker"), AppState::Online);
        assert_eq!(kinds(&held), ["watch"], "{held:?}");
    }
}

fn kinds(actions: &[HostAction]) -> Vec<&'static str> {
    actions
        .iter()
        .map(|a| match a.kind {
            HostActionKind::Watch { .. } => "watch",
            HostActionKind::Probe { .. } => "probe",
            _ => "other",
        })
        .collect()
}

#[test]
fn the_watcher_is_replaced_after_the_probe_it_brought_forward_answered() {
    let (mut h, watch) = Host::watched();
    h.worker_killed(&watch, None);
    // The probe goes out at once; no watcher while it runs, however long it takes.
    let held = h.run(10_000, true);
    assert_eq!(kinds(&held), ["probe"], "{held:?}");
    let r = h.probe_result(&held[0]);
    h.input(r);
    // It found worker down: worker is restarted, and then watched again.
    h.online_and_watched_again(5_000);
}

#[test]
fn a_failed_probe_frees_the_watch() {
    let (mut h, watch) = Host::watched();
    h.worker_killed(&watch, None);
    let held = h.run(1_000, true);
    assert_eq!(kinds(&held), ["probe"], "{held:?}");
    h.worker_up = true;
    h.input(HostInput::ActionResult {
        id: held[0].id,
        result: Err(ActionError::GuestUnreachable {
            detail: "agent timed out".into(),
        }),
    });
    // The guest answers again: a watcher is started again, not only after the next interval
    // probe an hour later.
    let held = h.run(60_000, false);
    assert!(kinds(&held).contains(&"watch"), "{held:?}");
}

#[test]
fn the_watchers_own_check_fails_the_app_without_a_probe() {
    let (mut h, watch) = Host::watched();
    h.worker_killed(&watch, Some(ProbeOutcome::NotRunning(ExitStatus::Code(3))));
    // Restarted at once on the watcher's check: no probe, and then watched again.
    let worker = common::app_status(&h.agent, "worker");
    assert_eq!(worker.state, AppState::Restarting, "{worker:?}");
    assert_eq!(worker.restarts_in_window, 1, "{worker:?}");
    assert!(worker.reason.contains("checked by the watch"), "{worker:?}");
    h.online_and_watched_again(5_000);
}

#[test]
fn a_watcher_whose_check_passes_is_rearmed_only_after_a_backoff() {
    let (mut h, watch) = Host::watched();
    h.worker_gone(&watch, Some(ProbeOutcome::Running));
    assert_eq!(h.state("worker"), AppState::Online);
    // A guest that says "gone" while the check passes cannot make vmha re-arm in a loop.
    let held = h.run(900, true);
    assert!(held.is_empty(), "{held:?}");
    let held = h.run(500, true);
    assert_eq!(kinds(&held), ["watch"], "{held:?}");
}

/// A probe that sees the death first restarts the app; the watcher's report of that death,
/// coming after, is old news: it neither probes again nor holds the next watcher back as a
/// false alarm would (before, each such race cost a backoff of 1 s, doubling, and the next
/// kills went unwatched).
#[test]
fn a_late_gone_for_an_app_already_restarted_is_no_false_alarm() {
    let (mut h, watch) = Host::watched();
    h.worker_up = false;
    // The interval probe finds worker down before the watcher's report.
    let probe = loop {
        let held = h.run(100, true);
        if let Some(p) = held
            .into_iter()
            .find(|a| kinds(std::slice::from_ref(a)) == ["probe"])
        {
            break p;
        }
        assert!(h.now < 3_600_000 * 2, "no interval probe");
    };
    let r = h.probe_result(&probe);
    h.input(r);
    assert_eq!(h.state("worker"), AppState::Restarting);
    h.worker_gone(&watch, Some(ProbeOutcome::NotRunning(ExitStatus::Code(3))));
    // Restarted once, online again, and watched again at once: no backoff.
    h.online_and_watched_again(500);
    assert_eq!(common::app_status(&h.agent, "worker").restarts_in_window, 1);
}
