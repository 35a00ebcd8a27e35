//! The daemon's core: one task owns the engine's [`Node`] and drives it exactly as the
//! engine's contract says — inputs in; then `ready()`: commit the batch to the cluster store,
//! `advance()`, and only then run its actions and answer its commands. While a batch is being
//! committed the core keeps taking inputs (monitoring goes on); while admin commands wait for
//! their commit it leaves new inputs in the (bounded) inbox.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use vmha_api::{SnapshotView, StatusView};
use vmha_engine::sim::{ClusterSnapshot, GuestSnapshot};
use vmha_engine::{
    CommandError, CommandOrigin, Commit, Effects, Node, NodeInput, Persist, Record, Timestamp,
};
use vmha_model::{Config, Name};
use vmha_qemu::timer::Timer;
use vmha_store::layout::Layout;
use vmha_store::{ClusterStore, Compare, TxnOutcome};

use crate::codec::{self, CommitContext};
use crate::configure::ConfigState;
use crate::election::Leadership;
use crate::executor::Executor;
use crate::fence::Fence;
use crate::forward::Forwarder;
use crate::inbox::{ApiRequest, Msg, Request};
use crate::metrics::{METRICS, StoreOp};
use crate::slots::Slots;

/// Period of the safety-net status poll of every VM (events are the fast path).
const SAFETY_POLL: Duration = Duration::from_secs(5);
/// The longest one store transaction of a commit may take before the commit counts as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a configuration the engine was busy for is tried again.
const RECONFIGURE_RETRY: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch: the engine's clock.
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp(ms)
}

/// Everything the core drives.
pub struct Core<S> {
    /// The engine.
    pub node: Node,
    /// The configuration.
    pub config: Arc<Config>,
    /// This host.
    pub host: Name,
    /// The store.
    pub store: S,
    /// Key layout.
    pub layout: Layout,
    /// Runs actions.
    pub executor: Executor<S>,
    /// Forwards commands to other hosts.
    pub forwarder: Arc<Forwarder<S>>,
    /// This host's leadership.
    pub leadership: Arc<Leadership>,
    /// The fence.
    pub fence: Arc<Fence>,
    /// The VM slots.
    pub slots: Slots,
    /// The configuration as it runs, its text, and where it came from.
    pub config_state: ConfigState,
    /// Local callers waiting for their command's answer.
    pub pending: BTreeMap<u64, oneshot::Sender<Result<(), CommandError>>>,
    /// Next local caller id.
    pub next_caller: u64,
    /// Forwarded commands known in the store, by id.
    pub requests: BTreeMap<String, Request>,
    /// Those handed to the node.
    pub delivered: BTreeSet<String>,
    /// The host leading the cluster, as last seen.
    pub leader: Option<Name>,
    /// Counts the loop's turns for systemd's watchdog (and sets the heartbeat).
    pub beat: Arc<crate::sd_notify::CoreBeat>,
}

/// A commit in flight: its batch id and where its outcome arrives.
type InFlight = (u64, oneshot::Receiver<Commit>);

impl<S: ClusterStore> Core<S> {
    /// Runs until `shutdown` turns true (or the inbox closes); then waits for the commit in
    /// flight and answers what it committed. Callers still waiting get no answer (their request
    /// ends with "vmhad is shutting down": nothing of theirs was changed).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>, mut shutdown: watch::Receiver<bool>) {
        // One timer for the engine's wake-up, the heartbeat and the safety poll: the core
        // wakes once per deadline (see `vmha_qemu::timer`).
        let mut timer = Timer::new();
        let mut next_safety = Instant::now();
        let mut in_flight: Option<InFlight> = None;
        loop {
            #[cfg(debug_assertions)]
            crate::sd_notify::test_hang_point();
            self.fence.core_alive();
            self.beat.turn();
            if Instant::now() >= next_safety {
                self.poll_slots();
                next_safety = Instant::now() + SAFETY_POLL;
            }
            self.pump(&mut in_flight);
            if in_flight.is_none() && self.try_reconfigure() {
                self.pump(&mut in_flight);
            }
            let wake = self.node.poll_timeout();
            // The heartbeat: the core turns at least once per period, even with nothing to do.
            let mut sleep = self
                .beat
                .period()
                .min(next_safety.saturating_duration_since(Instant::now()));
            if let Some(t) = wake {
                sleep = sleep.min(Duration::from_millis(t.0.saturating_sub(now().0)));
            }
            let accepting = self.node.accepting_inputs();
            let reconfigure_pending = self.config_state.pending.is_some();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                outcome = async {
                    match in_flight.as_mut() {
                        Some((_, rx)) => rx.await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((id, _)) = in_flight.take() {
                        let outcome = outcome.unwrap_or_else(|_| Commit::Failed("commit task ended".into()));
                        self.finish(id, outcome);
                    }
                }
                msg = rx.recv(), if accepting => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                () = timer.sleep(sleep) => {
                    let t = now();
                    if wake.is_some_and(|w| t >= w) {
                        self.node.handle_timeout(t);
                    }
                }
                // A configuration the engine was too busy for is tried again soon.
                () = tokio::time::sleep(RECONFIGURE_RETRY), if reconfigure_pending => {}
            }
        }
        tracing::info!("core stopping: finishing the commit in flight");
        if let Some((id, rx)) = in_flight.take() {
            let outcome = rx
                .await
                .unwrap_or_else(|_| Commit::Failed("commit task ended".into()));
            self.finish(id, outcome);
        }
    }

    /// Asks every VM slot for its VM's status (the safety net; also after a reconfiguration).
    pub fn poll_slots(&self) {
        for (_, slot) in self.slots.all() {
            tokio::spawn(async move { slot.poll_status().await });
        }
    }

    fn finish(&mut self, id: u64, outcome: Commit) {
        if let Commit::Failed(e) = &outcome {
            tracing::error!(
                "cluster store commit failed: {e}; monitoring and local restarts go on, commands are refused until it works again"
            );
        }
        let effects = self.node.advance(id, outcome);
        self.run_effects(effects);
    }

    /// Hands out what the node decided: commits its next batch (one at a time).
    fn pump(&mut self, in_flight: &mut Option<InFlight>) {
        while in_flight.is_none() {
            let Some(ready) = self.node.ready() else {
                return;
            };
            self.run_effects(ready.run_now);
            if ready.id == 0 {
                continue;
            }
            if ready.persist.is_empty() {
                let effects = self.node.advance(ready.id, Commit::Ok);
                self.run_effects(effects);
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let job = self.commit_job(ready.persist);
            tokio::spawn(async move {
                let _ = tx.send(job.await);
            });
            *in_flight = Some((ready.id, rx));
        }
    }

    /// The commit of `persist`, as a task independent of the core.
    fn commit_job(
        &self,
        persist: Persist,
    ) -> impl std::future::Future<Output = Commit> + Send + use<S> {
        let store = self.store.clone();
        let fence = persist
            .controller
            .as_ref()
            .and_then(|c| self.leadership.fence(c.term));
        let deposed = persist.controller.is_some() && fence.is_none();
        let requests: BTreeMap<String, (String, u64)> = persist
            .replies
            .iter()
            .filter_map(|(id, _)| {
                self.requests
                    .get(id)
                    .map(|r| (id.clone(), (r.key.clone(), r.revision)))
            })
            .collect();
        let lookup = move |id: &str| requests.get(id).cloned();
        let ctx = CommitContext {
            host: &self.host,
            fence: fence.clone(),
            requests: &lookup,
        };
        let txns = codec::commit_txns(&self.layout, &persist, &ctx);
        let leader_key = fence.and_then(|f| match f {
            Compare::CreateRevision { key, revision } => Some((key, revision)),
            _ => None,
        });
        async move {
            if deposed {
                return Commit::Deposed;
            }
            let txns = match txns {
                Ok(t) => t,
                Err(e) => return Commit::Failed(e.to_string()),
            };
            for txn in txns {
                let write = store.txn(txn.compares, txn.ops);
                let started = std::time::Instant::now();
                let outcome = tokio::time::timeout(TXN_TIMEOUT, write).await;
                let error = match &outcome {
                    Ok(Ok(TxnOutcome::Committed { .. })) => None,
                    Ok(Ok(TxnOutcome::Failed)) => Some("conflict"),
                    Ok(Err(_)) => Some("error"),
                    Err(_) => Some("timeout"),
                };
                METRICS.store(StoreOp::Commit, started.elapsed(), error);
                match outcome {
                    Ok(Ok(TxnOutcome::Committed { .. })) => {}
                    Ok(Ok(TxnOutcome::Failed)) => {
                        // A condition failed: the controller's term ended, or a forwarded
                        // command was withdrawn by its sender at this very moment.
                        if let Some((key, revision)) = &leader_key {
                            let still = store
                                .get(key)
                                .await
                                .ok()
                                .flatten()
                                .is_some_and(|kv| kv.create_revision == *revision);
                            if !still {
                                return Commit::Deposed;
                            }
                        }
                        return Commit::Failed(
                            "a forwarded command was withdrawn while being answered".into(),
                        );
                    }
                    Ok(Err(e)) => return Commit::Failed(e.to_string()),
                    Err(_) => {
                        return Commit::Failed(format!(
                            "the cluster store did not commit within {TXN_TIMEOUT:?}"
                        ));
                    }
                }
            }
            Commit::Ok
        }
    }

    fn run_effects(&mut self, effects: Effects) {
        for event in &effects.events {
            tracing::info!("{event}");
            METRICS.event(event);
        }
        if !effects.events.is_empty() {
            // Decisions come with state changes: count them while the VM keeps them.
            METRICS.decisions(&self.node.status().agent.vms);
        }
        for action in effects.host_actions {
            self.executor.host_action(action);
        }
        for (term, action) in effects.controller_actions {
            self.executor.controller_action(term, action);
        }
        for (id, result) in effects.replies {
            if let Some(tx) = self.pending.remove(&id) {
                let _ = tx.send(result);
            }
        }
        for f in effects.forwards {
            let Some(tx) = self.pending.remove(&f.id) else {
                continue;
            };
            let forwarder = Arc::clone(&self.forwarder);
            tokio::spawn(async move {
                let result = forwarder.forward(f.to, f.command).await;
                let _ = tx.send(result);
            });
        }
    }

    fn handle(&mut self, msg: Msg) {
        let t = now();
        match msg {
            Msg::Host(input) => {
                tracing::debug!("host input {input:?}");
                self.node.handle(t, NodeInput::Host(input));
            }
            Msg::Records { records, full } => {
                for r in &records {
                    if let Record::Owner { .. } | Record::Host { .. } = r {
                        tracing::debug!(full, "record {r:?}");
                    }
                }
                self.node.handle(t, NodeInput::Records { records, full });
            }
            Msg::Requests { new, gone } => {
                for id in gone {
                    self.requests.remove(&id);
                    self.delivered.remove(&id);
                }
                for r in new {
                    self.requests.entry(r.id.clone()).or_insert(r);
                }
                self.deliver_requests(t);
            }
            Msg::Leadership(term) => {
                self.node.handle(t, NodeInput::Leadership(term));
                self.deliver_requests(t);
            }
            Msg::Leader(name) => self.leader = name,
            Msg::CasResult { id, revision } => {
                self.node.handle(t, NodeInput::CasResult { id, revision });
            }
            Msg::Incarnation(i) => self.node.handle(t, NodeInput::Incarnation(i)),
            Msg::Config(text) => self.stored_config(text),
            Msg::Api(ApiRequest::Config(text, reply)) => self.config_request(text, reply),
            Msg::Api(ApiRequest::Status(reply)) => {
                let _ = reply.send(self.status());
            }
            Msg::Api(ApiRequest::Snapshot(reply)) => {
                let _ = reply.send(self.snapshot());
            }
            Msg::Api(ApiRequest::Command(cmd, reply)) => {
                tracing::info!("admin command: {cmd:?}");
                self.next_caller += 1;
                let id = self.next_caller;
                self.pending.insert(id, reply);
                self.node.command(t, CommandOrigin::Local(id), cmd);
            }
        }
    }

    /// Hands the node the forwarded commands it must carry out: those for this host, and
    /// those for the controller while this host leads. Each exactly once.
    fn deliver_requests(&mut self, t: Timestamp) {
        let leads = self.node.term().is_some();
        let due: Vec<Request> = self
            .requests
            .values()
            .filter(|r| !self.delivered.contains(&r.id) && (!r.for_controller || leads))
            .cloned()
            .collect();
        for r in due {
            self.delivered.insert(r.id.clone());
            self.node
                .command(t, CommandOrigin::Remote(r.id.clone()), r.command);
        }
    }

    /// The records the node last saw, what this host sees in the guests it runs, and the
    /// configuration it runs: what `vmha simulate --from-cluster` starts from.
    fn snapshot(&self) -> SnapshotView {
        let guests = self
            .node
            .agent()
            .status()
            .vms
            .iter()
            .filter(|v| v.owner.as_ref() == Some(&self.host))
            .map(|v| GuestSnapshot::of(&self.host, v))
            .collect();
        SnapshotView {
            host: self.host.clone(),
            cluster: self.config.cluster.name.clone(),
            config: self.config_state.text.clone(),
            snapshot: ClusterSnapshot {
                now: now(),
                records: self.node.snapshot_records(),
                guests,
            },
        }
    }

    fn status(&self) -> StatusView {
        let status = self.node.status();
        StatusView {
            host: self.host.clone(),
            cluster: self.config.cluster.name.clone(),
            controller: status.term.is_some(),
            leader: self.leader.clone(),
            host_state: if self.fence.fenced() {
                "fenced".to_string()
            } else {
                "up".to_string()
            },
            store: status.store,
            config_error: self.config_state.error.clone(),
            agent: status.agent,
            cluster_view: status.controller,
            guest_io: crate::guest_io::COUNTERS.view(),
        }
    }
}
