//! `vmha config …`: check configuration files and show them resolved.
//!
//! Exit codes: 0 when every file is valid, [`EXIT_INVALID`] (2) when a file is invalid or
//! unreadable (the diagnostic goes to stderr), 1 when the output cannot be written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use vmha_model::Config;

/// Exit code for an invalid or unreadable configuration (clap's usage errors use 2 as well).
pub const EXIT_INVALID: u8 = crate::report::EXIT_USAGE;

/// The `vmha config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check configuration files; prints "FILE: ok (N hosts, M VMs, K apps)" for each valid one.
    Validate {
        /// Configuration files (TOML).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the resolved configuration with every default filled in.
    Show {
        /// Configuration file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one `vmha config` subcommand. `Err` only when stdout cannot be written.
pub fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ConfigCommand::Validate { files } => {
            let mut all_valid = true;
            for file in &files {
                match load(file) {
                    Some(config) => writeln!(out, "{}: ok ({})", file.display(), summary(&config))?,
                    None => all_valid = false,
                }
            }
            Ok(exit(all_valid))
        }
        ConfigCommand::Show { file, json } => {
            let Some(config) = load(&file) else {
                return Ok(exit(false));
            };
            let text = if json {
                config.to_json()
            } else {
                config.to_toml()
            };
            writeln!(out, "{}", text.trim_end())?;
            Ok(exit(true))
        }
    }
}

/// Parses `file`, printing the diagnostic to stderr when it is invalid or unreadable.
fn load(file: &Path) -> Option<Config> {
    match Config::from_file(file) {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

/// "N hosts, M VMs, K apps", with singulars where they apply.
fn summary(config: &Config) -> String {
    let apps: usize = config.vms.iter().map(|v| v.apps.len()).sum();
    let count =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{}, {}, {}",
        count(config.hosts.len(), "host", "hosts"),
        count(config.vms.len(), "VM", "VMs"),
        count(apps, "app", "apps")
    )
}

fn exit(valid: bool) -> ExitCode {
    if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    }
}
