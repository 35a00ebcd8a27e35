//! Host loss and partition on the multi-host test bed: the cluster demo's drills
//! ([`crate::cluster_demo::drive`]) repeated, their samples summarised.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::bail;

use super::BenchArgs;
use super::stats::ms_row;

/// Runs the failover section; writes `raw/failover.csv`, returns the Markdown.
pub fn run(args: &BenchArgs, raw: &Path) -> anyhow::Result<String> {
    let outcome = crate::cluster_demo::drive(&args.vmhad, &args.guest, args.failover_runs, false)?;
    let mut csv = String::from("figure,run,ms\n");
    for (figure, samples) in &outcome.figures {
        for (i, v) in samples.iter().enumerate() {
            let _ = writeln!(csv, "{figure},{},{v}", i + 1);
        }
    }
    std::fs::write(raw.join("failover.csv"), csv)?;
    let mut md = format!(
        "## 3. Host loss and partition (three hosts, 3-member etcd)\n\n\
         Method: the cluster demo's drills (`vmha demo --cluster`, crates/vmha/src/cluster_demo.rs) \
         on the test bed (crates/vmha-testbed): three hosts as network namespaces, a 3-member \
         etcd, one vmhad each, two TCG VMs, `ttl = \"5s\"`, `fence_margin = \"1500ms\"`. Each round \
         kills the host running `shop` (every process in its namespace, its etcd member too) and \
         then cuts the host running `shop` off the network (link down); times are from the kill \
         or the cut to what the drill observes, polled every 100 ms (a QEMU of the VM on another \
         host; the VM `online` there; the cut-off host's QEMU gone). The host lost in the first \
         round may also run the controller (a new one is elected first). A checker looks at every \
         QEMU on every host every 100 ms. {} rounds. Raw: `bench/failover.csv`.\n\n\
         | figure | median | p90 | max | runs |\n|---|---|---|---|---|\n",
        args.failover_runs
    );
    for (figure, samples) in &outcome.figures {
        let values: Vec<f64> = samples.iter().map(|v| *v as f64).collect();
        if let Some(row) = ms_row(figure, &values) {
            let _ = writeln!(md, "{row}");
        }
    }
    let _ = writeln!(
        md,
        "\nDouble runs: {} in {} looks at every VM on every host.",
        outcome.double_runs, outcome.checks
    );
    if outcome.double_runs > 0 {
        bail!("a VM ran on two hosts during the failover benchmark");
    }
    Ok(md)
}
