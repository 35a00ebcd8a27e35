//! `vmha events [--limit N] [--follow]`: the event log, one line per state change with its
//! reason, times in local `HH:MM:SS.mmm`; a controller's event names the host it ran on
//! (`controller@kvm1`). `--json` prints vmhad's NDJSON lines (with `host`, `seq` — numbered
//! per host — and `text`). With `--follow` it keeps printing new events until interrupted (the
//! timeout bounds only connecting and the stream's start); if vmhad closes the stream (it
//! stopped) that is a failure, exit 1.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use vmha_api::EventLine;

use crate::client::Client;
use crate::output::Output;
use crate::render::Render;

/// Arguments of `vmha events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// How many of the latest events to print first (0–10000).
    #[arg(long, short = 'n', default_value_t = 50, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    limit: u32,
    /// Keep printing new events as they happen, until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    #[command(flatten)]
    out: Output,
}

/// Prints the events; returns when the log (or, with `--follow`, the stream) ends.
pub fn run(client: &Client, args: &EventsArgs) -> anyhow::Result<ExitCode> {
    let mut path = format!("/v1/events?limit={}", args.limit);
    if args.follow {
        path.push_str("&follow=true");
    }
    let render = Render::local();
    let mut stdout = std::io::stdout().lock();
    let mut failed: Option<anyhow::Error> = None;
    let each = |line: serde_json::Value| {
        let text = if args.out.json {
            Ok(line.to_string())
        } else {
            serde_json::from_value::<EventLine>(line)
                .map(|e| render.event_line(&e))
                .map_err(|e| anyhow::anyhow!("unexpected event from vmhad: {e}"))
        };
        let written = text.and_then(|t| writeln!(stdout, "{t}").map_err(anyhow::Error::from));
        match written {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    };
    // A followed stream may stay quiet for hours: only its start is bounded by the timeout.
    if args.follow {
        client.follow(&path, each)?;
    } else {
        client.stream(&path, each)?;
    }
    match failed {
        Some(e) => Err(e),
        // A followed stream only ends when vmhad closes it (it stopped, or restarted).
        None if args.follow => anyhow::bail!("vmhad closed the event stream"),
        None => Ok(ExitCode::SUCCESS),
    }
}
