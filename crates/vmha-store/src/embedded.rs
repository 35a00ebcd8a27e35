//! [`EmbeddedStore`]: the single-host cluster store, one redb file under the state directory.
//!
//! Every write is one durable redb transaction that also persists the store revision. Leases live
//! in memory and expire on tokio time; they do not survive a restart, so opening the store deletes
//! every key bound to a lease of a previous run (its owner process is gone). Watches replay from an
//! in-memory history of the last [`HISTORY_EVENTS`] changes and follow a broadcast channel; the
//! history starts empty at open (everything before is "compacted").

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::election;
use crate::store::{
    CasOutcome, ClusterStore, Expect, KeyValue, Leader, Lease, LeaseId, Listing, Mutation,
    Revision, StoreError, WatchEvent, WatchStream,
};

/// How many past changes the embedded store keeps for watches that start in the past.
pub const HISTORY_EVENTS: usize = 10_000;

/// How many changes a watcher may fall behind before it reports [`StoreError::Lagged`].
const WATCH_BUFFER: usize = 4_096;

/// redb's page cache for this small store.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_NEXT_LEASE: &str = "next_lease";

/// Bytes before the value in a stored record: create revision, mod revision, lease (0 = none).
const HEADER: usize = 24;

/// The single-host cluster store. Cheap to clone (an `Arc` inside); all clones share one database,
/// one lease table and one watch channel. The file stays open (and locked against other
/// processes) until every clone is dropped.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
}

/// Everything that changes with a write; guarded by one mutex so that writes, the history and the
/// broadcast stay in the same order.
struct State {
    revision: Revision,
    next_lease: u64,
    leases: HashMap<LeaseId, LeaseEntry>,
    history: VecDeque<WatchEvent>,
    /// Every change with a revision above this is in `history`.
    compact_revision: Revision,
}

struct LeaseEntry {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store file at `path`, verifying its integrity.
    ///
    /// Keys bound to leases of a previous run are deleted (in one revision). Fails with
    /// [`StoreError::Locked`] if another process has the file open, [`StoreError::Corrupt`] if it is
    /// not an intact store. Blocks on disk I/O: call it at start-up or from a blocking context.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| map_redb(redb::Error::from(e), &path))?;
        let (revision, next_lease) = recover(&db).map_err(|e| map_redb(e, &path))?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        tracing::debug!(path = %path.display(), revision, "embedded store open");
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                state: Mutex::new(State {
                    revision,
                    next_lease,
                    leases: HashMap::new(),
                    history: VecDeque::new(),
                    compact_revision: revision,
                }),
                events,
            }),
        })
    }

    /// Runs `f` on the blocking pool (redb does synchronous disk I/O and fsync).
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

/// On open: create the tables, read the revision, delete keys bound to leases of a previous run.
fn recover(db: &Database) -> Result<(Revision, u64), redb::Error> {
    let txn = db.begin_write()?;
    let (revision, next_lease) = {
        let mut meta = txn.open_table(META)?;
        let mut kv = txn.open_table(KV)?;
        let mut revision = meta.get(META_REVISION)?.map(|v| v.value()).unwrap_or(0);
        let next_lease = meta.get(META_NEXT_LEASE)?.map(|v| v.value()).unwrap_or(1);
        let mut orphans = Vec::new();
        for entry in kv.iter()? {
            let (key, raw) = entry?;
            let record = Record::decode(raw.value()).map_err(|e| corrupted(key.value(), &e))?;
            if record.lease != 0 {
                orphans.push(key.value().to_owned());
            }
        }
        if !orphans.is_empty() {
            revision += 1;
            for key in &orphans {
                kv.remove(key.as_str())?;
            }
            meta.insert(META_REVISION, revision)?;
            tracing::info!(
                count = orphans.len(),
                "deleted keys bound to leases of a previous run"
            );
        }
        (revision, next_lease)
    };
    txn.commit()?;
    Ok((revision, next_lease))
}

fn corrupted(key: &str, detail: &str) -> redb::Error {
    redb::Error::Corrupted(format!("record {key:?}: {detail}"))
}

fn map_redb(e: redb::Error, path: &Path) -> StoreError {
    match e {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            StoreError::Locked {
                path: path.display().to_string(),
            }
        }
        redb::Error::Corrupted(detail) => StoreError::Corrupt(detail),
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupt(io.to_string())
        }
        redb::Error::Io(io) => StoreError::Io(io),
        other => StoreError::Backend(other.to_string()),
    }
}

fn backend<E: Into<redb::Error>>(e: E) -> StoreError {
    map_redb(e.into(), &PathBuf::new())
}

/// One stored key: the metadata header then the value.
struct Record {
    create_revision: Revision,
    mod_revision: Revision,
    /// 0 = no lease.
    lease: i64,
    value: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.value.len());
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.mod_revision.to_be_bytes());
        out.extend_from_slice(&self.lease.to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(raw: &[u8]) -> Result<Record, String> {
        let field = |i: usize| -> Result<[u8; 8], String> {
            raw.get(i * 8..i * 8 + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .ok_or_else(|| format!("record too short ({} bytes)", raw.len()))
        };
        Ok(Record {
            create_revision: u64::from_be_bytes(field(0)?),
            mod_revision: u64::from_be_bytes(field(1)?),
            lease: i64::from_be_bytes(field(2)?),
            value: raw.get(HEADER..).unwrap_or_default().to_vec(),
        })
    }

    fn into_kv(self, key: String) -> KeyValue {
        KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: (self.lease != 0).then_some(LeaseId(self.lease)),
        }
    }
}

fn decode_kv(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    Record::decode(raw)
        .map(|r| r.into_kv(key.to_owned()))
        .map_err(|e| StoreError::Corrupt(format!("record {key:?}: {e}")))
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        Err(StoreError::InvalidArgument("empty key".into()))
    } else {
        Ok(())
    }
}

/// One change a write transaction wants to make.
enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Unavailable("store state poisoned by a panic".into()))
    }

    fn read_key(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let kv = txn.open_table(KV).map_err(backend)?;
        match kv.get(key).map_err(backend)? {
            Some(raw) => decode_kv(key, raw.value()).map(Some),
            None => Ok(None),
        }
    }

    fn read_prefix(&self, prefix: &str) -> Result<Listing, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        let revision = meta
            .get(META_REVISION)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        let kv = txn.open_table(KV).map_err(backend)?;
        let mut kvs = Vec::new();
        for entry in kv.range(prefix..).map_err(backend)? {
            let (key, raw) = entry.map_err(backend)?;
            if !key.value().starts_with(prefix) {
                break;
            }
            kvs.push(decode_kv(key.value(), raw.value())?);
        }
        Ok(Listing { kvs, revision })
    }

    /// Applies `ops` in one durable transaction at the next revision (if they change anything),
    /// after reaping expired leases. `check` sees the current records of the touched keys first
    /// and may veto the write by returning `Some(outcome)`.
    fn write<C>(
        &self,
        now: Instant,
        ops: Vec<Op>,
        check: C,
    ) -> Result<Result<Option<Revision>, CasOutcome>, StoreError>
    where
        C: FnOnce(&[Option<KeyValue>]) -> Option<CasOutcome>,
    {
        let mut state = self.lock()?;
        self.reap(&mut state, now)?;
        for op in &ops {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
            {
                if !state.leases.contains_key(lease) {
                    return Err(StoreError::LeaseExpired { lease: *lease });
                }
            }
        }
        let revision = state.revision + 1;
        let txn = self.db.begin_write().map_err(backend)?;
        let mut events = Vec::new();
        // (key, old lease, new lease) for the in-memory lease index, applied after commit.
        let mut rebinds = Vec::new();
        {
            let mut kv = txn.open_table(KV).map_err(backend)?;
            let mut current = Vec::with_capacity(ops.len());
            for op in &ops {
                let key = match op {
                    Op::Put { key, .. } | Op::Delete { key } => key,
                };
                let old = match kv.get(key.as_str()).map_err(backend)? {
                    Some(raw) => Some(decode_kv(key, raw.value())?),
                    None => None,
                };
                current.push(old);
            }
            if let Some(veto) = check(&current) {
                return Ok(Err(veto));
            }
            for (op, old) in ops.into_iter().zip(current) {
                let old_lease = old.as_ref().and_then(|o| o.lease);
                match op {
                    Op::Put { key, value, lease } => {
                        let record = Record {
                            create_revision: old.map_or(revision, |o| o.create_revision),
                            mod_revision: revision,
                            lease: lease.map_or(0, |l| l.0),
                            value,
                        };
                        kv.insert(key.as_str(), record.encode().as_slice())
                            .map_err(backend)?;
                        rebinds.push((key.clone(), old_lease, lease));
                        events.push(WatchEvent::Put(record.into_kv(key)));
                    }
                    Op::Delete { key } => {
                        if old.is_some() {
                            kv.remove(key.as_str()).map_err(backend)?;
                            rebinds.push((key.clone(), old_lease, None));
                            events.push(WatchEvent::Delete { key, revision });
                        }
                    }
                }
            }
            if events.is_empty() {
                drop(kv);
                txn.abort().map_err(backend)?;
                return Ok(Ok(None));
            }
            txn.open_table(META)
                .map_err(backend)?
                .insert(META_REVISION, revision)
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        state.revision = revision;
        for (key, old, new) in rebinds {
            if let Some(entry) = old.and_then(|l| state.leases.get_mut(&l)) {
                entry.keys.remove(&key);
            }
            if let Some(entry) = new.and_then(|l| state.leases.get_mut(&l)) {
                entry.keys.insert(key);
            }
        }
        self.publish(&mut state, events);
        Ok(Ok(Some(revision)))
    }

    /// Records committed events in the history and sends them to watchers (under the state lock,
    /// so history and broadcast agree on order).
    fn publish(&self, state: &mut State, events: Vec<WatchEvent>) {
        for event in events {
            state.history.push_back(event.clone());
            // No receivers is not an error: nobody is watching.
            let _ = self.events.send(event);
        }
        while state.history.len() > HISTORY_EVENTS {
            if let Some(old) = state.history.pop_front() {
                state.compact_revision = old.revision();
            }
        }
        while state
            .history
            .front()
            .is_some_and(|e| e.revision() <= state.compact_revision)
        {
            state.history.pop_front();
        }
    }

    /// Ends every lease whose deadline has passed, deleting its keys (one revision per lease).
    fn reap(&self, state: &mut State, now: Instant) -> Result<(), StoreError> {
        let expired: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            tracing::info!(lease = %id, "lease expired");
            self.end_lease(state, id)?;
        }
        Ok(())
    }

    /// Removes a lease and deletes its keys in one transaction.
    fn end_lease(&self, state: &mut State, id: LeaseId) -> Result<(), StoreError> {
        let Some(entry) = state.leases.remove(&id) else {
            return Ok(());
        };
        if entry.keys.is_empty() {
            return Ok(());
        }
        let revision = state.revision + 1;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut kv = txn.open_table(KV).map_err(backend)?;
            for key in &entry.keys {
                kv.remove(key.as_str()).map_err(backend)?;
            }
            txn.open_table(META)
                .map_err(backend)?
                .insert(META_REVISION, revision)
                .map_err(backend)?;
        }
        if let Err(e) = txn.commit() {
            // Keep the lease (already past its deadline) so the next write retries the deletion.
            state.leases.insert(id, entry);
            return Err(backend(e));
        }
        state.revision = revision;
        let events = entry
            .keys
            .into_iter()
            .map(|key| WatchEvent::Delete { key, revision })
            .collect();
        self.publish(state, events);
        Ok(())
    }

    fn grant(&self, now: Instant, ttl: Duration) -> Result<Lease, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument("lease TTL must be > 0".into()));
        }
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let ttl = Duration::from_secs(secs);
        let mut state = self.lock()?;
        let raw = state.next_lease;
        let id = i64::try_from(raw)
            .map(LeaseId)
            .map_err(|_| StoreError::Corrupt(format!("lease counter {raw} out of range")))?;
        let txn = self.db.begin_write().map_err(backend)?;
        txn.open_table(META)
            .map_err(backend)?
            .insert(META_NEXT_LEASE, raw + 1)
            .map_err(backend)?;
        txn.commit().map_err(backend)?;
        state.next_lease = raw + 1;
        state.leases.insert(
            id,
            LeaseEntry {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(Lease { id, ttl })
    }

    fn keep_alive(&self, now: Instant, id: LeaseId) -> Result<Duration, StoreError> {
        let mut state = self.lock()?;
        self.reap(&mut state, now)?;
        let entry = state
            .leases
            .get_mut(&id)
            .ok_or(StoreError::LeaseExpired { lease: id })?;
        entry.deadline = now + entry.ttl;
        Ok(entry.ttl)
    }

    fn deadline(&self, id: LeaseId) -> Option<Instant> {
        self.state.lock().ok()?.leases.get(&id).map(|l| l.deadline)
    }
}

/// Sleeps until the lease's deadline and reaps it; follows keepalives; ends with the lease or the
/// store.
async fn lease_timer(store: Weak<Inner>, id: LeaseId) {
    loop {
        let Some(deadline) = store.upgrade().and_then(|inner| inner.deadline(id)) else {
            return;
        };
        tokio::time::sleep_until(deadline).await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let now = Instant::now();
        let reaped = tokio::task::spawn_blocking(move || {
            let mut state = inner.lock()?;
            inner.reap(&mut state, now)
        })
        .await;
        match reaped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(lease = %id, error = %e, "could not delete keys of expired lease; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::error!(lease = %id, error = %e, "lease reaper task failed");
                return;
            }
        }
    }
}

/// The watch stream of the embedded store: replays the history, then follows the broadcast.
pub struct EmbeddedWatch {
    prefix: String,
    from_revision: Revision,
    backlog: VecDeque<WatchEvent>,
    live: broadcast::Receiver<WatchEvent>,
    failed: bool,
}

impl WatchStream for EmbeddedWatch {
    async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        if self.failed {
            return Err(StoreError::Unavailable(
                "watch ended; start a new one".into(),
            ));
        }
        if let Some(event) = self.backlog.pop_front() {
            return Ok(event);
        }
        loop {
            match self.live.recv().await {
                Ok(event)
                    if event.revision() >= self.from_revision
                        && event.key().starts_with(&self.prefix) =>
                {
                    return Ok(event);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.failed = true;
                    return Err(StoreError::Lagged { missed });
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.failed = true;
                    return Err(StoreError::Unavailable("store closed".into()));
                }
            }
        }
    }
}

impl ClusterStore for EmbeddedStore {
    type Watch = EmbeddedWatch;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |inner| inner.read_key(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.read_prefix(&prefix)).await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        check_key(key)?;
        let now = Instant::now();
        let key = key.to_owned();
        self.blocking(move |inner| {
            match inner.write(now, vec![Op::Put { key, value, lease }], |_| None)? {
                Ok(Some(revision)) => Ok(revision),
                _ => Err(StoreError::Backend("put changed nothing".into())),
            }
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        mutation: Mutation,
    ) -> Result<CasOutcome, StoreError> {
        check_key(key)?;
        let now = Instant::now();
        let key = key.to_owned();
        self.blocking(move |inner| {
            let op = match mutation {
                Mutation::Put { value, lease } => Op::Put { key, value, lease },
                Mutation::Delete => Op::Delete { key },
            };
            let check = |current: &[Option<KeyValue>]| {
                let current = current.first().cloned().flatten();
                let holds = match (expected, &current) {
                    (Expect::Absent, None) => true,
                    (Expect::Revision(r), Some(kv)) => kv.mod_revision == r,
                    _ => false,
                };
                (!holds).then_some(CasOutcome::Conflict { current })
            };
            match inner.write(now, vec![op], check)? {
                Err(conflict) => Ok(conflict),
                Ok(Some(revision)) => Ok(CasOutcome::Swapped { revision }),
                Ok(None) => Ok(CasOutcome::Swapped {
                    revision: inner.lock()?.revision,
                }),
            }
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        check_key(key)?;
        let now = Instant::now();
        let key = key.to_owned();
        self.blocking(move |inner| {
            inner
                .write(now, vec![Op::Delete { key }], |_| None)
                .map(|r| r.ok().flatten())
        })
        .await
    }

    async fn grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let now = Instant::now();
        let lease = self.blocking(move |inner| inner.grant(now, ttl)).await?;
        tokio::spawn(lease_timer(Arc::downgrade(&self.inner), lease.id));
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let now = Instant::now();
        self.blocking(move |inner| inner.keep_alive(now, lease))
            .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let now = Instant::now();
        self.blocking(move |inner| {
            let mut state = inner.lock()?;
            inner.reap(&mut state, now)?;
            inner.end_lease(&mut state, lease)
        })
        .await
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<EmbeddedWatch, StoreError> {
        let prefix = prefix.to_owned();
        // The state lock is also held across commits (fsync): take it off the async workers.
        self.blocking(move |inner| {
            let state = inner.lock()?;
            if from_revision <= state.compact_revision {
                return Err(StoreError::Compacted {
                    requested: from_revision,
                    compact_revision: state.compact_revision,
                });
            }
            let backlog = state
                .history
                .iter()
                .filter(|e| e.revision() >= from_revision && e.key().starts_with(&prefix))
                .cloned()
                .collect();
            // Subscribed under the lock: every later change goes to `live`, none is in `backlog`.
            let live = inner.events.subscribe();
            drop(state);
            Ok(EmbeddedWatch {
                prefix,
                from_revision,
                backlog,
                live,
                failed: false,
            })
        })
        .await
    }

    async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Leader, StoreError> {
        election::campaign(self, election, value, lease).await
    }

    async fn leader(&self, election: &str) -> Result<Option<Leader>, StoreError> {
        election::leader(self, election).await
    }

    async fn resign(&self, leader: &Leader) -> Result<(), StoreError> {
        election::resign(self, leader).await
    }
}
