//! The admin commands (SPEC §4.7): parsed completely on the command line — `VM/APP`, names,
//! durations, policies — into the engine's [`AdminCommand`], then sent as its JSON to
//! `POST /v1/commands`. Anything malformed is a usage error (exit 2) and nothing is sent.
//! vmhad applies a command whole or refuses it whole; its refusal is printed as it said it
//! (exit 1), with a hint when the command changed nothing and may be retried (see
//! [`crate::report`]).

use std::fmt;
use std::ops::RangeInclusive;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde::Deserialize;
use serde::de::IntoDeserializer;
use vmha_engine::AdminCommand;
use vmha_model::duration::millis;
use vmha_model::range::{check_duration, check_number};
use vmha_model::{Name, Policy, Tie, defaults};

use crate::client::Client;
use crate::output::{Output, print_json, print_text};
use crate::render::label;

/// An app of a VM, written `VM/APP` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRef {
    /// The VM.
    pub vm: Name,
    /// The app.
    pub app: Name,
}

impl FromStr for AppRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((vm, app)) = s.split_once('/') else {
            return Err(format!("expected VM/APP (e.g. shop/web), got `{s}`"));
        };
        let vm = Name::new(vm).map_err(|e| format!("bad VM name in `{s}`: {e}"))?;
        let app = Name::new(app).map_err(|e| format!("bad app name in `{s}`: {e}"))?;
        Ok(AppRef { vm, app })
    }
}

impl fmt::Display for AppRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vm, self.app)
    }
}

/// `vmha app …`.
#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Mark an app intentionally offline: vmha stops restarting it and it no longer counts as
    /// faulted. By default the mark clears itself when the app is seen running again.
    Offline {
        /// The app, as VM/APP.
        app: AppRef,
        /// Keep the mark until `vmha app online` even if the app is seen running.
        #[arg(long)]
        no_auto_clear: bool,
    },
    /// Clear an app's offline mark: it is monitored and restarted again.
    Online {
        /// The app, as VM/APP.
        app: AppRef,
    },
    /// Start an app in the guest (clears its offline mark).
    Start {
        /// The app, as VM/APP.
        app: AppRef,
    },
    /// Stop an app in the guest and mark it intentionally offline.
    Stop {
        /// The app, as VM/APP.
        app: AppRef,
    },
}

impl From<AppCommand> for AdminCommand {
    fn from(cmd: AppCommand) -> Self {
        match cmd {
            AppCommand::Offline { app, no_auto_clear } => AdminCommand::AppOffline {
                vm: app.vm,
                app: app.app,
                auto_clear: !no_auto_clear,
            },
            AppCommand::Online { app } => AdminCommand::AppOnline {
                vm: app.vm,
                app: app.app,
            },
            AppCommand::Start { app } => AdminCommand::AppStart {
                vm: app.vm,
                app: app.app,
            },
            AppCommand::Stop { app } => AdminCommand::AppStop {
                vm: app.vm,
                app: app.app,
            },
        }
    }
}

/// `vmha vm …`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Run a VM group (desired state `run`).
    Start {
        /// The VM.
        vm: Name,
    },
    /// Stop a VM group intentionally: apps stopped, then the VM (desired state `stop`).
    Stop {
        /// The VM.
        vm: Name,
    },
    /// Restart a VM on its host (apps, VM, apps); not counted against its restart budget.
    Restart {
        /// The VM.
        vm: Name,
    },
    /// Move a VM group to another of its acceptable hosts: a live migration when it runs and
    /// has `migrate` on with shared storage, else a stop and start.
    Move {
        /// The VM.
        vm: Name,
        /// The target host.
        host: Name,
        /// Stop it and start it there, even if it could be migrated live (the only way to
        /// move a VM with `migrate` on whose disks are not on shared storage).
        #[arg(long)]
        restart: bool,
    },
}

impl From<VmCommand> for AdminCommand {
    fn from(cmd: VmCommand) -> Self {
        match cmd {
            VmCommand::Start { vm } => AdminCommand::VmStart { vm },
            VmCommand::Stop { vm } => AdminCommand::VmStop { vm },
            VmCommand::Restart { vm } => AdminCommand::VmRestart { vm },
            VmCommand::Move { vm, host, restart } => AdminCommand::VmMove {
                vm,
                to: host,
                restart,
            },
        }
    }
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Turn it on.
    On,
    /// Turn it off.
    Off,
}

/// `vmha host …`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Maintenance on: drain the host (move or stop its VM groups); off: take VM groups again.
    Maintenance {
        /// The host.
        host: Name,
        /// `on` or `off`.
        #[arg(value_enum)]
        state: OnOff,
    },
}

impl From<HostCommand> for AdminCommand {
    fn from(cmd: HostCommand) -> Self {
        match cmd {
            HostCommand::Maintenance { host, state } => AdminCommand::HostMaintenance {
                host,
                on: state == OnOff::On,
            },
        }
    }
}

/// `vmha set …`: run-time changes, persisted by vmhad.
#[derive(Debug, Subcommand)]
pub enum SetCommand {
    /// Set an app's priority (higher = more important, 1 to 1000000 as in the configuration).
    Priority {
        /// The app, as VM/APP.
        app: AppRef,
        /// The new priority.
        #[arg(value_parser = parse_priority)]
        priority: u32,
    },
    /// Set an app's restart budget: at most LIMIT restarts within WINDOW.
    AppBudget {
        /// The app, as VM/APP.
        app: AppRef,
        /// Restarts allowed within the window (0 to 1000).
        #[arg(long, value_name = "N", value_parser = parse_app_limit)]
        limit: u32,
        /// The window, e.g. `10m`, `1h30m` (1s to 7d).
        #[arg(long, value_name = "DUR", value_parser = parse_app_window)]
        window: Duration,
    },
    /// Set a VM's restart budget: at most LIMIT VM restarts on a host within WINDOW.
    VmBudget {
        /// The VM.
        vm: Name,
        /// VM restarts allowed within the window (0 to 100).
        #[arg(long, value_name = "N", value_parser = parse_vm_limit)]
        limit: u32,
        /// The window, e.g. `10m`, `1h` (1s to 7d).
        #[arg(long, value_name = "DUR", value_parser = parse_vm_window)]
        window: Duration,
    },
    /// Set a VM's decision policy: highest-priority, weighted, weighted-with-offline, critical.
    Policy {
        /// The VM.
        vm: Name,
        /// The policy.
        #[arg(value_parser = parse_policy)]
        policy: Policy,
        /// What the weighted policies do on equal sums (default: keep the current rule).
        #[arg(long, value_name = "restart|no-action", value_parser = parse_tie)]
        tie: Option<Tie>,
    },
}

impl From<SetCommand> for AdminCommand {
    fn from(cmd: SetCommand) -> Self {
        match cmd {
            SetCommand::Priority { app, priority } => AdminCommand::SetPriority {
                vm: app.vm,
                app: app.app,
                priority,
            },
            SetCommand::AppBudget { app, limit, window } => AdminCommand::SetAppBudget {
                vm: app.vm,
                app: app.app,
                restart_limit: limit,
                restart_window_ms: millis(window),
            },
            SetCommand::VmBudget { vm, limit, window } => AdminCommand::SetVmBudget {
                vm,
                vm_restart_limit: limit,
                vm_restart_window_ms: millis(window),
            },
            SetCommand::Policy { vm, policy, tie } => AdminCommand::SetPolicy { vm, policy, tie },
        }
    }
}

// Run-time values have the configuration's ranges (`vmha_model::defaults`), checked here for
// an early usage error; vmhad checks them again (`AdminCommand::check_values`), since its API
// can be called without this CLI.

/// A whole number within the configuration's range of `key`.
fn parse_number(s: &str, key: &str, range: &RangeInclusive<u32>) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| {
        format!(
            "`{s}` is not a whole number from {} to {}",
            range.start(),
            range.end()
        )
    })?;
    check_number(key, n, range).map_err(|e| e.to_string())
}

/// A duration within the configuration's range of `key`.
fn parse_duration(
    s: &str,
    key: &str,
    range: &RangeInclusive<Duration>,
) -> Result<Duration, String> {
    let d = vmha_model::duration::parse(s).map_err(|e| e.to_string())?;
    check_duration(key, d, range).map_err(|e| e.to_string())
}

fn parse_priority(s: &str) -> Result<u32, String> {
    parse_number(s, "priority", &defaults::APP_PRIORITY_RANGE)
}

fn parse_app_limit(s: &str) -> Result<u32, String> {
    parse_number(s, "restart_limit", &defaults::APP_RESTART_LIMIT_RANGE)
}

fn parse_vm_limit(s: &str) -> Result<u32, String> {
    parse_number(s, "vm_restart_limit", &defaults::VM_RESTART_LIMIT_RANGE)
}

fn parse_app_window(s: &str) -> Result<Duration, String> {
    parse_duration(s, "restart_window", &defaults::APP_RESTART_WINDOW_RANGE)
}

fn parse_vm_window(s: &str) -> Result<Duration, String> {
    parse_duration(s, "vm_restart_window", &defaults::VM_RESTART_WINDOW_RANGE)
}

/// A policy, spelled as in the configuration file.
fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::deserialize(s.into_deserializer())
        .map_err(|e: serde::de::value::Error| format!("unknown policy: {e}"))
}

/// A tie rule, spelled as in the configuration file.
fn parse_tie(s: &str) -> Result<Tie, String> {
    Tie::deserialize(s.into_deserializer())
        .map_err(|e: serde::de::value::Error| format!("unknown tie rule: {e}"))
}

/// Sends `cmd` to vmhad; on success prints what was done (or vmhad's JSON answer).
pub fn apply(client: &Client, cmd: &AdminCommand, out: Output) -> anyhow::Result<ExitCode> {
    let body = serde_json::to_value(cmd)?;
    let answer = client.post("/v1/commands", &body)?;
    if out.json {
        print_json(&answer)?;
    } else {
        print_text(&format!("{}\n", done(cmd)))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One line saying what vmhad accepted to do.
fn done(cmd: &AdminCommand) -> String {
    use AdminCommand as C;
    match cmd {
        C::AppOffline {
            vm,
            app,
            auto_clear,
        } => format!(
            "{vm}/{app} marked intentionally offline{}",
            if *auto_clear {
                " (the mark clears when the app is seen running)"
            } else {
                " until `vmha app online`"
            }
        ),
        C::AppOnline { vm, app } => {
            format!("{vm}/{app} no longer marked offline: monitored and restarted again")
        }
        C::AppStart { vm, app } => format!("starting {vm}/{app} in the guest"),
        C::AppStop { vm, app } => {
            format!("stopping {vm}/{app} in the guest; it is marked intentionally offline")
        }
        C::VmStart { vm } => format!("VM group {vm} set to run"),
        C::VmStop { vm } => format!("VM group {vm} set to stop: apps, then the VM"),
        C::VmRestart { vm } => format!("restarting VM {vm} on its host"),
        C::VmMove {
            vm,
            to,
            restart: false,
        } => format!("moving VM group {vm} to {to} (live when it can migrate)"),
        C::VmMove {
            vm,
            to,
            restart: true,
        } => format!("moving VM group {vm} to {to}: stopping it, then starting it there"),
        C::HostMaintenance { host, on: true } => {
            format!("host {host} in maintenance: its VM groups are moved or stopped")
        }
        C::HostMaintenance { host, on: false } => format!("host {host} out of maintenance"),
        C::Freeze { vm } => format!("VM group {vm} frozen: monitored, never acted upon"),
        C::Unfreeze { vm } => format!("VM group {vm} unfrozen"),
        C::Clear { vm } => format!("faults of VM group {vm} cleared: re-armed, budgets reset"),
        C::SetPriority { vm, app, priority } => {
            format!("priority of {vm}/{app} set to {priority}")
        }
        C::SetAppBudget {
            vm,
            app,
            restart_limit,
            restart_window_ms,
        } => format!(
            "restart budget of {vm}/{app} set to {}",
            limit_per(*restart_limit, *restart_window_ms)
        ),
        C::SetVmBudget {
            vm,
            vm_restart_limit,
            vm_restart_window_ms,
        } => format!(
            "VM restart budget of {vm} set to {}",
            limit_per(*vm_restart_limit, *vm_restart_window_ms)
        ),
        C::SetPolicy { vm, policy, tie } => {
            let tie = match tie {
                Some(t) => format!("tie: {}", label(t)),
                None => "tie rule unchanged".to_string(),
            };
            format!("policy of {vm} set to {} ({tie})", label(policy))
        }
    }
}

/// `3 restarts per 10m`.
fn limit_per(limit: u32, window_ms: u64) -> String {
    format!(
        "{limit} restart{} per {}",
        if limit == 1 { "" } else { "s" },
        vmha_model::duration::format(Duration::from_millis(window_ms))
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn app_ref_needs_a_slash_and_valid_names() {
        let r: AppRef = "shop/web".parse().unwrap();
        assert_eq!((r.vm.as_str(), r.app.as_str()), ("shop", "web"));
        assert!("shop".parse::<AppRef>().unwrap_err().contains("VM/APP"));
        assert!("shop/".parse::<AppRef>().unwrap_err().contains("app name"));
        assert!("-x/web".parse::<AppRef>().unwrap_err().contains("VM name"));
        assert!("shop/web/x".parse::<AppRef>().is_err());
    }

    #[test]
    fn commands_serialize_as_the_engine_expects() {
        let cmd: AdminCommand = AppCommand::Offline {
            app: "shop/web".parse().unwrap(),
            no_auto_clear: false,
        }
        .into();
        assert_eq!(
            serde_json::to_value(&cmd).unwrap(),
            serde_json::json!({"command": "app-offline", "vm": "shop", "app": "web", "auto_clear": true})
        );
        let cmd: AdminCommand = SetCommand::AppBudget {
            app: "shop/db".parse().unwrap(),
            limit: 3,
            window: parse_app_window("1m30s").unwrap(),
        }
        .into();
        assert_eq!(
            serde_json::to_value(&cmd).unwrap(),
            serde_json::json!({"command": "set-app-budget", "vm": "shop", "app": "db",
                               "restart_limit": 3, "restart_window_ms": 90_000})
        );
        assert_eq!(
            done(&cmd),
            "restart budget of shop/db set to 3 restarts per 1m30s"
        );
    }

    #[test]
    fn run_time_values_have_the_configuration_ranges() {
        assert_eq!(parse_priority("1000000"), Ok(1_000_000));
        assert_eq!(
            parse_priority("4000000000").unwrap_err(),
            "`priority` = 4000000000 is out of range (allowed: 1 to 1000000)"
        );
        assert!(
            parse_priority("0")
                .unwrap_err()
                .contains("allowed: 1 to 1000000")
        );
        assert!(
            parse_priority("99999999999")
                .unwrap_err()
                .contains("whole number from 1 to 1000000")
        );
        assert_eq!(parse_app_limit("1000"), Ok(1000));
        assert!(
            parse_app_limit("1001")
                .unwrap_err()
                .contains("allowed: 0 to 1000")
        );
        assert_eq!(parse_vm_limit("100"), Ok(100));
        assert!(
            parse_vm_limit("101")
                .unwrap_err()
                .contains("allowed: 0 to 100")
        );
        assert_eq!(parse_app_window("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(
            parse_app_window("0s")
                .unwrap_err()
                .contains("allowed: 1s to 7d")
        );
        assert!(
            parse_vm_window("8d")
                .unwrap_err()
                .contains("`vm_restart_window` = \"8d\"")
        );
    }

    #[test]
    fn policies_and_windows_are_checked() {
        assert_eq!(
            parse_policy("weighted-with-offline"),
            Ok(Policy::WeightedWithOffline)
        );
        let err = parse_policy("fastest").unwrap_err();
        assert!(err.contains("highest-priority"), "{err}");
        assert_eq!(parse_tie("no-action"), Ok(Tie::NoAction));
        assert!(parse_app_window("ten minutes").is_err());
        let cmd = AdminCommand::SetPolicy {
            vm: Name::new("shop").unwrap(),
            policy: Policy::Weighted,
            tie: Some(Tie::NoAction),
        };
        assert_eq!(
            done(&cmd),
            "policy of shop set to weighted (tie: no-action)"
        );
    }
}
