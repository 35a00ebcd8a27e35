//! The commands that talk to a running vmhad over its local API (SPEC §4.7): `status`,
//! `events`, `explain`, the admin commands and `guest exec`. [`ApiArgs`] says which vmhad.
//!
//! Exit codes ([`crate::report::EXIT_CODES`]): 0 done; 2 usage error (bad `VM/APP`, name,
//! duration, policy, URL, `$VMHA_TIMEOUT`: nothing is sent); 1 vmhad refusing (its message
//! goes to stderr, followed by a hint when the refused command changed nothing and may be
//! retried, see [`crate::report`]); 3 vmhad unreachable; 4 access denied. `guest exec` exits
//! with the guest command's code.

use std::process::ExitCode;

use clap::Subcommand;
use vmha_engine::AdminCommand;
use vmha_model::Name;

use crate::admin_cmd::{self, AppCommand, HostCommand, SetCommand, VmCommand};
use crate::api_args::ApiArgs;
use crate::events_cmd::{self, EventsArgs};
use crate::guest_cmd::{self, GuestCommand};
use crate::output::Output;
use crate::status_cmd;

/// The commands answered by vmhad; flattened into `vmha`'s top-level commands.
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show this host's state, the cluster controller, the cluster store's health, this host's
    /// VM groups and apps (and the cluster's hosts, on the controller host).
    Status(Output),
    /// Show the event log, oldest first; `--follow` keeps printing new events until interrupted.
    Events(EventsArgs),
    /// Explain a VM group: state, fault, budgets, policy, the arithmetic of its last decisions,
    /// its apps and its last events.
    Explain {
        /// The VM.
        vm: Name,
        #[command(flatten)]
        out: Output,
    },
    /// Mark apps intentionally offline or online; start or stop them in the guest.
    App {
        #[command(subcommand)]
        cmd: AppCommand,
        #[command(flatten)]
        out: Output,
    },
    /// Start, stop, restart or move a VM group.
    Vm {
        #[command(subcommand)]
        cmd: VmCommand,
        #[command(flatten)]
        out: Output,
    },
    /// Put a host in maintenance (drain its VM groups) or take it out.
    Host {
        #[command(subcommand)]
        cmd: HostCommand,
        #[command(flatten)]
        out: Output,
    },
    /// Freeze a VM group: vmha keeps monitoring it but takes no action.
    Freeze {
        /// The VM.
        vm: Name,
        #[command(flatten)]
        out: Output,
    },
    /// Unfreeze a VM group.
    Unfreeze {
        /// The VM.
        vm: Name,
        #[command(flatten)]
        out: Output,
    },
    /// Clear a VM group's faults: re-arm it and reset its restart budgets.
    Clear {
        /// The VM.
        vm: Name,
        #[command(flatten)]
        out: Output,
    },
    /// Change priorities, restart budgets and policies at run time (they persist).
    Set {
        #[command(subcommand)]
        cmd: SetCommand,
        #[command(flatten)]
        out: Output,
    },
    /// Run commands in a VM's guest through the guest channel.
    Guest {
        #[command(subcommand)]
        cmd: GuestCommand,
        #[command(flatten)]
        out: Output,
    },
}

/// Runs one daemon command against the vmhad at `api`.
pub fn run(cmd: DaemonCommand, api: &ApiArgs) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    match cmd {
        DaemonCommand::Status(out) => status_cmd::status(&client, out),
        DaemonCommand::Events(args) => events_cmd::run(&client, &args),
        DaemonCommand::Explain { vm, out } => status_cmd::explain(&client, &vm, out),
        DaemonCommand::App { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Vm { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Host { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Freeze { vm, out } => {
            admin_cmd::apply(&client, &AdminCommand::Freeze { vm }, out)
        }
        DaemonCommand::Unfreeze { vm, out } => {
            admin_cmd::apply(&client, &AdminCommand::Unfreeze { vm }, out)
        }
        DaemonCommand::Clear { vm, out } => {
            admin_cmd::apply(&client, &AdminCommand::Clear { vm }, out)
        }
        DaemonCommand::Set { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Guest { cmd, out } => guest_cmd::run(&client, cmd, out),
    }
}
