//! A probe and an app's start or stop in flight at the same time: the guest runs them
//! concurrently, so a probe sent before the command may have run its check before the command
//! changed the app. Its outcome for that app says nothing about the app now and is ignored —
//! the next probe tells (CI once saw an admin stop undone this way: the stale "running" cleared
//! the offline flag, the next probe found the app down and restarted it).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::name;

use vmha_engine::{
    AdminCommand, HostAction, HostActionKind, HostAgent, HostInput, ProbeOutcome, Timestamp,
    VmObservation,
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
priority = 100
check = ["check", "db"]
start = ["start", "db"]
stop = ["stop", "db"]
[[vm.app]]
name = "worker"
priority = 10
check = ["check", "worker"]
start = ["start", "worker"]
stop = ["stop", "worker"]
"#;

/// A host agent whose VM `shop` runs with both apps online, at time `now`; actions answered.
struct Host {
    agent: HostAgent,
    now: u64,
}

impl Host {
    fn running() -> Host {
        let mut h = Host {
            agent: common::owning_agent(CONFIG, "shop"),
            now: 0,
        };
        // Answer everything (probes: running) until both apps are online.
        for _ in 0..50 {
            while let Some(a) = h.agent.poll_action() {
                h.answer(a, ProbeOutcome::Running);
            }
            if h.state("db") == AppState::Online && h.state("worker") == AppState::Online {
                return h;
            }
            h.advance(500);
        }
        panic!("shop never came online: {:?}", h.agent.status());
    }

    fn input(&mut self, input: HostInput) {
        self.agent.handle_input(Timestamp(self.now), input);
    }

    fn advance(&mut self, ms: u64) {
        common::advance(&mut self.agent, &mut self.now, ms);
    }

    /// Answers `a`: a probe with db running and worker as `worker`, everything else `Ok`.
    fn answer(&mut self, a: HostAction, worker: ProbeOutcome) {
        match a.kind {
            HostActionKind::Probe { .. } => self.input(probe_result(&a, worker)),
            HostActionKind::StartVm { vm } => {
                self.input(HostInput::ActionResult {
                    id: a.id,
                    result: Ok(()),
                });
                self.input(HostInput::VmObserved {
                    vm,
                    kind: VmObservation::Running,
                });
            }
            _ => self.input(HostInput::ActionResult {
                id: a.id,
                result: Ok(()),
            }),
        }
    }

    /// Runs time forward until the agent sends a probe that checks worker (others answered:
    /// the apps as they are); returns it unanswered.
    fn next_probe(&mut self) -> HostAction {
        for _ in 0..1000 {
            while let Some(a) = self.agent.poll_action() {
                if let HostActionKind::Probe { checks, .. } = &a.kind
                    && checks.iter().any(|c| c.app.as_str() == "worker")
                {
                    return a;
                }
                let worker = match self.state("worker") {
                    AppState::Offline => ProbeOutcome::NotRunning(ExitStatus::Code(3)),
                    _ => ProbeOutcome::Running,
                };
                self.answer(a, worker);
            }
            self.advance(100);
        }
        panic!("no probe of worker sent");
    }

    fn command(&mut self, cmd: AdminCommand) -> HostAction {
        self.agent.command(Timestamp(self.now), cmd).unwrap();
        self.agent.poll_action().expect("the command's action")
    }

    /// The guest ran `action` (a start or stop) successfully.
    fn succeeded(&mut self, action: &HostAction) {
        self.input(HostInput::ActionResult {
            id: action.id,
            result: Ok(()),
        });
    }

    fn app(&self, app: &str) -> vmha_engine::AppStatus {
        common::app_status(&self.agent, app)
    }

    fn state(&self, app: &str) -> AppState {
        self.app(app).state
    }
}

/// The answer to `probe`: db running, worker as `worker`.
fn probe_result(probe: &HostAction, worker: ProbeOutcome) -> HostInput {
    let HostActionKind::Probe { vm, checks } = &probe.kind else {
        panic!("not a probe: {probe:?}");
    };
    let outcomes = checks
        .iter()
        .map(|c| {
            let o = if c.app.as_str() == "worker" {
                worker
            } else {
                ProbeOutcome::Running
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

#[test]
fn a_probe_sent_before_an_admin_stop_does_not_undo_it() {
    let mut h = Host::running();
    let probe = h.next_probe();
    let stop = h.command(AdminCommand::AppStop {
        vm: name("shop"),
        app: name("worker"),
    });
    assert!(
        matches!(stop.kind, HostActionKind::StopApp { .. }),
        "{stop:?}"
    );
    h.advance(50);
    h.succeeded(&stop);
    assert_eq!(h.state("worker"), AppState::Offline);
    // The probe's check ran before the stop: it saw worker running.
    h.advance(30);
    h.input(probe_result(&probe, ProbeOutcome::Running));
    assert_eq!(
        h.state("worker"),
        AppState::Offline,
        "{:?}",
        h.app("worker")
    );
    assert!(
        h.app("worker").offline.is_some(),
        "the offline flag was cleared"
    );
    assert_eq!(h.state("db"), AppState::Online);
    // The next probe is the truth: worker down and flagged offline stays offline.
    let next = h.next_probe();
    h.input(probe_result(
        &next,
        ProbeOutcome::NotRunning(ExitStatus::Code(3)),
    ));
    assert_eq!(h.state("worker"), AppState::Offline);
    assert_eq!(h.app("worker").restarts_in_window, 0);
    assert_eq!(h.agent.poll_action(), None, "nothing to do");
}

#[test]
fn a_probe_sent_before_an_admin_start_does_not_count_a_failure() {
    let mut h = Host::running();
    // worker stopped by the admin, and seen offline.
    let stop = h.command(AdminCommand::AppStop {
        vm: name("shop"),
        app: name("worker"),
    });
    h.succeeded(&stop);
    let probe = h.next_probe();
    let start = h.command(AdminCommand::AppStart {
        vm: name("shop"),
        app: name("worker"),
    });
    assert!(
        matches!(start.kind, HostActionKind::StartApp { .. }),
        "{start:?}"
    );
    h.succeeded(&start);
    // The probe's check ran before the start: it saw worker down.
    h.input(probe_result(
        &probe,
        ProbeOutcome::NotRunning(ExitStatus::Code(3)),
    ));
    assert_eq!(
        h.app("worker").restarts_in_window,
        0,
        "{:?}",
        h.app("worker")
    );
    assert_ne!(h.state("worker"), AppState::Restarting);
    assert_ne!(h.state("worker"), AppState::Faulted);
    assert_eq!(h.agent.poll_action(), None, "a restart of worker");
    // The next probe is the truth: worker started.
    let next = h.next_probe();
    h.input(probe_result(&next, ProbeOutcome::Running));
    assert_eq!(h.state("worker"), AppState::Online, "{:?}", h.app("worker"));
    assert_eq!(h.app("worker").restarts_in_window, 0);
}
