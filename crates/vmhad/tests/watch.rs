//! The watch and batched probes with the real TCG test guest (issue 14): a killed app is
//! detected through the watch (its interval is an hour, so nothing else can see it), the
//! watcher waiting with the guest's `pidwait`, running the app's check itself and ringing the
//! VM's doorbell, and restarted,
//! then watched again with its new pid; a watcher killed in the guest (SIGKILL) is started
//! again with no app event, and the new one ends the old one's `pidwait`s; three apps at the
//! same interval cost one guest-exec per probe.
//!
//! Counts come from `guest_io` in `GET /v1/status`. Tests wait for states, never for time.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Vmhad, WAIT, latency, now_ms, vm_test_lock};
use serde_json::Value;

const VM: &str = "shop";

/// The demo VM with its apps checked every `interval`, each naming its pid file when `watch`.
fn config(h: &Vmhad, interval: &str, watch: bool) {
    let mut vm =
        common::demo_vm(VM).replace(r#"interval = "1s""#, &format!("interval = \"{interval}\""));
    if watch {
        for app in ["db", "web", "worker"] {
            let check = format!(r#"check = ["/opt/demo/app", "check", "{app}"]"#);
            vm = vm.replace(
                &check,
                &format!("{check}\npid_file = \"/run/demo/{app}.pid\""),
            );
        }
        vm = vm.replace(
            r#"boot_timeout = "90s""#,
            "boot_timeout = \"90s\"\nwatch_period = \"200ms\"",
        );
    } else {
        vm = vm.replace(
            r#"boot_timeout = "90s""#,
            "boot_timeout = \"90s\"\nwatch = false",
        );
    }
    let config = common::cluster_config(h.config.parent().unwrap(), &[vm]);
    std::fs::write(&h.config, config).unwrap();
}

/// Starts vmhad and waits until the VM and its apps are online.
fn boot(h: &mut Vmhad) -> usize {
    h.start();
    let (i, _) = h.wait_for(0, VM, "starting", "online");
    let states = h.app_states(VM);
    assert!(states.iter().all(|(_, s)| s == "online"), "{states:?}");
    i
}

fn guest_io(h: &Vmhad) -> Value {
    h.status()["guest_io"].clone()
}

fn counter(h: &Vmhad, name: &str) -> u64 {
    guest_io(h)[name].as_u64().unwrap()
}

/// Waits until `counter` is at least `at_least`; fails the test after [`WAIT`].
fn wait_counter(h: &mut Vmhad, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = counter(h, name);
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "guest_io.{name} stayed at {n} (< {at_least}): {}",
            h.log_tail(40)
        );
        h.assert_running();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the guest's current watcher, from its pid file, once the file names a pid other
/// than `not`. vmhad counts a watcher when it starts it; the watcher writes the file a moment
/// later, so right after the count the file may be missing or still name the one before.
fn watcher_pid(h: &Vmhad, not: Option<&str>) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = h.exec(VM, &["/bin/cat", "/run/vmha-watch.pid"]);
        let text = out["stdout"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        let is_pid = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        if is_pid && not != Some(text.as_str()) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the watcher pid file still reads {text:?} (not wanted: {not:?}): {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the guest runs `want` `pidwait`s of the watcher with pid `watcher` (found by
/// the fifo files on their command lines).
fn wait_pidwaits_of(h: &Vmhad, watcher: &str, want: usize) {
    let script = format!(
        "for p in $(pidof pidwait); do tr '\\0' ' ' </proc/$p/cmdline; echo; done \
         | grep -c 'vmha-watch.{watcher}.fifo'"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let out = h.exec(VM, &["/bin/sh", "-c", &script]);
        let n = out["stdout"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        if n == want.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "watcher {watcher}: {n:?} pidwaits, not {want}: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_killed_app_is_detected_through_the_watch_restarted_and_watched_again() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&[VM]);
    config(&h, "1h", true);
    boot(&mut h);
    wait_counter(&mut h, "watchers", 1);
    for round in 1..=2 {
        // The test guest has procps `pidwait`: the watcher waits with it (no tick loop).
        let deadline = Instant::now() + WAIT;
        while h.exec(VM, &["/bin/pidof", "pidwait"])["exit"].as_i64() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "round {round}: no pidwait in the guest"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mark = h.mark();
        let rings = counter(&h, "watch_rings");
        let t = now_ms();
        assert_eq!(h.app(VM, "kill", "web"), 0);
        let (i, detected) = h.wait_for(mark, &format!("{VM}/web"), "online", "restarting");
        // The watcher rang its end on the VM's doorbell: vmhad asked at once, not at a poll.
        let rung = counter(&h, "watch_rings");
        assert!(rung > rings, "round {round}: no ring ({rings} → {rung})");
        // The watcher ran web's check itself the moment it saw the process gone: no probe.
        assert!(
            detected
                .reason
                .starts_with("check exited 3: checked by the watch"),
            "{}",
            detected.text
        );
        let (_, back) = h.wait_for(i, &format!("{VM}/web"), "restarting", "online");
        latency(
            &format!("watch: app kill → detected (round {round})"),
            t,
            detected.time,
        );
        latency(
            &format!("watch: app kill → running again (round {round})"),
            t,
            back.time,
        );
        // Only web moved; the VM was left alone.
        let others: Vec<_> = h
            .since(mark)
            .into_iter()
            .filter(|e| e.origin != "controller" && e.object != format!("{VM}/web"))
            .collect();
        assert!(others.is_empty(), "unexpected events: {others:?}");
    }
}

#[test]
fn a_killed_watcher_is_started_again_without_an_app_event() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&[VM]);
    config(&h, "1h", true);
    boot(&mut h);
    let watchers = wait_counter(&mut h, "watchers", 1);
    let first = watcher_pid(&h, None);
    // Killed with SIGKILL once its pidwaits (one per app) run: they outlive it.
    wait_pidwaits_of(&h, &first, 3);
    let mark = h.mark();
    let out = h.exec(VM, &["/bin/sh", "-c", &format!("kill -9 {first}")]);
    assert_eq!(out["exit"].as_i64(), Some(0), "{out}");
    wait_counter(&mut h, "watchers", watchers + 1);
    let second = watcher_pid(&h, Some(&first));
    let alive = h.exec(VM, &["/bin/sh", "-c", &format!("kill -0 {second}")]);
    assert_eq!(
        alive["exit"].as_i64(),
        Some(0),
        "new watcher {second}: {alive}"
    );
    // The new watcher ended the killed one's pidwaits.
    wait_pidwaits_of(&h, &first, 0);
    let events = h.since(mark);
    assert!(
        events.is_empty(),
        "a killed watcher made events: {events:?}"
    );
    // The new watcher works: a killed app is still detected (its interval is an hour).
    assert_eq!(h.app(VM, "kill", "db"), 0);
    h.wait_for(mark, &format!("{VM}/db"), "online", "restarting");
}

#[test]
fn three_apps_at_the_same_interval_cost_one_guest_exec_per_probe() {
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&[VM]);
    config(&h, "1s", false);
    boot(&mut h);
    // Start-up probes come one app at a time; from the first grid point on, all together.
    let start = counter(&h, "probes");
    wait_counter(&mut h, "probes", start + 2);
    let before = guest_io(&h);
    let probes = before["probes"].as_u64().unwrap();
    wait_counter(&mut h, "probes", probes + 10);
    let io = guest_io(&h);
    let p = io["probes"].as_u64().unwrap() - probes;
    let c = io["checks"].as_u64().unwrap() - before["checks"].as_u64().unwrap();
    assert!(p >= 10);
    assert_eq!(c, 3 * p, "{p} probes carried {c} checks: {before} → {io}");
    assert_eq!(io["watchers"].as_u64(), Some(0), "watch = false: {io}");
}

/// A guest that writes its doorbell without pause (a hostile or broken guest) wakes vmhad at
/// most once per doorbell gap (100 ms), and gets about the polls of a guest without a
/// doorbell: an "ended" ring brings a poll at once and five quick retries (10 to 160 ms), then
/// ten polls one `watch_period` (200 ms) apart, before a ring counts again. The watch still
/// works.
#[test]
fn a_guest_flooding_its_doorbell_gets_bounded_polls_and_the_watch_still_works() {
    const GAP_MS: u64 = 100;
    const PERIOD_MS: u64 = 200;
    let _lock = vm_test_lock();
    let mut h = Vmhad::new(&[VM]);
    config(&h, "1h", true);
    boot(&mut h);
    wait_counter(&mut h, "watchers", 1);
    // Holds the port (one writer at a time): the watcher's own rings fail while it floods.
    let flood = r#"for f in /sys/class/virtio-ports/*/name; do
        read -r n <"$f"; [ "$n" = org.vmha.watch.0 ] && { f=${f%/name}; port=/dev/${f##*/}; }
    done
    [ -c "$port" ] || exit 9
    (while :; do echo gaggle; done) >"$port" </dev/null 2>&1 &
    echo $! >/run/flood.pid"#;
    let out = h.exec(VM, &["/bin/sh", "-c", flood]);
    assert_eq!(out["exit"].as_i64(), Some(0), "{out}");
    let start = Instant::now();
    let polls = counter(&h, "watch_polls");
    let rings = counter(&h, "watch_rings");
    std::thread::sleep(Duration::from_secs(3));
    let (polls, rings) = (
        counter(&h, "watch_polls") - polls,
        counter(&h, "watch_rings") - rings,
    );
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap();
    assert!(rings >= 5, "the flood did not ring: {rings} rings");
    assert!(rings <= ms / GAP_MS + 2, "{rings} rings in {ms} ms");
    // A ring's sequence lasts 310 + 10 × 200 ms: six quick polls each, else one per period.
    let sequences = ms / 2_310 + 1;
    assert!(
        polls <= 6 * sequences + ms / PERIOD_MS + 2,
        "{polls} polls ({rings} rings) in {ms} ms"
    );
    let mark = h.mark();
    assert_eq!(h.app(VM, "kill", "worker"), 0);
    h.wait_for(mark, &format!("{VM}/worker"), "online", "restarting");
    let out = h.exec(VM, &["/bin/sh", "-c", "kill $(cat /run/flood.pid)"]);
    assert_eq!(out["exit"].as_i64(), Some(0), "{out}");
}
