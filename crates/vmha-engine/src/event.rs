//! Events: every state change of a host, VM group or app, with its reason (SPEC §3).

use std::fmt;

use serde::{Deserialize, Serialize};
use vmha_model::Name;

use crate::time::Timestamp;

/// Who emitted an event: the agents of one host, or the cluster controller.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The host agent (VM monitor, app monitors, decision agent) of this host.
    Host(Name),
    /// The elected cluster controller.
    Controller,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Host(h) => write!(f, "{h}"),
            Origin::Controller => f.write_str("controller"),
        }
    }
}

/// The object whose state changed. Displays as `host:NAME`, `VM` or `VM/APP`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectRef {
    /// A host.
    Host(Name),
    /// A VM group.
    Vm(Name),
    /// An app inside a VM.
    App {
        /// The VM.
        vm: Name,
        /// The app.
        app: Name,
    },
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectRef::Host(h) => write!(f, "host:{h}"),
            ObjectRef::Vm(v) => write!(f, "{v}"),
            ObjectRef::App { vm, app } => write!(f, "{vm}/{app}"),
        }
    }
}

/// One state change. `from` and `to` are the SPEC §3 spellings of the object's states
/// (`online`, `faulted`, `failing-over`, `maintenance`, …); `from == to` only for alerts, which
/// re-announce a state. The reason shows the arithmetic behind the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When the change happened (the `now` of the input that caused it).
    pub time: Timestamp,
    /// Which agent saw it.
    pub origin: Origin,
    /// What changed.
    pub object: ObjectRef,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// Why, human-readable, with the numbers.
    pub reason: String,
}

impl fmt::Display for Event {
    /// `time origin object from → to: reason`, the golden-log line format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} → {}: {}",
            self.time, self.origin, self.object, self.from, self.to, self.reason
        )
    }
}
