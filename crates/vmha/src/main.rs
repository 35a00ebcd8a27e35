//! vmha: the command-line interface. `main` only parses the command line and dispatches to
//! one module per command group; each module owns its arguments and its output.
//!
//! Modules form a tree: `main` → the command groups (`config_cmd`, `daemon_cmd` → `admin_cmd`,
//! `events_cmd`, `guest_cmd`, `status_cmd`; `demo`; `bench`; `simulate_cmd`) → the shared leaves (`api_args`,
//! `client`, `harness`, `narrate`, `output`, `render`, `report`), which import no command module
//! (`bench` reuses `cluster_demo`'s drills). `gen_docs` (man pages
//! and completions, `vmha --gen-docs DIR`) reads the clap definitions of `main` only.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin_cmd;
mod api_args;
mod bench;
mod client;
mod cluster_demo;
mod config_cmd;
mod daemon_cmd;
mod demo;
mod events_cmd;
mod gen_docs;
mod guest_cmd;
mod harness;
mod narrate;
mod output;
mod render;
mod report;
mod simulate_cmd;
mod status_cmd;
mod transport;

/// Application-aware high availability for KVM/QEMU VMs.
#[derive(Debug, Parser)]
#[command(
    name = "vmha",
    version,
    propagate_version = true,
    after_help = "Exit codes: 0 success, 1 refused or failed, 2 usage error or invalid \
                  configuration, 3 vmhad unreachable, 4 access denied (see --help).",
    after_long_help = report::EXIT_CODES
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
    /// Benchmarks: detection and recovery, cost at scale, failover, controller scale, the watch,
    /// the guest channel next to hostile guests; writes
    /// BENCHMARKS.md (run it through scripts/bench.sh).
    #[command(hide = true)]
    Bench(Box<bench::BenchArgs>),
    /// Run the single-host demo: two VMs, injected failures, narrated recovery, measured times.
    Demo(demo::DemoArgs),
    /// What-if: play a script of events (host loss, faults, admin commands, time) through the
    /// engine, from a configuration or the live cluster's state; nothing is executed.
    Simulate(simulate_cmd::SimulateArgs),
}

fn main() -> ExitCode {
    if let Some(code) = gen_docs::run_if_asked() {
        return code;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config(cmd) => config_cmd::run(cmd, &cli.api),
        Command::Daemon(cmd) => daemon_cmd::run(cmd, &cli.api),
        Command::Bench(args) => bench::run(*args),
        Command::Demo(args) => demo::run(args),
        Command::Simulate(args) => simulate_cmd::run(args, &cli.api),
    };
    result.unwrap_or_else(|e| report::failure(&e))
}
