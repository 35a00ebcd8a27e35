//! Safety checks the simulator runs while it plays a script (SPEC §4.6 and the engine's own
//! guarantees); every breach is recorded in [`Sim::violations`].

use vmha_model::{AppState, Name};

use crate::host_io::{HostAction, HostActionKind};
use crate::node::Node;
use crate::records::{Record, RecordKey};

use super::{Restart, Sim};

impl Sim {
    /// A VM group never runs on two hosts at once.
    pub(super) fn check_single_run(&mut self) {
        for v in &self.config.vms {
            let on = self.running_on(v.name.as_str());
            if on.len() > 1 {
                let hosts: Vec<&str> = on.iter().map(Name::as_str).collect();
                let msg = format!("{} {} runs on {}", self.now, v.name, hosts.join(" and "));
                if !self.violations.contains(&msg) {
                    self.violations.push(msg);
                }
            }
        }
    }

    /// No action but a probe or a ping on a frozen group (self-fencing excepted); no app started before
    /// what it requires is online. Also records in-guest restarts for the budget checks.
    pub(super) fn check_action(&mut self, h: usize, a: &HostAction) {
        let Some(agent) = self.hosts[h].node.as_ref().map(Node::agent) else {
            return;
        };
        let (vm, app) = match &a.kind {
            HostActionKind::Probe { .. }
            | HostActionKind::PingGuest { .. }
            | HostActionKind::Watch { .. } => return,
            HostActionKind::StartApp { vm, app, .. } => (vm, Some(app)),
            HostActionKind::StopApp { vm, .. }
            | HostActionKind::StartVm { vm }
            | HostActionKind::StopVm { vm, .. }
            | HostActionKind::KillVm { vm }
            | HostActionKind::PrepareIncoming { vm }
            | HostActionKind::Migrate { vm, .. }
            | HostActionKind::CancelMigration { vm } => (vm, None),
        };
        let status = agent.status();
        let Some(vs) = status.vms.iter().find(|v| &v.name == vm) else {
            return;
        };
        if vs.frozen && !a.reason.starts_with("self-fencing") {
            self.violations.push(format!(
                "{} {} acted on frozen {vm}: {:?}",
                self.now, self.hosts[h].name, a.kind
            ));
        }
        let Some(app) = app else {
            return;
        };
        let Some(cfg) = self
            .config
            .vm(vm.as_str())
            .and_then(|v| v.app(app.as_str()))
        else {
            return;
        };
        for r in &cfg.requires {
            let online = vs
                .apps
                .iter()
                .any(|s| &s.name == r && s.state == AppState::Online);
            if !online {
                self.violations.push(format!(
                    "{} {vm}/{app} started while {r} is not online",
                    self.now
                ));
            }
        }
        if vs
            .apps
            .iter()
            .any(|s| &s.name == app && s.state == AppState::Restarting)
        {
            self.restarts.push(Restart {
                seq: self.actions.len(),
                time: self.now,
                host: self.hosts[h].name.clone(),
                vm: vm.clone(),
                app: Some(app.clone()),
            });
        }
    }

    /// Persisted data changes only together with its dirty mark: once a node has nothing left
    /// to hand out, what the store holds for it must equal what it would persist now.
    pub(super) fn check_persisted(&mut self) {
        let now = self.now;
        for h in 0..self.hosts.len() {
            if !self.hosts[h].connected || self.store.failing {
                continue;
            }
            let Some(node) = self.hosts[h].node.as_ref() else {
                continue;
            };
            if !node.idle() {
                // A commit is still due (retried after a failure): nothing to compare yet.
                continue;
            }
            let name = &self.hosts[h].name;
            let stored = self.store.node_state(name).unwrap_or_default();
            if stored.agent != node.agent().state() {
                self.violations.push(format!(
                    "{now} {name}: host-local state changed without being persisted"
                ));
            }
            for vm in &self.hosts[h].vms {
                let owner = match self.store.get(&RecordKey::Owner(vm.clone())) {
                    Some(Record::Owner {
                        record: Some(r), ..
                    }) => r.owner.clone(),
                    _ => None,
                };
                if owner.as_ref() != Some(name) {
                    continue;
                }
                let stored = match self.store.get(&RecordKey::Settings(vm.clone())) {
                    Some(Record::Settings { settings, .. }) => settings.clone().unwrap_or_default(),
                    _ => Default::default(),
                };
                if node.agent().settings(vm).unwrap_or_default() != stored {
                    self.violations.push(format!(
                        "{now} {name}: settings of {vm} changed without being persisted"
                    ));
                }
            }
            if let Some(c) = node.controller() {
                let stored = match self.store.get(&RecordKey::Controller) {
                    Some(Record::Controller { state }) => state.clone().unwrap_or_default(),
                    _ => Default::default(),
                };
                if stored != c.state() {
                    self.violations.push(format!(
                        "{now} {name}: controller state changed without being persisted"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use vmha_model::Config;

    use crate::ids::ActionId;

    use super::*;

    /// The shipped example cluster, started and settled: db01 (postgres, then pgbouncer which
    /// requires it) online on kvm1.
    fn settled() -> Sim {
        let text = include_str!("../../../../examples/three-hosts-etcd.toml");
        let config = Arc::new(Config::from_toml_str(text, "three-hosts-etcd.toml").unwrap());
        let mut sim = Sim::new(config).unwrap();
        sim.run_script("+5s tick\n").unwrap();
        assert_eq!(sim.running_on("db01"), vec![Name::new("kvm1").unwrap()]);
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());
        sim
    }

    fn action(kind: HostActionKind, reason: &str) -> HostAction {
        HostAction {
            id: ActionId(9999),
            kind,
            reason: reason.to_string(),
        }
    }

    fn db01() -> Name {
        Name::new("db01").unwrap()
    }

    #[test]
    fn an_action_on_a_frozen_group_is_a_violation_probes_and_self_fencing_are_not() {
        let mut sim = settled();
        let kvm1 = sim.host_idx(&Name::new("kvm1").unwrap()).unwrap();
        let stop = action(
            HostActionKind::StopVm {
                vm: db01(),
                timeout: Duration::from_secs(60),
            },
            "crafted",
        );
        // Not frozen yet: stopping it is no breach.
        sim.check_action(kvm1, &stop);
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());

        sim.run_script("+0 admin freeze db01\n+1s tick\n").unwrap();
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());
        let ping = action(
            HostActionKind::PingGuest {
                vm: db01(),
                timeout: Duration::from_secs(1),
                check_exec: false,
            },
            "crafted",
        );
        sim.check_action(kvm1, &ping);
        let fence = action(
            HostActionKind::KillVm { vm: db01() },
            "self-fencing: lease lost",
        );
        sim.check_action(kvm1, &fence);
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());

        sim.check_action(kvm1, &stop);
        let at = sim.now();
        assert_eq!(
            sim.violations(),
            [format!(
                "{at} kvm1 acted on frozen db01: StopVm {{ vm: Name(\"db01\"), timeout: 60s }}"
            )]
        );
    }

    #[test]
    fn an_app_started_before_what_it_requires_is_online_is_a_violation() {
        let config = Arc::new(
            Config::from_toml_str(
                include_str!("../../../../examples/three-hosts-etcd.toml"),
                "three-hosts-etcd.toml",
            )
            .unwrap(),
        );
        // At 0 db01 is starting on kvm1: postgres is not online yet.
        let mut sim = Sim::new(config).unwrap();
        let kvm1 = sim.host_idx(&Name::new("kvm1").unwrap()).unwrap();
        let start = |app: &str| {
            action(
                HostActionKind::StartApp {
                    vm: db01(),
                    app: Name::new(app).unwrap(),
                    argv: vec!["true".to_string()],
                },
                "crafted",
            )
        };
        sim.check_action(kvm1, &start("postgres"));
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());
        sim.check_action(kvm1, &start("pgbouncer"));
        assert_eq!(
            sim.violations(),
            ["0 db01/pgbouncer started while postgres is not online"]
        );

        // Once postgres is online, starting pgbouncer is in order.
        let mut sim = settled();
        sim.check_action(kvm1, &start("pgbouncer"));
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    }
}
