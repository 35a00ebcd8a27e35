//! The web page in a real browser (heavy: boots the test guest). A vmhad with one VM serves its
//! API on TCP with tokens; a headless Chromium, driven over the DevTools protocol, loads the
//! page, is asked for the token and given it, and then — without ever reloading — shows the VM
//! and its apps online, shows an app killed in the guest being restarted (its restart budget
//! used and the events of it arriving live), and carries out an admin action (app stop) behind
//! its confirmation, which vmhad applies. A command that is not possible now is refused over
//! TCP with a JSON error and changes nothing. Screenshots (desktop and phone-sized) are saved
//! under `target/artifacts/`; the phone-sized page must not scroll sideways.

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

    // The page and /metrics tell the same: every app's state and its restarts in the window.
    let on_page = |b: &mut Browser| {
        b.eval(
            "JSON.stringify([...document.querySelectorAll('tr[data-app]')].map(r => \
             [r.dataset.app, r.dataset.state, (r.innerText.match(/(\\d+) \\/ \\d+/) || [])[1] || null]))",
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
    assert_eq!(page.len(), 3, "{page:?}");
    assert_eq!(page["shop/web"], ("online".into(), Some("1".into())));
    assert_eq!(page["shop/worker"].0, "offline");

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

/// From the Prometheus text of /metrics, per app (`VM/APP`): its state (the `vmha_app_state`
/// series at 1) and its restarts in the window, as the page shows them.
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
        let (Some(vm), Some(app)) = (label(series, "vm"), label(series, "app")) else {
            continue;
        };
        let entry = out.entry(format!("{vm}/{app}")).or_default();
        if series.starts_with("vmha_app_state{") && value == "1" {
            entry.0 = label(series, "state").unwrap_or_default();
        } else if series.starts_with("vmha_app_restarts_in_window{") {
            entry.1 = Some(value.to_string());
        }
    }
    out.retain(|_, (state, _)| !state.is_empty());
    out
}
