//! The wire types of vmhad's HTTP API (`/v1`). vmhad serializes them and the `vmha` CLI
//! deserializes them, so a change of the wire format is a compile error on both sides rather
//! than a half-printed table. Readers ignore unknown fields: a newer vmhad may add some.
//!
//! - `GET  /v1/status` → [`StatusView`]
//! - `GET  /v1/vms/{vm}/explain` → [`Explain`]
//! - `GET  /v1/events?limit=N&follow=true` → NDJSON of [`EventLine`]
//! - `GET  /v1/snapshot` → [`SnapshotView`] (read-only: what `vmha simulate --from-cluster`
//!   starts from)
//! - `GET  /v1/events/stream?limit=N` → server-sent events, `data:` one [`EventLine`] each
//! - `GET  /v1/openapi.json` → the OpenAPI 3 document of all of these (`docs/openapi.json`)
//! - `POST /v1/commands` with a [`vmha_engine::AdminCommand`] → [`Applied`]
//! - `POST /v1/vms/{vm}/exec` with an [`ExecRequest`] → [`GuestOutput`]
//! - `POST /v1/config` with a [`ConfigApply`] → [`ConfigApplied`]
//! - `POST /v1/config/reload` (the daemon's own file) → [`ConfigApplied`]
//! - any refusal → an HTTP error status with an [`ErrorReply`]: a stable [`ErrorCode`] plus
//!   the [`ErrorBody`] (readers that only know [`ErrorBody`] ignore the `code`)
//!
//! Request bodies are at most [`MAX_REQUEST_BODY`] bytes.

use serde::{Deserialize, Serialize};
use vmha_engine::{ClusterVmView, ControllerStatus, Event, HostStatus, StoreHealth, VmStatus};
use vmha_model::Name;

/// `GET /v1/status`: one host's view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// The host that answered.
    pub host: Name,
    /// Cluster name.
    pub cluster: Name,
    /// Whether that host runs the cluster controller.
    pub controller: bool,
    /// The host running the cluster controller, if one is known.
    #[serde(default)]
    pub leader: Option<Name>,
    /// The answering host's own state: `up`, or `fenced` (its lease was not renewed in time:
    /// it killed its VMs and starts none until it holds a lease again).
    #[serde(default = "StatusView::up")]
    pub host_state: String,
    /// How the host's writes to the cluster store fare (`degraded` = the last commit failed:
    /// commands are refused, monitoring and local restarts go on).
    #[serde(default)]
    pub store: StoreHealth,
    /// Why the last configuration this host saw was not applied (invalid, or it cannot
    /// change live); it keeps running the previous one.
    #[serde(default)]
    pub config_error: Option<String>,
    /// The host's VM groups and their apps.
    pub agent: HostStatus,
    /// The controller's view (hosts, placement), when that host is the controller.
    pub cluster_view: Option<ControllerStatus>,
    /// Work done through this host's guest agents since its daemon started.
    #[serde(default)]
    pub guest_io: GuestIoView,
}

/// Counters of the work done through guest agents (monotonic since the daemon started).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIoView {
    /// Probes started: one `guest-exec` each, whatever the number of checks in it.
    pub probes: u64,
    /// App checks run in those probes.
    pub checks: u64,
    /// Watchers started (one long-running `guest-exec` each).
    pub watchers: u64,
    /// `guest-exec-status` polls of watchers (those after a ring included).
    pub watch_polls: u64,
    /// "Ended" rings of watchers on their VM's doorbell (the first of a watcher's is followed
    /// by a poll at once).
    #[serde(default)]
    pub watch_rings: u64,
}

impl StatusView {
    fn up() -> String {
        "up".to_string()
    }
}

/// `GET /v1/vms/{vm}/explain`: why the last decisions about a VM group were taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explain {
    /// The VM group as its host sees it, with its recent decisions.
    pub vm: VmStatus,
    /// The controller's view of the group, when the answering host is the controller.
    pub cluster: Option<ClusterVmView>,
    /// The last events about the VM and its apps, oldest first.
    pub events: Vec<Event>,
}

/// One line of `GET /v1/events`: the event, where it is in the log and its one-line form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventLine {
    /// The host whose event stream holds it (each host numbers its own events).
    #[serde(default)]
    pub host: Option<Name>,
    /// Sequence number in that host's event stream (increasing).
    pub seq: u64,
    /// The event as one human-readable line (`time origin object from → to: reason`).
    pub text: String,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// `GET /v1/snapshot`: the cluster's state as the answering host sees it, with the
/// configuration it runs. Reading it changes nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotView {
    /// The host that answered.
    pub host: Name,
    /// Cluster name.
    pub cluster: Name,
    /// The configuration the host runs (TOML, as stored or read from its file).
    pub config: String,
    /// The cluster store's records and what the host sees in its guests.
    pub snapshot: vmha_engine::sim::ClusterSnapshot,
}

/// `POST /v1/commands`: the command was applied.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Applied {
    /// Always true.
    pub ok: bool,
}

/// `POST /v1/config`: a new cluster configuration to validate, store and apply on every host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigApply {
    /// The whole configuration file (TOML).
    pub toml: String,
}

/// `POST /v1/config` and `POST /v1/config/reload`: the configuration is valid and stored in
/// the cluster store; every host applies it as soon as it sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigApplied {
    /// Hosts in it.
    pub hosts: usize,
    /// VM groups in it.
    pub vms: usize,
    /// Apps in it.
    pub apps: usize,
    /// What it changes, compared with the configuration the answering host runs.
    pub change: String,
}

/// `POST /v1/vms/{vm}/exec`: a command to run in the guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (`argv[0]` is the program's path in the guest).
    pub argv: Vec<String>,
    /// Time allowed, in milliseconds (1 to 600,000).
    #[serde(default = "ExecRequest::default_timeout_ms")]
    pub timeout_ms: u64,
}

impl ExecRequest {
    /// The default time allowed: 10 s.
    pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
    /// The longest time allowed: 10 min.
    pub const MAX_TIMEOUT_MS: u64 = 600_000;

    fn default_timeout_ms() -> u64 {
        Self::DEFAULT_TIMEOUT_MS
    }

    /// Whether vmhad accepts this `timeout_ms` (1 to [`ExecRequest::MAX_TIMEOUT_MS`]).
    pub fn timeout_allowed(timeout_ms: u64) -> bool {
        (1..=Self::MAX_TIMEOUT_MS).contains(&timeout_ms)
    }
}

/// `POST /v1/vms/{vm}/exec`: what a guest command printed and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestOutput {
    /// Exit code, when it exited.
    pub exit: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
    /// Standard output (lossy UTF-8, capped by vmhad).
    pub stdout: String,
    /// Standard error (lossy UTF-8, capped by vmhad).
    pub stderr: String,
    /// Whether vmhad cut the output at its cap.
    pub truncated: bool,
}

/// The largest request body vmhad reads (1 MiB; a `POST /v1/config` carries a whole
/// configuration file). A longer one is refused with 413 [`ErrorCode::PayloadTooLarge`] — at
/// once, from its `Content-Length`, when it has one.
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// The body of every refusal, as readers before [`ErrorReply`] know it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What was wrong, for a person.
    pub error: String,
    /// The refusal as data, when it is a refused admin command (its `error` tag names the
    /// kind: `frozen`, `store-unavailable`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_error: Option<vmha_engine::CommandError>,
}

/// What vmhad answers to every request it refuses: a stable machine-readable code and the
/// [`ErrorBody`] (`error` text, refused command's error), flattened into one JSON object:
/// `{"code": "no-such-route", "error": "…"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of refusal it is; stable across versions (scripts may match on it).
    #[serde(default)]
    pub code: ErrorCode,
    /// The text for a person and, for a refused admin command, its error as data.
    #[serde(flatten)]
    pub body: ErrorBody,
}

/// The kind of a refusal (`code` of an [`ErrorReply`]), kebab-case on the wire. The HTTP
/// status goes with it; the `error` text may change between versions, the code does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// 400: not an HTTP/1 request (malformed request line or header, bad framing).
    MalformedHttp,
    /// 414: the request's URI is too long.
    UriTooLong,
    /// 431: the request's head is too large.
    HeadersTooLarge,
    /// 404: the path is not an API route.
    NoSuchRoute,
    /// 405: the route exists, but not with this method.
    MethodNotAllowed,
    /// 400: a path segment (e.g. the VM name) cannot be decoded.
    InvalidPath,
    /// 400: the query string does not parse (e.g. `limit=abc`).
    InvalidQuery,
    /// 415: a body without `Content-Type: application/json`.
    UnsupportedMediaType,
    /// 400: the body is not JSON.
    MalformedJson,
    /// 422: the JSON has the wrong shape (unknown or missing field, wrong type).
    InvalidRequest,
    /// 400: a value is out of its range (`limit`, `argv`, `timeout_ms`).
    InvalidValue,
    /// 400: the body could not be read (broken chunked encoding, connection lost).
    UnreadableBody,
    /// 413: the body is longer than [`MAX_REQUEST_BODY`].
    PayloadTooLarge,
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 404: no VM of that name on the answering host (explain, exec).
    UnknownVm,
    /// An admin command was refused (status by kind: 404, 400, 409, 503); `command_error`
    /// says which refusal.
    CommandRefused,
    /// 400: the configuration is invalid.
    ConfigInvalid,
    /// 409: the configuration cannot be applied to the running cluster.
    ConfigIncompatible,
    /// 503: the cluster store did not take the configuration.
    StoreUnavailable,
    /// 502: the guest command could not be run (guest agent unreachable or refusing).
    GuestError,
    /// 500: vmhad failed to read its own event log.
    Internal,
    /// 503: vmhad is shutting down.
    ShuttingDown,
    /// 503: every connection slot is busy with a request in progress; retry.
    TooManyConnections,
    /// 401: on a TCP listener, a request without a bearer token, or with one vmhad does not
    /// know.
    Unauthorized,
    /// 403: on a TCP listener, a read-only token on an admin endpoint (a `POST`).
    Forbidden,
    /// A code this reader does not know (a newer vmhad), or none (an older one).
    #[default]
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as on the wire (`no-such-route`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedHttp => "malformed-http",
            ErrorCode::UriTooLong => "uri-too-long",
            ErrorCode::HeadersTooLarge => "headers-too-large",
            ErrorCode::NoSuchRoute => "no-such-route",
            ErrorCode::MethodNotAllowed => "method-not-allowed",
            ErrorCode::InvalidPath => "invalid-path",
            ErrorCode::InvalidQuery => "invalid-query",
            ErrorCode::UnsupportedMediaType => "unsupported-media-type",
            ErrorCode::MalformedJson => "malformed-json",
            ErrorCode::InvalidRequest => "invalid-request",
            ErrorCode::InvalidValue => "invalid-value",
            ErrorCode::UnreadableBody => "unreadable-body",
            ErrorCode::PayloadTooLarge => "payload-too-large",
            ErrorCode::RequestTimeout => "request-timeout",
            ErrorCode::UnknownVm => "unknown-vm",
            ErrorCode::CommandRefused => "command-refused",
            ErrorCode::ConfigInvalid => "config-invalid",
            ErrorCode::ConfigIncompatible => "config-incompatible",
            ErrorCode::StoreUnavailable => "store-unavailable",
            ErrorCode::GuestError => "guest-error",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting-down",
            ErrorCode::TooManyConnections => "too-many-connections",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmha_engine::{ObjectRef, Origin, Timestamp};

    #[test]
    fn event_lines_round_trip_with_the_event_flattened() {
        let name = |s: &str| Name::new(s).unwrap();
        let event = Event {
            time: Timestamp(1_000),
            origin: Origin::Host(name("kvm1")),
            object: ObjectRef::App {
                vm: name("shop"),
                app: name("db"),
            },
            from: "online".into(),
            to: "restarting".into(),
            reason: "check exited 3".into(),
        };
        let line = EventLine {
            host: Some(name("kvm1")),
            seq: 7,
            text: event.to_string(),
            event: event.clone(),
        };
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["seq"], 7);
        assert_eq!(json["to"], "restarting");
        assert_eq!(json["object"]["app"]["app"], "db");
        let back: EventLine = serde_json::from_value(json).unwrap();
        assert_eq!(back.event, event);
        assert_eq!(
            back.text,
            "1000 kvm1 shop/db online → restarting: check exited 3"
        );
    }

    #[test]
    fn exec_requests_default_their_timeout_and_reject_unknown_fields() {
        let r: ExecRequest = serde_json::from_str(r#"{"argv": ["/bin/true"]}"#).unwrap();
        assert_eq!(r.timeout_ms, ExecRequest::DEFAULT_TIMEOUT_MS);
        assert!(serde_json::from_str::<ExecRequest>(r#"{"argv": [], "tmeout_ms": 5}"#).is_err());
    }

    #[test]
    fn error_replies_carry_a_stable_code_and_stay_readable_as_error_bodies() {
        let reply = ErrorReply {
            code: ErrorCode::CommandRefused,
            body: ErrorBody {
                error: "no cluster controller".into(),
                command_error: Some(vmha_engine::CommandError::NoController),
            },
        };
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(json["code"], "command-refused");
        assert_eq!(json["error"], "no cluster controller");
        assert_eq!(json["command_error"]["error"], "no-controller");
        // An older reader sees its ErrorBody; a reader meets an older or newer vmhad.
        let old: ErrorBody = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(old.command_error, reply.body.command_error);
        let back: ErrorReply = serde_json::from_value(json).unwrap();
        assert_eq!(back.code, ErrorCode::CommandRefused);
        let older: ErrorReply = serde_json::from_str(r#"{"error": "x"}"#).unwrap();
        assert_eq!(older.code, ErrorCode::Unknown);
        let newer: ErrorReply =
            serde_json::from_str(r#"{"code": "brand-new", "error": "x"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
    }

    #[test]
    fn error_codes_print_as_on_the_wire() {
        use ErrorCode::*;
        for code in [
            MalformedHttp,
            UriTooLong,
            HeadersTooLarge,
            NoSuchRoute,
            MethodNotAllowed,
            InvalidPath,
            InvalidQuery,
            UnsupportedMediaType,
            MalformedJson,
            InvalidRequest,
            InvalidValue,
            UnreadableBody,
            PayloadTooLarge,
            RequestTimeout,
            UnknownVm,
            CommandRefused,
            ConfigInvalid,
            ConfigIncompatible,
            StoreUnavailable,
            GuestError,
            Internal,
            ShuttingDown,
            TooManyConnections,
            Unknown,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
