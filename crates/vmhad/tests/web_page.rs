//! The web page in a real browser (heavy: boots the test guest). A vmhad with one VM serves its
//! API on TCP with tokens; a headless Chromium, driven over the DevTools protocol, loads the
//! page, is asked for the token and given it, and then — without ever reloading — shows the
//! host and the VM online (badges) and its apps, shows an app killed in the guest being
//! restarted (its restart budget used and the events of it arriving live), asks for a
//! confirmation before every admin action (all cancelled: nothing sent, nothing changed), and
//! carries out one (app stop) once confirmed, which vmhad applies. A real decision (an app
//! faulted with no restart left, weighed by the decision agent) shows in `explain` with its
//! arithmetic, and the page and `/metrics` agree on every state and restart count. A command
//! that is not possible now is refused over TCP with a JSON error and changes nothing.
//! Screenshots (desktop and phone-sized) are saved under `target/artifacts/`; the
//! phone-sized page must not scroll sideways.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::cdp::Browser;
use common::tcp::{self, ADMIN, READER};
use common::{Vmhad, vm_test_lock};
use serde_json::json;

const VM: &str = "shop";

/// Where test artifacts go: `<target dir>/artifacts` (the target dir holds this test's vmhad).
fn artifacts() -> PathBuf {
    let vmhad = PathBuf::from(env!("CARGO_BIN_EXE_vmhad"));
    vmhad
        .ancestors()
        .nth(2)
        .map(|t| t.join("artifacts"))
        .unwrap()
}

/// A JS expression: the state shown for app `app` of the VM (`null` while not shown).
fn app_state(app: &str) -> String {
    format!(
        "((document.querySelector('tr[data-app=\"{VM}/{app}\"]') || {{dataset: {{}}}}).dataset.state || null)"
    )
}

/// A JS expression: the text of app `app`'s row.
fn app_row(app: &str) -> String {
    format!(
        "((document.querySelector('tr[data-app=\"{VM}/{app}\"]') || {{innerText: ''}}).innerText)"
    )
}

/// A JS expression clicking the button of `action` on `app` of the VM.
fn click(action: &str, app: &str) -> String {
    format!(
        "(() => {{ const b = document.querySelector('button[data-action=\"{action}\"][data-vm=\"{VM}\"][data-app=\"{app}\"]'); \
         if (!b) return false; b.click(); return true; }})()"
    )
}

#[test]
fn the_page_shows_the_cluster_live_and_acts_behind_a_confirmation() {
    let _lock = vm_test_lock();
    let wait = common::WAIT;
    let mut h = Vmhad::new(&[VM]);
    let api = tcp::enable(&h, false);
    h.start();
    let (i, _) = h.wait_for(0, VM, "starting", "online");
    h.wait_for_event(i, "the controller's view: VM online", |e| {
        e.origin == "controller" && e.object == VM && e.to == "online"
    });

    let mut b = Browser::start(1100, 1000);
    b.open(&api.url());
    // Without a token the page asks for one; a wrong one is refused and asked again.
    b.wait(
        "the token form shows",
        "!document.getElementById('login').hidden",
        wait,
    );
    let submit = |t: &str| {
        format!(
            "document.getElementById('token').value = {}; \
             document.getElementById('login').requestSubmit(); true",
            json!(t)
        )
    };
    b.eval(&submit("not-the-token-0123456789"));
    b.wait(
        "a wrong token is refused",
        "!document.getElementById('login').hidden && \
         document.getElementById('login-error').textContent.includes('token')",
        wait,
    );
    assert_eq!(b.eval("sessionStorage.getItem('vmha-token')"), json!(null));
    b.eval(&submit(ADMIN));
    // A marker that a reload would lose.
    b.eval("window.__vmhaNoReload = 1");
    b.wait(
        "the page shows the VM",
        &format!("!!document.querySelector('article[data-vm=\"{VM}\"]')"),
        wait,
    );
    for app in ["db", "web", "worker"] {
        b.wait(
            &format!("{app} online"),
            &format!("{} === 'online'", app_state(app)),
            wait,
        );
    }
    // The hosts table: this host's row, its state badge up; the VM's badge online.
    b.wait(
        "the host's row shows kvm1 up",
        "(() => { const r = document.querySelector('#hosts tr[data-host=\"kvm1\"]'); \
         const s = r && r.querySelector('.badge'); \
         return !!s && s.dataset.state === 'up' && s.classList.contains('up') && \
         r.querySelector('.name').textContent === 'kvm1'; })()",
        wait,
    );
    b.wait(
        "the VM's badge shows online",
        &format!(
            "(() => {{ const s = document.querySelector('article[data-vm=\"{VM}\"] h3 .badge'); \
             return !!s && s.dataset.state === 'online' && s.classList.contains('online'); }})()"
        ),
        wait,
    );
    assert_eq!(b.eval("sessionStorage.getItem('vmha-token')"), json!(ADMIN));
    assert_eq!(
        b.eval("localStorage.length"),
        json!(0),
        "the token is kept in the tab only"
    );
    b.wait(
        "the event stream is live",
        "document.getElementById('link').textContent === 'live'",
        wait,
    );
    assert!(
        b.eval(&app_row("web")).as_str().unwrap().contains("0 / 5"),
        "web's budget unused"
    );

    // web killed in the guest (guest exec over TCP with the admin token): the page shows its
    // restart (budget 1 / 5) and the events, live.
    let m = h.mark();
    let kill = api.request(
        "POST",
        &format!("/v1/vms/{VM}/exec"),
        Some(ADMIN),
        Some(&json!({"argv": ["/opt/demo/app", "kill", "web"], "timeout_ms": 20000}).to_string()),
    );
    assert_eq!(kill.status, 200, "{}", kill.body);
    assert_eq!(kill.json()["exit"], 0, "{}", kill.body);
    h.wait_for(m, "shop/web", "online", "restarting");
    h.wait_for(m, "shop/web", "restarting", "online");
    b.wait(
        "the restart event shows",
        &format!("!!document.querySelector('#events li[data-object=\"{VM}/web\"][data-to=\"restarting\"]')"),
        wait,
    );
    b.wait(
        "web's restart budget shows 1 / 5 used",
        &format!(
            "{}.includes('1 / 5') && {} === 'online'",
            app_row("web"),
            app_state("web")
        ),
        wait,
    );
    assert_eq!(
        b.eval("window.__vmhaNoReload"),
        json!(1),
        "the page was reloaded"
    );

    // Explain shows the VM's decisions and events.
    b.eval(&format!(
        "document.querySelector('button[data-action=\"explain\"][data-vm=\"{VM}\"]').click(); true"
    ));
    b.wait(
        "explain shows the VM's events",
        "!document.getElementById('explain-section').hidden && \
         document.getElementById('explain').innerText.includes('web')",
        wait,
    );

    // Not possible now: db is required by web (online) → 409 over TCP, nothing changes.
    let before = (h.app_states(VM), h.mark());
    let refused = api.request(
        "POST",
        "/v1/commands",
        Some(ADMIN),
        Some(&json!({"command": "app-stop", "vm": VM, "app": "db"}).to_string()),
    );
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.json()["code"], "command-refused");
    assert_eq!(
        api.request(
            "POST",
            "/v1/commands",
            Some(READER),
            Some(&json!({"command": "freeze", "vm": VM}).to_string())
        )
        .status,
        403
    );
    assert_eq!(
        (h.app_states(VM), h.mark()),
        before,
        "a refused command changed something"
    );

    every_action_asks_first(&mut b, &h);

    // An admin action through the page: cancelling the confirmation does nothing; confirming
    // stops worker (marked offline), and the page shows it.
    assert_eq!(b.eval(&click("app-stop", "worker")), json!(true));
    b.wait(
        "the confirmation shows",
        "!document.getElementById('confirm').hidden",
        wait,
    );
    let question = b.eval("document.getElementById('confirm-text').textContent");
    assert!(
        question.as_str().unwrap().contains("shop/worker"),
        "{question}"
    );
    b.eval("document.getElementById('confirm-no').click(); true");
    assert_eq!(
        b.eval("document.getElementById('confirm').hidden"),
        json!(true)
    );
    assert_eq!(
        h.app_status(VM, "worker")["offline"],
        json!(null),
        "cancelled, yet acted"
    );
    let m = h.mark();
    b.eval(&click("app-stop", "worker"));
    b.wait(
        "the confirmation shows again",
        "!document.getElementById('confirm').hidden",
        wait,
    );
    b.eval("document.getElementById('confirm-yes').click(); true");
    h.wait_for(m, "shop/worker", "online", "stopping");
    h.wait_for(m, "shop/worker", "stopping", "offline");
    b.wait(
        "worker shows offline",
        &format!(
            "{} === 'offline' && {}.includes('offline')",
            app_state("worker"),
            app_row("worker")
        ),
        wait,
    );
    b.wait(
        "the page says it was done",
        "document.getElementById('notice').textContent.includes('app-stop: done')",
        wait,
    );
    assert_eq!(h.app_status(VM, "worker")["state"], "offline");
    assert!(h.app_status(VM, "worker")["offline"].is_object());
    assert_eq!(
        b.eval("window.__vmhaNoReload"),
        json!(1),
        "the page was reloaded"
    );

    // A real decision: worker started again, then, with no restart left (budget 0) and the
    // weighted policy, killed in the guest: it is faulted and the decision agent weighs it
    // (10 faulted < 150 online: no action). The explain section shows the verdict and its
    // arithmetic, live.
    let m = h.mark();
    for cmd in [
        json!({"command": "app-start", "vm": VM, "app": "worker"}),
        json!({"command": "set-policy", "vm": VM, "policy": "weighted", "tie": "no-action"}),
        json!({"command": "set-app-budget", "vm": VM, "app": "worker", "restart_limit": 0, "restart_window_ms": 600_000}),
    ] {
        let r = api.request("POST", "/v1/commands", Some(ADMIN), Some(&cmd.to_string()));
        assert_eq!(r.status, 200, "{cmd}: {}", r.body);
    }
    h.wait_for(m, "shop/worker", "*", "online");
    let m = h.mark();
    let kill = api.request(
        "POST",
        &format!("/v1/vms/{VM}/exec"),
        Some(ADMIN),
        Some(
            &json!({"argv": ["/opt/demo/app", "kill", "worker"], "timeout_ms": 20000}).to_string(),
        ),
    );
    assert_eq!(kill.json()["exit"], 0, "{}", kill.body);
    h.wait_for(m, "shop/worker", "*", "faulted");
    let arithmetic = "weighted: faulted 10 (worker 10) < online 150 (db 100, web 50) → no action";
    b.wait(
        "explain shows the decision with its arithmetic",
        &format!(
            "!document.getElementById('explain-section').hidden && \
             [...document.querySelectorAll('#explain ol.decisions li')].some(li => \
               li.querySelector('strong')?.textContent === 'no-action' && \
               li.querySelector('.reason')?.textContent === 'app worker faulted; ' + {})",
            json!(arithmetic)
        ),
        wait,
    );
    let explain = api
        .request("GET", &format!("/v1/vms/{VM}/explain"), Some(READER), None)
        .json();
    let last = explain["vm"]["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["verdict"], "no-action", "{explain}");
    assert_eq!(
        last["reason"],
        format!("app worker faulted; {arithmetic}"),
        "{explain}"
    );
    b.wait(
        "worker shows faulted",
        &format!("{} === 'faulted'", app_state("worker")),
        wait,
    );
    assert_eq!(h.vm_status(VM)["state"], "online");

    // The page and /metrics tell the same: every app's state and its restarts in the window,
    // the VM's state and its VM restarts in the window, the host's state.
    let on_page = |b: &mut Browser| {
        b.eval(
            "JSON.stringify([\
               ...[...document.querySelectorAll('tr[data-app]')].map(r => \
                 [r.dataset.app, r.dataset.state, (r.innerText.match(/(\\d+) \\/ \\d+/) || [])[1] || null]), \
               ...[...document.querySelectorAll('article[data-vm]')].map(a => { \
                 const dt = [...a.querySelectorAll('dt')].find(d => d.textContent === 'VM restarts'); \
                 const used = dt ? (dt.nextElementSibling.textContent.match(/^(\\d+) \\//) || [])[1] : null; \
                 return ['vm:' + a.dataset.vm, a.querySelector('h3 .badge').dataset.state, used || null]; }), \
               ...[...document.querySelectorAll('#hosts tr[data-host]')].map(r => \
                 ['host:' + r.dataset.host, r.querySelector('.badge').dataset.state, null])])",
        )
        .as_str()
        .map(|s| serde_json::from_str::<Vec<(String, String, Option<String>)>>(s).unwrap())
        .unwrap()
        .into_iter()
        .map(|(app, state, used)| (app, (state, used)))
        .collect::<BTreeMap<_, _>>()
    };
    let deadline = std::time::Instant::now() + wait;
    let (page, metrics) = loop {
        let text = api.request("GET", "/metrics", Some(READER), None).body;
        let metrics = page_view_of_metrics(&text);
        let page = on_page(&mut b);
        if page == metrics || std::time::Instant::now() > deadline {
            break (page, metrics);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(page, metrics, "the page vs /metrics");
    assert_eq!(page.len(), 5, "{page:?}");
    assert_eq!(page["shop/web"], ("online".into(), Some("1".into())));
    assert_eq!(page["shop/worker"], ("faulted".into(), Some("0".into())));
    assert_eq!(page["vm:shop"], ("online".into(), Some("0".into())));
    assert_eq!(page["host:kvm1"], ("up".into(), None));

    // States are colour-coded: online green, a state on the way amber, offline grey.
    let mut colour = |state: &str| {
        b.eval(&format!(
            "(() => {{ const e = document.createElement('span'); e.className = 'badge {state}'; \
             document.body.append(e); const c = getComputedStyle(e).backgroundColor; e.remove(); \
             return c; }})()"
        ))
    };
    let (online, stopping, offline) = (colour("online"), colour("stopping"), colour("offline"));
    assert_eq!(online, json!("rgb(26, 127, 55)"));
    assert!(online != stopping && stopping != offline && online != offline);
    b.eval("document.getElementById('notice').hidden = true; window.scrollTo(0, 0); true");
    b.screenshot(&artifacts().join("web-page.png"), true);
    // A phone-sized window: everything fits its width (tables scroll inside their boxes).
    b.resize(390, 844, true);
    b.wait(
        "the phone-sized page fits its width",
        "document.documentElement.scrollWidth <= window.innerWidth",
        Duration::from_secs(10),
    );
    b.screenshot(&artifacts().join("web-page-phone.png"), false);
}

/// Clicks every admin button of the page (each `button.act` with a `data-action` but
/// `explain`), one after the other in one go (no re-render between), cancelling each
/// confirmation: each must open the confirmation with its question, and nothing may be sent
/// (no POST from the page, no event, the same status). The move button is disabled (one host).
fn every_action_asks_first(b: &mut Browser, h: &Vmhad) {
    let before = (h.status()["agent"].clone(), h.mark());
    b.eval(
        "window.__posts = 0; const f = window.fetch; \
         window.fetch = (u, o) => { if (o && o.method === 'POST') window.__posts++; return f(u, o); }; true",
    );
    let clicked = b.eval(
        "JSON.stringify([...document.querySelectorAll('button.act[data-action]')] \
           .filter(b => b.dataset.action !== 'explain').map(b => { \
             const what = b.dataset.action + ' ' + (b.dataset.app || b.dataset.vm || b.dataset.host); \
             if (b.disabled) return [what, 'disabled', '']; \
             b.click(); \
             const shown = !document.getElementById('confirm').hidden; \
             const q = document.getElementById('confirm-text').textContent; \
             document.getElementById('confirm-no').click(); \
             return [what, shown && document.getElementById('confirm').hidden ? 'asked' : 'not asked', q]; }))",
    );
    let clicked: Vec<(String, String, String)> =
        serde_json::from_str(clicked.as_str().unwrap()).unwrap();
    println!("admin buttons: {clicked:#?}");
    let actions: Vec<&str> = clicked
        .iter()
        .map(|(w, _, _)| w.split(' ').next().unwrap())
        .collect();
    for action in [
        "host-maintenance",
        "vm-start",
        "vm-restart",
        "vm-stop",
        "vm-move",
        "freeze",
        "clear",
        "app-start",
        "app-stop",
        "app-offline",
    ] {
        assert!(actions.contains(&action), "no {action} button: {clicked:?}");
    }
    for (what, outcome, question) in &clicked {
        if what.starts_with("vm-move") {
            assert_eq!(outcome, "disabled", "{what}: only one host");
        } else {
            assert_eq!(outcome, "asked", "{what}: no confirmation");
            assert!(question.contains('?'), "{what}: not a question: {question}");
        }
    }
    assert_eq!(
        b.eval("window.__posts"),
        json!(0),
        "a cancelled action was sent"
    );
    assert_eq!(
        (h.status()["agent"].clone(), h.mark()),
        before,
        "a cancelled action changed something:\n{}",
        h.events_text(before.1)
    );
}

/// From the Prometheus text of /metrics, as the page shows them: per app (`VM/APP`) its state
/// (the `vmha_app_state` series at 1) and its restarts in the window; per VM (`vm:VM`) its
/// state and its VM restarts in the window; per host (`host:HOST`) its state.
fn page_view_of_metrics(text: &str) -> BTreeMap<String, (String, Option<String>)> {
    let label = |series: &str, name: &str| {
        let start = series.find(&format!("{name}=\""))? + name.len() + 2;
        let len = series[start..].find('"')?;
        Some(series[start..start + len].to_string())
    };
    let mut out: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let key = match (
            label(series, "vm"),
            label(series, "app"),
            label(series, "host"),
        ) {
            (Some(vm), Some(app), _) => format!("{vm}/{app}"),
            (Some(vm), None, _) => format!("vm:{vm}"),
            (None, None, Some(host)) if series.starts_with("vmha_host_state{") => {
                format!("host:{host}")
            }
            _ => continue,
        };
        let state = series.starts_with("vmha_app_state{")
            || series.starts_with("vmha_vm_state{")
            || series.starts_with("vmha_host_state{");
        let count = series.starts_with("vmha_app_restarts_in_window{")
            || series.starts_with("vmha_vm_restarts_in_window{");
        if state && value == "1" {
            out.entry(key).or_default().0 = label(series, "state").unwrap_or_default();
        } else if count {
            out.entry(key).or_default().1 = Some(value.to_string());
        }
    }
    out.retain(|_, (state, _)| !state.is_empty());
    out
}
