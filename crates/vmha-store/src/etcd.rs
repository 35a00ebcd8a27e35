//! [`EtcdStore`]: the multi-host cluster store on an etcd 3.4 cluster (`etcd-client`).
//!
//! Mapping (see `docs/store.md`):
//! - `get`/`list`/`list_tail`: linearizable `Range` (`list_tail`: sorted by key descending with a
//!   limit, then reversed); `Listing::revision` is the response header's revision.
//! - `put`/`delete`: `Put`/`DeleteRange`; `compare_and_swap`/`txn`: one `Txn`.
//! - leases: `LeaseGrant`, one request per `keep_alive` on a `LeaseKeepAlive` stream kept per lease
//!   in the handle, `LeaseRevoke`.
//! - `watch`: a `Watch` stream forwarded by a task through a bounded channel.
//! - elections: [`crate::election`] on the KV primitives (the keys etcd's election service uses).
//!
//! Every call has a deadline ([`EtcdOptions::request_timeout`]): a cut network becomes
//! [`StoreError::Unavailable`] within it, never a hang. A request that certainly never reached a
//! server (its connection could not be made, or the member has no leader and refused it) is
//! retried on another member within the deadline; reads and keepalives are also retried after
//! other transient failures. A write that fails with `Unavailable` may or may not have been
//! applied. Every method is cancel-safe: a dropped future leaves nothing half-done in the handle
//! (a keepalive stream in use is dropped with it and recreated by the next call).

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client as etcd;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::election;
use crate::store::{
    CasOutcome, ClusterStore, Compare, Expect, KeyValue, Leader, Lease, LeaseId, Listing, Mutation,
    Op, Revision, StoreError, TxnOutcome, WatchEvent, WatchStream,
};
use crate::txn::validate;

/// How many events a watch buffers between its stream and the caller. When full, the watch stops
/// reading its stream (etcd keeps the events for it) until the caller catches up: nothing is
/// dropped.
const WATCH_BUFFER: usize = 256;

/// Interval of HTTP/2 pings while streams are open. etcd (grpc-go) answers pings more often than
/// every 5 s (`--grpc-keepalive-min-time`) with GOAWAY "too_many_pings", so stay well above it.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// How many idle keepalive streams the handle keeps at most (one per lease in use).
const MAX_KEEPERS: usize = 64;

/// The largest response the store accepts (a listing, a batch of watch events). gRPC's default of
/// 4 MiB is too small for, e.g., a full event log; etcd itself sends responses of any size.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Timeouts of an [`EtcdStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// How long establishing a TCP connection to one member may take.
    pub connect_timeout: Duration,
    /// The deadline of every call, retries included: after it the call fails with
    /// [`StoreError::Unavailable`]. Also the interval at which an idle watch probes its stream:
    /// a watch whose stream stops answering fails within about twice this time.
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    /// 2 s to connect, 2 s per call.
    fn default() -> Self {
        EtcdOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// The cluster store on etcd 3.4. Cheap to clone (an `Arc` inside), `Send + Sync`; all clones share
/// one gRPC channel (balanced over the endpoints) and the keepalive streams.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Clients,
    options: EtcdOptions,
    endpoints: String,
    /// Idle keepalive streams by lease. A call takes its lease's stream out while using it, so a
    /// cancelled call drops the stream instead of leaving an unread response on it.
    keepers: Mutex<HashMap<LeaseId, Keeper>>,
}

struct Keeper {
    keeper: etcd::LeaseKeeper,
    stream: etcd::LeaseKeepAliveStream,
}

/// The etcd service clients (cheap clones sharing one channel), each request using fresh clones.
#[derive(Clone)]
struct Clients {
    kv: etcd::KvClient,
    watch: etcd::WatchClient,
    lease: etcd::LeaseClient,
}

/// How a failed request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Only if it certainly did not reach a server (writes).
    IfNotSent,
    /// After any transient failure (reads, keepalives, lease grants and revokes).
    Transient,
}

/// What an etcd error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The request never reached a server that could apply it.
    NotSent,
    /// Connection lost, timeout, leader change: the outcome of a write is unknown.
    Transient,
    LeaseNotFound,
    Compacted,
    FutureRevision,
    Invalid,
    NoSpace,
    Other,
}

fn classify(e: &etcd::Error) -> Class {
    match e {
        etcd::Error::GRpcStatus(status) => {
            if connect_failed(status) {
                return Class::NotSent;
            }
            let message = status.message();
            if message.contains("etcdserver: no leader") {
                // Refused by the member before it did anything: with the "require leader" flag
                // the request never reaches raft on a member that has no leader.
                Class::NotSent
            } else if message.contains("lease not found") {
                Class::LeaseNotFound
            } else if message.contains("required revision has been compacted") {
                Class::Compacted
            } else if message.contains("required revision is a future revision") {
                Class::FutureRevision
            } else if message.contains("database space exceeded") {
                Class::NoSpace
            } else {
                match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Aborted
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Unknown => Class::Transient,
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                        Class::Invalid
                    }
                    _ => Class::Other,
                }
            }
        }
        etcd::Error::LeaseKeepAliveError(message) if message.contains("lease not found") => {
            Class::LeaseNotFound
        }
        etcd::Error::TransportError(_)
        | etcd::Error::IoError(_)
        | etcd::Error::WatchError(_)
        | etcd::Error::LeaseKeepAliveError(_) => Class::Transient,
        etcd::Error::InvalidArgs(_) | etcd::Error::InvalidUri(_) => Class::Invalid,
        _ => Class::Other,
    }
}

/// Whether the status comes from failing to connect (the request was never sent).
fn connect_failed(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Runs `f`, turning a panic inside etcd-client (it unwraps a few fields a conforming server
/// always sets) into an error instead of unwinding through the caller.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, StoreError> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|_| StoreError::Backend(format!("etcd {what}: malformed response")))
}

fn revision(what: &str, raw: i64) -> Result<Revision, StoreError> {
    Revision::try_from(raw)
        .map_err(|_| StoreError::Backend(format!("etcd {what}: negative revision {raw}")))
}

fn header_revision(
    what: &str,
    header: Option<&etcd::ResponseHeader>,
) -> Result<Revision, StoreError> {
    let header = header
        .ok_or_else(|| StoreError::Backend(format!("etcd {what}: response without header")))?;
    revision(what, header.revision())
}

fn to_i64(what: &str, revision: Revision) -> Result<i64, StoreError> {
    i64::try_from(revision)
        .map_err(|_| StoreError::InvalidArgument(format!("{what}: revision {revision} too large")))
}

fn convert_kv(what: &str, kv: &etcd::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv
        .key_str()
        .map_err(|_| StoreError::Backend(format!("etcd {what}: a key is not UTF-8")))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: revision(what, kv.create_revision())?,
        mod_revision: revision(what, kv.mod_revision())?,
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        Err(StoreError::InvalidArgument("empty key".into()))
    } else {
        Ok(())
    }
}

/// The range options for every key under `prefix` (the empty prefix: all keys).
fn prefix_options(prefix: &str) -> etcd::GetOptions {
    if prefix.is_empty() {
        etcd::GetOptions::new().with_all_keys()
    } else {
        etcd::GetOptions::new().with_prefix()
    }
}

/// The key to pass with [`prefix_options`] (etcd-client wants a non-empty key for "all keys").
fn prefix_key(prefix: &str) -> Vec<u8> {
    if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    }
}

/// A compare on `key` that holds iff it exists: the guard that makes a revision compare against 0
/// (which etcd treats as "absent") mean "exists with revision 0", i.e. never.
fn exists(key: &str) -> etcd::Compare {
    etcd::Compare::create_revision(key, etcd::CompareOp::Greater, 0)
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A store on the etcd cluster at `endpoints` (`http://host:port`; TLS is not built in).
    ///
    /// Does not wait for the cluster: connections are made lazily (per member, each within
    /// `connect_timeout`) and re-made after failures, so the handle works once the cluster is
    /// reachable and every call fails with [`StoreError::Unavailable`] within `request_timeout`
    /// while it is not. Requests carry etcd's "require leader" flag, so a member cut off from its
    /// quorum refuses them (and they are retried on another member). Fails with
    /// [`StoreError::InvalidArgument`] for no endpoint, an unparsable one or a zero timeout.
    pub async fn connect(
        endpoints: &[String],
        options: EtcdOptions,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidArgument("no etcd endpoint given".into()));
        }
        if options.connect_timeout.is_zero() || options.request_timeout.is_zero() {
            return Err(StoreError::InvalidArgument(
                "etcd timeouts must be > 0".into(),
            ));
        }
        let connect = etcd::ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(HTTP2_PING_INTERVAL, options.request_timeout)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        let client = tokio::time::timeout(
            options.request_timeout,
            etcd::Client::connect(endpoints, Some(connect)),
        )
        .await
        .map_err(|_| StoreError::Unavailable("etcd client set-up timed out".into()))?
        .map_err(|e| match classify(&e) {
            Class::Invalid => StoreError::InvalidArgument(format!("etcd endpoints: {e}")),
            _ => StoreError::Unavailable(format!("etcd connect: {e}")),
        })?;
        let clients = Clients {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
        };
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                clients,
                options,
                endpoints: endpoints.join(","),
                keepers: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The options the store was connected with.
    pub fn options(&self) -> EtcdOptions {
        self.inner.options
    }

    fn timed_out(&self, what: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "etcd {what}: no answer within {:?} from {} (a write may or may not have been \
             applied)",
            self.inner.options.request_timeout, self.inner.endpoints
        ))
    }

    /// Maps an etcd error of `what`; `lease` is the lease a "lease not found" is about.
    fn map_error(&self, what: &str, e: &etcd::Error, lease: Option<LeaseId>) -> StoreError {
        match classify(e) {
            Class::LeaseNotFound => match lease {
                Some(lease) => StoreError::LeaseExpired { lease },
                None => StoreError::Backend(format!("etcd {what}: {e}")),
            },
            Class::NotSent | Class::Transient => {
                StoreError::Unavailable(format!("etcd {what} ({}): {e}", self.inner.endpoints))
            }
            Class::Invalid | Class::FutureRevision => {
                StoreError::InvalidArgument(format!("etcd {what}: {e}"))
            }
            Class::Compacted => StoreError::Compacted {
                requested: 0,
                compact_revision: 0,
            },
            Class::NoSpace => StoreError::Backend(format!(
                "etcd {what}: the etcd database is full (NOSPACE alarm: compact, defragment and \
                 disarm it): {e}"
            )),
            Class::Other => StoreError::Backend(format!("etcd {what}: {e}")),
        }
    }

    /// Runs one request with the deadline, retrying as `retry` allows while time remains.
    async fn call<T, F, Fut>(
        &self,
        what: &str,
        retry: Retry,
        lease: Option<LeaseId>,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Clients) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            let error = match tokio::time::timeout_at(deadline, f(self.inner.clients.clone())).await
            {
                Err(_) => return Err(self.timed_out(what)),
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => e,
            };
            let class = classify(&error);
            let again = match class {
                Class::NotSent => true,
                Class::Transient => retry == Retry::Transient,
                _ => false,
            };
            if !again || Instant::now() + backoff >= deadline {
                return Err(self.map_error(what, &error, lease));
            }
            tracing::debug!(what, error = %error, "etcd request failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    async fn range(
        &self,
        what: &str,
        key: Vec<u8>,
        options: etcd::GetOptions,
    ) -> Result<etcd::GetResponse, StoreError> {
        self.call(what, Retry::Transient, None, |mut client| {
            let key = key.clone();
            let options = options.clone();
            async move { client.kv.get(key, Some(options)).await }
        })
        .await
    }

    fn listing(&self, what: &str, response: &etcd::GetResponse) -> Result<Listing, StoreError> {
        let kvs = response
            .kvs()
            .iter()
            .map(|kv| convert_kv(what, kv))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Listing {
            kvs,
            revision: header_revision(what, response.header())?,
        })
    }

    async fn send_txn(
        &self,
        what: &str,
        txn: etcd::Txn,
        lease: Option<LeaseId>,
    ) -> Result<etcd::TxnResponse, StoreError> {
        self.call(what, Retry::IfNotSent, lease, |mut client| {
            let txn = txn.clone();
            async move { client.kv.txn(txn).await }
        })
        .await
    }

    /// One keepalive on `lease`'s stream (created if there is none): the TTL etcd answered, and
    /// the stream to keep for the next call.
    async fn keep_alive_once(
        &self,
        lease: LeaseId,
        existing: Option<Keeper>,
    ) -> Result<(i64, Keeper), etcd::Error> {
        let mut keeper = match existing {
            Some(keeper) => keeper,
            None => {
                // Opening the stream already renews the lease once (and fails with "lease not
                // found" if it ended); the request below then reports its TTL.
                let (keeper, stream) = self.inner.clients.lease.clone().keep_alive(lease.0).await?;
                Keeper { keeper, stream }
            }
        };
        keeper.keeper.keep_alive().await?;
        match keeper.stream.message().await? {
            Some(response) if response.id() == lease.0 => Ok((response.ttl(), keeper)),
            Some(response) => Err(etcd::Error::LeaseKeepAliveError(format!(
                "keepalive answered for lease {:x}, not {lease}",
                response.id()
            ))),
            None => Err(etcd::Error::LeaseKeepAliveError(
                "keepalive stream closed".into(),
            )),
        }
    }

    fn take_keeper(&self, lease: LeaseId) -> Option<Keeper> {
        self.inner.keepers.lock().ok()?.remove(&lease)
    }

    fn return_keeper(&self, lease: LeaseId, keeper: Keeper) {
        if let Ok(mut keepers) = self.inner.keepers.lock() {
            if keepers.len() >= MAX_KEEPERS {
                keepers.clear();
            }
            keepers.insert(lease, keeper);
        }
    }
}

impl ClusterStore for EtcdStore {
    type Watch = EtcdWatch;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let response = self
            .range("get", key.as_bytes().to_vec(), etcd::GetOptions::new())
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| convert_kv("get", kv))
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let response = self
            .range("list", prefix_key(prefix), prefix_options(prefix))
            .await?;
        self.listing("list", &response)
    }

    async fn list_tail(&self, prefix: &str, limit: usize) -> Result<Listing, StoreError> {
        let options = if limit == 0 {
            prefix_options(prefix).with_count_only()
        } else {
            prefix_options(prefix)
                .with_sort(etcd::SortTarget::Key, etcd::SortOrder::Descend)
                .with_limit(i64::try_from(limit).unwrap_or(i64::MAX))
        };
        let response = self.range("list_tail", prefix_key(prefix), options).await?;
        let mut listing = self.listing("list_tail", &response)?;
        if limit == 0 {
            listing.kvs.clear();
        }
        listing.kvs.reverse();
        Ok(listing)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        check_key(key)?;
        let options = etcd::PutOptions::new().with_lease(lease.map_or(0, |l| l.0));
        let response = self
            .call("put", Retry::IfNotSent, lease, |mut client| {
                let value = value.clone();
                let options = options.clone();
                async move { client.kv.put(key, value, Some(options)).await }
            })
            .await?;
        header_revision("put", response.header())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        mutation: Mutation,
    ) -> Result<CasOutcome, StoreError> {
        check_key(key)?;
        let compares = match expected {
            Expect::Absent => vec![etcd::Compare::create_revision(
                key,
                etcd::CompareOp::Equal,
                0,
            )],
            Expect::Revision(r) => {
                let mut compares = vec![etcd::Compare::mod_revision(
                    key,
                    etcd::CompareOp::Equal,
                    to_i64("compare_and_swap", r)?,
                )];
                if r == 0 {
                    compares.push(exists(key));
                }
                compares
            }
        };
        let (op, lease) = match mutation {
            Mutation::Put { value, lease } => (
                etcd::TxnOp::put(
                    key,
                    value,
                    Some(etcd::PutOptions::new().with_lease(lease.map_or(0, |l| l.0))),
                ),
                lease,
            ),
            Mutation::Delete => (etcd::TxnOp::delete(key, None), None),
        };
        let txn = etcd::Txn::new()
            .when(compares)
            .and_then(vec![op])
            .or_else(vec![etcd::TxnOp::get(key, None)]);
        let response = self.send_txn("compare_and_swap", txn, lease).await?;
        let revision = header_revision("compare_and_swap", response.header())?;
        if response.succeeded() {
            return Ok(CasOutcome::Swapped { revision });
        }
        let responses = guarded("compare_and_swap", || response.op_responses())?;
        let current = match responses.first() {
            Some(etcd::TxnOpResponse::Get(get)) => get
                .kvs()
                .first()
                .map(|kv| convert_kv("compare_and_swap", kv))
                .transpose()?,
            _ => {
                return Err(StoreError::Backend(
                    "etcd compare_and_swap: the failure branch returned no range".into(),
                ));
            }
        };
        Ok(CasOutcome::Conflict { current })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        validate(&compares, &ops)?;
        let mut when = Vec::with_capacity(compares.len());
        for compare in &compares {
            match compare {
                Compare::Absent { key } => {
                    when.push(etcd::Compare::create_revision(
                        key.as_str(),
                        etcd::CompareOp::Equal,
                        0,
                    ));
                }
                Compare::ModRevision { key, revision } => {
                    when.push(etcd::Compare::mod_revision(
                        key.as_str(),
                        etcd::CompareOp::Equal,
                        to_i64("txn", *revision)?,
                    ));
                    if *revision == 0 {
                        when.push(exists(key));
                    }
                }
                Compare::CreateRevision { key, revision } => {
                    when.push(etcd::Compare::create_revision(
                        key.as_str(),
                        etcd::CompareOp::Equal,
                        to_i64("txn", *revision)?,
                    ));
                    if *revision == 0 {
                        when.push(exists(key));
                    }
                }
            }
        }
        // etcd does not say which lease was not found: report the first one.
        let mut lease = None;
        let then: Vec<etcd::TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put {
                    key,
                    value,
                    lease: put_lease,
                } => {
                    lease = lease.or(put_lease);
                    let options = etcd::PutOptions::new().with_lease(put_lease.map_or(0, |l| l.0));
                    etcd::TxnOp::put(key, value, Some(options))
                }
                Op::Delete { key } => etcd::TxnOp::delete(key, None),
                Op::DeleteRange { start, end } => {
                    etcd::TxnOp::delete(start, Some(etcd::DeleteOptions::new().with_range(end)))
                }
            })
            .collect();
        let txn = etcd::Txn::new().when(when).and_then(then);
        let response = self.send_txn("txn", txn, lease).await?;
        if response.succeeded() {
            Ok(TxnOutcome::Committed {
                revision: header_revision("txn", response.header())?,
            })
        } else {
            Ok(TxnOutcome::Failed)
        }
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        check_key(key)?;
        let response = self
            .call("delete", Retry::IfNotSent, None, |mut client| async move {
                client.kv.delete(key, None).await
            })
            .await?;
        if response.deleted() == 0 {
            return Ok(None);
        }
        header_revision("delete", response.header()).map(Some)
    }

    async fn grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument("lease TTL must be > 0".into()));
        }
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs)
            .map_err(|_| StoreError::InvalidArgument(format!("lease TTL {ttl:?} too long")))?;
        // Retried after transient failures too: a lease granted by a lost attempt just expires.
        let response = self
            .call("grant", Retry::Transient, None, |mut client| async move {
                client.lease.grant(secs, None).await
            })
            .await?;
        if !response.error().is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd grant: {}",
                response.error()
            )));
        }
        let granted = u64::try_from(response.ttl())
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| {
                StoreError::Backend(format!("etcd grant: granted TTL {}", response.ttl()))
            })?;
        Ok(Lease {
            id: LeaseId(response.id()),
            ttl: Duration::from_secs(granted),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            let existing = self.take_keeper(lease);
            // On timeout or cancellation the stream in use is dropped with the future.
            let attempt =
                tokio::time::timeout_at(deadline, self.keep_alive_once(lease, existing)).await;
            let error = match attempt {
                Err(_) => return Err(self.timed_out("keep_alive")),
                Ok(Ok((ttl, keeper))) => {
                    return match u64::try_from(ttl).ok().filter(|t| *t > 0) {
                        Some(ttl) => {
                            self.return_keeper(lease, keeper);
                            Ok(Duration::from_secs(ttl))
                        }
                        None => Err(StoreError::LeaseExpired { lease }),
                    };
                }
                Ok(Err(e)) => e,
            };
            // The stream (if any) is gone: the next attempt opens a new one, possibly to another
            // member.
            match classify(&error) {
                Class::NotSent | Class::Transient if Instant::now() + backoff < deadline => {
                    tracing::debug!(lease = %lease, error = %error, "keepalive failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                _ => return Err(self.map_error("keep_alive", &error, Some(lease))),
            }
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        drop(self.take_keeper(lease));
        let result = self
            .call(
                "revoke",
                Retry::Transient,
                Some(lease),
                |mut client| async move { client.lease.revoke(lease.0).await },
            )
            .await;
        match result {
            Ok(_) | Err(StoreError::LeaseExpired { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<EtcdWatch, StoreError> {
        // etcd reads start revision 0 as "from now": the history starts at 1.
        let from = from_revision.max(1);
        let start = to_i64("watch", from)?;
        let options = if prefix.is_empty() {
            etcd::WatchOptions::new().with_all_keys()
        } else {
            etcd::WatchOptions::new().with_prefix()
        }
        .with_start_revision(start);
        let key = prefix_key(prefix);
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let open = async {
            let mut stream = self
                .call("watch", Retry::Transient, None, |mut client| {
                    let key = key.clone();
                    let options = options.clone();
                    async move { client.watch.watch(key, Some(options)).await }
                })
                .await?;
            let created = stream
                .message()
                .await
                .map_err(|e| self.map_error("watch", &e, None))?
                .ok_or_else(|| {
                    StoreError::Unavailable("etcd watch: stream closed before creation".into())
                })?;
            Ok::<_, StoreError>((stream, created))
        };
        let (mut stream, created) = tokio::time::timeout_at(deadline, open)
            .await
            .map_err(|_| self.timed_out("watch"))??;
        if let Some(error) = watch_failure(&created, from) {
            return Err(error);
        }
        if !created.created() {
            return Err(StoreError::Backend(
                "etcd watch: first response is not the creation".into(),
            ));
        }
        // Replaying history: report forgotten history now, not on the first `next`. A range at
        // revision `from` fails iff revision `from` is compacted, exactly when the watch fails.
        let current = header_revision("watch", created.header())?;
        if from <= current {
            let check = self
                .range(
                    "watch",
                    prefix_key(prefix),
                    prefix_options(prefix)
                        .with_revision(start)
                        .with_count_only(),
                )
                .await;
            if let Err(StoreError::Compacted { .. }) = check {
                // etcd cancels the watch with the compaction revision right after creating it.
                let cancel = tokio::time::timeout_at(
                    Instant::now() + self.inner.options.request_timeout,
                    stream.message(),
                )
                .await;
                if let Ok(Ok(Some(response))) = cancel {
                    if let Some(error) = watch_failure(&response, from) {
                        return Err(error);
                    }
                }
                return Err(StoreError::Compacted {
                    requested: from,
                    compact_revision: from,
                });
            }
            check?;
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(forward(
            stream,
            tx,
            from,
            self.inner.options.request_timeout,
        ));
        Ok(EtcdWatch { rx, failed: false })
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

/// The error a watch response announces, if it ends the watch: compaction (etcd's
/// `compact_revision` is the first revision kept, so the last one forgotten is one less) or a
/// cancellation.
fn watch_failure(response: &etcd::WatchResponse, requested: Revision) -> Option<StoreError> {
    let compact = response.compact_revision();
    if compact > 0 {
        let compact_revision = u64::try_from(compact - 1).unwrap_or(0).max(requested);
        return Some(StoreError::Compacted {
            requested,
            compact_revision,
        });
    }
    if response.canceled() {
        return Some(StoreError::Unavailable(format!(
            "etcd cancelled the watch: {}",
            response.cancel_reason()
        )));
    }
    None
}

fn convert_event(event: &etcd::Event) -> Result<WatchEvent, StoreError> {
    let kv = event
        .kv()
        .ok_or_else(|| StoreError::Backend("etcd watch: event without key".into()))?;
    let kind = guarded("watch", || event.event_type())?;
    match kind {
        etcd::EventType::Put => convert_kv("watch", kv).map(WatchEvent::Put),
        etcd::EventType::Delete => {
            let key = kv
                .key_str()
                .map_err(|_| StoreError::Backend("etcd watch: a key is not UTF-8".into()))?;
            Ok(WatchEvent::Delete {
                key: key.to_owned(),
                revision: revision("watch", kv.mod_revision())?,
            })
        }
    }
}

/// Forwards a watch stream's events to `tx` in order until an error (sent as the last item) or
/// until the receiver is dropped (which drops the stream, cancelling the watch in etcd).
///
/// While idle, it asks etcd for a progress report every `probe` and fails the watch with
/// `Unavailable` when one goes unanswered for `probe`: a dead connection cannot keep a watch
/// silent forever.
async fn forward(
    stream: etcd::WatchStream,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
    from: Revision,
    probe: Duration,
) {
    let (mut requests, mut responses) = stream.split();
    let mut ticker = tokio::time::interval_at(Instant::now() + probe, probe);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut probe_sent: Option<Instant> = None;
    let mut next_revision = from;
    let failure = loop {
        tokio::select! {
            () = tx.closed() => return,
            message = responses.message() => {
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => break StoreError::Unavailable("etcd closed the watch stream".into()),
                    Err(e) => break StoreError::Unavailable(format!("etcd watch stream failed: {e}")),
                };
                if let Some(error) = watch_failure(&response, next_revision) {
                    break error;
                }
                let mut failed = None;
                for event in response.events() {
                    let event = match convert_event(event) {
                        Ok(event) => event,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    };
                    next_revision = event.revision() + 1;
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if let Some(error) = failed {
                    break error;
                }
                // Any answer (and the time spent waiting for the receiver) clears the probe.
                probe_sent = None;
                ticker.reset();
            }
            _ = ticker.tick() => {
                match probe_sent {
                    Some(sent) if sent.elapsed() >= probe => {
                        break StoreError::Unavailable(format!(
                            "etcd watch stream silent for {:?}; connection presumed lost",
                            sent.elapsed()
                        ));
                    }
                    Some(_) => {}
                    None => {
                        if let Err(e) = requests.request_progress().await {
                            break StoreError::Unavailable(format!("etcd watch stream failed: {e}"));
                        }
                        probe_sent = Some(Instant::now());
                    }
                }
            }
        }
    };
    // The receiver may be gone too; nothing else to tell.
    let _ = tx.send(Err(failure)).await;
}

/// The watch stream of the etcd store. Events come through a bounded channel from a task reading
/// the etcd stream, in revision order, none dropped; the first error (`Compacted`, `Unavailable`,
/// …) ends it, and every later `next` fails too. Dropping it cancels the watch in etcd.
pub struct EtcdWatch {
    rx: mpsc::Receiver<Result<WatchEvent, StoreError>>,
    failed: bool,
}

impl WatchStream for EtcdWatch {
    async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        if self.failed {
            return Err(StoreError::Unavailable(
                "watch ended; start a new one".into(),
            ));
        }
        match self.rx.recv().await {
            Some(Ok(event)) => Ok(event),
            Some(Err(e)) => {
                self.failed = true;
                Err(e)
            }
            None => {
                self.failed = true;
                Err(StoreError::Unavailable("etcd watch task ended".into()))
            }
        }
    }
}
