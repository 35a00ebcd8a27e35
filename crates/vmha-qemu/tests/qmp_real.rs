//! The QMP client against a real, diskless, paused QEMU.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use vmha_qemu::{QmpClient, QmpConfig, QmpError, QmpEvent, QmpEvents};

async fn next_event(events: &mut QmpEvents) -> QmpEvent {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("no event within 10 s")
        .expect("event stream ended")
}

#[tokio::test]
async fn handshake_status_events_and_quit() {
    let Some(qemu) = common::bare_qemu() else {
        return;
    };
    let (qmp, mut events) = QmpClient::connect(&qemu.qmp, QmpConfig::default())
        .await
        .unwrap();

    let status = qmp.query_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "prelaunch");

    qmp.cont().await.unwrap();
    assert_eq!(next_event(&mut events).await, QmpEvent::Resume);
    let status = qmp.query_status().await.unwrap();
    assert!(status.running);
    assert_eq!(status.status, "running");

    qmp.stop().await.unwrap();
    assert_eq!(next_event(&mut events).await, QmpEvent::Stop);
    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, "paused");
    // An admin's `stop` is reported as what it is; the engine judges it.
    assert_eq!(
        status.observation(),
        vmha_qemu::VmObservation::Paused {
            reason: vmha_qemu::PauseReason::Admin
        }
    );

    qmp.system_reset().await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        QmpEvent::Reset {
            guest: false,
            reason: "host-qmp-system-reset".into()
        }
    );

    let err = qmp.execute("no-such-command", None).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Remote { error, .. } if error.class == "CommandNotFound"),
        "{err:?}"
    );

    qmp.quit().await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        QmpEvent::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }
    );
    assert_eq!(next_event(&mut events).await, QmpEvent::Gone);
    assert!(events.recv().await.is_none());
    assert!(matches!(qmp.query_status().await, Err(QmpError::Gone)));
}

#[tokio::test]
async fn second_client_gets_no_greeting() {
    let Some(qemu) = common::bare_qemu() else {
        return;
    };
    let (first, _events) = QmpClient::connect(&qemu.qmp, QmpConfig::default())
        .await
        .unwrap();
    let config = QmpConfig {
        greeting_timeout: Duration::from_millis(500),
        ..QmpConfig::default()
    };
    let second = QmpClient::connect(&qemu.qmp, config).await;
    assert!(
        matches!(second, Err(QmpError::GreetingTimeout(_))),
        "{second:?}"
    );
    // The first client is unaffected.
    first.query_status().await.unwrap();
}

#[tokio::test]
async fn killed_qemu_ends_the_stream_with_gone() {
    let Some(mut qemu) = common::bare_qemu() else {
        return;
    };
    let (qmp, mut events) = QmpClient::connect(&qemu.qmp, QmpConfig::default())
        .await
        .unwrap();
    qemu.child.0.kill().unwrap();
    assert_eq!(next_event(&mut events).await, QmpEvent::Gone);
    assert!(qmp.is_closed());
}
