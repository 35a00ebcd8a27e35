//! The QGA client against hostile fake agents, driven with vmhad's timeouts (an 800 ms ping
//! while the channel is not known up, `info` and probes within the client's 5 s), one hostile
//! behaviour per case. Every case is run by [`hostile_case`], which checks the same four things
//! for each:
//!
//! 1. the outcome: the misbehaviour is a typed error for that channel only, and nothing the
//!    guest sends reaches an error unsanitised (each case's own assertions);
//! 2. the next calls on the same client are correct: a ping, `guest-info` with the agent's
//!    fresh answer and a probe whose checks all run (for a guest disconnected as hostile: after
//!    the backoff, on a fresh connection);
//! 3. memory: the peak resident set of this process (VmHWM, reset before the case) grows by at
//!    most [`MEMORY_BOUND`] while the case runs;
//! 4. an honest agent beside it (an honest VM's channel in the same runtime) keeps answering:
//!    its probes, run back to back throughout, all succeed with every check running, each
//!    within its own bound (check timeout + slack, what the client promises). How fast they
//!    are is for `benches/qga_hostile.rs`; no speed is asserted here.
//!
//! Cases run one at a time (a process-wide lock; under nextest each test is its own process
//! anyway), so no case's allocations disturb another's memory figure. `hostile_memory.rs`
//! measures four hostile VMs at once.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_agent::{
    Answer, honest, honest_prober, line, reply, reset_hwm, serve, vm_hwm, zeros,
};
use serde_json::{Value, json};
use vmha_qemu::guest_text::{MAX_GUEST_TEXT, is_unsafe};
use vmha_qemu::{ExecRequest, ProbeCheck, ProbeOutcome, QgaClient, QgaConfig, QgaError};

/// vmhad's ping timeout while the guest channel is not known up.
const PING: Duration = Duration::from_millis(800);
/// vmhad's slack on a probe (channel round trips beyond the longest check timeout).
const SLACK: Duration = Duration::from_secs(2);
/// The honest neighbour's check timeout.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// What one hostile case may add to this process's peak resident memory. Generous on purpose:
/// the fake agents run in this process too (some copy a few MiB per answer), and so do the
/// runtime's blocking threads; the client's own promise is a small multiple of its 4 MiB line
/// cap per VM (the issue's goal: at most 16 MB per hostile VM). Before the fixes one 4 MiB
/// `[0,0,…]` line cost 65–78 MB, so the bound still catches that kind of regression.
const MEMORY_BOUND: u64 = 16 << 20;

/// Cases measure this process's memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn config() -> QgaConfig {
    QgaConfig {
        hostile_backoff: Duration::from_millis(100),
        ..QgaConfig::default()
    }
}

/// An agent that runs `script` for its first `bad` requests (numbered across connections, syncs
/// not counted), and answers honestly (probes included) after.
fn first(
    bad: usize,
    script: impl Fn(&Value) -> Answer + Send + Sync + 'static,
) -> impl Fn(usize, &Value) -> Answer + Send + Sync + 'static {
    let honest = honest_prober();
    move |n, req| if n < bad { script(req) } else { honest(req) }
}

/// An app `name` whose check is `true`, with check `timeout`.
fn true_check(name: &str, timeout: Duration) -> ProbeCheck {
    ProbeCheck {
        app: vmha_model::Name::new(name).unwrap(),
        argv: vec!["true".into()],
        timeout,
    }
}

/// The checks of a probe: two apps whose checks pass.
fn checks() -> Vec<ProbeCheck> {
    vec![
        true_check("db", CHECK_TIMEOUT),
        true_check("web", CHECK_TIMEOUT),
    ]
}

/// A probe of [`checks`] through `qga`, which must end within what the client promises (the
/// longest check timeout + slack).
async fn probe(qga: &QgaClient) -> Result<Vec<(vmha_model::Name, ProbeOutcome)>, QgaError> {
    let checks = checks();
    let out = tokio::time::timeout(CHECK_TIMEOUT + SLACK, qga.probe(&checks, SLACK))
        .await
        .expect("a probe outlived its own bound");
    out.map_err(|vmha_qemu::ProbeError::Channel(e)| e)
}

/// A probe's answer has every check of [`checks`] running.
fn assert_all_running(out: &[(vmha_model::Name, ProbeOutcome)]) {
    assert_eq!(out.len(), checks().len(), "{out:?}");
    for (app, outcome) in out {
        assert_eq!(*outcome, ProbeOutcome::Running, "{app}");
    }
}

/// A probe through `qga` succeeds in its bound with every check running.
async fn probe_runs(qga: &QgaClient) {
    assert_all_running(&probe(qga).await.unwrap());
}

/// Calls until the client answers something other than its hostile backoff (the backoff is
/// short in these tests); returns that answer.
async fn after_backoff<T>(
    mut call: impl AsyncFnMut() -> Result<T, QgaError>,
) -> Result<T, QgaError> {
    loop {
        match call().await {
            Err(QgaError::Hostile { retry_in, .. }) if !retry_in.is_zero() => {
                tokio::time::sleep(retry_in).await;
            }
            other => return other,
        }
    }
}

/// Runs one hostile case: an agent with `script` (request number, request → answer), the
/// case's own `outcome` assertions on a client of it, then the four checks of this file's
/// header. `script` should hold its payloads already (they are allocated before the memory
/// baseline, as a guest's bytes cost vmhad nothing until they arrive).
fn hostile_case(
    name: &str,
    script: impl Fn(usize, &Value) -> Answer + Send + Sync + 'static,
    outcome: impl AsyncFnOnce(&QgaClient),
) {
    hostile_case_with(name, config(), script, outcome);
}

/// [`hostile_case`] with the hostile agent's client configured by `hostile_config` (the
/// honest neighbour keeps [`config`]).
fn hostile_case_with(
    name: &str,
    hostile_config: QgaConfig,
    script: impl Fn(usize, &Value) -> Answer + Send + Sync + 'static,
    outcome: impl AsyncFnOnce(&QgaClient),
) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // As vmhad: a multi-thread runtime with two workers.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let neighbour = QgaClient::new(serve(&dir, "honest.sock", Arc::new({
            let honest = honest_prober();
            move |_, req: &Value| honest(req)
        })), config());
        let qga = QgaClient::new(
            serve(&dir, "hostile.sock", Arc::new(script)),
            hostile_config,
        );
        // Warm up the runtime, the allocator and the neighbour's channel.
        probe_runs(&neighbour).await;
        reset_hwm();
        let base = vm_hwm();

        let done = AtomicBool::new(false);
        let hostile = async {
            outcome(&qga).await;
            // The next calls on the same client get their own, correct answers (a guest found
            // hostile first sits out its backoff, which lasts while it stays over its rate).
            after_backoff(async || qga.ping_within(PING).await)
                .await
                .unwrap();
            let info = after_backoff(async || qga.info_within(PING).await).await;
            assert_eq!(info.unwrap().version, "fresh");
            assert_all_running(&after_backoff(async || probe(&qga).await).await.unwrap());
            done.store(true, Ordering::SeqCst);
        };
        let honest = async {
            let (mut probes, mut slowest) = (0, Duration::ZERO);
            while !done.load(Ordering::SeqCst) || probes == 0 {
                let t = Instant::now();
                probe_runs(&neighbour).await;
                slowest = slowest.max(t.elapsed());
                probes += 1;
            }
            (probes, slowest)
        };
        let ((), (probes, slowest)) = tokio::join!(hostile, honest);
        let grew = vm_hwm().saturating_sub(base);
        println!(
            "{name}: peak memory +{} kB; the honest neighbour ran {probes} probes, slowest {slowest:?}",
            grew / 1024
        );
        assert!(
            grew <= MEMORY_BOUND,
            "{name}: peak memory grew by {} kB",
            grew / 1024
        );
    });
}

/// An exec of `/bin/true` through `qga` fails as malformed.
async fn exec_is_malformed(qga: &QgaClient) {
    let err = qga
        .exec(&ExecRequest::new(["/bin/true"]))
        .await
        .unwrap_err();
    assert!(matches!(err, QgaError::Malformed { .. }), "{err:?}");
}

/// The channel error a probe of `checks` (with `slack`) must end with.
async fn probe_error(qga: &QgaClient, checks: &[ProbeCheck], slack: Duration) -> QgaError {
    let vmha_qemu::ProbeError::Channel(err) = qga.probe(checks, slack).await.unwrap_err();
    err
}

fn assert_safe(text: &str) {
    assert!(
        !text.chars().any(is_unsafe),
        "unsafe characters in {text:?}"
    );
}

#[test]
fn a_late_reply_is_never_taken_for_the_next_calls() {
    // The first guest-info is answered 1.2 s late, with a version that gives it away.
    let script = first(2, |req| {
        if req["execute"] != "guest-info" {
            return honest(req);
        }
        let Answer::Bytes(b) = reply(req, json!({"version": "stale", "supported_commands": []}))
        else {
            unreachable!()
        };
        Answer::Late(Duration::from_millis(1200), b)
    });
    hostile_case("late reply", script, async |qga| {
        qga.ping_within(PING).await.unwrap();
        // vmhad's way: the call is dropped by the caller's timeout, not the client's.
        let dropped = tokio::time::timeout(PING, qga.info()).await;
        assert!(dropped.is_err(), "{dropped:?}");
        // The next ping starts while the stale reply is still due: it must get its own.
        qga.ping_within(PING * 2).await.unwrap();
    });
}

#[test]
fn a_reply_without_id_answers_nothing() {
    let script = first(3, |_| Answer::Bytes(line(r#"{"return": {}}"#)));
    hostile_case("id-less replies", script, async |qga| {
        for _ in 0..3 {
            let err = qga.ping_within(PING).await.unwrap_err();
            assert!(
                matches!(&err, QgaError::WrongId { got, .. } if got == "none"),
                "{err:?}"
            );
        }
    });
}

#[test]
fn a_stale_flood_fails_one_call_and_is_discarded_by_the_resync() {
    let mut flood = Vec::new();
    for i in 0..20_000 {
        flood.extend_from_slice(
            format!("{{\"return\": {{}}, \"id\": {}}}\n", 1_000_000 + i).as_bytes(),
        );
        flood.extend_from_slice(b"{\"return\": {}}\n");
    }
    let flood = Arc::new(flood);
    let script = first(1, move |req| {
        let Answer::Bytes(own) = reply(req, json!({})) else {
            unreachable!()
        };
        Answer::Chunks(vec![flood.clone(), own])
    });
    hostile_case("stale flood", script, async |qga| {
        let err = qga.ping_within(PING).await.unwrap_err();
        assert!(
            matches!(&err, QgaError::WrongId { got, .. } if got == "1000000"),
            "{err:?}"
        );
    });
}

#[test]
fn an_amplifying_line_is_refused_and_skipped() {
    let huge = zeros(4 << 20);
    let script = first(2, move |_| Answer::Bytes(huge.clone()));
    hostile_case("amplifying lines", script, async |qga| {
        assert!(matches!(
            qga.ping_within(PING).await,
            Err(QgaError::LineTooLong { max: 4096 })
        ));
        assert!(matches!(
            qga.info_within(PING).await,
            Err(QgaError::LineTooLong { max: 65536 })
        ));
    });
}

#[test]
fn an_oversized_exec_result_within_the_cap_is_parsed_in_bounded_memory() {
    // A valid exit status padded with a `[0,0,…]` member to just under the 4 MiB cap: kept,
    // parsed (the padding skipped without allocating), its output capped.
    let mut pad =
        br#"{"return": {"exited": true, "exitcode": 0, "out-data": "aGk=", "pad": "#.to_vec();
    pad.extend_from_slice(&zeros((4 << 20) - 300)[..(4 << 20) - 301]);
    let pad = Arc::new(pad);
    let script = first(2, move |req| match req["execute"].as_str() {
        Some("guest-exec") => reply(req, json!({"pid": 9})),
        _ => Answer::Chunks(vec![
            pad.clone(),
            Arc::new(format!("}}, \"id\": {}}}\n", req["id"]).into_bytes()),
        ]),
    });
    hostile_case("oversized exec result", script, async |qga| {
        let out = qga
            .exec(&ExecRequest::new(["/bin/echo", "hi"]))
            .await
            .unwrap();
        assert_eq!(out.stdout, b"hi");
    });
}

#[test]
fn a_probe_refuses_an_oversized_status_line() {
    let huge = zeros(1 << 20);
    let script = first(2, move |req| match req["execute"].as_str() {
        Some("guest-exec") => reply(req, json!({"pid": 5})),
        _ => Answer::Bytes(huge.clone()),
    });
    hostile_case("oversized probe status", script, async |qga| {
        let err = probe_error(qga, &checks(), SLACK).await;
        assert!(matches!(err, QgaError::LineTooLong { .. }), "{err:?}");
    });
}

#[test]
fn an_endless_stream_is_cut_off_as_hostile_then_retried() {
    let script = first(1, |_| Answer::Endless);
    hostile_case("endless stream", script, async |qga| {
        // The call itself stops at its line cap; the resync of the next one at its budget.
        assert!(matches!(
            qga.ping_within(PING).await,
            Err(QgaError::LineTooLong { .. })
        ));
        let err = qga.ping_within(PING).await.unwrap_err();
        let QgaError::Hostile { reason, retry_in } = &err else {
            panic!("expected hostile, got {err:?}");
        };
        assert!(reason.contains("bytes"), "{reason}");
        assert!(!retry_in.is_zero());
        assert!(err.to_string().contains("hostile"));
        // Backed off: no reconnect yet (the harness's next calls wait for the backoff).
        assert!(matches!(
            qga.ping_within(PING).await,
            Err(QgaError::Hostile { .. })
        ));
    });
}

#[test]
fn a_guest_flooding_lines_is_rate_limited() {
    // Each answer: ~2 MiB of stray short lines, then the correct reply; cheap per call, but
    // far above the rate limit when it goes on. Honest once it has been found hostile.
    let strays = Arc::new(b"{}\n".repeat(700_000));
    let found = Arc::new(AtomicBool::new(false));
    let script = {
        let found = found.clone();
        let honest = honest_prober();
        move |_, req: &Value| {
            if found.load(Ordering::SeqCst) {
                return honest(req);
            }
            let Answer::Bytes(own) = reply(req, json!({})) else {
                unreachable!()
            };
            Answer::Chunks(vec![strays.clone(), own])
        }
    };
    // The bucket drains only as fast as the client reads the strays: at most 2 MiB a second
    // in a debug build, less on a busy machine, so the test's rate is a quarter of the default
    // and the pings go on until the guest is found hostile (the burst, 9 MiB, is the default).
    let rate = QgaConfig {
        byte_rate: 256 << 10,
        ..config()
    };
    hostile_case_with("line flood", rate, script, async |qga| {
        let mut hostile = None;
        let give_up = Instant::now() + Duration::from_secs(120);
        while Instant::now() < give_up {
            match qga.ping_within(PING).await {
                Err(e @ QgaError::Hostile { .. }) => {
                    hostile = Some(e);
                    break;
                }
                // The stray lines fail the call (or keep its resync busy until its timeout).
                Err(QgaError::WrongId { .. } | QgaError::Timeout { .. }) => {}
                other => panic!("a stray line answered a ping: {other:?}"),
            }
        }
        let hostile = hostile.expect("never found hostile");
        assert_safe(&hostile.to_string());
        found.store(true, Ordering::SeqCst);
    });
}

#[test]
fn format_characters_never_reach_an_error() {
    let hostile_text = format!(
        "\\u202eevil\\u2028FAKE LOG\\u2029\\u200b\\ufeff\\u001b[2J\\u0007{}",
        "x".repeat(1500)
    );
    let text = hostile_text.clone();
    let script = first(3, move |req| match req["execute"].as_str() {
        Some("guest-ping") => Answer::Bytes(line(format!(
            r#"{{"error": {{"class": "Generic{text}", "desc": "{text}"}}, "id": {}}}"#,
            req["id"]
        ))),
        Some("guest-info") => Answer::Bytes(line(format!(
            r#"{{"return": {{"version": 7}}, "id": "{text}"}}"#
        ))),
        _ => Answer::Bytes(line(format!(
            r#"{{"return": {{"version": "{text}", "supported_commands": 5}}, "id": {}}}"#,
            req["id"]
        ))),
    });
    hostile_case("format characters", script, async |qga| {
        let remote = qga.ping_within(PING).await.unwrap_err();
        let QgaError::Remote { error, .. } = &remote else {
            panic!("{remote:?}");
        };
        assert!(error.desc.contains("FAKE LOG"));
        assert!(error.desc.chars().count() <= MAX_GUEST_TEXT + 1);
        let wrong_id = qga.info_within(PING).await.unwrap_err();
        let wrong_type = qga.info_within(PING).await.unwrap_err();
        for err in [&remote, &wrong_id, &wrong_type] {
            let shown = err.to_string();
            assert_safe(&shown);
            assert!(shown.chars().count() < 2 * MAX_GUEST_TEXT + 100, "{shown}");
        }
        assert!(
            matches!(wrong_id, QgaError::Malformed { .. }),
            "{wrong_id:?}"
        );
        assert!(
            matches!(wrong_type, QgaError::Malformed { .. }),
            "{wrong_type:?}"
        );
    });
}

#[test]
fn a_bad_pid_is_malformed() {
    for bad in [
        json!({"pid": -1}),
        json!({"pid": 0}),
        json!({"pid": 1_i64 << 40}),
        json!({"pid": "12"}),
    ] {
        let name = format!("bad pid {bad}");
        let script = first(1, move |req| reply(req, bad.clone()));
        hostile_case(&name, script, async |qga| {
            exec_is_malformed(qga).await;
            let out = qga.exec(&ExecRequest::new(["/bin/true"])).await.unwrap();
            assert_eq!(out.status, vmha_qemu::ExitStatus::Code(0));
        });
    }
}

#[test]
fn a_bad_exit_status_is_malformed() {
    for bad in [
        json!({"exited": true, "exitcode": -1}),
        json!({"exited": true, "exitcode": 70000}),
        json!({"exited": true, "signal": 99}),
    ] {
        let name = format!("bad exit status {bad}");
        let script = first(2, move |req| {
            if req["execute"] == "guest-exec" {
                reply(req, json!({"pid": 9}))
            } else {
                reply(req, bad.clone())
            }
        });
        hostile_case(&name, script, async |qga| exec_is_malformed(qga).await);
    }
}

#[test]
fn a_never_ending_exec_ends_at_its_deadline() {
    // Its first exec (pid 42) never ends; everything else is honest.
    let honest = honest_prober();
    let script = move |n, req: &Value| match req["execute"].as_str() {
        Some("guest-exec") if n == 0 => reply(req, json!({"pid": 42})),
        Some("guest-exec-status") if req["arguments"]["pid"] == 42 => {
            reply(req, json!({"exited": false}))
        }
        _ => honest(req),
    };
    hostile_case("never-ending exec", script, async |qga| {
        let check = true_check("app", Duration::from_millis(200));
        let err = probe_error(qga, &[check], Duration::from_millis(300)).await;
        assert!(matches!(err, QgaError::ExecDeadline { pid: 42 }), "{err:?}");
    });
}

#[test]
fn a_silent_agent_is_a_timeout_and_does_not_hold_up_a_healthy_one() {
    // Silent for its first two requests, then answering again (the fake answers every resync):
    // the next call resynchronises and gets its own reply.
    let script = first(2, |_| Answer::Nothing);
    hostile_case("silent agent", script, async |qga| {
        for _ in 0..2 {
            assert!(matches!(
                qga.ping_within(PING).await,
                Err(QgaError::Timeout { .. })
            ));
        }
    });
}

#[tokio::test]
async fn no_listener_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let qga = QgaClient::new(dir.path().join("absent.sock"), config());
    assert!(matches!(qga.ping().await, Err(QgaError::Connect { .. })));
}

#[tokio::test]
async fn a_real_probe_is_not_held_up_by_a_silent_agent() {
    let Some(agent_proc) = common::host_agent() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let silent = serve(
        &dir,
        "silent.sock",
        Arc::new(|_, _: &Value| Answer::Nothing),
    );
    let hostile = QgaClient::new(silent, config());
    let healthy = QgaClient::new(&agent_proc.sock, QgaConfig::default());
    let checks = vec![true_check("ok", Duration::from_secs(2))];
    let hostile_call = hostile.ping();
    tokio::pin!(hostile_call);
    // The healthy probe must finish while the hostile call is still pending.
    let outcome = tokio::select! {
        biased;
        r = &mut hostile_call => panic!("hostile call ended first: {r:?}"),
        out = healthy.probe(&checks, Duration::from_secs(3)) => out.unwrap(),
    };
    assert_eq!(outcome[0].1, ProbeOutcome::Running);
    assert!(matches!(hostile_call.await, Err(QgaError::Timeout { .. })));
}
