//! The daemon's core: one task owns the engine (this host's agent and, when elected, the
//! cluster controller), feeds it every observation, result and admin command, and hands its
//! actions to the executor and its events and state to the store writer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use vmha_api::StatusView;
use vmha_engine::{
    AdminCommand, CommandError, Controller, ControllerInput, ControllerState, HostAgent,
    HostAgentState, HostInput, Route, Timestamp,
};
use vmha_model::{Config, Name, Store};
use vmha_store::layout::Layout;
use vmha_store::records::{EventLog, Records};
use vmha_store::{ClusterStore, EmbeddedStore};

use crate::Options;
use crate::api;
use crate::executor::Executor;
use crate::store_io::{self, HostRecord, Write};
use crate::vm_slot::VmSlot;

/// Host lease TTL on the embedded store (single host: membership only, never fencing).
const EMBEDDED_TTL: Duration = Duration::from_secs(60);
/// Period of the safety-net status poll of every VM (events are the fast path).
const SAFETY_POLL: Duration = Duration::from_secs(5);

/// A message to the core.
pub enum Msg {
    /// An input for this host's agent.
    Host(HostInput),
    /// A change for the controller (dropped while this host is not the controller, or until
    /// it has read a full snapshot of the store).
    Ctrl(ControllerInput),
    /// A full listing of the cluster store, as one batch: the controller decides nothing on
    /// a partial view (a VM placed before its hosts' leases were read would fault).
    Snapshot {
        /// Inputs for this host's agent.
        host: Vec<HostInput>,
        /// Inputs for the controller.
        controller: Vec<ControllerInput>,
        /// VMs that have an ownership record.
        vms_with_owner: BTreeSet<String>,
    },
    /// This host won the controller election.
    Elected,
    /// A request from the API.
    Api(ApiRequest),
}

/// What the API asks the core.
pub enum ApiRequest {
    /// The current status.
    Status(oneshot::Sender<StatusView>),
    /// An admin command; the answer says what was done or why nothing was.
    Command(AdminCommand, oneshot::Sender<Result<(), CommandError>>),
}

/// Milliseconds since the Unix epoch: the engine's clock.
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp(ms)
}

/// Runs the daemon until SIGTERM / SIGINT.
pub async fn run(config: Config, host: Name, options: Options) -> anyhow::Result<()> {
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| config.cluster.state_dir.clone());
    let runtime_dir = options
        .runtime_dir
        .clone()
        .unwrap_or_else(|| config.cluster.runtime_dir.clone());
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    std::fs::create_dir_all(&runtime_dir)
        .with_context(|| format!("creating runtime dir {}", runtime_dir.display()))?;
    match &config.cluster.store {
        Store::Embedded => {
            let path = state_dir.join("store.redb");
            let store = EmbeddedStore::open(&path)
                .with_context(|| format!("opening the embedded store {}", path.display()))?;
            run_with(
                store,
                Arc::new(config),
                host,
                state_dir,
                runtime_dir,
                options,
            )
            .await
        }
        Store::Etcd { .. } => anyhow::bail!(
            "store = \"etcd\" is not supported by this vmhad build yet; use store = \"embedded\""
        ),
    }
}

async fn run_with<S: ClusterStore>(
    store: S,
    config: Arc<Config>,
    host: Name,
    state_dir: PathBuf,
    runtime_dir: PathBuf,
    options: Options,
) -> anyhow::Result<()> {
    let layout = Layout::new(config.cluster.name.as_str())?;
    let records = Records::new(store.clone(), layout.clone());
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    let (writes, writes_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(store_io::writer(
        records.clone(),
        EventLog::new(store.clone(), layout.clone()),
        writes_rx,
    ));

    // Membership: this host's record, bound to its lease, kept alive.
    // With etcd, the lease TTL decides failover and self-fencing. On the embedded store no
    // other host can take over, so self-fencing would only kill healthy VMs: the lease there
    // is long enough that a stalled process never loses it.
    let (ttl, fence_after) = match &config.cluster.store {
        Store::Etcd {
            ttl, fence_margin, ..
        } => (*ttl, ttl.saturating_sub(*fence_margin)),
        Store::Embedded => (EMBEDDED_TTL, EMBEDDED_TTL),
    };
    let lease = store.grant(ttl).await.context("granting the host lease")?;
    let memory_mb = config
        .host(host.as_str())
        .and_then(|h| h.memory_mb)
        .unwrap_or_else(machine_memory_mb);
    let record = HostRecord {
        memory_mb,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    records
        .register_host(host.as_str(), &record, lease.id)
        .await
        .context("registering this host")?;
    tx.send(Msg::Host(HostInput::Lease { live: true }))
        .await
        .context("core channel closed")?;
    tokio::spawn(keep_alive(
        store.clone(),
        lease.id,
        ttl,
        fence_after,
        tx.clone(),
    ));

    // The host agent, with what an earlier run of this daemon persisted.
    let restored: Option<HostAgentState> = records
        .agent_state(host.as_str())
        .await
        .context("reading this host's persisted agent state")?
        .map(|v| v.value);
    let agent = HostAgent::new(Arc::clone(&config), host.clone(), restored, now())?;

    // The controller election runs in the background; the core creates the controller on a win.
    {
        let store = store.clone();
        let election = layout.election("controller")?;
        let tx = tx.clone();
        let me = host.to_string().into_bytes();
        tokio::spawn(async move {
            match store.campaign(&election, me, lease.id).await {
                Ok(_) => {
                    let _ = tx.send(Msg::Elected).await;
                }
                Err(e) => tracing::error!("controller election failed: {e}"),
            }
        });
    }

    // The VMs this host may run: adopt what is already running.
    let mut slots = BTreeMap::new();
    for vm in config.vms.iter().filter(|v| v.hosts.contains(&host)) {
        let slot = VmSlot::new(vm, runtime_dir.clone(), tx.clone());
        slots.insert(vm.name.clone(), slot);
    }
    // Each adoption reports to the core; run them alongside it, so any number of VMs fits
    // through the core's bounded channel.
    for slot in slots.values() {
        let slot = Arc::clone(slot);
        tokio::spawn(async move { slot.adopt().await });
    }

    let api_socket = state_dir.join("vmhad.sock");
    let api = api::serve(
        &api_socket,
        tx.clone(),
        EventLog::new(store.clone(), layout.clone()),
        slots.clone(),
    )
    .await?;
    tracing::info!(host = %host, socket = %api_socket.display(), "vmhad running");

    let executor = Executor {
        host: host.clone(),
        slots: slots.clone(),
        tx: tx.clone(),
        writes: writes.clone(),
        records: records.clone(),
    };
    let relist = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(store_io::follow(
        records.clone(),
        tx.clone(),
        Arc::clone(&relist),
    ));

    let mut core = Core {
        config: Arc::clone(&config),
        agent,
        controller: None,
        controller_synced: false,
        executor,
        writes,
        store,
        layout,
    };
    core.drain();
    let mut safety = tokio::time::interval(SAFETY_POLL);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        let wake = core.next_wake();
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                if matches!(msg, Msg::Elected) {
                    core.become_controller().await;
                    relist.notify_one();
                } else {
                    core.handle(msg);
                }
            }
            () = sleep_until_ms(wake) => core.handle_timeout(),
            _ = safety.tick() => {
                for slot in slots.values() {
                    let slot = Arc::clone(slot);
                    tokio::spawn(async move { slot.poll_status().await });
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        core.drain();
    }
    tracing::info!("vmhad stopping");
    api.abort();
    if options.stop_vms_on_exit {
        // All at once: one by one, N guests slow to shut down would take N × stop_timeout
        // (and the service manager would SIGKILL vmhad with VMs still running).
        let stops = slots.iter().map(|(name, slot)| {
            let timeout = config
                .vm(name.as_str())
                .map_or(vmha_model::defaults::STOP_TIMEOUT, |v| v.stop_timeout);
            async move {
                if let Err(e) = slot.stop_for_exit(timeout).await {
                    tracing::error!(vm = %name, "stopping on exit failed: {e}");
                }
            }
        });
        futures_util::future::join_all(stops).await;
    } else {
        tracing::info!("leaving VMs running");
    }
    // Let queued events and state reach the store.
    drop(core);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    let _ = std::fs::remove_file(&api_socket);
    Ok(())
}

struct Core<S> {
    config: Arc<Config>,
    agent: HostAgent,
    controller: Option<Controller>,
    /// The controller has read a full snapshot of the store since its election.
    controller_synced: bool,
    executor: Executor<S>,
    writes: mpsc::UnboundedSender<Write>,
    store: S,
    layout: Layout,
}

impl<S: ClusterStore> Core<S> {
    async fn become_controller(&mut self) {
        let key = store_io::controller_state_key(self.layout.root());
        let restored: Option<ControllerState> = match self.store.get(&key).await {
            Ok(Some(kv)) => serde_json::from_slice(&kv.value).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::error!("reading the controller state: {e}");
                None
            }
        };
        tracing::info!(host = %self.agent.host(), "elected cluster controller");
        self.controller = Some(Controller::new(Arc::clone(&self.config), restored, now()));
        // It acts only once it has read the whole store (the next snapshot).
        self.controller_synced = false;
    }

    fn handle(&mut self, msg: Msg) {
        let t = now();
        match msg {
            Msg::Host(input) => {
                tracing::debug!("host input {input:?}");
                self.agent.handle_input(t, input);
            }
            Msg::Ctrl(input) => {
                if let Some(c) = self.controller.as_mut().filter(|_| self.controller_synced) {
                    c.handle_input(t, input);
                }
            }
            Msg::Snapshot {
                host,
                controller,
                vms_with_owner,
            } => {
                for input in host {
                    self.agent.handle_input(t, input);
                }
                if let Some(c) = self.controller.as_mut() {
                    let absent = self
                        .config
                        .vms
                        .iter()
                        .filter(|vm| !vms_with_owner.contains(vm.name.as_str()))
                        .map(|vm| ControllerInput::Ownership {
                            vm: vm.name.clone(),
                            record: None,
                            revision: 0,
                        });
                    let batch: Vec<ControllerInput> =
                        controller.into_iter().chain(absent).collect();
                    c.handle_inputs(t, batch);
                    self.controller_synced = true;
                }
            }
            Msg::Elected => {}
            Msg::Api(ApiRequest::Status(reply)) => {
                let view = StatusView {
                    host: self.agent.host().clone(),
                    cluster: self.config.cluster.name.clone(),
                    controller: self.controller.is_some(),
                    agent: self.agent.status(),
                    cluster_view: self.controller.as_ref().map(Controller::status),
                };
                let _ = reply.send(view);
            }
            Msg::Api(ApiRequest::Command(cmd, reply)) => {
                let _ = reply.send(self.command(t, cmd));
            }
        }
    }

    fn command(&mut self, t: Timestamp, cmd: AdminCommand) -> Result<(), CommandError> {
        let route = cmd.route();
        let to_controller = matches!(route, Route::Controller | Route::Both);
        let to_host = matches!(route, Route::OwnerHost | Route::Both);
        if to_controller {
            let Some(c) = self.controller.as_mut() else {
                return Err(CommandError::WrongReceiver("cluster controller"));
            };
            c.command(t, cmd.clone())?;
        }
        if to_host {
            match self.agent.command(t, cmd) {
                // The controller took a Both-command for a VM this host does not run.
                Err(CommandError::NotOwner { .. }) if to_controller => {}
                other => other?,
            }
        }
        tracing::info!("admin command applied");
        Ok(())
    }

    fn handle_timeout(&mut self) {
        let t = now();
        self.agent.handle_timeout(t);
        if let Some(c) = self.controller.as_mut() {
            c.handle_timeout(t);
        }
    }

    fn next_wake(&self) -> Option<Timestamp> {
        let a = self.agent.poll_timeout();
        let c = self.controller.as_ref().and_then(Controller::poll_timeout);
        match (a, c) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        }
    }

    /// Hands every pending action, event and state change to the executor and the writer.
    fn drain(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(action) = self.agent.poll_action() {
                progressed = true;
                self.executor.host_action(action);
            }
            while let Some(event) = self.agent.poll_event() {
                progressed = true;
                self.event(event);
            }
            if let Some(c) = self.controller.as_mut() {
                while let Some(action) = c.poll_action() {
                    progressed = true;
                    self.executor.controller_action(action);
                }
                while let Some(event) = c.poll_event() {
                    progressed = true;
                    tracing::info!("{event}");
                    let _ = self.writes.send(Write::Event(event));
                }
                if c.take_state_changed() {
                    if let Ok(v) = serde_json::to_value(c.state()) {
                        let _ = self.writes.send(Write::ControllerState(v));
                    }
                }
            }
            if self.agent.take_state_changed() {
                let _ = self.writes.send(Write::AgentState(
                    self.agent.host().clone(),
                    Box::new(self.agent.state()),
                ));
            }
            if !progressed {
                break;
            }
        }
    }

    fn event(&self, event: vmha_engine::Event) {
        tracing::info!("{event}");
        let _ = self.writes.send(Write::Event(event));
    }
}

async fn sleep_until_ms(wake: Option<Timestamp>) {
    match wake {
        None => std::future::pending().await,
        Some(t) => {
            let ms = t.0.saturating_sub(now().0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// Renews the host lease at a third of its TTL. The deadline runs from when the last
/// acknowledged renewal was *sent* (monotonic clock): past `fence_after` without one, the agent
/// is told its lease is no longer live and fences itself, before the store can expire the lease
/// anywhere else.
async fn keep_alive<S: ClusterStore>(
    store: S,
    lease: vmha_store::LeaseId,
    ttl: Duration,
    fence_after: Duration,
    tx: mpsc::Sender<Msg>,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    let mut last_ok_sent = tokio::time::Instant::now();
    let mut live = true;
    loop {
        tick.tick().await;
        let sent = tokio::time::Instant::now();
        let renewed = match tokio::time::timeout(ttl / 3, store.keep_alive(lease)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::error!("host lease renewal failed: {e}");
                false
            }
            Err(_) => {
                tracing::error!("host lease renewal timed out");
                false
            }
        };
        if renewed {
            last_ok_sent = sent;
        }
        let now_live = renewed || last_ok_sent.elapsed() < fence_after;
        if now_live != live {
            live = now_live;
            if !live {
                tracing::error!("host lease not renewed for {fence_after:?}: self-fencing");
            }
            if tx.send(Msg::Host(HostInput::Lease { live })).await.is_err() {
                return;
            }
        }
    }
}

/// Total memory of this machine in MiB (`/proc/meminfo`), 0 if unreadable.
fn machine_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
