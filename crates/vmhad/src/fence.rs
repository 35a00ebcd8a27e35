//! Self-fencing (SPEC §4.6): a host whose lease has not been renewed for `ttl - fence_margin`
//! kills its HA VMs, before the store can expire the lease anywhere else.
//!
//! The deadline runs from when the last *acknowledged* renewal was **sent**, on a monotonic
//! clock: a lease lives at least `ttl` from that moment, so the kills land at least
//! `fence_margin` before any other host may assume the VMs are gone.
//!
//! The kill path is a dedicated OS thread that owns nothing but atomics and the VMs' socket
//! paths: no lock of a VM slot, no async runtime, no store call can hold it up. It finds each
//! VM's QEMU by its command line (the VM's QMP socket path) and SIGKILLs it; while fenced it
//! keeps killing whatever QEMU of those VMs appears (a start already under way), until a
//! lease is held again. Not fenced, it sleeps until the deadline (an idle host's fence costs
//! next to nothing), woken early by whatever changes what it must do.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmha_qemu::VmPaths;

/// How often the fenced thread looks for QEMUs of its VMs to kill (a start already under way).
const TICK: Duration = Duration::from_millis(20);
/// How often the thread feeds a hardware watchdog (whose timeout is at least 2 s).
const FEED: Duration = Duration::from_millis(250);
/// The longest the thread sleeps otherwise (it wakes at the deadline itself, and at once when
/// the watchdog is attached, the lease is held again or vmhad stops).
const IDLE: Duration = Duration::from_secs(1);
/// The longest an unarmed fence (the embedded store: it never fires) sleeps: whatever could
/// give it work (a watchdog attached, vmhad stopping) wakes it.
const UNARMED_IDLE: Duration = Duration::from_secs(3600);

/// When a host fences itself.
#[derive(Debug, Clone, Copy)]
pub enum FenceRule {
    /// Never: the embedded store, no other host can take a VM over.
    Never,
    /// `margin` before the lease could expire: no renewal acknowledged for `lease_ttl - margin`.
    BeforeExpiry {
        /// The lease's TTL as the store holds it.
        lease_ttl: Duration,
        /// How long before the lease could expire the VMs are dead.
        margin: Duration,
    },
}

/// The state shared by the lease keeper (renewals), the VM slots (may a VM start?) and the
/// fence thread.
#[derive(Debug)]
pub struct Fence {
    epoch: Instant,
    /// The system-wide monotonic clock at `epoch`, in ms (for the fence guard).
    epoch_mono: u64,
    /// The fence guard's stdin, while one watches (etcd clusters).
    guard: std::sync::Mutex<Option<GuardLink>>,
    /// Milliseconds since `epoch` at which the last acknowledged renewal was sent.
    renewal_sent_ms: AtomicU64,
    fence_after: Duration,
    /// The lease's TTL (the fence guard kills a hung vmhad's VMs between the two).
    lease_ttl: Duration,
    armed: bool,
    fenced: AtomicBool,
    stop: AtomicBool,
    vms: RwLock<Vec<VmPaths>>,
    killed: AtomicU64,
    /// Milliseconds since `epoch` of the core loop's last sign of life.
    core_seen_ms: AtomicU64,
    /// The hardware watchdog, when configured.
    watchdog: std::sync::Mutex<Option<crate::watchdog::Watchdog>>,
    /// The fence thread, once spawned (woken early by [`Fence::wake`]).
    thread: std::sync::OnceLock<std::thread::Thread>,
    /// How many times the thread has looked (woken up).
    looks: AtomicU64,
}

impl Fence {
    /// A fence that kills the QEMUs of `vms` by `rule` (its deadline counted from now: the
    /// lease was just granted).
    pub fn new(rule: FenceRule, vms: Vec<VmPaths>) -> Arc<Fence> {
        let (fence_after, lease_ttl, armed) = match rule {
            FenceRule::Never => (Duration::MAX, Duration::MAX, false),
            FenceRule::BeforeExpiry { lease_ttl, margin } => {
                (lease_ttl.saturating_sub(margin), lease_ttl, true)
            }
        };
        Arc::new(Fence {
            lease_ttl,
            epoch_mono: crate::guard::monotonic_ms(),
            guard: std::sync::Mutex::new(None),
            epoch: Instant::now(),
            renewal_sent_ms: AtomicU64::new(0),
            fence_after,
            armed,
            fenced: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            vms: RwLock::new(vms),
            killed: AtomicU64::new(0),
            core_seen_ms: AtomicU64::new(0),
            watchdog: std::sync::Mutex::new(None),
            thread: std::sync::OnceLock::new(),
            looks: AtomicU64::new(0),
        })
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// A renewal sent at `sent` was acknowledged: the deadline moves to `sent + fence_after`
    /// (the fence guard hears of it at once). Does not lift a fence (see [`Fence::rearm`]).
    pub fn renewed(&self, sent: Instant) {
        self.renewal_sent_ms
            .fetch_max(self.ms(sent), Ordering::SeqCst);
        self.tell_guard();
    }

    /// A lease is held again (its grant or first renewal was sent at `sent`): VMs may run.
    /// The fence guard hears of it first.
    pub fn rearm(&self, sent: Instant) {
        self.renewal_sent_ms.store(self.ms(sent), Ordering::SeqCst);
        self.tell_guard();
        if self.fenced.swap(false, Ordering::SeqCst) {
            tracing::warn!("lease held again: fence lifted, VMs may be started again");
        }
        self.wake();
    }

    /// The lease ended while the fence had not fired (the machine was suspended and the
    /// monotonic clock stood still): fences now and kills this host's VMs before returning.
    pub fn lost(&self) {
        if !self.armed {
            return;
        }
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!("host lease ended before the fence fired: killing this host's VMs");
        }
        self.kill_all();
        // Fenced: the thread keeps killing what appears.
        self.wake();
    }

    /// Writes the last acknowledged renewal to the fence guard (if any, and if new).
    fn tell_guard(&self) {
        if let Ok(mut g) = self.guard.lock()
            && let Some(link) = g.as_mut()
        {
            link.renewed(self.renewal_sent_ms.load(Ordering::SeqCst));
        }
    }

    /// The core loop is alive (it calls this every turn, and at least every second).
    pub fn core_alive(&self) {
        self.core_seen_ms
            .store(self.ms(Instant::now()), Ordering::SeqCst);
    }

    /// Feeds `watchdog` from the fence thread while the core loop is alive and, when armed, the
    /// lease is not so overdue that a reset after the device's timeout could land after the
    /// lease expired elsewhere.
    pub fn attach_watchdog(&self, watchdog: crate::watchdog::Watchdog) {
        self.core_alive();
        if let Ok(mut w) = self.watchdog.lock() {
            *w = Some(watchdog);
        }
        self.wake();
    }

    /// Whether the hardware watchdog may be fed now.
    fn may_feed(&self, now: Instant, timeout: Duration) -> bool {
        let now_ms = self.ms(now);
        let core_age = now_ms.saturating_sub(self.core_seen_ms.load(Ordering::SeqCst));
        // A core silent for half the timeout is taken for hung: stop feeding, the device
        // resets the host.
        if Duration::from_millis(core_age) > timeout / 2 {
            return false;
        }
        if !self.armed {
            return true;
        }
        let since = now_ms.saturating_sub(self.renewal_sent_ms.load(Ordering::SeqCst));
        Duration::from_millis(since) + timeout < self.fence_after
    }

    /// Whether the host has fenced itself (and not held a lease since).
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Whether a VM may be started now: not fenced and the deadline not passed.
    pub fn may_run(&self) -> bool {
        !self.fenced() && !self.overdue(Instant::now())
    }

    fn overdue(&self, now: Instant) -> bool {
        if !self.armed {
            return false;
        }
        let since = self
            .ms(now)
            .saturating_sub(self.renewal_sent_ms.load(Ordering::SeqCst));
        Duration::from_millis(since) >= self.fence_after
    }

    /// How many QEMU processes fencing has killed so far.
    #[cfg(test)]
    pub fn killed(&self) -> u64 {
        self.killed.load(Ordering::Relaxed)
    }

    /// How many times the fence thread has woken up so far.
    #[cfg(test)]
    pub fn looks(&self) -> u64 {
        self.looks.load(Ordering::Relaxed)
    }

    /// Replaces the VMs this host may run (after a configuration change).
    pub fn set_vms(&self, vms: Vec<VmPaths>) {
        if let Ok(mut g) = self.guard.lock()
            && let Some(link) = g.as_mut()
        {
            link.vms(&vms);
        }
        if let Ok(mut v) = self.vms.write() {
            *v = vms;
        }
    }

    /// Hands the fence over to a guard process when vmhad is gone (see [`crate::guard`]):
    /// tells it the deadline rule and the VMs; then every acknowledged renewal.
    ///
    /// The pipe is non-blocking: a guard that stops reading is given up on (logged), it never
    /// holds up the fence.
    pub fn attach_guard(&self, stdin: std::process::ChildStdin) {
        use std::os::fd::AsFd;
        let flags = nix::fcntl::fcntl(stdin.as_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map(nix::fcntl::OFlag::from_bits_truncate);
        let nonblocking = flags.and_then(|f| {
            nix::fcntl::fcntl(
                stdin.as_fd(),
                nix::fcntl::FcntlArg::F_SETFL(f | nix::fcntl::OFlag::O_NONBLOCK),
            )
        });
        let mut link = GuardLink {
            stdin,
            written: u64::MAX,
            broken: false,
        };
        if let Err(e) = nonblocking {
            tracing::error!("cannot make the fence guard's pipe non-blocking ({e}): not using it");
            link.broken = true;
        }
        link.line(&format!("epoch {}", self.epoch_mono));
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        link.line(&format!("fence-after {}", ms(self.fence_after)));
        link.line(&format!("lease-ttl {}", ms(self.lease_ttl)));
        if let Ok(v) = self.vms.read() {
            link.vms(&v);
        }
        link.renewed(self.renewal_sent_ms.load(Ordering::SeqCst));
        if let Ok(mut g) = self.guard.lock() {
            *g = Some(link);
        }
    }

    /// Stops the fence thread (the daemon exits cleanly: the watchdog is disarmed; VMs left
    /// running are the fence guard's).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut w) = self.watchdog.lock()
            && let Some(w) = w.take()
        {
            w.disarm();
        }
        self.wake();
    }

    /// Wakes the fence thread (if spawned) to look at the state now.
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Starts the fence thread.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let fence = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("vmhad-fence".into())
            .spawn(move || fence.run())?;
        let _ = self.thread.set(handle.thread().clone());
        Ok(handle)
    }

    fn run(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            self.looks.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            if !self.fenced() && self.overdue(now) {
                self.fenced.store(true, Ordering::SeqCst);
                tracing::error!(
                    after = ?self.fence_after,
                    "host lease not renewed in time: self-fencing, killing this host's VMs"
                );
            }
            if self.fenced() {
                self.kill_all();
            }
            let mut nap = self.nap(now);
            if let Ok(mut w) = self.watchdog.lock()
                && let Some(dog) = w.as_mut()
            {
                if self.may_feed(now, dog.timeout()) {
                    dog.feed();
                }
                nap = nap.min(FEED);
            }
            // Woken early by `wake`; a spurious wake-up only looks again.
            std::thread::park_timeout(nap);
        }
    }

    /// How long the thread may sleep after looking at `now`: fenced, a [`TICK`]; armed,
    /// until the deadline (a renewal only moves it later), at most [`IDLE`]; unarmed,
    /// [`UNARMED_IDLE`].
    fn nap(&self, now: Instant) -> Duration {
        if self.fenced() {
            return TICK;
        }
        if !self.armed {
            return UNARMED_IDLE;
        }
        let deadline = self
            .renewal_sent_ms
            .load(Ordering::SeqCst)
            .saturating_add(u64::try_from(self.fence_after.as_millis()).unwrap_or(u64::MAX));
        let left = Duration::from_millis(deadline.saturating_sub(self.ms(now)));
        // Milliseconds are rounded down: one more, so it wakes past the deadline, not before.
        (left + Duration::from_millis(1)).min(IDLE)
    }

    fn kill_all(&self) {
        let vms: Vec<VmPaths> = match self.vms.read() {
            Ok(v) => v.clone(),
            Err(_) => return,
        };
        for paths in vms {
            let qmp = &paths.qmp;
            for pid in vmha_qemu::qemu_processes(&paths) {
                let Ok(raw) = i32::try_from(pid) else {
                    continue;
                };
                let target = nix::unistd::Pid::from_raw(raw);
                match nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
                    Ok(()) => {
                        self.killed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(pid, qmp = %qmp.display(), "self-fencing: QEMU killed");
                    }
                    Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => tracing::error!(pid, "self-fencing: cannot kill QEMU: {e}"),
                }
            }
        }
    }
}

/// The write end of the fence guard's stdin.
#[derive(Debug)]
struct GuardLink {
    stdin: std::process::ChildStdin,
    /// The last renewal written.
    written: u64,
    broken: bool,
}

impl GuardLink {
    fn line(&mut self, line: &str) {
        use std::io::Write;
        if self.broken {
            return;
        }
        // One write per line: below PIPE_BUF it is all or nothing, so a full pipe never
        // leaves half a line behind.
        if let Err(e) = self.stdin.write_all(format!("{line}\n").as_bytes()) {
            tracing::error!(
                "the fence guard is gone or not reading ({e}): vmhad's VMs lose their fence \
                 when vmhad stops"
            );
            self.broken = true;
        }
    }

    fn vms(&mut self, vms: &[VmPaths]) {
        self.line("vms");
        for v in vms {
            self.line(&format!("vm {}", v.qmp.display()));
        }
    }

    fn renewed(&mut self, ms: u64) {
        if ms != self.written {
            self.written = ms;
            self.line(&format!("renewed {ms}"));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A rule that fences `ms` after the last renewal.
    fn rule(ms: u64) -> FenceRule {
        FenceRule::BeforeExpiry {
            lease_ttl: Duration::from_millis(ms + 100),
            margin: Duration::from_millis(100),
        }
    }

    #[test]
    fn the_deadline_runs_from_the_send_time_of_the_last_acknowledged_renewal() {
        let fence = Fence::new(rule(200), Vec::new());
        let start = Instant::now();
        assert!(fence.may_run());
        // A renewal sent 150 ms ago and acknowledged just now buys only 50 ms more.
        fence.renewed(start);
        std::thread::sleep(Duration::from_millis(210));
        assert!(
            !fence.may_run(),
            "overdue 200 ms after the renewal was sent"
        );
        // An older acknowledgement never moves the deadline back.
        fence.renewed(start);
        assert!(!fence.may_run());
        fence.rearm(Instant::now());
        assert!(fence.may_run());
    }

    /// A stand-in "QEMU" of VM `vm1` under `dir`: a process whose command line names the VM's
    /// QMP socket, visible in /proc when this returns.
    fn stand_in(dir: &std::path::Path) -> (VmPaths, std::process::Child) {
        let paths = VmPaths::new(dir, "vm1").unwrap();
        std::fs::create_dir_all(paths.qmp.parent().unwrap()).unwrap();
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg("while :; do sleep 0.2; done")
            .arg(&paths.qmp)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while vmha_qemu::qemu_processes(&paths).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        (paths, child)
    }

    #[test]
    fn a_lease_found_ended_kills_at_once_even_before_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, mut child) = stand_in(dir.path());
        let fence = Fence::new(rule(60_000), vec![paths]);
        assert!(fence.may_run());
        fence.lost();
        assert!(fence.fenced());
        assert!(!child.wait().unwrap().success(), "killed, not exited");
        fence.rearm(Instant::now());
        assert!(fence.may_run(), "a new lease lifts it");
    }

    #[test]
    fn a_guard_that_stops_reading_never_blocks_the_fence() {
        // A "guard" that never reads its stdin: the pipe fills up.
        let mut guard = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let fence = Fence::new(rule(60_000), Vec::new());
        fence.attach_guard(guard.stdin.take().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let vms: Vec<VmPaths> = (0..50)
            .map(|i| VmPaths::new(dir.path(), &format!("vm{i}")).unwrap())
            .collect();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = Arc::clone(&fence);
        std::thread::spawn(move || {
            // Far more than a pipe holds (64 KiB).
            for _ in 0..200 {
                writer.set_vms(vms.clone());
                writer.rearm(Instant::now());
            }
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "writing to a guard that does not read blocked"
        );
        guard.kill().unwrap();
        guard.wait().unwrap();
    }

    #[test]
    fn an_unarmed_fence_never_fences() {
        let fence = Fence::new(FenceRule::Never, Vec::new());
        std::thread::sleep(Duration::from_millis(5));
        assert!(fence.may_run());
        // Nothing to watch for: it sleeps until woken (the hourly look is a safety net).
        assert_eq!(fence.nap(Instant::now()), UNARMED_IDLE);
        assert!(fence.nap(Instant::now()) > IDLE);
    }

    #[test]
    fn an_idle_fence_thread_sleeps_and_stops_when_told() {
        // Unarmed (embedded store): it looks once and sleeps; shutdown wakes it to stop.
        let fence = Fence::new(FenceRule::Never, Vec::new());
        let thread = fence.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        fence.shutdown();
        thread.join().unwrap();
        assert!(fence.looks() <= 2, "woke {} times", fence.looks());
        // Armed with a deadline far off: it sleeps too (a renewal does not wake it).
        let fence = Fence::new(rule(60_000), Vec::new());
        let thread = fence.spawn().unwrap();
        fence.renewed(Instant::now());
        std::thread::sleep(Duration::from_millis(300));
        fence.shutdown();
        thread.join().unwrap();
        assert!(fence.looks() <= 2, "woke {} times", fence.looks());
        assert!(!fence.fenced());
    }

    #[test]
    fn the_thread_fences_and_kills_a_matching_process() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, mut child) = stand_in(dir.path());
        let fence = Fence::new(rule(100), vec![paths]);
        let thread = fence.spawn().unwrap();
        let status = child.wait().unwrap();
        assert!(fence.fenced());
        assert!(!status.success(), "killed, not exited");
        // The fence counts a kill once kill(2) has returned, which may be after the child's
        // wait() above has already seen it die: wait for the count, boundedly.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fence.killed() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(fence.killed() >= 1, "the kill was not counted");
        fence.shutdown();
        thread.join().unwrap();
    }
}
