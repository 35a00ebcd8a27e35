//! Typed access to the records of [`crate::layout`]: values are JSON (`serde`), generic over the
//! record types (which live in the engine crate), and the [`EventLog`].

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::layout::{Layout, LayoutError};
use crate::store::{
    CasOutcome, ClusterStore, Expect, KeyValue, LeaseId, Mutation, Revision, StoreError,
    WatchEvent, WatchStream,
};

/// Errors of typed record access.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A name cannot be used in a key.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A stored value is not valid JSON of the expected type.
    #[error("record {key} does not decode: {source}")]
    Decode {
        /// The record's key.
        key: String,
        /// What serde said.
        source: serde_json::Error,
    },
    /// A value could not be encoded as JSON.
    #[error("record {key} does not encode: {source}")]
    Encode {
        /// The record's key.
        key: String,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// A decoded record with the metadata needed to change it safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// The record's `mod_revision`: the expected revision for a compare-and-swap.
    pub revision: Revision,
    /// The lease the record is bound to.
    pub lease: Option<LeaseId>,
}

/// Decodes a stored key as JSON of type `T`.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>, RecordError> {
    let value = serde_json::from_slice(&kv.value).map_err(|source| RecordError::Decode {
        key: kv.key.clone(),
        source,
    })?;
    Ok(Versioned {
        value,
        revision: kv.mod_revision,
        lease: kv.lease,
    })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(value).map_err(|source| RecordError::Encode {
        key: key.to_owned(),
        source,
    })
}

/// A change of a VM's ownership record.
#[derive(Debug, Clone, Copy)]
pub enum OwnerChange<'a, T> {
    /// Make `record` the owner record, bound to the owner host's `lease`.
    Claim {
        /// The new ownership record.
        record: &'a T,
        /// The owner host's lease: the record vanishes when it ends.
        lease: LeaseId,
    },
    /// Remove the ownership record.
    Release,
}

/// The result of an ownership compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerSwap<T> {
    /// The change was applied at this revision.
    Swapped {
        /// The revision of the write (the new expected revision of the record).
        revision: Revision,
    },
    /// The record was not as expected; nothing changed.
    Conflict {
        /// The record as it is now.
        current: Option<Versioned<T>>,
    },
}

/// Typed access to one cluster's records in a store.
#[derive(Debug, Clone)]
pub struct Records<S> {
    store: S,
    layout: Layout,
}

impl<S: ClusterStore> Records<S> {
    /// Records of `layout`'s cluster in `store`.
    pub fn new(store: S, layout: Layout) -> Self {
        Records { store, layout }
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The key layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, RecordError> {
        match self.store.get(key).await? {
            Some(kv) => decode(&kv).map(Some),
            None => Ok(None),
        }
    }

    async fn put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        lease: Option<LeaseId>,
    ) -> Result<Revision, RecordError> {
        let bytes = encode(key, value)?;
        Ok(self.store.put(key, bytes, lease).await?)
    }

    /// Writes `host`'s membership record bound to its `lease` (the host is a member while the
    /// lease lives).
    pub async fn register_host<T: Serialize>(
        &self,
        host: &str,
        record: &T,
        lease: LeaseId,
    ) -> Result<Revision, RecordError> {
        self.put(&self.layout.host(host)?, record, Some(lease))
            .await
    }

    /// Every membership record by host name, in name order, with the snapshot revision (watch
    /// [`Layout::hosts_prefix`] from `revision + 1` to follow changes).
    pub async fn hosts<T: DeserializeOwned>(
        &self,
    ) -> Result<(Vec<(String, Versioned<T>)>, Revision), RecordError> {
        let listing = self.store.list(&self.layout.hosts_prefix()).await?;
        let mut hosts = Vec::with_capacity(listing.kvs.len());
        for kv in &listing.kvs {
            if let Some(host) = self.layout.parse_host(&kv.key) {
                hosts.push((host.to_owned(), decode(kv)?));
            }
        }
        Ok((hosts, listing.revision))
    }

    /// `vm`'s ownership record.
    pub async fn owner<T: DeserializeOwned>(
        &self,
        vm: &str,
    ) -> Result<Option<Versioned<T>>, RecordError> {
        self.get(&self.layout.vm_owner(vm)?).await
    }

    /// Changes `vm`'s ownership record by compare-and-swap only: applied iff the record is as
    /// `expected` (absent, or at that revision). A claimed record is always bound to a lease.
    pub async fn swap_owner<T: Serialize + DeserializeOwned>(
        &self,
        vm: &str,
        expected: Expect,
        change: OwnerChange<'_, T>,
    ) -> Result<OwnerSwap<T>, RecordError> {
        let key = self.layout.vm_owner(vm)?;
        let mutation = match change {
            OwnerChange::Claim { record, lease } => Mutation::Put {
                value: encode(&key, record)?,
                lease: Some(lease),
            },
            OwnerChange::Release => Mutation::Delete,
        };
        match self
            .store
            .compare_and_swap(&key, expected, mutation)
            .await?
        {
            CasOutcome::Swapped { revision } => Ok(OwnerSwap::Swapped { revision }),
            CasOutcome::Conflict { current } => Ok(OwnerSwap::Conflict {
                current: current.as_ref().map(decode).transpose()?,
            }),
        }
    }

    /// `vm`'s reported group state.
    pub async fn vm_state<T: DeserializeOwned>(
        &self,
        vm: &str,
    ) -> Result<Option<Versioned<T>>, RecordError> {
        self.get(&self.layout.vm_state(vm)?).await
    }

    /// Reports `vm`'s group state (unconditional, not leased).
    pub async fn put_vm_state<T: Serialize>(
        &self,
        vm: &str,
        state: &T,
    ) -> Result<Revision, RecordError> {
        self.put(&self.layout.vm_state(vm)?, state, None).await
    }

    /// `host`'s persisted agent state.
    pub async fn agent_state<T: DeserializeOwned>(
        &self,
        host: &str,
    ) -> Result<Option<Versioned<T>>, RecordError> {
        self.get(&self.layout.agent_state(host)?).await
    }

    /// Persists `host`'s agent state (unconditional, not leased: it survives the host's absence).
    pub async fn put_agent_state<T: Serialize>(
        &self,
        host: &str,
        state: &T,
    ) -> Result<Revision, RecordError> {
        self.put(&self.layout.agent_state(host)?, state, None).await
    }
}

/// How many events an [`EventLog`] keeps by default.
pub const DEFAULT_KEEP: u64 = 10_000;

/// One event of the log with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent<T> {
    /// The event's sequence number: unique, increasing in order of allocation.
    pub seq: u64,
    /// The event.
    pub event: T,
}

/// The newest events, with the snapshot revision to [`EventLog::follow`] from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail<T> {
    /// Oldest first.
    pub events: Vec<LoggedEvent<T>>,
    /// The revision of the snapshot; follow from `revision + 1` to miss nothing.
    pub revision: Revision,
}

/// The cluster's event log under `events/`: sequence-numbered JSON events, trimmed to the newest
/// `keep`. Safe with several appenders (hosts) at once: sequence numbers come from a counter key
/// changed by compare-and-swap, so no two events get the same number.
pub struct EventLog<S> {
    store: S,
    layout: Layout,
    keep: u64,
    /// The counter key as last seen: (next seq, mod revision); `None` until the first append.
    counter: Mutex<Option<(u64, Option<Revision>)>>,
}

impl<S: ClusterStore> EventLog<S> {
    /// The event log of `layout`'s cluster, keeping the newest [`DEFAULT_KEEP`] events.
    pub fn new(store: S, layout: Layout) -> Self {
        Self::with_keep(store, layout, DEFAULT_KEEP)
    }

    /// The event log keeping the newest `keep` events (at least 1).
    pub fn with_keep(store: S, layout: Layout, keep: u64) -> Self {
        EventLog {
            store,
            layout,
            keep: keep.max(1),
            counter: Mutex::new(None),
        }
    }

    fn counter_key(&self) -> String {
        format!("{}events-seq", self.layout.root())
    }

    /// Allocates the next sequence number by compare-and-swap on the counter key.
    async fn allocate(
        &self,
        cached: &mut Option<(u64, Option<Revision>)>,
    ) -> Result<u64, RecordError> {
        let key = self.counter_key();
        loop {
            let (next, expect) = match *cached {
                Some((next, rev)) => (next, rev),
                None => match self.store.get(&key).await? {
                    Some(kv) => (decode::<u64>(&kv)?.value, Some(kv.mod_revision)),
                    None => (0, None),
                },
            };
            let expected = expect.map_or(Expect::Absent, Expect::Revision);
            let value = encode(&key, &(next + 1))?;
            let outcome = self
                .store
                .compare_and_swap(&key, expected, Mutation::Put { value, lease: None })
                .await?;
            match outcome {
                CasOutcome::Swapped { revision } => {
                    *cached = Some((next + 1, Some(revision)));
                    return Ok(next);
                }
                CasOutcome::Conflict { current } => {
                    *cached = match current {
                        Some(kv) => Some((decode::<u64>(&kv)?.value, Some(kv.mod_revision))),
                        None => Some((0, None)),
                    };
                }
            }
        }
    }

    /// Appends `event`; returns its sequence number. Deletes events that fall out of the window
    /// (on the first append of this handle, every event beyond the newest `keep`).
    pub async fn append<T: Serialize>(&self, event: &T) -> Result<u64, RecordError> {
        let mut counter = self.counter.lock().await;
        let first = counter.is_none();
        let seq = self.allocate(&mut counter).await?;
        drop(counter);
        let key = self.layout.event(seq);
        let bytes = encode(&key, event)?;
        self.store.put(&key, bytes, None).await?;
        if first {
            self.trim().await?;
        } else if let Some(old) = seq.checked_sub(self.keep) {
            self.store.delete(&self.layout.event(old)).await?;
        }
        Ok(seq)
    }

    /// Deletes every event beyond the newest `keep`; returns how many it deleted.
    pub async fn trim(&self) -> Result<usize, RecordError> {
        let listing = self.store.list(&self.layout.events_prefix()).await?;
        let excess = listing
            .kvs
            .len()
            .saturating_sub(usize::try_from(self.keep).unwrap_or(usize::MAX));
        for kv in listing.kvs.iter().take(excess) {
            self.store.delete(&kv.key).await?;
        }
        Ok(excess)
    }

    /// The newest `k` events, oldest first, with the revision to follow from.
    pub async fn last<T: DeserializeOwned>(&self, k: usize) -> Result<Tail<T>, RecordError> {
        let listing = self
            .store
            .list_tail(&self.layout.events_prefix(), k)
            .await?;
        let mut events = Vec::with_capacity(listing.kvs.len());
        for kv in &listing.kvs {
            if let Some(seq) = self.layout.parse_event(&kv.key) {
                events.push(LoggedEvent {
                    seq,
                    event: decode(kv)?.value,
                });
            }
        }
        Ok(Tail {
            events,
            revision: listing.revision,
        })
    }

    /// Follows events appended at or after `from_revision` (use [`Tail::revision`] + 1).
    pub async fn follow<T: DeserializeOwned>(
        &self,
        from_revision: Revision,
    ) -> Result<EventFollower<S::Watch, T>, RecordError> {
        let watch = self
            .store
            .watch(&self.layout.events_prefix(), from_revision)
            .await?;
        Ok(EventFollower {
            watch,
            layout: self.layout.clone(),
            _event: PhantomData,
        })
    }
}

/// New events of an [`EventLog`], in store order. Like the watch beneath it, it never skips an
/// event silently: on [`StoreError::Lagged`] / [`StoreError::Compacted`] the caller re-reads with
/// [`EventLog::last`] and follows again.
pub struct EventFollower<W, T> {
    watch: W,
    layout: Layout,
    _event: PhantomData<fn() -> T>,
}

impl<W: WatchStream, T: DeserializeOwned> EventFollower<W, T> {
    /// The next appended event (trimming deletions are skipped).
    pub async fn next(&mut self) -> Result<LoggedEvent<T>, RecordError> {
        loop {
            if let WatchEvent::Put(kv) = self.watch.next().await? {
                if let Some(seq) = self.layout.parse_event(&kv.key) {
                    return Ok(LoggedEvent {
                        seq,
                        event: decode(&kv)?.value,
                    });
                }
            }
        }
    }
}
