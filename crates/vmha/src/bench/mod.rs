//! `vmha bench` (hidden; run it through `scripts/bench.sh`): the project's figures from one
//! command. Four sections, each in its own module — detection and recovery on real TCG VMs
//! ([`detect`]), the cost of watching many VMs through the fake QEMU ([`scale`]), failover and
//! self-fencing on the multi-host test bed ([`failover`]), the controller in simulation
//! ([`sim`]) — then `BENCHMARKS.md` is written from what was measured ([`report`]), with the raw
//! samples as CSV files beside it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

mod detect;
mod failover;
mod report;
mod scale;
mod sim;
mod stats;

/// The sections of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Detection and recovery on one host, real TCG VMs.
    Detect,
    /// vmhad watching many fake VMs.
    Scale,
    /// Host loss and partition on the multi-host test bed (root).
    Failover,
    /// The controller's criterion benches (1,000 hosts, 10,000 VMs).
    Sim,
}

/// Arguments of `vmha bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A quick run that only shows the code works (tiny N, 2 runs, no simulation): for CI.
    /// Its figures mean nothing; it writes to `--out` as usual (CI points it at `target/`).
    #[arg(long)]
    smoke: bool,
    /// Where BENCHMARKS.md goes; the raw samples go to `<out>/bench/`.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// The vmhad binary.
    #[arg(long, default_value = "target/release/vmhad")]
    vmhad: PathBuf,
    /// The fake QEMU binary (`vmha-fake-qemu`) for the scale section.
    #[arg(long, default_value = "target/release/vmha-fake-qemu")]
    fake_qemu: PathBuf,
    /// Directory with the test guest (`scripts/build-guest-image.sh` output).
    #[arg(long, default_value = ".cache/guest")]
    guest: PathBuf,
    /// Scratch directory (recreated).
    #[arg(long, default_value = "/tmp/vmha-bench")]
    workdir: PathBuf,
    /// Sections to run (default: all; with --smoke: all but sim).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Runs per failure kind and interval in the detection section.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// App probe intervals of the detection section, in seconds.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0])]
    intervals: Vec<f64>,
    /// Seed of the random injection phases.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// VM counts of the scale section.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 500])]
    scale: Vec<u32>,
    /// Measurement window of each scale step, in seconds.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Rounds of the failover section (each: a host killed, a host cut off).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    failover_runs: u32,
}

impl BenchArgs {
    /// The smoke run's settings over whatever was given.
    fn effective(mut self) -> Self {
        if self.smoke {
            self.runs = 2;
            self.intervals = vec![1.0];
            self.scale = vec![3];
            self.window = 6;
            self.failover_runs = 1;
            if self.only.is_empty() {
                self.only = vec![Section::Detect, Section::Scale, Section::Failover];
            }
        }
        if self.only.is_empty() {
            self.only = vec![
                Section::Detect,
                Section::Scale,
                Section::Failover,
                Section::Sim,
            ];
        }
        self
    }

    fn runs(&self, section: Section) -> bool {
        self.only.contains(&section)
    }
}

/// What one section produced: its Markdown and how long it took.
pub struct Done {
    /// The section's Markdown (heading, method, tables).
    pub markdown: String,
    /// How long the section ran.
    pub took: Duration,
}

/// Runs the benchmark and writes the report.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let args = args.effective();
    let started = Instant::now();
    let wall_start = crate::harness::now_ms();
    let raw = args.out.join("bench");
    std::fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;
    let _ = std::fs::remove_dir_all(&args.workdir);
    std::fs::create_dir_all(&args.workdir)?;
    let mut sections = Vec::new();
    let timed = |f: &mut dyn FnMut() -> anyhow::Result<String>| -> anyhow::Result<Done> {
        let t0 = Instant::now();
        let markdown = f()?;
        Ok(Done {
            markdown,
            took: t0.elapsed(),
        })
    };
    if args.runs(Section::Detect) {
        println!("━━ detection and recovery (real TCG VMs)");
        sections.push(timed(&mut || detect::run(&args, &raw))?);
    }
    if args.runs(Section::Scale) {
        println!("━━ monitoring cost at scale (fake QEMU, real qemu-ga)");
        sections.push(timed(&mut || scale::run(&args, &raw))?);
    }
    if args.runs(Section::Failover) {
        println!("━━ failover on the multi-host test bed");
        sections.push(timed(&mut || failover::run(&args, &raw))?);
    }
    if args.runs(Section::Sim) {
        println!("━━ controller in simulation (criterion)");
        sections.push(timed(&mut || sim::run(&raw))?);
    }
    let doc = report::document(&args, wall_start, started.elapsed(), &sections);
    let path = args.out.join("BENCHMARKS.md");
    std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {} and {}/ in {} s",
        path.display(),
        raw.display(),
        started.elapsed().as_secs()
    );
    Ok(ExitCode::SUCCESS)
}
