//! `vmha simulate`: what-if runs on the real engine. The cluster starts from a configuration
//! file (every host up, nothing placed yet) or from a snapshot of the live cluster read from
//! vmhad (`GET /v1/snapshot`, read-only); a script of events (docs/simulate.md, the language
//! of the engine's scenario tests) is played through the engine's simulator, which drives the
//! very `Node` vmhad runs. Nothing is executed and the live cluster is not touched.
//!
//! Output: the event log (every reason, with its arithmetic), a host table and a placement
//! table, then the safety violations if any; `--json` gives the same as one object.
//!
//! Exit codes: 0 when the run had no safety violation, [`EXIT_VIOLATION`] (3) when one fired,
//! 2 for a bad script or configuration (nothing was simulated), 1 when vmhad cannot be read.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::json;
use vmha_api::SnapshotView;
use vmha_engine::sim::{HostLine, Placement, Sim, parse_script_for};
use vmha_model::Config;

use crate::api_args::ApiArgs;
use crate::output::{print_json, print_text};
use crate::report::UsageError;

/// Exit code of a simulation in which a safety check fired.
pub const EXIT_VIOLATION: u8 = 3;

/// `vmha simulate [--config FILE | --from-cluster] SCRIPT`.
#[derive(Debug, Args)]
#[command(
    after_help = "The script language is described in docs/simulate.md. Exit codes: 0 no \
                        safety violation, 3 a safety check fired, 2 bad script or configuration, \
                        1 vmhad unreachable (--from-cluster)."
)]
pub struct SimulateArgs {
    /// Start from this configuration (TOML): every host up, nothing placed yet.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "from_cluster",
        required_unless_present = "from_cluster"
    )]
    config: Option<PathBuf>,
    /// Start from the live cluster's state as the vmhad at --socket sees it (placements,
    /// budgets used, flags, faults, maintenance); read-only.
    #[arg(long)]
    from_cluster: bool,
    /// The script of events to play (docs/simulate.md); `-` reads it from stdin.
    #[arg(value_name = "SCRIPT")]
    script: PathBuf,
    /// Print one JSON object (log, hosts, placements, violations) instead of text.
    #[arg(long)]
    json: bool,
}

/// What the simulation started from.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
enum Source {
    /// A configuration file.
    Config { file: String },
    /// A snapshot of the live cluster.
    Cluster {
        cluster: String,
        host: String,
        taken_at: u64,
    },
}

/// The result of a run, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Outcome {
    source: Source,
    /// The log, times in milliseconds since the start of the simulation.
    log: Vec<String>,
    /// Index in `log` of the first line after the start (the script's part).
    script_from: usize,
    hosts: Vec<HostLine>,
    vms: Vec<Placement>,
    violations: Vec<String>,
}

/// Runs `vmha simulate` (`--from-cluster` through the vmhad at `api`).
pub fn run(args: SimulateArgs, api: &ApiArgs) -> anyhow::Result<ExitCode> {
    let script = read_script(&args.script)?;
    let (config, source, mut sim) = match &args.config {
        Some(file) => {
            let config = load_config(file)?;
            let sim = Sim::new(Arc::clone(&config)).map_err(|e| UsageError(e.to_string()))?;
            let source = Source::Config {
                file: file.display().to_string(),
            };
            (config, source, sim)
        }
        None => {
            let value = api.client()?.get("/v1/snapshot")?;
            let view: SnapshotView =
                serde_json::from_value(value).context("unexpected snapshot from vmhad")?;
            let config = Config::from_toml_str(&view.config, "the cluster's configuration")
                .map(Arc::new)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let sim = Sim::from_snapshot(Arc::clone(&config), &view.snapshot)
                .map_err(|e| anyhow::anyhow!("restoring the snapshot: {e}"))?;
            let source = Source::Cluster {
                cluster: view.cluster.to_string(),
                host: view.host.to_string(),
                taken_at: view.snapshot.now.0,
            };
            (config, source, sim)
        }
    };
    let steps = parse_script_for(&script, &config)
        .map_err(|e| UsageError(format!("{}: {e}", args.script.display())))?;
    let start = sim.now().0;
    let script_from = sim.log().len();
    for (delay, cmd) in steps {
        sim.advance(delay);
        sim.apply(cmd);
    }
    let outcome = Outcome {
        source,
        log: sim.log().iter().map(|l| relative(l, start)).collect(),
        script_from,
        hosts: sim.host_lines(),
        vms: sim.placements(),
        violations: sim
            .violations()
            .iter()
            .map(|l| relative(l, start))
            .collect(),
    };
    if args.json {
        print_json(&json!(outcome))?;
    } else {
        print_text(&render(&outcome))?;
    }
    Ok(if outcome.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VIOLATION)
    })
}

/// The longest script read from stdin.
const MAX_STDIN_SCRIPT: usize = 1 << 20;

/// The script in `path`, or on stdin for `-` (at most [`MAX_STDIN_SCRIPT`] bytes of UTF-8).
fn read_script(path: &Path) -> Result<String, UsageError> {
    if path != Path::new("-") {
        return vmha_model::file::read_text(path)
            .map_err(|e| UsageError(format!("{}: {e}", path.display())));
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_STDIN_SCRIPT as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| UsageError(format!("reading the script from stdin: {e}")))?;
    if bytes.len() > MAX_STDIN_SCRIPT {
        return Err(UsageError(format!(
            "the script on stdin is longer than {MAX_STDIN_SCRIPT} bytes"
        )));
    }
    String::from_utf8(bytes).map_err(|_| UsageError("the script on stdin is not UTF-8".into()))
}

/// Reads and validates a configuration file; its diagnostic is a usage error.
fn load_config(file: &Path) -> anyhow::Result<Arc<Config>> {
    let text = vmha_model::file::read_text(file).map_err(|e| UsageError(e.to_string()))?;
    Config::from_toml_str(&text, &file.display().to_string())
        .map(Arc::new)
        .map_err(|e| UsageError(e.to_string()).into())
}

/// `line` with its leading time (engine milliseconds) counted from `start`.
fn relative(line: &str, start: u64) -> String {
    let (time, rest) = line.split_once(' ').unwrap_or((line, ""));
    match time.parse::<u64>() {
        Ok(t) if start > 0 => format!("{} {rest}", t.saturating_sub(start)),
        _ => line.to_string(),
    }
}

/// The text form: where it started, the log, the tables, the violations.
fn render(o: &Outcome) -> String {
    let mut out = String::new();
    let _ = match &o.source {
        Source::Config { file } => writeln!(
            out,
            "# simulation of {file}: all hosts up at 0 ms, nothing placed yet"
        ),
        Source::Cluster { cluster, host, .. } => writeln!(
            out,
            "# simulation of cluster {cluster} from its state as {host} sees it; until the \
             script starts, the hosts restore it (times in ms from the snapshot)"
        ),
    };
    for (i, line) in o.log.iter().enumerate() {
        if i == o.script_from {
            out.push_str("# --- script ---\n");
        }
        let _ = writeln!(out, "{line}");
    }
    if o.script_from >= o.log.len() {
        out.push_str("# --- script ---\n");
    }
    out.push('\n');
    let hosts: Vec<Vec<String>> = o
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.host.to_string(),
                h.state.map_or("-".to_string(), |s| s.to_string()),
                if !h.running {
                    "crashed"
                } else if h.connected {
                    "connected"
                } else {
                    "isolated"
                }
                .to_string(),
                if h.controller { "yes" } else { "" }.to_string(),
            ]
        })
        .collect();
    table(&mut out, &["HOST", "STATE", "DAEMON", "CONTROLLER"], &hosts);
    out.push('\n');
    let vms: Vec<Vec<String>> = o
        .vms
        .iter()
        .map(|v| {
            let desired = match v.desired {
                Some(vmha_engine::Desired::Run) => "run",
                Some(vmha_engine::Desired::Stop) => "stop",
                None => "-",
            };
            let running = v
                .running_on
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            vec![
                v.vm.to_string(),
                v.state.map_or("-".to_string(), |s| s.to_string()),
                v.owner
                    .as_ref()
                    .map_or("-".to_string(), ToString::to_string),
                desired.to_string(),
                if running.is_empty() {
                    "-".to_string()
                } else {
                    running
                },
                if v.frozen { "yes" } else { "" }.to_string(),
                v.note.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "VM",
            "STATE",
            "OWNER",
            "DESIRED",
            "RUNNING ON",
            "FROZEN",
            "NOTE",
        ],
        &vms,
    );
    if o.violations.is_empty() {
        out.push_str("\nsafety checks: no violation\n");
    } else {
        out.push('\n');
        for v in &o.violations {
            let _ = writeln!(out, "SAFETY VIOLATION: {v}");
        }
    }
    out
}

/// Appends a left-aligned table (trailing blanks trimmed).
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let heads: Vec<String> = head.iter().map(ToString::to_string).collect();
    for row in std::iter::once(&heads).chain(rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_count_from_the_start_of_the_simulation() {
        assert_eq!(
            relative("1700000005000 kvm1 crashed", 1_700_000_000_000),
            "5000 kvm1 crashed"
        );
        assert_eq!(relative("5000 kvm1 crashed", 0), "5000 kvm1 crashed");
        assert_eq!(relative("no time here", 10), "no time here");
    }

    #[test]
    fn tables_align_their_columns() {
        let mut out = String::new();
        let rows = vec![vec!["shop".to_string(), "online".to_string()]];
        table(&mut out, &["VM", "STATE"], &rows);
        assert_eq!(out, "VM    STATE\nshop  online\n");
    }
}
