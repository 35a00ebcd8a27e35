//! The local HTTP API on a Unix socket in the state dir. Handlers only parse requests into
//! typed commands for the core and render its answers: no HA logic lives here. Bad requests get
//! a JSON error and change nothing.
//!
//! - `GET  /v1/status` — this host's VM groups and apps, and the cluster view
//! - `GET  /v1/vms/{vm}/explain` — one VM group with its recent decisions and events
//! - `GET  /v1/events?limit=N&follow=true` — the event log as NDJSON, optionally live
//! - `POST /v1/commands` — an admin command (JSON, `{"command": "app-offline", …}`)
//! - `POST /v1/config` — a new cluster configuration (`{"toml": "..."}`): validated, stored in
//!   the cluster store, applied by every host; `POST /v1/config/reload` — this daemon's file
//! - `POST /v1/vms/{vm}/exec` — run a command in the guest (`{"argv": [...], "timeout_ms": N}`),
//!   like `qm guest exec`: for operators and failure drills; output is capped

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::oneshot;
use vmha_engine::{AdminCommand, CommandError, Event, ObjectRef};
use vmha_store::ClusterStore;
use vmha_store::records::EventLog;

use vmha_model::Name;

use vmha_api::{
    Applied, ConfigApplied, ConfigApply, ErrorBody, EventLine, ExecRequest, Explain, GuestOutput,
    StatusView,
};

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

/// A JSON error body with an HTTP status (and the refused command's error as data).
struct ApiError(StatusCode, String, Option<CommandError>);

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError(status, error.into(), None)
    }

    fn command(e: CommandError) -> Self {
        ApiError(status_of(&e), e.to_string(), Some(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.1,
            command_error: self.2,
        };
        (self.0, Json(body)).into_response()
    }
}

fn unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "vmhad is shutting down; nothing of this request was changed",
    )
}

/// Starts serving on `listener` (bound with its final mode by
/// [`crate::files::bind_api_socket`]); the returned task runs until aborted.
pub async fn serve<S: ClusterStore>(
    listener: std::os::unix::net::UnixListener,
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
    let app = Router::new()
        .route("/v1/status", get(status::<S>))
        .route("/v1/vms/{vm}/explain", get(explain::<S>))
        .route("/v1/events", get(events::<S>))
        .route("/v1/commands", post(command::<S>))
        .route("/v1/vms/{vm}/exec", post(exec::<S>))
        .route("/v1/config", post(apply_config::<S>))
        .route("/v1/config/reload", post(reload_config::<S>))
        .with_state(ctx);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("API server stopped: {e}");
        }
    }))
}

async fn current_status<S>(ctx: &Ctx<S>) -> Result<StatusView, ApiError> {
    let (tx, rx) = oneshot::channel();
    if !ctx.core.send(Msg::Api(ApiRequest::Status(tx))).await {
        return Err(unavailable());
    }
    rx.await.map_err(|_| unavailable())
}

async fn status<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
) -> Result<Json<StatusView>, ApiError> {
    current_status(&ctx).await.map(Json)
}

async fn explain<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    UrlPath(vm): UrlPath<String>,
) -> Result<Json<Explain>, ApiError> {
    let status = current_status(&ctx).await?;
    let Some(vm_status) = status.agent.vms.into_iter().find(|v| v.name.as_str() == vm) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no VM named `{vm}` on this host"),
        ));
    };
    let cluster = status
        .cluster_view
        .and_then(|c| c.vms.into_iter().find(|v| v.name.as_str() == vm));
    let tail = ctx
        .log
        .last::<Event>(&ctx.host_names(), 2_000)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
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

fn ndjson(host: &str, seq: u64, event: Event) -> String {
    let mut line = serde_json::to_string(&EventLine {
        host: Name::new(host).ok(),
        seq,
        text: event.to_string(),
        event,
    })
    .unwrap_or_default();
    line.push('\n');
    line
}

async fn events<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if q.limit > 10_000 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit must be at most 10000",
        ));
    }
    let tail = ctx
        .log
        .last::<Event>(&ctx.host_names(), q.limit)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let from = tail.follow_from;
    let head: String = tail
        .events
        .into_iter()
        .map(|e| ndjson(&e.host, e.seq, e.event))
        .collect();
    let ndjson_type = [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow {
        return Ok((ndjson_type, head).into_response());
    }
    let follower = ctx
        .log
        .follow::<Event>(from)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let live = futures_util::stream::unfold(follower, |mut f| async move {
        match f.next().await {
            Ok(e) => Some((Ok::<_, std::io::Error>(ndjson(&e.host, e.seq, e.event)), f)),
            Err(err) => {
                tracing::debug!("event follower ended: {err}");
                None
            }
        }
    });
    let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) });
    let body = axum::body::Body::from_stream(futures_util::StreamExt::chain(first, live));
    Ok((ndjson_type, body).into_response())
}

async fn command<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    body: Result<Json<AdminCommand>, JsonRejection>,
) -> Result<Json<Applied>, ApiError> {
    let Json(cmd) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (tx, rx) = oneshot::channel();
    if !ctx.core.send(Msg::Api(ApiRequest::Command(cmd, tx))).await {
        return Err(unavailable());
    }
    match rx.await.map_err(|_| unavailable())? {
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
        return Err(unavailable());
    }
    match rx.await.map_err(|_| unavailable())? {
        Ok(applied) => Ok(Json(applied)),
        Err(e) => {
            let status = match e {
                ConfigRefused::Invalid(_) => StatusCode::BAD_REQUEST,
                ConfigRefused::Incompatible(_) => StatusCode::CONFLICT,
                ConfigRefused::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            Err(ApiError::new(status, e.to_string()))
        }
    }
}

/// `POST /v1/config`: validates a new configuration, stores it, every host applies it.
async fn apply_config<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    body: Result<Json<ConfigApply>, JsonRejection>,
) -> Result<Json<ConfigApplied>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    config_request(&ctx, Some(body.toml)).await
}

/// `POST /v1/config/reload`: the daemon's own configuration file again (like SIGHUP).
async fn reload_config<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
) -> Result<Json<ConfigApplied>, ApiError> {
    config_request(&ctx, None).await
}

fn status_of(e: &CommandError) -> StatusCode {
    match e {
        CommandError::UnknownVm(_)
        | CommandError::UnknownApp { .. }
        | CommandError::UnknownHost(_) => StatusCode::NOT_FOUND,
        CommandError::InvalidValue(_) | CommandError::HostNotAcceptable { .. } => {
            StatusCode::BAD_REQUEST
        }
        CommandError::StoreUnavailable(_)
        | CommandError::NoController
        | CommandError::NotTaken(_)
        | CommandError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::CONFLICT,
    }
}

async fn exec<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    UrlPath(vm): UrlPath<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Json<GuestOutput>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if body.argv.first().is_none_or(String::is_empty) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "argv must name a program",
        ));
    }
    if !(1..=ExecRequest::MAX_TIMEOUT_MS).contains(&body.timeout_ms) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "timeout_ms must be between 1 and {}",
                ExecRequest::MAX_TIMEOUT_MS
            ),
        ));
    }
    let slot = Name::new(&vm).ok().and_then(|n| ctx.slots.get(&n));
    let Some(slot) = slot else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no VM named `{vm}` on this host"),
        ));
    };
    slot.exec(&body.argv, Duration::from_millis(body.timeout_ms))
        .await
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))
}
