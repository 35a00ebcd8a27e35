//! Round-trip figures against a real host `qemu-ga`: `guest-ping` and a batched 5-app probe
//! (median, p99), plus CPU time per probe of this process (the daemon side) and of the agent
//! with its reaped children (the guest side). Prints figures; asserts nothing.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmha_qemu::{ProbeCheck, ProbeOutcome, QgaClient, QgaConfig};

/// utime + stime (+ cutime + cstime with `children`) of a process, in seconds.
fn cpu_seconds(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
    // Fields 14..17 of stat(5) are at 11..14 here (counting from field 3, the state).
    let ticks = f[11] + f[12] + if children { f[13] + f[14] } else { 0 };
    ticks as f64 / 100.0
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{label}: n={} median={:?} p99={:?} max={:?}",
        samples.len(),
        pct(0.5),
        pct(0.99),
        samples[samples.len() - 1]
    );
}

fn main() {
    if !std::path::Path::new("/usr/sbin/qemu-ga").exists() {
        println!("SKIPPED: /usr/sbin/qemu-ga is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let mut agent = Command::new("/usr/sbin/qemu-ga")
        .args(["-m", "unix-listen", "-p"])
        .arg(&sock)
        .arg("-f")
        .arg(dir.path().join("pid"))
        .arg("-t")
        .arg(dir.path().join("state"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent_pid = agent.id().to_string();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let qga = QgaClient::new(&sock, QgaConfig::default());
        qga.ping().await.unwrap();

        let mut pings = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            qga.ping().await.unwrap();
            pings.push(t.elapsed());
        }
        summary("guest-ping round trip", pings);

        let check = |name: &str, argv: &[&str]| ProbeCheck {
            app: vmha_model::Name::new(name).unwrap(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(5),
        };
        let checks = vec![
            check("a", &["true"]),
            check("b", &["false"]),
            check("c", &["sh", "-c", "exit 3"]),
            check("d", &["test", "-d", "/"]),
            check("e", &["true"]),
        ];
        let n = 300;
        let self_before = cpu_seconds("self", false);
        let agent_before = cpu_seconds(&agent_pid, true);
        let mut probes = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let out = qga.probe(&checks, Duration::from_secs(5)).await.unwrap();
            probes.push(t.elapsed());
            assert_eq!(out[0].1, ProbeOutcome::Running);
        }
        let self_cpu = cpu_seconds("self", false) - self_before;
        let agent_cpu = cpu_seconds(&agent_pid, true) - agent_before;
        summary("batched 5-app probe round trip", probes);
        println!(
            "CPU per probe: daemon side {:.3} ms, agent + check processes {:.3} ms (over {n} probes)",
            self_cpu * 1000.0 / n as f64,
            agent_cpu * 1000.0 / n as f64
        );
    });
    let _ = agent.kill();
    let _ = agent.wait();
}
