//! `vmhad`: the vmha host daemon.
//!
//! Loads the cluster configuration (refusing to start, touching nothing, if it is invalid),
//! opens the cluster store, adopts the VMs already running on this host, and then drives the
//! engine's agents — VM monitor, app monitors, decision agent and (when elected) the cluster
//! controller — executing their actions through the QEMU driver and serving the local API.
//! SIGTERM / SIGINT stop the daemon and leave the VMs running unless `--stop-vms-on-exit`.

mod api;
mod api_auth;
mod api_conn;
mod api_error;
mod api_io;
mod api_limit;
mod api_tcp;
mod api_web;
mod codec;
mod configure;
mod core;
mod daemon;
mod driver;
mod election;
mod executor;
mod fence;
mod files;
mod follow;
mod forward;
mod gen_docs;
mod guard;
mod guest;
mod guest_io;
mod host;
mod inbox;
mod lease;
#[cfg(feature = "libvirt")]
mod libvirt_slot;
mod metrics;
mod sd_notify;
mod slots;
mod vm_slot;
mod watch_polls;
mod watchdog;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmha_model::Config;

/// Command-line options of vmhad.
#[derive(Debug, Parser)]
#[command(
    name = "vmhad",
    version,
    about = "vmha host daemon",
    long_about = "vmha host daemon: watches this host's VMs and the applications inside them \
                  (through the QEMU guest agent), restarts apps, restarts VMs and, on a cluster, \
                  fails them over.\n\n\
                  It refuses an invalid configuration (exit 2). It adopts the VMs already \
                  running, so restarting vmhad restarts no VM. Signals: SIGTERM, SIGINT and \
                  SIGQUIT stop it and leave the VMs running (unless --stop-vms-on-exit); SIGHUP \
                  reloads the configuration file, validated first. Under systemd (Type=notify) \
                  it reports READY=1 once the VMs are adopted, RELOADING=1 and READY=1 around a \
                  reload, STOPPING=1, and pings the watchdog (WatchdogSec) while its core loop \
                  runs.\n\n\
                  Files: /etc/vmha/vmha.toml (configuration), /var/lib/vmha (embedded store, API \
                  socket vmhad.sock), /run/vmha (QMP/QGA sockets, pidfiles and console logs of \
                  the VMs). The CLI is vmha(1); logs go to stderr (VMHA_LOG=debug for more)."
)]
pub struct Options {
    /// The cluster configuration file (TOML).
    #[arg(long, short = 'c', default_value = "/etc/vmha/vmha.toml")]
    pub config: PathBuf,
    /// Which `[[host]]` of the configuration this daemon is (default: the only host, or the
    /// one named like this machine's hostname).
    #[arg(long)]
    pub host: Option<String>,
    /// Overrides `cluster.state_dir` (embedded store, API socket).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Overrides `cluster.runtime_dir` (QMP/QGA sockets, pidfiles, console logs).
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Lets this group use the API socket (mode 0660 with this group; a state dir created by
    /// vmhad gets the group and mode 0710). Without it, only vmhad's user (root) may.
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// Stop this host's VMs gracefully when the daemon exits (default: leave them running).
    #[arg(long)]
    pub stop_vms_on_exit: bool,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMHA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // Before any thread and any file: nothing vmhad creates may depend on the inherited umask.
    files::private_umask();
    if std::env::args().nth(1).as_deref() == Some(guard::FLAG) {
        return guard::run();
    }
    if let Some(code) = gen_docs::run_if_asked() {
        return code;
    }
    let options = Options::parse();
    init_logging(options.log_format);
    api_conn::raise_open_file_limit();
    let config = match vmha_model::file::read_text(&options.config).and_then(|text| {
        Config::from_toml_str_for(
            &text,
            &options.config.display().to_string(),
            driver::DRIVERS,
        )
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmhad: invalid configuration, not starting:\n{e}");
            return ExitCode::from(2);
        }
    };
    let host = match host::select(&config, options.host.as_deref()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("vmhad: {e}");
            return ExitCode::from(2);
        }
    };
    let api_group = match options
        .api_group
        .as_deref()
        .map(files::api_group)
        .transpose()
    {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vmhad: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmhad: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(config, host, options, api_group)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("vmhad stopped: {e:#}");
            eprintln!("vmhad: {e:#}");
            ExitCode::FAILURE
        }
    }
}
