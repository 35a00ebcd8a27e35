//! What the daemon commands share about their answers on stdout: the `--json` switch and
//! printing JSON or rendered text.

use std::io::Write;

use clap::Args;
use serde_json::Value;

/// `--json` of every daemon command.
#[derive(Debug, Clone, Copy, Args)]
pub struct Output {
    /// Print vmhad's JSON answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
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
