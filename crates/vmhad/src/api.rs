//! The HTTP API: on a Unix socket in the state dir (local root access, no tokens) and, when
//! `[api] listen` is set, on TCP with bearer tokens ([`crate::api_auth`]) and optionally TLS
//! ([`crate::api_tcp`]) — the same routes on both. Handlers only parse requests into typed
//! commands for the core and render its answers: no HA logic lives here. Bad requests get a
//! JSON error and change nothing. `docs/openapi.json` describes every `/v1` route.
//!
//! - `GET  /` (and `/web/…`) — the web page ([`crate::api_web`]); `GET /v1/openapi.json`
//! - `GET  /v1/status` — this host's VM groups and apps, and the cluster view
//! - `GET  /v1/vms/{vm}/explain` — one VM group with its recent decisions and events
//! - `GET  /v1/events?limit=N&follow=true` — the event log as NDJSON, optionally live
//! - `GET  /v1/snapshot` — the cluster's records as this host sees them and its configuration
//!   (read-only; `vmha simulate --from-cluster` starts from it)
//! - `GET  /v1/events/stream?limit=N` — the same as server-sent events, always live
//! - `POST /v1/commands` — an admin command (JSON, `{"command": "app-offline", …}`)
//! - `POST /v1/config` — a new cluster configuration (`{"toml": "..."}`): validated, stored in
//!   the cluster store, applied by every host; `POST /v1/config/reload` — this daemon's file
//! - `GET  /metrics` — Prometheus metrics ([`crate::metrics`]), the states taken from the same
//!   status as `/v1/status`
//! - `POST /v1/vms/{vm}/exec` — run a command in the guest (`{"argv": [...], "timeout_ms": N}`),
//!   like `qm guest exec`: for operators and failure drills; output is capped
//!
//! Every refusal is a JSON `ErrorReply` with a stable code ([`crate::api_error`]); connections
//! are limited and timed out by [`crate::api_conn`].

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::oneshot;
use vmha_engine::{AdminCommand, Event, ObjectRef};
use vmha_store::ClusterStore;
use vmha_store::records::EventLog;

use vmha_model::Name;

use vmha_api::{
    Applied, ConfigApplied, ConfigApply, ErrorCode, EventLine, ExecRequest, Explain, GuestOutput,
    MAX_REQUEST_BODY, SnapshotView, StatusView,
};

use crate::api_conn::Listener;
use crate::api_error::{ApiError, method_not_allowed, no_such_route};
use crate::api_tcp::TcpApi;
use crate::inbox::{ApiRequest, ConfigRefused, Inbox, Msg};
use crate::slots::Slots;

struct Ctx<S> {
    core: Inbox,
    log: EventLog<S>,
    hosts: Vec<Name>,
    slots: Slots,
}

type Shared<S> = Arc<Ctx<S>>;

impl<S> Ctx<S> {
    fn host_names(&self) -> Vec<&str> {
        self.hosts.iter().map(Name::as_str).collect()
    }
}

/// Starts serving on `listener` (bound with its final mode by
/// [`crate::files::bind_api_socket`]) and on the TCP listeners of `tcp`; the returned task runs
/// until aborted, and aborting it closes every listener and connection.
pub async fn serve<S: ClusterStore>(
    listener: std::os::unix::net::UnixListener,
    tcp: Option<TcpApi>,
    core: Inbox,
    log: EventLog<S>,
    hosts: Vec<Name>,
    slots: Slots,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
        .map_err(|e| anyhow::anyhow!("serving the API socket: {e}"))?;
    let ctx = Arc::new(Ctx {
        core,
        log,
        hosts,
        slots,
    });
    let app = crate::api_web::routes()
        .route("/v1/status", get(status::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/v1/vms/{vm}/explain", get(explain::<S>))
        .route("/v1/events", get(events::<S>))
        .route("/v1/snapshot", get(snapshot::<S>))
        .route("/v1/events/stream", get(event_stream::<S>))
        .route("/v1/commands", post(command::<S>))
        .route("/v1/vms/{vm}/exec", post(exec::<S>))
        .route("/v1/config", post(apply_config::<S>))
        .route("/v1/config/reload", post(reload_config::<S>))
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .with_state(ctx);
    let mut runs = vec![tokio::spawn(crate::api_conn::run(
        Listener::Unix(listener),
        app.clone(),
    ))];
    if let Some(tcp) = tcp {
        let guarded = app.layer(axum::middleware::from_fn_with_state(
            tcp.tokens,
            crate::api_auth::require_token,
        ));
        for (addr, l) in tcp.listeners {
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| anyhow::anyhow!("serving the API on {addr}: {e}"))?;
            let scheme = if tcp.tls.is_some() { "https" } else { "http" };
            tracing::info!("API listening on {scheme}://{addr}");
            runs.push(tokio::spawn(crate::api_conn::run(
                Listener::Tcp(l, tcp.tls.clone()),
                guarded.clone(),
            )));
        }
    }
    Ok(tokio::spawn(async move {
        // Aborting this task aborts every listener's (a JoinHandle dropped does not).
        let _abort = AbortAll(runs.iter().map(|r| r.abort_handle()).collect());
        futures_util::future::join_all(runs).await;
    }))
}

/// Aborts its tasks when dropped.
struct AbortAll(Vec<tokio::task::AbortHandle>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn current_status<S>(ctx: &Ctx<S>) -> Result<StatusView, ApiError> {
    let (tx, rx) = oneshot::channel();
    if !ctx.core.send(Msg::Api(ApiRequest::Status(tx))).await {
        return Err(ApiError::shutting_down());
    }
    rx.await.map_err(|_| ApiError::shutting_down())
}

async fn status<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
) -> Result<Json<StatusView>, ApiError> {
    current_status(&ctx).await.map(Json)
}

async fn snapshot<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
) -> Result<Json<SnapshotView>, ApiError> {
    let (tx, rx) = oneshot::channel();
    if !ctx.core.send(Msg::Api(ApiRequest::Snapshot(tx))).await {
        return Err(ApiError::shutting_down());
    }
    rx.await.map(Json).map_err(|_| ApiError::shutting_down())
}

/// `GET /metrics`: every metric, its state gauges from the status of this very moment.
async fn metrics<S: ClusterStore>(State(ctx): State<Shared<S>>) -> Result<Response, ApiError> {
    let status = current_status(&ctx).await?;
    let text = crate::metrics::METRICS.render(&status);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

async fn explain<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    vm: Result<UrlPath<String>, PathRejection>,
) -> Result<Json<Explain>, ApiError> {
    let UrlPath(vm) = vm.map_err(|e| ApiError::path(&e))?;
    let status = current_status(&ctx).await?;
    let Some(vm_status) = status.agent.vms.into_iter().find(|v| v.name.as_str() == vm) else {
        return Err(ApiError::unknown_vm(&vm));
    };
    let cluster = status
        .cluster_view
        .and_then(|c| c.vms.into_iter().find(|v| v.name.as_str() == vm));
    let tail = ctx
        .log
        .last::<Event>(&ctx.host_names(), 2_000)
        .await
        .map_err(internal)?;
    let mut events: Vec<Event> = tail
        .events
        .into_iter()
        .map(|e| e.event)
        .filter(|e| event_vm(e) == Some(vm.as_str()))
        .collect();
    let keep = events.len().saturating_sub(20);
    events.drain(..keep);
    Ok(Json(Explain {
        vm: vm_status,
        cluster,
        events,
    }))
}

/// The VM an event is about, if any.
fn event_vm(e: &Event) -> Option<&str> {
    match &e.object {
        ObjectRef::Vm(vm) | ObjectRef::App { vm, .. } => Some(vm.as_str()),
        ObjectRef::Host(_) => None,
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    follow: bool,
}

fn default_limit() -> usize {
    50
}

/// An event as its JSON line ([`EventLine`]).
fn event_json(host: &str, seq: u64, event: Event) -> String {
    serde_json::to_string(&EventLine {
        host: Name::new(host).ok(),
        seq,
        text: event.to_string(),
        event,
    })
    .unwrap_or_default()
}

/// An event as one NDJSON line.
fn ndjson(host: &str, seq: u64, event: Event) -> String {
    let mut line = event_json(host, seq, event);
    line.push('\n');
    line
}

/// An event as one server-sent event (`event: event`, its JSON line as `data`).
fn sse(host: &str, seq: u64, event: Event) -> String {
    format!(
        "id: {host}/{seq}\nevent: event\ndata: {}\n\n",
        event_json(host, seq, event)
    )
}

/// The last `limit` events, each rendered by `render`, then (if `follow`) every new one as it
/// is written, for as long as the client reads.
async fn tail_and_follow<S: ClusterStore>(
    ctx: &Ctx<S>,
    limit: usize,
    follow: bool,
    render: fn(&str, u64, Event) -> String,
    content_type: &'static str,
) -> Result<Response, ApiError> {
    if limit > 10_000 {
        return Err(ApiError::invalid_value("limit must be at most 10000"));
    }
    let tail = ctx
        .log
        .last::<Event>(&ctx.host_names(), limit)
        .await
        .map_err(internal)?;
    let from = tail.follow_from;
    let head: String = tail
        .events
        .into_iter()
        .map(|e| render(&e.host, e.seq, e.event))
        .collect();
    let headers = [
        (axum::http::header::CONTENT_TYPE, content_type),
        (axum::http::header::CACHE_CONTROL, "no-store"),
    ];
    if !follow {
        return Ok((headers, head).into_response());
    }
    let follower = ctx.log.follow::<Event>(from).await.map_err(internal)?;
    let live = futures_util::stream::unfold(follower, move |mut f| async move {
        match f.next().await {
            Ok(e) => Some((Ok::<_, std::io::Error>(render(&e.host, e.seq, e.event)), f)),
            Err(err) => {
                tracing::debug!("event follower ended: {err}");
                None
            }
        }
    });
    let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) });
    let body = axum::body::Body::from_stream(futures_util::StreamExt::chain(first, live));
    Ok((headers, body).into_response())
}

async fn events<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::query(&e))?;
    tail_and_follow(&ctx, q.limit, q.follow, ndjson, "application/x-ndjson").await
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(default = "default_limit")]
    limit: usize,
}

/// `GET /v1/events/stream`: the last `limit` events, then the live ones, as server-sent events.
async fn event_stream<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::query(&e))?;
    tail_and_follow(&ctx, q.limit, true, sse, "text/event-stream").await
}

async fn command<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    body: Result<Json<AdminCommand>, JsonRejection>,
) -> Result<Json<Applied>, ApiError> {
    let Json(cmd) = body.map_err(|e| ApiError::json(&e))?;
    let (tx, rx) = oneshot::channel();
    if !ctx.core.send(Msg::Api(ApiRequest::Command(cmd, tx))).await {
        return Err(ApiError::shutting_down());
    }
    match rx.await.map_err(|_| ApiError::shutting_down())? {
        Ok(()) => Ok(Json(Applied { ok: true })),
        Err(e) => Err(ApiError::command(e)),
    }
}

async fn config_request<S>(
    ctx: &Ctx<S>,
    toml: Option<String>,
) -> Result<Json<ConfigApplied>, ApiError> {
    let (tx, rx) = oneshot::channel();
    if !ctx.core.send(Msg::Api(ApiRequest::Config(toml, tx))).await {
        return Err(ApiError::shutting_down());
    }
    match rx.await.map_err(|_| ApiError::shutting_down())? {
        Ok(applied) => Ok(Json(applied)),
        Err(e) => {
            let (status, code) = match e {
                ConfigRefused::Invalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::ConfigInvalid),
                ConfigRefused::Incompatible(_) => {
                    (StatusCode::CONFLICT, ErrorCode::ConfigIncompatible)
                }
                ConfigRefused::Store(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::StoreUnavailable)
                }
            };
            Err(ApiError::new(status, code, e.to_string()))
        }
    }
}

/// `POST /v1/config`: validates a new configuration, stores it, every host applies it.
async fn apply_config<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    body: Result<Json<ConfigApply>, JsonRejection>,
) -> Result<Json<ConfigApplied>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::json(&e))?;
    config_request(&ctx, Some(body.toml)).await
}

/// `POST /v1/config/reload`: the daemon's own configuration file again (like SIGHUP).
async fn reload_config<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
) -> Result<Json<ConfigApplied>, ApiError> {
    config_request(&ctx, None).await
}

async fn exec<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    vm: Result<UrlPath<String>, PathRejection>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Json<GuestOutput>, ApiError> {
    let UrlPath(vm) = vm.map_err(|e| ApiError::path(&e))?;
    let Json(body) = body.map_err(|e| ApiError::json(&e))?;
    if body.argv.first().is_none_or(String::is_empty) {
        return Err(ApiError::invalid_value("argv must name a program"));
    }
    if !(1..=ExecRequest::MAX_TIMEOUT_MS).contains(&body.timeout_ms) {
        return Err(ApiError::invalid_value(format!(
            "timeout_ms must be between 1 and {}",
            ExecRequest::MAX_TIMEOUT_MS
        )));
    }
    let slot = Name::new(&vm).ok().and_then(|n| ctx.slots.get(&n));
    let Some(slot) = slot else {
        return Err(ApiError::unknown_vm(&vm));
    };
    slot.exec(&body.argv, Duration::from_millis(body.timeout_ms))
        .await
        .map(Json)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::GuestError,
                e.to_string(),
            )
        })
}

/// vmhad could not read its own event log: 500 `internal`.
fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        e.to_string(),
    )
}
