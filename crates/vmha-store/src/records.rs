//! Typed access to the records of [`crate::layout`]: values are JSON (`serde`), generic over the
//! record types (which live in the engine crate), and the [`EventLog`] (one event stream per
//! host).

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::layout::{Layout, LayoutError};
use crate::store::{
    CasOutcome, ClusterStore, Expect, KeyValue, LeaseId, Listing, Mutation, Op, Revision,
    StoreError, WatchEvent, WatchStream,
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

/// How many events of each host's stream an [`EventLog`] keeps by default.
pub const DEFAULT_KEEP: u64 = 10_000;

/// How often [`EventLog::last`] re-reads one host's stream with a larger limit (because that host
/// wrote events while the other streams were read) before it reads the whole stream instead.
const TAIL_REREADS: usize = 2;

/// One event of the log, with where and when it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent<T> {
    /// The host that wrote the event: the stream (`events/<host>/`) it is in.
    pub host: String,
    /// Its number in `host`'s stream: unique within the stream, increasing in the order the host
    /// wrote its events.
    pub seq: u64,
    /// The revision of the transaction that wrote it (the key's `mod_revision`). The events of
    /// all hosts are in commit order when sorted by (`revision`, `host`, `seq`).
    pub revision: Revision,
    /// The event.
    pub event: T,
}

/// Where in the event log a [`Tail`] ends: pass it to [`EventLog::follow`] to get exactly the
/// events committed after the tail, so that the tail and the follower together miss no event and
/// repeat none. Only a [`Tail`] makes one (there is no revision arithmetic to get wrong).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FollowFrom {
    /// The revision the tail reflects: it holds events committed at or before it.
    revision: Revision,
}

impl FollowFrom {
    /// The store revision the tail reflects: its events were committed at or before it, a
    /// follower delivers the events committed after it.
    pub fn revision(self) -> Revision {
        self.revision
    }
}

/// The newest events of the cluster as of one revision, and where to follow on from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail<T> {
    /// The events, oldest first, in commit order (by revision, then host, then seq).
    pub events: Vec<LoggedEvent<T>>,
    /// Where a follower continues: [`EventLog::follow`] with it delivers every event committed
    /// after these, and none of these. Copy it out before consuming `events`.
    pub follow_from: FollowFrom,
}

/// The cluster's event log: one stream of JSON events per host, `events/<host>/<20-digit seq>`
/// ([`Layout::host_event`]).
///
/// Each host numbers its own events (0, 1, 2, …) and writes them itself, inside the store
/// transaction that also writes its state ([`EventLog::put_op`], [`EventLog::trim_op`]): no
/// counter key, no compare-and-swap, and hosts never contend. Each stream keeps its newest
/// `keep` events. Readers merge the streams in commit order ([`EventLog::last`]) and follow
/// every stream at once ([`EventLog::follow`]).
///
/// Writers must keep two rules, which the reading guarantees rely on: a host writes each seq
/// once (never rewrites an event), and in increasing order (a larger seq in the same or a later
/// transaction).
#[derive(Debug, Clone)]
pub struct EventLog<S> {
    store: S,
    layout: Layout,
    keep: u64,
}

impl<S: ClusterStore> EventLog<S> {
    /// The event log of `layout`'s cluster, each host keeping its newest [`DEFAULT_KEEP`] events.
    pub fn new(store: S, layout: Layout) -> Self {
        Self::with_keep(store, layout, DEFAULT_KEEP)
    }

    /// The event log with each host keeping its newest `keep` events (at least 1).
    pub fn with_keep(store: S, layout: Layout, keep: u64) -> Self {
        EventLog {
            store,
            layout,
            keep: keep.max(1),
        }
    }

    /// How many events each host's stream keeps ([`EventLog::trim_op`]).
    pub fn keep(&self) -> u64 {
        self.keep
    }

    /// The write of `host`'s event number `seq` for a [`ClusterStore::txn`]: an [`Op::Put`] of
    /// `event` as JSON under [`Layout::host_event`], not bound to a lease (events outlive their
    /// host). Pure: nothing is written until the transaction is. Errors: an invalid host name,
    /// an event that does not encode.
    pub fn put_op<T: Serialize>(&self, host: &str, seq: u64, event: &T) -> Result<Op, RecordError> {
        let key = self.layout.host_event(host, seq)?;
        let value = encode(&key, event)?;
        Ok(Op::Put {
            key,
            value,
            lease: None,
        })
    }

    /// The trimming of `host`'s stream for a [`ClusterStore::txn`], where `next_seq` is one more
    /// than the newest seq written (by this transaction or before): an [`Op::DeleteRange`] of
    /// every event of `host` with a seq below `next_seq - keep`, so that the stream keeps its
    /// newest `keep` events; `None` when no event can be that old (`next_seq <= keep`). The range
    /// ends below the kept events, so it may share a transaction with their puts, as long as that
    /// transaction writes at most `keep` events (older ones would be deleted at once: the store
    /// refuses a transaction that writes a key twice). Pure; errors only for an invalid host name.
    pub fn trim_op(&self, host: &str, next_seq: u64) -> Result<Option<Op>, RecordError> {
        let start = self.layout.host_events_prefix(host)?;
        match next_seq.checked_sub(self.keep) {
            Some(oldest_kept) if oldest_kept > 0 => Ok(Some(Op::DeleteRange {
                start,
                end: self.layout.host_event(host, oldest_kept)?,
            })),
            _ => Ok(None),
        }
    }

    /// One more than the highest seq stored in `host`'s stream (0 for an empty stream): where a
    /// host that lost its own count continues without overwriting its events. A count kept in
    /// the host's state, written in the same transactions as its events, is just as good and
    /// costs no read.
    pub async fn next_seq(&self, host: &str) -> Result<u64, RecordError> {
        let prefix = self.layout.host_events_prefix(host)?;
        let newest = self.store.list_tail(&prefix, 1).await?;
        let parse = |kv: &KeyValue| self.layout.parse_host_event(&kv.key).map(|(_, seq)| seq);
        let highest = match newest.kvs.last() {
            None => None,
            Some(kv) => match parse(kv) {
                Some(seq) => Some(seq),
                // A foreign key sorts last: look at every key of the stream.
                None => self
                    .store
                    .list(&prefix)
                    .await?
                    .kvs
                    .iter()
                    .filter_map(parse)
                    .max(),
            },
        };
        Ok(highest.map_or(0, |seq| seq.saturating_add(1)))
    }

    /// The newest `k` events of the streams of `hosts` (the configured hosts; duplicates are
    /// ignored), oldest first, in commit order (by revision, then host, then seq), as of one
    /// revision, [`Tail::follow_from`]: exactly the newest `k` of the events committed at or
    /// before it that are still stored. Pass `follow_from` to [`EventLog::follow`] for the events
    /// committed after it: together they miss no event and repeat none.
    ///
    /// Events of hosts not in `hosts` are not shown here (their streams are not read; listing
    /// every stream would read the whole log), but a follower delivers their new events. With
    /// `k == 0` or no hosts: no events, only the current position.
    ///
    /// Each stream is read with [`ClusterStore::list_tail`] (its newest `k`), one after the
    /// other; `follow_from` is the oldest of those reads. Events a host committed after it are
    /// left to the follower; if they pushed older events out of a stream's read, that stream is
    /// read again with a larger limit (and, should the host keep writing, in full).
    ///
    /// Errors: an invalid host name, a store failure, a tail event that does not decode.
    pub async fn last<T: DeserializeOwned>(
        &self,
        hosts: &[&str],
        k: usize,
    ) -> Result<Tail<T>, RecordError> {
        let mut names = hosts.to_vec();
        names.sort_unstable();
        names.dedup();
        let prefixes = names
            .iter()
            .map(|host| self.layout.host_events_prefix(host))
            .collect::<Result<Vec<_>, _>>()?;
        if k == 0 || prefixes.is_empty() {
            let now = self
                .store
                .list_tail(&self.layout.events_prefix(), 0)
                .await?;
            return Ok(Tail {
                events: Vec::new(),
                follow_from: FollowFrom {
                    revision: now.revision,
                },
            });
        }
        let mut listings = Vec::with_capacity(prefixes.len());
        for prefix in &prefixes {
            listings.push(self.store.list_tail(prefix, k).await?);
        }
        let at = listings
            .iter()
            .map(|listing| listing.revision)
            .fold(Revision::MAX, Revision::min);
        for (prefix, listing) in prefixes.iter().zip(listings.iter_mut()) {
            self.complete_stream(prefix, listing, k, at).await?;
        }
        let mut found: Vec<(Revision, &str, u64, &KeyValue)> = Vec::new();
        for kv in listings.iter().flat_map(|listing| &listing.kvs) {
            if kv.mod_revision > at {
                continue;
            }
            if let Some((host, seq)) = self.layout.parse_host_event(&kv.key) {
                found.push((kv.mod_revision, host, seq, kv));
            }
        }
        found.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        let skip = found.len().saturating_sub(k);
        let events = found[skip..]
            .iter()
            .map(|&(revision, host, seq, kv)| {
                Ok(LoggedEvent {
                    host: host.to_owned(),
                    seq,
                    revision,
                    event: decode(kv)?.value,
                })
            })
            .collect::<Result<Vec<_>, RecordError>>()?;
        Ok(Tail {
            events,
            follow_from: FollowFrom { revision: at },
        })
    }

    /// Makes `listing` (one stream's newest `k`, read at a revision >= `at`) hold that stream's
    /// newest `k` events committed at or before `at`: if events committed after `at` took places
    /// in the read, the stream is read again with room for them.
    async fn complete_stream(
        &self,
        prefix: &str,
        listing: &mut Listing,
        k: usize,
        at: Revision,
    ) -> Result<(), StoreError> {
        let mut limit = k;
        let mut rereads = 0;
        loop {
            let newer = listing.kvs.iter().filter(|kv| kv.mod_revision > at).count();
            // The read holds the whole stream, or enough older events.
            if listing.kvs.len() < limit || listing.kvs.len() - newer >= k {
                return Ok(());
            }
            if rereads == TAIL_REREADS {
                *listing = self.store.list(prefix).await?;
                return Ok(());
            }
            rereads += 1;
            limit = k.saturating_add(newer);
            *listing = self.store.list_tail(prefix, limit).await?;
        }
    }

    /// Follows the log from the end of a [`Tail`]: the follower delivers every event committed
    /// after `from` ([`Tail::follow_from`]), by any host (also hosts not passed to
    /// [`EventLog::last`]), once each, in store order (by revision; within one transaction in the
    /// order of its writes), and none of the tail's. Trimming deletions are skipped. Fails with
    /// [`StoreError::Compacted`] if the store no longer has that history: read a new tail.
    pub async fn follow<T: DeserializeOwned>(
        &self,
        from: FollowFrom,
    ) -> Result<EventFollower<S::Watch, T>, RecordError> {
        let watch = self
            .store
            .watch(
                &self.layout.events_prefix(),
                from.revision.saturating_add(1),
            )
            .await?;
        Ok(EventFollower {
            watch,
            layout: self.layout.clone(),
            _event: PhantomData,
        })
    }
}

/// New events of an [`EventLog`], made by [`EventLog::follow`]. Like the watch beneath it, it
/// never skips an event silently: when it cannot go on ([`StoreError::Lagged`],
/// [`StoreError::Compacted`], [`StoreError::Unavailable`]) it fails, and the caller reads a new
/// [`Tail`] with [`EventLog::last`] and follows again (events it already showed can be told by
/// their (`host`, `seq`), or by a `revision` not above the last one shown).
pub struct EventFollower<W, T> {
    watch: W,
    layout: Layout,
    _event: PhantomData<fn() -> T>,
}

impl<W: WatchStream, T: DeserializeOwned> EventFollower<W, T> {
    /// The next event written under `events/` (trimming deletions and keys that are no event are
    /// skipped). An event that does not decode is a [`RecordError::Decode`] for that event alone:
    /// the next call goes on after it. A store error ends the follower: every later call fails.
    pub async fn next(&mut self) -> Result<LoggedEvent<T>, RecordError> {
        loop {
            if let WatchEvent::Put(kv) = self.watch.next().await? {
                if let Some((host, seq)) = self.layout.parse_host_event(&kv.key) {
                    return Ok(LoggedEvent {
                        host: host.to_owned(),
                        seq,
                        revision: kv.mod_revision,
                        event: decode(&kv)?.value,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::embedded::{EmbeddedStore, EmbeddedWatch};
    use crate::store::{Compare, Leader, Lease, TxnOutcome};

    /// An embedded store that commits queued writes right before each read of a prefix, to put
    /// other hosts' writes between the reads of [`EventLog::last`] at will, and records the reads.
    #[derive(Clone)]
    struct Racing {
        inner: EmbeddedStore,
        before_read: Arc<Mutex<VecDeque<Vec<Op>>>>,
        reads: Arc<Mutex<Vec<String>>>,
    }

    impl Racing {
        async fn interfere(&self, read: String) -> Result<(), StoreError> {
            self.reads.lock().unwrap().push(read);
            let ops = self.before_read.lock().unwrap().pop_front();
            if let Some(ops) = ops.filter(|ops| !ops.is_empty()) {
                self.inner.txn(vec![], ops).await?;
            }
            Ok(())
        }

        fn reads(&self) -> Vec<String> {
            std::mem::take(&mut *self.reads.lock().unwrap())
        }
    }

    impl ClusterStore for Racing {
        type Watch = EmbeddedWatch;

        async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get(key).await
        }

        async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
            self.interfere(format!("list {prefix}")).await?;
            self.inner.list(prefix).await
        }

        async fn put(
            &self,
            key: &str,
            value: Vec<u8>,
            lease: Option<LeaseId>,
        ) -> Result<Revision, StoreError> {
            self.inner.put(key, value, lease).await
        }

        async fn compare_and_swap(
            &self,
            key: &str,
            expected: Expect,
            mutation: Mutation,
        ) -> Result<CasOutcome, StoreError> {
            self.inner.compare_and_swap(key, expected, mutation).await
        }

        async fn txn(
            &self,
            compares: Vec<Compare>,
            ops: Vec<Op>,
        ) -> Result<TxnOutcome, StoreError> {
            self.inner.txn(compares, ops).await
        }

        async fn list_tail(&self, prefix: &str, limit: usize) -> Result<Listing, StoreError> {
            self.interfere(format!("tail {limit} {prefix}")).await?;
            self.inner.list_tail(prefix, limit).await
        }

        async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
            self.inner.delete(key).await
        }

        async fn grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
            self.inner.grant(ttl).await
        }

        async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
            self.inner.keep_alive(lease).await
        }

        async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke(lease).await
        }

        async fn watch(&self, prefix: &str, from: Revision) -> Result<EmbeddedWatch, StoreError> {
            self.inner.watch(prefix, from).await
        }

        async fn campaign(
            &self,
            election: &str,
            value: Vec<u8>,
            lease: LeaseId,
        ) -> Result<Leader, StoreError> {
            self.inner.campaign(election, value, lease).await
        }

        async fn leader(&self, election: &str) -> Result<Option<Leader>, StoreError> {
            self.inner.leader(election).await
        }

        async fn resign(&self, leader: &Leader) -> Result<(), StoreError> {
            self.inner.resign(leader).await
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Racing,
        log: EventLog<Racing>,
    }

    fn fixture(keep: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Racing {
            inner: EmbeddedStore::open(dir.path().join("store.redb")).unwrap(),
            before_read: Arc::default(),
            reads: Arc::default(),
        };
        let log = EventLog::with_keep(store.clone(), Layout::new("c").unwrap(), keep);
        Fixture {
            _dir: dir,
            store,
            log,
        }
    }

    /// The ops of one host writing events `seqs` (each `{"host", "seq"}`) and trimming.
    fn writes(log: &EventLog<Racing>, host: &str, seqs: std::ops::Range<u64>) -> Vec<Op> {
        let next = seqs.end;
        let mut ops: Vec<Op> = seqs
            .map(|seq| {
                log.put_op(host, seq, &json!({"host": host, "seq": seq}))
                    .unwrap()
            })
            .collect();
        ops.extend(log.trim_op(host, next).unwrap());
        ops
    }

    async fn commit(f: &Fixture, ops: Vec<Op>) -> Revision {
        match f.store.inner.txn(vec![], ops).await.unwrap() {
            TxnOutcome::Committed { revision } => revision,
            TxnOutcome::Failed => panic!("no conditions: commits"),
        }
    }

    /// Every stored event of the cluster as (revision, host, seq), in commit order.
    async fn stored(f: &Fixture) -> Vec<(Revision, String, u64)> {
        let listing = f
            .store
            .inner
            .list(&f.log.layout.events_prefix())
            .await
            .unwrap();
        let mut all: Vec<_> = listing
            .kvs
            .iter()
            .filter_map(|kv| {
                let (host, seq) = f.log.layout.parse_host_event(&kv.key)?;
                Some((kv.mod_revision, host.to_owned(), seq))
            })
            .collect();
        all.sort();
        all
    }

    fn ids(events: &[LoggedEvent<Value>]) -> Vec<(Revision, String, u64)> {
        events
            .iter()
            .map(|e| {
                assert_eq!(e.event, json!({"host": e.host, "seq": e.seq}));
                (e.revision, e.host.clone(), e.seq)
            })
            .collect()
    }

    async fn follow_n(
        log: &EventLog<Racing>,
        from: FollowFrom,
        n: usize,
    ) -> Vec<(Revision, String, u64)> {
        let mut follower = log.follow::<Value>(from).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < n {
            let event = tokio::time::timeout(Duration::from_secs(10), follower.next())
                .await
                .expect("an event in time")
                .unwrap();
            seen.push(event);
        }
        ids(&seen)
    }

    #[test]
    fn writing_helpers_build_the_documented_ops() {
        let f = fixture(3);
        let layout = &f.log.layout;
        assert_eq!(
            f.log.put_op("kvm1", 7, &json!({"n": 1})).unwrap(),
            Op::Put {
                key: layout.host_event("kvm1", 7).unwrap(),
                value: br#"{"n":1}"#.to_vec(),
                lease: None,
            }
        );
        assert_eq!(f.log.trim_op("kvm1", 0).unwrap(), None);
        assert_eq!(f.log.trim_op("kvm1", 3).unwrap(), None, "3 events fit");
        assert_eq!(
            f.log.trim_op("kvm1", 4).unwrap(),
            Some(Op::DeleteRange {
                start: layout.host_events_prefix("kvm1").unwrap(),
                end: layout.host_event("kvm1", 1).unwrap(),
            }),
            "seq 0 goes, 1..=3 stay"
        );
        assert!(matches!(
            f.log.put_op("a/b", 0, &1),
            Err(RecordError::Layout(_))
        ));
        assert!(matches!(
            f.log.trim_op("a/b", 0),
            Err(RecordError::Layout(_))
        ));
        let with_zero = EventLog::with_keep(f.store.clone(), layout.clone(), 0);
        assert_eq!(with_zero.keep(), 1, "keeps at least one");
        assert_eq!(
            EventLog::new(f.store.clone(), layout.clone()).keep(),
            10_000
        );
    }

    #[tokio::test]
    async fn next_seq_continues_after_the_newest_stored_event() {
        let f = fixture(3);
        assert_eq!(f.log.next_seq("kvm1").await.unwrap(), 0);
        for seq in 0..5 {
            commit(&f, writes(&f.log, "kvm1", seq..seq + 1)).await;
        }
        commit(&f, writes(&f.log, "kvm2", 0..1)).await;
        assert_eq!(f.log.next_seq("kvm1").await.unwrap(), 5);
        assert_eq!(f.log.next_seq("kvm2").await.unwrap(), 1);
        let prefix = f.log.layout.host_events_prefix("kvm1").unwrap();
        f.store
            .inner
            .put(&format!("{prefix}zz"), b"{}".to_vec(), None)
            .await
            .unwrap();
        assert_eq!(
            f.log.next_seq("kvm1").await.unwrap(),
            5,
            "a foreign key sorting last is no event"
        );
    }

    /// A host writes while `last` reads the other streams: its newer events push older ones out
    /// of its read, which is repeated with room for them; the tail is exactly the newest `k` as of
    /// its revision, and the follower delivers the rest once.
    #[tokio::test]
    async fn a_stream_written_between_the_reads_is_read_again() {
        let f = fixture(1000);
        for seq in 0..5 {
            commit(&f, writes(&f.log, "a", seq..seq + 1)).await;
            commit(&f, writes(&f.log, "b", seq..seq + 1)).await;
        }
        *f.store.before_read.lock().unwrap() = VecDeque::from([
            vec![],
            // Between the reads of a and b: b writes 5..8, one transaction each.
            writes(&f.log, "b", 5..6),
        ]);
        // The queue only holds one transaction per read: put the other two before as well.
        f.store
            .before_read
            .lock()
            .unwrap()
            .get_mut(1)
            .unwrap()
            .extend(writes(&f.log, "b", 6..8));
        let tail = f.log.last::<Value>(&["b", "a", "b"], 4).await.unwrap();
        let prefix = |h: &str| f.log.layout.host_events_prefix(h).unwrap();
        assert_eq!(
            f.store.reads(),
            [
                format!("tail 4 {}", prefix("a")),
                format!("tail 4 {}", prefix("b")),
                format!("tail 7 {}", prefix("b")),
            ],
            "hosts once each, sorted; b again with room for its 3 newer events"
        );
        let all = stored(&f).await;
        let at = tail.follow_from.revision();
        let upto: Vec<_> = all.iter().filter(|e| e.0 <= at).cloned().collect();
        assert_eq!(
            ids(&tail.events),
            upto[upto.len() - 4..],
            "the newest 4 as of `at`"
        );
        assert_eq!(
            tail.events.last().map(|e| (e.host.as_str(), e.seq)),
            Some(("b", 4)),
            "a was read after b's fourth event"
        );
        let after: Vec<_> = all.iter().filter(|e| e.0 > at).cloned().collect();
        assert_eq!(after.len(), 3, "b's events 5..8 come from the follower");
        assert_eq!(follow_n(&f.log, tail.follow_from, 3).await, after);
    }

    /// A host that keeps writing during every re-read: its stream is read in full at last.
    #[tokio::test]
    async fn a_stream_written_during_every_read_is_read_in_full() {
        let f = fixture(1000);
        for seq in 0..6 {
            commit(&f, writes(&f.log, "a", seq..seq + 1)).await;
            commit(&f, writes(&f.log, "b", seq..seq + 1)).await;
        }
        *f.store.before_read.lock().unwrap() = VecDeque::from([
            vec![],
            writes(&f.log, "b", 6..9),
            writes(&f.log, "b", 9..12),
            writes(&f.log, "b", 12..15),
            writes(&f.log, "b", 15..18),
        ]);
        let tail = f.log.last::<Value>(&["a", "b"], 5).await.unwrap();
        let prefix = |h: &str| f.log.layout.host_events_prefix(h).unwrap();
        assert_eq!(
            f.store.reads(),
            [
                format!("tail 5 {}", prefix("a")),
                format!("tail 5 {}", prefix("b")),
                format!("tail 8 {}", prefix("b")),
                format!("tail 11 {}", prefix("b")),
                format!("list {}", prefix("b")),
            ]
        );
        let all = stored(&f).await;
        let at = tail.follow_from.revision();
        let upto: Vec<_> = all.iter().filter(|e| e.0 <= at).cloned().collect();
        assert_eq!(ids(&tail.events), upto[upto.len() - 5..]);
        let after: Vec<_> = all.iter().filter(|e| e.0 > at).cloned().collect();
        assert_eq!(after.len(), 12);
        assert_eq!(follow_n(&f.log, tail.follow_from, 12).await, after);
    }

    /// Events of hosts not asked for are not in the tail; the follower delivers every host's new
    /// events, skips trimming and foreign keys, and reports an undecodable event alone.
    #[tokio::test]
    async fn unlisted_hosts_and_odd_keys() {
        let f = fixture(2);
        commit(&f, writes(&f.log, "a", 0..1)).await;
        commit(&f, writes(&f.log, "ghost", 0..1)).await;
        let tail = f.log.last::<Value>(&["a"], 10).await.unwrap();
        assert_eq!(tail.events.len(), 1, "the ghost's event is not shown");
        let empty = f.log.last::<Value>(&[], 10).await.unwrap();
        assert!(empty.events.is_empty());
        assert_eq!(empty.follow_from, tail.follow_from, "nothing written since");
        assert!(matches!(
            f.log.last::<Value>(&["a", "x/y"], 1).await,
            Err(RecordError::Layout(_))
        ));

        let mut follower = f.log.follow::<Value>(tail.follow_from).await.unwrap();
        let root = f.log.layout.events_prefix();
        let bad = f.log.layout.host_event("a", 1).unwrap();
        f.store
            .inner
            .put(&format!("{root}00000000000000000001"), b"{}".to_vec(), None)
            .await
            .unwrap();
        f.store
            .inner
            .put(&bad, b"not json".to_vec(), None)
            .await
            .unwrap();
        commit(&f, writes(&f.log, "ghost", 1..3)).await;
        assert!(matches!(
            follower.next().await,
            Err(RecordError::Decode { key, .. }) if key == bad
        ));
        for seq in 1..3 {
            let event = follower.next().await.unwrap();
            assert_eq!((event.host.as_str(), event.seq), ("ghost", seq));
        }
        assert_eq!(
            stored(&f).await.iter().filter(|e| e.1 == "ghost").count(),
            2,
            "the ghost keeps 2; the follower skipped the trimming"
        );
    }
}
