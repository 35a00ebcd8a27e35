//! End-to-end test of the `libvirt` driver: vmhad with `driver = "libvirt"` against a real
//! libvirtd started by the test (its own socket in a tempdir; domain type `qemu`, i.e. TCG),
//! booting the test guest of `scripts/build-guest-image.sh` (demo apps db ← web ← worker, the
//! agent on the `org.qemu.guest_agent.0` virtio-serial channel, reached through libvirt).
//!
//! The single-host story of the qemu driver's e2e test: the domain is defined from the
//! configured XML and started; an app killed in the guest is restarted; a domain destroyed by
//! an admin (`virsh destroy`) and a killed QEMU are failures: the VM is started again; a
//! daemon restart adopts the running domain without restarting it; a domain shut down by an
//! admin (`virsh shutdown`) is an intentional stop: the VM group ends offline; after a libvirtd
//! restart vmhad reconnects and still handles a killed QEMU; a restart through vmha shuts the
//! domain down gracefully.
//!
//! Needs libvirt-daemon-system (scripts/install-deps.sh) and root (a privileged libvirtd).

#![cfg(feature = "libvirt")]
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Vmhad, alive, cluster_config, demo_vm, guest_image, latency, now_ms, vm_test_lock};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const VM: &str = "shop";

/// A private libvirtd (and virtlogd, which its QEMUs log through) for one test: its sockets
/// in a tempdir. Dropping it destroys and undefines the test's domain and stops both daemons.
struct Libvirtd {
    dir: tempfile::TempDir,
    domain: String,
    daemons: Vec<Child>,
}

impl Libvirtd {
    fn start(domain: &str) -> Libvirtd {
        let dir = tempfile::Builder::new()
            .prefix("vmha-libvirtd.")
            .tempdir_in("/tmp")
            .unwrap();
        let conf = dir.path().join("libvirtd.conf");
        std::fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        // Another virtlogd may already serve its (fixed) socket: then this one just exits.
        let virtlogd = Command::new("virtlogd")
            .arg("-p")
            .arg(dir.path().join("virtlogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("virtlogd.log"))
            .spawn()
            .expect("virtlogd (install libvirt-daemon-system: scripts/install-deps.sh)");
        let mut d = Libvirtd {
            dir,
            domain: domain.to_string(),
            daemons: vec![virtlogd],
        };
        d.spawn_libvirtd();
        // A domain of that name left over by an earlier, interrupted run.
        d.virsh_ok(&["destroy", domain]);
        d.virsh_ok(&["undefine", domain]);
        d
    }

    /// Starts libvirtd (the last of `daemons`) and waits until it answers.
    fn spawn_libvirtd(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("libvirtd.log"))
            .unwrap();
        let libvirtd = Command::new("libvirtd")
            .arg("-f")
            .arg(self.dir.path().join("libvirtd.conf"))
            .arg("-p")
            .arg(self.dir.path().join("libvirtd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("libvirtd (install libvirt-daemon-system: scripts/install-deps.sh)");
        self.daemons.push(libvirtd);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.virsh_ok(&["version"]) {
            assert!(
                Instant::now() < deadline,
                "libvirtd did not come up:\n{}",
                std::fs::read_to_string(self.dir.path().join("libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops libvirtd (its domains keep running) and starts it again.
    fn restart_libvirtd(&mut self) {
        let mut old = self.daemons.pop().expect("libvirtd runs");
        kill(
            Pid::from_raw(i32::try_from(old.id()).unwrap()),
            Signal::SIGTERM,
        )
        .unwrap();
        old.wait().unwrap();
        self.spawn_libvirtd();
    }

    fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.path().join("libvirt-sock").display()
        )
    }

    fn virsh(&self, args: &[&str]) -> std::process::Output {
        Command::new("virsh")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .output()
            .unwrap()
    }

    fn virsh_ok(&self, args: &[&str]) -> bool {
        self.virsh(args).status.success()
    }

    /// The domain's XML: the test guest under TCG, its serial console in a file, its agent
    /// channel, QEMU running as root (the guest image is not relabelled).
    fn domain_xml(&self) -> PathBuf {
        let image = guest_image();
        let kernel = if image.join("vmlinux").exists() {
            image.join("vmlinux")
        } else {
            image.join("vmlinuz")
        };
        let xml = format!(
            r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <devices>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
            name = self.domain,
            kernel = kernel.display(),
            initrd = image.join("initrd.img").display(),
            console = self.dir.path().join("console.log").display(),
        );
        let path = self.dir.path().join("domain.xml");
        std::fs::write(&path, xml).unwrap();
        path
    }

    /// The pid of the domain's QEMU (libvirt's pid file), if it runs.
    fn qemu_pid(&self) -> Option<i32> {
        let text =
            std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.domain)).ok()?;
        let pid = text.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// Waits until the domain's QEMU runs, other than `not`; its pid.
    fn wait_qemu(&self, not: Option<i32>) -> i32 {
        let deadline = Instant::now() + common::WAIT;
        loop {
            if let Some(pid) = self.qemu_pid()
                && Some(pid) != not
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "the domain's QEMU never ran");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.virsh_ok(&["destroy", &self.domain]);
        self.virsh_ok(&["undefine", &self.domain]);
        for child in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The demo VM with `driver = "libvirt"` on domain `domain` at `uri`, defined from `xml`.
fn libvirt_vm(uri: &str, domain: &str, xml: &Path) -> String {
    let qemu = demo_vm(VM);
    let start = qemu.find("[vm.qemu]").unwrap();
    let apps = qemu.find("[[vm.app]]").unwrap();
    format!(
        "{}[vm.libvirt]\ndomain = \"{domain}\"\nuri = \"{uri}\"\nxml = \"{}\"\n\n{}",
        &qemu[..start].replace("driver = \"qemu\"", "driver = \"libvirt\""),
        xml.display(),
        &qemu[apps..]
    )
}

fn assert_all_online(h: &Vmhad) {
    let states = h.app_states(VM);
    assert!(
        states.iter().all(|(_, s)| s == "online"),
        "apps not all online: {states:?}"
    );
    assert_eq!(h.vm_status(VM)["state"], "online");
}

/// Waits for the VM's restart after a failure and for it and its apps to be online again.
fn wait_restarted(h: &mut Vmhad, m: usize, what: &str, t0: u64) {
    let (i, failed) = h.wait_for(m, VM, "online", "restarting");
    println!("{what}: {}", failed.text);
    let (_, online) = h.wait_for(i, VM, "restarting", "online");
    latency(&format!("{what} → VM and apps online"), t0, online.time);
    for app in ["db", "web", "worker"] {
        assert_eq!(h.app(VM, "check", app), 0, "{app} not running after {what}");
    }
}

#[test]
fn libvirt_domain_story() {
    let _lock = vm_test_lock();
    let domain = format!("vmha-e2e-{}", std::process::id());
    let mut libvirtd = Libvirtd::start(&domain);
    assert!(
        !libvirtd.virsh_ok(&["dominfo", &domain]),
        "the domain must not exist before vmhad defines it"
    );
    let mut h = Vmhad::new(&[]);
    let dir = h.config.parent().unwrap().to_path_buf();
    let vm = libvirt_vm(&libvirtd.uri(), &domain, &libvirtd.domain_xml());
    std::fs::write(&h.config, cluster_config(&dir, &[vm])).unwrap();

    // 1. vmhad defines the domain from its XML and starts it; the apps come up through the
    //    agent passthrough.
    let t0 = now_ms();
    h.start();
    let (_, online) = h.wait_for(0, VM, "starting", "online");
    latency("vmhad start → libvirt VM and apps online", t0, online.time);
    assert_all_online(&h);
    assert!(
        libvirtd.virsh_ok(&["dominfo", &domain]),
        "domain not defined"
    );
    let pid0 = libvirtd.wait_qemu(None);
    let out = h.exec(VM, &["/bin/sh", "-c", "echo hello from $(hostname)"]);
    assert_eq!(out["exit"], 0, "{out}");
    assert!(
        out["stdout"].as_str().unwrap().starts_with("hello from"),
        "{out}"
    );
    // Guest output is capped through libvirt as through the QGA socket (64 KiB for an
    // operator's command), and flagged as cut.
    let out = h.exec(
        VM,
        &["/bin/sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"],
    );
    assert_eq!(out["exit"], 0, "{out}");
    assert_eq!(
        out["stdout"].as_str().unwrap().len(),
        64 << 10,
        "output not capped"
    );
    assert_eq!(out["truncated"], true, "{out}");

    // 2. An app killed in the guest is restarted there; the VM is untouched.
    let m = h.mark();
    assert_eq!(h.app(VM, "kill", "web"), 0);
    h.wait_for(m, "shop/web", "online", "restarting");
    h.wait_for(m, "shop/web", "restarting", "online");
    assert_eq!(
        libvirtd.qemu_pid(),
        Some(pid0),
        "an app restart restarted the VM"
    );

    // 3. An admin destroys the domain (virsh destroy): a failure, the VM is started again.
    let m = h.mark();
    let t0 = now_ms();
    let out = libvirtd.virsh(&["destroy", &domain]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_restarted(&mut h, m, "virsh destroy", t0);
    let pid1 = libvirtd.wait_qemu(Some(pid0));

    // 4. QEMU killed: a failure, the VM is started again.
    let m = h.mark();
    let t0 = now_ms();
    kill(Pid::from_raw(pid1), Signal::SIGKILL).unwrap();
    wait_restarted(&mut h, m, "QEMU kill -9", t0);
    let pid2 = libvirtd.wait_qemu(Some(pid1));

    // 5. vmhad restarts (SIGTERM leaves VMs running): the next one adopts the running domain.
    let status = h.signal_and_wait(Signal::SIGTERM);
    assert!(
        status.success(),
        "vmhad exit status after SIGTERM: {status}"
    );
    assert_eq!(
        libvirtd.qemu_pid(),
        Some(pid2),
        "SIGTERM stopped the domain"
    );
    let m = h.mark();
    h.start();
    h.wait_for(m, VM, "*", "online");
    for app in ["db", "web", "worker"] {
        h.wait_for(m, &format!("{VM}/{app}"), "*", "online");
    }
    assert_eq!(
        libvirtd.qemu_pid(),
        Some(pid2),
        "the domain was not adopted"
    );
    let restarts: Vec<_> = h
        .since(m)
        .into_iter()
        .filter(|e| e.object == VM && (e.to == "starting" || e.to == "restarting"))
        .collect();
    assert!(
        restarts.is_empty(),
        "adoption restarted the VM: {restarts:?}"
    );
    assert_all_online(&h);

    // 6. An admin shuts the domain down (virsh shutdown): an intentional stop, the VM group
    //    ends offline and is not restarted; `vm-start` runs it again.
    let m = h.mark();
    let out = libvirtd.virsh(&["shutdown", &domain]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, offline) = h.wait_for(m, VM, "*", "offline");
    println!("virsh shutdown: {}", offline.text);
    assert_eq!(h.vm_status(VM)["state"], "offline");
    // Barrier: an exec refused (the VM is not running) proves the core handled everything
    // queued before it; no start was planned meanwhile.
    let (status, _) = h.post_raw(
        &format!("/v1/vms/{VM}/exec"),
        &serde_json::json!({"argv": ["true"], "timeout_ms": 5000}).to_string(),
    );
    assert_ne!(status, 200, "exec in a shut-down VM succeeded");
    let starts: Vec<_> = h
        .since(m)
        .into_iter()
        .filter(|e| e.object == VM && (e.to == "starting" || e.to == "restarting"))
        .collect();
    assert!(
        starts.is_empty(),
        "the shut-down VM was restarted: {starts:?}"
    );
    assert!(libvirtd.qemu_pid().is_none(), "the domain runs again");
    let m = h.mark();
    h.command_ok(&serde_json::json!({"command": "vm-start", "vm": VM}));
    h.wait_for(m, VM, "*", "online");
    let pid3 = libvirtd.wait_qemu(Some(pid2));
    assert_all_online(&h);

    // 7. libvirtd restarts (its domains keep running): vmhad reconnects, and a QEMU killed
    //    afterwards is still a failure it handles.
    libvirtd.restart_libvirtd();
    assert_eq!(
        libvirtd.qemu_pid(),
        Some(pid3),
        "the libvirtd restart stopped the domain"
    );
    let m = h.mark();
    let t0 = now_ms();
    kill(Pid::from_raw(pid3), Signal::SIGKILL).unwrap();
    wait_restarted(&mut h, m, "QEMU kill -9 after a libvirtd restart", t0);
    let pid4 = libvirtd.wait_qemu(Some(pid3));

    // 8. An admin restart through vmha: apps stopped, the domain shut down gracefully (agent,
    //    then ACPI: no destroy), started again, apps started.
    let m = h.mark();
    h.command_ok(&serde_json::json!({"command": "vm-restart", "vm": VM}));
    let (i, _) = h.wait_for(m, VM, "online", "restarting");
    h.wait_for(i, VM, "restarting", "online");
    libvirtd.wait_qemu(Some(pid4));
    assert_all_online(&h);
    let log = h.log_tail(400);
    assert!(
        log.contains("libvirt domain stopped") && log.contains("Graceful"),
        "the domain was not shut down gracefully:\n{log}"
    );
}
