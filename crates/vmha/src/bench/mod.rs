//! `vmha bench` (hidden; run it through `scripts/bench.sh`): the project's figures from one
//! command. Six sections, each in its own module — detection and recovery on real TCG VMs
//! ([`detect`]), the cost of watching many VMs through the fake QEMU ([`scale`]), failover and
//! self-fencing on the multi-host test bed ([`failover`]), the controller in simulation
//! ([`sim`]), app failure detection and its cost with the VM's watch on and off ([`watch`]),
//! the guest channel next to hostile guests ([`hostile`]) —
//! then `BENCHMARKS.md` is written from what was measured ([`report`]), with the raw samples as
//! CSV files beside it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

mod detect;
mod failover;
mod hostile;
mod probe_cost;
mod report;
mod scale;
mod sim;
mod stats;
mod watch;

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
    /// App kills with the VM's watch on and off, and what checking and watching cost (real
    /// TCG VMs).
    Watch,
    /// An honest VM's probe next to hostile guest agents, before and after the guest channel's
    /// hardening (vmha-qemu's `qga_hostile` bench).
    Hostile,
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
    /// Sections to run (default: all; with --smoke: all but sim). The report keeps the last
    /// run of the others (from `<out>/bench/<section>.md`).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Runs per failure kind and interval in the detection section, and per interval and
    /// watch setting in the watch section.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Failures injected by the detection section, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        detect::Failure::AppKill,
        detect::Failure::QemuKill,
        detect::Failure::AgentHang,
    ])]
    failures: Vec<detect::Failure>,
    /// App probe intervals of the detection section, in seconds.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0])]
    intervals: Vec<f64>,
    /// Seed of the random injection phases.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// VM counts of the scale section.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 500])]
    scale: Vec<u32>,
    /// App intervals of the watch section, in seconds (each with the watch on and off).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 10.0])]
    watch_intervals: Vec<f64>,
    /// Measurement window of each scale step and of each CPU case of the watch section, in
    /// seconds.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Rounds of the failover section (each: a host killed, a host cut off).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    failover_runs: u32,
    /// The commit whose QGA client the hostile section compares with this tree's (`none`: this
    /// tree only). Default: the last commit before the guest channel's hardening (issue 10).
    #[arg(long, default_value = "daeae6e")]
    hostile_before: String,
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
                self.only = vec![
                    Section::Detect,
                    Section::Scale,
                    Section::Failover,
                    Section::Watch,
                ];
            }
        }
        if self.only.is_empty() {
            self.only = vec![
                Section::Detect,
                Section::Scale,
                Section::Failover,
                Section::Sim,
                Section::Watch,
                Section::Hostile,
            ];
        }
        self
    }

    fn runs(&self, section: Section) -> bool {
        self.only.contains(&section)
    }

    /// App kills per watch setting at app interval `interval_s` in the watch section: `runs`,
    /// but one in a smoke run when the interval is over 2 s (a 10 s interval makes each run
    /// long).
    fn watch_runs(&self, interval_s: f64) -> u32 {
        if self.smoke && interval_s > 2.0 {
            1
        } else {
            self.runs
        }
    }
}

/// What one section produced: its Markdown, how long it took and the commit it measured.
pub struct Done {
    /// The section's Markdown (heading, method, tables).
    pub markdown: String,
    /// How long the section ran.
    pub took: Duration,
    /// The commit measured ([`report::commit`] when it ran; `?` for a section kept from a run
    /// that did not record it).
    pub commit: String,
}

impl Section {
    fn file_stem(self) -> &'static str {
        match self {
            Section::Detect => "detection",
            Section::Scale => "scale",
            Section::Failover => "failover",
            Section::Sim => "sim",
            Section::Watch => "watch",
            Section::Hostile => "hostile",
        }
    }
}

/// The 1-minute load average, as /proc/loadavg says.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The first line of a kept section file: how long it took, then the commit it measured.
const TOOK: &str = "<!-- took (s): ";
const COMMIT: &str = "; commit: ";

impl Done {
    /// The section as kept in `bench/<section>.md`.
    fn to_file(&self) -> String {
        format!(
            "{TOOK}{:.1}{COMMIT}{} -->\n{}",
            self.took.as_secs_f64(),
            self.commit,
            self.markdown
        )
    }

    /// A kept section; `None` if `text` is not one.
    fn from_file(text: &str) -> Option<Done> {
        let (first, markdown) = text.split_once('\n')?;
        let fields = first.strip_prefix(TOOK)?.strip_suffix(" -->")?;
        let (secs, commit) = fields.split_once(COMMIT).unwrap_or((fields, "?"));
        Some(Done {
            markdown: markdown.to_string(),
            took: Duration::try_from_secs_f64(secs.parse().ok()?).ok()?,
            commit: commit.to_string(),
        })
    }
}

/// Runs the sections asked for, then writes the report from every section's latest run
/// (sections not run now keep the Markdown of their last run, from `bench/<section>.md`).
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let args = args.effective();
    let started = Instant::now();
    let wall_start = crate::harness::now_ms();
    let raw = args.out.join("bench");
    std::fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;
    let _ = std::fs::remove_dir_all(&args.workdir);
    std::fs::create_dir_all(&args.workdir)?;
    let all = [
        (Section::Detect, "detection and recovery (real TCG VMs)"),
        (
            Section::Scale,
            "monitoring cost at scale (fake QEMU, real qemu-ga)",
        ),
        (Section::Failover, "failover on the multi-host test bed"),
        (Section::Sim, "controller in simulation (criterion)"),
        (
            Section::Watch,
            "app failure detection with the watch on and off (real TCG VMs)",
        ),
        (
            Section::Hostile,
            "the guest channel next to hostile guests (qga_hostile bench)",
        ),
    ];
    let mut sections = Vec::new();
    for (section, title) in all {
        let kept = raw.join(format!("{}.md", section.file_stem()));
        if args.runs(section) {
            println!("━━ {title}");
            let t0 = Instant::now();
            let load_before = load_average();
            let mut markdown = match section {
                Section::Detect => detect::run(&args, &raw),
                Section::Scale => scale::run(&args, &raw),
                Section::Failover => failover::run(&args, &raw),
                Section::Sim => sim::run(&raw),
                Section::Watch => watch::run(&args, &raw),
                Section::Hostile => hostile::run(&args, &raw),
            }?;
            markdown.push_str(&format!(
                "\nLoad average (1 min) at the start and end of this section: {load_before} → {} \
                 ({} cores; anything else running on the machine shares them).\n",
                load_average(),
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ));
            let done = Done {
                markdown,
                took: t0.elapsed(),
                commit: report::commit(),
            };
            std::fs::write(&kept, done.to_file())?;
            sections.push(done);
        } else if let Some(done) = std::fs::read_to_string(&kept)
            .ok()
            .and_then(|t| Done::from_file(&t))
        {
            // A section run earlier (`--only`): its kept Markdown, as it was generated.
            sections.push(done);
        }
    }
    let doc = report::document(&args, wall_start, &sections);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_kept_section_reads_back_as_written() {
        let done = Done {
            markdown: "## 1. x\n\n| a |\n".into(),
            took: Duration::from_millis(61_500),
            commit: "e4c5c3f-dirty".into(),
        };
        let back = Done::from_file(&done.to_file()).unwrap();
        assert_eq!(back.markdown, done.markdown);
        assert_eq!(back.took, done.took);
        assert_eq!(back.commit, done.commit);
        assert!(Done::from_file("## 1. typed by hand\n").is_none());
        // Kept by a run that did not record its commit: unknown, not this run's.
        let old = Done::from_file("<!-- took (s): 2.0 -->\n## 1. x\n").unwrap();
        assert_eq!((old.commit.as_str(), old.took.as_secs()), ("?", 2));
    }
}
