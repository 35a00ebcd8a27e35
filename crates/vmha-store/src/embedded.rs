//! [`EmbeddedStore`]: the single-host cluster store, one redb file under the state directory.
//!
//! Every write is one durable redb transaction that also persists the store revision. Leases live
//! in memory and expire on tokio time; they do not survive a restart, so opening the store deletes
//! every key bound to a lease of a previous run (its owner process is gone). Watches replay from an
//! in-memory history of the last [`HISTORY_EVENTS`] changes and follow a broadcast channel; the
//! history starts empty at open (everything before is "compacted").
//!
//! After an I/O error (a full disk, a failing device) redb refuses every later write until the
//! database is closed and opened again. The store does that by itself: the next operation after
//! such an error drops the `Database` and opens the file again, reconciling the in-memory revision,
//! lease index and watch history with what is on disk. Leases stay valid across that reopen.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::election;
use crate::store::{
    CasOutcome, ClusterStore, Compare, Expect, KeyValue, Leader, Lease, LeaseId, Listing, Mutation,
    Op, Revision, StoreError, TxnOutcome, WatchEvent, WatchStream,
};
use crate::txn::{prefix_end, validate};

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

type KvTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// The single-host cluster store. Cheap to clone (an `Arc` inside); all clones share one database,
/// one lease table and one watch channel. The file stays open (and locked against other
/// processes) until every clone is dropped.
#[derive(Clone)]
pub struct EmbeddedStore {
    handle: Arc<Handle>,
}

/// Shared by the clones of one [`EmbeddedStore`]; dropping the last closes the file, even while
/// background tasks (lease timers, abandoned blocking calls) still hold the [`Inner`].
struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close();
    }
}

struct Inner {
    path: PathBuf,
    /// `None` once closed, or after an I/O error when opening the file again failed too.
    db: RwLock<Option<Database>>,
    /// An I/O error happened: the next operation closes and reopens the database first.
    broken: AtomicBool,
    /// Every handle is gone: the file is closed for good.
    closed: AtomicBool,
    state: Mutex<State>,
}

/// Everything that changes with a write; guarded by one mutex so that writes, the history and the
/// broadcast stay in the same order. Lock order: `state`, then `db`.
struct State {
    revision: Revision,
    next_lease: u64,
    leases: HashMap<LeaseId, LeaseEntry>,
    history: VecDeque<WatchEvent>,
    /// Every change with a revision above this is in `history`.
    compact_revision: Revision,
    /// Live watchers subscribe here (under this lock, so history and broadcast agree).
    events: broadcast::Sender<WatchEvent>,
}

struct LeaseEntry {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// What a write plans to change once it has read the current records.
enum Change {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// A write's decision after reading: apply these changes, or change nothing and report `V`.
enum Plan<V> {
    Apply(Vec<Change>),
    Veto(V),
}

/// The result of an applied write.
struct Written {
    /// The write's revision, or the current revision if it changed nothing.
    revision: Revision,
    changed: bool,
}

impl EmbeddedStore {
    /// Opens the store file at `path`, verifying its integrity, or creates it (mode 0600) when
    /// nothing exists at `path`.
    ///
    /// A new store is initialised under a temporary name and linked into place complete, so a
    /// crash or a full disk while creating it never leaves a half-made `path` behind. Anything
    /// that exists at `path` is opened, never re-initialised: an empty file, a damaged or foreign
    /// file, or something that is not a regular file fails with [`StoreError::Unusable`] (naming
    /// the file and how to recover) and is left untouched. Keys bound to leases of a previous run
    /// are deleted (in one revision). Fails with [`StoreError::Locked`] if another process has
    /// the file open. Blocks on disk I/O: call it at start-up or from a blocking context.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = match open_existing(&path)? {
            Some(db) => db,
            None => create_db(&path)?,
        };
        let (revision, next_lease) = recover(&db).map_err(|e| unusable(e, &path))?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        tracing::debug!(path = %path.display(), revision, "embedded store open");
        let inner = Arc::new(Inner {
            path,
            db: RwLock::new(Some(db)),
            broken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            state: Mutex::new(State {
                revision,
                next_lease,
                leases: HashMap::new(),
                history: VecDeque::new(),
                compact_revision: revision,
                events,
            }),
        });
        Ok(EmbeddedStore {
            handle: Arc::new(Handle { inner }),
        })
    }

    /// Runs `f` on the blocking pool (redb does synchronous disk I/O and fsync).
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.handle.inner);
        tokio::task::spawn_blocking(move || inner.run(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder
        .set_cache_size(CACHE_BYTES)
        .set_check_integrity_on_open(true);
    builder
}

/// Opens the existing store file at `path` (never creating or re-initialising it); `None` if
/// nothing exists there.
fn open_existing(path: &Path) -> Result<Option<Database>, StoreError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Io(e)),
    };
    // A symlink is followed; what it leads to must be a regular file.
    let target = if meta.file_type().is_symlink() {
        std::fs::metadata(path)
            .map_err(|e| unusable_file(path, format!("a symlink that cannot be followed ({e})")))?
    } else {
        meta
    };
    if !target.is_file() {
        return Err(unusable_file(path, "not a regular file"));
    }
    if target.len() == 0 {
        return Err(unusable_file(path, "the file is empty (0 bytes)"));
    }
    // Looked at read-only first: a file that is not a vmha store is refused before the writer's
    // open could change a byte of it. A store that needs repair (vmhad crashed) is repaired by
    // the writer's open.
    match builder().open_read_only(path) {
        Ok(db) => {
            if !has_meta(&db).map_err(|e| unusable(e, path))? {
                return Err(unusable(not_a_store(), path));
            }
        }
        Err(redb::DatabaseError::RepairAborted) => {}
        Err(e) => return Err(unusable(e.into(), path)),
    }
    builder()
        .open(path)
        .map(Some)
        .map_err(|e| unusable(redb::Error::from(e), path))
}

/// Whether the database has the store's metadata table (every store file has it from creation).
fn has_meta(db: &impl ReadableDatabase) -> Result<bool, redb::Error> {
    Ok(db
        .begin_read()?
        .list_tables()?
        .any(|t| t.name() == META.name()))
}

fn not_a_store() -> redb::Error {
    redb::Error::Corrupted("not a vmha store (a database without its metadata table)".to_owned())
}

/// Creates a new, initialised store at `path`: built under a temporary name in the same
/// directory (mode 0600), made durable, then hard-linked to `path`, which fails if anything
/// appeared there meanwhile (then that is opened instead).
fn create_db(path: &Path) -> Result<Database, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(StoreError::InvalidArgument(format!(
            "{} is not a file path",
            path.display()
        )));
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut temp_name = name.to_os_string();
    temp_name.push(format!(".new-{}", std::process::id()));
    let temp = dir.join(temp_name);
    // A leftover of an earlier process with this pid that crashed while creating.
    let _ = std::fs::remove_file(&temp);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    let made = (|| {
        let backend =
            redb::backends::FileBackend::new(file).map_err(|e| map_redb(e.into(), &temp))?;
        let db = builder()
            .create_with_backend(backend)
            .map_err(|e| map_redb(e.into(), &temp))?;
        init(&db).map_err(|e| map_redb(e, &temp))?;
        Ok::<_, StoreError>(db)
    })();
    let linked = made.and_then(|db| {
        std::fs::hard_link(&temp, path)?;
        Ok(db)
    });
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(db) => {
            std::fs::File::open(dir).and_then(|d| d.sync_all())?;
            tracing::info!(path = %path.display(), "created a new, empty store");
            Ok(db)
        }
        Err(StoreError::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Someone else created it meanwhile: theirs it is.
            open_existing(path)?.ok_or(StoreError::Io(e))
        }
        Err(e) => Err(e),
    }
}

/// Makes a new store's tables, so that every store file that exists has them.
fn init(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        txn.open_table(KV)?;
        meta.insert(META_REVISION, 0)?;
    }
    txn.commit()?;
    Ok(())
}

/// Opens the file again after an I/O error: it exists (it was open), and is never re-created.
fn reopen_db(path: &Path) -> Result<Database, StoreError> {
    open_existing(path)?.ok_or_else(|| {
        StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the store file {} was removed while open", path.display()),
        ))
    })
}

/// On open: check the tables, read the revision, delete keys bound to leases of a previous run.
fn recover(db: &Database) -> Result<(Revision, u64), redb::Error> {
    if !has_meta(db)? {
        return Err(not_a_store());
    }
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
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            StoreError::Io(std::io::Error::new(
                io.kind(),
                format!("disk full, the write was not applied: {io}"),
            ))
        }
        redb::Error::Io(io) => StoreError::Io(io),
        redb::Error::PreviousIo | redb::Error::DatabaseClosed => {
            StoreError::Io(std::io::Error::other(
                "the store file had an I/O error; it is reopened on the next operation",
            ))
        }
        other => StoreError::Backend(other.to_string()),
    }
}

/// [`StoreError::Unusable`] for a store file that cannot be opened, with how to recover; a lock
/// held by another process or an I/O error of the file system keep their own variants.
fn unusable(e: redb::Error, path: &Path) -> StoreError {
    match map_redb(e, path) {
        StoreError::Corrupt(detail) | StoreError::Backend(detail) => unusable_file(path, detail),
        StoreError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            unusable_file(path, format!("the file is truncated ({io})"))
        }
        other => other,
    }
}

/// [`StoreError::Unusable`] for the file at `path`.
fn unusable_file(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Unusable {
        path: path.display().to_string(),
        reason: reason.into(),
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

/// Reads one key from a table (of a read or a write transaction).
fn read_kv<T>(table: &T, key: &str) -> Result<Option<KeyValue>, StoreError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key).map_err(backend)? {
        Some(raw) => decode_kv(key, raw.value()).map(Some),
        None => Ok(None),
    }
}

/// The key bounds of everything starting with `prefix`.
fn prefix_bounds(prefix: &str) -> (Bound<String>, Bound<String>) {
    let end = prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded);
    (Bound::Included(prefix.to_owned()), end)
}

/// Reads the keys within `bounds`: every one, or only the last `tail` of them.
fn read_range<T>(
    table: &T,
    bounds: (Bound<String>, Bound<String>),
    tail: Option<usize>,
) -> Result<Vec<KeyValue>, StoreError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    let bounds = (
        bounds.0.as_ref().map(String::as_str),
        bounds.1.as_ref().map(String::as_str),
    );
    let range = table.range::<&str>(bounds).map_err(backend)?;
    let decode = |entry: Result<
        (redb::AccessGuard<'_, &str>, redb::AccessGuard<'_, &[u8]>),
        redb::StorageError,
    >| {
        let (key, raw) = entry.map_err(backend)?;
        decode_kv(key.value(), raw.value())
    };
    match tail {
        None => range.map(decode).collect(),
        Some(limit) => {
            let mut kvs = range
                .rev()
                .take(limit)
                .map(decode)
                .collect::<Result<Vec<_>, _>>()?;
            kvs.reverse();
            Ok(kvs)
        }
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        Err(StoreError::InvalidArgument("empty key".into()))
    } else {
        Ok(())
    }
}

fn closed() -> StoreError {
    StoreError::Io(std::io::Error::other(
        "the store file is not open (closed, or reopening it after an I/O error failed)",
    ))
}

fn poisoned() -> StoreError {
    StoreError::Unavailable("store state poisoned by a panic".into())
}

/// Whether a transaction condition holds for the key's current record.
fn holds(compare: &Compare, current: Option<&KeyValue>) -> bool {
    match (compare, current) {
        (Compare::Absent { .. }, None) => true,
        (Compare::ModRevision { revision, .. }, Some(kv)) => kv.mod_revision == *revision,
        (Compare::CreateRevision { revision, .. }, Some(kv)) => kv.create_revision == *revision,
        _ => false,
    }
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// Closes the file for good (the last handle is gone), releasing its lock at once.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut slot = match self.db.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(db) = slot.take() {
            if let Err(e) = db.close() {
                tracing::warn!(path = %self.path.display(), error = %e, "closing the store file failed");
            }
        }
    }

    /// Runs one operation; an I/O error marks the database for reopening by the next operation.
    fn run<T>(&self, f: impl FnOnce(&Inner) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = f(self);
        if let Err(StoreError::Io(e)) = &result {
            if !self.broken.swap(true, Ordering::AcqRel) {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "store I/O error; the file is reopened on the next operation");
            }
        }
        result
    }

    /// Runs `f` with the database for reading (reopening it first after an I/O error).
    fn read<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        if self.broken.load(Ordering::Acquire) {
            let mut state = self.lock()?;
            self.reopen_if_broken(&mut state)?;
        }
        let guard = self.db.read().map_err(|_| poisoned())?;
        let db = guard.as_ref().ok_or_else(closed)?;
        f(db)
    }

    /// Runs `f` with the state and the database for writing (reopening it first after an I/O
    /// error). Writes are serialised by the state lock.
    fn write_with<T>(
        &self,
        f: impl FnOnce(&Database, &mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = self.lock()?;
        self.reopen_if_broken(&mut state)?;
        let guard = self.db.read().map_err(|_| poisoned())?;
        let db = guard.as_ref().ok_or_else(closed)?;
        f(db, &mut state)
    }

    /// After an I/O error: drops the `Database` and opens the file again, then reconciles the
    /// in-memory state with the file. A commit that failed may still have reached the disk: if the
    /// stored revision differs from the one in memory, the watch history is reset (watchers get an
    /// error and re-list) and the revision continues from the higher of both.
    fn reopen_if_broken(&self, state: &mut State) -> Result<(), StoreError> {
        if !self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.db.write().map_err(|_| poisoned())?;
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        if let Some(old) = slot.take() {
            if let Err(e) = old.close() {
                tracing::warn!(error = %e, "closing the store file after an I/O error failed");
            }
        }
        let db = reopen_db(&self.path)?;
        self.reconcile(&db, state)?;
        *slot = Some(db);
        self.broken.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), revision = state.revision,
            "store file reopened after an I/O error");
        Ok(())
    }

    fn reconcile(&self, db: &Database, state: &mut State) -> Result<(), StoreError> {
        let (stored_revision, stored_next_lease, leased) = {
            let txn = db.begin_read().map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            let revision = meta
                .get(META_REVISION)
                .map_err(backend)?
                .map_or(0, |v| v.value());
            let next_lease = meta
                .get(META_NEXT_LEASE)
                .map_err(backend)?
                .map_or(1, |v| v.value());
            let kv = txn.open_table(KV).map_err(backend)?;
            let mut leased = Vec::new();
            for entry in kv.iter().map_err(backend)? {
                let (key, raw) = entry.map_err(backend)?;
                let kv = decode_kv(key.value(), raw.value())?;
                if let Some(lease) = kv.lease {
                    leased.push((kv.key, lease));
                }
            }
            (revision, next_lease, leased)
        };
        state.next_lease = state.next_lease.max(stored_next_lease);
        if stored_revision != state.revision {
            tracing::warn!(
                stored = stored_revision,
                memory = state.revision,
                "a failed write reached the disk; watchers must re-list"
            );
            state.revision = state.revision.max(stored_revision);
            state.history.clear();
            state.compact_revision = state.revision;
            // Existing watchers see the old channel close and report an error.
            state.events = broadcast::channel(WATCH_BUFFER).0;
        }
        for entry in state.leases.values_mut() {
            entry.keys.clear();
        }
        let mut orphans = BTreeSet::new();
        for (key, lease) in leased {
            match state.leases.get_mut(&lease) {
                Some(entry) => {
                    entry.keys.insert(key);
                }
                None => {
                    orphans.insert(key);
                }
            }
        }
        if !orphans.is_empty() {
            // Bound to a lease that ended while its deletion could not be written.
            let revision = state.revision + 1;
            delete_keys(db, &orphans, revision)?;
            state.revision = revision;
            let events = orphans
                .into_iter()
                .map(|key| WatchEvent::Delete { key, revision })
                .collect();
            publish(state, events);
        }
        Ok(())
    }

    fn read_key(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let kv = txn.open_table(KV).map_err(backend)?;
            read_kv(&kv, key)
        })
    }

    fn read_prefix(&self, prefix: &str, tail: Option<usize>) -> Result<Listing, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            let revision = meta
                .get(META_REVISION)
                .map_err(backend)?
                .map_or(0, |v| v.value());
            let kv = txn.open_table(KV).map_err(backend)?;
            let kvs = match tail {
                Some(0) => Vec::new(),
                _ => read_range(&kv, prefix_bounds(prefix), tail)?,
            };
            Ok(Listing { kvs, revision })
        })
    }

    /// One durable write at the next revision (if it changes anything), after reaping expired
    /// leases. `plan` reads the current records in the write transaction and decides what to
    /// change, or vetoes. Leases of planned puts must be live ([`StoreError::LeaseExpired`]).
    fn write<V>(
        &self,
        now: Instant,
        plan: impl FnOnce(&KvTable<'_>) -> Result<Plan<V>, StoreError>,
    ) -> Result<Result<Written, V>, StoreError> {
        self.write_with(|db, state| {
            reap(db, state, now)?;
            let revision = state.revision + 1;
            let txn = db.begin_write().map_err(backend)?;
            let mut events = Vec::new();
            // (key, old lease, new lease) for the in-memory lease index, applied after commit.
            let mut rebinds = Vec::new();
            {
                let mut kv = txn.open_table(KV).map_err(backend)?;
                let changes = match plan(&kv)? {
                    Plan::Veto(veto) => return Ok(Err(veto)),
                    Plan::Apply(changes) => changes,
                };
                for change in &changes {
                    if let Change::Put {
                        lease: Some(lease), ..
                    } = change
                    {
                        if !state.leases.contains_key(lease) {
                            return Err(StoreError::LeaseExpired { lease: *lease });
                        }
                    }
                }
                for change in changes {
                    match change {
                        Change::Put { key, value, lease } => {
                            let old = read_kv(&kv, &key)?;
                            let old_lease = old.as_ref().and_then(|o| o.lease);
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
                        Change::Delete { key } => {
                            if let Some(old) = read_kv(&kv, &key)? {
                                kv.remove(key.as_str()).map_err(backend)?;
                                rebinds.push((key.clone(), old.lease, None));
                                events.push(WatchEvent::Delete { key, revision });
                            }
                        }
                    }
                }
                if events.is_empty() {
                    drop(kv);
                    txn.abort().map_err(backend)?;
                    return Ok(Ok(Written {
                        revision: state.revision,
                        changed: false,
                    }));
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
            publish(state, events);
            Ok(Ok(Written {
                revision,
                changed: true,
            }))
        })
    }

    fn grant(&self, now: Instant, ttl: Duration) -> Result<Lease, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument("lease TTL must be > 0".into()));
        }
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let ttl = Duration::from_secs(secs);
        self.write_with(|db, state| {
            let raw = state.next_lease;
            let id = i64::try_from(raw)
                .map(LeaseId)
                .map_err(|_| StoreError::Corrupt(format!("lease counter {raw} out of range")))?;
            let txn = db.begin_write().map_err(backend)?;
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
        })
    }

    fn keep_alive(&self, now: Instant, id: LeaseId) -> Result<Duration, StoreError> {
        self.write_with(|db, state| {
            // A lease that cannot be deleted (I/O error) must not stop the others' keepalives.
            if let Err(e) = reap(db, state, now) {
                tracing::warn!(error = %e, "could not delete the keys of an expired lease");
            }
            match state.leases.get_mut(&id) {
                Some(entry) if entry.deadline > now => {
                    entry.deadline = now + entry.ttl;
                    Ok(entry.ttl)
                }
                _ => Err(StoreError::LeaseExpired { lease: id }),
            }
        })
    }

    /// [`Inner::keep_alive`] when it needs no disk and no wait: the file is open and healthy,
    /// the state lock is free and no lease has expired (deleting an expired lease's keys is a
    /// commit). `None`: renew on the blocking pool instead. A renewal is a change in memory
    /// only, so taking it here saves the blocking pool's thread hand-off on every keepalive.
    fn try_keep_alive(&self, now: Instant, id: LeaseId) -> Option<Result<Duration, StoreError>> {
        if self.broken.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut state = self.state.try_lock().ok()?;
        if state.leases.values().any(|l| l.deadline <= now) {
            return None;
        }
        Some(match state.leases.get_mut(&id) {
            Some(entry) => {
                entry.deadline = now + entry.ttl;
                Ok(entry.ttl)
            }
            None => Err(StoreError::LeaseExpired { lease: id }),
        })
    }

    fn revoke(&self, now: Instant, id: LeaseId) -> Result<(), StoreError> {
        self.write_with(|db, state| {
            reap(db, state, now)?;
            end_lease(db, state, id)
        })
    }

    fn reap_expired(&self, now: Instant) -> Result<(), StoreError> {
        self.write_with(|db, state| reap(db, state, now))
    }

    fn deadline(&self, id: LeaseId) -> Option<Instant> {
        self.state.lock().ok()?.leases.get(&id).map(|l| l.deadline)
    }
}

/// Records committed events in the history and sends them to watchers (under the state lock,
/// so history and broadcast agree on order).
fn publish(state: &mut State, events: Vec<WatchEvent>) {
    for event in events {
        state.history.push_back(event.clone());
        // No receivers is not an error: nobody is watching.
        let _ = state.events.send(event);
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
fn reap(db: &Database, state: &mut State, now: Instant) -> Result<(), StoreError> {
    let expired: Vec<LeaseId> = state
        .leases
        .iter()
        .filter(|(_, l)| l.deadline <= now)
        .map(|(id, _)| *id)
        .collect();
    for id in expired {
        tracing::info!(lease = %id, "lease expired");
        end_lease(db, state, id)?;
    }
    Ok(())
}

/// Removes a lease and deletes its keys in one transaction.
fn end_lease(db: &Database, state: &mut State, id: LeaseId) -> Result<(), StoreError> {
    let Some(entry) = state.leases.remove(&id) else {
        return Ok(());
    };
    if entry.keys.is_empty() {
        return Ok(());
    }
    let revision = state.revision + 1;
    if let Err(e) = delete_keys(db, &entry.keys, revision) {
        // Keep the lease, as ended (past its deadline), so that the next write retries the
        // deletion.
        let mut entry = entry;
        entry.deadline = entry.deadline.min(Instant::now());
        state.leases.insert(id, entry);
        return Err(e);
    }
    state.revision = revision;
    let events = entry
        .keys
        .into_iter()
        .map(|key| WatchEvent::Delete { key, revision })
        .collect();
    publish(state, events);
    Ok(())
}

/// Deletes `keys` in one durable transaction at `revision`.
fn delete_keys(
    db: &Database,
    keys: &BTreeSet<String>,
    revision: Revision,
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    {
        let mut kv = txn.open_table(KV).map_err(backend)?;
        for key in keys {
            kv.remove(key.as_str()).map_err(backend)?;
        }
        txn.open_table(META)
            .map_err(backend)?
            .insert(META_REVISION, revision)
            .map_err(backend)?;
    }
    txn.commit().map_err(backend)
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
        let reaped = tokio::task::spawn_blocking(move || inner.run(|i| i.reap_expired(now))).await;
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
                    return Err(StoreError::Unavailable(
                        "store closed or reopened after an I/O error; re-list and watch again"
                            .into(),
                    ));
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
        self.blocking(move |inner| inner.read_prefix(&prefix, None))
            .await
    }

    async fn list_tail(&self, prefix: &str, limit: usize) -> Result<Listing, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.read_prefix(&prefix, Some(limit)))
            .await
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
            let change = Change::Put { key, value, lease };
            match inner.write::<()>(now, |_| Ok(Plan::Apply(vec![change])))? {
                Ok(written) if written.changed => Ok(written.revision),
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
            let plan = |kv: &KvTable<'_>| {
                let current = read_kv(kv, &key)?;
                let holds = match (expected, &current) {
                    (Expect::Absent, None) => true,
                    (Expect::Revision(r), Some(kv)) => kv.mod_revision == r,
                    _ => false,
                };
                if !holds {
                    return Ok(Plan::Veto(CasOutcome::Conflict { current }));
                }
                let change = match mutation {
                    Mutation::Put { value, lease } => Change::Put { key, value, lease },
                    Mutation::Delete => Change::Delete { key },
                };
                Ok(Plan::Apply(vec![change]))
            };
            Ok(match inner.write(now, plan)? {
                Err(conflict) => conflict,
                Ok(written) => CasOutcome::Swapped {
                    revision: written.revision,
                },
            })
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        validate(&compares, &ops)?;
        let now = Instant::now();
        self.blocking(move |inner| {
            let plan = |kv: &KvTable<'_>| {
                for compare in &compares {
                    let current = read_kv(kv, crate::txn::compare_key(compare))?;
                    if !holds(compare, current.as_ref()) {
                        return Ok(Plan::Veto(TxnOutcome::Failed));
                    }
                }
                let mut changes = Vec::with_capacity(ops.len());
                for op in ops {
                    match op {
                        Op::Put { key, value, lease } => {
                            changes.push(Change::Put { key, value, lease });
                        }
                        Op::Delete { key } => changes.push(Change::Delete { key }),
                        Op::DeleteRange { start, end } => {
                            let bounds = (Bound::Included(start), Bound::Excluded(end));
                            for existing in read_range(kv, bounds, None)? {
                                changes.push(Change::Delete { key: existing.key });
                            }
                        }
                    }
                }
                Ok(Plan::Apply(changes))
            };
            Ok(match inner.write(now, plan)? {
                Err(failed) => failed,
                Ok(written) => TxnOutcome::Committed {
                    revision: written.revision,
                },
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        check_key(key)?;
        let now = Instant::now();
        let key = key.to_owned();
        self.blocking(move |inner| {
            let written =
                inner.write::<()>(now, |_| Ok(Plan::Apply(vec![Change::Delete { key }])))?;
            Ok(written.ok().filter(|w| w.changed).map(|w| w.revision))
        })
        .await
    }

    async fn grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let now = Instant::now();
        let lease = self.blocking(move |inner| inner.grant(now, ttl)).await?;
        tokio::spawn(lease_timer(Arc::downgrade(&self.handle.inner), lease.id));
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let now = Instant::now();
        if let Some(renewed) = self.handle.inner.try_keep_alive(now, lease) {
            return renewed;
        }
        self.blocking(move |inner| inner.keep_alive(now, lease))
            .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let now = Instant::now();
        self.blocking(move |inner| inner.revoke(now, lease)).await
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
            let live = state.events.subscribe();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The file is released when the last handle goes, even while a background task (a lease
    /// timer checking its deadline, an abandoned blocking call) still holds the shared state.
    #[tokio::test]
    async fn dropping_the_last_handle_releases_the_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        store.grant(Duration::from_secs(600)).await.unwrap();
        let background = Arc::clone(&store.handle.inner);
        drop(store);
        let again = EmbeddedStore::open(&path).expect("the file is free again");
        assert!(matches!(background.read_key("/k"), Err(StoreError::Io(_))));
        drop(again);
    }

    /// Renewals taken without the blocking pool behave as the others: a live lease is renewed;
    /// while another lease has expired, its keys are still deleted first; an unknown or ended
    /// lease is `LeaseExpired`; a closed store renews nothing.
    #[tokio::test]
    async fn renewals_without_the_blocking_pool_keep_the_lease_rules() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("store.redb")).unwrap();
        let kept = store.grant(Duration::from_secs(600)).await.unwrap();
        let short = store.grant(Duration::from_secs(300)).await.unwrap();
        store
            .put("/short", b"x".to_vec(), Some(short.id))
            .await
            .unwrap();
        let inner = Arc::clone(&store.handle.inner);
        let now = Instant::now();
        assert!(matches!(inner.try_keep_alive(now, kept.id), Some(Ok(ttl)) if ttl == kept.ttl));
        assert!(inner.deadline(kept.id).unwrap() >= now + kept.ttl);
        assert!(matches!(
            inner.try_keep_alive(now, LeaseId(i64::MAX)),
            Some(Err(StoreError::LeaseExpired { .. }))
        ));
        // Past the short lease's deadline, before its timer reaped it: the fast path steps
        // aside and the renewal deletes the expired lease's keys before renewing.
        let later = now + Duration::from_secs(400);
        assert!(inner.try_keep_alive(later, kept.id).is_none());
        inner.keep_alive(later, kept.id).unwrap();
        assert!(store.list("/short").await.unwrap().kvs.is_empty());
        assert!(matches!(
            store.keep_alive(short.id).await,
            Err(StoreError::LeaseExpired { .. })
        ));
        // Busy (a commit holds the state lock): the blocking pool takes it.
        let held = inner.state.lock().unwrap();
        assert!(inner.try_keep_alive(Instant::now(), kept.id).is_none());
        drop(held);
        inner.closed.store(true, Ordering::Release);
        assert!(inner.try_keep_alive(Instant::now(), kept.id).is_none());
    }
}
