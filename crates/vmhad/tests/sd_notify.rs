//! vmhad under a fake systemd: a datagram socket named by `NOTIFY_SOCKET` (an abstract name,
//! as systemd's own) hears `READY=1` after start, `WATCHDOG=1` pings while the core loop runs
//! and none while it hangs (the debug-build hook `VMHAD_TEST_HANG_CORE` blocks the core loop
//! only, not the process), `RELOADING=1` then `READY=1` around SIGHUP, `STOPPING=1` on SIGTERM.
//! Its log, journald's input, is plain text.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use common::Vmhad;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The hang guard of every wait (not a performance bound).
const WAIT: Duration = Duration::from_secs(60);

struct FakeSystemd(UnixDatagram);

impl FakeSystemd {
    /// The next notification, or `None` if none came within `within`.
    fn next(&self, within: Duration) -> Option<String> {
        self.0.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        match self.0.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8(buf[..n].to_vec()).unwrap()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("receiving: {e}"),
        }
    }

    /// Waits for a notification whose first line is `first` (skipping watchdog pings).
    fn wait_for(&self, first: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {first} from vmhad");
            if let Some(msg) = self.next(left) {
                if msg.lines().next() == Some(first) {
                    return msg;
                }
                assert_eq!(
                    msg, "WATCHDOG=1",
                    "unexpected notification while waiting for {first}"
                );
            }
        }
    }
}

#[test]
fn vmhad_speaks_the_notify_and_watchdog_protocol() {
    let name = format!("vmhad-notify-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let systemd = FakeSystemd(UnixDatagram::bind_addr(&addr).unwrap());
    let mut h = Vmhad::new(&[]);
    let hang = h.config.with_file_name("hang-core");
    // A 400 ms watchdog: pings every 200 ms.
    let interval = Duration::from_millis(400);
    h.env = vec![
        ("NOTIFY_SOCKET".into(), format!("@{name}")),
        ("WATCHDOG_USEC".into(), interval.as_micros().to_string()),
        ("VMHAD_TEST_HANG_CORE".into(), hang.display().to_string()),
    ];
    h.start();
    assert_eq!(systemd.wait_for("READY=1"), "READY=1\nSTATUS=running");
    for _ in 0..3 {
        assert_eq!(systemd.next(WAIT).as_deref(), Some("WATCHDOG=1"));
    }

    // The core loop hangs: the pings stop (once the one already decided has arrived), while
    // the process itself still runs.
    std::fs::write(&hang, b"").unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match systemd.next(interval * 4) {
            None => break,
            Some(msg) => assert_eq!(msg, "WATCHDOG=1"),
        }
        assert!(
            Instant::now() < deadline,
            "vmhad kept pinging with its core hung"
        );
    }
    h.assert_running();
    assert_eq!(
        systemd.next(interval * 4),
        None,
        "pinged with the core hung"
    );
    // The core runs again: so do the pings.
    std::fs::remove_file(&hang).unwrap();
    assert_eq!(systemd.next(WAIT).as_deref(), Some("WATCHDOG=1"));

    // SIGHUP: reloading, then ready again.
    kill(Pid::from_raw(h.pid()), Signal::SIGHUP).unwrap();
    let reloading = systemd.wait_for("RELOADING=1");
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    assert_eq!(systemd.wait_for("READY=1"), "READY=1\nSTATUS=running");

    // A bad file on SIGHUP changes nothing, and ends the reload as well.
    std::fs::write(&h.config, "[cluster\n").unwrap();
    kill(Pid::from_raw(h.pid()), Signal::SIGHUP).unwrap();
    systemd.wait_for("RELOADING=1");
    systemd.wait_for("READY=1");

    // SIGTERM: stopping, and a clean exit.
    let pid = Pid::from_raw(h.pid());
    kill(pid, Signal::SIGTERM).unwrap();
    systemd.wait_for("STOPPING=1");
    assert!(h.signal_and_wait(Signal::SIGCONT).success());
}

#[test]
fn without_notify_socket_a_watchdog_interval_alone_changes_nothing() {
    let mut h = Vmhad::new(&[]);
    // A watchdog interval alone (no socket) is ignored.
    h.env = vec![("WATCHDOG_USEC".into(), "400000".into())];
    h.start();
    assert!(h.signal_and_wait(Signal::SIGTERM).success());
}

/// Under systemd vmhad's stderr goes to journald, not a terminal (here: a file): plain text,
/// no colour codes for `journalctl` to show as `[34mDEBUG[0m`.
#[test]
fn a_log_that_is_not_a_terminal_gets_plain_text() {
    let mut h = Vmhad::new(&[]);
    h.start();
    assert!(h.signal_and_wait(Signal::SIGTERM).success());
    let log = h.log_tail(1000);
    assert!(log.contains("vmhad running"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log}");
}
