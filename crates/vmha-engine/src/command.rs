//! Admin commands (SPEC §4.7) as typed inputs, and why one can be refused.
//!
//! A command is validated completely before anything changes: a refused command leaves the
//! engine exactly as it was. [`AdminCommand::route`] says which engine applies it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmha_model::defaults as d;
use vmha_model::range::{OutOfRange, check_duration, check_number};
use vmha_model::{Name, Policy, Tie};

/// An administrator's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum AdminCommand {
    /// Mark an app intentionally offline. With `auto_clear` (the default of the CLI) the flag
    /// clears itself when the app is seen running again.
    AppOffline {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Clear the flag when a probe finds the app running.
        auto_clear: bool,
    },
    /// Clear an app's intentionally-offline flag (it is monitored and restarted again).
    AppOnline {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
    },
    /// Start an app through the guest channel; clears its offline flag. Refused while an app it
    /// requires is not online.
    AppStart {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
    },
    /// Stop an app through the guest channel and set its offline flag. Refused while an online
    /// app requires it, or when it has no `stop` command.
    AppStop {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
    },
    /// Run the VM group (desired state `run`).
    VmStart {
        /// VM.
        vm: Name,
    },
    /// Stop the VM group intentionally (desired state `stop`): apps stopped, VM `offline`.
    VmStop {
        /// VM.
        vm: Name,
    },
    /// Restart the VM on its host (apps stopped, VM stopped and started, apps started).
    /// Not counted against the VM restart budget.
    VmRestart {
        /// VM.
        vm: Name,
    },
    /// Move the VM group to another host of its `hosts` list: a live migration when the VM
    /// runs and is live-migratable (`migrate`, shared storage), else a stop and start.
    VmMove {
        /// VM.
        vm: Name,
        /// Target host.
        to: Name,
        /// Stop it and start it on `to` even when it could be migrated live (and the only way
        /// to move a VM with `migrate` on whose disks are not on shared storage).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restart: bool,
    },
    /// Host maintenance on (drain: move or stop its VM groups) or off.
    HostMaintenance {
        /// Host.
        host: Name,
        /// On or off.
        on: bool,
    },
    /// Freeze a VM group: monitored, never acted upon.
    Freeze {
        /// VM.
        vm: Name,
    },
    /// Unfreeze a VM group.
    Unfreeze {
        /// VM.
        vm: Name,
    },
    /// Clear a fault: faulted apps and VM group re-armed, restart budgets reset, the
    /// controller's fault history of the VM forgotten.
    Clear {
        /// VM.
        vm: Name,
    },
    /// Change an app's priority at run time.
    SetPriority {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// New priority, within the configuration's [`d::APP_PRIORITY_RANGE`].
        priority: u32,
    },
    /// Change an app's restart budget at run time.
    SetAppBudget {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Restarts allowed within the window, within [`d::APP_RESTART_LIMIT_RANGE`].
        restart_limit: u32,
        /// Window in milliseconds, within [`d::APP_RESTART_WINDOW_RANGE`].
        restart_window_ms: u64,
    },
    /// Change a VM's restart budget at run time.
    SetVmBudget {
        /// VM.
        vm: Name,
        /// VM restarts allowed within the window, within [`d::VM_RESTART_LIMIT_RANGE`].
        vm_restart_limit: u32,
        /// Window in milliseconds, within [`d::VM_RESTART_WINDOW_RANGE`].
        vm_restart_window_ms: u64,
    },
    /// Change a VM's decision-agent policy (and tie rule) at run time.
    SetPolicy {
        /// VM.
        vm: Name,
        /// New policy.
        policy: Policy,
        /// New tie rule; `None` keeps the current one.
        tie: Option<Tie>,
    },
}

/// Which engine applies a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The [`crate::HostAgent`] of the VM's owner host.
    OwnerHost,
    /// The [`crate::Controller`] (freeze, unfreeze and clear reach the hosts through the VM's
    /// admin record).
    Controller,
}

impl AdminCommand {
    /// Where the daemon must send this command.
    pub fn route(&self) -> Route {
        match self {
            AdminCommand::VmStart { .. }
            | AdminCommand::VmStop { .. }
            | AdminCommand::VmMove { .. }
            | AdminCommand::HostMaintenance { .. }
            | AdminCommand::Freeze { .. }
            | AdminCommand::Unfreeze { .. }
            | AdminCommand::Clear { .. } => Route::Controller,
            _ => Route::OwnerHost,
        }
    }

    /// Checks every number of the command against the range the configuration file allows
    /// for the same setting (the ranges of [`vmha_model::defaults`], checked by
    /// [`vmha_model::range`], as the parser does): a run-time change can set nothing a file
    /// could not. A refusal is [`CommandError::InvalidValue`] naming the setting, the value and
    /// the allowed range.
    pub fn check_values(&self) -> Result<(), CommandError> {
        let window = Duration::from_millis;
        let checked: Result<(), OutOfRange> = match self {
            AdminCommand::SetPriority { priority, .. } => {
                check_number("priority", *priority, &d::APP_PRIORITY_RANGE).map(drop)
            }
            AdminCommand::SetAppBudget {
                restart_limit,
                restart_window_ms,
                ..
            } => check_number("restart_limit", *restart_limit, &d::APP_RESTART_LIMIT_RANGE)
                .and(check_duration(
                    "restart_window",
                    window(*restart_window_ms),
                    &d::APP_RESTART_WINDOW_RANGE,
                ))
                .map(drop),
            AdminCommand::SetVmBudget {
                vm_restart_limit,
                vm_restart_window_ms,
                ..
            } => check_number(
                "vm_restart_limit",
                *vm_restart_limit,
                &d::VM_RESTART_LIMIT_RANGE,
            )
            .and(check_duration(
                "vm_restart_window",
                window(*vm_restart_window_ms),
                &d::VM_RESTART_WINDOW_RANGE,
            ))
            .map(drop),
            _ => Ok(()),
        };
        checked.map_err(|e| CommandError::InvalidValue(e.to_string()))
    }

    /// The VM the command is about, if any.
    pub fn vm(&self) -> Option<&Name> {
        match self {
            AdminCommand::HostMaintenance { .. } => None,
            AdminCommand::AppOffline { vm, .. }
            | AdminCommand::AppOnline { vm, .. }
            | AdminCommand::AppStart { vm, .. }
            | AdminCommand::AppStop { vm, .. }
            | AdminCommand::VmStart { vm }
            | AdminCommand::VmStop { vm }
            | AdminCommand::VmRestart { vm }
            | AdminCommand::VmMove { vm, .. }
            | AdminCommand::Freeze { vm }
            | AdminCommand::Unfreeze { vm }
            | AdminCommand::Clear { vm }
            | AdminCommand::SetPriority { vm, .. }
            | AdminCommand::SetAppBudget { vm, .. }
            | AdminCommand::SetVmBudget { vm, .. }
            | AdminCommand::SetPolicy { vm, .. } => Some(vm),
        }
    }
}

/// Why a command was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "detail", rename_all = "kebab-case")]
pub enum CommandError {
    /// No such VM in the configuration.
    #[error("no VM named `{0}`")]
    UnknownVm(Name),
    /// No such app in the VM.
    #[error("VM `{vm}` has no app named `{app}`")]
    UnknownApp {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
    },
    /// No such host in the configuration.
    #[error("no host named `{0}`")]
    UnknownHost(Name),
    /// The command belongs to the other engine (see [`AdminCommand::route`]).
    #[error("this command is applied by the {0}, not here")]
    WrongReceiver(String),
    /// The VM group is not owned by (running on) this host.
    #[error("VM `{vm}` is not owned by host `{host}`")]
    NotOwner {
        /// VM.
        vm: Name,
        /// This host.
        host: Name,
    },
    /// The VM group is frozen: vmha takes no action on it until it is unfrozen.
    #[error("VM `{0}` is frozen; unfreeze it first")]
    Frozen(Name),
    /// The VM is not running, so its apps cannot be reached.
    #[error("VM `{0}` is not running")]
    VmNotRunning(Name),
    /// The guest agent of the VM refuses `guest-exec`.
    #[error("the guest agent of VM `{0}` blocks guest-exec: apps cannot be started or stopped")]
    GuestExecBlocked(Name),
    /// The app has an operation in flight already.
    #[error("app `{vm}/{app}` is busy ({state})")]
    AppBusy {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Its current state.
        state: String,
    },
    /// Starting the app is refused while apps it requires are not online.
    #[error("app `{vm}/{app}` requires {} which {} not online", names(.missing), if .missing.len() == 1 { "is" } else { "are" })]
    RequirementsDown {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Required apps that are not online.
        missing: Vec<Name>,
    },
    /// Stopping the app is refused while online apps require it.
    #[error("app `{vm}/{app}` is required by {} which must be stopped first", names(.dependents))]
    RequiredBy {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Apps that require it and are not stopped.
        dependents: Vec<Name>,
    },
    /// The app has no `stop` command.
    #[error("app `{vm}/{app}` has no stop command")]
    NoStopCommand {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
    },
    /// The target host is not in the VM's `hosts` list.
    #[error("host `{host}` is not an acceptable host of VM `{vm}` (hosts = [{}])", names(.acceptable))]
    HostNotAcceptable {
        /// VM.
        vm: Name,
        /// Requested host.
        host: Name,
        /// The VM's acceptable hosts.
        acceptable: Vec<Name>,
    },
    /// The target host cannot take the VM now (down, in maintenance, no room, faulted there).
    #[error("host `{host}` cannot take VM `{vm}` now: {why}")]
    HostUnavailable {
        /// VM.
        vm: Name,
        /// Requested host.
        host: Name,
        /// Why.
        why: String,
    },
    /// A live migration was asked for (the VM has `migrate` on) but its disks are not on
    /// shared storage.
    #[error(
        "VM `{0}` cannot be migrated live: its disks are not on shared storage (shared_storage = false); move it with --restart to stop it and start it there"
    )]
    NotSharedStorage(Name),
    /// The VM group is already on that host.
    #[error("VM `{vm}` is already on host `{host}`")]
    AlreadyThere {
        /// VM.
        vm: Name,
        /// Host.
        host: Name,
    },
    /// The VM group is being moved, started or stopped; retry when it settles.
    #[error("VM `{0}` has a change in progress; retry when it settles")]
    Busy(Name),
    /// A numeric argument is out of the range the configuration allows for the same setting
    /// (see [`AdminCommand::check_values`]); the text names the setting, value and range.
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// The cluster store could not commit the change: it was undone (or never made).
    #[error("the cluster store cannot commit changes now ({0}); nothing was changed")]
    StoreUnavailable(String),
    /// No cluster controller is elected (or it has not read the cluster store yet).
    #[error("no cluster controller is available right now; retry shortly")]
    NoController,
    /// The host that must carry out the command did not take it in time; it was withdrawn.
    #[error("{0} did not take the command in time; nothing was changed")]
    NotTaken(String),
    /// The VM group has no owner host right now (being placed or failed over).
    #[error("VM `{0}` has no owner host right now (being placed or failed over); retry shortly")]
    NoOwner(Name),
    /// Too many commands are waiting to be committed.
    #[error("too many commands are waiting; retry shortly")]
    Overloaded,
}

fn names(v: &[Name]) -> String {
    v.iter().map(Name::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn priority(priority: u32) -> AdminCommand {
        AdminCommand::SetPriority {
            vm: name("shop"),
            app: name("web"),
            priority,
        }
    }

    fn app_budget(limit: u32, window_ms: u64) -> AdminCommand {
        AdminCommand::SetAppBudget {
            vm: name("shop"),
            app: name("web"),
            restart_limit: limit,
            restart_window_ms: window_ms,
        }
    }

    fn vm_budget(limit: u32, window_ms: u64) -> AdminCommand {
        AdminCommand::SetVmBudget {
            vm: name("shop"),
            vm_restart_limit: limit,
            vm_restart_window_ms: window_ms,
        }
    }

    fn refusal(cmd: AdminCommand) -> String {
        match cmd.check_values() {
            Err(CommandError::InvalidValue(why)) => why,
            other => panic!("{cmd:?}: {other:?}"),
        }
    }

    const WEEK_MS: u64 = 7 * 86_400_000;

    #[test]
    fn run_time_values_have_the_ranges_of_the_configuration() {
        // The bounds themselves are accepted.
        for ok in [
            priority(1),
            priority(1_000_000),
            app_budget(0, 1000),
            app_budget(1000, WEEK_MS),
            vm_budget(0, 1000),
            vm_budget(100, WEEK_MS),
        ] {
            assert_eq!(ok.check_values(), Ok(()), "{ok:?}");
        }
        for (cmd, why) in [
            (
                priority(4_000_000_000),
                "`priority` = 4000000000 is out of range (allowed: 1 to 1000000)",
            ),
            (
                priority(0),
                "`priority` = 0 is out of range (allowed: 1 to 1000000)",
            ),
            (
                app_budget(u32::MAX, 60_000),
                "`restart_limit` = 4294967295 is out of range (allowed: 0 to 1000)",
            ),
            (
                app_budget(3, u64::MAX),
                "`restart_window` = \"213503982334d14h25m51s615ms\" is out of range (allowed: 1s to 7d)",
            ),
            (
                app_budget(3, 999),
                "`restart_window` = \"999ms\" is out of range (allowed: 1s to 7d)",
            ),
            (
                vm_budget(101, 60_000),
                "`vm_restart_limit` = 101 is out of range (allowed: 0 to 100)",
            ),
            (
                vm_budget(3, WEEK_MS + 1),
                "`vm_restart_window` = \"7d1ms\" is out of range (allowed: 1s to 7d)",
            ),
        ] {
            assert_eq!(refusal(cmd), why);
        }
    }
}
