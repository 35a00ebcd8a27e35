//! An honest VM's probe latency next to 0 and 4 hostile guests, and what the hostile ones cost
//! this process (the daemon side): CPU in % of one core and resident memory.
//!
//! The honest agent is a real host `qemu-ga`; the hostile ones are fake agents served by a
//! child process (so their own CPU and memory are not counted): two answer every command with a
//! 4 MiB `[0,0,0,…]` line, two stream bytes without end. Each VM is driven as vmhad drives it
//! (two runtime workers, pings with the 800 ms "guest down" timeout every 250 ms, a probe with
//! 2 s slack). Prints figures; asserts nothing.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{HostAgent, cpu_seconds, five_checks, percentile};
use vmha_qemu::{ProbeOutcome, QgaClient, QgaConfig};

const HOSTILE_ENV: &str = "VMHA_BENCH_HOSTILE";

/// A `/proc/self/status` field in kB.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Child-process mode: serve one hostile fake agent of `kind` on `sock`, forever.
fn serve_hostile(sock: &Path, kind: &str) {
    let listener = UnixListener::bind(sock).unwrap();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let kind = kind.to_owned();
        std::thread::spawn(move || serve_one(stream, &kind));
    }
}

fn serve_one(stream: UnixStream, kind: &str) {
    let mut write = stream.try_clone().unwrap();
    if kind == "endless" {
        let chunk = vec![b'0'; 64 << 10];
        while write.write_all(&chunk).is_ok() {}
        return;
    }
    // "amplify": a 4 MiB `[0,0,…]` line before every answer (sync included), then the answer.
    let mut huge = b"[0".to_vec();
    while huge.len() < (4 << 20) - 4 {
        huge.extend_from_slice(b",0");
    }
    huge.extend_from_slice(b"]\n");
    let mut lines = BufReader::new(stream).split(b'\n');
    while let Some(Ok(line)) = lines.next() {
        let line: Vec<u8> = line.into_iter().filter(|b| *b != 0xFF).collect();
        let Ok(req) = serde_json::from_slice::<serde_json::Value>(&line) else {
            continue;
        };
        if write.write_all(&huge).is_err() {
            return;
        }
        let bytes = if req["execute"] == "guest-sync-delimited" {
            let mut b = vec![0xFF];
            b.extend_from_slice(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes());
            b
        } else {
            format!("{{\"return\": {{}}, \"id\": {}}}\n", req["id"]).into_bytes()
        };
        if write.write_all(&bytes).is_err() {
            return;
        }
    }
}

/// Drives one hostile VM as vmhad would until `stop`: ping (800 ms), then a probe; 250 ms apart.
async fn drive_hostile(sock: PathBuf, stop: Arc<AtomicBool>) {
    let qga = QgaClient::new(&sock, QgaConfig::default());
    let checks = five_checks();
    while !stop.load(Ordering::Relaxed) {
        if qga.ping_within(Duration::from_millis(800)).await.is_ok() {
            let _ = qga.info_within(Duration::from_millis(800)).await;
            let _ = qga.probe(&checks, Duration::from_secs(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Figures {
    p50: Duration,
    p99: Duration,
    cpu_core_pct: f64,
    rss_kb: u64,
    hwm_kb: u64,
}

async fn scenario(honest: &QgaClient, hostile: &[PathBuf], probes: usize) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = hostile
        .iter()
        .map(|s| tokio::spawn(drive_hostile(s.clone(), stop.clone())))
        .collect();
    let checks = five_checks();
    let wall = Instant::now();
    let cpu = cpu_seconds("self", false);
    let mut samples = Vec::with_capacity(probes);
    for _ in 0..probes {
        let t = Instant::now();
        let out = honest.probe(&checks, Duration::from_secs(2)).await.unwrap();
        samples.push(t.elapsed());
        assert_eq!(out[0].1, ProbeOutcome::Running);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_core_pct = (cpu_seconds("self", false) - cpu) / wall.elapsed().as_secs_f64() * 100.0;
    let rss_kb = status_kb("VmRSS:");
    let hwm_kb = status_kb("VmHWM:");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    samples.sort();
    Figures {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        cpu_core_pct,
        rss_kb,
        hwm_kb,
    }
}

fn main() {
    if let Ok(spec) = std::env::var(HOSTILE_ENV) {
        let (sock, kind) = spec.split_once('|').unwrap();
        serve_hostile(Path::new(sock), kind);
        return;
    }
    let probes: usize = std::env::var("VMHA_BENCH_PROBES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let Some(agent) = HostAgent::start() else {
        return;
    };
    let dir = agent.dir.path();
    let (hostile, mut servers): (Vec<PathBuf>, Vec<std::process::Child>) =
        ["amplify", "amplify", "endless", "endless"]
            .iter()
            .enumerate()
            .map(|(i, kind)| (dir.join(format!("hostile{i}.sock")), *kind))
            .map(|(path, kind)| {
                let child = Command::new(std::env::current_exe().unwrap())
                    .env(HOSTILE_ENV, format!("{}|{kind}", path.display()))
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap();
                (path, child)
            })
            .unzip();
    for s in &hostile {
        while UnixStream::connect(s).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let honest = QgaClient::new(&agent.sock, QgaConfig::default());
        honest.ping().await.unwrap();
        let base = scenario(&honest, &[], probes).await;
        let with = scenario(&honest, &hostile, probes).await;
        for (label, f) in [
            ("1 honest + 0 hostile", &base),
            ("1 honest + 4 hostile", &with),
        ] {
            println!(
                "{label}: honest probe p50={:?} p99={:?}; process CPU {:.1}% of a core, \
                 RSS {} kB (HWM {} kB)",
                f.p50, f.p99, f.cpu_core_pct, f.rss_kb, f.hwm_kb
            );
        }
        println!(
            "per hostile VM: {:+.1}% of a core, {:+} kB RSS ({:+} kB HWM); p99 {:+.1} ms",
            (with.cpu_core_pct - base.cpu_core_pct) / 4.0,
            (with.rss_kb as i64 - base.rss_kb as i64) / 4,
            (with.hwm_kb as i64 - base.hwm_kb as i64) / 4,
            (with.p99.as_secs_f64() - base.p99.as_secs_f64()) * 1000.0
        );
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(agent);
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}
