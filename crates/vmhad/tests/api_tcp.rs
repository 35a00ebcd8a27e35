//! The API on TCP (`[api] listen`), on a vmhad with no VM (nothing boots: light): bearer
//! tokens decide who may do what (none or unknown → 401, read-only on an admin endpoint → 403,
//! admin → served), TLS with the test certificate, bad input refused with a JSON error as on the
//! Unix socket (malformed JSON, unknown names, invalid values, oversized and slow bodies) and
//! none of it changes anything; the OpenAPI document matches the router.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use common::Vmhad;
use common::tcp::{self, ADMIN, READER, Tcp};
use serde_json::{Value, json};

/// Starts a vmhad without VMs serving TCP (TLS if `tls`), once its start is committed.
fn started(tls: bool) -> (Vmhad, Tcp) {
    started_logging(tls, "debug")
}

/// [`started`], vmhad logging at `level` (`VMHA_LOG`) to its log file.
fn started_logging(tls: bool, level: &str) -> (Vmhad, Tcp) {
    let mut h = Vmhad::new(&[]);
    let api = tcp::enable(&h, tls);
    h.env.push(("VMHA_LOG".to_string(), level.to_string()));
    h.start();
    h.wait_for_event(0, "host kvm1 → up", |e| {
        e.object == "host:kvm1" && e.to == "up"
    });
    let deadline = Instant::now() + common::WAIT;
    while h.status()["store"]["pending_events"] != 0 {
        assert!(Instant::now() < deadline, "events never committed");
        std::thread::sleep(Duration::from_millis(50));
    }
    (h, api)
}

/// What must not change: hosts, agent, configuration and store state, no event.
fn snapshot(h: &Vmhad) -> (Value, usize) {
    let s = h.status();
    (
        json!([
            s["cluster_view"]["hosts"],
            s["agent"],
            s["config_error"],
            s["store"]
        ]),
        h.mark(),
    )
}

fn assert_unchanged(h: &Vmhad, before: &(Value, usize)) {
    let after = snapshot(h);
    assert_eq!(after.0, before.0, "state changed");
    assert_eq!(after.1, before.1, "events: {}", h.events_text(before.1));
}

fn refused(r: &tcp::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["code"], code, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
}

const MAINTENANCE_ON: &str = r#"{"command":"host-maintenance","host":"kvm1","on":true}"#;

/// A wrong token that looks like a secret (a typo of one would be one).
const WRONG: &str = "wrong-secret-for-tests-0123456789";

/// No secret sent so far (valid, wrong, near-miss) is in vmhad's log, which does log the
/// refusals, by token name.
fn no_secret_logged(h: &Vmhad) {
    let log = h.log_tail(usize::MAX);
    assert!(
        log.contains("read-only API token refused") && log.contains("viewer"),
        "the log does not show the refusals: is it at debug level?\n{log}"
    );
    for secret in [
        ADMIN,
        READER,
        WRONG,
        &ADMIN[1..],
        &READER[..READER.len() - 1],
    ] {
        assert!(!log.contains(secret), "a secret is in the log: {secret}");
    }
    // Nor any 12-character piece of one (e.g. logged cut or quoted).
    for secret in [ADMIN, READER, WRONG] {
        for piece in secret.as_bytes().windows(12) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !log.contains(piece),
                "part of a secret is in the log: {piece}"
            );
        }
    }
}

fn tokens_decide_who_may_do_what(h: &mut Vmhad, api: &Tcp) {
    let before = snapshot(h);
    // No token, a wrong one, a wrong scheme: 401 with a challenge, for data and admin alike,
    // and for routes that do not exist (nothing is told without a token).
    let near_miss = &READER[..READER.len() - 1];
    for token in [
        None,
        Some("nope"),
        Some(&ADMIN[1..]),
        Some(near_miss),
        Some(WRONG),
        Some(""),
    ] {
        for (method, path, body) in [
            ("GET", "/v1/status", None),
            ("GET", "/v1/events?limit=1", None),
            ("POST", "/v1/commands", Some(MAINTENANCE_ON)),
            ("GET", "/v1/nothing-here", None),
        ] {
            let r = api.request(method, path, token, body);
            refused(&r, 401, "unauthorized");
            assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"vmhad\""));
            assert!(!r.body.contains(ADMIN) && !r.body.contains(READER));
        }
    }
    let basic = api.raw(
        format!(
            "GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {ADMIN}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    refused(&basic, 401, "unauthorized");
    // Read-only: reads, but no admin endpoint.
    let r = api.request("GET", "/v1/status", Some(READER), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["host"], "kvm1");
    for (path, body) in [
        ("/v1/commands", Some(MAINTENANCE_ON)),
        ("/v1/config/reload", None),
        ("/v1/config", Some(r#"{"toml":""}"#)),
        ("/v1/vms/x/exec", Some(r#"{"argv":["true"]}"#)),
    ] {
        let r = api.request("POST", path, Some(READER), body);
        refused(&r, 403, "forbidden");
        assert!(r.json()["error"].as_str().unwrap().contains("viewer"));
    }
    // The page and the API description need no token; they hold no data.
    let page = api.request("GET", "/", None, None);
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(api.request("GET", "/web/app.js", None, None).status, 200);
    assert_eq!(
        api.request("GET", "/v1/openapi.json", None, None).status,
        200
    );
    // The Unix socket takes no token and is unchanged.
    assert_eq!(h.get("/v1/status").0, 200);
    assert_unchanged(h, &before);
    // An admin token may act: the command is applied.
    let m = h.mark();
    let r = api.request("POST", "/v1/commands", Some(ADMIN), Some(MAINTENANCE_ON));
    assert_eq!(r.status, 200, "{}", r.body);
    h.wait_for_event(m, "host kvm1 → maintenance", |e| {
        e.object == "host:kvm1" && e.to == "maintenance"
    });
    let off = r#"{"command":"host-maintenance","host":"kvm1","on":false}"#;
    assert_eq!(
        api.request("POST", "/v1/commands", Some(ADMIN), Some(off))
            .status,
        200
    );
    h.wait_for_event(m, "host kvm1 → up", |e| {
        e.object == "host:kvm1" && e.to == "up"
    });
}

/// Plain TCP, vmhad logging everything (`VMHA_LOG=trace`, its dependencies too): after valid,
/// wrong and read-only-on-admin tokens, no secret is in its log.
#[test]
fn tokens_on_plain_tcp() {
    let _lock = common::vm_test_lock();
    let (mut h, api) = started_logging(false, "trace");
    tokens_decide_who_may_do_what(&mut h, &api);
    no_secret_logged(&h);
}

#[test]
fn tls_serves_the_same_api_and_refuses_plain_http() {
    let _lock = common::vm_test_lock();
    let (mut h, api) = started(true);
    assert!(api.url().starts_with("https://"));
    tokens_decide_who_may_do_what(&mut h, &api);
    no_secret_logged(&h);
    // Plain HTTP on the TLS port gets no answer: the handshake fails and the connection closes.
    let mut plain = std::net::TcpStream::connect(&api.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    plain
        .write_all(&tcp::request("GET", "/v1/status", Some(ADMIN), None))
        .unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("\"host\""),
        "{got:?}"
    );
    // A client that connects and never starts its handshake is disconnected (after 5 s); the
    // read timeout is only a hang guard.
    let mut silent = std::net::TcpStream::connect(&api.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0; 64];
    let read = std::io::Read::read(&mut silent, &mut buf);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "a silent TLS client was not disconnected: {read:?}"
    );
    // And the API still answers.
    assert_eq!(
        api.request("GET", "/v1/status", Some(READER), None).status,
        200
    );
}

#[test]
fn bad_input_over_tcp_gets_json_errors_and_changes_nothing() {
    let _lock = common::vm_test_lock();
    let (h, api) = started(false);
    let before = snapshot(&h);
    let post = |path: &str, body: &str| api.request("POST", path, Some(ADMIN), Some(body));
    refused(
        &post("/v1/commands", "{\"command\":"),
        400,
        "malformed-json",
    );
    refused(
        &post("/v1/commands", r#"{"command":"no-such-command"}"#),
        422,
        "invalid-request",
    );
    let unknown_host = post(
        "/v1/commands",
        r#"{"command":"host-maintenance","host":"kvm9","on":true}"#,
    );
    refused(&unknown_host, 404, "command-refused");
    let unknown_vm = post("/v1/commands", r#"{"command":"freeze","vm":"nope"}"#);
    refused(&unknown_vm, 404, "command-refused");
    refused(
        &api.request("GET", "/v1/vms/nope/explain", Some(ADMIN), None),
        404,
        "unknown-vm",
    );
    refused(
        &post("/v1/vms/nope/exec", r#"{"argv":["true"]}"#),
        404,
        "unknown-vm",
    );
    refused(
        &api.request("GET", "/v1/events?limit=99999", Some(READER), None),
        400,
        "invalid-value",
    );
    refused(
        &post("/v1/config", r#"{"toml":"[cluster]\nname = 1"}"#),
        400,
        "config-invalid",
    );
    // Oversized: refused from Content-Length, before the body is read.
    let big = format!(
        "POST /v1/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        2 * 1024 * 1024
    );
    refused(&api.raw(big.as_bytes()), 413, "payload-too-large");
    // Slow: half a body, then nothing: 408 once the body timeout passes.
    let mut slow = api.connect().unwrap();
    let head = format!(
        "POST /v1/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        MAINTENANCE_ON.len(),
        &MAINTENANCE_ON[..10]
    );
    slow.write_all(head.as_bytes()).unwrap();
    refused(&tcp::read_response(&mut slow), 408, "request-timeout");
    // A slow head: part of a request head, then nothing: the connection is closed once the
    // head timeout (5 s) passes, nothing served (the read timeout of 60 s is a hang guard).
    let mut slow_head = api.connect().unwrap();
    slow_head
        .write_all(
            format!("GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut got = Vec::new();
    let read = std::io::Read::read_to_end(&mut slow_head, &mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(
        read.is_ok() && (got.is_empty() || got.starts_with("HTTP/1.1 408")),
        "a slow head was not closed: {read:?} {got}"
    );
    // Garbage instead of HTTP.
    refused(&api.raw(b"HELLO\r\n\r\n"), 400, "malformed-http");
    assert_unchanged(&h, &before);
}

/// The routes the router has under `/v1`, and `/metrics`: `(METHOD, path)` from the `.route(…)`
/// calls.
fn router_routes() -> BTreeSet<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut routes = BTreeSet::new();
    for file in ["api.rs", "api_web.rs"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let calls: Vec<&str> = text.split(".route(").skip(1).collect();
        for call in calls {
            let path = call.split('"').nth(1).unwrap();
            // The method router right after the path: the first `get(`, `post(`, … in it.
            let after = call.split('"').skip(2).collect::<Vec<_>>().join("\"");
            let method = ["get", "post", "put", "delete", "patch"]
                .into_iter()
                .filter_map(|m| after.find(&format!("{m}(")).map(|at| (at, m)))
                .min()
                .unwrap()
                .1;
            if path.starts_with("/v1") || path == "/metrics" {
                routes.insert((method.to_uppercase(), path.to_string()));
            }
        }
    }
    routes
}

#[test]
fn the_openapi_document_lists_every_route_and_no_other() {
    let _lock = common::vm_test_lock();
    let (mut h, api) = started(false);
    let served = api.request("GET", "/v1/openapi.json", None, None);
    assert_eq!(served.status, 200);
    let doc = served.json();
    let in_repo: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc, in_repo, "served document is not docs/openapi.json");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    // The page's files are served too, without a token: the description says so.
    let description = doc["info"]["description"].as_str().unwrap();
    for path in ["`GET /`", "`GET /web/app.js`", "`GET /web/style.css`"] {
        assert!(description.contains(path), "{path} not in {description}");
    }
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let routes = router_routes();
    assert!(routes.len() >= 9, "{routes:?}");
    assert_eq!(documented, routes, "docs/openapi.json vs the router");
    // And each documented operation reaches its route (not 404 no-such-route / 405): bodies
    // are sent without a JSON content type (415), so nothing changes — except the reload,
    // which reloads the unchanged file.
    for (method, path) in &documented {
        let path = path.replace("{vm}", "nope");
        if path.ends_with("/stream") {
            continue; // follows forever: checked below
        }
        let r = api.raw(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
                 Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            )
            .as_bytes(),
        );
        let code = serde_json::from_str::<Value>(&r.body)
            .map(|v| v["code"].clone())
            .unwrap_or(Value::Null);
        assert!(
            code != "no-such-route" && code != "method-not-allowed",
            "{method} {path}: {} {}",
            r.status,
            r.body
        );
    }
    // The event stream: server-sent events, the tail first, then live ones.
    let mut stream = api.connect().unwrap();
    stream
        .write_all(&tcp::request(
            "GET",
            "/v1/events/stream?limit=5",
            Some(READER),
            None,
        ))
        .unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        std::io::BufRead::read_line(&mut reader, &mut head).unwrap();
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    let m = h.mark();
    let r = api.request("POST", "/v1/commands", Some(ADMIN), Some(MAINTENANCE_ON));
    assert_eq!(r.status, 200, "{}", r.body);
    h.wait_for_event(m, "maintenance", |e| e.to == "maintenance");
    let mut line = String::new();
    loop {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(!line.is_empty(), "the stream ended");
        if let Some(data) = line.strip_prefix("data: ") {
            let ev: Value = serde_json::from_str(data).unwrap();
            if ev["to"] == "maintenance" {
                assert_eq!(ev["object"]["host"], "kvm1", "{ev}");
                break;
            }
        }
    }
}
