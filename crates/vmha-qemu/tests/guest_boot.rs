//! A fully booted test guest under TCG (image from scripts/build-guest-image.sh): the agent
//! answers, the batched probe sees the demo apps, a killed app shows as not running, a graceful
//! stop shows up as SHUTDOWN{guest: true}, and kill -9 of an adopted QEMU shows up as Gone.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmha_qemu::{
    Accel, DriverConfig, ExecRequest, ExitStatus, LaunchSpec, ProbeCheck, ProbeOutcome, QemuVm,
    QgaClient, QmpEvent, StopOutcome, VmEvent, VmObservation,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds (or reuses) the guest image and returns its directory.
fn guest_image() -> PathBuf {
    let out = std::process::Command::new(repo_root().join("scripts/build-guest-image.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "build-guest-image.sh failed");
    let text = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(text.lines().last().unwrap().trim())
}

fn guest_spec(image: &Path, name: &str) -> LaunchSpec {
    // As scripts/run-guest.sh: vmlinux (PVH) when present, else vmlinuz.
    let kernel = if image.join("vmlinux").exists() {
        image.join("vmlinux")
    } else {
        image.join("vmlinuz")
    };
    let cmdline = std::fs::read_to_string(image.join("cmdline")).unwrap();
    LaunchSpec {
        name: name.into(),
        memory_mb: 256,
        cpus: 1,
        disks: vec![],
        kernel: Some(kernel),
        initrd: Some(image.join("initrd.img")),
        append: Some(format!("{} demo_apps=web,db", cmdline.trim())),
        accel: Accel::Tcg,
        extra_args: vec![],
        emulator: None,
    }
}

async fn wait_for_agent(qga: &QgaClient) {
    let start = Instant::now();
    while qga.ping().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "agent never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("agent answered {:?} after launch", start.elapsed());
}

fn app_checks() -> Vec<ProbeCheck> {
    ["web", "db"]
        .iter()
        .map(|name| ProbeCheck {
            app: vmha_model::Name::new(name).unwrap(),
            argv: vec!["/opt/demo/app".into(), "check".into(), (*name).into()],
            timeout: Duration::from_secs(5),
        })
        .collect()
}

async fn probe(qga: &QgaClient) -> Vec<ProbeOutcome> {
    let out: Vec<(vmha_model::Name, ProbeOutcome)> = qga
        .probe(&app_checks(), Duration::from_secs(10))
        .await
        .unwrap();
    out.into_iter().map(|(_, o)| o).collect()
}

fn config() -> DriverConfig {
    let mut config = DriverConfig::default();
    config.qga.call_timeout = Duration::from_secs(2);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booted_guest_probes_apps_and_stops_gracefully() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = QemuVm::launch(&guest_spec(&image, "g1"), dir.path(), &config())
        .await
        .unwrap();
    let _guard = common::PidGuard(vm.pid());
    let mut events = vm.take_events().unwrap();
    let qga = vm.qga();
    wait_for_agent(&qga).await;
    qga.info().await.unwrap().check_exec().unwrap();

    // The demo apps start from init; wait until both report running.
    let start = Instant::now();
    loop {
        let got = probe(&qga).await;
        if got == vec![ProbeOutcome::Running, ProbeOutcome::Running] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "apps never ran: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let killed = qga
        .exec(&ExecRequest::new(["/opt/demo/app", "kill", "db"]))
        .await
        .unwrap();
    assert_eq!(killed.status, ExitStatus::Code(0));
    assert_eq!(
        probe(&qga).await,
        vec![
            ProbeOutcome::Running,
            ProbeOutcome::NotRunning(ExitStatus::Code(3))
        ]
    );

    // A hung check (a script looping on `sleep 1`) times out, and neither it nor its `sleep`
    // is left running in the guest.
    let hung = qga
        .exec(&ExecRequest::new(["/opt/demo/app", "hang", "web"]))
        .await
        .unwrap();
    assert_eq!(hung.status, ExitStatus::Code(0));
    let checks: Vec<ProbeCheck> = app_checks()
        .into_iter()
        .map(|c| ProbeCheck {
            timeout: Duration::from_millis(1500),
            ..c
        })
        .collect();
    let got: Vec<ProbeOutcome> = qga
        .probe(&checks, Duration::from_secs(10))
        .await
        .unwrap()
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    assert_eq!(
        got,
        vec![
            ProbeOutcome::TimedOut,
            ProbeOutcome::NotRunning(ExitStatus::Code(3))
        ]
    );
    let left = qga
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "for s in /proc/[0-9]*/stat; do read -r l <$s && case $l in \
             *') Z '*) ;; *'(app) '*|*'(sleep) '*) echo $l;; esac; done",
        ]))
        .await
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout).to_string();
    // Only the demo apps' own processes may remain (none is named `app` or `sleep`).
    assert_eq!(left, "", "the timed-out check left processes behind");
    qga.exec(&ExecRequest::new(["/opt/demo/app", "fix", "web"]))
        .await
        .unwrap();

    let outcome = vm.stop(Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome, StopOutcome::GuestAgent);
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
        let done = matches!(e, VmEvent::Exited(_));
        seen.push(e);
        if done {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|e| matches!(e, VmEvent::Qmp(QmpEvent::Shutdown { guest: true, .. }))),
        "{seen:?}"
    );
    assert!(seen.contains(&VmEvent::Qmp(QmpEvent::Gone)), "{seen:?}");
    assert!(
        seen.contains(&VmEvent::Exited(ExitStatus::Code(0))),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_of_adopted_guest_shows_up_as_gone() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let vm = QemuVm::launch(&guest_spec(&image, "g2"), dir.path(), &config())
        .await
        .unwrap();
    let pid = vm.pid();
    let _guard = common::PidGuard(pid);
    wait_for_agent(&vm.qga()).await;
    drop(vm); // daemon restart: QEMU keeps running

    let mut vm = QemuVm::adopt(dir.path(), "g2", &config()).await.unwrap();
    assert_eq!(vm.status().await, VmObservation::Running);
    vm.qga().ping().await.unwrap();
    let mut events = vm.take_events().unwrap();

    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no Gone within 10 s")
            .expect("stream ended without Gone");
        if e == VmEvent::Qmp(QmpEvent::Gone) {
            println!("kill -9 → Gone after {:?}", killed_at.elapsed());
            break;
        }
    }
    assert!(vm.is_gone());
}
