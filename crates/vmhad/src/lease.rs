//! This host's lease and membership: acquired at start (a restarted daemon keeps the lease of
//! its previous run while it is still live, so a quick restart changes nothing in the store),
//! renewed at a quarter of its TTL, replaced by a new one when it ended. Every acknowledged
//! renewal moves the fence deadline ([`crate::fence`]); the engine is told when the lease is
//! no longer live (it has fenced) and when it is again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use vmha_engine::HostInput;
use vmha_model::Name;
use vmha_store::layout::Layout;
use vmha_store::{ClusterStore, LeaseId, StoreError, TxnOutcome};

use crate::codec;
use crate::fence::Fence;
use crate::inbox::{Inbox, Msg};

/// Pause before retrying a failed renewal.
const RETRY: Duration = Duration::from_millis(100);

/// Errors acquiring the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The membership record could not be encoded.
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
}

/// What the lease keeper needs.
pub struct LeaseKeeper<S> {
    /// The store.
    pub store: S,
    /// Key layout.
    pub layout: Layout,
    /// This host.
    pub host: Name,
    /// Memory for VMs, for the membership record.
    pub memory_mb: u64,
    /// Lease TTL.
    pub ttl: Duration,
    /// The fence.
    pub fence: Arc<Fence>,
    /// The core.
    pub inbox: Inbox,
    /// The current lease, for the election.
    pub lease_tx: watch::Sender<Option<LeaseId>>,
    /// Poked when a full listing is needed (the engine forgot ownership while fenced).
    pub relist: Arc<Notify>,
}

/// Acquires this host's lease and registers it as a member: reuses the lease of an earlier
/// run of this daemon when it is still live, else grants a new one. Returns the lease, when
/// its grant (or renewal) was sent, and its TTL as the store holds it (a kept lease has the TTL
/// of the run that granted it, which may be shorter than `ttl` now).
pub async fn acquire<S: ClusterStore>(
    store: &S,
    layout: &Layout,
    host: &Name,
    memory_mb: u64,
    ttl: Duration,
) -> Result<(LeaseId, Instant, Duration), LeaseError> {
    let key = layout
        .host(host.as_str())
        .map_err(codec::CodecError::from)?;
    if let Some(kv) = store.get(&key).await?
        && let Some(old) = kv.lease
    {
        let sent = Instant::now();
        match store.keep_alive(old).await {
            Ok(held) => {
                tracing::info!(lease = %old, ttl = ?held, "kept the lease of this host's previous run");
                register(store, layout, host, memory_mb, old).await?;
                return Ok((old, sent, held));
            }
            Err(StoreError::LeaseExpired { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let sent = Instant::now();
    let lease = store.grant(ttl).await?;
    register(store, layout, host, memory_mb, lease.id).await?;
    tracing::info!(lease = %lease.id, ttl = ?lease.ttl, "host lease granted");
    Ok((lease.id, sent, lease.ttl))
}

async fn register<S: ClusterStore>(
    store: &S,
    layout: &Layout,
    host: &Name,
    memory_mb: u64,
    lease: LeaseId,
) -> Result<(), LeaseError> {
    let op = codec::member_op(layout, host, memory_mb, lease)?;
    match store.txn(Vec::new(), vec![op]).await? {
        TxnOutcome::Committed { .. } | TxnOutcome::Failed => Ok(()),
    }
}

impl<S: ClusterStore> LeaseKeeper<S> {
    /// Renews `lease` until the daemon exits.
    pub async fn run(self, mut lease: LeaseId) {
        let period = (self.ttl / 4).max(Duration::from_millis(250));
        let mut told_live = true;
        let mut wait = period;
        loop {
            tokio::time::sleep(wait).await;
            if self.inbox.is_closed() {
                return;
            }
            // A failed renewal is retried at once (an etcd leader election, a member gone:
            // the next attempt may reach a working member), each attempt bounded.
            wait = RETRY;
            let sent = Instant::now();
            let renewal = tokio::time::timeout(period, self.store.keep_alive(lease)).await;
            match renewal {
                Ok(Ok(_)) => {
                    wait = period;
                    if self.fence.fenced() {
                        // The lease never ended: this host still owns its VMs; it starts them
                        // again from a fresh view of the store.
                        self.fence.rearm(sent);
                        self.relist.notify_one();
                    } else {
                        self.fence.renewed(sent);
                    }
                }
                Ok(Err(StoreError::LeaseExpired { .. })) => {
                    // The lease ended before the fence fired (the machine was suspended, its
                    // clock stood still): other hosts may already run these VMs.
                    self.fence.lost();
                    tracing::error!(lease = %lease, "host lease ended: acquiring a new one");
                    lease = self.renew_life().await;
                    told_live = false;
                }
                Ok(Err(e)) => tracing::warn!("host lease renewal failed: {e}"),
                Err(_) => tracing::warn!("host lease renewal timed out after {period:?}"),
            }
            let live = !self.fence.fenced();
            if live != told_live {
                told_live = live;
                if !self.inbox.send(Msg::Host(HostInput::Lease { live })).await {
                    return;
                }
            }
        }
    }

    /// The lease ended: a new one (retrying until the store grants it), a new membership, a
    /// new life of this host.
    async fn renew_life(&self) -> LeaseId {
        loop {
            match acquire(
                &self.store,
                &self.layout,
                &self.host,
                self.memory_mb,
                self.ttl,
            )
            .await
            {
                Ok((lease, sent, _)) => {
                    self.fence.rearm(sent);
                    let _ = self.lease_tx.send(Some(lease));
                    let _ = self
                        .inbox
                        .send(Msg::Incarnation(lease.0.unsigned_abs()))
                        .await;
                    self.relist.notify_one();
                    return lease;
                }
                Err(e) => {
                    tracing::warn!("cannot acquire a new host lease yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
