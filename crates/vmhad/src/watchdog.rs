//! The optional hardware watchdog (`[[host]] watchdog = "/dev/watchdog"`, SPEC §4.6): vmhad
//! opens the device, sets its timeout to `watchdog_timeout` where the driver supports it, and
//! the fence thread writes to it about once a second while the core loop is alive and the
//! lease is not overdue (see `Fence::may_feed`). A hung or crashed vmhad stops feeding and the
//! device resets the host; a clean exit disarms it (the "magic close": `V`, then close), the
//! fence guard then looks after the VMs left running.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the device is written to while feeding is allowed.
const FEED_EVERY: Duration = Duration::from_secs(1);

/// An open watchdog device.
#[derive(Debug)]
pub struct Watchdog {
    file: File,
    path: PathBuf,
    timeout: Duration,
    last_feed: Option<Instant>,
}

/// Why the watchdog could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the watchdog {path}: {source}")]
pub struct WatchdogError {
    path: PathBuf,
    source: std::io::Error,
}

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, nix::libc::c_int);
nix::ioctl_read!(wdioc_gettimeout, b'W', 7, nix::libc::c_int);

impl Watchdog {
    /// Opens `path` (which arms a real device) and asks the driver for `timeout`; the device's
    /// actual timeout is what [`Watchdog::timeout`] then returns.
    pub fn open(path: &Path, timeout: Duration) -> Result<Watchdog, WatchdogError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|source| WatchdogError {
                path: path.to_path_buf(),
                source,
            })?;
        let mut dog = Watchdog {
            file,
            path: path.to_path_buf(),
            timeout,
            last_feed: None,
        };
        dog.timeout = dog.set_timeout();
        Ok(dog)
    }

    /// Asks the driver for the configured timeout (WDIOC_SETTIMEOUT) and returns the one the
    /// device actually has: what the driver wrote back (it may round), else what it reports
    /// (WDIOC_GETTIMEOUT) when it does not take a timeout; the configured one only when it
    /// says neither (logged).
    fn set_timeout(&self) -> Duration {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let mut secs = nix::libc::c_int::try_from(self.timeout.as_secs()).unwrap_or(60);
        // SAFETY: `file` is an open descriptor for the whole call and `secs` a live c_int the
        // ioctl reads and writes back, as WDIOC_SETTIMEOUT's contract says.
        #[allow(unsafe_code)]
        let set = unsafe { wdioc_settimeout(fd, &mut secs) };
        if let Err(e) = set {
            tracing::warn!(path = %self.path.display(), "the watchdog does not take a timeout ({e})");
            // SAFETY: as above; WDIOC_GETTIMEOUT writes one c_int.
            #[allow(unsafe_code)]
            let get = unsafe { wdioc_gettimeout(fd, &mut secs) };
            if let Err(e) = get {
                tracing::warn!(
                    path = %self.path.display(),
                    "nor says its timeout ({e}): assuming {:?}",
                    self.timeout
                );
                return self.timeout;
            }
        }
        match u64::try_from(secs) {
            Ok(s) if s > 0 => {
                tracing::info!(path = %self.path.display(), secs, "hardware watchdog armed");
                Duration::from_secs(s)
            }
            _ => self.timeout,
        }
    }

    /// The device's timeout (see [`Watchdog::open`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Writes to the device if the last write is a second old (any byte but `V` feeds it).
    pub fn feed(&mut self) {
        if self.last_feed.is_some_and(|t| t.elapsed() < FEED_EVERY) {
            return;
        }
        self.last_feed = Some(Instant::now());
        if let Err(e) = self.file.write_all(b"\0").and_then(|()| self.file.flush()) {
            tracing::error!(path = %self.path.display(), "feeding the watchdog failed: {e}");
        }
    }

    /// Disarms it: the magic close (`V`, then close).
    pub fn disarm(mut self) {
        if let Err(e) = self.file.write_all(b"V") {
            tracing::warn!(path = %self.path.display(), "disarming the watchdog: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn feeding_writes_at_most_once_a_second_and_disarming_writes_v() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        std::fs::write(&path, b"").unwrap();
        let mut dog = Watchdog::open(&path, Duration::from_secs(10)).unwrap();
        dog.feed();
        dog.feed();
        assert_eq!(
            std::fs::read(&path).unwrap().len(),
            1,
            "fed twice within a second"
        );
        dog.disarm();
        assert_eq!(std::fs::read(&path).unwrap().last(), Some(&b'V'));
    }
}
