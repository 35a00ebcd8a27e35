//! Text rendering of vmhad's answers for operators: `vmha status`, `vmha explain` and
//! `vmha events` share the formats here (times, budgets, tables, event lines), so one object
//! reads the same everywhere.

use std::fmt::Display;
use std::time::Duration;

use jiff::tz::TimeZone;
use vmha_engine::{AppStatus, Desired, Event, HostView, Origin, StoreHealth, Timestamp, VmStatus};

use vmha_api::{EventLine, Explain, StatusView};

/// Renders in one time zone (the system's for operators, UTC in tests).
#[derive(Debug, Clone)]
pub struct Render {
    tz: TimeZone,
}

impl Render {
    /// Times in the system time zone (`TZ`, else `/etc/localtime`, else UTC).
    pub fn local() -> Self {
        Render {
            tz: TimeZone::system(),
        }
    }

    /// A time of day, `HH:MM:SS.mmm`; a time outside the calendar prints as raw milliseconds.
    pub fn clock(&self, t: Timestamp) -> String {
        let zoned = i64::try_from(t.0)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .map(|ts| ts.to_zoned_datetime(self.tz.clone()));
        match zoned {
            Some(z) => format!(
                "{:02}:{:02}:{:02}.{:03}",
                z.hour(),
                z.minute(),
                z.second(),
                z.millisecond()
            ),
            None => format!("@{}ms", t.0),
        }
    }

    /// One event: `HH:MM:SS.mmm origin object from → to: reason`.
    pub fn event(&self, e: &Event) -> String {
        self.event_from(e, &e.origin.to_string())
    }

    /// One line of `vmha events`: [`Render::event`], with the host whose stream holds the
    /// event after its origin when the origin does not name it (`controller@kvm1`).
    pub fn event_line(&self, line: &EventLine) -> String {
        let e = &line.event;
        let origin = match (&line.host, &e.origin) {
            (Some(host), Origin::Host(origin)) if host == origin => origin.to_string(),
            (Some(host), origin) => format!("{origin}@{host}"),
            (None, origin) => origin.to_string(),
        };
        self.event_from(e, &origin)
    }

    /// An event with its origin written as given.
    fn event_from(&self, e: &Event, origin: &str) -> String {
        format!(
            "{} {origin} {} {} → {}: {}",
            self.clock(e.time),
            e.object,
            e.from,
            e.to,
            e.reason
        )
    }

    /// `vmha status`: the host and who runs the cluster controller, the host's state when it
    /// is not `up`, the cluster store's health, the cluster (on the controller host), every VM
    /// group of the host with its apps.
    pub fn status(&self, s: &StatusView) -> String {
        let role = match (&s.leader, s.controller) {
            (_, true) => "runs the cluster controller".to_string(),
            (Some(leader), false) => format!("the cluster controller runs on {leader}"),
            (None, false) => "no cluster controller is known right now".to_string(),
        };
        let mut out = format!("host {} in cluster {}: {role}\n", s.host, s.cluster);
        if let Some(line) = host_state_line(&s.host_state) {
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str(&store_line(&s.store));
        out.push('\n');
        if let Some(cluster) = &s.cluster_view {
            out.push_str("\nHOSTS\n");
            out.push_str(&table(
                &["HOST", "STATE", "VM MEMORY"],
                cluster.hosts.iter().map(host_row).collect(),
            ));
            if !cluster.vms.is_empty() {
                out.push_str("\nCLUSTER PLACEMENT\n");
                let rows = cluster
                    .vms
                    .iter()
                    .map(|v| {
                        let record = v.record.as_ref();
                        vec![
                            v.name.to_string(),
                            v.state.to_string(),
                            or_dash(record.and_then(|r| r.owner.as_ref())),
                            or_dash(record.map(|r| desired(r.desired))),
                            yes_no(v.frozen),
                            self.cluster_note(v),
                        ]
                    })
                    .collect();
                out.push_str(&table(
                    &["VM", "STATE", "OWNER", "DESIRED", "FROZEN", "NOTE"],
                    rows,
                ));
            }
        }
        if s.agent.vms.is_empty() {
            out.push_str(&format!("\nno VM groups may run on {}\n", s.host));
            return out;
        }
        out.push_str(&format!("\nVM GROUPS OF {}\n", s.host));
        let rows = s
            .agent
            .vms
            .iter()
            .map(|v| {
                vec![
                    v.name.to_string(),
                    vm_state(v),
                    or_dash(v.owner.as_ref()),
                    or_dash(v.desired.map(desired)),
                    yes_no(v.frozen),
                    guest(v),
                    budget(
                        v.vm_restarts_in_window,
                        v.vm_restart_limit,
                        v.vm_restart_window_ms,
                    ),
                    policy_text(v),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "VM",
                "STATE",
                "OWNER",
                "DESIRED",
                "FROZEN",
                "GUEST",
                "VM RESTARTS",
                "POLICY",
            ],
            rows,
        ));
        for vm in &s.agent.vms {
            out.push_str(&format!("\nAPPS OF {}\n", vm.name));
            out.push_str(&apps_table(&vm.apps));
        }
        out
    }

    /// `vmha explain VM`: why the VM group is where it is, and why vmha did what it did.
    pub fn explain(&self, x: &Explain) -> String {
        let v = &x.vm;
        let mut out = format!("VM group {}: {}\n", v.name, vm_state(v));
        let mut facts: Vec<(&str, String)> = vec![
            ("fault", or_dash(v.fault.as_ref())),
            ("in progress", or_dash(v.plan.as_ref())),
            (
                "owner",
                match (&v.owner, v.desired) {
                    (Some(o), Some(d)) => format!("{o} (desired {})", desired(d)),
                    (Some(o), None) => o.to_string(),
                    (None, Some(d)) => format!("none (desired {})", desired(d)),
                    (None, None) => "not known yet".to_string(),
                },
            ),
            (
                "frozen",
                if v.frozen {
                    "yes: monitored, never acted upon".to_string()
                } else {
                    "no".to_string()
                },
            ),
            ("guest channel", guest(v)),
            (
                "VM restarts",
                budget(
                    v.vm_restarts_in_window,
                    v.vm_restart_limit,
                    v.vm_restart_window_ms,
                ),
            ),
            ("policy", policy_text(v)),
        ];
        if let Some(c) = &x.cluster {
            facts.push(("cluster state", c.state.to_string()));
            facts.push(("cluster note", self.cluster_note(c)));
        }
        let width = facts.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in facts {
            out.push_str(&format!("  {key:width$}  {value}\n"));
        }

        out.push_str("\nDECISIONS (oldest first)\n");
        if v.decisions.is_empty() {
            out.push_str("  none yet: no app has faulted\n");
        }
        for d in &v.decisions {
            out.push_str(&format!(
                "  {}  {}: {}\n",
                self.clock(d.time),
                d.verdict.as_str(),
                d.reason
            ));
        }

        out.push_str("\nAPPS\n");
        out.push_str(&apps_table(&v.apps));

        out.push_str(&format!("\nLAST EVENTS ABOUT {}\n", v.name));
        if x.events.is_empty() {
            out.push_str("  none\n");
        }
        for e in &x.events {
            out.push_str(&format!("  {}\n", self.event(e)));
        }
        out
    }

    /// The controller's remark on a group: where it faulted, why it waits.
    fn cluster_note(&self, v: &vmha_engine::ClusterVmView) -> String {
        let mut parts = Vec::new();
        if let Some(to) = v.record.as_ref().and_then(|r| r.move_to.as_ref()) {
            parts.push(format!("moving to {to}"));
        }
        if let Some(m) = v.record.as_ref().and_then(|r| r.migrate.as_ref()) {
            parts.push(format!("migrating live to {}", m.to));
        }
        if v.record.as_ref().is_some_and(|r| r.parked) {
            parts.push("parked by a maintenance drain".to_string());
        }
        if !v.faulted_on.is_empty() {
            let hosts: Vec<String> = v
                .faulted_on
                .iter()
                .map(|(h, t)| format!("{h} at {}", self.clock(*t)))
                .collect();
            parts.push(format!("faulted on {}", hosts.join(", ")));
        }
        if let Some(note) = &v.note {
            parts.push(note.clone());
        }
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// The answering host's state, when it is not `up`: marked in capitals, with what it means.
fn host_state_line(state: &str) -> Option<String> {
    match state {
        "up" => None,
        "fenced" => Some(
            "host state: FENCED — its cluster lease was not renewed in time: it killed its VMs \
             and starts none until it holds a lease again"
                .to_string(),
        ),
        other => Some(format!("host state: {}", one_line(other).to_uppercase())),
    }
}

/// The cluster store as the answering host sees it: `ok (N commits)`, or `DEGRADED` with the
/// error and what it means.
fn store_line(store: &StoreHealth) -> String {
    let mut line = match &store.degraded {
        Some(error) => format!(
            "cluster store: DEGRADED — {}; commands are refused, monitoring and local restarts \
             go on ({} waiting)",
            one_line(error),
            count(
                u64::try_from(store.pending_events).unwrap_or(u64::MAX),
                "event"
            ),
        ),
        None => format!("cluster store: ok ({})", count(store.commits, "commit")),
    };
    if store.dropped_events > 0 {
        line.push_str(&format!(
            "; {} dropped during an outage",
            count(store.dropped_events, "event")
        ));
    }
    line
}

/// `1 event`, `3 events`.
fn count(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// Text from vmhad on one line: line breaks become spaces.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// Policy of a VM group, with its tie rule where the policy has ties.
fn policy_text(v: &VmStatus) -> String {
    let policy = label(&v.policy);
    match v.policy {
        vmha_model::Policy::Weighted | vmha_model::Policy::WeightedWithOffline => {
            format!("{policy} (tie: {})", label(&v.tie))
        }
        vmha_model::Policy::HighestPriority | vmha_model::Policy::Critical => policy,
    }
}

/// The serde spelling of a unit enum variant (`highest-priority`, `no-action`), which is the
/// spelling of the configuration file and the CLI.
pub fn label<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

fn host_row(h: &HostView) -> Vec<String> {
    let state = h
        .state
        .map_or_else(|| "unknown".to_string(), |s| s.to_string());
    let memory = match h.capacity_mb {
        Some(cap) => format!("{}/{cap} MiB", h.used_mb),
        None => format!("{} MiB", h.used_mb),
    };
    vec![h.name.to_string(), state, memory]
}

fn apps_table(apps: &[AppStatus]) -> String {
    if apps.is_empty() {
        return "  no apps\n".to_string();
    }
    let rows = apps
        .iter()
        .map(|a| {
            vec![
                a.name.to_string(),
                a.state.to_string(),
                if a.critical {
                    format!("{} critical", a.priority)
                } else {
                    a.priority.to_string()
                },
                match a.offline {
                    None => "-".to_string(),
                    Some(f) if f.auto_clear => "yes, auto-clear".to_string(),
                    Some(_) => "yes".to_string(),
                },
                budget(a.restarts_in_window, a.restart_limit, a.restart_window_ms),
                a.reason.clone(),
            ]
        })
        .collect();
    indent(&table(
        &["APP", "STATE", "PRIO", "OFFLINE", "RESTARTS", "LAST REASON"],
        rows,
    ))
}

/// The VM state, with `paused` and why when it is held paused, and a QEMU that does not
/// answer.
fn vm_state(v: &VmStatus) -> String {
    let state = match (v.paused, v.pause_reason) {
        (true, Some(why)) => format!("{} (paused: {why})", v.state),
        (true, None) => format!("{} (paused)", v.state),
        (false, _) => v.state.to_string(),
    };
    if v.qemu_unresponsive {
        format!("{state} (QEMU not answering)")
    } else {
        state
    }
}

fn desired(d: Desired) -> &'static str {
    match d {
        Desired::Run => "run",
        Desired::Stop => "stop",
    }
}

/// The guest channel of a VM group: up / down / unknown, and whether guest-exec is refused.
fn guest(v: &VmStatus) -> String {
    match (v.guest_channel_up, v.guest_exec_blocked) {
        (Some(true), true) => "up, exec blocked",
        (Some(true), false) => "up",
        (Some(false), _) => "down",
        (None, _) => "-",
    }
    .to_string()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn or_dash<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A restart budget: `used/limit per window`, e.g. `1/3 per 10m`.
pub fn budget(used: u32, limit: u32, window_ms: u64) -> String {
    format!(
        "{used}/{limit} per {}",
        vmha_model::duration::format(Duration::from_millis(window_ms))
    )
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i < last {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn utc() -> Render {
        Render { tz: TimeZone::UTC }
    }

    fn status_json() -> serde_json::Value {
        serde_json::json!({
            "host": "kvm1",
            "cluster": "prod",
            "controller": true,
            "leader": "kvm1",
            "host_state": "up",
            "store": {"degraded": null, "pending_events": 0, "dropped_events": 0, "commits": 42},
            "agent": {
                "host": "kvm1",
                "vms": [{
                    "name": "shop",
                    "state": "online",
                    "owner": "kvm1",
                    "desired": "run",
                    "frozen": false,
                    "paused": false,
                    "guest_channel_up": true,
                    "policy": "weighted",
                    "tie": "no-action",
                    "vm_restarts_in_window": 1,
                    "vm_restart_limit": 2,
                    "vm_restart_window_ms": 600000,
                    "plan": null,
                    "fault": null,
                    "decisions": [{
                        "time": 3_723_004,
                        "verdict": "restart-vm",
                        "reason": "weighted: faulted 100 > online 10 → restart VM"
                    }],
                    "apps": [{
                        "name": "db",
                        "state": "faulted",
                        "priority": 100,
                        "critical": true,
                        "offline": null,
                        "restarts_in_window": 3,
                        "restart_limit": 3,
                        "restart_window_ms": 600000,
                        "consecutive_timeouts": 0,
                        "reason": "check exited 3; restart budget 3/3 spent in 10m"
                    }, {
                        "name": "web",
                        "state": "offline",
                        "priority": 10,
                        "critical": false,
                        "offline": {"auto_clear": true},
                        "restarts_in_window": 0,
                        "restart_limit": 3,
                        "restart_window_ms": 90000,
                        "consecutive_timeouts": 0,
                        "reason": "admin: intentionally offline"
                    }]
                }]
            },
            "cluster_view": {
                "hosts": [
                    {"name": "kvm1", "state": "up", "capacity_mb": 4096, "used_mb": 2048},
                    {"name": "kvm2", "state": "maintenance", "capacity_mb": null, "used_mb": 0},
                    {"name": "kvm3", "state": null, "capacity_mb": null, "used_mb": 0}
                ],
                "vms": [{
                    "name": "shop",
                    "state": "online",
                    "record": {"owner": "kvm1", "desired": "run", "move_to": null, "parked": false},
                    "revision": 7,
                    "frozen": false,
                    "faulted_on": [["kvm2", 1000]],
                    "note": null
                }]
            }
        })
    }

    #[test]
    fn clock_is_time_of_day_with_milliseconds() {
        // 1h 2m 3.004s after the epoch.
        assert_eq!(utc().clock(Timestamp(3_723_004)), "01:02:03.004");
        assert_eq!(utc().clock(Timestamp(u64::MAX)), format!("@{}ms", u64::MAX));
    }

    #[test]
    fn event_line_has_time_origin_object_transition_and_reason() {
        let e: Event = serde_json::from_value(serde_json::json!({
            "time": 1_500,
            "origin": {"host": "kvm1"},
            "object": {"app": {"vm": "shop", "app": "db"}},
            "from": "online",
            "to": "restarting",
            "reason": "check exited 3"
        }))
        .unwrap();
        assert_eq!(
            utc().event(&e),
            "00:00:01.500 kvm1 shop/db online → restarting: check exited 3"
        );
    }

    #[test]
    fn event_lines_name_the_host_a_controller_event_comes_from() {
        let line = |host: Option<&str>, origin: serde_json::Value| -> EventLine {
            serde_json::from_value(serde_json::json!({
                "host": host,
                "seq": 3,
                "text": "ignored",
                "time": 1_500,
                "origin": origin,
                "object": {"host": "kvm2"},
                "from": "up",
                "to": "maintenance",
                "reason": "admin"
            }))
            .unwrap()
        };
        let r = utc();
        assert_eq!(
            r.event_line(&line(Some("kvm1"), "controller".into())),
            "00:00:01.500 controller@kvm1 host:kvm2 up → maintenance: admin"
        );
        assert_eq!(
            r.event_line(&line(Some("kvm2"), serde_json::json!({"host": "kvm2"}))),
            "00:00:01.500 kvm2 host:kvm2 up → maintenance: admin"
        );
        assert_eq!(
            r.event_line(&line(None, "controller".into())),
            "00:00:01.500 controller host:kvm2 up → maintenance: admin"
        );
    }

    #[test]
    fn status_shows_host_cluster_groups_and_apps() {
        let s: StatusView = serde_json::from_value(status_json()).unwrap();
        let text = utc().status(&s);
        assert!(
            text.starts_with("host kvm1 in cluster prod: runs the cluster controller\n"),
            "{text}"
        );
        assert!(text.contains("kvm2  maintenance  0 MiB"), "{text}");
        assert!(text.contains("kvm3  unknown"), "{text}");
        assert!(text.contains("kvm1  up           2048/4096 MiB"), "{text}");
        assert!(text.contains("faulted on kvm2 at 00:00:01.000"), "{text}");
        assert_eq!(
            vm_row_cells(&text),
            [
                "shop",
                "online",
                "kvm1",
                "run",
                "no",
                "up",
                "1/2 per 10m",
                "weighted (tie: no-action)"
            ]
        );
        assert!(text.contains("db   faulted  100 critical  -"), "{text}");
        assert!(
            text.contains("web  offline  10            yes, auto-clear  0/3 per 1m30s"),
            "{text}"
        );
        assert!(text.contains("restart budget 3/3 spent in 10m"), "{text}");
    }

    /// The cells of the first row of kvm1's VM groups table in a `status` text.
    fn vm_row_cells(text: &str) -> Vec<String> {
        let groups = text.split_once("VM GROUPS OF kvm1\n").unwrap().1;
        let vm_row = groups.lines().nth(1).unwrap();
        vm_row
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn status_says_when_a_vm_is_paused_or_its_qemu_does_not_answer() {
        let state_cell = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut json = status_json();
            edit(&mut json["agent"]["vms"][0]);
            let s: StatusView = serde_json::from_value(json).unwrap();
            vm_row_cells(&utc().status(&s))[1].clone()
        };
        assert_eq!(state_cell(&|_| {}), "online");
        assert_eq!(
            state_cell(&|vm| vm["qemu_unresponsive"] = true.into()),
            "online (QEMU not answering)"
        );
        assert_eq!(
            state_cell(&|vm| {
                vm["paused"] = true.into();
                vm["pause_reason"] = "admin".into();
            }),
            "online (paused: admin)"
        );
    }

    /// The status of a host that runs no controller and may run no VM group: its header only.
    fn bare_status(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut json = status_json();
        json["controller"] = false.into();
        json["cluster_view"] = serde_json::Value::Null;
        json["agent"]["vms"] = serde_json::json!([]);
        edit(&mut json);
        let s: StatusView = serde_json::from_value(json).unwrap();
        utc().status(&s)
    }

    #[test]
    fn status_without_groups_or_cluster_says_so() {
        let text = bare_status(|json| json["leader"] = "kvm2".into());
        assert_eq!(
            text,
            "host kvm1 in cluster prod: the cluster controller runs on kvm2\n\
             cluster store: ok (42 commits)\n\n\
             no VM groups may run on kvm1\n"
        );
    }

    #[test]
    fn status_names_the_controller_host_or_says_none_is_known() {
        let text = bare_status(|json| json["leader"] = "kvm3".into());
        assert!(
            text.starts_with("host kvm1 in cluster prod: the cluster controller runs on kvm3\n"),
            "{text}"
        );
        let text = bare_status(|json| json["leader"] = serde_json::Value::Null);
        assert!(
            text.starts_with(
                "host kvm1 in cluster prod: no cluster controller is known right now\n"
            ),
            "{text}"
        );
        // A vmhad that predates `leader`, `host_state` and `store`: nothing invented.
        let text = bare_status(|json| {
            let map = json.as_object_mut().unwrap();
            for key in ["leader", "host_state", "store"] {
                map.remove(key);
            }
        });
        assert!(
            text.contains("no cluster controller is known right now"),
            "{text}"
        );
        assert!(!text.contains("host state:"), "{text}");
        assert!(text.contains("\ncluster store: ok (0 commits)\n"), "{text}");
    }

    #[test]
    fn status_marks_a_fenced_host() {
        let text = bare_status(|json| json["host_state"] = "fenced".into());
        let second = text.lines().nth(1).unwrap();
        assert!(second.starts_with("host state: FENCED — "), "{text}");
        assert!(second.contains("killed its VMs"), "{text}");
        let text = bare_status(|json| json["host_state"] = "joining".into());
        assert_eq!(text.lines().nth(1), Some("host state: JOINING"), "{text}");
        let text = bare_status(|_| ());
        assert!(!text.contains("host state:"), "{text}");
    }

    #[test]
    fn status_says_when_the_cluster_store_is_degraded() {
        let text = bare_status(|json| {
            json["store"] = serde_json::json!({
                "degraded": "etcd: deadline exceeded\nafter 3 tries",
                "pending_events": 12,
                "dropped_events": 0,
                "commits": 42
            });
        });
        assert!(
            text.contains(
                "\ncluster store: DEGRADED — etcd: deadline exceeded after 3 tries; commands are \
                 refused, monitoring and local restarts go on (12 events waiting)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("cluster store: ok"), "{text}");
        let text = bare_status(|json| {
            json["store"] = serde_json::json!({
                "degraded": "disk full",
                "pending_events": 1,
                "dropped_events": 300,
                "commits": 1
            });
        });
        assert!(
            text.contains("(1 event waiting); 300 events dropped during an outage\n"),
            "{text}"
        );
    }

    #[test]
    fn status_of_the_controller_host_shows_a_healthy_store() {
        let s: StatusView = serde_json::from_value(status_json()).unwrap();
        let text = utc().status(&s);
        assert_eq!(
            text.lines().take(3).collect::<Vec<_>>(),
            [
                "host kvm1 in cluster prod: runs the cluster controller",
                "cluster store: ok (42 commits)",
                ""
            ]
        );
    }

    #[test]
    fn explain_shows_decisions_with_their_arithmetic() {
        let json = status_json();
        let x: Explain = serde_json::from_value(serde_json::json!({
            "vm": json["agent"]["vms"][0],
            "cluster": json["cluster_view"]["vms"][0],
            "events": [{
                "time": 2_000,
                "origin": "controller",
                "object": {"vm": "shop"},
                "from": "faulted",
                "to": "failing-over",
                "reason": "VM restart budget 2/2 spent"
            }]
        }))
        .unwrap();
        let text = utc().explain(&x);
        assert!(text.starts_with("VM group shop: online\n"), "{text}");
        assert!(
            text.contains("  owner          kvm1 (desired run)\n"),
            "{text}"
        );
        assert!(text.contains("  VM restarts    1/2 per 10m\n"), "{text}");
        assert!(
            text.contains("  01:02:03.004  restart VM: weighted: faulted 100 > online 10"),
            "{text}"
        );
        assert!(
            text.contains(
                "  00:00:02.000 controller shop faulted → failing-over: VM restart budget"
            ),
            "{text}"
        );
        assert!(text.contains("LAST EVENTS ABOUT shop"), "{text}");
    }

    #[test]
    fn table_aligns_by_characters() {
        let t = table(
            &["A", "B", "C"],
            vec![vec!["→x".into(), "yy".into(), "z".into()]],
        );
        assert_eq!(t, "A   B   C\n→x  yy  z\n");
    }
}
