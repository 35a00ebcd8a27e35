//! An honest VM's probe latency next to 0 and 4 hostile guests, and what the hostile ones cost
//! the monitoring side: CPU in % of one core and resident memory.
//!
//! **What is measured is this bench process, standing in for vmhad** — not vmhad itself: it
//! drives the real [`QgaClient`] as vmhad does (two runtime workers; a ping with vmhad's 800 ms
//! "guest down" timeout, `guest-info` within 800 ms and a five-app probe with 2 s slack, every
//! 250 ms per hostile VM), so its CPU and memory are those of vmhad's guest channels.
//!
//! The honest agent is a real host `qemu-ga`; the hostile ones are fake agents served by child
//! processes (their own CPU and memory are not counted). Four cases, each with its own peak
//! (VmHWM is reset through `/proc/self/clear_refs` before each):
//! - `none`: the honest VM alone;
//! - `lines`: two agents put a 4 MiB `[0,0,0,…]` line before every answer (pings fail), two
//!   stream bytes without end;
//! - `flood`: four agents put 2 MiB of short stray lines (`{}`) before every answer (a resync
//!   discards them one by one);
//! - `probe`: four agents answer pings, `guest-info` and `guest-exec` honestly but every
//!   `guest-exec-status` with a ~4 MiB reply (a valid exit status padded with a `[0,0,…]`
//!   member), so the probe path itself meets the big lines.
//!
//! Prints one human line and one `RESULT key=value …` line per case (read by `vmha bench
//! --only hostile`); asserts nothing but the honest probe's result.
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
    // `[0,0,…]`, about 4 MiB: the cheapest bytes that cost a parsed JSON value the most.
    let mut zeros = b"[0".to_vec();
    while zeros.len() < (4 << 20) - 200 {
        zeros.extend_from_slice(b",0");
    }
    zeros.push(b']');
    let zeros = Arc::new(zeros);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let kind = kind.to_owned();
        let zeros = zeros.clone();
        std::thread::spawn(move || serve_one(stream, &kind, &zeros));
    }
}

fn serve_one(stream: UnixStream, kind: &str, zeros: &[u8]) {
    let mut write = stream.try_clone().unwrap();
    if kind == "endless" {
        let chunk = vec![b'0'; 64 << 10];
        while write.write_all(&chunk).is_ok() {}
        return;
    }
    let mut lines = BufReader::new(stream).split(b'\n');
    while let Some(Ok(line)) = lines.next() {
        let line: Vec<u8> = line.into_iter().filter(|b| *b != 0xFF).collect();
        let Ok(req) = serde_json::from_slice::<serde_json::Value>(&line) else {
            continue;
        };
        let id = &req["id"];
        let mut bytes = Vec::new();
        if kind == "amplify" {
            // A 4 MiB line before every answer (sync included), then the answer.
            bytes.extend_from_slice(zeros);
            bytes.push(b'\n');
        } else if kind == "flood" && req["execute"] != "guest-sync-delimited" {
            bytes.extend_from_slice(&b"{}\n".repeat(700_000));
        }
        match req["execute"].as_str().unwrap_or_default() {
            "guest-sync-delimited" => {
                bytes.push(0xFF);
                bytes.extend_from_slice(
                    format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes(),
                );
            }
            "guest-info" => bytes.extend_from_slice(
                format!(
                    "{{\"return\": {{\"version\": \"9\", \"supported_commands\": [\
                     {{\"name\": \"guest-exec\", \"enabled\": true}}, \
                     {{\"name\": \"guest-exec-status\", \"enabled\": true}}]}}, \"id\": {id}}}\n"
                )
                .as_bytes(),
            ),
            "guest-exec" => bytes.extend_from_slice(
                format!("{{\"return\": {{\"pid\": 7}}, \"id\": {id}}}\n").as_bytes(),
            ),
            "guest-exec-status" if kind == "probe" => {
                bytes.extend_from_slice(br#"{"return": {"exited": true, "exitcode": 0, "pad": "#);
                bytes.extend_from_slice(zeros);
                bytes.extend_from_slice(format!("}}, \"id\": {id}}}\n").as_bytes());
            }
            _ => {
                bytes.extend_from_slice(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
            }
        }
        if write.write_all(&bytes).is_err() {
            return;
        }
    }
}

/// Drives one hostile VM as vmhad would until `stop`: ping (800 ms), then `guest-info` (800 ms)
/// and a probe (2 s slack); 250 ms apart.
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
    // Reset VmHWM to the current RSS (Linux ≥ 4.0), so each case has its own peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
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

/// Starts a child process serving a hostile agent of `kind` at `path`.
fn hostile_server(path: &Path, kind: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .env(HOSTILE_ENV, format!("{}|{kind}", path.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
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
    let cases: [(&str, &[&str]); 4] = [
        ("none", &[]),
        ("lines", &["amplify", "amplify", "endless", "endless"]),
        ("flood", &["flood", "flood", "flood", "flood"]),
        ("probe", &["probe", "probe", "probe", "probe"]),
    ];
    let mut servers = Vec::new();
    let socks: Vec<Vec<PathBuf>> = cases
        .iter()
        .map(|(case, kinds)| {
            kinds
                .iter()
                .enumerate()
                .map(|(i, kind)| {
                    let path = dir.join(format!("{case}{i}.sock"));
                    servers.push(hostile_server(&path, kind));
                    path
                })
                .collect()
        })
        .collect();
    for s in socks.iter().flatten() {
        while UnixStream::connect(s).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "qga_hostile: figures of THIS process standing in for vmhad (the real QgaClient driven \
         with vmhad's timeouts), {probes} honest probes per case"
    );
    rt.block_on(async {
        let honest = QgaClient::new(&agent.sock, QgaConfig::default());
        honest.ping().await.unwrap();
        let mut base = None;
        for ((case, kinds), socks) in cases.iter().zip(&socks) {
            let f = scenario(&honest, socks, probes).await;
            println!(
                "1 honest + {} hostile ({case}): honest probe p50={:?} p99={:?}; process CPU \
                 {:.1}% of a core, RSS {} kB (HWM {} kB)",
                kinds.len(),
                f.p50,
                f.p99,
                f.cpu_core_pct,
                f.rss_kb,
                f.hwm_kb
            );
            println!(
                "RESULT case={case} hostile={} probes={probes} p50_ms={:.2} p99_ms={:.2} \
                 cpu_pct={:.2} rss_kb={} hwm_kb={}",
                kinds.len(),
                f.p50.as_secs_f64() * 1000.0,
                f.p99.as_secs_f64() * 1000.0,
                f.cpu_core_pct,
                f.rss_kb,
                f.hwm_kb
            );
            let Some(b) = &base else {
                base = Some(f);
                continue;
            };
            let n = kinds.len() as f64;
            println!(
                "  per hostile VM: {:+.1}% of a core, {:+.0} kB RSS ({:+.0} kB HWM); p99 {:+.1} ms",
                (f.cpu_core_pct - b.cpu_core_pct) / n,
                (f.rss_kb as f64 - b.rss_kb as f64) / n,
                (f.hwm_kb as f64 - b.hwm_kb as f64) / n,
                (f.p99.as_secs_f64() - b.p99.as_secs_f64()) * 1000.0
            );
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(agent);
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}
