//! systemd's service notification protocol (`sd_notify(3)`), for `Type=notify` units: one
//! datagram per state change (`READY=1`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`) to the
//! Unix datagram socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written `@name`).
//! Without `$NOTIFY_SOCKET` (vmhad not started by systemd) every call does nothing.
//!
//! The watchdog (`WatchdogSec=` in the unit, `$WATCHDOG_USEC` here): a thread sends
//! `WATCHDOG=1` every half interval, but only when the core loop turned since the previous
//! check ([`CoreBeat`]): a hung core stops the pings and systemd restarts vmhad.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where notifications go: `$NOTIFY_SOCKET`'s socket, or nowhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

/// Why `$NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The variable is neither an absolute path nor `@name`.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract socket name (@name)")]
    BadAddress(String),
    /// The address or the socket could not be made.
    #[error("NOTIFY_SOCKET={0:?}: {1}")]
    Io(String, std::io::Error),
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for (a bad value is logged and ignored: vmhad still
    /// runs, only systemd will not hear of it).
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        match Notifier::to(&value.to_string_lossy()) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("not notifying systemd: {e}");
                Notifier { target: None }
            }
        }
    }

    /// A notifier for `address`: an absolute path, or `@name` for an abstract socket.
    pub fn to(address: &str) -> Result<Notifier, NotifyError> {
        let io = |e| NotifyError::Io(address.to_string(), e);
        let addr = if let Some(name) = address.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(address).map_err(io)?
        } else {
            return Err(NotifyError::BadAddress(address.to_string()));
        };
        let socket = UnixDatagram::unbound().map_err(io)?;
        Ok(Notifier {
            target: Some((socket, addr)),
        })
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines); a failure is logged, never fatal.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(state.as_bytes(), addr)
        {
            tracing::warn!(
                "notifying systemd ({}) failed: {e}",
                state.replace('\n', " ")
            );
        }
    }

    /// Start-up is done: the store is open, the VMs are adopted, the API answers.
    pub fn ready(&self) {
        self.notify("READY=1\nSTATUS=running");
    }

    /// A configuration reload starts (SIGHUP); [`Notifier::ready`] ends it.
    pub fn reloading(&self) {
        self.notify(&format!(
            "RELOADING=1\nSTATUS=reloading the configuration\nMONOTONIC_USEC={}",
            monotonic_usec()
        ));
    }

    /// Shutdown starts.
    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=stopping");
    }
}

/// CLOCK_MONOTONIC in microseconds (what `RELOADING=1` is stamped with).
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let micros = u64::try_from(t.tv_nsec() / 1000).unwrap_or(0);
        secs.saturating_mul(1_000_000).saturating_add(micros)
    })
}

/// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`), if it is meant for
/// this process (`$WATCHDOG_PID` unset or this pid).
pub fn watchdog_interval() -> Option<Duration> {
    interval_for(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// The interval `usec` and `pid` (the two variables) give process `me`: none when `usec` is
/// missing, malformed or 0, or when `pid` names another process.
fn interval_for(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The heartbeat of a core no watchdog watches.
pub const UNWATCHED: Duration = Duration::from_secs(60);

/// The core loop's turn counter: the core calls [`CoreBeat::turn`] every turn (at least every
/// [`CoreBeat::period`]), the watchdog thread reads it.
#[derive(Debug)]
pub struct CoreBeat {
    turns: AtomicU64,
    period: Duration,
}

impl CoreBeat {
    /// The longest the core may go without a turn: a second, or a quarter of systemd's
    /// `watchdog` interval when that is shorter (so a live core turns between two checks, which
    /// are half an interval apart). With no watchdog at all — neither systemd's nor a hardware
    /// one (`hardware`) — nothing reads the turns and the core turns only when it has work (a
    /// heartbeat every [`UNWATCHED`], so an idle host is not woken every second for nothing).
    pub fn new(watchdog: Option<Duration>, hardware: bool) -> Arc<CoreBeat> {
        let period = match watchdog {
            Some(w) => (w / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            None if hardware => Duration::from_secs(1),
            None => UNWATCHED,
        };
        Arc::new(CoreBeat {
            turns: AtomicU64::new(0),
            period,
        })
    }

    /// How often the core must turn at least (its heartbeat).
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The core loop turned.
    pub fn turn(&self) {
        self.turns.fetch_add(1, Ordering::Relaxed);
    }

    fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }
}

/// One watchdog check: pings when the core turned since the previous check.
#[derive(Debug)]
struct Pinger {
    notifier: Arc<Notifier>,
    beat: Arc<CoreBeat>,
    seen: u64,
    hung: bool,
}

impl Pinger {
    fn new(notifier: Arc<Notifier>, beat: Arc<CoreBeat>) -> Pinger {
        let seen = beat.turns();
        Pinger {
            notifier,
            beat,
            seen,
            hung: false,
        }
    }

    /// Sends `WATCHDOG=1` if the core turned since the last check; `true` if it did.
    fn check(&mut self) -> bool {
        let now = self.beat.turns();
        let turned = now != self.seen;
        self.seen = now;
        if turned {
            if self.hung {
                tracing::warn!("the core loop turns again: pinging systemd's watchdog");
                self.hung = false;
            }
            self.notifier.notify("WATCHDOG=1");
        } else if !self.hung {
            tracing::error!("the core loop made no progress: not pinging systemd's watchdog");
            self.hung = true;
        }
        turned
    }
}

/// Starts the thread that checks every `interval / 2` whether the core turned and then pings
/// systemd's watchdog; it lives as long as the process.
pub fn spawn_watchdog(
    notifier: Arc<Notifier>,
    interval: Duration,
    beat: Arc<CoreBeat>,
) -> std::io::Result<()> {
    let every = interval / 2;
    tracing::info!(
        ?interval,
        "systemd watchdog: pinging while the core loop turns"
    );
    let mut pinger = Pinger::new(notifier, beat);
    std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                pinger.check();
            }
        })
        .map(drop)
}

/// Test hook, in debug builds only: while the file named by `$VMHAD_TEST_HANG_CORE` exists,
/// the core loop blocks here (as a core stuck in a blocking call would), so that tests can
/// watch the watchdog pings stop without stopping the whole process.
#[cfg(debug_assertions)]
pub fn test_hang_point() {
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    if let Some(file) =
        FILE.get_or_init(|| std::env::var_os("VMHAD_TEST_HANG_CORE").map(Into::into))
    {
        while file.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn notifications_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        Notifier::to(path.to_str().unwrap()).unwrap().ready();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=running");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vmhad-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::to(&format!("@{name}")).unwrap().stopping();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn a_relative_or_empty_address_is_refused() {
        for bad in ["", "notify.sock", "./x"] {
            assert!(
                matches!(Notifier::to(bad), Err(NotifyError::BadAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn reloading_is_stamped_with_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        Notifier::to(path.to_str().unwrap()).unwrap().reloading();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let usec: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(text.starts_with("RELOADING=1\n") && usec > 0, "{text}");
    }

    #[test]
    fn the_watchdog_interval_is_for_this_process_only() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(interval_for(Some("30000000"), None, 7), ms(30_000));
        assert_eq!(interval_for(Some("400000"), Some("7"), 7), ms(400));
        assert_eq!(interval_for(Some("400000"), Some("8"), 7), None);
        assert_eq!(interval_for(Some("400000"), Some("x"), 7), None);
        assert_eq!(interval_for(None, Some("7"), 7), None);
        assert_eq!(interval_for(Some("0"), None, 7), None);
        assert_eq!(interval_for(Some("-5"), None, 7), None);
        assert_eq!(interval_for(Some("soon"), None, 7), None);
    }

    #[test]
    fn the_core_turns_at_least_four_times_per_watchdog_interval() {
        assert_eq!(CoreBeat::new(None, true).period(), Duration::from_secs(1));
        assert_eq!(CoreBeat::new(None, false).period(), UNWATCHED);
        for hardware in [false, true] {
            assert_eq!(
                CoreBeat::new(Some(Duration::from_secs(30)), hardware).period(),
                Duration::from_secs(1)
            );
            assert_eq!(
                CoreBeat::new(Some(Duration::from_secs(2)), hardware).period(),
                Duration::from_millis(500)
            );
        }
    }

    #[test]
    fn a_check_pings_only_when_the_core_turned_since_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let notifier = Arc::new(Notifier::to(path.to_str().unwrap()).unwrap());
        let beat = CoreBeat::new(None, false);
        let mut pinger = Pinger::new(notifier, Arc::clone(&beat));
        let mut buf = [0u8; 64];
        let mut pings = || {
            let mut n = 0;
            while let Ok(len) = listener.recv(&mut buf) {
                assert_eq!(&buf[..len], b"WATCHDOG=1");
                n += 1;
            }
            n
        };
        assert!(!pinger.check(), "pinged before the core turned");
        beat.turn();
        beat.turn();
        assert!(pinger.check());
        assert_eq!(pings(), 1);
        // The core hangs: no ping, check after check.
        assert!(!pinger.check());
        assert!(!pinger.check());
        assert_eq!(pings(), 0);
        // It turns again.
        beat.turn();
        assert!(pinger.check());
        assert_eq!(pings(), 1);
    }

    #[test]
    fn the_watchdog_thread_pings_while_the_core_turns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Arc::new(Notifier::to(path.to_str().unwrap()).unwrap());
        let beat = CoreBeat::new(None, false);
        spawn_watchdog(notifier, Duration::from_millis(40), Arc::clone(&beat)).unwrap();
        std::thread::spawn(move || {
            loop {
                beat.turn();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let n = listener.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
    }
}
