//! One libvirt domain: adopted by name, or defined from an XML file; started, shut down,
//! destroyed, and observed.
//!
//! Every operation is idempotent (starting a running domain, shutting down or destroying one
//! that is not running succeed without doing anything) and bounded in time: libvirt calls run
//! on tokio's blocking pool under [`CALL_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::sys;
use vmha_model::{PauseReason, VmObservation};

use crate::events::{Subscription, ensure_loop};

/// Bound on one libvirt call (libvirt's own RPC has none).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a stop checks whether the domain is down yet.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Errors of the libvirt driver, local to one VM.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// libvirt failed (connection, lookup, a domain operation).
    #[error("libvirt ({what}) for domain {domain}: {detail}")]
    Libvirt {
        /// The domain.
        domain: String,
        /// The operation.
        what: &'static str,
        /// libvirt's message.
        detail: String,
    },
    /// The domain does not exist and no `xml` is configured to define it.
    #[error("libvirt domain {0} does not exist (define it, or set `xml` in [vm.libvirt])")]
    NoDomain(String),
    /// Reading the domain XML file failed.
    #[error("reading domain XML {path}: {source}")]
    Xml {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A libvirt call did not return within [`CALL_TIMEOUT`].
    #[error("libvirt ({what}) for domain {domain} did not answer within {CALL_TIMEOUT:?}")]
    Timeout {
        /// The domain.
        domain: String,
        /// The operation.
        what: &'static str,
    },
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The domain was not running.
    AlreadyStopped,
    /// The guest shut down (agent or ACPI).
    Graceful,
    /// It was destroyed after the timeout.
    Destroyed,
}

/// The libvirt connection and the domain's event subscription (re-opened after a failure).
/// Dropping it deregisters the callbacks, then closes the connection.
struct Link {
    conn: Connect,
    events: Option<Subscription>,
}

impl Drop for Link {
    fn drop(&mut self) {
        drop(self.events.take());
        let _ = self.conn.close();
    }
}

/// One libvirt domain. Cheap to clone (shared).
#[derive(Clone)]
pub struct Domain {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    name: String,
    xml: Option<PathBuf>,
    link: Mutex<Option<Link>>,
    events: mpsc::UnboundedSender<VmObservation>,
}

impl Domain {
    /// A handle on domain `name` at `uri` (connected lazily, reconnected after a failure);
    /// `xml` defines the domain when it does not exist. Observations from libvirt's events
    /// arrive on the returned channel, for as long as the handle lives.
    pub fn new(
        uri: &str,
        name: &str,
        xml: Option<&Path>,
    ) -> (Domain, mpsc::UnboundedReceiver<VmObservation>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let domain = Domain {
            inner: Arc::new(Inner {
                uri: uri.to_string(),
                name: name.to_string(),
                xml: xml.map(Path::to_path_buf),
                link: Mutex::new(None),
                events: tx,
            }),
        };
        (domain, rx)
    }

    /// The domain name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Runs `f` on the domain (looked up now) on the blocking pool, under [`CALL_TIMEOUT`].
    /// `define` defines the domain from its XML first when it does not exist.
    async fn with<T: Send + 'static>(
        &self,
        what: &'static str,
        define: bool,
        f: impl FnOnce(Option<&virt::domain::Domain>) -> Result<T, CallError> + Send + 'static,
    ) -> Result<T, DomainError> {
        let inner = Arc::clone(&self.inner);
        let name = self.inner.name.clone();
        let task = tokio::task::spawn_blocking(move || inner.call(what, define, f));
        match tokio::time::timeout(CALL_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(DomainError::Libvirt {
                domain: name,
                what,
                detail: join.to_string(),
            }),
            Err(_) => Err(DomainError::Timeout { domain: name, what }),
        }
    }

    /// The domain's state, as it is: running, paused with its reason, stopped, or gone (not
    /// defined, or shut off). A libvirt that does not answer is [`VmObservation::Unresponsive`].
    pub async fn status(&self) -> VmObservation {
        match self
            .with("get state", false, |d| {
                Ok(d.map(|d| d.get_state()).transpose()?)
            })
            .await
        {
            Ok(Some((state, reason))) => observation(state, reason),
            Ok(None) => VmObservation::Gone,
            Err(e) => {
                tracing::debug!(domain = %self.inner.name, "status: {e}");
                VmObservation::Unresponsive
            }
        }
    }

    /// True if the domain runs (or is paused); false if it is shut off or not defined.
    pub async fn is_active(&self) -> Result<bool, DomainError> {
        self.with("is active", false, |d| match d {
            Some(d) => Ok(d.is_active()?),
            None => Ok(false),
        })
        .await
    }

    /// Starts the domain (defining it from its XML if it does not exist); `Ok` at once if it
    /// already runs.
    pub async fn start(&self) -> Result<(), DomainError> {
        self.with("start", true, |d| match d {
            Some(d) if d.is_active()? => Ok(()),
            Some(d) => Ok(d.create().map(|_| ())?),
            None => no_domain(),
        })
        .await
    }

    /// Shuts the domain down gracefully (guest agent, then ACPI), destroys it if it still
    /// runs after `timeout`; `Ok` once it is shut off.
    pub async fn stop(&self, timeout: Duration) -> Result<StopOutcome, DomainError> {
        if !self.is_active().await? {
            return Ok(StopOutcome::AlreadyStopped);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // The agent first (the guest shuts down cleanly); ACPI when the agent cannot. Both
        // requests are bounded by the stop's own deadline.
        let asked = tokio::time::timeout_at(
            deadline,
            self.with("shutdown (agent)", false, |d| match d {
                Some(d) => Ok(d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)?),
                None => Ok(0),
            }),
        )
        .await;
        if !matches!(asked, Ok(Ok(_))) {
            tracing::debug!(domain = %self.inner.name, "agent shutdown failed ({asked:?}); trying ACPI");
            let acpi = tokio::time::timeout_at(
                deadline,
                self.with("shutdown (ACPI)", false, |d| match d {
                    Some(d) => Ok(d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)?),
                    None => Ok(0),
                }),
            )
            .await;
            if !matches!(acpi, Ok(Ok(_))) {
                tracing::debug!(domain = %self.inner.name, "ACPI shutdown failed ({acpi:?})");
            }
        }
        while tokio::time::Instant::now() < deadline {
            if !self.is_active().await? {
                return Ok(StopOutcome::Graceful);
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        self.destroy().await?;
        Ok(StopOutcome::Destroyed)
    }

    /// Destroys (forcibly stops) the domain; `Ok` once it is shut off, also when it was.
    pub async fn destroy(&self) -> Result<(), DomainError> {
        self.with("destroy", false, |d| match d {
            Some(d) if d.is_active()? => Ok(d.destroy()?),
            _ => Ok(()),
        })
        .await
    }

    /// Sends one guest agent command (JSON text) through libvirt, waiting at most
    /// `timeout_s` seconds for the agent; the agent's reply as libvirt returns it.
    pub(crate) async fn agent_command(
        &self,
        command: String,
        timeout_s: i32,
    ) -> Result<String, DomainError> {
        self.with("agent command", false, move |d| match d {
            Some(d) => Ok(d.qemu_agent_command(&command, timeout_s, 0)?),
            None => no_domain(),
        })
        .await
    }
}

/// Why a call on the looked-up domain failed.
enum CallError {
    /// libvirt's error.
    Virt(virt::error::Error),
    /// The domain is not defined.
    NoDomain,
}

impl From<virt::error::Error> for CallError {
    fn from(e: virt::error::Error) -> Self {
        CallError::Virt(e)
    }
}

/// The error a call on a missing domain gets.
fn no_domain<T>() -> Result<T, CallError> {
    Err(CallError::NoDomain)
}

impl Inner {
    /// Looks the domain up (connecting first if needed) and runs `f` on it; `None` to `f`
    /// when the domain is not defined (and `define` is false or no XML is configured).
    fn call<T>(
        &self,
        what: &'static str,
        define: bool,
        f: impl FnOnce(Option<&virt::domain::Domain>) -> Result<T, CallError>,
    ) -> Result<T, DomainError> {
        let err = |detail: String| DomainError::Libvirt {
            domain: self.name.clone(),
            what,
            detail,
        };
        // The lock is held only to (re)connect and take a reference on the connection: calls
        // on one domain do not wait for each other (a destroy for an agent call, say).
        let mut conn = {
            let mut link = self.link.lock().map_err(|e| err(e.to_string()))?;
            if link
                .as_ref()
                .is_none_or(|l| !l.conn.is_alive().unwrap_or(false))
            {
                // The old link (if any) goes first: callbacks deregistered, connection closed.
                *link = None;
                *link = Some(self.connect().map_err(err)?);
            }
            match link.as_ref() {
                Some(l) => l.conn.clone(),
                None => return Err(err("not connected".into())),
            }
        };
        let result = self.on_domain(&conn, define, f, &err);
        let _ = conn.close();
        result
    }

    /// Looks the domain up on `conn` (defining it from its XML when asked and configured) and
    /// runs `f` on it.
    fn on_domain<T>(
        &self,
        conn: &Connect,
        define: bool,
        f: impl FnOnce(Option<&virt::domain::Domain>) -> Result<T, CallError>,
        err: &dyn Fn(String) -> DomainError,
    ) -> Result<T, DomainError> {
        let domain = match virt::domain::Domain::lookup_by_name(conn, &self.name) {
            Ok(d) => Some(d),
            Err(e) if e.code() == virt::error::ErrorNumber::NoDomain => None,
            Err(e) => return Err(err(e.to_string())),
        };
        let domain = match (domain, define, &self.xml) {
            (None, true, Some(path)) => {
                let xml = std::fs::read_to_string(path).map_err(|source| DomainError::Xml {
                    path: path.clone(),
                    source,
                })?;
                let d =
                    virt::domain::Domain::define_xml(conn, &xml).map_err(|e| err(e.to_string()))?;
                tracing::info!(domain = %self.name, xml = %path.display(), "defined libvirt domain");
                Some(d)
            }
            (None, true, None) => return Err(DomainError::NoDomain(self.name.clone())),
            (d, _, _) => d,
        };
        f(domain.as_ref()).map_err(|e| match e {
            CallError::Virt(e) => err(e.to_string()),
            CallError::NoDomain => DomainError::NoDomain(self.name.clone()),
        })
    }

    fn connect(&self) -> Result<Link, String> {
        ensure_loop()?;
        let conn = Connect::open(Some(&self.uri)).map_err(|e| e.to_string())?;
        let events = Subscription::new(&conn, &self.name, self.events.clone())?;
        Ok(Link {
            conn,
            events: Some(events),
        })
    }
}

/// A domain state and its reason (`virDomainGetState`) as an observation.
pub fn observation(state: sys::virDomainState, reason: i32) -> VmObservation {
    let reason = u32::try_from(reason).unwrap_or(u32::MAX);
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => VmObservation::Running,
        sys::VIR_DOMAIN_PAUSED => VmObservation::Paused {
            reason: match reason {
                sys::VIR_DOMAIN_PAUSED_USER => PauseReason::Admin,
                sys::VIR_DOMAIN_PAUSED_MIGRATION
                | sys::VIR_DOMAIN_PAUSED_POSTCOPY
                | sys::VIR_DOMAIN_PAUSED_POSTCOPY_FAILED => PauseReason::Migration,
                sys::VIR_DOMAIN_PAUSED_SAVE
                | sys::VIR_DOMAIN_PAUSED_DUMP
                | sys::VIR_DOMAIN_PAUSED_SNAPSHOT
                | sys::VIR_DOMAIN_PAUSED_FROM_SNAPSHOT => PauseReason::Snapshot,
                sys::VIR_DOMAIN_PAUSED_IOERROR => PauseReason::IoError,
                sys::VIR_DOMAIN_PAUSED_WATCHDOG => PauseReason::Watchdog,
                sys::VIR_DOMAIN_PAUSED_CRASHED => PauseReason::GuestPanicked,
                sys::VIR_DOMAIN_PAUSED_STARTING_UP => PauseReason::Prelaunch,
                _ => PauseReason::Other,
            },
        },
        sys::VIR_DOMAIN_PMSUSPENDED => VmObservation::Paused {
            reason: PauseReason::Suspended,
        },
        sys::VIR_DOMAIN_SHUTDOWN => VmObservation::Stopped { by_guest: false },
        sys::VIR_DOMAIN_CRASHED => VmObservation::Panicked,
        // Shut off (whatever the reason) or no state: nothing runs.
        _ => VmObservation::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_as_they_are() {
        assert_eq!(
            observation(sys::VIR_DOMAIN_RUNNING, 1),
            VmObservation::Running
        );
        assert_eq!(
            observation(sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_USER as i32),
            VmObservation::Paused {
                reason: PauseReason::Admin
            }
        );
        assert_eq!(
            observation(
                sys::VIR_DOMAIN_PAUSED,
                sys::VIR_DOMAIN_PAUSED_IOERROR as i32
            ),
            VmObservation::Paused {
                reason: PauseReason::IoError
            }
        );
        assert_eq!(
            observation(sys::VIR_DOMAIN_PAUSED, -1),
            VmObservation::Paused {
                reason: PauseReason::Other
            }
        );
        assert_eq!(observation(sys::VIR_DOMAIN_SHUTOFF, 2), VmObservation::Gone);
        assert_eq!(
            observation(sys::VIR_DOMAIN_CRASHED, 1),
            VmObservation::Panicked
        );
        assert_eq!(observation(99, 0), VmObservation::Gone);
    }
}
