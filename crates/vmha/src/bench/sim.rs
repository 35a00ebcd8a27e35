//! The controller in simulation: runs the engine's criterion benches
//! (crates/vmha-engine/benches/replacement.rs: 1,000 hosts, 10,000 VMs) with `cargo bench` and
//! takes their estimates.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// One criterion estimate: the benchmark's id and its [low, estimate, high] times.
#[derive(Debug, PartialEq)]
pub struct Estimate {
    /// `group/function`.
    pub id: String,
    /// Criterion's confidence interval and point estimate, as it prints them.
    pub low: String,
    /// The point estimate.
    pub mid: String,
    /// The upper bound.
    pub high: String,
}

/// The estimates in criterion's text output.
pub fn parse(text: &str) -> Vec<Estimate> {
    let mut out = Vec::new();
    let mut last_id: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.split_once("time:").map(|(before, rest)| {
            let before = before.trim();
            if !before.is_empty() {
                last_id = Some(before.to_string());
            }
            rest
        }) {
            let inner = rest.trim().trim_start_matches('[').trim_end_matches(']');
            let parts: Vec<&str> = inner.split_whitespace().collect();
            if let (Some(id), [a, au, b, bu, c, cu]) = (&last_id, parts.as_slice()) {
                out.push(Estimate {
                    id: id.clone(),
                    low: format!("{a} {au}"),
                    mid: format!("{b} {bu}"),
                    high: format!("{c} {cu}"),
                });
            }
        } else if !trimmed.is_empty() && !trimmed.contains(' ') && trimmed.contains('/') {
            last_id = Some(trimmed.to_string());
        }
    }
    out
}

/// What each benchmark measures, for the table.
fn meaning(id: &str) -> &'static str {
    if id.ends_with("replace_after_host_loss") {
        "one host lost (10 VMs): lease expiry → every owner CAS decided"
    } else if id.ends_with("replace_10000_vms_after_losing_500_hosts") {
        "500 hosts lost at once (10,000 VMs): → every owner CAS decided"
    } else if id.ends_with("election_listing_31000_inputs") {
        "a new leader's intake: 1,000 leases + 10,000 × (owner, admin, report) → steady"
    } else {
        ""
    }
}

/// Runs the simulation section; keeps criterion's output in `raw/sim.txt`.
pub fn run(raw: &Path) -> anyhow::Result<String> {
    let out = Command::new("cargo")
        .args([
            "bench",
            "-p",
            "vmha-engine",
            "--bench",
            "replacement",
            "--",
            "--noplot",
        ])
        .output()
        .context("running cargo bench (the simulation section needs cargo and the sources)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(raw.join("sim.txt"), &text)?;
    if !out.status.success() {
        bail!(
            "cargo bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let estimates = parse(&text);
    if estimates.is_empty() {
        bail!(
            "no estimates in cargo bench's output (see {})",
            raw.join("sim.txt").display()
        );
    }
    let mut md = String::from(
        "## 4. Controller scale in simulation (1,000 hosts × 10,000 VMs)\n\n\
         Method: the engine's criterion benches (crates/vmha-engine/benches/replacement.rs), \
         run by this command with `cargo bench -p vmha-engine --bench replacement` (release \
         build, 10 samples each): the pure controller, no store and no I/O, from a steady \
         cluster (every host up, 10 VMs online on each). One host lost: each VM may run on \
         three hosts, half placed by priority, half least-loaded. 500 hosts lost: hosts \
         h0–h499 held all 10,000 VMs, whose second choice is one of h500–h999. Intake: a new \
         leader reads the whole cluster as one batch. Criterion's estimate with its \
         confidence interval. Raw: `bench/sim.txt`.\n\n\
         | benchmark | what | estimate | interval |\n|---|---|---|---|\n",
    );
    for e in &estimates {
        let name = e.id.rsplit('/').next().unwrap_or(&e.id);
        let _ = writeln!(
            md,
            "| `{name}` | {} | {} | {} – {} |",
            meaning(&e.id),
            e.mid,
            e.low,
            e.high
        );
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_criterions_estimates_on_one_or_two_lines() {
        let text = "Benchmarking g/replace_after_host_loss: Warming up\n\
            g/replace_after_host_loss\n                        time:   [1.2000 ms 1.2500 ms 1.3000 ms]\n\
            g/election_listing_31000_inputs time:   [40.1 ms 41.0 ms 42.2 ms]\n\
            Found 1 outliers among 10 measurements (10.00%)\n";
        let e = parse(text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].id, "g/replace_after_host_loss");
        assert_eq!(e[0].mid, "1.2500 ms");
        assert_eq!(e[1].id, "g/election_listing_31000_inputs");
        assert_eq!(
            (e[1].low.as_str(), e[1].high.as_str()),
            ("40.1 ms", "42.2 ms")
        );
    }
}
