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
//! **Members.** The handle keeps one connection per member and sends each request to one member,
//! the *preferred* one (the last that answered) first. A member that does not answer an attempt
//! within [`EtcdOptions::attempt_timeout`] (a member cut off the network, or frozen, accepts
//! requests and never answers) or whose connection fails is *suspect*: calls try it only after
//! every other member, a fresh connection probes it every second, and it is trusted again once it
//! answers. A member without a leader refuses requests at once ("require leader"): the next member
//! is tried.
//!
//! **Retries.** Every call has a deadline ([`EtcdOptions::request_timeout`]), retries included: a
//! cut network becomes [`StoreError::Unavailable`] within it, never a hang. Reads, keepalives,
//! lease grants and revokes, watch creation, unconditional `put`s and `txn`s without conditions
//! are idempotent enough to re-send: after an attempt went unanswered for the attempt timeout,
//! another member is tried while the first attempt may still answer (the first answer wins), and
//! after a transient error too. A `txn` with conditions, `compare_and_swap` and `delete` are
//! re-sent only when the attempt certainly did not reach a server (its connection could not be
//! made, or the member had no leader and refused it): their answer depends on whether an earlier
//! attempt was applied. When such an attempt goes unanswered and its member does not answer a
//! probe either, they fail with `Unavailable` saying that the outcome is unknown. A write that
//! fails with `Unavailable` may or may not have been applied. Every method is cancel-safe: a
//! dropped future leaves nothing half-done in the handle (a keepalive stream in use is dropped
//! with it and recreated by the next call).

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use etcd_client as etcd;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
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
/// (Too slow to notice a silent member: attempt timeouts and probes do that.)
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// How many idle keepalive streams the handle keeps at most (one per lease in use).
const MAX_KEEPERS: usize = 64;

/// The largest response the store accepts (a listing, a batch of watch events). gRPC's default of
/// 4 MiB is too small for, e.g., a full event log; etcd itself sends responses of any size.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Upper bound of [`EtcdOptions::attempt_timeout`]: an etcd member on a LAN answers within a few
/// milliseconds, a commit within tens; 700 ms without an answer means the member is gone or cut
/// off (or the cluster has no leader, which no other member can help with either).
const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(700);

/// How long a member that did not answer (or could not be connected to) stays suspect after its
/// last failed probe: calls try it only after every other member meanwhile.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// Pause between two probes of a suspect member.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a member that answered "no leader" is tried after the others.
const NO_LEADER_AVOID: Duration = Duration::from_secs(1);

/// First pause before re-sending a request to a member that failed it; doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// How often in a row a watch may lose its stream (and be re-created on another member) without
/// any answer on the re-created stream before it fails with `Unavailable`.
const MAX_WATCH_RESUMES: u32 = 3;

/// Timeouts of an [`EtcdStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// How long establishing a TCP connection to one member may take; capped at three quarters of
    /// [`EtcdOptions::attempt_timeout`], so that a member whose host is unreachable fails the
    /// connection (the request certainly not sent: safe to re-send anywhere) before the attempt
    /// times out.
    pub connect_timeout: Duration,
    /// The deadline of every call, retries and failover included: after it the call fails with
    /// [`StoreError::Unavailable`]. Also sets the attempt timeout
    /// ([`EtcdOptions::attempt_timeout`]).
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

impl EtcdOptions {
    /// How long one attempt on one member may go unanswered before that member is suspected to
    /// be silent and another one is tried: a third of `request_timeout`, at most 700 ms (667 ms
    /// with the defaults). Also how long an idle watch waits for the answer to a progress request
    /// (sent every attempt timeout while idle) before it moves to another member.
    pub fn attempt_timeout(&self) -> Duration {
        (self.request_timeout / 3)
            .min(MAX_ATTEMPT_TIMEOUT)
            .max(Duration::from_millis(1))
    }

    fn member_connect_timeout(&self) -> Duration {
        self.connect_timeout
            .min(self.attempt_timeout() * 3 / 4)
            .max(Duration::from_millis(1))
    }
}

/// The cluster store on etcd 3.4. Cheap to clone (an `Arc` inside), `Send + Sync`; all clones share
/// the connections (one per member), the member states and the keepalive streams.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    /// The member tried first: the last one that answered.
    preferred: AtomicUsize,
    options: EtcdOptions,
    connect: etcd::ConnectOptions,
    endpoints: String,
    /// Idle keepalive streams by lease. A call takes its lease's stream out while using it, so a
    /// cancelled call drops the stream instead of leaving an unread response on it.
    keepers: Mutex<HashMap<LeaseId, Keeper>>,
}

struct Member {
    endpoint: String,
    state: Mutex<MemberState>,
}

struct MemberState {
    /// The member's connection (re-made by each probe of a suspect member).
    clients: Clients,
    /// While set and in the future, calls try this member only after every other one.
    avoid_until: Option<Instant>,
    /// Whether a probe task is checking on this member.
    probing: bool,
}

struct Keeper {
    /// The member the stream is open on.
    member: usize,
    keeper: etcd::LeaseKeeper,
    stream: etcd::LeaseKeepAliveStream,
}

/// The etcd service clients of one member (cheap clones sharing its connection).
#[derive(Clone)]
struct Clients {
    kv: etcd::KvClient,
    watch: etcd::WatchClient,
    lease: etcd::LeaseClient,
    maintenance: etcd::MaintenanceClient,
}

/// What a request does, which decides how it may be re-sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Reads, keepalives, lease grants and revokes, watch creation: re-sent after any transient
    /// failure, and on another member while an unanswered attempt may still answer.
    Read,
    /// Unconditional writes (`put`, `txn` without conditions): re-sent like reads; an attempt that
    /// timed out may still be applied, so the write may be applied twice (same result, two
    /// revisions).
    Write,
    /// Writes whose answer depends on whether an earlier attempt was applied (`txn` with
    /// conditions, `compare_and_swap`, `delete`): re-sent only if certainly not sent.
    Guarded,
}

impl Kind {
    fn writes(self) -> bool {
        self != Kind::Read
    }
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
            if no_leader(e) {
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

/// Whether the member refused the request for lack of a leader.
fn no_leader(e: &etcd::Error) -> bool {
    matches!(e, etcd::Error::GRpcStatus(status) if status.message().contains("etcdserver: no leader"))
}

/// Whether the error is an answer of the etcd server itself (the member is alive), not a failure
/// of the connection.
fn server_answered(e: &etcd::Error) -> bool {
    match e {
        etcd::Error::GRpcStatus(status) => {
            std::error::Error::source(status).is_none()
                && (status.message().starts_with("etcdserver:")
                    || status.message().starts_with("mvcc:"))
        }
        _ => false,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The clients of a member, on a new connection (made lazily, on the first request).
async fn member_clients(
    endpoint: &str,
    connect: &etcd::ConnectOptions,
) -> Result<Clients, etcd::Error> {
    let client = etcd::Client::connect([endpoint], Some(connect.clone())).await?;
    Ok(Clients {
        kv: client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
        watch: client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
        lease: client.lease_client(),
        maintenance: client.maintenance_client(),
    })
}

impl Inner {
    /// The members in the order a call tries them: the preferred one, then the others in endpoint
    /// order after it; members under suspicion (or without a leader a moment ago) after all
    /// others.
    fn order(&self) -> Vec<usize> {
        let n = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let now = Instant::now();
        let (mut order, avoided): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|k| (first + k) % n)
            .partition(|&i| !self.avoided(i, now));
        order.extend(avoided);
        order
    }

    fn avoided(&self, i: usize, now: Instant) -> bool {
        lock(&self.members[i].state)
            .avoid_until
            .is_some_and(|until| until > now)
    }

    /// Whether member `i` is suspect and has not answered a probe since.
    fn silent(&self, i: usize) -> bool {
        let state = lock(&self.members[i].state);
        state.probing
            && state
                .avoid_until
                .is_some_and(|until| until > Instant::now())
    }

    fn clients(&self, i: usize) -> Clients {
        lock(&self.members[i].state).clients.clone()
    }

    fn endpoint(&self, i: usize) -> &str {
        &self.members[i].endpoint
    }

    /// Member `i` answered: it is tried first from now on and is no longer avoided.
    fn answered(&self, i: usize) {
        self.preferred.store(i, Ordering::Relaxed);
        lock(&self.members[i].state).avoid_until = None;
    }

    /// Member `i` has no leader: try the others first for a moment.
    fn avoid_briefly(&self, i: usize) {
        let until = Instant::now() + NO_LEADER_AVOID;
        let mut state = lock(&self.members[i].state);
        state.avoid_until = Some(state.avoid_until.map_or(until, |t| t.max(until)));
    }
}

/// Member `i` did not answer in time, or its connection failed: calls try it after every other
/// member, and a task probes it (on a fresh connection) until it answers.
fn suspect(inner: &Arc<Inner>, i: usize, why: &str) {
    let member = &inner.members[i];
    let start_probing = {
        let mut state = lock(&member.state);
        state.avoid_until = Some(Instant::now() + SUSPECT_FOR);
        !std::mem::replace(&mut state.probing, true)
    };
    if start_probing {
        tracing::warn!(
            endpoint = %member.endpoint,
            why,
            "etcd member suspect: trying the other members first until it answers a probe"
        );
        tokio::spawn(probe(Arc::downgrade(inner), i));
    }
}

/// What went wrong with each member during one call: the last failure of each and how many
/// there were, so an error names every member once however often it was retried.
#[derive(Debug, Default)]
struct Failures {
    /// `(member, last failure, count)`, in the order members first failed.
    members: Vec<(usize, String, u32)>,
}

impl Failures {
    /// Notes a failure of member `i`.
    fn note(&mut self, i: usize, failure: String) {
        match self.members.iter_mut().find(|(m, _, _)| *m == i) {
            Some(entry) => {
                entry.1 = failure;
                entry.2 += 1;
            }
            None => self.members.push((i, failure, 1)),
        }
    }

    /// ` (endpoint: last failure [×N]; …)`, or nothing when nothing failed.
    fn describe(&self, inner: &Inner) -> String {
        if self.members.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = self
            .members
            .iter()
            .map(|(i, failure, n)| {
                let times = if *n > 1 {
                    format!(" (×{n})")
                } else {
                    String::new()
                };
                format!("{}: {failure}{times}", inner.endpoint(*i))
            })
            .collect();
        format!(" ({})", parts.join("; "))
    }
}

/// Notes what a failed request says about member `i`.
fn note_failure(inner: &Arc<Inner>, i: usize, error: &etcd::Error) {
    if no_leader(error) {
        inner.avoid_briefly(i);
    } else if matches!(classify(error), Class::NotSent | Class::Transient)
        && !server_answered(error)
    {
        suspect(inner, i, &error.to_string());
    }
}

/// Probes suspect member `i` every [`PROBE_INTERVAL`], each time on a new connection (the old one
/// may be what is broken), until it answers (any answer of etcd, "no leader" included: it is
/// alive) or the store is dropped. The new connection replaces the member's.
async fn probe(inner: Weak<Inner>, i: usize) {
    loop {
        let Some(store) = inner.upgrade() else {
            return;
        };
        let member = &store.members[i];
        let clients = match member_clients(&member.endpoint, &store.connect).await {
            Ok(clients) => clients,
            Err(e) => {
                // Cannot happen: the endpoint was accepted by `connect`.
                tracing::error!(endpoint = %member.endpoint, error = %e, "cannot probe etcd member");
                lock(&member.state).probing = false;
                return;
            }
        };
        let answer = tokio::time::timeout(
            store.options.attempt_timeout(),
            clients.maintenance.clone().status(),
        )
        .await;
        let alive = match &answer {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => server_answered(e),
            Err(_) => false,
        };
        {
            let mut state = lock(&member.state);
            state.clients = clients;
            if alive {
                state.avoid_until = None;
                state.probing = false;
            } else {
                state.avoid_until = Some(Instant::now() + SUSPECT_FOR);
            }
        }
        if alive {
            tracing::info!(endpoint = %member.endpoint, "etcd member answers again");
            return;
        }
        drop(store);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// One member's part in a call.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// When the attempt in flight on this member was sent.
    sent: Option<Instant>,
    /// The attempt in flight went unanswered for the attempt timeout.
    overdue: bool,
    /// (Guarded) whether the overdue attempt's member was checked for silence.
    checked: bool,
    /// After a failure: not before then again.
    ready_at: Option<Instant>,
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
    /// A store on the etcd cluster at `endpoints` (`http://host:port`, one per member; TLS is not
    /// built in). The first endpoint is the first preferred member.
    ///
    /// Does not wait for the cluster: connections are made lazily (one per member, each within
    /// the connect timeout) and re-made after failures, so the handle works once the cluster is
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
            .with_connect_timeout(options.member_connect_timeout())
            .with_keep_alive(HTTP2_PING_INTERVAL, options.request_timeout)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let clients =
                tokio::time::timeout(options.request_timeout, member_clients(endpoint, &connect))
                    .await
                    .map_err(|_| StoreError::Unavailable("etcd client set-up timed out".into()))?
                    .map_err(|e| match classify(&e) {
                        Class::Invalid => {
                            StoreError::InvalidArgument(format!("etcd endpoint {endpoint}: {e}"))
                        }
                        _ => StoreError::Unavailable(format!("etcd connect to {endpoint}: {e}")),
                    })?;
            members.push(Member {
                endpoint: endpoint.clone(),
                state: Mutex::new(MemberState {
                    clients,
                    avoid_until: None,
                    probing: false,
                }),
            });
        }
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                members,
                preferred: AtomicUsize::new(0),
                options,
                connect,
                endpoints: endpoints.join(","),
                keepers: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The options the store was connected with.
    pub fn options(&self) -> EtcdOptions {
        self.inner.options
    }

    /// The endpoint of the member calls currently try first (the last one that answered, unless
    /// it is suspect): for diagnostics and tests.
    pub fn preferred_endpoint(&self) -> &str {
        self.inner.endpoint(self.inner.order()[0])
    }

    /// The call's deadline passed.
    fn no_answer(&self, what: &str, kind: Kind, failures: &Failures) -> StoreError {
        let tried = failures.describe(&self.inner);
        let write = if kind.writes() {
            "; the write may or may not have been applied"
        } else {
            ""
        };
        StoreError::Unavailable(format!(
            "etcd {what}: no answer within {:?} from {}{tried}{write}",
            self.inner.options.request_timeout, self.inner.endpoints
        ))
    }

    /// A guarded write went unanswered by a member that is silent.
    fn outcome_unknown(&self, what: &str, i: usize) -> StoreError {
        StoreError::Unavailable(format!(
            "etcd {what}: {} did not answer within {:?} and does not answer probes: the outcome \
             is unknown (the write may or may not have been applied, and is not re-sent: a \
             second attempt could fail its conditions although the first one committed); \
             re-read before retrying",
            self.inner.endpoint(i),
            self.inner.options.attempt_timeout()
        ))
    }

    /// Maps an etcd error of `what` answered by member `i`; `lease` is the lease a "lease not
    /// found" is about.
    fn map_error(
        &self,
        what: &str,
        kind: Kind,
        i: usize,
        e: &etcd::Error,
        lease: Option<LeaseId>,
    ) -> StoreError {
        match classify(e) {
            Class::LeaseNotFound => match lease {
                Some(lease) => StoreError::LeaseExpired { lease },
                None => StoreError::Backend(format!("etcd {what}: {e}")),
            },
            class @ (Class::NotSent | Class::Transient) => {
                let unknown = if kind.writes() && class == Class::Transient {
                    "; the outcome is unknown: the write may or may not have been applied"
                } else {
                    ""
                };
                StoreError::Unavailable(format!(
                    "etcd {what} ({}): {e}{unknown}",
                    self.inner.endpoint(i)
                ))
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

    /// Runs one request within the deadline, on the members in preference order, re-sending it
    /// as `kind` allows. `f(member, clients)` makes one attempt on `member`.
    ///
    /// One attempt is in flight at first, on the preferred member. An attempt unanswered after
    /// the attempt timeout makes its member suspect; a `Read`/`Write` then also goes to the next
    /// member while the overdue attempt keeps running (the first answer wins), and a `Guarded`
    /// one keeps waiting if the member answers a probe (alive, just slow) and fails with "outcome
    /// unknown" otherwise. A failed attempt is re-sent (with a growing pause per member) when the
    /// error says it was not sent, and for `Read`/`Write` after any transient error.
    async fn call<T, F, Fut>(
        &self,
        what: &str,
        kind: Kind,
        lease: Option<LeaseId>,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(usize, Clients) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.options.request_timeout;
        let attempt_timeout = inner.options.attempt_timeout();
        let mut slots = vec![Slot::default(); inner.members.len()];
        let mut attempts = FuturesUnordered::new();
        let mut backoff = FIRST_BACKOFF;
        let mut failures = Failures::default();
        loop {
            let now = Instant::now();
            let in_flight = slots.iter().filter(|s| s.sent.is_some()).count();
            let live = slots
                .iter()
                .filter(|s| s.sent.is_some() && !s.overdue)
                .count();
            let launch = match kind {
                Kind::Guarded => in_flight == 0,
                Kind::Read | Kind::Write => live == 0,
            };
            let mut wake = deadline;
            if launch {
                let idle: Vec<usize> = inner
                    .order()
                    .into_iter()
                    .filter(|&i| slots[i].sent.is_none())
                    .collect();
                let ready = idle
                    .iter()
                    .copied()
                    .find(|&i| slots[i].ready_at.is_none_or(|t| t <= now));
                if let Some(i) = ready {
                    slots[i].sent = Some(now);
                    slots[i].overdue = false;
                    slots[i].checked = false;
                    let attempt = f(i, inner.clients(i));
                    attempts.push(async move { (i, attempt.await) });
                    continue;
                }
                let next_ready = idle.iter().filter_map(|&i| slots[i].ready_at).min();
                if in_flight == 0 && next_ready.is_none_or(|t| t >= deadline) {
                    return Err(self.no_answer(what, kind, &failures));
                }
                if let Some(t) = next_ready {
                    wake = wake.min(t);
                }
            }
            for slot in &slots {
                if let Some(sent) = slot.sent {
                    if !slot.overdue {
                        wake = wake.min(sent + attempt_timeout);
                    } else if kind == Kind::Guarded && !slot.checked {
                        // The probe started when it became overdue has had its time by then.
                        wake = wake.min(sent + 2 * attempt_timeout);
                    }
                }
            }
            tokio::select! {
                biased;
                Some((i, result)) = attempts.next() => {
                    slots[i].sent = None;
                    let error = match result {
                        Ok(value) => {
                            inner.answered(i);
                            return Ok(value);
                        }
                        Err(error) => error,
                    };
                    note_failure(inner, i, &error);
                    let again = match classify(&error) {
                        Class::NotSent => true,
                        Class::Transient => kind != Kind::Guarded,
                        _ => false,
                    };
                    if !again {
                        return Err(self.map_error(what, kind, i, &error, lease));
                    }
                    tracing::debug!(what, endpoint = inner.endpoint(i), %error, "etcd request failed; retrying");
                    failures.note(i, error.to_string());
                    slots[i].ready_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.no_answer(what, kind, &failures));
                    }
                    for (i, slot) in slots.iter_mut().enumerate() {
                        let Some(sent) = slot.sent else { continue };
                        if !slot.overdue && now >= sent + attempt_timeout {
                            slot.overdue = true;
                            suspect(inner, i, "no answer within the attempt timeout");
                            failures.note(i, format!("no answer within {attempt_timeout:?}"));
                        } else if kind == Kind::Guarded
                            && slot.overdue
                            && !slot.checked
                            && now >= sent + 2 * attempt_timeout
                        {
                            slot.checked = true;
                            if inner.silent(i) {
                                return Err(self.outcome_unknown(what, i));
                            }
                            // It answers probes: alive, just slow (e.g. waiting for a new
                            // leader). Its answer may still come before the deadline.
                        }
                    }
                }
            }
        }
    }

    async fn range(
        &self,
        what: &str,
        key: Vec<u8>,
        options: etcd::GetOptions,
    ) -> Result<etcd::GetResponse, StoreError> {
        self.call(what, Kind::Read, None, |_, mut client| {
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
        kind: Kind,
        txn: etcd::Txn,
        lease: Option<LeaseId>,
    ) -> Result<etcd::TxnResponse, StoreError> {
        self.call(what, kind, lease, |_, mut client| {
            let txn = txn.clone();
            async move { client.kv.txn(txn).await }
        })
        .await
    }

    /// Opens a watch stream on some member and reads its creation response.
    async fn open_watch(
        &self,
        key: &[u8],
        options: &etcd::WatchOptions,
    ) -> Result<(usize, etcd::WatchStream, etcd::WatchResponse), StoreError> {
        self.call("watch", Kind::Read, None, |member, mut client| {
            let key = key.to_vec();
            let options = options.clone();
            async move {
                let mut stream = client.watch.watch(key, Some(options)).await?;
                let created = stream.message().await?.ok_or_else(|| {
                    etcd::Error::WatchError("stream closed before creation".into())
                })?;
                Ok((member, stream, created))
            }
        })
        .await
    }

    fn take_keeper(&self, lease: LeaseId) -> Option<Keeper> {
        lock(&self.inner.keepers).remove(&lease)
    }

    fn return_keeper(&self, lease: LeaseId, keeper: Keeper) {
        let mut keepers = lock(&self.inner.keepers);
        if keepers.len() >= MAX_KEEPERS {
            keepers.clear();
        }
        keepers.insert(lease, keeper);
    }
}

/// One keepalive on `lease`'s stream on `member` (opened if `existing` is `None`): the TTL etcd
/// answered, and the stream to keep for the next call.
async fn keep_alive_once(
    lease: LeaseId,
    member: usize,
    mut clients: Clients,
    existing: Option<Keeper>,
) -> Result<(i64, Keeper), etcd::Error> {
    let mut keeper = match existing {
        Some(keeper) => keeper,
        None => {
            // Opening the stream already renews the lease once (and fails with "lease not found"
            // if it ended); the request below then reports its TTL.
            let (keeper, stream) = clients.lease.keep_alive(lease.0).await?;
            Keeper {
                member,
                keeper,
                stream,
            }
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
        // Unconditional: re-sending it writes the same value again.
        let response = self
            .call("put", Kind::Write, lease, |_, mut client| {
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
        let response = self
            .send_txn("compare_and_swap", Kind::Guarded, txn, lease)
            .await?;
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
        // Without conditions the outcome does not depend on an earlier attempt: re-sendable.
        let kind = if compares.is_empty() {
            Kind::Write
        } else {
            Kind::Guarded
        };
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
        let response = self.send_txn("txn", kind, txn, lease).await?;
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
        // Guarded: a second attempt after an applied first one would report `None`.
        let response = self
            .call("delete", Kind::Guarded, None, |_, mut client| async move {
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
        // Re-sent like a read: a lease granted by an attempt whose answer is lost (or comes
        // second) is never used and expires by itself after its TTL.
        let response = self
            .call("grant", Kind::Read, None, |_, mut client| async move {
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
        let mut existing = self.take_keeper(lease);
        // A renewal is idempotent: re-sent like a read. Each attempt uses the open stream if it
        // goes to that stream's member, else opens one; on failure, timeout or cancellation the
        // streams in use are dropped with their attempts.
        let (ttl, keeper) = self
            .call("keep_alive", Kind::Read, Some(lease), |member, clients| {
                let keeper = existing.take().filter(|k| k.member == member);
                keep_alive_once(lease, member, clients, keeper)
            })
            .await?;
        match u64::try_from(ttl).ok().filter(|t| *t > 0) {
            Some(ttl) => {
                self.return_keeper(lease, keeper);
                Ok(Duration::from_secs(ttl))
            }
            None => Err(StoreError::LeaseExpired { lease }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        drop(self.take_keeper(lease));
        let result = self
            .call(
                "revoke",
                Kind::Read,
                Some(lease),
                |_, mut client| async move { client.lease.revoke(lease.0).await },
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
        };
        let key = prefix_key(prefix);
        let (member, mut stream, created) = self
            .open_watch(&key, &options.clone().with_start_revision(start))
            .await?;
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
                let cancel =
                    tokio::time::timeout(self.inner.options.request_timeout, stream.message())
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
        let follower = Follower {
            store: self.clone(),
            key,
            options,
        };
        tokio::spawn(follower.forward(member, stream, tx, from));
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
    compaction(response, requested).or_else(|| {
        response.canceled().then(|| {
            StoreError::Unavailable(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ))
        })
    })
}

/// `Compacted` if the response says the history from `requested` is gone.
fn compaction(response: &etcd::WatchResponse, requested: Revision) -> Option<StoreError> {
    let compact = response.compact_revision();
    (compact > 0).then(|| StoreError::Compacted {
        requested,
        compact_revision: u64::try_from(compact - 1).unwrap_or(0).max(requested),
    })
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

/// How following one watch stream ended.
enum Ended {
    /// The receiver is gone: nothing more to do.
    ReceiverGone,
    /// An error that ends the watch (compaction, an undecodable event).
    Failed(StoreError),
    /// The stream broke or its member went silent: re-create it elsewhere.
    Lost(String),
}

/// What a watch needs to re-create its stream (on another member, from the next revision).
struct Follower {
    store: EtcdStore,
    key: Vec<u8>,
    /// Without the start revision.
    options: etcd::WatchOptions,
}

impl Follower {
    /// Forwards the watch's events to `tx` in order until an error (sent as the last item) or
    /// until the receiver is dropped (which drops the stream, cancelling the watch in etcd).
    ///
    /// When the stream breaks, or its member goes silent (an idle watch asks for a progress report
    /// every attempt timeout and expects the answer within the next), the watch is re-created on
    /// another member from the revision after the last event delivered: the caller sees no gap
    /// and no repeat. It fails with `Unavailable` when that cannot be done within the request
    /// timeout, or when re-created streams keep breaking before answering anything.
    async fn forward(
        self,
        mut member: usize,
        mut stream: etcd::WatchStream,
        tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
        from: Revision,
    ) {
        let mut next_revision = from;
        let mut resumes = 0;
        let failure = loop {
            let reason = match self
                .follow(member, stream, &tx, &mut next_revision, &mut resumes)
                .await
            {
                Ended::ReceiverGone => return,
                Ended::Failed(error) => break error,
                Ended::Lost(reason) => reason,
            };
            resumes += 1;
            if resumes > MAX_WATCH_RESUMES {
                break StoreError::Unavailable(format!(
                    "etcd watch: {reason} (re-created {MAX_WATCH_RESUMES} times without an answer)"
                ));
            }
            tracing::info!(%reason, next_revision, "etcd watch lost its stream; re-creating it");
            let resumed = tokio::select! {
                () = tx.closed() => return,
                resumed = self.resume(next_revision) => resumed,
            };
            match resumed {
                Ok((resumed_member, resumed_stream)) => {
                    member = resumed_member;
                    stream = resumed_stream;
                }
                Err(StoreError::Unavailable(why)) => {
                    break StoreError::Unavailable(format!(
                        "etcd watch: {reason}; re-creating it failed: {why}"
                    ));
                }
                Err(error) => break error,
            }
        };
        // The receiver may be gone too; nothing else to tell.
        let _ = tx.send(Err(failure)).await;
    }

    /// Opens the watch again from `from`.
    async fn resume(&self, from: Revision) -> Result<(usize, etcd::WatchStream), StoreError> {
        let start = to_i64("watch", from)?;
        let (member, stream, created) = self
            .store
            .open_watch(&self.key, &self.options.clone().with_start_revision(start))
            .await?;
        if let Some(error) = watch_failure(&created, from) {
            return Err(error);
        }
        if !created.created() {
            return Err(StoreError::Backend(
                "etcd watch: first response is not the creation".into(),
            ));
        }
        Ok((member, stream))
    }

    /// Forwards one stream's events; any answer on it resets `resumes`.
    async fn follow(
        &self,
        member: usize,
        stream: etcd::WatchStream,
        tx: &mpsc::Sender<Result<WatchEvent, StoreError>>,
        next_revision: &mut Revision,
        resumes: &mut u32,
    ) -> Ended {
        let inner = &self.store.inner;
        let endpoint = inner.endpoint(member);
        let probe = inner.options.attempt_timeout();
        let (mut requests, mut responses) = stream.split();
        let mut ticker = tokio::time::interval_at(Instant::now() + probe, probe);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut probe_sent: Option<Instant> = None;
        loop {
            tokio::select! {
                () = tx.closed() => return Ended::ReceiverGone,
                message = responses.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            return Ended::Lost(format!("{endpoint} closed the watch stream"));
                        }
                        Err(e) => {
                            note_failure(inner, member, &e);
                            return Ended::Lost(format!("the watch stream on {endpoint} failed: {e}"));
                        }
                    };
                    if let Some(error) = compaction(&response, *next_revision) {
                        return Ended::Failed(error);
                    }
                    if response.canceled() {
                        return Ended::Lost(format!(
                            "{endpoint} cancelled the watch: {}",
                            response.cancel_reason()
                        ));
                    }
                    for event in response.events() {
                        let event = match convert_event(event) {
                            Ok(event) => event,
                            Err(e) => return Ended::Failed(e),
                        };
                        *next_revision = event.revision() + 1;
                        if tx.send(Ok(event)).await.is_err() {
                            return Ended::ReceiverGone;
                        }
                    }
                    // Any answer (and the time spent waiting for the receiver) clears the probe.
                    *resumes = 0;
                    probe_sent = None;
                    ticker.reset();
                }
                _ = ticker.tick() => {
                    match probe_sent {
                        Some(sent) if sent.elapsed() >= probe => {
                            suspect(inner, member, "a watch's progress request went unanswered");
                            return Ended::Lost(format!(
                                "{endpoint} did not answer a progress request within {probe:?}"
                            ));
                        }
                        Some(_) => {}
                        None => {
                            if let Err(e) = requests.request_progress().await {
                                return Ended::Lost(format!("the watch stream on {endpoint} failed: {e}"));
                            }
                            probe_sent = Some(Instant::now());
                        }
                    }
                }
            }
        }
    }
}

/// The watch stream of the etcd store. Events come through a bounded channel from a task reading
/// the etcd stream (re-created on another member when its member fails), in revision order, none
/// dropped or repeated; the first error (`Compacted`, `Unavailable`, …) ends it, and every later
/// `next` fails too. Dropping it cancels the watch in etcd.
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
