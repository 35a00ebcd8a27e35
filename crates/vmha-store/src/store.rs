//! The [`ClusterStore`] trait: the contract every cluster store (embedded redb, etcd) keeps.
//!
//! The model is etcd 3's: a flat, ordered key space of string keys and byte values; one
//! cluster-wide, monotonically increasing [`Revision`] bumped by every write (one revision per
//! write operation, shared by all the changes of that operation); leases with a TTL to which keys
//! are bound and with which they vanish; prefix watches that replay history from a revision; and
//! elections. See `docs/store.md` for the full contract.

use std::fmt;
use std::future::Future;
use std::time::Duration;

/// A store revision. Every write operation that changes something gets the next revision; a key's
/// `mod_revision` is the revision of the write that last changed it. Revisions never go backwards,
/// also across restarts of a persistent store. Existing keys always have a revision > 0.
pub type Revision = u64;

/// The id of a lease granted by [`ClusterStore::grant`]. Unique within one store for as long as
/// the lease lives (the embedded store never reuses an id, even across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted lease: its id and the TTL the store actually granted (which may be longer than the
/// one asked for: TTLs are whole seconds and stores have a minimum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The lease's id, to pass to `put`, `keep_alive`, `revoke`.
    pub id: LeaseId,
    /// The granted TTL. A lease lives *at least* this long after its last acknowledged keepalive.
    pub ttl: Duration,
}

/// One key with its value and metadata, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the write that last changed the key. Use it as the expected revision of a
    /// compare-and-swap.
    pub mod_revision: Revision,
    /// The lease the key is bound to, if any. The key is deleted when that lease ends.
    pub lease: Option<LeaseId>,
}

/// The keys under a prefix, read in one consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The keys, in ascending byte order of the key.
    pub kvs: Vec<KeyValue>,
    /// The store revision of the snapshot. Watching from `revision + 1` sees every later change
    /// and none already reflected in `kvs`.
    pub revision: Revision,
}

/// What a compare-and-swap expects the key to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this `mod_revision`.
    Revision(Revision),
}

/// What a compare-and-swap does when its expectation holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Write the value, bound to the lease if given (which must be live).
    Put {
        /// The new value.
        value: Vec<u8>,
        /// The lease to bind the key to; `None` makes it permanent.
        lease: Option<LeaseId>,
    },
    /// Delete the key.
    Delete,
}

/// The result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The expectation held and the mutation was applied at this revision. (Deleting an absent key
    /// expected absent changes nothing and reports the current store revision.)
    Swapped {
        /// The revision of the write.
        revision: Revision,
    },
    /// The expectation did not hold; nothing was changed.
    Conflict {
        /// The key as it is now (`None`: absent).
        current: Option<KeyValue>,
    },
}

/// One condition of a [`ClusterStore::txn`]: all must hold for the transaction to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent {
        /// The key.
        key: String,
    },
    /// The key exists and was last changed at exactly this revision (its `mod_revision`).
    ModRevision {
        /// The key.
        key: String,
        /// Its expected `mod_revision`.
        revision: Revision,
    },
    /// The key exists and was created at exactly this revision (its `create_revision`): e.g. the
    /// key of an election leader, whose creation revision identifies the leadership term.
    CreateRevision {
        /// The key.
        key: String,
        /// Its expected `create_revision`.
        revision: Revision,
    },
}

/// One write of a [`ClusterStore::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write the value, bound to the lease if given (which must be live).
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// The lease to bind the key to; `None` makes it permanent.
        lease: Option<LeaseId>,
    },
    /// Delete the key (nothing if absent).
    Delete {
        /// The key.
        key: String,
    },
    /// Delete every key `k` with `start <= k < end` (byte order).
    DeleteRange {
        /// First key of the range.
        start: String,
        /// First key after the range.
        end: String,
    },
}

/// The result of a [`ClusterStore::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every condition held and every write was applied, atomically, at this revision (the
    /// current revision when no write changed anything).
    Committed {
        /// The revision of the transaction.
        revision: Revision,
    },
    /// A condition did not hold: nothing was changed.
    Failed,
}

/// The most writes one [`ClusterStore::txn`] may carry (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed; `kv.mod_revision` is the revision of the change.
    Put(KeyValue),
    /// The key was deleted (explicitly, by CAS, or because its lease ended).
    Delete {
        /// The deleted key.
        key: String,
        /// The revision of the deletion.
        revision: Revision,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision at which the change happened.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// The current leader of an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The election's name.
    pub election: String,
    /// The value the leader campaigned with (e.g. its host name).
    pub value: Vec<u8>,
    /// The leader's lease: leadership ends at the latest when this lease ends.
    pub lease: LeaseId,
    /// The store key that holds the leadership (bound to `lease`).
    pub key: String,
    /// The creation revision of `key`: increases with every new leadership term, so it can serve
    /// as a fencing token.
    pub revision: Revision,
}

/// Errors of the cluster store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or has shut down. Retrying later may succeed; for a watch or
    /// keepalive stream, create a new one.
    #[error("cluster store unavailable: {0}")]
    Unavailable(String),
    /// The lease does not exist (any more): it expired or was revoked. Keys bound to it are gone.
    #[error("lease {lease} expired or was revoked")]
    LeaseExpired {
        /// The lease.
        lease: LeaseId,
    },
    /// A watch asked for history the store no longer has. Re-list and watch from the listing.
    #[error("revision {requested} is compacted (history starts after {compact_revision})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The last revision no longer in the history.
        compact_revision: Revision,
    },
    /// A watch fell behind and events were dropped; it delivers nothing more. Re-list and watch
    /// from the listing.
    #[error("watch fell behind by {missed} events; re-list and watch again")]
    Lagged {
        /// How many events were missed (at least).
        missed: u64,
    },
    /// The store file is held by another process (or another handle in this one).
    #[error("store {path} is already open by another process")]
    Locked {
        /// The store file.
        path: String,
    },
    /// Stored data is damaged or not a store of this format.
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// An existing store file cannot be opened as a store (empty, truncated, damaged, foreign, or
    /// not a regular file). It was left as it is; the message says how to recover.
    #[error(
        "the store file {path} cannot be used: {reason}. It was left as it is. To recover: stop \
         vmhad, move the file aside and restore a backup of it; or remove it to start with an \
         empty store, which forgets what this host had stored (frozen VMs, offline apps, \
         maintenance, run-time overrides, budgets, the applied configuration, the event log)"
    )]
    Unusable {
        /// The store file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error of the store's storage.
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The caller passed something the store cannot accept (empty key, zero TTL, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Any other failure of the storage engine.
    #[error("storage engine error: {0}")]
    Backend(String),
}

/// A stream of changes under a prefix, created by [`ClusterStore::watch`].
///
/// Guarantees: events come in revision order, each change exactly once, starting at the revision
/// the watch was created from. A watch never silently drops events: if it cannot deliver one
/// (it lagged, the history is compacted, the store went away) `next` returns an error and the
/// stream is finished; the caller re-lists and starts a new watch (level-triggered reconcile).
pub trait WatchStream: Send + 'static {
    /// The next change. After an `Err`, every later call returns an `Err` too.
    fn next(&mut self) -> impl Future<Output = Result<WatchEvent, StoreError>> + Send;
}

/// A cluster store: consistent key-value storage with revisions, compare-and-swap, leases,
/// watches and elections. Implemented by the embedded store (one host, [`crate::EmbeddedStore`])
/// and by etcd ([`crate::EtcdStore`]); `crate::conformance` checks both behave alike.
///
/// Handles are cheap to clone and safe to use from many tasks at once; every operation is atomic.
/// Keys are non-empty strings (hierarchy by `/`, see [`crate::layout`]); values are bytes.
///
/// **Failures and re-sending.** A networked store (etcd) may send one call to several servers in
/// turn when one does not answer. Each write method says whether it may be re-sent after an
/// attempt whose outcome is unknown; whatever it says, a write that fails with
/// [`StoreError::Unavailable`] may or may not have been applied (re-read before acting on it), and
/// an attempt that went unanswered may still be applied later. An answer other than an error is
/// always genuine (a `Failed` or `Conflict` means the conditions really did not hold).
pub trait ClusterStore: Clone + Send + Sync + 'static {
    /// The watch stream type of this store.
    type Watch: WatchStream;

    /// Reads one key. `None` if it does not exist.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Reads every key starting with `prefix` (the empty prefix reads all), in key order, in one
    /// snapshot, with the snapshot's revision.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    /// Writes a key unconditionally, bound to `lease` if given (the lease must be live, else
    /// [`StoreError::LeaseExpired`]). Returns the revision of the write. Durable on return.
    ///
    /// Writing an existing key keeps its `create_revision`. A networked store may re-send it
    /// after an attempt went unanswered: it may then be applied twice (the same value, two
    /// revisions; watchers see two `Put`s), and the revision returned is that of the answered
    /// attempt.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Atomically: if the key matches `expected`, apply `mutation`, else change nothing and report
    /// the current key. Exactly one of concurrent swaps with the same expectation wins.
    ///
    /// Never re-sent once an attempt may have reached the store (a second attempt would report a
    /// `Conflict` with the first one's own write): when its outcome is unknown it fails with
    /// [`StoreError::Unavailable`] saying so; re-read the key to find out.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        mutation: Mutation,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + Send;

    /// Atomically: if every condition in `compares` holds, apply every write in `ops` (in one
    /// revision, all or none; watchers see them in `ops` order), else change nothing and return
    /// [`TxnOutcome::Failed`]. At most [`MAX_TXN_OPS`] writes (and as many conditions), no empty
    /// key, every `DeleteRange` with `start < end`, and no key written twice (a `DeleteRange`
    /// covering a `Put` key counts, as do overlapping writes of any kind): else
    /// [`StoreError::InvalidArgument`] and nothing changes. A condition on revision 0 never holds.
    /// A `Put` with a lease that is not live fails the whole transaction with
    /// [`StoreError::LeaseExpired`]. Durable on return.
    ///
    /// Without conditions it may be re-sent like [`ClusterStore::put`] (and then be applied twice:
    /// the same writes, two revisions). With conditions it is never re-sent once an attempt may
    /// have reached the store (a second attempt could return `Failed` although the first one
    /// committed): when its outcome is unknown it fails with [`StoreError::Unavailable`] saying so;
    /// read what it writes (or its conditions) to find out.
    fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<TxnOutcome, StoreError>> + Send;

    /// Reads the last `limit` keys (in key order) starting with `prefix`, in one snapshot:
    /// like [`ClusterStore::list`], but only the tail (`kvs` still ascending). Used for the newest
    /// entries of a log whose keys sort by age.
    fn list_tail(
        &self,
        prefix: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    /// Deletes a key. Returns the revision of the deletion, or `None` if the key did not exist
    /// (then nothing changes). Not re-sent once an attempt may have reached the store (a second
    /// attempt would report `None`): when its outcome is unknown it fails with
    /// [`StoreError::Unavailable`].
    fn delete(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Revision>, StoreError>> + Send;

    /// Grants a lease of at least `ttl` (rounded up to whole seconds, raised to the store's
    /// minimum). The lease ends when not kept alive for its TTL, or when revoked.
    ///
    /// A networked store may re-send it after an attempt went unanswered; a lease granted by an
    /// attempt whose answer was lost is never returned to anyone and expires by itself after its
    /// TTL.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Renews a lease: it now lives at least its TTL from the moment this call was *sent*.
    /// Returns the TTL. [`StoreError::LeaseExpired`] if the lease already ended (keys are gone).
    /// Callers time self-fencing from when they sent the last acknowledged keepalive. A renewal is
    /// idempotent: a networked store may send it to several servers in turn within one call.
    fn keep_alive(
        &self,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Duration, StoreError>> + Send;

    /// Ends a lease now, deleting every key bound to it (in one revision; watchers see `Delete`s).
    /// Revoking a lease that already ended is not an error (so it may be re-sent).
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Watches every key starting with `prefix`, delivering each change with revision
    /// `>= from_revision` in order (pass `Listing::revision + 1` after a `list`). Fails with
    /// [`StoreError::Compacted`] if that history is gone.
    fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;

    /// Campaigns in `election` with `value`, bound to `lease`; returns once this campaigner is the
    /// leader (it may wait indefinitely: run it as a cancellable task). Leadership lasts until
    /// [`ClusterStore::resign`] or the end of the lease. On the embedded store a lone campaigner
    /// wins at once.
    fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Leader, StoreError>> + Send;

    /// The current leader of `election`, if any.
    fn leader(
        &self,
        election: &str,
    ) -> impl Future<Output = Result<Option<Leader>, StoreError>> + Send;

    /// Gives up leadership (or a pending candidacy) held by `leader`. Idempotent.
    fn resign(&self, leader: &Leader) -> impl Future<Output = Result<(), StoreError>> + Send;
}
