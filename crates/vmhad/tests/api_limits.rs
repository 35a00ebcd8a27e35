//! The API socket under hostile clients, on a vmhad with no VM (nothing boots: light and
//! fast): every refusal is JSON with a stable `code` — the router's 404 and 405, the
//! extractors' 415/400/422, 413 for a body over the limit (at once, from its `Content-Length`,
//! even with `Expect: 100-continue`) — idle, half-sent and keep-alive connections are closed by
//! their timeouts, a flood of idle connections never locks the operator out, and none of it
//! changes anything.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Vmhad;
use serde_json::{Value, json};

/// A hang guard for "the connection was closed": far above vmhad's 5 s / 10 s timeouts.
const CLOSED_WITHIN: Duration = Duration::from_secs(60);

/// The body size limit (vmha_api::MAX_REQUEST_BODY).
const LIMIT: usize = 1024 * 1024;

const MAINTENANCE_ON: &str = r#"{"command":"host-maintenance","host":"kvm1","on":true}"#;

fn connect(h: &Vmhad) -> UnixStream {
    let s = UnixStream::connect(h.socket()).unwrap();
    s.set_read_timeout(Some(CLOSED_WITHIN)).unwrap();
    s
}

/// Reads one response: status, lower-cased headers and the body as JSON.
fn response(stream: &UnixStream) -> (u16, Vec<(String, String)>, Value) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let Some((k, v)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = header(&headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{status} without content-length: {headers:?}"));
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(format!("NOT JSON: {}", String::from_utf8_lossy(&body))));
    (status, headers, json)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Whether vmhad closed the connection (EOF or reset) within [`CLOSED_WITHIN`]; whatever it
/// still sends is discarded.
fn closed(mut stream: &UnixStream) -> bool {
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// Sends `raw` on a new connection and checks the JSON refusal: status, `code`, an `error`.
fn refused(h: &Vmhad, raw: &[u8], status: u16, code: &str) -> UnixStream {
    let stream = connect(h);
    (&stream).write_all(raw).unwrap();
    check_refusal(&stream, raw, status, code);
    stream
}

fn check_refusal(stream: &UnixStream, what: &[u8], status: u16, code: &str) {
    let what = String::from_utf8_lossy(&what[..what.len().min(120)]);
    let (got, headers, body) = response(stream);
    println!("{what:?} → {got} {body}");
    assert_eq!(got, status, "{what:?}: {body}");
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/json"),
        "{what:?}"
    );
    assert_eq!(body["code"], code, "{what:?}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what:?}: {body}"
    );
}

fn post(path: &str, content_type: Option<&str>, body: &str) -> Vec<u8> {
    let ct = content_type
        .map(|t| format!("Content-Type: {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: vmhad\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(method: &str, path: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: vmhad\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Starts a vmhad without VMs and waits until its start is written: this host `up` in the event
/// log and no event waiting to be committed (so later changes can only come from the test).
fn started() -> Vmhad {
    let mut h = Vmhad::new(&[]);
    h.start();
    h.wait_for_event(0, "host kvm1 → up", |e| {
        e.object == "host:kvm1" && e.to == "up"
    });
    let deadline = Instant::now() + common::WAIT;
    while h.status()["store"]["pending_events"] != 0 {
        assert!(Instant::now() < deadline, "events never committed");
        std::thread::sleep(Duration::from_millis(50));
    }
    h
}

/// What must not change: this host's state (`up`, not `maintenance`), its agent, the
/// configuration and store state (commit counter included), no event.
fn snapshot(h: &Vmhad) -> (Value, Value, usize) {
    let status = h.status();
    (
        status["cluster_view"]["hosts"].clone(),
        json!([status["agent"], status["config_error"], status["store"]]),
        h.mark(),
    )
}

fn assert_unchanged(h: &Vmhad, before: &(Value, Value, usize)) {
    let after = snapshot(h);
    assert_eq!(after.0, before.0, "hosts changed");
    assert_eq!(after.1, before.1, "agent, configuration or store changed");
    assert_eq!(after.2, before.2, "events: {}", h.events_text(before.2));
    assert_eq!(before.0[0]["state"], "up", "{}", before.0);
}

/// Whatever the API cannot use works afterwards: a real command is applied and its event
/// reaches the harness's follower (whose stream outlived every timeout above).
fn still_serves(h: &mut Vmhad) {
    let m = h.mark();
    h.command_ok(&json!({"command": "host-maintenance", "host": "kvm1", "on": true}));
    h.wait_for_event(m, "host kvm1 → maintenance", |e| {
        e.object == "host:kvm1" && e.to == "maintenance"
    });
}

#[test]
fn bad_requests_get_json_errors_with_stable_codes_and_change_nothing() {
    let mut h = started();
    let before = snapshot(&h);
    let json_type = Some("application/json");
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (get("GET", "/v1/nosuch"), 404, "no-such-route"),
        (get("GET", "/web/nosuch.js"), 404, "no-such-route"),
        (get("POST", "/"), 405, "method-not-allowed"),
        (
            post("/v1/status", json_type, "{}"),
            405,
            "method-not-allowed",
        ),
        (get("DELETE", "/v1/commands"), 405, "method-not-allowed"),
        (get("GET", "/v1/config/reload"), 405, "method-not-allowed"),
        (
            post("/v1/commands", None, MAINTENANCE_ON),
            415,
            "unsupported-media-type",
        ),
        (
            post("/v1/commands", Some("text/plain"), MAINTENANCE_ON),
            415,
            "unsupported-media-type",
        ),
        (
            post("/v1/commands", json_type, "{\"command\":"),
            400,
            "malformed-json",
        ),
        (
            post("/v1/commands", json_type, "[]"),
            422,
            "invalid-request",
        ),
        (
            post(
                "/v1/commands",
                json_type,
                r#"{"command":"host-maintenance","host":"kvm1","on":"yes"}"#,
            ),
            422,
            "invalid-request",
        ),
        (
            post("/v1/config", json_type, r#"{"tom":"x"}"#),
            422,
            "invalid-request",
        ),
        (
            post("/v1/config", json_type, r#"{"toml":"[cluster"}"#),
            400,
            "config-invalid",
        ),
        (get("GET", "/v1/events?limit=abc"), 400, "invalid-query"),
        (get("GET", "/v1/events?limit=10001"), 400, "invalid-value"),
        (get("GET", "/v1/vms/%FF/explain"), 400, "invalid-path"),
        (get("GET", "/v1/vms/nosuch/explain"), 404, "unknown-vm"),
        (
            post(
                "/v1/vms/nosuch/exec",
                json_type,
                r#"{"argv":["/bin/true"]}"#,
            ),
            404,
            "unknown-vm",
        ),
        (
            post(
                "/v1/vms/x/exec",
                json_type,
                r#"{"argv":["/bin/true"],"timeout_ms":0}"#,
            ),
            400,
            "invalid-value",
        ),
        (
            post(
                "/v1/commands",
                json_type,
                r#"{"command":"host-maintenance","host":"nosuch","on":true}"#,
            ),
            404,
            "command-refused",
        ),
    ];
    // What hyper cannot parse as a request at all: JSON too, not its bare status.
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let malformed: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "malformed-http"),
        (
            b"GET /v1/status HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(),
            400,
            "malformed-http",
        ),
        (
            b"GET /v1/status HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
            "malformed-http",
        ),
        (
            format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            414,
            "uri-too-long",
        ),
        (
            format!("GET /v1/status HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            431,
            "headers-too-large",
        ),
    ];
    for (raw, status, code) in cases.iter().chain(&malformed) {
        refused(&h, raw, *status, code);
    }

    // A body over the limit, announced: 413 at once, before any of it is read — no
    // `100 Continue` first, no waiting for the gigabyte.
    let huge = |expect: bool| {
        let expect = if expect {
            "Expect: 100-continue\r\n"
        } else {
            ""
        };
        format!(
            "POST /v1/commands HTTP/1.1\r\nHost: vmhad\r\nContent-Type: application/json\r\n\
             {expect}Content-Length: {}\r\n\r\n",
            1u64 << 30
        )
        .into_bytes()
    };
    let s = refused(&h, &huge(true), 413, "payload-too-large");
    assert!(closed(&s), "not closed after the 413");
    let s = connect(&h);
    (&s).write_all(&huge(false)).unwrap();
    let mut sent = MAINTENANCE_ON.as_bytes().to_vec();
    sent.resize(64 * 1024, b' ');
    (&s).write_all(&sent).unwrap();
    check_refusal(
        &s,
        b"1 GiB Content-Length, 64 KiB sent",
        413,
        "payload-too-large",
    );
    assert!(closed(&s), "not closed after the 413");
    let big_config = post("/v1/config", json_type, &" ".repeat(LIMIT + 1));
    refused(&h, &big_config, 413, "payload-too-large");

    // A chunked body over the limit: cut at the limit, the same 413.
    let s = connect(&h);
    (&s).write_all(
        b"POST /v1/commands HTTP/1.1\r\nHost: vmhad\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let chunk = vec![b' '; 64 * 1024];
    let mut writing = (&s).write_all(format!("{:x}\r\n", MAINTENANCE_ON.len()).as_bytes());
    writing = writing.and_then(|()| (&s).write_all(format!("{MAINTENANCE_ON}\r\n").as_bytes()));
    for _ in 0..(LIMIT / chunk.len() + 2) {
        // vmhad may answer (and stop reading) as soon as the limit is passed.
        writing = writing
            .and_then(|()| (&s).write_all(format!("{:x}\r\n", chunk.len()).as_bytes()))
            .and_then(|()| (&s).write_all(&chunk))
            .and_then(|()| (&s).write_all(b"\r\n"));
    }
    let _ = writing.and_then(|()| (&s).write_all(b"0\r\n\r\n"));
    check_refusal(&s, b"chunked body over the limit", 413, "payload-too-large");

    assert_unchanged(&h, &before);
    still_serves(&mut h);
}

#[test]
fn idle_and_half_sent_connections_are_closed_by_their_timeouts() {
    let mut h = started();
    let before = snapshot(&h);
    let idle = connect(&h);
    let half_head = connect(&h);
    (&half_head)
        .write_all(b"POST /v1/commands HTTP/1.1\r\nHost: vmhad\r\nContent-Ty")
        .unwrap();
    let half_body = connect(&h);
    (&half_body)
        .write_all(
            format!(
                "POST /v1/commands HTTP/1.1\r\nHost: vmhad\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{}",
                MAINTENANCE_ON.len(),
                &MAINTENANCE_ON[..20]
            )
            .as_bytes(),
        )
        .unwrap();
    // A keep-alive connection after a complete request and response.
    let keep_alive = connect(&h);
    (&keep_alive)
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: vmhad\r\n\r\n")
        .unwrap();
    let (status, _, body) = response(&keep_alive);
    assert_eq!(status, 200, "{body}");

    check_refusal(&half_body, b"half a body", 408, "request-timeout");
    assert!(closed(&half_body), "half-body connection still open");
    assert!(closed(&idle), "idle connection still open");
    assert!(closed(&half_head), "half-head connection still open");
    assert!(closed(&keep_alive), "idle keep-alive connection still open");

    assert_unchanged(&h, &before);
    still_serves(&mut h);
}

/// Raises this test's own open-file limit so it can hold the flood.
fn raise_own_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let new = want.min(hard).max(soft);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard).unwrap();
    new
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(usize::MAX)
}

#[test]
fn a_flood_of_idle_connections_never_locks_the_operator_out() {
    let mut h = started();
    let before = snapshot(&h);
    // As in the report: vmhad under `ulimit -n 1024`, 1,100 idle connections.
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", h.pid()))
        .arg("--nofile=1024:1024")
        .output()
        .unwrap();
    assert!(out.status.success(), "prlimit: {out:?}");
    let n = usize::try_from(raise_own_fd_limit(1_300))
        .unwrap()
        .saturating_sub(150)
        .min(1_100);
    assert!(n > 200, "this test needs an open-file limit above 350");
    let flood: Vec<UnixStream> = (0..n).map(|_| connect(&h)).collect();
    println!("{n} idle connections open");

    // The operator's requests are answered while the flood holds its connections.
    for _ in 0..3 {
        assert_eq!(h.status()["host"], "kvm1");
    }
    let (status, _) = h.get("/v1/events?limit=5");
    assert_eq!(status, 200);
    // vmhad keeps at most its connection limit (64) open, not the flood.
    let deadline = Instant::now() + CLOSED_WITHIN;
    while open_fds(h.pid()) > 150 {
        assert!(
            Instant::now() < deadline,
            "vmhad holds {} fds",
            open_fds(h.pid())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("vmhad holds {} file descriptors", open_fds(h.pid()));
    // The flood's connections all end: shed for newer ones or timed out.
    for s in &flood {
        assert!(closed(s), "a flood connection is still open");
    }
    drop(flood);
    assert_unchanged(&h, &before);
    still_serves(&mut h);
}

#[test]
fn a_client_that_stops_reading_its_responses_is_cut_off() {
    let mut h = started();
    let before = snapshot(&h);
    // Pipelined requests whose responses are never read: vmhad's writes block, and after its
    // write stall timeout (20 s) it closes the connection — seen here as a broken pipe.
    let s = connect(&h);
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let request = b"GET /v1/status HTTP/1.1\r\nHost: vmhad\r\n\r\n";
    let deadline = Instant::now() + CLOSED_WITHIN;
    let mut sent = 0usize;
    loop {
        match (&s).write(request) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                break;
            }
            Err(e) => panic!("writing: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "a connection whose responses are not read is still open ({sent} bytes sent)"
        );
    }
    println!("cut off after {sent} bytes of requests");
    assert_unchanged(&h, &before);
    still_serves(&mut h);
}

/// Opens `GET /v1/events?follow=true`; returns the connection and the response's status.
fn follower(h: &Vmhad) -> (UnixStream, u16) {
    let s = connect(h);
    (&s).write_all(b"GET /v1/events?limit=1&follow=true HTTP/1.1\r\nHost: vmhad\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(&s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    (s, status)
}

#[test]
fn when_every_slot_is_busy_newcomers_get_a_json_503_until_one_frees() {
    let mut h = started();
    let before = snapshot(&h);
    // Event streams are requests in progress: never shed. The harness follows one already.
    let mut streams = Vec::new();
    let refused = loop {
        let (s, status) = follower(&h);
        if status != 200 {
            break (s, status);
        }
        streams.push(s);
        assert!(streams.len() < 200, "no connection limit");
    };
    assert_eq!(refused.1, 503);
    assert_eq!(streams.len() + 1, 64, "the limit is 64 connections");
    let raw = b"GET /v1/status HTTP/1.1\r\nHost: vmhad\r\n\r\n";
    let s = connect(&h);
    (&s).write_all(raw).unwrap();
    check_refusal(&s, raw, 503, "too-many-connections");
    assert!(closed(&s));

    // One stream ends: its slot is free again.
    drop(streams.pop());
    let deadline = Instant::now() + CLOSED_WITHIN;
    loop {
        let s = connect(&h);
        (&s).write_all(raw).unwrap();
        let (status, _, body) = response(&s);
        if status == 200 {
            break;
        }
        assert_eq!(body["code"], "too-many-connections", "{body}");
        assert!(
            Instant::now() < deadline,
            "the ended stream's slot never freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(streams);
    assert_unchanged(&h, &before);
    still_serves(&mut h);
}
