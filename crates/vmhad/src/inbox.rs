//! The core's inbox: one bounded queue that every input of the core goes through, and the
//! typed handles that leaf modules get instead of the queue itself — a VM slot can only send
//! hypervisor and guest observations, the store follower only records, and so on. No leaf
//! module knows the core.

use tokio::sync::{mpsc, oneshot};
use vmha_api::{ConfigApplied, SnapshotView, StatusView};
use vmha_engine::{ActionId, AdminCommand, CommandError, HostInput, Record};
use vmha_model::Name;

/// How many inputs may wait for the core. Producers wait when it is full (backpressure):
/// nothing is dropped, nothing grows without bound.
pub const CAPACITY: usize = 1024;

/// A command another host forwarded to this one through the cluster store.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its id (the key's last segment; also the key of its reply).
    pub id: String,
    /// Its key in the store.
    pub key: String,
    /// The key's `mod_revision` (the commit that answers it must find it unchanged).
    pub revision: u64,
    /// For the controller (`true`) or for this host.
    pub for_controller: bool,
    /// The command.
    pub command: AdminCommand,
}

/// An input of the core.
#[derive(Debug)]
pub enum Msg {
    /// An observation or result of this host's driver.
    Host(HostInput),
    /// Records of the cluster store (a full listing, or changes).
    Records {
        /// The records.
        records: Vec<Record>,
        /// A complete listing.
        full: bool,
    },
    /// Forwarded commands seen in the store (`gone`: requests that no longer exist).
    Requests {
        /// New requests.
        new: Vec<Request>,
        /// Ids of requests deleted (answered or withdrawn).
        gone: Vec<String>,
    },
    /// This host leads in this term (the leader key's create revision), or does not.
    Leadership(Option<u64>),
    /// The host that leads the cluster now, if any (for status).
    Leader(Option<Name>),
    /// The answer to a controller compare-and-swap.
    CasResult {
        /// The action.
        id: ActionId,
        /// New revision, or `None` when not written.
        revision: Option<u64>,
    },
    /// This host holds a new lease (a new life: reports carry it).
    Incarnation(u64),
    /// The configuration stored in the cluster store (`None`: none stored).
    Config(Option<String>),
    /// A request from the API.
    Api(ApiRequest),
}

/// What the API asks the core.
#[derive(Debug)]
pub enum ApiRequest {
    /// The current status.
    Status(oneshot::Sender<StatusView>),
    /// The cluster's state as this host sees it (read-only).
    Snapshot(oneshot::Sender<SnapshotView>),
    /// An admin command; answered once committed (or refused, changing nothing).
    Command(AdminCommand, oneshot::Sender<Result<(), CommandError>>),
    /// A new configuration (TOML) to validate and store, or `None`: this daemon's own file
    /// again (SIGHUP, `vmha config reload`). Answered once stored, or refused.
    Config(
        Option<String>,
        oneshot::Sender<Result<ConfigApplied, ConfigRefused>>,
    ),
}

/// Why a configuration was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigRefused {
    /// It does not parse or validate (file:line:column and a hint).
    #[error("{0}")]
    Invalid(String),
    /// It changes what cannot change while the cluster runs.
    #[error("{0}")]
    Incompatible(String),
    /// The cluster store did not store it.
    #[error("the cluster store did not store it: {0}")]
    Store(String),
}

/// Creates the inbox: the sending side to clone into handles, and the core's receiver.
pub fn channel() -> (Inbox, mpsc::Receiver<Msg>) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    (Inbox { tx }, rx)
}

/// The sending side of the core's inbox. Every send waits while the inbox is full and fails
/// only when the core is gone (the daemon is exiting).
#[derive(Debug, Clone)]
pub struct Inbox {
    tx: mpsc::Sender<Msg>,
}

impl Inbox {
    /// Sends a message; `false` when the core is gone.
    pub async fn send(&self, msg: Msg) -> bool {
        self.tx.send(msg).await.is_ok()
    }

    /// Whether the core is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The handle a VM slot gets: hypervisor and guest observations only.
    pub fn host_inputs(&self) -> HostInputs {
        HostInputs {
            inbox: self.clone(),
        }
    }
}

/// Sends this host's driver observations and action results to the core.
#[derive(Debug, Clone)]
pub struct HostInputs {
    inbox: Inbox,
}

impl HostInputs {
    /// Sends one input; `false` when the core is gone.
    pub async fn send(&self, input: HostInput) -> bool {
        self.inbox.send(Msg::Host(input)).await
    }

    /// Whether the core is gone.
    pub fn is_closed(&self) -> bool {
        self.inbox.is_closed()
    }

    /// The one admin command a driver issues: an admin shut `vm` down outside vmha (e.g.
    /// `virsh shutdown`), so the VM group is stopped intentionally (`vm-stop`). `Ok` once it
    /// is committed; the refusal as the core gave it otherwise.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub async fn stop_vm(&self, vm: &Name) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let command = AdminCommand::VmStop { vm: vm.clone() };
        if !self
            .inbox
            .send(Msg::Api(ApiRequest::Command(command, tx)))
            .await
        {
            return Err("vmhad is exiting".into());
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("vmhad is exiting".into()),
        }
    }
}

#[cfg(test)]
impl HostInputs {
    /// A handle and the receiver it feeds, for unit tests of leaf modules.
    pub fn for_test() -> (HostInputs, mpsc::Receiver<Msg>) {
        let (inbox, rx) = channel();
        (inbox.host_inputs(), rx)
    }
}
