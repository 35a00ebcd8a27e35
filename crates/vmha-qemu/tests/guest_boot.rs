//! A fully booted test guest under TCG (image from scripts/build-guest-image.sh): the agent
//! answers, the batched probe sees the demo apps, a killed app shows as not running, a graceful
//! stop shows up as SHUTDOWN{guest: true}, kill -9 of an adopted QEMU shows up as Gone, and a
//! QEMU launched without the watch doorbell gets it when adopted and migrates to a new one, and
//! a doorbell chardev left without its port gets the port at the next adoption.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmha_qemu::doorbell::Ring;
use vmha_qemu::migration::{listen_incoming, send};
use vmha_qemu::vm::qemu_args;
use vmha_qemu::{
    Accel, DriverConfig, ExecRequest, ExitStatus, LaunchSpec, MigrationLimits, ProbeCheck,
    ProbeOutcome, QemuVm, QgaClient, QmpClient, QmpEvent, StopOutcome, VmEvent, VmObservation,
    VmPaths,
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

/// QEMU's arguments for `spec` as a vmhad from before the watch doorbell wrote them: today's
/// without the doorbell's chardev and port.
fn args_before_the_doorbell(spec: &LaunchSpec, paths: &VmPaths) -> Vec<OsString> {
    let args = qemu_args(spec, paths);
    let mut old = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let bell = args
            .get(i + 1)
            .is_some_and(|v| v.to_string_lossy().contains("vmhabell0"));
        if bell {
            i += 2;
        } else {
            old.push(args[i].clone());
            i += 1;
        }
    }
    assert_eq!(old.len() + 4, args.len(), "the doorbell's chardev and port");
    old
}

/// Starts QEMU as a vmhad from before the watch doorbell did ([`args_before_the_doorbell`],
/// then `extra`), in its own process group; killed when the guard drops.
fn launch_before_the_doorbell(
    spec: &LaunchSpec,
    paths: &VmPaths,
    extra: &[&str],
) -> common::ChildGuard {
    std::fs::create_dir_all(&paths.dir).unwrap();
    common::ChildGuard(
        std::process::Command::new("qemu-system-x86_64")
            .args(args_before_the_doorbell(spec, paths))
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    )
}

/// The guest writes `a` to the doorbell's port, found by name as the watcher finds it.
async fn ring_from_guest(qga: &QgaClient) {
    let rung = qga
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "for d in /sys/class/virtio-ports/*; do read -r n <$d/name; \
             [ \"$n\" = org.vmha.watch.0 ] && printf a >/dev/${d##*/} && exit 0; \
             done; exit 1",
        ]))
        .await
        .unwrap();
    assert_eq!(
        rung.status,
        ExitStatus::Code(0),
        "the guest has no doorbell port"
    );
}

/// How many `virtserialport`s of this QEMU are bound to the doorbell's chardev.
async fn bell_ports(qmp: &QmpClient) -> usize {
    let anon = "/machine/peripheral-anon";
    let children = qmp
        .execute("qom-list", Some(serde_json::json!({"path": anon})))
        .await
        .unwrap();
    let mut bound = 0;
    for child in children.as_array().unwrap() {
        if child["type"] == "child<virtserialport>" {
            let path = format!("{anon}/{}", child["name"].as_str().unwrap());
            let args = serde_json::json!({"path": path, "property": "chardev"});
            if qmp.execute("qom-get", Some(args)).await.unwrap() == "vmhabell0" {
                bound += 1;
            }
        }
    }
    bound
}

/// An adoption cancelled between its `chardev-add` and its `device_add` leaves the doorbell's
/// chardev without its port: the next adoption plugs the port (once, however often it
/// adopts). The QEMU never runs its guest (`-S`): the port is a QEMU matter.
#[tokio::test]
async fn a_doorbell_chardev_left_without_its_port_gets_it_at_the_next_adoption() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = guest_spec(&guest_image(), "g4");
    let paths = VmPaths::new(dir.path(), "g4").unwrap();
    let _old = launch_before_the_doorbell(&spec, &paths, &["-S"]);
    let start = Instant::now();
    let (qmp, _events) = loop {
        match QmpClient::connect(&paths.qmp, config().qmp).await {
            Ok(pair) => break pair,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(20), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let backend = serde_json::json!({
        "type": "socket",
        "data": {
            "addr": {"type": "unix", "data": {"path": paths.bell.to_string_lossy()}},
            "server": true,
            "wait": false,
        },
    });
    let args = serde_json::json!({"id": "vmhabell0", "backend": backend});
    qmp.execute("chardev-add", Some(args)).await.unwrap();
    drop(qmp);

    for _ in 0..2 {
        let vm = QemuVm::adopt(dir.path(), "g4", &config()).await.unwrap();
        assert_eq!(bell_ports(vm.qmp()).await, 1, "ports bound to the doorbell");
    }
}

/// A rolling upgrade: a QEMU launched without the doorbell (by an older vmhad), adopted by
/// this driver, gets the port hot-plugged (the running guest sees it and can ring), and then
/// live-migrates to a QEMU launched today, where the guest's port rings the new doorbell.
/// Without the hot-plug the target has a port the source lacks: it cannot load the stream
/// and never runs (checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopted_qemu_from_before_the_doorbell_gets_it_and_migrates_to_a_new_host() {
    if !common::have("qemu-system-x86_64") {
        return;
    }
    let image = guest_image();
    // Three TCG guests may boot at once beside this one: a guest exec can take seconds.
    let mut config = config();
    config.qga.call_timeout = Duration::from_secs(10);
    let (old_dir, new_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spec = guest_spec(&image, "g3");
    let paths = VmPaths::new(old_dir.path(), "g3").unwrap();
    let _old = launch_before_the_doorbell(&spec, &paths, &[]);
    // The guest runs before the upgraded driver adopts its QEMU: the port is hot-plugged.
    let qga = QgaClient::new(&paths.qga, config.qga.clone());
    wait_for_agent(&qga).await;
    drop(qga);

    let source = QemuVm::adopt(old_dir.path(), "g3", &config).await.unwrap();
    let chardevs = source.qmp().execute("query-chardev", None).await.unwrap();
    assert!(chardevs.to_string().contains("vmhabell0"), "{chardevs}");
    let mut bell = source.bell();
    ring_from_guest(&source.qga()).await;
    let ring = tokio::time::timeout(Duration::from_secs(10), bell.ring()).await;
    assert_eq!(ring.expect("no ring on the hot-plugged port"), Ring::Armed);
    // Adopting again leaves the port as it is.
    drop(source);
    let source = QemuVm::adopt(old_dir.path(), "g3", &config).await.unwrap();

    let incoming = LaunchSpec {
        extra_args: vec!["-incoming".into(), "defer".into()],
        ..spec
    };
    let target = QemuVm::launch(&incoming, new_dir.path(), &config)
        .await
        .unwrap();
    let _new_guard = common::PidGuard(target.pid());
    let uri = listen_incoming(target.qmp(), "127.0.0.1").await.unwrap();
    send(source.qmp(), &uri, MigrationLimits::default())
        .await
        .expect("migration from the adopted QEMU to today's");
    let start = Instant::now();
    while target.status().await != VmObservation::Running {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "target never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut bell = target.bell();
    ring_from_guest(&target.qga()).await;
    let ring = tokio::time::timeout(Duration::from_secs(10), bell.ring()).await;
    assert_eq!(
        ring.expect("no ring on the migrated guest's port"),
        Ring::Armed
    );
}
