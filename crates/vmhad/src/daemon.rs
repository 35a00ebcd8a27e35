//! Start-up and shutdown: opens the cluster store, takes the host lease, restores this host's
//! committed state, adopts the VMs already running, starts the tasks around the core (lease
//! keeper and fence, election, store follower, API) and runs the core until SIGTERM / SIGINT,
//! telling systemd (`sd_notify`) when it is ready, reloading and stopping.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, watch};
use vmha_engine::{HostInput, Node, NodeInput, NodeState};
use vmha_model::{Config, Name, Store};
use vmha_store::layout::Layout;
use vmha_store::records::EventLog;
use vmha_store::{ClusterStore, EmbeddedStore, EtcdOptions, EtcdStore};

use crate::Options;
use crate::api;
use crate::configure::ConfigState;
use crate::core::{self, Core};
use crate::election::{self, Leadership};
use crate::executor::Executor;
use crate::fence::{Fence, FenceRule};
use crate::follow::{Follower, HostLeases, Replies};
use crate::forward::Forwarder;
use crate::inbox;
use crate::lease::{self, LeaseKeeper};
use crate::sd_notify::Notifier;
use crate::slots::Slots;

/// Host lease TTL on the embedded store (single host: membership only, never fencing).
const EMBEDDED_TTL: Duration = Duration::from_secs(60);

/// Runs the daemon until SIGTERM / SIGINT.
pub async fn run(
    config: Config,
    host: Name,
    options: Options,
    api_group: Option<nix::unistd::Gid>,
) -> anyhow::Result<()> {
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| config.cluster.state_dir.clone());
    let runtime_dir = options
        .runtime_dir
        .clone()
        .unwrap_or_else(|| config.cluster.runtime_dir.clone());
    // Everything checked before anything is created.
    let api_socket = state_dir.join("vmhad.sock");
    crate::files::check_private_dir(&state_dir).context("the state dir")?;
    crate::files::check_private_dir(&runtime_dir).context("the runtime dir")?;
    crate::files::check_api_socket(&api_socket).context("the API socket")?;
    crate::files::private_dir(&state_dir, api_group).context("the state dir")?;
    crate::files::private_dir(&runtime_dir, None).context("the runtime dir")?;
    let dirs = Dirs {
        state: state_dir,
        runtime: runtime_dir,
        api_group,
    };
    match &config.cluster.store {
        Store::Embedded => {
            let path = dirs.state.join("store.redb");
            let store = EmbeddedStore::open(&path)
                .with_context(|| format!("opening the embedded store {}", path.display()))?;
            run_with(store, Arc::new(config), host, dirs, options).await
        }
        Store::Etcd { endpoints, .. } => {
            let store = EtcdStore::connect(endpoints, EtcdOptions::default())
                .await
                .with_context(|| format!("connecting to etcd at {}", endpoints.join(", ")))?;
            run_with(store, Arc::new(config), host, dirs, options).await
        }
    }
}

struct Dirs {
    state: PathBuf,
    runtime: PathBuf,
    /// The group that may use the API socket (`--api-group`).
    api_group: Option<nix::unistd::Gid>,
}

/// Retries `f` (a store read at start-up) until it succeeds, logging why it waits.
async fn patiently<T, E: std::fmt::Display, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut logged = false;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                if !logged {
                    tracing::warn!("{what}: {e}; retrying until the cluster store answers");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn run_with<S: ClusterStore>(
    store: S,
    config: Arc<Config>,
    host: Name,
    dirs: Dirs,
    options: Options,
) -> anyhow::Result<()> {
    let layout = Layout::new(config.cluster.name.as_str())?;
    let (config, config_text) = effective_config(&store, &layout, config, &host, &options).await;
    let (ttl, margin) = match &config.cluster.store {
        Store::Etcd {
            ttl, fence_margin, ..
        } => (*ttl, Some(*fence_margin)),
        Store::Embedded => (EMBEDDED_TTL, None),
    };
    let memory_mb = config
        .host(host.as_str())
        .and_then(|h| h.memory_mb)
        .unwrap_or_else(machine_memory_mb);

    // What this host committed in an earlier run: nothing else counts.
    let agent_key = layout.agent_state(host.as_str())?;
    let restored: Option<NodeState> = patiently("reading this host's committed state", || {
        let store = store.clone();
        let key = agent_key.clone();
        async move { store.get(&key).await }
    })
    .await
    .map(|kv| serde_json::from_slice(&kv.value))
    .transpose()
    .with_context(|| format!("this host's committed state in {agent_key} is damaged"))?;

    // The host lease (kept from an earlier run while it lives), then the fence on it.
    let (lease, sent, held_ttl) = patiently("acquiring the host lease", || {
        lease::acquire(&store, &layout, &host, memory_mb, ttl)
    })
    .await;
    let paths = crate::configure::fenced_vms(&config, &dirs.runtime);
    // A kept lease has the TTL it was granted with, maybe shorter than the configured one
    // (the TTL was raised since): the fence times itself on the shorter.
    let rule = match margin {
        Some(margin) => FenceRule::BeforeExpiry {
            lease_ttl: held_ttl.min(ttl),
            margin,
        },
        None => FenceRule::Never,
    };
    let fence = Fence::new(rule, paths);
    fence.rearm(sent);
    let fence_thread = fence.spawn().context("starting the fence thread")?;
    if margin.is_some() {
        spawn_guard(&fence, &dirs.state)?;
    }
    let mut hardware_watchdog = false;
    if let Some(h) = config.host(host.as_str())
        && let Some(path) = &h.watchdog
    {
        let dog = crate::watchdog::Watchdog::open(path, h.watchdog_timeout)?;
        fence.attach_watchdog(dog);
        hardware_watchdog = true;
    }

    let notifier = Arc::new(crate::sd_notify::Notifier::from_env());
    let watchdog = crate::sd_notify::watchdog_interval();
    let beat = crate::sd_notify::CoreBeat::new(watchdog, hardware_watchdog);
    let (inbox, rx) = inbox::channel();
    let mut node = Node::new(
        Arc::clone(&config),
        host.clone(),
        lease.0.unsigned_abs(),
        restored,
        core::now(),
    )?;
    node.handle(
        core::now(),
        NodeInput::Host(HostInput::Lease { live: true }),
    );

    // Caught from here on: a stop asked for during adoption waits for the start to finish.
    let mut signals = Signals::install()?;
    // The VMs this host may run: adopt what is already running (systemd hears "ready" once
    // every adoption has reported to the core).
    let slots = Slots::default();
    let created = slots.configure(&config, &host, &dirs.runtime, &inbox.host_inputs(), &fence);
    let adoptions: Vec<_> = created
        .added
        .into_iter()
        .map(|slot| tokio::spawn(async move { slot.adopt().await }))
        .collect();

    let relist = Arc::new(Notify::new());
    let (lease_tx, lease_rx) = watch::channel(Some(lease));
    let lease_id = Arc::new(AtomicU64::new(lease.0.unsigned_abs()));
    tokio::spawn(
        LeaseKeeper {
            store: store.clone(),
            layout: layout.clone(),
            host: host.clone(),
            memory_mb,
            ttl,
            fence: Arc::clone(&fence),
            inbox: inbox.clone(),
            lease_tx,
            relist: Arc::clone(&relist),
        }
        .run(lease),
    );
    {
        // The forwarder signs requests with the current lease.
        let mut lease_rx = lease_rx.clone();
        let lease_id = Arc::clone(&lease_id);
        tokio::spawn(async move {
            while lease_rx.changed().await.is_ok() {
                if let Some(l) = *lease_rx.borrow() {
                    lease_id.store(l.0.unsigned_abs(), std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
    }
    let leadership = Arc::new(Leadership::default());
    let election_key = layout.election("controller")?;
    tokio::spawn(election::run(
        store.clone(),
        election_key.clone(),
        host.clone(),
        lease_rx,
        inbox.clone(),
        Arc::clone(&leadership),
    ));
    tokio::spawn(election::observe(
        store.clone(),
        election_key,
        inbox.clone(),
    ));
    let leases = Arc::new(HostLeases::default());
    let replies = Arc::new(Replies::default());
    tokio::spawn(
        Follower {
            store: store.clone(),
            layout: layout.clone(),
            me: host.clone(),
            inbox: inbox.clone(),
            relist: Arc::clone(&relist),
            leases: Arc::clone(&leases),
            replies: Arc::clone(&replies),
        }
        .run(),
    );

    let tcp_api = crate::api_tcp::TcpApi::prepare(&config.api).context("the TCP API")?;
    let api_socket = dirs.state.join("vmhad.sock");
    let listener =
        crate::files::bind_api_socket(&api_socket, dirs.api_group).context("the API socket")?;
    let api = api::serve(
        listener,
        tcp_api,
        inbox.clone(),
        EventLog::new(store.clone(), layout.clone()),
        config.hosts.iter().map(|h| h.name.clone()).collect(),
        slots.clone(),
    )
    .await?;
    tracing::info!(host = %host, socket = %api_socket.display(), "vmhad running");

    let executor = Executor {
        host: host.clone(),
        slots: slots.clone(),
        answers: inbox.host_inputs(),
        inbox: inbox.clone(),
        store: store.clone(),
        layout: layout.clone(),
        leased_owners: margin.is_some(),
        leases,
        leadership: Arc::clone(&leadership),
        migration_address: config
            .host(host.as_str())
            .and_then(|h| h.address.as_deref())
            .map(crate::executor::migration_address),
    };
    let forwarder = Arc::new(Forwarder {
        store: store.clone(),
        layout: layout.clone(),
        me: host.clone(),
        lease: lease_id,
        replies,
        next: AtomicU64::new(0),
    });
    let core = Core {
        node,
        config: Arc::clone(&config),
        host: host.clone(),
        store: store.clone(),
        layout: layout.clone(),
        executor,
        forwarder,
        leadership,
        fence: Arc::clone(&fence),
        slots: slots.clone(),
        config_state: ConfigState {
            text: config_text,
            file: options.config.clone(),
            runtime_dir: dirs.runtime.clone(),
            inputs: inbox.host_inputs(),
            pending: None,
            error: None,
        },
        pending: BTreeMap::new(),
        next_caller: 0,
        requests: BTreeMap::new(),
        delivered: BTreeSet::new(),
        leader: None,
        beat: Arc::clone(&beat),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let core_task = tokio::spawn(core.run(rx, stop_rx));

    let adopted = tokio::select! {
        _ = futures_util::future::join_all(adoptions) => true,
        () = signals.stop() => false,
    };
    if adopted {
        notifier.ready();
        if let Some(interval) = watchdog
            && notifier.enabled()
        {
            crate::sd_notify::spawn_watchdog(Arc::clone(&notifier), interval, beat)
                .context("starting the systemd watchdog thread")?;
        }
        signals.run(&inbox, &notifier).await;
    }
    notifier.stopping();
    tracing::info!("vmhad stopping");
    // No new API requests; the core finishes the commit in flight and answers it.
    api.abort();
    let _ = stop_tx.send(true);
    let _ = core_task.await;
    if options.stop_vms_on_exit {
        // All at once: one by one, N guests slow to shut down would take N × stop_timeout
        // (and the service manager would SIGKILL vmhad with VMs still running).
        let all = slots.all();
        let stops = all.iter().map(|(name, slot)| {
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
    fence.shutdown();
    let _ = fence_thread.join();
    let _ = std::fs::remove_file(&api_socket);
    Ok(())
}

/// vmhad's signal handlers, installed before the VMs are adopted.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            quit: signal(SignalKind::quit()).context("installing the SIGQUIT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?,
            usr2: signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?,
        })
    }

    /// Returns on the first SIGTERM, SIGINT or SIGQUIT (the others wait: used while starting).
    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.quit.recv() => {}
        }
    }

    /// Handles signals until one asks vmhad to stop: SIGTERM, SIGINT and SIGQUIT stop it
    /// (gracefully: the commit in flight finishes and is answered); SIGHUP reloads the
    /// configuration file (validated first: a bad file changes nothing, and says why in the
    /// log and in `vmha status`), between `RELOADING=1` and `READY=1` to systemd; SIGUSR1 and
    /// SIGUSR2 are logged and otherwise ignored.
    async fn run(&mut self, inbox: &crate::inbox::Inbox, notifier: &Arc<Notifier>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.quit.recv() => return,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration file");
                    notifier.reloading();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let msg = crate::inbox::Msg::Api(crate::inbox::ApiRequest::Config(None, tx));
                    if !inbox.send(msg).await {
                        return;
                    }
                    let notifier = Arc::clone(notifier);
                    tokio::spawn(async move {
                        match rx.await {
                            Ok(Ok(applied)) => tracing::info!(
                                "configuration stored, every host applies it: {}",
                                applied.change
                            ),
                            Ok(Err(e)) => tracing::error!("configuration not reloaded: {e}"),
                            Err(_) => {}
                        }
                        // Done either way: a refused file leaves the previous one running.
                        notifier.ready();
                    });
                }
                _ = self.usr1.recv() => tracing::info!("SIGUSR1 ignored (see the README)"),
                _ = self.usr2.recv() => tracing::info!("SIGUSR2 ignored (see the README)"),
            }
        }
    }
}

/// Starts the fence guard (see [`crate::guard`]) in its own process group, so that it outlives
/// this vmhad, and takes over from the previous vmhad's guard.
fn spawn_guard(fence: &Fence, state_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding vmhad's executable")?;
    let mut child = std::process::Command::new(exe)
        .arg(crate::guard::FLAG)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the fence guard")?;
    let Some(stdin) = child.stdin.take() else {
        anyhow::bail!("the fence guard has no stdin");
    };
    fence.attach_guard(stdin);
    crate::guard::take_over(&state_dir.join("fence-guard.pid"), child.id());
    // Reaped by whoever outlives it: it lives on when vmhad exits.
    drop(child);
    Ok(())
}

/// The configuration to run: the one stored in the cluster store (`vmha config apply`) when
/// there is one that fits this daemon (same cluster and store, this host in it), else this
/// daemon's file. Returns it with its text.
async fn effective_config<S: ClusterStore>(
    store: &S,
    layout: &Layout,
    file: Arc<Config>,
    host: &Name,
    options: &Options,
) -> (Arc<Config>, String) {
    let file_text = vmha_model::file::read_text(&options.config).unwrap_or_default();
    let stored = patiently("reading the stored configuration", || {
        let store = store.clone();
        let key = layout.config();
        async move { store.get(&key).await }
    })
    .await;
    let Some(text) = stored.and_then(|kv| String::from_utf8(kv.value).ok()) else {
        return (file, file_text);
    };
    if text == file_text {
        return (file, file_text);
    }
    match Config::from_toml_str(&text, "the configuration in the cluster store") {
        Ok(c)
            if c.cluster.name == file.cluster.name
                && c.cluster.store == file.cluster.store
                && c.host(host.as_str()).is_some() =>
        {
            tracing::warn!(
                file = %options.config.display(),
                "running the configuration stored in the cluster store (vmha config apply), which differs from the file"
            );
            (Arc::new(c), text)
        }
        Ok(_) => {
            tracing::error!("the stored configuration does not fit this daemon; running the file");
            (file, file_text)
        }
        Err(e) => {
            tracing::error!("the stored configuration is invalid; running the file:\n{e}");
            (file, file_text)
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
