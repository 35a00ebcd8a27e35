//! The guest channel under hostile guests: runs vmha-qemu's `qga_hostile` bench (an honest VM's
//! probe next to 0 and 4 hostile fake agents, crates/vmha-qemu/benches/qga_hostile.rs) with
//! `cargo bench` on this tree and, for comparison, on the library of an earlier commit
//! (`--hostile-before`, extracted with `git archive`, this tree's bench copied over it), and
//! tabulates both. The figures are the bench process's, which stands in for vmhad.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::BenchArgs;

/// One case of one run: the bench's `RESULT key=value …` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// `none`, `lines`, `flood` or `probe`.
    pub case: String,
    /// Hostile agents next to the honest one.
    pub hostile: u32,
    /// The honest probe's median and 99th percentile, ms.
    pub p50_ms: f64,
    /// The 99th percentile, ms.
    pub p99_ms: f64,
    /// The process's CPU over the case, % of one core.
    pub cpu_pct: f64,
    /// Its resident set at the end of the case and its peak during it, kB.
    pub rss_kb: u64,
    /// The peak, kB.
    pub hwm_kb: u64,
}

/// The `RESULT` lines of the bench's output; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Case> {
    text.lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .filter_map(|l| {
            let kv: BTreeMap<&str, &str> = l.split(' ').filter_map(|w| w.split_once('=')).collect();
            Some(Case {
                case: kv.get("case")?.to_string(),
                hostile: kv.get("hostile")?.parse().ok()?,
                p50_ms: kv.get("p50_ms")?.parse().ok()?,
                p99_ms: kv.get("p99_ms")?.parse().ok()?,
                cpu_pct: kv.get("cpu_pct")?.parse().ok()?,
                rss_kb: kv.get("rss_kb")?.parse().ok()?,
                hwm_kb: kv.get("hwm_kb")?.parse().ok()?,
            })
        })
        .collect()
}

/// What the hostile agents of each case do, for the table.
fn meaning(case: &str) -> &'static str {
    match case {
        "none" => "the honest VM alone",
        "lines" => "2 × a 4 MiB `[0,0,…]` line before every answer, 2 × an endless byte stream",
        "flood" => "4 × 2 MiB of short stray lines before every answer",
        "probe" => "4 × honest pings, every `guest-exec-status` a ~4 MiB reply",
        _ => "",
    }
}

/// The target directory cargo uses here (`CARGO_TARGET_DIR`, else `./target`), absolute.
fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => std::path::absolute(t)?,
        None => std::env::current_dir()?.join("target"),
    })
}

/// Runs the bench of the workspace at `manifest` (release build); returns its stdout.
fn run_bench(manifest: &Path, probes: u32) -> anyhow::Result<String> {
    let out = Command::new("cargo")
        .args(["bench", "--manifest-path"])
        .arg(manifest)
        .args(["-p", "vmha-qemu", "--bench", "qga_hostile"])
        .env("CARGO_TARGET_DIR", target_dir()?)
        .env("VMHA_BENCH_PROBES", probes.to_string())
        .output()
        .context("running cargo bench (the hostile section needs cargo and the sources)")?;
    if !out.status.success() {
        bail!(
            "cargo bench of {} failed: {}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The tree of `commit` in `dir`, with this tree's `qga_hostile` bench copied over it.
fn before_tree(commit: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let status = Command::new("sh")
        .args([
            "-c",
            "git archive --format=tar \"$1\" | tar -x -C \"$2\"",
            "sh",
        ])
        .arg(commit)
        .arg(dir)
        .status()?;
    if !status.success() {
        bail!("git archive {commit} failed");
    }
    let benches = Path::new("crates/vmha-qemu/benches");
    for file in ["qga_hostile.rs", "common/mod.rs"] {
        let to = dir.join(benches).join(file);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(benches.join(file), &to)
            .with_context(|| format!("copying {file} over {commit}"))?;
    }
    Ok(dir.join("Cargo.toml"))
}

/// The short hash of `rev`.
fn short(rev: &str) -> String {
    Command::new("git")
        .args(["rev-parse", "--short", rev])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| rev.to_string())
}

/// Table rows of one run (`tree` names it), each case against the same run's `none` case.
fn rows(md: &mut String, tree: &str, cases: &[Case]) {
    let Some(base) = cases.iter().find(|c| c.hostile == 0) else {
        return;
    };
    for c in cases {
        let n = f64::from(c.hostile.max(1));
        let (dp99, cpu, hwm) = (
            c.p99_ms - base.p99_ms,
            (c.cpu_pct - base.cpu_pct) / n,
            (c.hwm_kb as f64 - base.hwm_kb as f64) / n / 1024.0,
        );
        let verdict = if c.hostile == 0 {
            "—"
        } else if dp99 <= 20.0 && hwm <= 16.0 && cpu <= 5.0 {
            "met"
        } else {
            "**missed**"
        };
        let _ = writeln!(
            md,
            "| {tree} | 1 + {} ({}) | {} | {:.1} ms | {:.1} ms | {} | {:.1} % | {} | {:.1} MB / {:.1} MB | {} | {verdict} |",
            c.hostile,
            c.case,
            meaning(&c.case),
            c.p50_ms,
            c.p99_ms,
            if c.hostile == 0 {
                "—".into()
            } else {
                format!("{dp99:+.1} ms")
            },
            c.cpu_pct,
            if c.hostile == 0 {
                "—".into()
            } else {
                format!("{cpu:+.2} %")
            },
            c.rss_kb as f64 / 1024.0,
            c.hwm_kb as f64 / 1024.0,
            if c.hostile == 0 {
                "—".into()
            } else {
                format!("{hwm:+.2} MB")
            },
        );
    }
}

/// Runs the hostile-guest section; keeps the bench's output in `raw/hostile.txt`.
pub fn run(args: &BenchArgs, raw: &Path) -> anyhow::Result<String> {
    let probes = if args.smoke { 20 } else { 300 };
    let mut runs = Vec::new();
    let before = args.hostile_before.trim();
    if !before.is_empty() && before != "none" {
        let manifest = before_tree(before, &args.workdir.join("hostile-before"))?;
        runs.push((
            format!("before: `{}` (library), this bench", short(before)),
            run_bench(&manifest, probes)?,
        ));
    }
    runs.push((
        format!("after: `{}`", super::report::commit()),
        run_bench(&std::env::current_dir()?.join("Cargo.toml"), probes)?,
    ));
    let mut text = String::new();
    for (tree, out) in &runs {
        let _ = writeln!(text, "== {tree}\n{out}");
    }
    std::fs::write(raw.join("hostile.txt"), &text)?;
    let mut md = format!(
        "## 6. The guest channel under hostile guests (one process, fake agents, real qemu-ga)\n\n\
         Method: vmha-qemu's bench `qga_hostile` (crates/vmha-qemu/benches/qga_hostile.rs), \
         run by this command with `cargo bench -p vmha-qemu --bench qga_hostile` (release \
         build). **The figures are those of the bench process, which stands in for vmhad**: \
         it drives the real QGA client as vmhad does (a multi-thread runtime with two \
         workers; per hostile VM every 250 ms a ping with vmhad's 800 ms timeout, `guest-info` \
         within 800 ms and a five-app probe with 2 s slack). One honest VM (a real host \
         `qemu-ga`) is probed back to back ({probes} probes, 20 ms apart; five checks that \
         pass, fail or exit 3) next to 0 or 4 hostile fake agents, served by child processes \
         whose own CPU and memory are not counted. CPU: the process's utime + stime over the \
         case, % of one core; RSS at the end of the case and its peak (VmHWM, reset before \
         each case). \"Per hostile VM\" is the difference to the same run's case without \
         hostile agents, divided by 4. Goal (issue 10): p99 within 20 ms of the undisturbed \
         figure, ≤ 16 MB extra peak RSS and ≤ 5 % of a core per hostile VM. Before: the \
         client library of the commit named (`--hostile-before`; the tree before the guest \
         channel's hardening) with this tree's bench compiled against it. One run of each \
         case; the machine is shared, so single p99 figures move by tens of ms from run to \
         run. Raw: `bench/hostile.txt`.\n\n\
         | tree | VMs (hostile kind) | hostile agents | honest probe p50 | p99 | p99 vs alone | \
         CPU | per hostile VM | RSS / peak | peak per hostile VM | goal |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (tree, out) in &runs {
        let cases = parse(out);
        if cases.is_empty() {
            bail!(
                "no RESULT lines in the bench's output (see {})",
                raw.join("hostile.txt").display()
            );
        }
        rows(&mut md, tree, &cases);
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_result_lines_and_judges_the_goal() {
        let text = "qga_hostile: figures of THIS process\n\
            RESULT case=none hostile=0 probes=300 p50_ms=14.00 p99_ms=25.00 cpu_pct=1.00 rss_kb=3400 hwm_kb=3400\n\
            1 honest + 4 hostile (lines): …\n\
            RESULT case=lines hostile=4 probes=300 p50_ms=15.00 p99_ms=30.00 cpu_pct=2.00 rss_kb=3800 hwm_kb=3900\n\
            RESULT case=probe hostile=4 probes=300 p50_ms=28.00 p99_ms=391.00 cpu_pct=58.70 rss_kb=18072 hwm_kb=156884\n\
            RESULT case=broken hostile=x\n";
        let cases = parse(text);
        assert_eq!(cases.len(), 3, "{cases:?}");
        assert_eq!(cases[1].case, "lines");
        assert_eq!((cases[1].hostile, cases[1].hwm_kb), (4, 3900));
        let mut md = String::new();
        rows(&mut md, "t", &cases);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with("| — |"), "{}", lines[0]);
        assert!(lines[1].ends_with("| met |"), "{}", lines[1]);
        assert!(lines[1].contains("+5.0 ms"), "{}", lines[1]);
        assert!(lines[2].ends_with("| **missed** |"), "{}", lines[2]);
    }
}
