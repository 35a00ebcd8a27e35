//! `vmha config …`: check configuration files and show them resolved; apply one to the running
//! cluster, or have vmhad reload its own file.
//!
//! Exit codes: 0 when every file is valid (and, for `apply`/`reload`, stored), [`EXIT_INVALID`]
//! (2) when a file is invalid or unreadable (the diagnostic goes to stderr; nothing is sent),
//! 1 when vmhad refuses or cannot be reached, or the output cannot be written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;
use vmha_api::ConfigApplied;
use vmha_model::Config;

use crate::api_args::ApiArgs;
use crate::output::{Output, print_json, print_text};

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
        /// Print one JSON object per file instead: `{"file", "valid", "hosts", "vms", "apps"}`
        /// or `{"file", "valid": false, "error"}`.
        #[arg(long)]
        json: bool,
    },
    /// Validate FILE, then store it in the cluster store through vmhad: every host applies it
    /// (new VMs placed, removed ones released and left running, changes in effect).
    Apply {
        /// Configuration file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        out: Output,
    },
    /// Have vmhad reload its own configuration file (like SIGHUP): validated, then applied by
    /// every host.
    Reload {
        #[command(flatten)]
        out: Output,
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

/// Runs one `vmha config` subcommand (`apply` and `reload` through the vmhad at `api`).
pub fn run(cmd: ConfigCommand, api: &ApiArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ConfigCommand::Apply { file, out: fmt } => {
            // Checked here first: an invalid file is not sent at all.
            let Some((_, text)) = load(&file, DRIVERS) else {
                return Ok(exit(false));
            };
            let client = api.client()?;
            let answer = client.post("/v1/config", &json!({ "toml": text }))?;
            applied(&answer, fmt)
        }
        ConfigCommand::Reload { out: fmt } => {
            let client = api.client()?;
            let answer = client.post("/v1/config/reload", &json!({}))?;
            applied(&answer, fmt)
        }
        ConfigCommand::Validate { files, json: false } => {
            let mut all_valid = true;
            for file in &files {
                match load(file, DRIVERS) {
                    Some((config, _)) => {
                        writeln!(out, "{}: ok ({})", file.display(), summary(&config))?
                    }
                    None => all_valid = false,
                }
            }
            Ok(exit(all_valid))
        }
        ConfigCommand::Validate { files, json: true } => {
            let mut all_valid = true;
            let mut results = Vec::new();
            for file in &files {
                let name = file.display().to_string();
                results.push(match parse(file, DRIVERS) {
                    Ok((config, _)) => json!({
                        "file": name,
                        "valid": true,
                        "hosts": config.hosts.len(),
                        "vms": config.vms.len(),
                        "apps": config.vms.iter().map(|v| v.apps.len()).sum::<usize>(),
                    }),
                    Err(error) => {
                        all_valid = false;
                        json!({"file": name, "valid": false, "error": error})
                    }
                });
            }
            print_json(&serde_json::Value::Array(results))?;
            Ok(exit(all_valid))
        }
        ConfigCommand::Show { file, json } => {
            // Shown as written, whatever drivers this build includes.
            let Some((config, _)) = load(&file, vmha_model::Drivers::ALL) else {
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

/// Prints vmhad's answer to a stored configuration.
fn applied(answer: &serde_json::Value, fmt: Output) -> anyhow::Result<ExitCode> {
    if fmt.json {
        print_json(answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    let applied: ConfigApplied = serde_json::from_value(answer.clone())?;
    print_text(&format!(
        "configuration stored ({} hosts, {} VMs, {} apps); every host applies it: {}\n",
        applied.hosts, applied.vms, applied.apps, applied.change
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// The drivers of this build: a configuration using another one is refused, with a hint.
const DRIVERS: vmha_model::Drivers = vmha_model::Drivers {
    libvirt: cfg!(feature = "libvirt"),
};

/// Reads and parses `file` (returned with its text) for a build with `drivers`, printing the
/// diagnostic to stderr when it is invalid or cannot be a configuration file (a directory, a FIFO, a device: refused
/// without being opened for reading, so a FIFO cannot hang the command).
fn load(file: &Path, drivers: vmha_model::Drivers) -> Option<(Config, String)> {
    match parse(file, drivers) {
        Ok(loaded) => Some(loaded),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

/// Reads and parses `file` (returned with its text) for a build with `drivers`; the diagnostic
/// when it is invalid.
fn parse(file: &Path, drivers: vmha_model::Drivers) -> Result<(Config, String), String> {
    vmha_model::file::read_text(file)
        .and_then(|text| {
            Config::from_toml_str_for(&text, &file.display().to_string(), drivers)
                .map(|c| (c, text))
        })
        .map_err(|e| e.to_string())
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
