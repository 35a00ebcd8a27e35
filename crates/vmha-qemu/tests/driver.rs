//! The VM driver with a real, diskless QEMU (no guest OS): launch, refuse a double launch,
//! status, kill, stop falling back to quit, adopt.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::time::Duration;

use vmha_qemu::{
    Accel, DriverConfig, ExitStatus, LaunchSpec, PauseReason, QemuVm, QmpEvent, StopOutcome,
    VmError, VmEvent, VmObservation,
};

fn spec(name: &str, extra: &[&str]) -> LaunchSpec {
    LaunchSpec {
        name: name.into(),
        memory_mb: 64,
        cpus: 1,
        disks: vec![],
        kernel: None,
        initrd: None,
        append: None,
        accel: Accel::Tcg,
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        emulator: None,
    }
}

async fn launch(dir: &Path, name: &str, extra: &[&str]) -> (QemuVm, common::PidGuard) {
    let vm = QemuVm::launch(&spec(name, extra), dir, &DriverConfig::default())
        .await
        .unwrap();
    let guard = common::PidGuard(vm.pid());
    (vm, guard)
}

async fn drain_until_gone(events: &mut tokio::sync::mpsc::Receiver<VmEvent>) -> Vec<VmEvent> {
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
        let last = matches!(e, VmEvent::Exited(_));
        seen.push(e);
        if last {
            break;
        }
    }
    seen
}

#[tokio::test]
async fn launch_status_double_launch_and_kill() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, _guard) = launch(dir.path(), "bare1", &["-S"]).await;
    let mut events = vm.take_events().unwrap();
    assert!(vm.paths().pidfile.exists());
    assert_eq!(
        vm.status().await,
        VmObservation::Paused {
            reason: PauseReason::Prelaunch
        }
    );
    let again = QemuVm::launch(
        &spec("bare1", &["-S"]),
        dir.path(),
        &DriverConfig::default(),
    )
    .await;
    // Should a second QEMU start anyway, it must not outlive the test.
    let _second = again.as_ref().ok().map(|v| common::PidGuard(v.pid()));
    assert!(
        matches!(again, Err(VmError::AlreadyRunning(_))),
        "{again:?}"
    );

    vm.kill().await.unwrap();
    assert!(vm.is_gone());
    assert_eq!(vm.status().await, VmObservation::Gone);
    let seen = drain_until_gone(&mut events).await;
    assert!(
        seen.contains(&VmEvent::Exited(ExitStatus::Signal(9))),
        "{seen:?}"
    );
}

/// Events are reported as they are: `STOP` carries no reason, so its observation asks
/// `query-status` (an admin's `stop` is `Paused { Admin }`); `RESUME` is `Resumed`.
#[tokio::test]
async fn stop_and_resume_events_are_observed_with_their_reason() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, _guard) = launch(dir.path(), "bare5", &["-S"]).await;
    let mut events = vm.take_events().unwrap();
    let qmp = vm.qmp().clone();
    let mut next = async || loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap();
        if let Some(o) = e.observation(&qmp).await {
            return o;
        }
    };
    qmp.cont().await.unwrap();
    assert_eq!(next().await, VmObservation::Resumed);
    assert_eq!(vm.status().await, VmObservation::Running);
    qmp.stop().await.unwrap();
    let paused = VmObservation::Paused {
        reason: PauseReason::Admin,
    };
    assert_eq!(next().await, paused);
    assert_eq!(vm.status().await, paused);
    vm.kill().await.unwrap();
    assert_eq!(next().await, VmObservation::Gone);
}

#[tokio::test]
async fn bad_binary_and_early_exit_are_errors() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = DriverConfig {
        qemu_binary: "/nonexistent/qemu".into(),
        ..DriverConfig::default()
    };
    assert!(matches!(
        QemuVm::launch(&spec("x", &[]), dir.path(), &config).await,
        Err(VmError::Spawn { .. })
    ));
    let err = QemuVm::launch(
        &spec("y", &["-no-such-option"]),
        dir.path(),
        &DriverConfig::default(),
    )
    .await
    .unwrap_err();
    match err {
        VmError::StartupExit { log_tail, .. } => assert!(log_tail.contains("no-such-option")),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn stop_without_guest_os_falls_back_to_quit() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = DriverConfig::default();
    config.qga.call_timeout = Duration::from_millis(200);
    let vm = QemuVm::launch(&spec("bare2", &["-S"]), dir.path(), &config)
        .await
        .unwrap();
    let _guard = common::PidGuard(vm.pid());
    let mut vm = vm;
    let mut events = vm.take_events().unwrap();
    let outcome = vm.stop(Duration::from_millis(500)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Quit);
    let seen = drain_until_gone(&mut events).await;
    assert!(
        seen.contains(&VmEvent::Qmp(QmpEvent::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        })),
        "{seen:?}"
    );
    assert_eq!(
        vm.stop(Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyGone
    );
}

#[tokio::test]
async fn adopt_reattaches_and_learns_of_death_from_the_socket() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (vm, _guard) = launch(dir.path(), "bare3", &["-S"]).await;
    let pid = vm.pid();
    drop(vm); // the daemon "restarts": QEMU keeps running
    let mut adopted = QemuVm::adopt(dir.path(), "bare3", &DriverConfig::default())
        .await
        .unwrap();
    assert_eq!(adopted.pid(), pid);
    let mut events = adopted.take_events().unwrap();
    assert!(matches!(
        adopted.status().await,
        VmObservation::Paused { .. } | VmObservation::Running
    ));
    adopted.kill().await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e, VmEvent::Qmp(QmpEvent::Gone));
    assert!(matches!(
        QemuVm::adopt(dir.path(), "bare3", &DriverConfig::default()).await,
        Err(VmError::Pid { .. })
    ));
}

/// A QEMU of this VM started behind the driver's back and still starting (as when a daemon is
/// killed in the middle of a launch): launch refuses a second one, adopt waits for it to come
/// up and attaches, and kill_strays ends it.
#[tokio::test]
async fn a_qemu_started_by_someone_else_is_seen_adopted_and_killed() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = vmha_qemu::VmPaths::new(dir.path(), "stray").unwrap();
    std::fs::create_dir_all(&paths.dir).unwrap();
    // The same command line the driver would use, started by "someone else".
    let args = vmha_qemu::vm::qemu_args(&spec("stray", &["-S"]), &paths);
    let mut child = std::process::Command::new("qemu-system-x86_64")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = common::PidGuard(child.id());
    // Visible as soon as it has exec'd, long before its pidfile and QMP socket exist.
    let mut seen = Vec::new();
    for _ in 0..500 {
        seen = vmha_qemu::qemu_processes(&paths);
        if !seen.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(seen, vec![child.id()]);
    assert!(matches!(
        QemuVm::launch(
            &spec("stray", &["-S"]),
            dir.path(),
            &DriverConfig::default()
        )
        .await,
        Err(VmError::AlreadyRunning(_))
    ));
    let vm = QemuVm::adopt(dir.path(), "stray", &DriverConfig::default())
        .await
        .unwrap();
    assert_eq!(vm.pid(), child.id());
    drop(vm);
    let killed = vmha_qemu::kill_strays(dir.path(), "stray", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(killed, 1);
    assert!(vmha_qemu::qemu_processes(&paths).is_empty());
    assert!(child.wait().unwrap().signal().is_some());
}
