//! Follows the cluster store: one full listing, then the watch from the listing's revision,
//! handed to the core as typed records in batches (a burst of changes is one batch, so the
//! controller decides once for it). Level-triggered: a watch that breaks, lags or meets
//! compacted history, or a request from the core, starts over with a full listing.
//!
//! Besides records it routes what the core does not decide on: replies to this host's
//! forwarded commands go to the waiting callers, and every host's lease id is kept for
//! binding ownership records to their owner's lease.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use vmha_engine::Record;
use vmha_model::Name;
use vmha_store::layout::Layout;
use vmha_store::{ClusterStore, KeyValue, LeaseId, WatchEvent, WatchStream};

use crate::codec::{self, Decoded, StoredReply};
use crate::inbox::{Inbox, Msg};

/// Most changes handed over in one batch.
const BATCH: usize = 1_000;

/// The lease each host's membership is bound to, as last seen.
#[derive(Debug, Default)]
pub struct HostLeases {
    leases: RwLock<BTreeMap<Name, LeaseId>>,
}

impl HostLeases {
    /// The lease of `host`'s membership, if it is a member.
    pub fn get(&self, host: &Name) -> Option<LeaseId> {
        self.leases.read().ok()?.get(host).copied()
    }

    fn set(&self, host: &Name, lease: Option<LeaseId>) {
        if let Ok(mut l) = self.leases.write() {
            match lease {
                Some(id) => l.insert(host.clone(), id),
                None => l.remove(host),
            };
        }
    }
}

/// Callers waiting for the replies to commands this host forwarded.
#[derive(Debug, Default)]
pub struct Replies {
    waiting: Mutex<BTreeMap<String, oneshot::Sender<StoredReply>>>,
}

impl Replies {
    /// Registers interest in the reply to request `id` (before the request is written).
    pub fn expect(&self, id: &str) -> oneshot::Receiver<StoredReply> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id.to_string(), tx);
        }
        rx
    }

    /// Gives up waiting for request `id`.
    pub fn forget(&self, id: &str) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(id);
        }
    }

    fn deliver(&self, id: &str, reply: StoredReply) {
        let tx = self.waiting.lock().ok().and_then(|mut w| w.remove(id));
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }
}

/// What the follower shares with the rest of the daemon.
pub struct Follower<S> {
    /// The store.
    pub store: S,
    /// Key layout.
    pub layout: Layout,
    /// This host.
    pub me: Name,
    /// The core.
    pub inbox: Inbox,
    /// Poked to start over with a full listing.
    pub relist: Arc<Notify>,
    /// Hosts' leases.
    pub leases: Arc<HostLeases>,
    /// Waiting forwarded commands.
    pub replies: Arc<Replies>,
}

/// One batch under construction.
#[derive(Default)]
struct Batch {
    /// The stored configuration, when the batch saw it.
    config: Option<Option<String>>,
    records: Vec<Record>,
    new_requests: Vec<crate::inbox::Request>,
    gone_requests: Vec<String>,
}

impl<S: ClusterStore> Follower<S> {
    fn take(&self, batch: &mut Batch, decoded: Decoded) {
        match decoded {
            Decoded::Record(record) => {
                if let Record::Host { host, member } = &record {
                    let lease = member
                        .as_ref()
                        .map(|m| LeaseId(i64::try_from(m.incarnation).unwrap_or(i64::MAX)));
                    self.leases.set(host, lease);
                }
                batch.records.push(record);
            }
            Decoded::Request(r) => batch.new_requests.push(r),
            Decoded::RequestGone(id) => batch.gone_requests.push(id),
            Decoded::Reply { id, reply } => {
                if let Some(reply) = reply {
                    self.replies.deliver(&id, reply);
                }
            }
            Decoded::Config(text) => batch.config = Some(text),
            Decoded::Ignored => {}
        }
    }

    fn put(&self, batch: &mut Batch, kv: &KeyValue) {
        let decoded = codec::decode_put(&self.layout, &self.me, kv);
        self.take(batch, decoded);
    }

    async fn send(&self, batch: Batch, full: bool) -> bool {
        // A full listing without a stored configuration says there is none.
        let config = if full {
            Some(batch.config.clone().flatten())
        } else {
            batch.config.clone()
        };
        if let Some(config) = config
            && !self.inbox.send(Msg::Config(config)).await
        {
            return false;
        }
        if full || !batch.records.is_empty() {
            let msg = Msg::Records {
                records: batch.records,
                full,
            };
            if !self.inbox.send(msg).await {
                return false;
            }
        }
        if !batch.new_requests.is_empty() || !batch.gone_requests.is_empty() {
            let msg = Msg::Requests {
                new: batch.new_requests,
                gone: batch.gone_requests,
            };
            if !self.inbox.send(msg).await {
                return false;
            }
        }
        true
    }

    /// Lists and follows until the daemon exits.
    pub async fn run(self) {
        let root = self.layout.root().to_string();
        loop {
            let listing = match self.store.list(&root).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("cannot list the cluster store: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut batch = Batch::default();
            for kv in &listing.kvs {
                self.put(&mut batch, kv);
            }
            if !self.send(batch, true).await {
                return;
            }
            let mut watch = match self.store.watch(&root, listing.revision + 1).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("cannot watch the cluster store: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                let first = tokio::select! {
                    next = watch.next() => next,
                    () = self.relist.notified() => break,
                };
                let mut batch = Batch::default();
                let mut broken = false;
                let mut next = Some(first);
                let mut n = 0;
                while let Some(change) = next.take() {
                    match change {
                        Ok(change) => self.change(&mut batch, &change),
                        Err(e) => {
                            tracing::warn!("cluster store watch interrupted ({e}); listing again");
                            broken = true;
                            break;
                        }
                    }
                    n += 1;
                    if n >= BATCH {
                        break;
                    }
                    // More changes already here join the batch; none waited for.
                    next = tokio::time::timeout(Duration::ZERO, watch.next())
                        .await
                        .ok();
                }
                if !self.send(batch, false).await {
                    return;
                }
                if broken {
                    break;
                }
            }
        }
    }

    fn change(&self, batch: &mut Batch, change: &WatchEvent) {
        match change {
            WatchEvent::Put(kv) => self.put(batch, kv),
            WatchEvent::Delete { key, .. } => {
                let decoded = codec::decode_delete(&self.layout, &self.me, key);
                self.take(batch, decoded);
            }
        }
    }
}
