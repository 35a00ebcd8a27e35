//! vmha-model: the configuration and state vocabulary of vmha.
//!
//! A [`Config`] can only be obtained by parsing ([`Config::from_toml_str`] or
//! [`Config::from_file`]): parsing checks every rule of the configuration (unknown keys, types,
//! duplicate names, references, `requires` cycles, ranges), so a `Config` value is valid by
//! construction and there is no separate validation pass a caller could forget. Errors carry
//! the file, line and column of the offending key and, where one exists, a hint.
//!
//! Every default lives in [`defaults`], written once and documented there.

pub mod config;
pub mod defaults;
pub mod duration;
pub mod error;
pub mod file;
pub mod name;
pub mod observation;
pub mod range;
mod raw;
mod resolve;
pub use resolve::Drivers;
pub mod state;

pub use config::{
    Accel, ApiConfig, ApiToken, App, Cache, Cluster, Config, DiskFormat, Driver, Host, LibvirtSpec,
    OnGuestLoss, Placement, Policy, QemuDisk, QemuSpec, Store, Tie, TokenRole, Vm,
};
pub use error::{ConfigError, Diagnostic, ErrorKind};
pub use name::{Name, NameError};
pub use observation::{
    ExitStatus, PauseReason, ProbeCheck, ProbeOutcome, ProcessRef, Unreadable, VmObservation,
    WatchEnd, WatchReport, WatchTarget,
};
pub use state::{AppState, HostState, VmState};
