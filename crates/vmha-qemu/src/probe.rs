//! Batched app probes: every check of one VM in ONE guest round trip.
//!
//! [`QgaClient::probe`] runs a single `guest-exec` of `/bin/sh -c <program>` in which every
//! check runs in parallel under the guest's `timeout` (busybox or coreutils), with stdin, stdout
//! and stderr on `/dev/null`, and the shell prints one status line per check. The cost per VM per
//! period is one exec plus its status polls, whatever the number of checks; in the guest, each
//! check costs two processes (`timeout` and the check: the shell starts `timeout` as a plain
//! background job and collects each status with `wait PID`, no subshell per check).
//!
//! Exit status mapping (shell convention): `0` → running; `124` (coreutils) or `143` (busybox,
//! killed by the `TERM` of `timeout`) → timed out; `129..=192` → killed by signal `status − 128`;
//! anything else → not running with that code. So a check that dies of `SIGTERM` by itself is
//! reported as timed out, and one that exits with a code above 128 as a signal death. A check
//! that ignores `SIGTERM` holds the whole probe until the exec deadline (busybox `timeout` has
//! no kill-after), which then fails the probe as a whole.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vmha_model::{ExitStatus, Name, ProbeCheck, ProbeOutcome, Unreadable};

use crate::qga::{ExecRequest, QgaClient, QgaError};

/// Errors of a whole probe (the guest channel failed); per-check problems are
/// [`ProbeOutcome::Unreadable`] instead.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The guest channel failed or timed out.
    #[error("probe failed on the guest channel: {0}")]
    Channel(#[from] QgaError),
}

const MARK: &str = "vmha-probe";
const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest `guest-exec-status` reply line a probe accepts.
const PROBE_REPLY_LINE: usize = 64 << 10;

/// Quotes one argument for a POSIX shell: `'…'` with each `'` written as `'\''`.
fn shell_quote(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Seconds for `timeout`, with millisecond precision and no exponent.
fn seconds(d: Duration) -> String {
    let d = d.max(MIN_TIMEOUT);
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}", ms / 1000)
    } else {
        format!("{}.{:03}", ms / 1000, ms % 1000)
    }
}

fn valid_argv(argv: &[String]) -> bool {
    !argv.is_empty() && argv.iter().all(|a| !a.contains('\0'))
}

/// Builds the shell program for `checks`; status lines carry `nonce` so nothing else can forge
/// them by accident.
pub fn build_program(checks: &[ProbeCheck], nonce: u64) -> String {
    let mut p = format!(
        "command -v timeout >/dev/null 2>&1 || {{ echo '{MARK} {nonce} none'; exit 0; }}\n"
    );
    let mut started = Vec::new();
    for (i, check) in checks.iter().enumerate() {
        if !valid_argv(&check.argv) {
            continue;
        }
        let argv: Vec<String> = check.argv.iter().map(|a| shell_quote(a)).collect();
        p.push_str(&format!(
            "timeout -s TERM {} {} </dev/null >/dev/null 2>&1 & p{i}=$!\n",
            seconds(check.timeout),
            argv.join(" ")
        ));
        started.push(i);
    }
    for i in started {
        p.push_str(&format!("wait $p{i}; echo \"{MARK} {nonce} {i} $?\"\n"));
    }
    p
}

fn classify(status: u32) -> ProbeOutcome {
    match status {
        0 => ProbeOutcome::Running,
        124 | 143 => ProbeOutcome::TimedOut,
        129..=192 => ProbeOutcome::NotRunning(ExitStatus::Signal((status - 128) as i32)),
        code => ProbeOutcome::NotRunning(ExitStatus::Code(code.min(255) as i32)),
    }
}

/// Parses the probe's stdout into one outcome per check, with its app, in the order of the
/// checks. Lines that are not well-formed status lines for this nonce are ignored; the first
/// line for an index wins; a check without a line is [`Unreadable::Missing`]. Total over
/// arbitrary bytes.
pub fn parse_output(checks: &[ProbeCheck], nonce: u64, stdout: &[u8]) -> Vec<(Name, ProbeOutcome)> {
    let mut results: Vec<Option<ProbeOutcome>> = checks
        .iter()
        .map(|c| {
            (!valid_argv(&c.argv)).then_some(ProbeOutcome::Unreadable(Unreadable::InvalidArgv))
        })
        .collect();
    let nonce = nonce.to_string();
    for line in stdout.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let mut words = line.split(' ');
        if words.next() != Some(MARK) || words.next() != Some(nonce.as_str()) {
            continue;
        }
        let (Some(index), status, None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if index == "none" && status.is_none() {
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(ProbeOutcome::Unreadable(Unreadable::NoTimeoutCommand));
            }
            continue;
        }
        let (Ok(index), Some(Ok(status))) = (index.parse::<usize>(), status.map(str::parse::<u32>))
        else {
            continue;
        };
        if let Some(slot @ None) = results.get_mut(index) {
            *slot = Some(classify(status));
        }
    }
    checks
        .iter()
        .zip(results)
        .map(|(c, r)| {
            (
                c.app.clone(),
                r.unwrap_or(ProbeOutcome::Unreadable(Unreadable::Missing)),
            )
        })
        .collect()
}

/// The first status poll of a probe: three quarters of how long the last one took (so a
/// steady guest is asked about once or twice per probe), within 2..=500 ms; `None` while
/// nothing is known.
fn first_poll(last_ms: u64) -> Option<Duration> {
    (last_ms > 0).then(|| Duration::from_millis((last_ms.saturating_mul(3) / 4).clamp(2, 500)))
}

impl QgaClient {
    /// Runs every check in ONE `guest-exec` and returns one outcome per check, with its app,
    /// in order. The whole probe is bounded by the longest check timeout plus `slack` (channel
    /// round trips); a channel failure fails the probe, a per-check problem only that check's
    /// outcome.
    pub async fn probe(
        &self,
        checks: &[ProbeCheck],
        slack: Duration,
    ) -> Result<Vec<(Name, ProbeOutcome)>, ProbeError> {
        let (mut request, nonce) = probe_request(checks, slack);
        request.first_poll = first_poll(self.probe_ms.load(Ordering::Relaxed));
        let started = std::time::Instant::now();
        let output = self.exec(&request).await?;
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.probe_ms.store(took, Ordering::Relaxed);
        Ok(parse_output(checks, nonce, &output.stdout))
    }
}

/// The one `guest-exec` that runs every check (see [`build_program`]) and the nonce its status
/// lines carry (for [`parse_output`]): bounded by the longest check timeout plus `slack`, with
/// output and reply line capped to what the status lines need. Every driver's probe is this
/// request.
pub fn probe_request(checks: &[ProbeCheck], slack: Duration) -> (ExecRequest, u64) {
    let nonce = crate::qga::random_id();
    let longest = checks
        .iter()
        .map(|c| c.timeout.max(MIN_TIMEOUT))
        .max()
        .unwrap_or_default();
    let mut request = ExecRequest::new(["/bin/sh", "-c", &build_program(checks, nonce)]);
    request.deadline = longest + slack;
    request.output_cap = 64 + checks.len() * 64;
    // Its output is a few short status lines: a bigger reply can only come from a hostile
    // guest, and is refused before it costs memory.
    request.max_reply_line = PROBE_REPLY_LINE;
    (request, nonce)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    /// The outcomes of [`parse_output`] without their apps.
    fn outcomes(checks: &[ProbeCheck], nonce: u64, stdout: &[u8]) -> Vec<ProbeOutcome> {
        parse_output(checks, nonce, stdout)
            .into_iter()
            .map(|(_, o)| o)
            .collect()
    }

    fn check(name: &str, argv: &[&str]) -> ProbeCheck {
        ProbeCheck {
            app: Name::new(name).unwrap(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn quotes_hostile_arguments() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$(reboot)`x`;\n"), "'$(reboot)`x`;\n'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn quoted_arguments_round_trip_through_sh() {
        let arg = "a'b\"c $HOME `id` \\ \n;|&*?";
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(arg)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), arg);
    }

    #[test]
    fn first_poll_follows_the_last_probe_within_bounds() {
        assert_eq!(first_poll(0), None);
        assert_eq!(first_poll(1), Some(Duration::from_millis(2)));
        assert_eq!(first_poll(200), Some(Duration::from_millis(150)));
        assert_eq!(first_poll(u64::MAX / 2), Some(Duration::from_millis(500)));
    }

    #[test]
    fn seconds_formatting() {
        assert_eq!(seconds(Duration::from_secs(2)), "2");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.500");
        assert_eq!(seconds(Duration::ZERO), "0.100");
    }

    #[test]
    fn parses_statuses_and_marks_missing() {
        let checks = vec![
            check("a", &["true"]),
            check("b", &["false"]),
            check("c", &["sleep", "9"]),
            check("d", &["x"]),
            check("e", &["y"]),
            check("f", &[]),
        ];
        let out = b"vmha-probe 7 1 1\nvmha-probe 7 0 0\nvmha-probe 7 2 124\nvmha-probe 7 3 137\n\
                    vmha-probe 8 4 0\nvmha-probe 7 4 zz\nvmha-probe 7 0 5\nvmha-probe 7 5 0\n\xff\xfe\n";
        let got = outcomes(&checks, 7, out);
        assert_eq!(
            got,
            vec![
                ProbeOutcome::Running,
                ProbeOutcome::NotRunning(ExitStatus::Code(1)),
                ProbeOutcome::TimedOut,
                ProbeOutcome::NotRunning(ExitStatus::Signal(9)),
                ProbeOutcome::Unreadable(Unreadable::Missing),
                ProbeOutcome::Unreadable(Unreadable::InvalidArgv),
            ]
        );
    }

    #[test]
    fn no_timeout_command_marks_all_unknown() {
        let checks = vec![check("a", &["true"])];
        let got = parse_output(&checks, 1, b"vmha-probe 1 none\n");
        assert_eq!(
            got[0].1,
            ProbeOutcome::Unreadable(Unreadable::NoTimeoutCommand)
        );
    }

    #[test]
    fn program_runs_each_valid_check_once_in_background() {
        let checks = vec![check("a", &["true"]), check("b", &[]), check("c", &["a b"])];
        let p = build_program(&checks, 3);
        assert_eq!(p.matches(" & p").count(), 2);
        assert!(p.contains("timeout -s TERM 1 'a b' </dev/null >/dev/null 2>&1 & p2=$!\n"));
        assert!(!p.contains('('), "no subshell per check:\n{p}");
        assert!(p.ends_with("wait $p2; echo \"vmha-probe 3 2 $?\"\n"), "{p}");
    }

    #[test]
    fn program_runs_under_host_shell() {
        let checks = vec![
            check("t", &["true"]),
            check("f", &["false"]),
            check("c", &["sh", "-c", "exit 3"]),
            check("k", &["sh", "-c", "kill -9 $$"]),
            ProbeCheck {
                timeout: Duration::from_millis(200),
                ..check("s", &["sleep", "5"])
            },
        ];
        // The host's sh (dash), and busybox's ash with its own applets as in the test guest
        // (busybox-static is a test dependency).
        let busybox = tempfile::tempdir().unwrap();
        for applet in ["sh", "timeout", "true", "false", "sleep"] {
            std::os::unix::fs::symlink("/bin/busybox", busybox.path().join(applet)).unwrap();
        }
        let shells = [
            (Path::new("/bin/sh").to_path_buf(), None),
            (busybox.path().join("sh"), Some(busybox.path())),
        ];
        for (shell, path) in shells {
            let mut cmd = std::process::Command::new(&shell);
            cmd.arg("-c").arg(build_program(&checks, 42));
            if let Some(dir) = path {
                cmd.env("PATH", dir);
            }
            let out = cmd.output().unwrap();
            let got = outcomes(&checks, 42, &out.stdout);
            assert_eq!(
                got,
                vec![
                    ProbeOutcome::Running,
                    ProbeOutcome::NotRunning(ExitStatus::Code(1)),
                    ProbeOutcome::NotRunning(ExitStatus::Code(3)),
                    ProbeOutcome::NotRunning(ExitStatus::Signal(9)),
                    ProbeOutcome::TimedOut,
                ],
                "under {}",
                shell.display()
            );
        }
    }
}
