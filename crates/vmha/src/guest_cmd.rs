//! `vmha guest exec VM [--timeout DUR] -- ARGV...`: runs a command in the guest through vmhad
//! (`POST /v1/vms/VM/exec`), like `qm guest exec`. Prints the command's stdout and stderr and
//! exits with its exit code, or 128 + the signal that killed it.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use vmha_model::Name;
use vmha_model::duration::millis;

use crate::api_args::parse_timeout;
use crate::client::Client;
use crate::output::{Output, print_json};
use vmha_api::{ExecRequest, GuestOutput};

/// `vmha guest …`.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Run a command in the guest; exits with its exit code (128 + signal if it was killed).
    Exec {
        /// The VM.
        vm: Name,
        /// How long the command may run (at most 10m); vmha waits 5s longer for vmhad's
        /// answer.
        #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_timeout)]
        timeout: Duration,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "ARGV")]
        argv: Vec<String>,
    },
}

/// How much longer than the guest command's timeout vmha waits for vmhad's answer (vmhad
/// reaches the guest, waits, then collects the output).
pub const EXEC_MARGIN: Duration = Duration::from_secs(5);

/// Runs the guest command and passes its output and exit status through.
pub fn run(client: &Client, cmd: GuestCommand, out: Output) -> anyhow::Result<ExitCode> {
    let GuestCommand::Exec { vm, timeout, argv } = cmd;
    let request = ExecRequest {
        argv,
        timeout_ms: millis(timeout),
    };
    let client = client
        .clone()
        .with_timeout(client.timeout().max(timeout + EXEC_MARGIN));
    let answer = client.post(
        &format!("/v1/vms/{vm}/exec"),
        &serde_json::to_value(&request)?,
    )?;
    let output: GuestOutput =
        serde_json::from_value(answer.clone()).context("unexpected exec answer from vmhad")?;
    if out.json {
        print_json(&answer)?;
    } else {
        std::io::stdout()
            .lock()
            .write_all(output.stdout.as_bytes())?;
        std::io::stderr()
            .lock()
            .write_all(output.stderr.as_bytes())?;
        if output.truncated {
            eprintln!("vmha: the guest command's output was cut at vmhad's limit");
        }
    }
    Ok(ExitCode::from(exit_code(&output)))
}

/// The guest command's exit code as ours: its code when in 0–255 (1 otherwise), 128 + signal
/// when killed (capped at 255).
fn exit_code(out: &GuestOutput) -> u8 {
    match (out.exit, out.signal) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(signal.saturating_add(128)).unwrap_or(255),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(exit: Option<i32>, signal: Option<i32>) -> GuestOutput {
        GuestOutput {
            exit,
            signal,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
        }
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(&out(Some(0), None)), 0);
        assert_eq!(exit_code(&out(Some(3), None)), 3);
        assert_eq!(exit_code(&out(Some(-1073741819), None)), 1);
        assert_eq!(exit_code(&out(None, Some(9))), 137);
        assert_eq!(exit_code(&out(None, Some(500))), 255);
        assert_eq!(exit_code(&out(None, None)), 1);
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("11m").is_err());
        assert!(parse_timeout("soon").is_err());
    }
}
