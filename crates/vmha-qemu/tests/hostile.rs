//! The QGA client against a hostile fake agent: each misbehaviour is a typed error for that
//! channel only, and a healthy channel probed at the same time is not held up.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vmha_qemu::{ProbeCheck, ProbeOutcome, QgaClient, QgaConfig, QgaError};

/// How the fake agent answers the first real (non-sync) command.
#[derive(Clone, Copy)]
enum Misbehaviour {
    Garbage,
    WrongId,
    Huge,
    Partial,
    NotAnObject,
    Silent,
    SilentEvenToSync,
    /// An error reply whose text carries terminal escapes, newlines and 60 KB.
    HostileError,
}

/// Serves one fake agent on a fresh socket; answers syncs correctly unless told not to.
fn fake_agent(dir: &tempfile::TempDir, how: Misbehaviour) -> PathBuf {
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).split(b'\n');
                while let Ok(Some(line)) = lines.next_segment().await {
                    let line: Vec<u8> = line.into_iter().filter(|b| *b != 0xFF).collect();
                    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if req["execute"] == "guest-sync-delimited" {
                        if matches!(how, Misbehaviour::SilentEvenToSync) {
                            continue;
                        }
                        // A stale reply first, then the delimited sync reply.
                        let mut bytes =
                            b"{\"return\": {}, \"id\": 999}\n\x00junk\nhalf a line".to_vec();
                        bytes.push(0xFF);
                        bytes.extend_from_slice(
                            format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes(),
                        );
                        let _ = write.write_all(&bytes).await;
                        continue;
                    }
                    let reply: Vec<u8> = match how {
                        Misbehaviour::Garbage => b"{\"return\": tru\xc3\n".to_vec(),
                        Misbehaviour::WrongId => b"{\"return\": {}, \"id\": 424242}\n".to_vec(),
                        Misbehaviour::Huge => {
                            let mut v = b"{\"return\": \"".to_vec();
                            v.resize(2 << 20, b'a');
                            v.extend_from_slice(b"\"}\n");
                            v
                        }
                        Misbehaviour::Partial => b"{\"return\": {\"pid\"".to_vec(),
                        Misbehaviour::NotAnObject => b"[1, 2, 3]\n".to_vec(),
                        Misbehaviour::HostileError => {
                            // JSON escapes: the decoded text holds ESC, BEL and a newline.
                            let desc = format!(
                                r"\u001b[2J\u001b]0;pwned\u0007\nFAKE LOG LINE{}",
                                "x".repeat(60_000)
                            );
                            format!("{{\"error\": {{\"class\": \"Generic\\nError\", \"desc\": \"{desc}\"}}}}\n").into_bytes()
                        }
                        Misbehaviour::Silent | Misbehaviour::SilentEvenToSync => continue,
                    };
                    let _ = write.write_all(&reply).await;
                }
            });
        }
    });
    path
}

fn config() -> QgaConfig {
    QgaConfig {
        call_timeout: Duration::from_millis(800),
        max_line: 64 << 10,
        ..QgaConfig::default()
    }
}

async fn ping_error(how: Misbehaviour) -> QgaError {
    let dir = tempfile::tempdir().unwrap();
    let qga = QgaClient::new(fake_agent(&dir, how), config());
    qga.ping().await.unwrap_err()
}

#[tokio::test]
async fn each_misbehaviour_is_a_typed_error() {
    assert!(matches!(
        ping_error(Misbehaviour::Garbage).await,
        QgaError::Malformed { .. }
    ));
    assert!(matches!(
        ping_error(Misbehaviour::WrongId).await,
        QgaError::WrongId { .. }
    ));
    assert!(matches!(
        ping_error(Misbehaviour::Huge).await,
        QgaError::LineTooLong { .. }
    ));
    assert!(matches!(
        ping_error(Misbehaviour::NotAnObject).await,
        QgaError::Malformed { .. }
    ));
    assert!(matches!(
        ping_error(Misbehaviour::Partial).await,
        QgaError::Timeout { .. }
    ));
    assert!(matches!(
        ping_error(Misbehaviour::Silent).await,
        QgaError::Timeout { .. }
    ));
    let err = ping_error(Misbehaviour::SilentEvenToSync).await;
    assert!(
        matches!(&err, QgaError::Timeout { command, .. } if command == "guest-ping"),
        "{err:?}"
    );
}

/// A guest's error text reaches logs, events and the API: it must arrive bounded and without
/// control characters (terminal escapes, forged log lines).
#[tokio::test]
async fn a_guest_error_text_is_bounded_and_printable() {
    let err = ping_error(Misbehaviour::HostileError).await;
    let QgaError::Remote { error, .. } = &err else {
        panic!("expected a remote error, got {err:?}");
    };
    let text = err.to_string();
    let head: String = text.chars().take(120).collect();
    assert!(text.contains("FAKE LOG LINE"), "{head:?}");
    assert!(!text.chars().any(char::is_control), "{head:?}");
    assert!(error.desc.chars().count() <= 512, "{}", error.desc.len());
    assert!(error.class.chars().count() <= 512);
}

#[tokio::test]
async fn errors_repeat_cleanly_on_the_same_client() {
    let dir = tempfile::tempdir().unwrap();
    let qga = QgaClient::new(fake_agent(&dir, Misbehaviour::Huge), config());
    for _ in 0..3 {
        assert!(matches!(
            qga.ping().await,
            Err(QgaError::LineTooLong { .. })
        ));
    }
}

#[tokio::test]
async fn no_listener_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let qga = QgaClient::new(dir.path().join("absent.sock"), config());
    assert!(matches!(qga.ping().await, Err(QgaError::Connect { .. })));
}

#[tokio::test]
async fn a_silent_agent_does_not_hold_up_a_healthy_one() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hostile = QgaClient::new(
        fake_agent(&dir, Misbehaviour::SilentEvenToSync),
        QgaConfig {
            call_timeout: Duration::from_secs(5),
            ..QgaConfig::default()
        },
    );
    let healthy = QgaClient::new(&agent.sock, QgaConfig::default());
    let checks = vec![ProbeCheck {
        app: vmha_model::Name::new("ok").unwrap(),
        argv: vec!["true".into()],
        timeout: Duration::from_secs(2),
    }];
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
