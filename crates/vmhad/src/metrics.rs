//! vmhad's Prometheus metrics, served at `GET /metrics` in the Prometheus text format (0.0.4).
//!
//! Where each number comes from (the engine stays pure: vmhad derives them from what it
//! already handles):
//! - states (`vmha_host_state`, `vmha_vm_state`, `vmha_app_state`, restart counts in the
//!   window, controller, store health): the same [`StatusView`] as `GET /v1/status`, taken at
//!   each scrape — the two always agree;
//! - restarts and failovers: the engine's events as the core runs them ([`Metrics::event`]);
//! - decisions: the decision records of each VM's status, each counted once
//!   ([`Metrics::decisions`]);
//! - probe latency and guest-channel errors: the executor and the VM slots, around the real
//!   guest calls;
//! - store latency and errors: the core's commits and the controller's ownership writes.
//!
//! Label values are bounded: names from the configuration, states, and fixed reason and kind
//! words (the free-text reasons are classified, never copied into a label).
//!
//! One vmhad runs per process, so the metrics are process-wide ([`METRICS`]).

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vmha_api::StatusView;
use vmha_engine::{DecisionRecord, Event, ObjectRef, Origin, Verdict, VmStatus};
use vmha_model::{AppState, HostState, VmState};

/// The Content-Type of `GET /metrics`.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// This process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostStateLabels {
    host: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmStateLabels {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppStateLabels {
    vm: String,
    app: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    vm: String,
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppReason {
    vm: String,
    app: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmReason {
    vm: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmVerdict {
    vm: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmKind {
    vm: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmResult {
    vm: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpKind {
    operation: String,
    kind: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Probe round trips: 5ms to about 80s.
fn probe_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Store transactions: 1ms to about 16s.
fn store_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// A store operation, the `operation` label of the store metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// The core's commit of a batch (events, state, admin changes).
    Commit,
    /// The controller's compare-and-swap of a VM's ownership record.
    OwnerCas,
}

impl StoreOp {
    fn as_str(self) -> &'static str {
        match self {
            StoreOp::Commit => "commit",
            StoreOp::OwnerCas => "owner-cas",
        }
    }
}

/// Every metric of vmhad. Counters only grow while the process lives; the state gauges are
/// rewritten from the status at each [`Metrics::render`].
pub struct Metrics {
    registry: Registry,
    host_state: Family<HostStateLabels, Gauge>,
    vm_state: Family<VmStateLabels, Gauge>,
    app_state: Family<AppStateLabels, Gauge>,
    vm_restarts_in_window: Family<VmLabels, Gauge>,
    app_restarts_in_window: Family<AppLabels, Gauge>,
    controller: Gauge,
    store_degraded: Gauge,
    app_restarts: Family<AppReason, Counter>,
    vm_restarts: Family<VmReason, Counter>,
    failovers: Family<VmReason, Counter>,
    decisions: Family<VmVerdict, Counter>,
    guest_errors: Family<VmKind, Counter>,
    probe_seconds: Histograms<VmResult>,
    store_seconds: Histograms<OpLabels>,
    store_errors: Family<OpKind, Counter>,
    /// The last decision counted per VM; also serialises renders (the state gauges are
    /// cleared and refilled under it).
    last_decision: Mutex<BTreeMap<String, DecisionRecord>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, all registered, all zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let host_state = Family::<HostStateLabels, Gauge>::default();
        let vm_state = Family::<VmStateLabels, Gauge>::default();
        let app_state = Family::<AppStateLabels, Gauge>::default();
        let vm_restarts_in_window = Family::<VmLabels, Gauge>::default();
        let app_restarts_in_window = Family::<AppLabels, Gauge>::default();
        let controller = Gauge::default();
        let store_degraded = Gauge::default();
        let app_restarts = Family::<AppReason, Counter>::default();
        let vm_restarts = Family::<VmReason, Counter>::default();
        let failovers = Family::<VmReason, Counter>::default();
        let decisions = Family::<VmVerdict, Counter>::default();
        let guest_errors = Family::<VmKind, Counter>::default();
        let probe_seconds: Histograms<VmResult> = Family::new_with_constructor(probe_histogram);
        let store_seconds: Histograms<OpLabels> = Family::new_with_constructor(store_histogram);
        let store_errors = Family::<OpKind, Counter>::default();
        registry.register(
            "vmha_host_state",
            "1 for each host's current state (up, maintenance, down, fenced, unknown), else 0: this host, and every host on the controller",
            host_state.clone(),
        );
        registry.register(
            "vmha_vm_state",
            "1 for each VM group's current state on this host, else 0",
            vm_state.clone(),
        );
        registry.register(
            "vmha_app_state",
            "1 for each app's current state, else 0",
            app_state.clone(),
        );
        registry.register(
            "vmha_vm_restarts_in_window",
            "VM restarts counted in the VM's current restart window (as in vmha status)",
            vm_restarts_in_window.clone(),
        );
        registry.register(
            "vmha_app_restarts_in_window",
            "App restarts counted in the app's current restart window (as in vmha status)",
            app_restarts_in_window.clone(),
        );
        registry.register(
            "vmha_controller",
            "1 while this host is the cluster controller",
            controller.clone(),
        );
        registry.register(
            "vmha_store_degraded",
            "1 while the cluster store cannot commit (commands are refused, monitoring goes on)",
            store_degraded.clone(),
        );
        registry.register(
            "vmha_app_restarts",
            "App restarts taken from the restart budget, by reason",
            app_restarts.clone(),
        );
        registry.register(
            "vmha_vm_restarts",
            "VM restarts on this host, by reason",
            vm_restarts.clone(),
        );
        registry.register(
            "vmha_failovers",
            "Failovers started by the cluster controller on this host, by reason",
            failovers.clone(),
        );
        registry.register(
            "vmha_decisions",
            "Decision-agent runs, by verdict",
            decisions.clone(),
        );
        registry.register(
            "vmha_guest_channel_errors",
            "Guest-agent channel errors, by kind",
            guest_errors.clone(),
        );
        registry.register(
            "vmha_probe_duration_seconds",
            "Round trip of one probe (all due checks of a VM in one guest call), by result",
            probe_seconds.clone(),
        );
        registry.register(
            "vmha_store_duration_seconds",
            "Cluster-store transactions, by operation",
            store_seconds.clone(),
        );
        registry.register(
            "vmha_store_errors",
            "Cluster-store transactions that failed, by operation and kind",
            store_errors.clone(),
        );
        Metrics {
            registry,
            host_state,
            vm_state,
            app_state,
            vm_restarts_in_window,
            app_restarts_in_window,
            controller,
            store_degraded,
            app_restarts,
            vm_restarts,
            failovers,
            decisions,
            guest_errors,
            probe_seconds,
            store_seconds,
            store_errors,
            last_decision: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts what one engine event says: an app restart, a VM restart or a failover start.
    pub fn event(&self, e: &Event) {
        match &e.object {
            ObjectRef::App { vm, app } if e.to == AppState::Restarting.as_str() => {
                if let Some(reason) = app_restart_reason(&e.reason) {
                    self.app_restarts
                        .get_or_create(&AppReason {
                            vm: vm.to_string(),
                            app: app.to_string(),
                            reason: reason.to_string(),
                        })
                        .inc();
                }
            }
            ObjectRef::Vm(vm) if e.to == VmState::Restarting.as_str() => {
                if let Some(reason) = vm_restart_reason(&e.reason) {
                    self.vm_restarts
                        .get_or_create(&VmReason {
                            vm: vm.to_string(),
                            reason: reason.to_string(),
                        })
                        .inc();
                }
            }
            ObjectRef::Vm(vm)
                if e.origin == Origin::Controller
                    && e.to == VmState::FailingOver.as_str()
                    && e.from != e.to =>
            {
                self.failovers
                    .get_or_create(&VmReason {
                        vm: vm.to_string(),
                        reason: failover_reason(&e.reason).to_string(),
                    })
                    .inc();
            }
            _ => {}
        }
    }

    /// Counts the decisions in `vms`' status not counted yet (each VM keeps its last eight:
    /// call this at least as often as eight decisions can happen).
    pub fn decisions(&self, vms: &[VmStatus]) {
        let mut last = self
            .last_decision
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.count_decisions(&mut last, vms);
    }

    fn count_decisions(&self, last: &mut BTreeMap<String, DecisionRecord>, vms: &[VmStatus]) {
        for vm in vms {
            let seen = last.get(vm.name.as_str());
            let new_from = seen
                .and_then(|rec| vm.decisions.iter().rposition(|d| d == rec))
                .map_or(0, |p| p + 1);
            for d in vm.decisions.iter().skip(new_from) {
                self.decisions
                    .get_or_create(&VmVerdict {
                        vm: vm.name.to_string(),
                        verdict: verdict_label(d.verdict).to_string(),
                    })
                    .inc();
            }
            if let Some(d) = vm.decisions.last() {
                last.insert(vm.name.to_string(), d.clone());
            }
        }
    }

    /// Records one probe's round trip for `vm`.
    pub fn probe(&self, vm: &str, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.probe_seconds
            .get_or_create(&VmResult {
                vm: vm.to_string(),
                result: result.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts one guest-channel error of `vm` (`kind`: a fixed word, see the docs).
    pub fn guest_error(&self, vm: &str, kind: &'static str) {
        self.guest_errors
            .get_or_create(&VmKind {
                vm: vm.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Records one store transaction: how long it took and, when it failed, how (`error`:
    /// `error`, `timeout` or `conflict`).
    pub fn store(&self, op: StoreOp, took: Duration, error: Option<&'static str>) {
        self.store_seconds
            .get_or_create(&OpLabels {
                operation: op.as_str().to_string(),
            })
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.store_errors
                .get_or_create(&OpKind {
                    operation: op.as_str().to_string(),
                    kind: kind.to_string(),
                })
                .inc();
        }
    }

    /// The Prometheus text of every metric, the state gauges taken from `status` (the answer
    /// of `GET /v1/status` at this moment).
    pub fn render(&self, status: &StatusView) -> String {
        let mut last = self
            .last_decision
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.count_decisions(&mut last, &status.agent.vms);
        self.set_states(status);
        let mut text = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            tracing::error!("encoding the metrics failed: {e}");
        }
        text
    }

    /// Rewrites the state gauges from `status`: one series per object and state, 1 for the
    /// current one; objects gone from the status disappear.
    fn set_states(&self, status: &StatusView) {
        self.host_state.clear();
        let mut hosts: Vec<(String, String)> = match &status.cluster_view {
            Some(c) => c
                .hosts
                .iter()
                .map(|h| {
                    let state = h.state.map_or("unknown", HostState::as_str);
                    (h.name.to_string(), state.to_string())
                })
                .collect(),
            None => Vec::new(),
        };
        // This host's own word: it knows when it fenced itself (the controller's view, when
        // there is one, knows maintenance).
        let own = status.host_state.clone();
        match hosts
            .iter_mut()
            .find(|(name, _)| name == status.host.as_str())
        {
            Some(entry) if own == HostState::Fenced.as_str() => entry.1 = own,
            Some(_) => {}
            None => hosts.push((status.host.to_string(), own)),
        }
        for (host, current) in hosts {
            let states = HostState::ALL.iter().map(|s| s.as_str()).chain(["unknown"]);
            for state in states {
                self.host_state
                    .get_or_create(&HostStateLabels {
                        host: host.clone(),
                        state: state.to_string(),
                    })
                    .set(i64::from(state == current));
            }
        }
        self.vm_state.clear();
        self.app_state.clear();
        self.vm_restarts_in_window.clear();
        self.app_restarts_in_window.clear();
        for vm in &status.agent.vms {
            let name = vm.name.to_string();
            for s in VmState::ALL {
                self.vm_state
                    .get_or_create(&VmStateLabels {
                        vm: name.clone(),
                        state: s.as_str().to_string(),
                    })
                    .set(i64::from(*s == vm.state));
            }
            self.vm_restarts_in_window
                .get_or_create(&VmLabels { vm: name.clone() })
                .set(i64::from(vm.vm_restarts_in_window));
            for app in &vm.apps {
                for s in AppState::ALL {
                    self.app_state
                        .get_or_create(&AppStateLabels {
                            vm: name.clone(),
                            app: app.name.to_string(),
                            state: s.as_str().to_string(),
                        })
                        .set(i64::from(*s == app.state));
                }
                self.app_restarts_in_window
                    .get_or_create(&AppLabels {
                        vm: name.clone(),
                        app: app.name.to_string(),
                    })
                    .set(i64::from(app.restarts_in_window));
            }
        }
        self.controller.set(i64::from(status.controller));
        self.store_degraded
            .set(i64::from(status.store.degraded.is_some()));
    }
}

fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::NoAction => "no-action",
        Verdict::RestartVm => "restart-vm",
    }
}

/// The reason of an app event entering (or staying in) `restarting` when it is a restart
/// taken from the budget (`CAUSE; restart N/M in W`); `None` for a retry or a wait.
fn app_restart_reason(reason: &str) -> Option<&'static str> {
    let (cause, last) = reason.rsplit_once("; ")?;
    if !last.starts_with("restart ") {
        return None;
    }
    Some(if cause.contains("timed out") {
        "check-timeout"
    } else if cause.contains("unreadable") {
        "check-unreadable"
    } else if cause.starts_with("check ") {
        "check-failed"
    } else {
        "other"
    })
}

/// The reason of a VM event entering (or staying in) `restarting` when it is a restart: taken
/// from the budget (`WHY; VM restart N/M in W`) or asked by an admin; `None` otherwise (a
/// guest rebooting itself, a restart resumed after vmhad restarted).
fn vm_restart_reason(reason: &str) -> Option<&'static str> {
    if reason == "restart requested by admin" {
        return Some("admin");
    }
    let (why, last) = reason.rsplit_once("; ")?;
    if !last.starts_with("VM restart ") {
        return None;
    }
    Some(if why.starts_with("app") && why.contains(" faulted;") {
        "decision"
    } else if why.contains("panicked") {
        "guest-panic"
    } else if why.contains("guest channel") || why.contains("on_guest_loss") {
        "guest-lost"
    } else if why.starts_with("VM start failed") {
        "start-failed"
    } else if why.starts_with("VM ") {
        "vm-down"
    } else {
        "other"
    })
}

/// The reason of a failover the controller started.
fn failover_reason(reason: &str) -> &'static str {
    if reason.contains("lease expired") {
        "host-down"
    } else if reason.contains("faulted on ") {
        "vm-faulted"
    } else if reason.contains("(maintenance)") {
        "maintenance"
    } else if reason.starts_with("failback") {
        "failback"
    } else if reason.contains("not configured") {
        "host-removed"
    } else if reason.contains("admin") {
        "admin"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vmha_engine::Timestamp;
    use vmha_model::Name;

    fn status(json: serde_json::Value) -> StatusView {
        serde_json::from_value(json).unwrap()
    }

    fn vm_json(
        state: &str,
        apps: &[(&str, &str, u32)],
        decisions: &[(u64, &str)],
    ) -> serde_json::Value {
        serde_json::json!({
            "name": "shop", "state": state, "owner": "h1", "desired": "run", "frozen": false,
            "paused": false, "guest_channel_up": true, "policy": "highest-priority",
            "tie": "restart", "vm_restarts_in_window": 1, "vm_restart_limit": 3,
            "vm_restart_window_ms": 3_600_000, "plan": null, "fault": null,
            "decisions": decisions.iter().map(|(t, v)| serde_json::json!({
                "time": t, "verdict": v, "reason": "r"})).collect::<Vec<_>>(),
            "apps": apps.iter().map(|(name, state, restarts)| serde_json::json!({
                "name": name, "state": state, "priority": 10, "critical": false,
                "offline": null, "restarts_in_window": restarts, "restart_limit": 3,
                "restart_window_ms": 600_000, "consecutive_timeouts": 0, "reason": "x"
            })).collect::<Vec<_>>(),
        })
    }

    fn view(vms: Vec<serde_json::Value>) -> StatusView {
        status(serde_json::json!({
            "host": "h1", "cluster": "c", "controller": true, "host_state": "up",
            "agent": {"host": "h1", "vms": vms},
            "cluster_view": {"hosts": [
                {"name": "h1", "state": "up", "capacity_mb": null, "used_mb": 0},
                {"name": "h2", "state": "down", "capacity_mb": null, "used_mb": 0},
                {"name": "h3", "state": null, "capacity_mb": null, "used_mb": 0}
            ], "vms": []}
        }))
    }

    fn line<'t>(text: &'t str, start: &str) -> Vec<&'t str> {
        text.lines().filter(|l| l.starts_with(start)).collect()
    }

    #[test]
    fn states_render_one_series_per_state_with_the_current_one_at_1() {
        let m = Metrics::new();
        let text = m.render(&view(vec![vm_json(
            "online",
            &[("web", "online", 2), ("db", "faulted", 0)],
            &[],
        )]));
        assert!(text.contains("# TYPE vmha_vm_state gauge"), "{text}");
        assert_eq!(
            line(&text, "vmha_vm_state{").len(),
            VmState::ALL.len(),
            "{text}"
        );
        assert!(text.contains("vmha_vm_state{vm=\"shop\",state=\"online\"} 1\n"));
        assert!(text.contains("vmha_vm_state{vm=\"shop\",state=\"faulted\"} 0\n"));
        assert!(text.contains("vmha_app_state{vm=\"shop\",app=\"web\",state=\"online\"} 1\n"));
        assert!(text.contains("vmha_app_state{vm=\"shop\",app=\"db\",state=\"faulted\"} 1\n"));
        assert!(text.contains("vmha_app_state{vm=\"shop\",app=\"db\",state=\"online\"} 0\n"));
        assert!(text.contains("vmha_app_restarts_in_window{vm=\"shop\",app=\"web\"} 2\n"));
        assert!(text.contains("vmha_vm_restarts_in_window{vm=\"shop\"} 1\n"));
        assert!(text.contains("vmha_host_state{host=\"h2\",state=\"down\"} 1\n"));
        assert!(text.contains("vmha_host_state{host=\"h3\",state=\"unknown\"} 1\n"));
        assert!(text.contains("vmha_host_state{host=\"h1\",state=\"up\"} 1\n"));
        assert!(text.contains("vmha_controller 1\n"));
        assert!(text.contains("vmha_store_degraded 0\n"));
        // Exactly one state at 1 per object.
        let ones = |prefix: &str| {
            line(&text, prefix)
                .iter()
                .filter(|l| l.ends_with(" 1"))
                .count()
        };
        assert_eq!(ones("vmha_vm_state{"), 1);
        assert_eq!(ones("vmha_app_state{"), 2);
        assert_eq!(ones("vmha_host_state{"), 3);
    }

    #[test]
    fn this_hosts_state_is_its_own_when_fenced_else_the_controllers() {
        let m = Metrics::new();
        let mut v = view(vec![]);
        if let Some(c) = v.cluster_view.as_mut() {
            c.hosts[0].state = Some(HostState::Maintenance);
        }
        let text = m.render(&v);
        assert!(
            text.contains("vmha_host_state{host=\"h1\",state=\"maintenance\"} 1\n"),
            "{text}"
        );
        v.host_state = "fenced".to_string();
        let text = m.render(&v);
        assert!(
            text.contains("vmha_host_state{host=\"h1\",state=\"fenced\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("vmha_host_state{host=\"h1\",state=\"maintenance\"} 0\n"),
            "{text}"
        );
        v.cluster_view = None;
        v.host_state = "up".to_string();
        let text = m.render(&v);
        assert!(
            text.contains("vmha_host_state{host=\"h1\",state=\"up\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("host=\"h2\""), "{text}");
    }

    #[test]
    fn objects_gone_from_the_status_disappear() {
        let m = Metrics::new();
        m.render(&view(vec![vm_json("online", &[("web", "online", 0)], &[])]));
        let text = m.render(&view(vec![]));
        assert!(!text.contains("vm=\"shop\""), "{text}");
    }

    #[test]
    fn each_decision_is_counted_once() {
        let m = Metrics::new();
        let one = view(vec![vm_json("online", &[], &[(1, "no-action")])]);
        m.render(&one);
        let text = m.render(&one);
        assert!(
            text.contains("vmha_decisions_total{vm=\"shop\",verdict=\"no-action\"} 1\n"),
            "{text}"
        );
        let more = view(vec![vm_json(
            "online",
            &[],
            &[(1, "no-action"), (2, "restart-vm"), (3, "restart-vm")],
        )]);
        m.decisions(&more.agent.vms);
        let text = m.render(&more);
        assert!(text.contains("vmha_decisions_total{vm=\"shop\",verdict=\"no-action\"} 1\n"));
        assert!(
            text.contains("vmha_decisions_total{vm=\"shop\",verdict=\"restart-vm\"} 2\n"),
            "{text}"
        );
    }

    fn event(object: ObjectRef, origin: Origin, from: &str, to: &str, reason: &str) -> Event {
        Event {
            time: Timestamp(1),
            origin,
            object,
            from: from.into(),
            to: to.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn restarts_and_failovers_are_counted_from_events_by_reason() {
        let m = Metrics::new();
        let n = |s: &str| Name::new(s).unwrap();
        let app = ObjectRef::App {
            vm: n("shop"),
            app: n("web"),
        };
        let host = Origin::Host(n("h1"));
        m.event(&event(
            app.clone(),
            host.clone(),
            "online",
            "restarting",
            "check exited 1; restart 1/3 in 10m",
        ));
        m.event(&event(
            app.clone(),
            host.clone(),
            "restarting",
            "restarting",
            "check timed out 3 times in a row; restart 2/3 in 10m",
        ));
        // A failed start's retry and a wait are not restarts.
        m.event(&event(
            app.clone(),
            host.clone(),
            "restarting",
            "restarting",
            "start failed: exit 1; retry in 5s (restart 2/3 in 10m)",
        ));
        m.event(&event(
            app,
            host.clone(),
            "faulted",
            "restarting",
            "restart waits for db",
        ));
        let vm = ObjectRef::Vm(n("shop"));
        m.event(&event(
            vm.clone(),
            host.clone(),
            "online",
            "restarting",
            "app web faulted; sum 10 > 0: restart VM; VM restart 1/3 in 1h",
        ));
        m.event(&event(
            vm.clone(),
            host.clone(),
            "online",
            "restarting",
            "restart requested by admin",
        ));
        m.event(&event(
            vm.clone(),
            host.clone(),
            "online",
            "restarting",
            "guest reset itself: waiting for the guest channel, then starting apps",
        ));
        m.event(&event(
            vm.clone(),
            Origin::Controller,
            "online",
            "failing-over",
            "h2 down (lease expired): moving to h1",
        ));
        m.event(&event(
            vm,
            Origin::Controller,
            "failing-over",
            "failing-over",
            "h2 down (lease expired): moving to h1",
        ));
        let text = m.render(&view(vec![]));
        for want in [
            "vmha_app_restarts_total{vm=\"shop\",app=\"web\",reason=\"check-failed\"} 1\n",
            "vmha_app_restarts_total{vm=\"shop\",app=\"web\",reason=\"check-timeout\"} 1\n",
            "vmha_vm_restarts_total{vm=\"shop\",reason=\"decision\"} 1\n",
            "vmha_vm_restarts_total{vm=\"shop\",reason=\"admin\"} 1\n",
            "vmha_failovers_total{vm=\"shop\",reason=\"host-down\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert_eq!(line(&text, "vmha_app_restarts_total{").len(), 2, "{text}");
        assert_eq!(line(&text, "vmha_vm_restarts_total{").len(), 2, "{text}");
    }

    #[test]
    fn probes_guest_errors_and_store_calls_are_recorded() {
        let m = Metrics::new();
        m.probe("shop", Duration::from_millis(30), true);
        m.probe("shop", Duration::from_millis(30), false);
        m.guest_error("shop", "timeout");
        m.store(StoreOp::Commit, Duration::from_millis(2), None);
        m.store(StoreOp::Commit, Duration::from_secs(5), Some("timeout"));
        let text = m.render(&view(vec![]));
        for want in [
            "# TYPE vmha_probe_duration_seconds histogram\n",
            "vmha_probe_duration_seconds_count{vm=\"shop\",result=\"ok\"} 1\n",
            "vmha_probe_duration_seconds_count{vm=\"shop\",result=\"error\"} 1\n",
            "vmha_guest_channel_errors_total{vm=\"shop\",kind=\"timeout\"} 1\n",
            "vmha_store_duration_seconds_count{operation=\"commit\"} 2\n",
            "vmha_store_errors_total{operation=\"commit\",kind=\"timeout\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn the_docs_list_every_metric_and_the_dashboard_uses_only_those() {
        use std::collections::BTreeSet;
        // A family shows once it has a series: give each one.
        let m = Metrics::new();
        let n = |s: &str| Name::new(s).unwrap();
        let host = Origin::Host(n("h1"));
        let app = ObjectRef::App {
            vm: n("shop"),
            app: n("web"),
        };
        let vm = ObjectRef::Vm(n("shop"));
        let restart = "check exited 1; restart 1/3 in 10m";
        m.event(&event(app, host.clone(), "online", "restarting", restart));
        let admin = "restart requested by admin";
        m.event(&event(vm.clone(), host, "online", "restarting", admin));
        m.event(&event(
            vm,
            Origin::Controller,
            "online",
            "failing-over",
            "x",
        ));
        m.probe("shop", Duration::from_millis(1), true);
        m.guest_error("shop", "timeout");
        m.store(StoreOp::Commit, Duration::from_millis(1), Some("error"));
        let text = m.render(&view(vec![vm_json(
            "online",
            &[("web", "online", 0)],
            &[(1, "no-action")],
        )]));
        let rendered: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let docs = include_str!("../../../docs/metrics.md");
        let documented: BTreeSet<&str> = docs
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|n| n.starts_with("vmha_"))
            .collect();
        assert_eq!(rendered, documented, "docs/metrics.md vs /metrics");
        let dashboard = include_str!("../../../docs/grafana-dashboard.json");
        let used: BTreeSet<&str> = dashboard
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("vmha_"))
            .map(|w| {
                ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| w.strip_suffix(s))
                    .unwrap_or(w)
            })
            .collect();
        assert!(used.len() >= 10, "{used:?}");
        let unknown: Vec<_> = used.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard uses unknown metrics: {unknown:?}"
        );
    }

    #[test]
    fn reasons_are_classified_into_fixed_words() {
        assert_eq!(
            app_restart_reason("check answer unreadable 2 times in a row (x); restart 1/3 in 1m"),
            Some("check-unreadable")
        );
        assert_eq!(app_restart_reason("restart waits for db"), None);
        assert_eq!(
            vm_restart_reason("guest panicked; VM restart 1/3 in 1h"),
            Some("guest-panic")
        );
        assert_eq!(
            vm_restart_reason("guest channel unreachable for 30s; VM restart 1/3 in 1h"),
            Some("guest-lost")
        );
        assert_eq!(
            vm_restart_reason("VM process gone; VM restart 1/3 in 1h"),
            Some("vm-down")
        );
        assert_eq!(
            vm_restart_reason("VM start failed: x; VM restart 2/3 in 1h"),
            Some("start-failed")
        );
        assert_eq!(vm_restart_reason("resuming the restart in progress"), None);
        assert_eq!(
            failover_reason("faulted on h1: moving to h2 (x)"),
            "vm-faulted"
        );
        assert_eq!(
            failover_reason("drain h1 (maintenance): moving to h2"),
            "maintenance"
        );
        assert_eq!(
            failover_reason("failback: preferred host h1 is back"),
            "failback"
        );
        assert_eq!(failover_reason("whatever"), "other");
    }
}
