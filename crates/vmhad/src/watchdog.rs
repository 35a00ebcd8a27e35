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

impl Watchdog {
    /// Opens `path` (which arms a real device) and asks the driver for `timeout`.
    pub fn open(path: &Path, timeout: Duration) -> Result<Watchdog, WatchdogError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .append(true)
            .open(path)
            .map_err(|source| WatchdogError {
                path: path.to_path_buf(),
                source,
            })?;
        let dog = Watchdog {
            file,
            path: path.to_path_buf(),
            timeout,
            last_feed: None,
        };
        dog.set_timeout();
        Ok(dog)
    }

    /// Asks the driver for the configured timeout (WDIOC_SETTIMEOUT); a device or file that
    /// does not take it keeps its own (logged).
    fn set_timeout(&self) {
        use std::os::fd::AsRawFd;
        let mut secs = nix::libc::c_int::try_from(self.timeout.as_secs()).unwrap_or(60);
        // SAFETY: `file` is an open descriptor for the whole call and `secs` a live c_int the
        // ioctl reads and writes back, as WDIOC_SETTIMEOUT's contract says.
        #[allow(unsafe_code)]
        let result = unsafe { wdioc_settimeout(self.file.as_raw_fd(), &mut secs) };
        match result {
            Ok(_) => tracing::info!(path = %self.path.display(), secs, "hardware watchdog armed"),
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                "the watchdog does not take a timeout ({e}): its own timeout applies"
            ),
        }
    }

    /// The timeout it was opened with.
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
        assert_eq!(std::fs::read(&path).unwrap().len(), 1, "fed twice within a second");
        dog.disarm();
        assert_eq!(std::fs::read(&path).unwrap().last(), Some(&b'V'));
    }
}
