//! The fence guard (`vmhad --fence-guard`), driven over its stdin the way vmhad drives it,
//! against stand-in "QEMUs" (processes whose command line names a VM's QMP socket, which is
//! how both the fence and the guard find a VM's QEMU).

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use vmha_qemu::VmPaths;

/// The system-wide monotonic clock in ms (the guard's clock).
fn mono() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    u64::try_from(ts.tv_sec() * 1_000 + ts.tv_nsec() / 1_000_000).unwrap()
}

struct Bed {
    _dir: tempfile::TempDir,
    qemu: Child,
    guard: Child,
    stdin: Option<ChildStdin>,
    epoch: u64,
}

impl Bed {
    /// A stand-in QEMU of VM `vm1` and a guard told the fence rule and that VM, with a renewal
    /// sent now.
    fn new(fence_after_ms: u64, lease_ttl_ms: u64) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let paths = VmPaths::new(dir.path(), "vm1").unwrap();
        std::fs::create_dir_all(paths.qmp.parent().unwrap()).unwrap();
        let qemu = Command::new("sh")
            .arg("-c")
            .arg("while :; do sleep 0.1; done")
            .arg(&paths.qmp)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while vmha_qemu::qemu_processes(&paths).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut guard = Command::new(env!("CARGO_BIN_EXE_vmhad"))
            .arg("--fence-guard")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = guard.stdin.take();
        let mut bed = Bed {
            _dir: dir,
            qemu,
            guard,
            stdin,
            epoch: mono(),
        };
        bed.say(&format!("epoch {}", bed.epoch));
        bed.say(&format!("fence-after {fence_after_ms}"));
        bed.say(&format!("lease-ttl {lease_ttl_ms}"));
        bed.say("vms");
        bed.say(&format!("vm {}", paths.qmp.display()));
        bed.renew();
        bed
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// A renewal sent now was acknowledged.
    fn renew(&mut self) {
        let ms = mono() - self.epoch;
        self.say(&format!("renewed {ms}"));
    }

    /// vmhad is gone: the guard's stdin closes.
    fn close(&mut self) {
        self.stdin = None;
    }

    fn qemu_alive(&mut self) -> bool {
        self.qemu.try_wait().unwrap().is_none()
    }

    /// Waits up to `limit` for the stand-in QEMU to die; whether it did.
    fn qemu_dies_within(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if !self.qemu_alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.guard.kill();
        let _ = self.guard.wait();
    }
}

#[test]
fn renewals_keep_the_vms_alive_and_a_gone_vmhad_gets_them_killed_at_its_deadline() {
    let mut bed = Bed::new(2_000, 3_000);
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        bed.renew();
    }
    assert!(bed.qemu_alive(), "killed although renewals kept coming");
    bed.close();
    // The lease lives until 3 s after the last renewal; the guard kills at 2 s, not at once.
    std::thread::sleep(Duration::from_millis(500));
    assert!(bed.qemu_alive(), "killed before the fence deadline");
    assert!(
        bed.qemu_dies_within(Duration::from_secs(10)),
        "the guard did not kill the VM of a vmhad that is gone"
    );
    let status = bed.guard.wait().unwrap();
    assert!(status.success(), "the guard exits once it fenced: {status}");
}

#[test]
fn a_hung_vmhad_gets_its_vms_killed_before_its_lease_expires() {
    // vmhad still holds the pipe open but sends nothing: hung.
    let mut bed = Bed::new(2_000, 4_000);
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(bed.qemu_alive(), "killed before the fence deadline");
    assert!(
        bed.qemu_dies_within(Duration::from_secs(10)),
        "the guard did not kill the VM of a hung vmhad"
    );
    assert!(
        bed.guard.try_wait().unwrap().is_none(),
        "the guard keeps watching while vmhad is there"
    );
}

#[test]
fn a_guard_told_nothing_kills_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let paths = VmPaths::new(dir.path(), "vm1").unwrap();
    std::fs::create_dir_all(paths.qmp.parent().unwrap()).unwrap();
    let mut qemu = Command::new("sh")
        .arg("-c")
        .arg("while :; do sleep 0.1; done")
        .arg(&paths.qmp)
        .spawn()
        .unwrap();
    // The VM and the rule but no renewal, and garbage: no deadline is known.
    let mut guard = Command::new(env!("CARGO_BIN_EXE_vmhad"))
        .arg("--fence-guard")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = guard.stdin.take().unwrap();
    writeln!(
        stdin,
        "epoch 1\nfence-after 1\nvms\nvm {}",
        paths.qmp.display()
    )
    .unwrap();
    writeln!(stdin, "renewed soon\n\u{0}\u{7f}garbage").unwrap();
    drop(stdin);
    let status = guard.wait().unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(qemu.try_wait().unwrap().is_none(), "killed on no deadline");
    qemu.kill().unwrap();
    qemu.wait().unwrap();
}
