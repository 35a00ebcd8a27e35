//! The commands that talk to a running vmhad over its local API (SPEC §4.7): `status`,
//! `events`, `explain`, the admin commands and `guest exec`. [`ApiArgs`] says which vmhad.
//!
//! Exit codes: 0 done; 2 usage error (bad `VM/APP`, name, duration, policy: nothing is sent);
//! 1 vmhad unreachable or refusing (its message goes to stderr). `guest exec` exits with the
//! guest command's code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;
use vmha_model::Name;

use crate::admin_cmd::{self, AppCommand, HostCommand, SetCommand, VmCommand};
use crate::client::Client;
use crate::events_cmd::{self, EventsArgs};
use crate::guest_cmd::{self, GuestCommand};
use crate::status_cmd;

/// Environment variable naming vmhad's API socket when neither `--socket` nor `--state-dir`
/// is given.
pub const SOCKET_ENV: &str = "VMHA_SOCKET";

/// Which vmhad to talk to; global options of `vmha`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// vmhad's API socket [default: $VMHA_SOCKET, else /var/lib/vmha/vmhad.sock].
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "state_dir")]
    socket: Option<PathBuf>,
    /// vmhad's state directory; its API socket is DIR/vmhad.sock.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl ApiArgs {
    /// The socket path: `--socket`, else `--state-dir`/vmhad.sock, else `$VMHA_SOCKET` (when
    /// set and not empty), else the default state dir's socket.
    pub fn socket(&self) -> PathBuf {
        if let Some(socket) = &self.socket {
            return socket.clone();
        }
        if let Some(dir) = &self.state_dir {
            return dir.join("vmhad.sock");
        }
        match std::env::var_os(SOCKET_ENV) {
            Some(s) if !s.is_empty() => PathBuf::from(s),
            _ => PathBuf::from(vmha_model::defaults::STATE_DIR).join("vmhad.sock"),
        }
    }
}

/// `--json` of every daemon command.
#[derive(Debug, Clone, Copy, Args)]
pub struct Output {
    /// Print vmhad's JSON answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The commands answered by vmhad; flattened into `vmha`'s top-level commands.
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show this host's VM groups and apps (and the cluster's hosts, on the controller host).
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
    let client = Client::new(api.socket());
    match cmd {
        DaemonCommand::Status(out) => status_cmd::status(&client, out),
        DaemonCommand::Events(args) => events_cmd::run(&client, &args),
        DaemonCommand::Explain { vm, out } => status_cmd::explain(&client, &vm, out),
        DaemonCommand::App { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Vm { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Host { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Freeze { vm, out } => {
            admin_cmd::apply(&client, &vmha_engine::AdminCommand::Freeze { vm }, out)
        }
        DaemonCommand::Unfreeze { vm, out } => {
            admin_cmd::apply(&client, &vmha_engine::AdminCommand::Unfreeze { vm }, out)
        }
        DaemonCommand::Clear { vm, out } => {
            admin_cmd::apply(&client, &vmha_engine::AdminCommand::Clear { vm }, out)
        }
        DaemonCommand::Set { cmd, out } => admin_cmd::apply(&client, &cmd.into(), out),
        DaemonCommand::Guest { cmd, out } => guest_cmd::run(&client, cmd, out),
    }
}

/// Prints a JSON answer, pretty, on stdout.
pub fn print_json(value: &Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    writeln!(std::io::stdout().lock(), "{text}")
}

/// Prints rendered text on stdout.
pub fn print_text(text: &str) -> std::io::Result<()> {
    std::io::stdout().lock().write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_comes_from_socket_then_state_dir() {
        let explicit = ApiArgs {
            socket: Some("/run/x.sock".into()),
            state_dir: None,
        };
        assert_eq!(explicit.socket(), PathBuf::from("/run/x.sock"));
        let dir = ApiArgs {
            socket: None,
            state_dir: Some("/srv/vmha".into()),
        };
        assert_eq!(dir.socket(), PathBuf::from("/srv/vmha/vmhad.sock"));
    }
}
