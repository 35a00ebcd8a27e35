//! A process started inside a host's namespace, with its output in a log file.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A process started by [`Testbed::spawn`](crate::Testbed::spawn) inside a host's network
/// namespace. Its stdout and stderr both go to one log file under the testbed directory, its
/// stdin is `/dev/null`.
///
/// The process is this test process's child: until it is reaped (by [`Proc::wait`],
/// [`Proc::try_wait`], [`Proc::is_running`] or drop) its pid cannot be reused, so signals
/// sent through a `Proc` never hit another process. A killed but unreaped `Proc` is a zombie.
/// Dropping a `Proc` SIGKILLs the process if it still runs and reaps it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pid: u32,
    host: String,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn new(child: Child, host: &str, log: PathBuf) -> Self {
        Self {
            pid: child.id(),
            child,
            host: host.to_owned(),
            log,
        }
    }

    /// The process id (the program's own pid: no wrapper process sits in between).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The host whose namespace the process was started in.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The file holding the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote so far to stdout and stderr (lossy UTF-8; empty if the
    /// log cannot be read, e.g. once the testbed and its directory are gone). Meant for test
    /// failure messages.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of [`Proc::log`].
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// Sends `signal` to the process if it has not been reaped yet (a no-op afterwards: the pid
    /// may belong to someone else by then). A zombie accepts and ignores signals.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let raw = i32::try_from(self.pid).context("pid out of range")?;
        match kill(Pid::from_raw(raw), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("sending {signal} to pid {}", self.pid)),
        }
    }

    /// Sends SIGKILL (see [`Proc::signal`]); does not wait: the process stays a zombie until
    /// it is reaped.
    pub fn kill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Sends SIGTERM (see [`Proc::signal`]); does not wait.
    pub fn terminate(&mut self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Reaps the process if it has exited: `Some(status)` once it has (and on every later
    /// call), `None` while it runs (a stopped process runs).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for pid {}", self.pid))
    }

    /// Blocks until the process exits and reaps it.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.child
            .wait()
            .with_context(|| format!("waiting for pid {}", self.pid))
    }

    /// Waits at most `timeout` for the process to exit: `Some(status)` if it did (it is then
    /// reaped), `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILLs the process and waits for it to end; returns how it ended.
    pub fn kill_and_wait(&mut self) -> Result<ExitStatus> {
        self.kill()?;
        self.wait()
    }

    /// Whether the process has not exited yet; reaps it if it has (a zombie has exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
