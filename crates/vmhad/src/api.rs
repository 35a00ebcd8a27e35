//! The local HTTP API on a Unix socket in the state dir. Handlers only parse requests into
//! typed commands for the core and render its answers: no HA logic lives here. Bad requests get
//! a JSON error and change nothing.
//!
//! - `GET  /v1/status` — this host's VM groups and apps, and the cluster view
//! - `GET  /v1/vms/{vm}/explain` — one VM group with its recent decisions and events
//! - `GET  /v1/events?limit=N&follow=true` — the event log as NDJSON, optionally live
//! - `POST /v1/commands` — an admin command (JSON, `{"command": "app-offline", …}`)
//! - `POST /v1/vms/{vm}/exec` — run a command in the guest (`{"argv": [...], "timeout_ms": N}`),
//!   like `qm guest exec`: for operators and failure drills; output is capped

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use vmha_engine::{AdminCommand, CommandError, Event, ObjectRef};
use vmha_store::ClusterStore;
use vmha_store::records::EventLog;

use vmha_model::Name;

use vmha_api::{Applied, ErrorBody, EventLine, ExecRequest, Explain, GuestOutput, StatusView};

use crate::daemon::{ApiRequest, Msg};
use crate::vm_slot::VmSlot;

struct Ctx<S> {
    core: mpsc::Sender<Msg>,
    log: EventLog<S>,
    slots: BTreeMap<Name, Arc<VmSlot>>,
}

type Shared<S> = Arc<Ctx<S>>;

/// A JSON error body with an HTTP status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn unavailable() -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "vmhad is shutting down".into(),
    )
}

/// Starts serving; the returned task runs until aborted.
pub async fn serve<S: ClusterStore>(
    socket: &Path,
    core: mpsc::Sender<Msg>,
    log: EventLog<S>,
    slots: BTreeMap<Name, Arc<VmSlot>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // A socket file left by an earlier run; nothing else may live at this path.
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(|e| anyhow::anyhow!("binding the API socket {}: {e}", socket.display()))?;
    // Admin commands come through this socket: only its owner (and group) may connect.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o660))
        .map_err(|e| anyhow::anyhow!("restricting the API socket {}: {e}", socket.display()))?;
    let ctx = Arc::new(Ctx { core, log, slots });
    let app = Router::new()
        .route("/v1/status", get(status::<S>))
        .route("/v1/vms/{vm}/explain", get(explain::<S>))
        .route("/v1/events", get(events::<S>))
        .route("/v1/commands", post(command::<S>))
        .route("/v1/vms/{vm}/exec", post(exec::<S>))
        .with_state(ctx);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("API server stopped: {e}");
        }
    }))
}

async fn current_status<S>(ctx: &Ctx<S>) -> Result<StatusView, ApiError> {
    let (tx, rx) = oneshot::channel();
    ctx.core
        .send(Msg::Api(ApiRequest::Status(tx)))
        .await
        .map_err(|_| unavailable())?;
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
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no VM named `{vm}` on this host"),
        ));
    };
    let cluster = status
        .cluster_view
        .and_then(|c| c.vms.into_iter().find(|v| v.name.as_str() == vm));
    let tail = ctx
        .log
        .last::<Event>(2_000)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
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

fn ndjson(seq: u64, event: Event) -> String {
    let mut line = serde_json::to_string(&EventLine {
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
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if q.limit > 10_000 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "limit must be at most 10000".into(),
        ));
    }
    let tail = ctx
        .log
        .last::<Event>(q.limit)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let revision = tail.revision;
    let head: String = tail
        .events
        .into_iter()
        .map(|e| ndjson(e.seq, e.event))
        .collect();
    let ndjson_type = [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow {
        return Ok((ndjson_type, head).into_response());
    }
    let follower = ctx
        .log
        .follow::<Event>(revision + 1)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let live = futures_util::stream::unfold(follower, |mut f| async move {
        match f.next().await {
            Ok(e) => Some((Ok::<_, std::io::Error>(ndjson(e.seq, e.event)), f)),
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
    let Json(cmd) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (tx, rx) = oneshot::channel();
    ctx.core
        .send(Msg::Api(ApiRequest::Command(cmd, tx)))
        .await
        .map_err(|_| unavailable())?;
    match rx.await.map_err(|_| unavailable())? {
        Ok(()) => Ok(Json(Applied { ok: true })),
        Err(e) => Err(ApiError(status_of(&e), e.to_string())),
    }
}

fn status_of(e: &CommandError) -> StatusCode {
    match e {
        CommandError::UnknownVm(_)
        | CommandError::UnknownApp { .. }
        | CommandError::UnknownHost(_) => StatusCode::NOT_FOUND,
        CommandError::InvalidValue(_) | CommandError::HostNotAcceptable { .. } => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::CONFLICT,
    }
}

async fn exec<S: ClusterStore>(
    State(ctx): State<Shared<S>>,
    UrlPath(vm): UrlPath<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Json<GuestOutput>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if body.argv.first().is_none_or(String::is_empty) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "argv must name a program".into(),
        ));
    }
    if !(1..=ExecRequest::MAX_TIMEOUT_MS).contains(&body.timeout_ms) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "timeout_ms must be between 1 and {}",
                ExecRequest::MAX_TIMEOUT_MS
            ),
        ));
    }
    let Some(slot) = ctx.slots.get(vm.as_str()) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no VM named `{vm}` on this host"),
        ));
    };
    slot.exec(&body.argv, Duration::from_millis(body.timeout_ms))
        .await
        .map(Json)
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))
}
