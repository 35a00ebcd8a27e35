//! The QGA client against a real `qemu-ga` on this host. Never sends it guest-shutdown, suspend,
//! fsfreeze or set-time: its guest-exec runs on this machine.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use vmha_qemu::{
    ExecRequest, ExitStatus, ProbeCheck, ProbeOutcome, QgaClient, QgaConfig, QgaError,
};

fn client(agent: &common::HostAgent) -> QgaClient {
    QgaClient::new(&agent.sock, QgaConfig::default())
}

#[tokio::test]
async fn ping_and_info_report_exec_enabled() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    qga.ping().await.unwrap();
    let info = qga.info().await.unwrap();
    assert!(!info.version.is_empty());
    info.check_exec().unwrap();
}

#[tokio::test]
async fn exec_returns_output_codes_and_signals() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);

    let mut req = ExecRequest::new([
        "/bin/sh",
        "-c",
        "cat; echo \"$VMHA_X\"; echo oops >&2; exit 7",
    ]);
    req.env = vec!["VMHA_X=hello".into()];
    req.input = Some(b"in:".to_vec());
    let out = qga.exec(&req).await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(7));
    assert_eq!(out.stdout, b"in:hello\n");
    assert_eq!(out.stderr, b"oops\n");
    assert!(!out.stdout_truncated && !out.stderr_truncated);

    let out = qga
        .exec(&ExecRequest::new(["/bin/sh", "-c", "kill -9 $$"]))
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::Signal(9));

    let mut req = ExecRequest::new(["/bin/sh", "-c", "head -c 5000 /dev/zero"]);
    req.output_cap = 100;
    let out = qga.exec(&req).await.unwrap();
    assert_eq!(out.stdout.len(), 100);
    assert!(out.stdout_truncated);

    let err = qga
        .exec(&ExecRequest::new(["/nonexistent/binary"]))
        .await
        .unwrap_err();
    assert!(matches!(err, QgaError::Remote { .. }), "{err:?}");
    // The channel still works after a remote error.
    qga.ping().await.unwrap();
}

#[tokio::test]
async fn exec_deadline_is_reported() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    let mut req = ExecRequest::new(["/bin/sleep", "2"]);
    req.deadline = Duration::from_millis(300);
    assert!(matches!(
        qga.exec(&req).await,
        Err(QgaError::ExecDeadline { .. })
    ));
    qga.ping().await.unwrap();
}

#[tokio::test]
async fn batched_probe_of_five_checks() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    let check = |name: &str, argv: &[&str], secs: u64| ProbeCheck {
        app: vmha_model::Name::new(name).unwrap(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(secs),
    };
    let checks = vec![
        check("ok", &["true"], 5),
        check("down", &["false"], 5),
        check("three", &["sh", "-c", "exit 3"], 5),
        check("hung", &["sleep", "10"], 1),
        check("killed", &["sh", "-c", "kill -9 $$"], 5),
    ];
    let out = qga.probe(&checks, Duration::from_secs(5)).await.unwrap();
    let got: Vec<(&str, ProbeOutcome)> = out.iter().map(|(a, o)| (a.as_str(), *o)).collect();
    assert_eq!(
        got,
        vec![
            ("ok", ProbeOutcome::Running),
            ("down", ProbeOutcome::NotRunning(ExitStatus::Code(1))),
            ("three", ProbeOutcome::NotRunning(ExitStatus::Code(3))),
            ("hung", ProbeOutcome::TimedOut),
            ("killed", ProbeOutcome::NotRunning(ExitStatus::Signal(9))),
        ]
    );
}

/// The pids of the processes whose command line is `argv` (NUL-separated, as in `/proc`).
fn processes(argv: &[u8]) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid = e.ok()?.file_name().into_string().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'));
            (cmdline == argv && !zombie).then_some(pid)
        })
        .collect()
}

/// The first probe times its checks with a timer in the guest; once the guest showed
/// `/proc/PID/task/PID/children`, vmhad times them: a hung check still times out and is
/// ended, and no timer runs in the guest.
#[tokio::test]
async fn once_the_guest_shows_children_vmhad_times_the_checks_out() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    let check = |name: &str, argv: &[&str]| ProbeCheck {
        app: vmha_model::Name::new(name).unwrap(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_millis(1_237),
    };
    let checks = vec![check("ok", &["true"]), check("hung", &["sleep", "10.5"])];
    let timer = b"sleep\x001.237\x00";
    for round in 0..3 {
        let (out, timers) = tokio::join!(qga.probe(&checks, Duration::from_secs(5)), async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            processes(timer)
        });
        let got: Vec<ProbeOutcome> = out.unwrap().into_iter().map(|(_, o)| o).collect();
        assert_eq!(
            got,
            vec![ProbeOutcome::Running, ProbeOutcome::TimedOut],
            "round {round}"
        );
        assert_eq!(
            timers.is_empty(),
            round > 0,
            "round {round}: timers {timers:?}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !processes(b"sleep\x0010.5\x00").is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the hung check runs on"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `call` against the agent stalled (SIGSTOP, its reply comes late), then checks that the
/// next call resynchronises and gets its own reply, not the stale one.
async fn after_a_stalled_call<T>(
    agent: &common::HostAgent,
    qga: &QgaClient,
    call: impl std::future::Future<Output = T>,
) -> T {
    qga.ping().await.unwrap();
    agent.signal(Signal::SIGSTOP);
    let result = call.await;
    agent.signal(Signal::SIGCONT);
    let value = qga
        .call("guest-ping", None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(value, json!({}));
    result
}

#[tokio::test]
async fn resync_after_timeout_discards_the_stale_reply() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    // A hung agent: the request is sent but times out; its (large) reply comes later.
    let stale = after_a_stalled_call(
        &agent,
        &qga,
        qga.call("guest-info", None, Duration::from_millis(300)),
    )
    .await;
    assert!(matches!(stale, Err(QgaError::Timeout { .. })), "{stale:?}");
    let info = qga.info().await.unwrap();
    assert!(!info.commands.is_empty());
}

#[tokio::test]
async fn a_dropped_call_leaves_the_next_one_its_own_reply() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    // The caller gives up on the call (its future is dropped, not timed out by the client).
    let dropped = after_a_stalled_call(
        &agent,
        &qga,
        tokio::time::timeout(
            Duration::from_millis(300),
            qga.call("guest-info", None, Duration::from_secs(30)),
        ),
    )
    .await;
    assert!(dropped.is_err(), "the call was not cut short: {dropped:?}");
}

#[tokio::test]
async fn reconnects_after_agent_restart() {
    let Some(mut agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    qga.ping().await.unwrap();
    let sock = agent.sock.clone();
    let dir = std::mem::replace(&mut agent.dir, tempfile::tempdir().unwrap());
    drop(agent); // kills the agent; the directory stays alive in `dir`
    assert!(qga.ping().await.is_err());
    let state = dir.path().join("state2");
    std::fs::create_dir(&state).unwrap();
    let _ = std::fs::remove_file(&sock);
    let child = std::process::Command::new("/usr/sbin/qemu-ga")
        .args(["-m", "unix-listen", "-p"])
        .arg(&sock)
        .arg("-f")
        .arg(dir.path().join("qga2.pid"))
        .arg("-t")
        .arg(&state)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = common::ChildGuard(child);
    common::wait_for_socket(&sock);
    qga.ping().await.unwrap();
}

/// vmhad's case: the agent is paused (SIGSTOP) for 1.2 s while an 800 ms ping and an
/// `info()` cut short by the caller's 800 ms timeout are dropped; the next ping, sent while
/// the agent is still paused, must get its own answer once the agent resumes — not a late one.
#[tokio::test]
async fn a_paused_agent_answers_the_next_ping_after_dropped_calls() {
    let Some(agent) = common::host_agent() else {
        return;
    };
    let qga = client(&agent);
    for dropped_info in [false, true] {
        qga.ping().await.unwrap();
        agent.signal(Signal::SIGSTOP);
        let pid = agent.child.0.id();
        let resume = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1200));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT)
                .unwrap();
        });
        let ping = Duration::from_millis(800);
        if dropped_info {
            let cut = tokio::time::timeout(ping, qga.info()).await;
            assert!(cut.is_err(), "{cut:?}");
        } else {
            let late = qga.ping_within(ping).await;
            assert!(matches!(late, Err(QgaError::Timeout { .. })), "{late:?}");
        }
        // Sent while the agent is still stopped; it resumes 400 ms into this call.
        qga.ping_within(ping).await.unwrap();
        resume.join().unwrap();
        assert!(qga.info().await.unwrap().check_exec().is_ok());
    }
}
