//! The QGA client against hostile fake agents, driven with vmhad's timeouts (an 800 ms ping
//! while the channel is not known up, `info` and probes within the client's 5 s): each
//! misbehaviour is a typed error for that channel only, the NEXT call on the same client gets
//! its own correct answer (or, for a guest disconnected as hostile, the backoff, then a fresh
//! connection), nothing the guest sends reaches an error unsanitised, and an honest agent
//! beside it keeps answering throughout. Memory is measured in `hostile_memory.rs` (its own
//! process).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::fake_agent::{Answer, Script, honest, line, reply, serve, zeros};
use serde_json::{Value, json};
use vmha_qemu::guest_text::{MAX_GUEST_TEXT, is_unsafe};
use vmha_qemu::{ExecRequest, ProbeCheck, ProbeOutcome, QgaClient, QgaConfig, QgaError};

/// vmhad's ping timeout while the guest channel is not known up.
const PING: Duration = Duration::from_millis(800);

fn config() -> QgaConfig {
    QgaConfig {
        hostile_backoff: Duration::from_millis(100),
        ..QgaConfig::default()
    }
}

/// A client for a fake agent running `script` for its first `bad` requests, honest after;
/// the agent's socket lives in the returned temp dir (keep it for as long as the client).
fn agent(
    bad: usize,
    script: impl Fn(&Value) -> Answer + Send + Sync + 'static,
) -> (tempfile::TempDir, QgaClient) {
    let dir = tempfile::tempdir().unwrap();
    let script: Arc<Script> =
        Arc::new(move |n, req| if n < bad { script(req) } else { honest(req) });
    let qga = QgaClient::new(serve(&dir, "hostile.sock", script), config());
    (dir, qga)
}

/// An app `name` whose check is `true`, with check `timeout`.
fn true_check(name: &str, timeout: Duration) -> ProbeCheck {
    ProbeCheck {
        app: vmha_model::Name::new(name).unwrap(),
        argv: vec!["true".into()],
        timeout,
    }
}

/// An exec of `/bin/true` through `qga` fails as malformed, and the channel answers a ping
/// right after.
async fn exec_is_malformed(qga: &QgaClient) {
    let err = qga
        .exec(&ExecRequest::new(["/bin/true"]))
        .await
        .unwrap_err();
    assert!(matches!(err, QgaError::Malformed { .. }), "{err:?}");
    qga.ping_within(PING).await.unwrap();
}

/// The channel error a probe of `checks` (with `slack`) must end with.
async fn probe_error(qga: &QgaClient, checks: &[ProbeCheck], slack: Duration) -> QgaError {
    let vmha_qemu::ProbeError::Channel(err) = qga.probe(checks, slack).await.unwrap_err();
    err
}

/// Runs `hostile` while an honest agent next to it is pinged (800 ms) in a loop; every one of
/// those pings must succeed.
async fn beside_an_honest_agent<T>(hostile: impl Future<Output = T>) -> T {
    let dir = tempfile::tempdir().unwrap();
    let honest_agent = QgaClient::new(
        serve(&dir, "honest.sock", Arc::new(|_, req: &Value| honest(req))),
        config(),
    );
    let done = AtomicBool::new(false);
    let neighbour = async {
        let mut n = 0;
        while !done.load(Ordering::SeqCst) || n == 0 {
            honest_agent.ping_within(PING).await.unwrap();
            n += 1;
            tokio::task::yield_now().await;
        }
        n
    };
    let hostile = async {
        let out = hostile.await;
        done.store(true, Ordering::SeqCst);
        out
    };
    let (out, pings) = tokio::join!(hostile, neighbour);
    assert!(pings > 0);
    out
}

fn assert_safe(text: &str) {
    assert!(
        !text.chars().any(is_unsafe),
        "unsafe characters in {text:?}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_is_never_taken_for_the_next_calls() {
    // The first guest-info is answered 1.2 s late, with a version that gives it away.
    let (_dir, qga) = agent(2, |req| {
        if req["execute"] != "guest-info" {
            return honest(req);
        }
        let Answer::Bytes(b) = reply(req, json!({"version": "stale", "supported_commands": []}))
        else {
            unreachable!()
        };
        Answer::Late(Duration::from_millis(1200), b)
    });
    beside_an_honest_agent(async {
        qga.ping_within(PING).await.unwrap();
        // vmhad's way: the call is dropped by the caller's timeout, not the client's.
        let dropped = tokio::time::timeout(PING, qga.info()).await;
        assert!(dropped.is_err(), "{dropped:?}");
        // The next ping starts while the stale reply is still due: it must get its own.
        qga.ping_within(PING * 2).await.unwrap();
        let info = qga.info_within(PING).await.unwrap();
        assert_eq!(info.version, "fresh");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_without_id_answers_nothing() {
    let (_dir, qga) = agent(3, |_| Answer::Bytes(line(r#"{"return": {}}"#)));
    beside_an_honest_agent(async {
        for _ in 0..3 {
            let err = qga.ping_within(PING).await.unwrap_err();
            assert!(
                matches!(&err, QgaError::WrongId { got, .. } if got == "none"),
                "{err:?}"
            );
        }
        qga.ping_within(PING).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_flood_fails_one_call_and_is_discarded_by_the_resync() {
    let mut flood = Vec::new();
    for i in 0..20_000 {
        flood.extend_from_slice(
            format!("{{\"return\": {{}}, \"id\": {}}}\n", 1_000_000 + i).as_bytes(),
        );
        flood.extend_from_slice(b"{\"return\": {}}\n");
    }
    let flood = Arc::new(flood);
    let (_dir, qga) = agent(1, move |req| {
        let Answer::Bytes(own) = reply(req, json!({})) else {
            unreachable!()
        };
        let mut bytes = (*flood).clone();
        bytes.extend_from_slice(&own);
        Answer::Bytes(Arc::new(bytes))
    });
    beside_an_honest_agent(async {
        let err = qga.ping_within(PING).await.unwrap_err();
        assert!(
            matches!(&err, QgaError::WrongId { got, .. } if got == "1000000"),
            "{err:?}"
        );
        qga.ping_within(PING).await.unwrap();
        qga.info_within(PING).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amplifying_line_is_refused_and_skipped() {
    let huge = zeros(4 << 20);
    let (_dir, qga) = agent(2, move |_| Answer::Bytes(huge.clone()));
    beside_an_honest_agent(async {
        assert!(matches!(
            qga.ping_within(PING).await,
            Err(QgaError::LineTooLong { max: 4096 })
        ));
        assert!(matches!(
            qga.info_within(PING).await,
            Err(QgaError::LineTooLong { max: 65536 })
        ));
        qga.ping_within(PING).await.unwrap();
        assert_eq!(qga.info_within(PING).await.unwrap().version, "fresh");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_is_cut_off_as_hostile_then_retried() {
    let (_dir, qga) = agent(1, |_| Answer::Endless);
    beside_an_honest_agent(async {
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
        // Backed off: no reconnect yet.
        assert!(matches!(
            qga.ping_within(PING).await,
            Err(QgaError::Hostile { .. })
        ));
        // After the backoff, a fresh connection (honest now) works.
        after_backoff(async || qga.ping_within(PING).await)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_lines_is_rate_limited() {
    // Each answer: ~2 MiB of stray short lines, then the correct reply; cheap per call, but
    // far above the rate limit when it goes on.
    let strays = Arc::new(b"{}\n".repeat(700_000));
    let (_dir, qga) = agent(usize::MAX, move |req| {
        let Answer::Bytes(own) = honest(req) else {
            unreachable!()
        };
        let mut bytes = (*strays).clone();
        bytes.extend_from_slice(&own);
        Answer::Bytes(Arc::new(bytes))
    });
    beside_an_honest_agent(async {
        let mut hostile = None;
        for _ in 0..20 {
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_characters_never_reach_an_error() {
    let hostile_text = format!(
        "\\u202eevil\\u2028FAKE LOG\\u2029\\u200b\\ufeff\\u001b[2J\\u0007{}",
        "x".repeat(1500)
    );
    let text = hostile_text.clone();
    let (_dir, qga) = agent(3, move |req| match req["execute"].as_str() {
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
    beside_an_honest_agent(async {
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
        assert_eq!(qga.info_within(PING).await.unwrap().version, "fresh");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pid_or_exit_status_is_malformed() {
    for bad in [
        json!({"pid": -1}),
        json!({"pid": 0}),
        json!({"pid": 1_i64 << 40}),
        json!({"pid": "12"}),
    ] {
        let (_dir, qga) = agent(1, move |req| reply(req, bad.clone()));
        beside_an_honest_agent(async {
            exec_is_malformed(&qga).await;
            assert_eq!(
                qga.exec(&ExecRequest::new(["/bin/true"]))
                    .await
                    .unwrap()
                    .status,
                vmha_qemu::ExitStatus::Code(0)
            );
        })
        .await;
    }
    for bad in [
        json!({"exited": true, "exitcode": -1}),
        json!({"exited": true, "exitcode": 70000}),
        json!({"exited": true, "signal": 99}),
    ] {
        let (_dir, qga) = agent(2, move |req| {
            if req["execute"] == "guest-exec" {
                reply(req, json!({"pid": 9}))
            } else {
                reply(req, bad.clone())
            }
        });
        beside_an_honest_agent(async {
            exec_is_malformed(&qga).await;
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_ending_exec_ends_at_its_deadline() {
    let (_dir, qga) = agent(usize::MAX, |req| match req["execute"].as_str() {
        Some("guest-exec") => reply(req, json!({"pid": 42})),
        Some("guest-exec-status") => reply(req, json!({"exited": false})),
        _ => honest(req),
    });
    let check = true_check("app", Duration::from_millis(200));
    beside_an_honest_agent(async {
        let err = probe_error(&qga, &[check], Duration::from_millis(300)).await;
        assert!(matches!(err, QgaError::ExecDeadline { pid: 42 }), "{err:?}");
        qga.ping_within(PING).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_refuses_an_oversized_status_line() {
    let huge = zeros(1 << 20);
    let (_dir, qga) = agent(2, move |req| match req["execute"].as_str() {
        Some("guest-exec") => reply(req, json!({"pid": 5})),
        _ => Answer::Bytes(huge.clone()),
    });
    let check = true_check("app", Duration::from_secs(1));
    beside_an_honest_agent(async {
        let err = probe_error(&qga, std::slice::from_ref(&check), Duration::from_secs(2)).await;
        assert!(matches!(err, QgaError::LineTooLong { .. }), "{err:?}");
        // The honest fake's output has no status line for this probe's nonce: unreadable, but
        // the channel answers.
        let out = qga.probe(&[check], Duration::from_secs(2)).await.unwrap();
        assert!(matches!(out[0].1, ProbeOutcome::Unreadable(_)));
    })
    .await;
}

#[tokio::test]
async fn a_silent_agent_is_a_timeout_and_does_not_hold_up_a_healthy_one() {
    let (_dir, qga) = agent(usize::MAX, |_| Answer::Nothing);
    beside_an_honest_agent(async {
        assert!(matches!(
            qga.ping_within(PING).await,
            Err(QgaError::Timeout { .. })
        ));
    })
    .await;
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
    let (_dir, hostile) = agent(usize::MAX, |_| Answer::Nothing);
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
