//! vmha: the command-line interface. `main` only parses the command line and dispatches to
//! one module per command group; each module owns its arguments and its output.
//!
//! Modules form a tree: `main` → the command groups (`config_cmd`, `daemon_cmd` → `admin_cmd`,
//! `events_cmd`, `guest_cmd`, `status_cmd`; `demo`; `simulate_cmd`) → the shared leaves (`api_args`, `client`,
//! `output`, `render`, `report`), which import no command module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin_cmd;
mod api_args;
mod bench_watch;
mod client;
mod cluster_demo;
mod config_cmd;
mod daemon_cmd;
mod demo;
mod events_cmd;
mod guest_cmd;
mod output;
mod render;
mod report;
mod simulate_cmd;
mod status_cmd;

/// Application-aware high availability for KVM/QEMU VMs.
#[derive(Debug, Parser)]
#[command(
    name = "vmha",
    version,
    propagate_version = true,
    after_help = "Exit codes: 0 success, 2 invalid configuration or usage error, 1 other failure \
                  (vmhad unreachable, or refusing the command)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    api: api_args::ApiArgs,
}

/// The command groups; each variant's arguments live in its own module.
#[derive(Debug, Subcommand)]
enum Command {
    /// Check and display configuration files.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    #[command(flatten)]
    Daemon(daemon_cmd::DaemonCommand),
    /// Run the single-host demo: two VMs, injected failures, narrated recovery, measured times.
    Demo(demo::DemoArgs),
    /// What-if: play a script of events (host loss, faults, admin commands, time) through the
    /// engine, from a configuration or the live cluster's state; nothing is executed.
    Simulate(simulate_cmd::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config(cmd) => config_cmd::run(cmd, &cli.api),
        Command::Daemon(cmd) => daemon_cmd::run(cmd, &cli.api),
        Command::Demo(args) => demo::run(args),
        Command::Simulate(args) => simulate_cmd::run(args, &cli.api),
    };
    result.unwrap_or_else(|e| report::failure(&e))
}
