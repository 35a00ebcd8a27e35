//! The optional hardware watchdog, against a plain file standing in for the device (never a
//! real watchdog: it would reset the test machine): vmhad writes to it while its core loop is
//! alive, stops when vmhad hangs, and a clean exit disarms it with the magic `V`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Vmhad;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn the_watchdog_is_fed_while_vmhad_lives_and_disarmed_on_exit() {
    let mut h = Vmhad::new(&[]);
    let dog = h.config.with_file_name("watchdog");
    std::fs::write(&dog, b"").unwrap();
    let config = std::fs::read_to_string(&h.config).unwrap().replace(
        "name = \"kvm1\"\n",
        &format!(
            "name = \"kvm1\"\nwatchdog = \"{}\"\nwatchdog_timeout = \"4s\"\n",
            dog.display()
        ),
    );
    std::fs::write(&h.config, config).unwrap();
    h.start();
    std::thread::sleep(Duration::from_secs(3));
    let fed = size(&dog);
    assert!(fed >= 2, "not fed: {fed} bytes in 3 s");

    // vmhad hangs (stopped): nothing feeds the device any more.
    kill(Pid::from_raw(h.pid()), Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let at_hang = size(&dog);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(size(&dog), at_hang, "fed while vmhad hung");
    kill(Pid::from_raw(h.pid()), Signal::SIGCONT).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(size(&dog) > at_hang, "not fed again after vmhad resumed");

    // A clean exit disarms it.
    let status = h.signal_and_wait(Signal::SIGTERM);
    assert!(status.success());
    assert_eq!(std::fs::read(&dog).unwrap().last(), Some(&b'V'));
}
