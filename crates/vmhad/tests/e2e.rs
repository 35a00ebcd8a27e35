//! End-to-end tests of vmhad on one host with real TCG VMs (the test guest of
//! `scripts/build-guest-image.sh`, demo apps db(100) ← web(50) ← worker(10)).
//!
//! Each test function tells one story on one VM to keep the suite short; the VM tests hold a
//! lock so only one TCG guest boots at a time. Assertions are about behaviour (event sequences,
//! states, pids); latencies are measured from event timestamps and printed (`--nocapture`).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::tcp::{self, ADMIN, READER};
use common::{Ev, Vmhad, alive, latency, now_ms, processes_naming, vm_test_lock};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const VM: &str = "shop";

/// Starts a daemon on a fresh state dir and waits until the VM and all its apps are online.
fn boot() -> Vmhad {
    boot_with(|_| {})
}

/// [`boot`], with `prepare` run on the daemon before it starts (e.g. to add its TCP API).
fn boot_with(prepare: impl FnOnce(&mut Vmhad)) -> Vmhad {
    let mut h = Vmhad::new(&[VM]);
    prepare(&mut h);
    let t0 = now_ms();
    h.start();
    let (i, online) = h.wait_for(0, VM, "starting", "online");
    latency(
        "vmhad start → VM and apps online (first boot)",
        t0,
        online.time,
    );
    // The controller's echo of the host's report follows; later marks start after it.
    h.wait_for_event(i, "the controller's view: VM online", |e| {
        e.origin == "controller" && e.object == VM && e.to == "online"
    });
    assert_all_online(&h);
    h
}

fn assert_all_online(h: &Vmhad) {
    let states = h.app_states(VM);
    assert!(
        states.iter().all(|(_, s)| s == "online"),
        "apps not all online: {states:?}"
    );
    assert_eq!(h.vm_status(VM)["state"], "online");
}

/// Host-agent events about the VM itself (not its apps) in `events`.
fn vm_events(events: &[Ev]) -> Vec<&Ev> {
    events
        .iter()
        .filter(|e| e.object == VM && e.origin != "controller")
        .collect()
}

/// Events about objects other than `keep` (apps of VM) in `events`.
fn others<'a>(events: &'a [Ev], keep: &[&str]) -> Vec<&'a Ev> {
    events
        .iter()
        .filter(|e| !keep.iter().any(|k| e.object == format!("{VM}/{k}")))
        .collect()
}

fn texts(events: &[&Ev]) -> String {
    events
        .iter()
        .map(|e| e.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Kills a demo app in the guest (waits until it is dead); returns the host time right after.
fn kill_app(h: &Vmhad, app: &str) -> u64 {
    assert_eq!(h.app(VM, "kill", app), 0, "app kill {app}");
    now_ms()
}

/// The start time (clock ticks since guest boot, `/proc/PID/stat` field 22) of each demo app's
/// process in the guest.
fn guest_start_ticks(h: &Vmhad) -> Vec<(String, u64)> {
    let script = "for a in db web worker; do set -- $(cat /proc/$(cat /run/demo/$a.pid)/stat); \
                  echo $a ${22}; done";
    let out = h.exec(VM, &["/bin/sh", "-c", script]);
    assert_eq!(out["exit"], 0, "reading start times: {out}");
    out["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| {
            let (a, t) = l.split_once(' ').unwrap();
            (a.to_string(), t.trim().parse().unwrap())
        })
        .collect()
}

/// Checks the order of a VM (re)start from cursor `from`: db online before web online before
/// worker online, each app's process started after the one it requires is online, then the
/// VM online. Returns the VM's online event.
fn check_start_order(h: &mut Vmhad, from: usize, vm_from: &str) -> Ev {
    let (i_db, _) = h.wait_for(from, &format!("{VM}/db"), "starting", "online");
    let (i_web, _) = h.wait_for(from, &format!("{VM}/web"), "starting", "online");
    let (i_worker, _) = h.wait_for(from, &format!("{VM}/worker"), "starting", "online");
    let (i_vm, vm_online) = h.wait_for(from, VM, vm_from, "online");
    assert!(
        i_db < i_web && i_web < i_worker && i_worker <= i_vm,
        "start order wrong:\n{}",
        h.events_text(from)
    );
    // Each app waited for the one it requires: no app reached online before its requirement.
    let ticks = guest_start_ticks(h);
    let t = |a: &str| ticks.iter().find(|(n, _)| n == a).unwrap().1;
    println!("guest process start ticks after (re)start: {ticks:?}");
    assert!(
        t("db") <= t("web") && t("web") <= t("worker"),
        "apps started out of dependency order in the guest: {ticks:?}"
    );
    assert_all_online(h);
    vm_online
}

/// One sample of `GET /metrics`: `(name, labels, value)`.
type Sample = (String, Vec<(String, String)>, f64);

/// `GET /metrics`, parsed (the Prometheus text format; label values here have no quotes or
/// commas).
fn metrics(h: &Vmhad) -> Vec<Sample> {
    let (status, text) = common::http(&h.socket(), "GET", "/metrics", None);
    assert_eq!(status, 200, "metrics: {text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().unwrap())
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include all of `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// What `/v1/status` says that the metrics must say too: the VM's state and restart count,
/// and each app's state and restart count.
fn status_facts(h: &Vmhad) -> (Value, Vec<(String, String, u64)>, String) {
    let vm = h.vm_status(VM);
    let apps = vm["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["state"].as_str().unwrap().to_string(),
                a["restarts_in_window"].as_u64().unwrap(),
            )
        })
        .collect();
    let facts = json!({"state": vm["state"], "restarts": vm["vm_restarts_in_window"]});
    (
        facts,
        apps,
        h.status()["host_state"].as_str().unwrap().to_string(),
    )
}

/// Checks that `/metrics` and `/v1/status` agree (states, counts by state, restart counts):
/// reads the status, the metrics, the status again, and compares once both statuses are the
/// same (nothing changed in between). Returns the metrics.
fn metrics_agree_with_status(h: &Vmhad) -> Vec<Sample> {
    loop {
        let before = status_facts(h);
        let samples = metrics(h);
        if status_facts(h) != before {
            continue;
        }
        let (vm, apps, host_state) = before;
        let vm_state = vm["state"].as_str().unwrap();
        assert_eq!(sum(&samples, "vmha_vm_state", &[("vm", VM)]), 1.0);
        assert_eq!(
            sum(
                &samples,
                "vmha_vm_state",
                &[("vm", VM), ("state", vm_state)]
            ),
            1.0
        );
        assert_eq!(
            sum(&samples, "vmha_vm_restarts_in_window", &[("vm", VM)]),
            vm["restarts"].as_f64().unwrap()
        );
        for (app, state, restarts) in &apps {
            let labels = [("vm", VM), ("app", app.as_str())];
            assert_eq!(sum(&samples, "vmha_app_state", &labels), 1.0, "{app}");
            let mut with_state = labels.to_vec();
            with_state.push(("state", state.as_str()));
            assert_eq!(sum(&samples, "vmha_app_state", &with_state), 1.0, "{app}");
            assert_eq!(
                sum(&samples, "vmha_app_restarts_in_window", &labels),
                *restarts as f64,
                "{app}"
            );
        }
        // Counts by state: as many apps in each state as the status lists.
        for state in ["online", "offline", "faulted", "restarting", "unknown"] {
            let listed = apps.iter().filter(|(_, s, _)| s == state).count();
            assert_eq!(
                sum(&samples, "vmha_app_state", &[("state", state)]),
                listed as f64,
                "apps {state}"
            );
        }
        assert_eq!(
            sum(
                &samples,
                "vmha_host_state",
                &[("host", "kvm1"), ("state", host_state.as_str())]
            ),
            1.0
        );
        return samples;
    }
}

/// Scenarios 1, 4, 2, 10, 3, 5 on one VM: app restarts in the guest, an intentionally offline
/// app, a faulted low-priority app, bad API requests, the top app faulted (VM restart) and QEMU
/// killed (VM restart).
#[test]
fn app_and_vm_failures() {
    let _lock = vm_test_lock();
    let mut api = None;
    let mut h = boot_with(|h| api = Some(tcp::enable(h, true)));
    let api = api.unwrap();
    let pid0 = h.qemu_pid(VM);
    assert_eq!(h.qemu_processes(VM), vec![pid0]);

    // 1. web killed in the guest → restarted there; the VM is untouched.
    let m = h.mark();
    let t_kill = kill_app(&h, "web");
    let (_, detected) = h.wait_for(m, "shop/web", "online", "restarting");
    let (_, back) = h.wait_for(m, "shop/web", "restarting", "online");
    latency("app kill → detected (restarting)", t_kill, detected.time);
    latency("app kill → online again", t_kill, back.time);
    assert_eq!(
        h.app(VM, "check", "web"),
        0,
        "web not running after restart"
    );
    let evs = h.since(m);
    assert!(
        others(&evs, &["web"]).is_empty(),
        "unexpected events:\n{}",
        texts(&others(&evs, &["web"]))
    );
    assert_eq!(h.qemu_pid(VM), pid0);
    assert_eq!(h.qemu_processes(VM), vec![pid0]);
    // The metrics say the same as the status, and count web's restart (a fresh vmhad: the
    // count since it started is the count in the window).
    let samples = metrics_agree_with_status(&h);
    let web = [("vm", VM), ("app", "web")];
    assert_eq!(sum(&samples, "vmha_app_restarts_total", &web), 1.0);
    assert_eq!(
        sum(
            &samples,
            "vmha_app_restarts_total",
            &[("reason", "check-failed")]
        ),
        1.0
    );
    assert!(
        sum(
            &samples,
            "vmha_probe_duration_seconds_count",
            &[("vm", VM), ("result", "ok")]
        ) > 0.0
    );
    assert!(
        sum(
            &samples,
            "vmha_store_duration_seconds_count",
            &[("operation", "commit")]
        ) > 0.0
    );
    assert_eq!(
        sum(
            &samples,
            "vmha_store_errors_total",
            &[("operation", "commit")]
        ),
        0.0
    );
    assert_eq!(sum(&samples, "vmha_vm_restarts_total", &[]), 0.0);

    // 4. web marked offline (sticky) and then killed → offline, no restart, no VM action.
    let m = h.mark();
    h.command_ok(&json!({"command": "app-offline", "vm": VM, "app": "web", "auto_clear": false}));
    h.wait_for(m, "shop/web", "online", "offline");
    kill_app(&h, "web");
    // Barrier: db killed after web and restarted proves probes ran after web's death.
    let t_db = kill_app(&h, "db");
    let (_, db_back) = h.wait_for(m, "shop/db", "restarting", "online");
    latency("app kill → online again (db)", t_db, db_back.time);
    assert_ne!(h.app(VM, "check", "web"), 0, "offline web was restarted");
    let evs = h.since(m);
    let unexpected: Vec<&Ev> = evs
        .iter()
        .filter(|e| (e.object == "shop/web" && e.to != "offline") || e.object == VM)
        .collect();
    assert!(
        unexpected.is_empty(),
        "offline web or the VM changed:\n{}",
        texts(&unexpected)
    );
    let web = h.app_status(VM, "web");
    assert_eq!(web["state"], "offline", "{web}");
    assert_eq!(web["offline"], json!({"auto_clear": false}), "{web}");
    assert_eq!(h.qemu_processes(VM), vec![pid0]);
    // Back online: the flag cleared, vmha restarts web.
    let m = h.mark();
    h.command_ok(&json!({"command": "app-online", "vm": VM, "app": "web"}));
    h.wait_for_event(m, "web online again", |e| {
        e.is("shop/web", "*", "online") && e.from != "online"
    });
    assert_eq!(h.app(VM, "check", "web"), 0);

    // 2. worker (lowest priority) keeps failing: its start fails; with budget left
    // (restart_limit 2) it stays restarting and is retried after a backoff; the failed start
    // that spends the budget faults it. Only then does the decision agent weigh it
    // (highest-priority: the VM is left alone), and nothing retries it while the budget stays
    // spent (10m window).
    let m = h.mark();
    assert_eq!(h.app(VM, "break", "worker"), 0);
    kill_app(&h, "worker");
    let (i_retry, retry) = h.wait_for_event(m, "worker's failed start retried later", |e| {
        e.is("shop/worker", "restarting", "restarting") && e.reason.contains("retry in")
    });
    println!("worker start failed: {}", retry.text);
    let (i_faulted, faulted) = h.wait_for(m, "shop/worker", "*", "faulted");
    println!("worker faulted: {}", faulted.text);
    assert!(i_retry < i_faulted, "faulted before its retry");
    assert!(
        faulted.reason.contains("restart budget 2/2") && faulted.reason.contains("spent"),
        "faulted with budget left: {}",
        faulted.text
    );
    let explain = h.get(&format!("/v1/vms/{VM}/explain")).1;
    let last = explain["vm"]["decisions"]
        .as_array()
        .and_then(|d| d.last())
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(last["verdict"], "no-action", "decision: {explain}");
    println!("decision: {}", last["reason"]);
    // Barrier: web killed and restarted after the decision; still no VM action.
    kill_app(&h, "web");
    h.wait_for(m, "shop/web", "restarting", "online");
    let evs = h.since(m);
    assert!(
        vm_events(&evs).is_empty(),
        "the VM was acted upon:\n{}",
        texts(&vm_events(&evs))
    );
    assert_eq!(h.vm_status(VM)["state"], "online");
    // Faulted with the budget spent: nothing retried it since.
    let after: Vec<&Ev> = evs
        .iter()
        .skip(i_faulted + 1 - m)
        .filter(|e| e.object == "shop/worker")
        .collect();
    assert!(
        after.is_empty(),
        "worker changed after faulting:\n{}",
        texts(&after)
    );
    assert_eq!(h.app_status(VM, "worker")["state"], "faulted");
    assert_eq!(h.qemu_processes(VM), vec![pid0]);

    // 10. Bad API requests → 4xx JSON errors, nothing changes.
    bad_api_requests(&h);

    // 3. db (highest priority) keeps failing → VM restarted on the host, apps in order.
    let m = h.mark();
    assert_eq!(h.app(VM, "break", "db"), 0);
    let t_kill = kill_app(&h, "db");
    let (_, db_down) = h.wait_for(m, "shop/db", "online", "restarting");
    let (_, db_faulted) = h.wait_for(m, "shop/db", "*", "faulted");
    let (i_restart, restart) = h.wait_for(m, VM, "online", "restarting");
    assert!(
        restart.reason.contains("restart VM"),
        "restart reason: {}",
        restart.reason
    );
    let vm_online = check_start_order(&mut h, i_restart, "restarting");
    let pid1 = h.qemu_pid(VM);
    assert_ne!(pid1, pid0, "the VM was not restarted on the host");
    assert!(!alive(pid0), "old QEMU {pid0} still alive");
    assert_eq!(h.qemu_processes(VM), vec![pid1]);
    latency("top app kill → detected", t_kill, db_down.time);
    latency("top app kill → faulted", t_kill, db_faulted.time);
    latency("top app kill → VM restart decided", t_kill, restart.time);
    latency(
        "VM restart decided → VM and apps online",
        restart.time,
        vm_online.time,
    );
    latency("top app kill → VM and apps online", t_kill, vm_online.time);

    // 5. QEMU kill -9 → detected as gone, VM started again, apps back online.
    let m = h.mark();
    let t_kill = now_ms();
    kill(Pid::from_raw(pid1), Signal::SIGKILL).unwrap();
    let (i_gone, gone) = h.wait_for(m, VM, "online", "restarting");
    assert!(gone.reason.contains("gone"), "reason: {}", gone.reason);
    // When does the new QEMU appear? (Measured by polling, printed only.)
    let relaunched = loop {
        let pids = h.qemu_processes(VM);
        if pids.iter().any(|&p| p != pid1) {
            break now_ms();
        }
        h.assert_running();
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    latency(
        "QEMU kill -9 → new QEMU process (±20 ms)",
        t_kill,
        relaunched,
    );
    let vm_online = check_start_order(&mut h, i_gone, "restarting");
    let pid2 = h.qemu_pid(VM);
    assert_ne!(pid2, pid1);
    assert_eq!(h.qemu_processes(VM), vec![pid2]);
    latency("QEMU kill -9 → detected (gone)", t_kill, gone.time);
    latency("QEMU kill -9 → VM and apps online", t_kill, vm_online.time);
    println!("events of the QEMU kill:\n{}", h.events_text(m));

    // The metrics count both VM restarts by reason, as many as the status's window holds,
    // and the decision agent's verdicts (no action for worker, restart for db).
    let samples = metrics_agree_with_status(&h);
    let vm = [("vm", VM)];
    assert_eq!(sum(&samples, "vmha_vm_restarts_total", &vm), 2.0);
    assert_eq!(
        sum(
            &samples,
            "vmha_vm_restarts_total",
            &[("reason", "decision")]
        ),
        1.0
    );
    assert_eq!(
        sum(&samples, "vmha_vm_restarts_total", &[("reason", "vm-down")]),
        1.0
    );
    assert!(
        sum(
            &samples,
            "vmha_decisions_total",
            &[("verdict", "no-action")]
        ) >= 1.0
    );
    assert_eq!(
        sum(
            &samples,
            "vmha_decisions_total",
            &[("verdict", "restart-vm")]
        ),
        1.0
    );

    cli_over_https(&mut h, &api);
}

/// The `vmha` CLI against this vmhad over HTTPS with its tokens: the read-only token reads
/// (status, explain, events) and is refused an admin command (exit 4, nothing changes), no
/// token is refused (exit 4); the admin token stops and starts an app in the guest, then runs
/// the other admin commands ([`cli_admin_commands`]). `/metrics` on TCP needs a token, the
/// read-only one suffices.
fn cli_over_https(h: &mut Vmhad, api: &tcp::Tcp) {
    let vmha = std::path::Path::new(env!("CARGO_BIN_EXE_vmhad")).with_file_name("vmha");
    assert!(
        vmha.is_file(),
        "this test runs {}: build it first (`cargo build -p vmha`)",
        vmha.display()
    );
    let (cert, _) = tcp::test_cert();
    let url = api.url();
    let run = |token: Option<&str>, args: &[&str]| -> Output {
        let mut cmd = Command::new(&vmha);
        for var in ["VMHA_SOCKET", "VMHA_URL", "VMHA_TOKEN", "VMHA_CA_CERT"] {
            cmd.env_remove(var);
        }
        if let Some(t) = token {
            cmd.env("VMHA_TOKEN", t);
        }
        cmd.arg("--url")
            .arg(&url)
            .arg("--ca-cert")
            .arg(&cert)
            .args(args)
            .output()
            .unwrap()
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let worker = format!("{VM}/worker");

    // Reading with the read-only token: the same status as the socket's.
    let out = run(Some(READER), &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let remote: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(remote["host"], "kvm1");
    assert_eq!(remote["agent"]["vms"][0]["name"], VM);
    assert_eq!(remote["agent"]["vms"][0]["state"], h.vm_status(VM)["state"]);
    let out = run(Some(READER), &["explain", VM]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("worker"),
        "{}",
        text(&out.stdout)
    );
    let out = run(Some(READER), &["events", "--limit", "3", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = text(&out.stdout);
    assert_eq!(lines.lines().count(), 3, "{lines}");
    for line in lines.lines() {
        serde_json::from_str::<Value>(line).unwrap();
    }

    // The read-only token may not stop an app; no token may not even read: exit 4, said so,
    // the tokens never printed.
    let m = h.mark();
    let out = run(Some(READER), &["app", "stop", &worker]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("admin commands need an admin token"), "{err}");
    assert!(!err.contains(READER), "{err}");
    let out = run(None, &["status"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("--token or $VMHA_TOKEN"), "{err}");
    assert_eq!(h.app_status(VM, "worker")["state"], "online");

    // The admin token stops worker in the guest (offline), then starts it again.
    let out = run(Some(ADMIN), &["app", "stop", &worker]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(ADMIN));
    h.wait_for(m, &worker, "*", "offline");
    assert!(
        h.since(m).iter().all(|e| e.object == worker),
        "the refused attempt or the stop changed something else:\n{}",
        h.events_text(m)
    );
    assert_ne!(h.app(VM, "check", "worker"), 0, "worker still runs");
    let m = h.mark();
    let out = run(Some(ADMIN), &["app", "start", &worker, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    h.wait_for(m, &worker, "*", "online");
    assert_eq!(h.app(VM, "check", "worker"), 0);

    cli_admin_commands(h, &|args: &[&str]| run(Some(ADMIN), args));

    // /metrics on TCP: 401 without a token, served to the read-only one.
    assert_eq!(api.request("GET", "/metrics", None, None).status, 401);
    let r = api.request("GET", "/metrics", Some(READER), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body
            .contains("vmha_app_state{vm=\"shop\",app=\"worker\",state=\"online\"} 1\n"),
        "{}",
        r.body
    );
}

/// Waits (at most [`common::WAIT`]) until `done` holds of the VM's status on this host; returns
/// that status.
fn wait_vm(h: &mut Vmhad, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let vm = h.vm_status(VM);
        if done(&vm) {
            return vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {vm}\n{}",
            h.log_tail(40)
        );
        h.assert_running();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The app named `app` in a VM status.
fn app_of<'a>(vm: &'a Value, app: &str) -> &'a Value {
    vm["apps"]
        .as_array()
        .and_then(|apps| apps.iter().find(|a| a["name"] == app))
        .unwrap_or_else(|| panic!("no app {app} in {vm}"))
}

/// The admin commands of SPEC §4.7 through the CLI over HTTPS with the admin token (`vmha` run
/// by `run`), each with `--json` and its answer parsed; the state each leaves is read back
/// through the socket: explain, freeze/unfreeze, set priority/policy/budgets, app
/// offline/online, clear, guest exec, vm restart, vm stop and vm start. (`vm move` needs
/// several hosts: the cluster tests.)
fn cli_admin_commands(h: &mut Vmhad, run: &dyn Fn(&[&str]) -> Output) {
    let json = |args: &[&str], code: i32| -> Value {
        println!("vmha {}", args.join(" "));
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "vmha {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "vmha {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    let ok = |args: &[&str]| {
        let answer = json(args, 0);
        assert_eq!(answer["ok"], true, "vmha {args:?}: {answer}");
    };
    let worker = format!("{VM}/worker");

    // explain --json: the VM, its decisions (the VM restart decided for db, with its
    // arithmetic) as the socket says.
    let remote = json(&["explain", VM, "--json"], 0);
    let local = h.get(&format!("/v1/vms/{VM}/explain")).1;
    assert_eq!(remote["vm"]["name"], VM, "{remote}");
    assert_eq!(remote["vm"]["decisions"], local["vm"]["decisions"]);
    let decisions = remote["vm"]["decisions"].as_array().unwrap();
    assert!(
        decisions
            .iter()
            .any(|d| d["verdict"] == "restart-vm"
                && d["reason"].as_str().is_some_and(|r| !r.is_empty())),
        "{remote}"
    );
    assert!(remote["events"].as_array().is_some_and(|e| !e.is_empty()));

    // freeze, then unfreeze.
    ok(&["freeze", VM, "--json"]);
    wait_vm(h, "frozen", |v| v["frozen"] == true);
    let explained = json(&["explain", VM, "--json"], 0);
    assert_eq!(explained["vm"]["frozen"], true, "{explained}");
    ok(&["unfreeze", VM, "--json"]);
    wait_vm(h, "unfrozen", |v| v["frozen"] == false);

    // clear: the VM's restart budget (two VM restarts so far) reset, apps re-armed.
    let before = h.vm_status(VM);
    assert!(
        before["vm_restarts_in_window"].as_u64().unwrap() > 0,
        "{before}"
    );
    ok(&["clear", VM, "--json"]);
    wait_vm(h, "the budgets reset", |v| {
        v["vm_restarts_in_window"] == 0
            && v["apps"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a["restarts_in_window"] == 0 && a["state"] == "online")
    });

    // Run-time settings: priority, policy with its tie rule, the app's and the VM's budgets.
    ok(&["set", "priority", &worker, "7", "--json"]);
    ok(&[
        "set",
        "policy",
        VM,
        "weighted",
        "--tie",
        "no-action",
        "--json",
    ]);
    ok(&[
        "set",
        "app-budget",
        &worker,
        "--limit",
        "4",
        "--window",
        "15m",
        "--json",
    ]);
    ok(&[
        "set",
        "vm-budget",
        VM,
        "--limit",
        "6",
        "--window",
        "1h",
        "--json",
    ]);
    let vm = wait_vm(h, "the settings applied", |v| {
        let w = app_of(v, "worker");
        w["priority"] == 7
            && v["policy"] == "weighted"
            && v["tie"] == "no-action"
            && w["restart_limit"] == 4
            && w["restart_window_ms"] == 900_000
            && v["vm_restart_limit"] == 6
            && v["vm_restart_window_ms"] == 3_600_000
    });
    assert_eq!(app_of(&vm, "web")["priority"], 50, "another app changed");
    // A setting outside its range is a usage error: exit 2, nothing sent.
    let out = run(&["set", "priority", &worker, "0", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(app_of(&h.vm_status(VM), "worker")["priority"], 7);

    // app offline (sticky) then online: the flag set and cleared, worker online throughout.
    let m = h.mark();
    ok(&["app", "offline", &worker, "--no-auto-clear", "--json"]);
    h.wait_for(m, &worker, "online", "offline");
    assert_eq!(
        h.app_status(VM, "worker")["offline"],
        json!({"auto_clear": false})
    );
    let m = h.mark();
    ok(&["app", "online", &worker, "--json"]);
    h.wait_for(m, &worker, "offline", "online");
    assert_eq!(h.app_status(VM, "worker")["offline"], Value::Null);
    assert_eq!(h.app(VM, "check", "worker"), 0);

    // guest exec --json: the command's output and exit code, passed through.
    let out = json(
        &[
            "guest",
            "exec",
            VM,
            "--json",
            "--",
            "/bin/sh",
            "-c",
            "echo from-the-guest; exit 3",
        ],
        3,
    );
    assert_eq!(out["exit"], 3, "{out}");
    assert_eq!(out["stdout"], "from-the-guest\n", "{out}");

    // vm restart: the VM restarted on the host (a new QEMU), apps in order.
    let pid = h.qemu_pid(VM);
    let m = h.mark();
    ok(&["vm", "restart", VM, "--json"]);
    let (i, _) = h.wait_for(m, VM, "online", "restarting");
    check_start_order(h, i, "restarting");
    let restarted = h.qemu_pid(VM);
    assert_ne!(restarted, pid, "vm restart: the same QEMU");
    assert_eq!(h.qemu_processes(VM), vec![restarted]);

    // vm stop: apps stopped, then the VM; it stays stopped (desired stop).
    let m = h.mark();
    ok(&["vm", "stop", VM, "--json"]);
    h.wait_for(m, VM, "*", "offline");
    let vm = wait_vm(h, "desired stop", |v| v["desired"] == "stop");
    assert_eq!(vm["state"], "offline", "{vm}");
    assert!(!alive(restarted), "QEMU {restarted} still runs");
    assert!(h.qemu_processes(VM).is_empty(), "a QEMU runs");
    let status = json(&["status", "--json"], 0);
    assert_eq!(status["agent"]["vms"][0]["state"], "offline", "{status}");

    // vm start: a new QEMU, apps in order, desired run.
    let m = h.mark();
    ok(&["vm", "start", VM, "--json"]);
    let (i, _) = h.wait_for(m, VM, "*", "starting");
    check_start_order(h, i, "starting");
    assert_eq!(h.vm_status(VM)["desired"], "run");
    assert_eq!(h.qemu_processes(VM).len(), 1);
}

/// Scenario 10: requests vmhad must refuse without changing anything.
fn bad_api_requests(h: &Vmhad) {
    let before = h.status()["agent"].clone();
    let m = h.mark();
    let bad: Vec<(&str, &str, &str)> = vec![
        ("GET", "/v1/vms/nosuch/explain", ""),
        ("POST", "/v1/vms/nosuch/exec", r#"{"argv":["/bin/true"]}"#),
        (
            "POST",
            "/v1/commands",
            r#"{"command":"app-offline","vm":"nosuch","app":"web","auto_clear":true}"#,
        ),
        (
            "POST",
            "/v1/commands",
            r#"{"command":"app-offline","vm":"shop","app":"nosuch","auto_clear":true}"#,
        ),
        (
            "POST",
            "/v1/commands",
            r#"{"command":"vm-restart","vm":"nosuch"}"#,
        ),
        (
            "POST",
            "/v1/commands",
            r#"{"command":"freeze","vm":"nosuch"}"#,
        ),
        (
            "POST",
            "/v1/commands",
            r#"{"command":"app-offline","vm":"shop","#,
        ),
        ("POST", "/v1/commands", "not json at all"),
        (
            "POST",
            "/v1/commands",
            r#"{"command":"reboot-the-world","vm":"shop"}"#,
        ),
        ("POST", "/v1/commands", r#"{"vm":"shop","app":"web"}"#),
        (
            "POST",
            "/v1/commands",
            r#"{"command":"set-priority","vm":"shop","app":"web","priority":0}"#,
        ),
        ("POST", "/v1/vms/shop/exec", r#"{"argv":[]}"#),
        (
            "POST",
            "/v1/vms/shop/exec",
            r#"{"argv":["/bin/true"],"timeout_ms":0}"#,
        ),
        ("POST", "/v1/vms/shop/exec", r#"{"argv":"/bin/true"}"#),
        ("GET", "/v1/events?limit=notanumber", ""),
        ("GET", "/v1/events?limit=10001", ""),
    ];
    for (method, path, body) in bad {
        let (status, text) = common::http(&h.socket(), method, path, Some(body));
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        println!("{method} {path} {body} → {status} {text}");
        assert!(
            (400..500).contains(&status),
            "{method} {path} {body}: status {status}, body {text}"
        );
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path} {body}: not a JSON error: {text}"
        );
        assert!(
            json["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{method} {path} {body}: no error code: {text}"
        );
    }
    // Run-time values outside the ranges of the configuration: 400, naming the allowed range.
    for (body, range) in [
        (
            r#"{"command":"set-priority","vm":"shop","app":"web","priority":4000000000}"#,
            "`priority` = 4000000000 is out of range (allowed: 1 to 1000000)",
        ),
        (
            r#"{"command":"set-app-budget","vm":"shop","app":"web","restart_limit":4294967295,"restart_window_ms":60000}"#,
            "(allowed: 0 to 1000)",
        ),
        (
            r#"{"command":"set-app-budget","vm":"shop","app":"web","restart_limit":3,"restart_window_ms":18446744073709551615}"#,
            "(allowed: 1s to 7d)",
        ),
        (
            r#"{"command":"set-vm-budget","vm":"shop","vm_restart_limit":101,"vm_restart_window_ms":60000}"#,
            "(allowed: 0 to 100)",
        ),
        (
            r#"{"command":"set-vm-budget","vm":"shop","vm_restart_limit":3,"vm_restart_window_ms":604800001}"#,
            "(allowed: 1s to 7d)",
        ),
    ] {
        let (status, text) = common::http(&h.socket(), "POST", "/v1/commands", Some(body));
        println!("POST /v1/commands {body} → {status} {text}");
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(range), "{body}: {text}");
    }
    // Nothing changed: no events, the same status (apps, flags, budgets, decisions).
    let after = h.status()["agent"].clone();
    assert_eq!(before, after, "status changed by bad requests");
    assert_eq!(
        h.mark(),
        m,
        "events from bad requests:\n{}",
        h.events_text(m)
    );
}

/// `--stop-vms-on-exit`: on SIGTERM vmhad shuts its VM down and exits 0 only once the QEMU
/// process is gone (without the flag the VM survives: [`daemon_restarts`]).
#[test]
fn stop_vms_on_exit_stops_the_vm_before_vmhad_exits() {
    let _lock = vm_test_lock();
    let mut h = boot_with(|h| h.args.push("--stop-vms-on-exit".to_string()));
    let pid = h.qemu_pid(VM);
    assert!(alive(pid));
    let status = h.signal_and_wait(Signal::SIGTERM);
    assert!(
        status.success(),
        "vmhad exit status after SIGTERM: {status}"
    );
    assert!(!alive(pid), "the VM's QEMU survived vmhad's exit");
    assert_eq!(h.qemu_processes(VM), Vec::<i32>::new());
    let log = h.log_tail(200);
    assert!(!log.contains("stopping on exit failed"), "{log}");
    assert!(!log.contains("leaving VMs running"), "{log}");
}

/// Scenarios 6, 7, 8: a daemon restart adopts the running VM, admin flags survive it, and a
/// daemon SIGKILLed in the middle of a VM restart resumes safely.
#[test]
fn daemon_restarts() {
    let _lock = vm_test_lock();
    let mut h = boot();
    let pid0 = h.qemu_pid(VM);

    // 7. Admin flags: worker intentionally offline (sticky), web's priority changed.
    let m = h.mark();
    h.command_ok(
        &json!({"command": "app-offline", "vm": VM, "app": "worker", "auto_clear": false}),
    );
    h.command_ok(&json!({"command": "set-priority", "vm": VM, "app": "web", "priority": 70}));
    h.wait_for(m, "shop/worker", "online", "offline");
    let flags = |h: &Vmhad| {
        (
            h.app_status(VM, "worker")["offline"].clone(),
            h.app_status(VM, "web")["priority"].clone(),
        )
    };
    let expected = (json!({"auto_clear": false}), json!(70));
    assert_eq!(flags(&h), expected);

    // 6. SIGTERM: vmhad exits 0 and leaves the VM running; the next vmhad adopts it.
    let status = h.signal_and_wait(Signal::SIGTERM);
    assert!(
        status.success(),
        "vmhad exit status after SIGTERM: {status}"
    );
    assert!(alive(pid0), "SIGTERM stopped the VM");
    let m = h.mark();
    let t0 = now_ms();
    h.start();
    let (_, adopted) = h.wait_for(m, VM, "*", "online");
    println!("adopted: {}", adopted.text);
    // The apps are seen online (worker: running but flagged offline).
    let (_, db) = h.wait_for(m, "shop/db", "*", "online");
    h.wait_for(m, "shop/web", "*", "online");
    h.wait_for(m, "shop/worker", "*", "offline");
    latency("vmhad restart → adopted VM online", t0, adopted.time);
    latency("vmhad restart → adopted VM's db seen online", t0, db.time);
    println!("events after adoption:\n{}", h.events_text(m));
    assert_eq!(h.qemu_pid(VM), pid0, "the VM was not adopted");
    assert_eq!(h.qemu_processes(VM), vec![pid0]);
    assert_no_vm_start(&h, m);
    assert_eq!(h.vm_status(VM)["state"], "online");
    // 7. The admin flags survived.
    assert_eq!(flags(&h), expected, "admin flags lost across the restart");
    assert_eq!(h.app(VM, "check", "worker"), 0, "worker was stopped");

    let m = h.mark();
    h.command_ok(&json!({"command": "app-online", "vm": VM, "app": "worker"}));
    h.wait_for(m, "shop/worker", "offline", "online");

    // 8. vmhad SIGKILLed in the middle of a VM restart, at two points of the plan.
    for kill_point in ["apps stopping", "VM stopped"] {
        let old = h.qemu_pid(VM);
        let m = h.mark();
        h.command_ok(&json!({"command": "vm-restart", "vm": VM}));
        let (_, at) = match kill_point {
            "apps stopping" => h.wait_for(m, VM, "online", "restarting"),
            _ => h.wait_for_event(m, "VM stopped", |e| {
                e.is("shop/db", "*", "unknown") && e.reason.contains("stopped")
            }),
        };
        let status = h.signal_and_wait(Signal::SIGKILL);
        assert!(!status.success());
        println!(
            "SIGKILL at `{kill_point}` (after: {}); QEMUs then: {:?} (old {old})",
            at.text,
            h.qemu_processes(VM)
        );
        let m2 = h.mark();
        let t0 = now_ms();
        h.start();
        // The VM ends online with all its apps, exactly one QEMU.
        let (_, online) =
            h.wait_for_event(m2, "VM online after resume", |e| e.is(VM, "*", "online"));
        for app in ["db", "web", "worker"] {
            if h.app_status(VM, app)["state"] != "online" {
                h.wait_for(m2, &format!("{VM}/{app}"), "*", "online");
            }
        }
        latency(
            &format!("resume after SIGKILL at `{kill_point}` → VM online"),
            t0,
            online.time,
        );
        println!("events after the resume:\n{}", h.events_text(m2));
        assert_all_online(&h);
        let pid = h.qemu_pid(VM);
        assert_eq!(
            h.qemu_processes(VM),
            vec![pid],
            "not exactly one QEMU for {VM}"
        );
        println!(
            "kill point `{kill_point}`: VM {}",
            if pid == old {
                "kept its QEMU"
            } else {
                "restarted"
            }
        );
        for app in ["db", "web", "worker"] {
            assert_eq!(h.app(VM, "check", app), 0, "{app} not running in the guest");
        }
    }
    // A later probe cycle changes nothing: still one QEMU, all online.
    let pid = h.qemu_pid(VM);
    let m = h.mark();
    kill_app(&h, "web");
    h.wait_for(m, "shop/web", "restarting", "online");
    assert_eq!(h.qemu_processes(VM), vec![pid]);
    assert!(vm_events(&h.since(m)).is_empty(), "{}", h.events_text(m));
}

/// No event (re)starting the VM since cursor `m`.
fn assert_no_vm_start(h: &Vmhad, m: usize) {
    let evs = h.since(m);
    let restarted: Vec<&Ev> = evs
        .iter()
        .filter(|e| e.object == VM && (e.to == "starting" || e.to == "restarting"))
        .collect();
    assert!(
        restarted.is_empty(),
        "adoption (re)started the VM:\n{}",
        texts(&restarted)
    );
}

/// Scenario 7 with a frozen VM: the freeze survives a daemon restart (both in the host agent's
/// and the controller's view), the VM is adopted untouched and shown as what it is: online.
#[test]
fn freeze_survives_daemon_restart() {
    let _lock = vm_test_lock();
    let mut h = boot();
    let pid0 = h.qemu_pid(VM);
    h.command_ok(&json!({"command": "freeze", "vm": VM}));
    assert_eq!(h.vm_status(VM)["frozen"], json!(true));
    let status = h.signal_and_wait(Signal::SIGTERM);
    assert!(
        status.success(),
        "vmhad exit status after SIGTERM: {status}"
    );
    let m = h.mark();
    h.start();
    for app in ["db", "web", "worker"] {
        h.wait_for(m, &format!("{VM}/{app}"), "*", "online");
    }
    println!(
        "events after adoption of the frozen VM:\n{}",
        h.events_text(m)
    );
    let status = h.status();
    println!("status: {status}");
    assert_eq!(h.vm_status(VM)["frozen"], json!(true), "freeze lost");
    assert_eq!(
        status["cluster_view"]["vms"][0]["frozen"],
        json!(true),
        "the controller forgot the freeze"
    );
    assert_eq!(h.qemu_pid(VM), pid0, "the VM was not adopted");
    assert_eq!(h.qemu_processes(VM), vec![pid0]);
    assert_no_vm_start(&h, m);
    // Seeing that the VM runs and its apps are online is monitoring, not acting: a frozen VM
    // adopted by a new vmhad must not be left `unknown`.
    assert_eq!(
        h.vm_status(VM)["state"],
        "online",
        "frozen VM adopted with all apps online is not shown online: {}",
        h.vm_status(VM)
    );
}

/// Scenario 9: a bad config → exit code 2, the file:line error on stderr, nothing created.
#[test]
fn bad_config_exits_2_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = dir.path().join("run");
    let good = common::cluster_config(dir.path(), &[common::demo_vm(VM)]);
    let unknown_key = good.replacen(
        "hosts = [\"kvm1\"]",
        "hosts = [\"kvm1\"]\ncolour = \"red\"",
        1,
    );
    let bad_requires = good.replacen("requires = [\"web\"]", "requires = [\"nosuch\"]", 1);
    let syntax = good.replacen("[vm.qemu]", "[vm.qemu", 1);
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases = [
        (
            "unknown key",
            unknown_key.clone(),
            line_of(&unknown_key, "colour"),
            "colour",
        ),
        (
            "unknown requires",
            bad_requires.clone(),
            line_of(&bad_requires, "nosuch"),
            "nosuch",
        ),
        ("syntax", syntax.clone(), line_of(&syntax, "[vm.qemu"), ""),
    ];
    for (what, text, line, mention) in cases {
        let config = dir.path().join("vmha.toml");
        std::fs::write(&config, &text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmhad"))
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .arg("--runtime-dir")
            .arg(&run)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{what}: exit {:?}\n{stderr}", out.status.code());
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        let location = format!("{}:{line}:", config.display());
        assert!(
            stderr.contains(&location),
            "{what}: no `{location}` in {stderr}"
        );
        assert!(stderr.contains(mention), "{what}: {stderr}");
        assert!(!state.exists(), "{what}: state dir created");
        assert!(!run.exists(), "{what}: runtime dir created");
        assert!(
            processes_naming(run.to_str().unwrap()).is_empty(),
            "{what}: a QEMU was started"
        );
    }
    // Not a configuration file at all: refused at once (a FIFO used to block vmhad forever).
    let fifo = dir.path().join("fifo.toml");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"[cluster]\nname = \"caf\xe9\"\n").unwrap();
    for (path, expect) in [
        (
            fifo.clone(),
            format!("{}: is a named pipe (FIFO)", fifo.display()),
        ),
        (dir.path().to_path_buf(), "is a directory".to_string()),
        (
            std::path::PathBuf::from("/dev/null"),
            "/dev/null: is a character device".to_string(),
        ),
        (
            latin1.clone(),
            format!("{}:2:12: not UTF-8 text", latin1.display()),
        ),
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmhad"))
            .arg("--config")
            .arg(&path)
            .arg("--state-dir")
            .arg(&state)
            .arg("--runtime-dir")
            .arg(&run)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A guard against a hang, not a speed check: vmhad refuses in milliseconds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vmhad --config {} hung", path.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
        assert!(stderr.contains(&expect), "{}: {stderr}", path.display());
        assert!(!state.exists() && !run.exists(), "{}", path.display());
    }
    // A valid config naming no host of this machine: exit 2 too, nothing created.
    let config = dir.path().join("vmha.toml");
    std::fs::write(&config, &good).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .arg("--config")
        .arg(&config)
        .args(["--host", "nosuch"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--runtime-dir")
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!state.exists() && !run.exists());
}

/// A hung guest never delays another VM: with the guest agent of `shop` frozen (SIGSTOP inside
/// the guest), an app killed in `mall` is still detected and restarted, and `mall`'s VM is never
/// touched; `shop`'s own guest loss is then handled by `on_guest_loss = restart-vm`.
#[test]
fn a_hung_guest_does_not_delay_another_vm() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&["shop", "mall"]);
    h.start();
    for vm in ["shop", "mall"] {
        h.wait_for(0, vm, "*", "online");
    }
    let mall_pid = h.qemu_pid("mall");
    let shop_pid = h.qemu_pid("shop");
    // Freeze shop's guest agent from inside the guest, a second after this exec returned, for
    // longer than shop's guest_timeout.
    let out = h.exec(
        "shop",
        &[
            "/bin/sh",
            "-c",
            "setsid /bin/sh -c 'sleep 1; kill -STOP $(pidof qemu-ga); sleep 40; \
             kill -CONT $(pidof qemu-ga)' </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(out["exit"], 0, "{out}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let m = h.mark();
    let t = now_ms();
    assert_eq!(h.app("mall", "kill", "web"), 0);
    let (i, detected) = h.wait_for(m, "mall/web", "online", "restarting");
    let (_, back) = h.wait_for(i, "mall/web", "restarting", "online");
    latency(
        "mall: app kill → detected (shop's agent hung)",
        t,
        detected.time,
    );
    latency(
        "mall: app kill → online again (shop's agent hung)",
        t,
        back.time,
    );
    // shop's guest channel was still hung all along: nothing about shop recovered meanwhile.
    assert!(
        !h.since(m).iter().any(|e| e.is("shop", "*", "online")),
        "shop recovered before mall was handled:\n{}",
        h.events_text(m)
    );
    // shop's guest loss ends in a VM restart; mall is never touched.
    let (j, lost) = h.wait_for_event(m, "shop restarted for guest loss", |e| {
        e.is("shop", "online", "restarting")
    });
    println!("shop: {}", lost.text);
    h.wait_for(j, "shop", "restarting", "online");
    assert_ne!(h.qemu_pid("shop"), shop_pid, "shop was not restarted");
    assert_eq!(h.qemu_pid("mall"), mall_pid, "mall's VM was touched");
    assert!(
        !h.since(m).iter().any(|e| e.is("mall", "*", "*")),
        "mall's VM changed state:\n{}",
        h.events_text(m)
    );
}

/// A guest agent that blocks `guest-exec` (as RHEL's default qemu-ga configuration does): the VM
/// is started and left alone — its apps are `unknown` with the reason, no guest loss and no
/// restart loop — and admin app commands are refused with that reason.
#[test]
fn a_guest_that_blocks_guest_exec_is_left_alone() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&[VM]);
    let blocked = common::demo_vm(VM).replace(
        r#"append = "console=ttyS0 quiet""#,
        r#"append = "console=ttyS0 quiet qga_block=guest-exec,guest-exec-status""#,
    );
    let config = common::cluster_config(h.config.parent().unwrap(), &[blocked]);
    std::fs::write(&h.config, config).unwrap();
    h.start();
    let (i, online) = h.wait_for(0, VM, "starting", "online");
    println!("{}", online.text);
    let pid = h.qemu_pid(VM);
    for (app, state) in h.app_states(VM) {
        assert_eq!(state, "unknown", "app {app}");
        let reason = h.app_status(VM, &app)["reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(reason.contains("guest-exec is blocked"), "{app}: {reason}");
    }
    assert_eq!(h.vm_status(VM)["guest_exec_blocked"], json!(true));
    let (status, body) = h.command(&json!({"command": "app-start", "vm": VM, "app": "db"}));
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("blocks guest-exec"),
        "{body}"
    );
    // Longer than guest_timeout (15 s): still the same VM, never restarted.
    std::thread::sleep(std::time::Duration::from_secs(20));
    let vm_changes: Vec<_> = h
        .since(i + 1)
        .into_iter()
        .filter(|e| e.is(VM, "*", "*"))
        .collect();
    assert!(
        vm_changes.is_empty(),
        "the VM changed state: {vm_changes:?}"
    );
    assert_eq!(h.qemu_pid(VM), pid);
    assert_eq!(h.vm_status(VM)["state"], "online");
}

/// Sends one QMP command to `vm`'s monitor while no vmhad holds it; panics on an error reply.
fn qmp_command(h: &Vmhad, vm: &str, command: &str) {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(h.run.join(vm).join("qmp.sock")).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // greeting
    for execute in ["qmp_capabilities", command] {
        writeln!(writer, "{}", json!({"execute": execute})).unwrap();
        loop {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let reply: Value = serde_json::from_str(&line).unwrap();
            assert!(reply.get("error").is_none(), "{execute}: {reply}");
            if reply.get("return").is_some() {
                break;
            }
        }
    }
}

/// A VM paused while no vmhad ran (operator `stop`, or an I/O error with `werror=stop`) is
/// adopted as a running, paused VM that vmhad manages — not left `unknown` while paused.
#[test]
fn a_paused_vm_is_adopted() {
    let _lock = vm_test_lock();
    let mut h = boot();
    let pid0 = h.qemu_pid(VM);
    let status = h.signal_and_wait(Signal::SIGTERM);
    assert!(
        status.success(),
        "vmhad exit status after SIGTERM: {status}"
    );
    qmp_command(&h, VM, "stop");
    let m = h.mark();
    h.start();
    h.wait_for(m, VM, "*", "online");
    println!("events after adoption:\n{}", h.events_text(m));
    let vm = h.vm_status(VM);
    assert_eq!(vm["state"], "online", "{vm}");
    assert_eq!(vm["paused"], json!(true), "{vm}");
    assert_eq!(
        h.qemu_processes(VM),
        vec![pid0],
        "the paused VM was not adopted"
    );
    assert_no_vm_start(&h, m);
}

/// A booted VM whose vmhad restarts while the VM's QEMU is stopped by `SIGSTOP` (its QMP
/// socket never greets): the new vmhad, that QEMU's pid, and the event mark before the restart.
fn restarted_with_qemu_stopped() -> (Vmhad, i32, usize) {
    let mut h = boot();
    let pid0 = h.qemu_pid(VM);
    assert!(h.signal_and_wait(Signal::SIGTERM).success());
    kill(Pid::from_raw(pid0), Signal::SIGSTOP).unwrap();
    let m = h.mark();
    h.start();
    (h, pid0, m)
}

/// A QEMU that cannot be adopted is not taken for gone: with the VM's QEMU stopped by
/// `SIGSTOP` while vmhad restarts (as stuck on its storage: its QMP socket never greets), the
/// new vmhad starts no second QEMU beside it (nor tries to); the VM counts as running with
/// its guest lost, so `on_guest_loss = restart-vm` kills that QEMU and starts the VM again.
#[test]
fn a_qemu_that_cannot_be_adopted_is_killed_before_the_vm_starts_again() {
    let _lock = vm_test_lock();
    let (mut h, pid0, m) = restarted_with_qemu_stopped();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(150);
    loop {
        let qemus = h.qemu_processes(VM);
        assert!(
            qemus.len() <= 1,
            "two QEMUs of {VM}: {qemus:?}\n{}",
            h.events_text(m)
        );
        if seen.last() != Some(&qemus) {
            seen.push(qemus.clone());
        }
        if qemus.first().is_some_and(|&p| p != pid0) && h.vm_status(VM)["state"] == "online" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VM did not come back online with a new QEMU: {seen:?}\n{}",
            h.events_text(m)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let events = h.events_text(m);
    println!("QEMUs seen: {seen:?}\nevents after the restart:\n{events}");
    assert!(!alive(pid0), "the stopped QEMU was left behind");
    assert_eq!(seen.first(), Some(&vec![pid0]), "{seen:?}");
    let log = h.log_tail(2000);
    assert!(
        !log.contains("is already running"),
        "vmhad tried to start a second QEMU:\n{log}"
    );
    // Taken as running, said so, then restarted for the guest's loss: never a start beside it.
    let evs = h.since(m);
    let vm_evs: Vec<&Ev> = evs
        .iter()
        .filter(|e| e.object == VM && e.origin != "controller")
        .collect();
    let first = vm_evs.first().map(|e| e.text.as_str()).unwrap_or_default();
    assert!(
        first.contains("→ online") && first.contains("does not answer"),
        "{events}"
    );
    assert!(
        vm_evs
            .iter()
            .any(|e| e.to == "restarting" && e.text.contains("on_guest_loss = restart-vm")),
        "{events}"
    );
    assert!(!vm_evs.iter().any(|e| e.to == "starting"), "{events}");
    for app in ["db", "web", "worker"] {
        if h.app_status(VM, app)["state"] != "online" {
            h.wait_for(m, &format!("{VM}/{app}"), "*", "online");
        }
    }
}

/// A QEMU that could not be adopted and then answers again is adopted, not restarted: vmhad
/// restarts while the VM's QEMU is stopped by `SIGSTOP` (taken as running, unresponsive);
/// `SIGCONT` follows at once. A safety poll adopts it (the VM says its QEMU answers again) and,
/// past the guest channel's timeout (15 s), the same QEMU still runs, the VM was never
/// restarted, and its apps are online. Its status says "QEMU not answering" while stopped,
/// and no longer once adopted.
#[test]
fn a_qemu_that_answers_again_is_adopted_and_not_restarted() {
    let _lock = vm_test_lock();
    let (mut h, pid0, m) = restarted_with_qemu_stopped();
    let (i, first) = h.wait_for_event(m, "the VM taken as running, unresponsive", |e| {
        e.object == VM && e.origin != "controller"
    });
    assert!(
        first.to == "online" && first.text.contains("does not answer"),
        "{}",
        h.events_text(m)
    );
    assert_eq!(h.vm_status(VM)["qemu_unresponsive"], json!(true));
    kill(Pid::from_raw(pid0), Signal::SIGCONT).unwrap();
    h.wait_for_event(i + 1, "its QEMU answers again", |e| {
        e.object == VM && e.text.contains("its QEMU answers again: adopted")
    });
    for app in ["db", "web", "worker"] {
        if h.app_status(VM, app)["state"] != "online" {
            h.wait_for(i, &format!("{VM}/{app}"), "*", "online");
        }
    }
    // Past guest_timeout (15 s) from the adoption: the same QEMU, never restarted.
    std::thread::sleep(std::time::Duration::from_secs(16));
    let events = h.events_text(m);
    assert_eq!(h.qemu_processes(VM), vec![pid0], "{events}");
    assert_no_vm_start(&h, m);
    let vm_evs: Vec<Ev> = h
        .since(m)
        .into_iter()
        .filter(|e| e.object == VM && e.from != e.to)
        .collect();
    assert!(
        vm_evs.iter().all(|e| e.to == "online"),
        "the VM changed state: {events}"
    );
    let vm = h.vm_status(VM);
    assert_eq!(vm["state"], "online", "{vm}");
    assert_eq!(vm["qemu_unresponsive"], json!(false), "{vm}");
}

/// Under systemd (a fake `NOTIFY_SOCKET` here), a restarted vmhad says `READY=1` only once
/// the VM left running is adopted. The adoption is held (debug-build hook
/// `VMHAD_TEST_HOLD_ADOPTION`, as behind a slow QMP socket) while the API already answers: no
/// `READY=1` has come then, and the VM is not known online; once released, `READY=1` comes
/// and, asked right then, vmhad knows the VM online, with the same QEMU, and started none.
#[test]
fn a_restarted_vmhad_is_ready_with_its_running_vm_adopted() {
    use std::os::unix::net::UnixDatagram;
    let _lock = vm_test_lock();
    let mut h = boot();
    let pid0 = h.qemu_pid(VM);
    assert!(h.signal_and_wait(Signal::SIGTERM).success());
    let socket = h.config.with_file_name("notify.sock");
    let systemd = UnixDatagram::bind(&socket).unwrap();
    let hold = h.config.with_file_name("hold-adoption");
    std::fs::write(&hold, "").unwrap();
    h.env = vec![
        ("NOTIFY_SOCKET".into(), socket.display().to_string()),
        (
            "VMHAD_TEST_HOLD_ADOPTION".into(),
            hold.display().to_string(),
        ),
    ];
    let m = h.mark();
    // Returns once the API answers and its event stream is followed.
    h.start();
    let vm = h.vm_status(VM);
    assert_ne!(vm["state"], "online", "adopted despite the hold: {vm}");
    systemd.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    match systemd.recv(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        got => panic!(
            "notified before the VM was adopted: {:?}",
            got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        ),
    }
    assert!(!h.log_tail(200).contains("adopted running VM"));

    std::fs::remove_file(&hold).unwrap();
    systemd.set_nonblocking(false).unwrap();
    systemd
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let n = systemd.recv(&mut buf).expect("no READY=1 within 60 s");
    assert_eq!(&buf[..n], b"READY=1\nSTATUS=running");
    let log = h.log_tail(200);
    assert!(
        log.contains("adopted running VM"),
        "READY=1 before the VM was adopted:\n{log}"
    );
    let vm = h.vm_status(VM);
    assert_eq!(vm["state"], "online", "not adopted at READY=1: {vm}");
    assert_eq!(h.qemu_processes(VM), vec![pid0]);
    assert_no_vm_start(&h, m);
}
