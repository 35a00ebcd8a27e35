//! vmhad's files under careless set-ups: a damaged or empty store, an inherited umask 000,
//! state/runtime dirs that others can write or that belong to another user, something planted at
//! the API socket path. Each is refused with an error naming the path and the fix, and nothing is
//! changed; or, for the umask, everything vmhad creates is private anyway.
//!
//! Only `umask_000_leaves_the_vm_files_private` starts a VM (run it under the heavy-test lock);
//! the others start no QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{WAIT, cluster_config, demo_vm, http, processes_naming};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A tempdir with a config (embedded store, host `kvm1`) holding `vms` ([`demo_vm`]s).
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    run: PathBuf,
}

impl Setup {
    fn new(vms: &[&str]) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("vmhad-files.")
            .tempdir_in("/tmp")
            .unwrap();
        let sections: Vec<String> = vms.iter().map(|v| demo_vm(v)).collect();
        let config = dir.path().join("vmha.toml");
        std::fs::write(&config, cluster_config(dir.path(), &sections)).unwrap();
        Setup {
            state: dir.path().join("state"),
            run: dir.path().join("run"),
            config,
            dir,
        }
    }

    fn store(&self) -> PathBuf {
        self.state.join("store.redb")
    }

    fn socket(&self) -> PathBuf {
        self.state.join("vmhad.sock")
    }

    /// vmhad with this setup's config and dirs, started from a shell with `umask`.
    fn command(&self, umask: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_vmhad"))
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--runtime-dir")
            .arg(&self.run)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }

    /// Runs vmhad expecting it to refuse to start; returns its stderr.
    fn refused(&self, extra: &[&str]) -> String {
        let child = self
            .command("022", extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kills vmhad and its QEMUs should it start after all.
        let mut guard = Running {
            child,
            run: self.run.clone(),
        };
        let status = wait_exit(&mut guard.child);
        let mut stderr = String::new();
        guard
            .child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!status.success(), "vmhad started: {stderr}");
        assert!(
            processes_naming(&self.run.display().to_string()).is_empty(),
            "no QEMU was started"
        );
        stderr
    }

    /// Starts vmhad (logs to a file) and waits until its API answers.
    fn start(&self, umask: &str, extra: &[&str]) -> Running {
        let log = std::fs::File::create(self.dir.path().join("vmhad.log")).unwrap();
        let mut child = self.command(umask, extra).stderr(log).spawn().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("vmhad exited: {status}\n{}", self.log());
            }
            if UnixStream::connect(self.socket()).is_ok() {
                let (code, _) = http(&self.socket(), "GET", "/v1/status", None);
                assert_eq!(code, 200);
                return Running {
                    child,
                    run: self.run.clone(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "vmhad's API never came up\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vmhad.log")).unwrap_or_default()
    }
}

/// A running vmhad: stopped (and every QEMU of its runtime dir killed) on drop.
struct Running {
    child: Child,
    run: PathBuf,
}

impl Running {
    fn stop(mut self) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        wait_exit(&mut self.child)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in processes_naming(&self.run.display().to_string()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Waits for `child` to exit (a hang guard, not a timing assertion).
fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmhad did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn make_dir(path: &Path, mode: u32) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, PermissionsExt::from_mode(mode)).unwrap();
}

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_mentions(stderr: &str, needles: &[&str]) {
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing in:\n{stderr}");
    }
}

/// A 0-byte store (a crashed copy, a full disk) used to start vmhad with empty state, forgetting
/// frozen VMs. Now it, and a damaged store, are refused with the file's name and how to
/// recover; the file is left as it was and no VM is started.
#[test]
fn an_empty_or_damaged_store_is_refused_and_left_as_it_is() {
    let damaged: [(&str, Vec<u8>); 3] = [
        ("empty", Vec::new()),
        ("garbage", vec![0x5a; 64 * 1024]),
        ("a text file", b"[cluster]\nname = \"x\"\n".to_vec()),
    ];
    for (kind, bytes) in damaged {
        let s = Setup::new(&["shop"]);
        make_dir(&s.state, 0o700);
        std::fs::write(s.store(), &bytes).unwrap();
        let stderr = s.refused(&[]);
        assert_mentions(
            &stderr,
            &[
                &s.store().display().to_string(),
                "left as it is",
                "restore a backup",
                "remove it to start with an empty store",
                "frozen VMs",
            ],
        );
        assert_eq!(std::fs::read(s.store()).unwrap(), bytes, "{kind}: changed");
        assert_eq!(entries(&s.state), ["store.redb"], "{kind}: nothing added");
    }
}

/// Under umask 000 everything vmhad creates is still private: state and runtime dirs 0700, the
/// store 0600, the API socket 0600.
#[test]
fn umask_000_leaves_the_state_private() {
    let s = Setup::new(&[]);
    let vmhad = s.start("000", &[]);
    assert_eq!(mode(&s.state), 0o700, "state dir");
    assert_eq!(mode(&s.run), 0o700, "runtime dir");
    assert_eq!(mode(&s.store()), 0o600, "store");
    assert_eq!(mode(&s.socket()), 0o600, "API socket");
    assert!(vmhad.stop().success());
    assert_eq!(mode(&s.store()), 0o600, "store after a clean stop");
}

/// A state or runtime dir that others can write (where anyone could plant a socket), or that
/// belongs to another user, is refused with its path and the fix, and left as it is: no store,
/// no socket.
#[test]
fn unsafe_state_and_runtime_dirs_are_refused_and_left_as_they_are() {
    for (which, mode_bits) in [("state", 0o777), ("state", 0o770), ("runtime", 0o777)] {
        let s = Setup::new(&[]);
        let dir = if which == "state" { &s.state } else { &s.run };
        make_dir(dir, mode_bits);
        let stderr = s.refused(&[]);
        assert_mentions(
            &stderr,
            &[
                &format!("{which} dir"),
                &format!("chmod 700 {}", dir.display()),
            ],
        );
        assert_eq!(mode(dir), mode_bits, "{which}: mode changed");
        assert!(entries(dir).is_empty(), "{which}: something was created");
        assert!(!s.store().exists(), "{which}: a store was created");
    }

    // Owned by another user (nobody): refused even though its mode is 0700.
    let s = Setup::new(&[]);
    make_dir(&s.state, 0o700);
    nix::unistd::chown(&s.state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let stderr = s.refused(&[]);
    assert_mentions(
        &stderr,
        &[&s.state.display().to_string(), "belongs to uid 65534"],
    );
    assert_eq!(std::fs::metadata(&s.state).unwrap().uid(), 65534);
    assert!(entries(&s.state).is_empty());

    // Under a world-writable, non-sticky parent: someone could swap the whole dir.
    let mut s = Setup::new(&[]);
    let parent = s.dir.path().join("shared");
    make_dir(&parent, 0o777);
    s.state = parent.join("state");
    let stderr = s.refused(&[]);
    assert_mentions(&stderr, &[&parent.display().to_string(), "chmod go-w"]);
    assert!(entries(&parent).is_empty(), "nothing was created");

    // A symlink instead of the dir.
    let s = Setup::new(&[]);
    let real = s.dir.path().join("real");
    make_dir(&real, 0o700);
    std::os::unix::fs::symlink(&real, &s.state).unwrap();
    let stderr = s.refused(&[]);
    assert_mentions(&stderr, &["is a symlink"]);
    assert!(entries(&real).is_empty());
}

/// Something planted at the API socket path is never replaced: a socket someone listens on (the
/// impostor keeps its socket and nobody's commands reach a vmhad), a file. A stale socket left by
/// an earlier vmhad is replaced.
#[test]
fn a_planted_socket_is_refused_and_a_stale_one_replaced() {
    let s = Setup::new(&[]);
    make_dir(&s.state, 0o700);
    let impostor = UnixListener::bind(s.socket()).unwrap();
    let stderr = s.refused(&[]);
    assert_mentions(
        &stderr,
        &[&s.socket().display().to_string(), "a process is listening"],
    );
    let _client = UnixStream::connect(s.socket()).unwrap();
    impostor.set_nonblocking(true).unwrap();
    assert!(
        impostor.accept().is_ok(),
        "the impostor still has its socket"
    );
    assert!(!s.store().exists(), "refused before opening the store");
    drop(impostor);

    // Stale (nobody listens): replaced, and vmhad serves on it.
    let vmhad = s.start("022", &[]);
    assert!(vmhad.stop().success());

    // A regular file at the socket path.
    std::fs::write(s.socket(), b"not a socket").unwrap();
    let stderr = s.refused(&[]);
    assert_mentions(&stderr, &["is not a socket", "left as it is"]);
    assert_eq!(std::fs::read(s.socket()).unwrap(), b"not a socket");
}

/// `--api-group` gives one group the API socket (0660) and a way into a state dir vmhad creates
/// (0710); an unknown group is refused before anything is created.
#[test]
fn the_api_group_is_the_only_way_in_for_others() {
    let s = Setup::new(&[]);
    let stderr = s.refused(&["--api-group", "no-such-group-vmha"]);
    assert_mentions(&stderr, &["no-such-group-vmha", "no such group"]);
    assert!(!s.state.exists() && !s.run.exists(), "nothing was created");

    let vmhad = s.start("000", &["--api-group", "nogroup"]);
    let gid = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    assert_eq!(mode(&s.socket()), 0o660);
    assert_eq!(std::fs::metadata(s.socket()).unwrap().gid(), gid);
    assert_eq!(mode(&s.state), 0o710);
    assert_eq!(std::fs::metadata(&s.state).unwrap().gid(), gid);
    assert_eq!(mode(&s.store()), 0o600, "the store stays private");
    assert_eq!(mode(&s.run), 0o700, "the runtime dir stays private");
    assert!(vmhad.stop().success());
}

/// With a VM, under umask 000: the VM's runtime dir is 0700 and its QMP and guest agent sockets,
/// pidfile and logs are private (a QEMU is started: run under the heavy-test lock).
#[test]
fn umask_000_leaves_the_vm_files_private() {
    let _lock = common::vm_test_lock();
    let s = Setup::new(&["shop"]);
    let _vmhad = s.start("000", &[]);
    let vm_dir = s.run.join("shop");
    let files = [
        "qmp.sock",
        "qga.sock",
        "qemu.pid",
        "console.log",
        "qemu.log",
    ];
    let deadline = Instant::now() + WAIT;
    while !files.iter().all(|f| vm_dir.join(f).exists()) {
        assert!(
            Instant::now() < deadline,
            "the VM's files never appeared: {:?}\n{}",
            std::fs::read_dir(&vm_dir).map(|_| entries(&vm_dir)),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode(&vm_dir), 0o700, "VM runtime dir");
    for f in files {
        let m = mode(&vm_dir.join(f));
        assert_eq!(m & 0o077, 0, "{f} is accessible to others: {m:o}");
    }
}
