//! vmha: the command-line interface. `main` only parses the command line and dispatches to
//! one module per command group; each module owns its arguments and its output.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin_cmd;
mod client;
mod config_cmd;
mod daemon_cmd;
mod demo;
mod events_cmd;
mod guest_cmd;
mod render;
mod status_cmd;

/// Application-aware high availability for KVM/QEMU VMs.
#[derive(Debug, Parser)]
#[command(
    name = "vmha",
    version,
    propagate_version = true,
    after_help = "Exit codes: 0 success, 2 invalid configuration or usage error, 1 other failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    api: daemon_cmd::ApiArgs,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Daemon(cmd) => daemon_cmd::run(cmd, &cli.api),
        Command::Demo(args) => demo::run(args),
    };
    result.unwrap_or_else(|e| {
        // A closed pipe (`vmha config show FILE | head`) is the reader's choice, not a failure.
        let broken_pipe = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            return ExitCode::SUCCESS;
        }
        eprintln!("vmha: {e:#}");
        ExitCode::from(config_cmd::EXIT_FAILURE)
    })
}
