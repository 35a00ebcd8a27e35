//! Round-trip figures against a real host `qemu-ga`: `guest-ping` and a batched 5-app probe
//! (median, p99), plus CPU time per probe of this process (the daemon side) and of the agent
//! with its reaped children (the guest side). Prints figures; asserts nothing.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{HostAgent, cpu_seconds, five_checks, percentile};
use vmha_qemu::{ProbeOutcome, QgaClient, QgaConfig};

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{label}: n={} median={:?} p99={:?} max={:?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

fn main() {
    let Some(agent) = HostAgent::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let qga = QgaClient::new(&agent.sock, QgaConfig::default());
        qga.ping().await.unwrap();

        let mut pings = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            qga.ping().await.unwrap();
            pings.push(t.elapsed());
        }
        summary("guest-ping round trip", pings);

        let checks = five_checks();
        let n = 300;
        let self_before = cpu_seconds("self", false);
        let agent_before = cpu_seconds(&agent.pid, true);
        let mut probes = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let out = qga.probe(&checks, Duration::from_secs(5)).await.unwrap();
            probes.push(t.elapsed());
            assert_eq!(out[0].1, ProbeOutcome::Running);
        }
        let self_cpu = cpu_seconds("self", false) - self_before;
        let agent_cpu = cpu_seconds(&agent.pid, true) - agent_before;
        summary("batched 5-app probe round trip", probes);
        println!(
            "CPU per probe: daemon side {:.3} ms, agent + check processes {:.3} ms (over {n} probes)",
            self_cpu * 1000.0 / n as f64,
            agent_cpu * 1000.0 / n as f64
        );
    });
}
