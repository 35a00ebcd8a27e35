//! The API's refusals. Every one is a JSON [`ErrorReply`] with a stable [`ErrorCode`]: the
//! handlers' own refusals, the router's 404 and 405, the extractors' rejections (415, 400, 422,
//! 413, 408) and the connection layer's 413 and 503 — never an empty or plain-text body.

use std::error::Error as _;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use vmha_api::{ErrorBody, ErrorCode, ErrorReply, MAX_REQUEST_BODY};
use vmha_engine::CommandError;

use crate::api_conn::BodyTimedOut;

/// A refusal: its HTTP status, code, text for a person and, for a refused admin command, the
/// command's error as data. Rendered as an [`ErrorReply`].
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    error: String,
    command_error: Option<CommandError>,
}

impl ApiError {
    /// A refusal with this status, code and text.
    pub(crate) fn new(status: StatusCode, code: ErrorCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            error: error.into(),
            command_error: None,
        }
    }

    /// A value out of its range: 400 `invalid-value`.
    pub(crate) fn invalid_value(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidValue, error)
    }

    /// No VM `vm` on this host: 404 `unknown-vm`.
    pub(crate) fn unknown_vm(vm: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownVm,
            format!("no VM named `{vm}` on this host"),
        )
    }

    /// vmhad is stopping and its core takes no more requests: 503 `shutting-down`.
    pub(crate) fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "vmhad is shutting down; nothing of this request was changed",
        )
    }

    /// A refused admin command: `command-refused`, its status by kind, the error as data.
    pub(crate) fn command(e: CommandError) -> Self {
        ApiError {
            status: status_of(&e),
            code: ErrorCode::CommandRefused,
            error: e.to_string(),
            command_error: Some(e),
        }
    }

    /// A body announced (`Content-Length`) or found longer than [`MAX_REQUEST_BODY`]: 413.
    pub(crate) fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body is longer than {MAX_REQUEST_BODY} bytes; nothing was changed"
            ),
        )
    }

    /// A JSON body that was refused: 415 (not JSON), 400 (bad syntax, unreadable), 422 (wrong
    /// shape), 413 (too long) or 408 (did not arrive in time).
    pub(crate) fn json(e: &JsonRejection) -> Self {
        let code = match e {
            JsonRejection::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(_) => ErrorCode::MalformedJson,
            JsonRejection::JsonDataError(_) => ErrorCode::InvalidRequest,
            _ if timed_out(e) => return Self::body_timed_out(),
            _ if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Self::too_large(),
            _ => ErrorCode::UnreadableBody,
        };
        Self::new(e.status(), code, e.body_text())
    }

    fn body_timed_out() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            format!(
                "the request body did not arrive within {} s; nothing was changed",
                crate::api_conn::BODY_READ_TIMEOUT.as_secs()
            ),
        )
    }

    /// A path segment that cannot be decoded: 400 `invalid-path`.
    pub(crate) fn path(e: &PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidPath,
            e.body_text(),
        )
    }

    /// A query string that does not parse: 400 `invalid-query`.
    pub(crate) fn query(e: &QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidQuery,
            e.body_text(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let reply = ErrorReply {
            code: self.code,
            body: ErrorBody {
                error: self.error,
                command_error: self.command_error,
            },
        };
        (self.status, Json(reply)).into_response()
    }
}

/// Whether a body rejection was caused by the connection layer's body read timeout.
fn timed_out(e: &JsonRejection) -> bool {
    let mut cause = e.source();
    while let Some(c) = cause {
        if c.is::<BodyTimedOut>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The router's fallback: 404 `no-such-route`.
pub(crate) async fn no_such_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NoSuchRoute,
        format!(
            "{method} {}: no such API route (see GET /v1/status, /v1/events, …)",
            uri.path()
        ),
    )
}

/// A route's fallback for other methods: 405 `method-not-allowed`.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        format!("{} does not take {method}", uri.path()),
    )
}

/// The status of a refused admin command.
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
