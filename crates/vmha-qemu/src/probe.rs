//! Batched app probes: every check of one VM in ONE guest round trip.
//!
//! [`QgaClient::probe`] runs a single `guest-exec` of `/bin/sh -c <program>` in which every
//! check runs in parallel as a plain background job (stdin, stdout and stderr on `/dev/null`)
//! and the shell prints one status line per check, collected with `wait PID` (no subshell per
//! check). The cost per VM per period is one exec plus its status polls, whatever the number
//! of checks; in the guest, each check costs its own process and nothing more.
//!
//! A check that outlasts its timeout gets `TERM`, and so do its descendants, found in
//! `/proc/PID/task/PID/children` (all with builtins: a timed-out check script does not leave
//! its children behind). Who sends it:
//! - **vmhad**, once the guest showed it has those `/proc` files and when every check has the
//!   same timeout (the usual case): if the probe still runs when the timeout has passed, vmhad
//!   runs a second, short `guest-exec` (the killer) that ends the probe's children. A probe
//!   that ends in time starts no process beyond its checks: on a TCG guest the in-guest timers
//!   cost about a quarter of the guest CPU of a probe of three checks.
//! - **a timer in the guest** otherwise (the first probe, guests without those files, checks
//!   with different timeouts, the libvirt driver's [`probe_request`]): one per distinct check
//!   timeout, a subshell running `sleep` that, if it is not cancelled first, ends every check
//!   of its timeout still running. Running `timeout` per check instead cost twice the guest's
//!   CPU (an exec per check). The timer sends `TERM` only to a pid that `/proc/PID/stat` shows
//!   is still a child of the probe's shell (never to a reused pid); in a guest without `/proc`
//!   it sends it to the check's pid as `timeout` would.
//!
//! Exit status mapping (shell convention): `0` → running; `124` → timed out (the shell reports
//! that for a check that died of the timer's `TERM`; for vmhad's, a check whose pid the killer
//! reports); `129..=192` → killed by signal `status − 128`; anything else → not running with
//! that code. A check that ignores `SIGTERM` holds the whole probe until the exec deadline,
//! which then fails the probe as a whole.

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

/// The check `argv` as one shell command line (each argument quoted), if it is a valid one.
pub(crate) fn command_line(argv: &[String]) -> Option<String> {
    valid_argv(argv).then(|| {
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// Seconds for `sleep`, with millisecond precision and no exponent.
pub(crate) fn seconds(d: Duration) -> String {
    let d = d.max(MIN_TIMEOUT);
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}", ms / 1000)
    } else {
        format!("{}.{:03}", ms / 1000, ms % 1000)
    }
}

/// Whole seconds for a `sleep` without fractions (old busybox builds), rounded up.
pub(crate) fn whole_seconds(d: Duration) -> u128 {
    d.max(MIN_TIMEOUT).as_millis().div_ceil(1000)
}

fn valid_argv(argv: &[String]) -> bool {
    !argv.is_empty() && argv.iter().all(|a| !a.contains('\0'))
}

/// `vt PID` reads PID's children before it sends `TERM` to it (they are reparented once it
/// dies), then does the same for each child: builtins only.
pub(crate) const VT_FN: &str = "vt() { c=; read -r c </proc/$1/task/$1/children; kill -TERM $1; for d in $c; do vt $d; done; }\n";

/// The in-guest timer's other function, builtins only. `vk PARENT PID...` sends `TERM` to each
/// PID that `/proc` shows running as a child of PARENT (every PID when `/proc` is not mounted),
/// with its descendants ([`VT_FN`]).
pub(crate) const VK_FN: &str = "\
vk() { vq=$1; shift; for q; do
if [ -d /proc/$vq ]; then read -r l </proc/$q/stat || continue; s=${l##*) }; st=${s%% *}; s=${s#* }
[ \"$st\" != Z ] && [ \"${s%% *}\" = \"$vq\" ] || continue; fi; vt $q; done; }
";

/// The start of every probe program and one background job per valid check (`p{i}` holds
/// its pid); returns the program so far and the valid checks' indexes grouped by timeout.
fn launch(
    checks: &[ProbeCheck],
    nonce: u64,
    needs_sleep: bool,
) -> (String, Vec<(Duration, Vec<usize>)>) {
    // Nothing reads the shell's stderr (its "Terminated" notes on timed-out checks).
    let mut p = String::from("exec 2>/dev/null\n");
    if needs_sleep {
        p.push_str(&format!(
            "command -v sleep >/dev/null || {{ echo '{MARK} {nonce} none'; exit 0; }}\n"
        ));
    }
    p.push_str("read -r vt0 _ </proc/uptime\n");
    let mut groups: Vec<(Duration, Vec<usize>)> = Vec::new();
    for (i, check) in checks.iter().enumerate() {
        let Some(command) = command_line(&check.argv) else {
            continue;
        };
        p.push_str(&format!("{command} </dev/null >/dev/null 2>&1 & p{i}=$!\n"));
        let timeout = check.timeout.max(MIN_TIMEOUT);
        match groups.iter_mut().find(|(t, _)| *t == timeout) {
            Some((_, members)) => members.push(i),
            None => groups.push((timeout, vec![i])),
        }
    }
    (p, groups)
}

/// The end of every probe program: how long it ran in the guest (`parse_took`, for the next
/// probe's first status poll) and whether the guest shows a process's children in `/proc`
/// (`kids`: the next probe can be timed by vmhad, [`host_timeout`]).
fn finish(p: &mut String, nonce: u64) {
    p.push_str(&format!(
        "read -r vt1 _ </proc/uptime && echo \"{MARK} {nonce} took $vt0 $vt1\"\n\
         [ -r /proc/$$/task/$$/children ] && echo \"{MARK} {nonce} kids\"\n"
    ));
}

/// Builds the shell program for `checks`, timed out by timers in the guest;
/// status lines carry `nonce` so nothing else can forge them by accident.
pub fn build_program(checks: &[ProbeCheck], nonce: u64) -> String {
    let (mut p, groups) = launch(checks, nonce, true);
    if groups.is_empty() {
        return p;
    }
    p.push_str(VT_FN);
    p.push_str(VK_FN);
    for (g, (timeout, members)) in groups.iter().enumerate() {
        let pids: Vec<String> = members.iter().map(|i| format!("$p{i}")).collect();
        // Exit 0: it fired. Stopped by the shell's TERM (143, its `sleep` with it): the
        // checks ended in time. A `sleep` without fractions fails at once: whole seconds. The
        // trap notes the TERM (traps run between commands) and kills the `sleep` once `w` is
        // set: a TERM before that is seen before waiting, one between that test and `wait`
        // ends the `sleep` it would wait for (without the kill, about one cancel in a thousand
        // held the probe for the whole timeout). `KILL`: a `TERM` between fork and exec is lost.
        p.push_str(&format!(
            "(x=; w=; trap 'x=1; [ -z \"$w\" ] || kill -9 $w' TERM; \
             sleep {} & w=$!; [ -n \"$x\" ] || wait $w; r=$?\n\
             if [ -z \"$x\" ] && [ $r != 0 ]; then sleep {} & w=$!; [ -n \"$x\" ] || wait $w; r=$?; fi\n\
             [ -n \"$x\" ] && {{ kill -9 $w; exit 143; }}; [ $r = 0 ] || exit 1\n\
             trap '' TERM; [ -n \"$x\" ] && exit 143; vk $$ {}; exit 0) \
             </dev/null >/dev/null 2>&1 & k{g}=$!\n",
            seconds(*timeout),
            whole_seconds(*timeout),
            pids.join(" ")
        ));
    }
    for (g, (_, members)) in groups.iter().enumerate() {
        for i in members {
            p.push_str(&format!("wait $p{i}; s{i}=$?\n"));
        }
        // A check that died of the fired timer's TERM timed out.
        let fired: Vec<String> = members
            .iter()
            .map(|i| format!("[ $s{i} = 143 ] && s{i}=124;"))
            .collect();
        p.push_str(&format!(
            "kill $k{g} 2>/dev/null; wait $k{g} && {{ {} }}\n",
            fired.join(" ")
        ));
        for i in members {
            p.push_str(&format!("echo \"{MARK} {nonce} {i} $s{i}\"\n"));
        }
    }
    finish(&mut p, nonce);
    p
}

/// Builds the shell program for `checks` when vmhad times them out ([`host_timeout`]): no
/// timer in the guest, and each check's pid on a line of its own (`parse_pids`), so that the
/// checks the [`killer`] ended are told from ones that died of a `TERM` of their own.
fn build_host_timed_program(checks: &[ProbeCheck], nonce: u64) -> String {
    let (mut p, groups) = launch(checks, nonce, false);
    for (_, members) in &groups {
        for i in members {
            p.push_str(&format!(
                "wait $p{i}; s{i}=$?\necho \"{MARK} {nonce} {i} $s{i}\"\n\
                 echo \"{MARK} {nonce} pid {i} $p{i}\"\n"
            ));
        }
    }
    finish(&mut p, nonce);
    p
}

/// The killer of a probe timed by vmhad, run as `sh -c KILLER vmha-kill NONCE PID`: it sends
/// `TERM` to every child of PID (the probe's checks) that still runs, with its descendants
/// ([`VT_FN`]), and prints `vmha-probe NONCE killed CHILD` for each, builtins only; a check
/// that has ended (a zombie the probe has not reaped yet) keeps its own status and is not
/// named. It does nothing unless PID runs (no zombie) as a child of its own parent, the
/// agent. The agent starts processes only for vmhad's requests, which one VM's client sends
/// one at a time, so a PID reused since the probe ended is not the agent's child (`pid_max`
/// forks would have to happen in between).
fn killer() -> String {
    format!(
        "exec 2>/dev/null\n{VT_FN}\
         read -r l </proc/$2/stat || exit 0\n\
         s=${{l##*) }}; [ \"${{s%% *}}\" != Z ] || exit 0; s=${{s#* }}; [ \"${{s%% *}}\" = \"$PPID\" ] || exit 0\n\
         c=; read -r c </proc/$2/task/$2/children\n\
         for k in $c; do read -r l </proc/$k/stat || continue; s=${{l##*) }}; [ \"${{s%% *}}\" != Z ] || continue\n\
         echo \"{MARK} $1 killed $k\"; vt $k; done\n"
    )
}

/// A `/proc/uptime` reading (`SECONDS.CC`) in centiseconds.
fn uptime_cs(text: &str) -> Option<u64> {
    let (whole, cs) = text.split_once('.')?;
    let digits = |t: &str, max: usize| {
        !t.is_empty() && t.len() <= max && t.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(whole, 12) || !digits(cs, 2) {
        return None;
    }
    let cs: u64 = format!("{cs:0<2}").parse().ok()?;
    whole.parse::<u64>().ok()?.checked_mul(100)?.checked_add(cs)
}

/// How long the probe ran in the guest: its `took` line (two `/proc/uptime` readings, 10 ms
/// resolution), at most a minute; `None` without a well-formed line for this nonce (a guest
/// without `/proc`, or one that lies: it can only move its own probes' first poll, within
/// bounds). Total over arbitrary bytes.
pub fn parse_took(nonce: u64, stdout: &[u8]) -> Option<Duration> {
    marked(nonce, stdout).find_map(|mut words| {
        let (Some("took"), Some(t0), Some(t1), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return None;
        };
        let cs = uptime_cs(t1)?.checked_sub(uptime_cs(t0)?)?;
        (cs <= 6_000).then(|| Duration::from_millis(cs * 10))
    })
}

/// The words after `vmha-probe NONCE` of each line of `stdout` that starts so (a line that is
/// not UTF-8 is skipped). Total over arbitrary bytes.
fn marked(nonce: u64, stdout: &[u8]) -> impl Iterator<Item = std::str::Split<'_, char>> {
    let nonce = nonce.to_string();
    stdout.split(|&b| b == b'\n').filter_map(move |line| {
        let mut words = std::str::from_utf8(line).ok()?.split(' ');
        (words.next() == Some(MARK) && words.next() == Some(nonce.as_str())).then_some(words)
    })
}

/// Whether the probe's guest shows a process's children in `/proc` (its `kids` line).
fn parse_kids(nonce: u64, stdout: &[u8]) -> bool {
    marked(nonce, stdout).any(|mut words| words.next() == Some("kids") && words.next().is_none())
}

/// A guest pid as the probe or the killer printed it: `1..=i32::MAX`, digits only.
fn guest_pid(word: &str) -> Option<u32> {
    if word.is_empty() || word.len() > 10 || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse::<u32>()
        .ok()
        .filter(|pid| (1..=i32::MAX as u32).contains(pid))
}

/// The pid of each of `count` checks as a probe timed by vmhad printed them (`pid I PID`
/// lines; the first per index wins). Total over arbitrary bytes.
fn parse_pids(nonce: u64, count: usize, stdout: &[u8]) -> Vec<Option<u32>> {
    let mut pids = vec![None; count];
    for mut words in marked(nonce, stdout) {
        let (Some("pid"), Some(index), Some(pid), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        if let (Ok(index), Some(pid)) = (index.parse::<usize>(), guest_pid(pid))
            && let Some(slot @ None) = pids.get_mut(index)
        {
            *slot = Some(pid);
        }
    }
    pids
}

/// The pids the [`killer`] sent `TERM` to (its `killed PID` lines). Total over arbitrary
/// bytes; as many as its capped output holds.
fn parse_killed(nonce: u64, stdout: &[u8]) -> Vec<u32> {
    marked(nonce, stdout)
        .filter_map(
            |mut words| match (words.next(), words.next(), words.next()) {
                (Some("killed"), Some(pid), None) => guest_pid(pid),
                _ => None,
            },
        )
        .collect()
}

/// A check of a probe timed by vmhad that died of `TERM` (status 143) timed out if the killer
/// sent it that `TERM` (its pid is among `killed`); one that died of a `TERM` of its own did not.
fn timed_out_by_killer(
    outcomes: &mut [(Name, ProbeOutcome)],
    pids: &[Option<u32>],
    killed: &[u32],
) {
    for ((_, outcome), pid) in outcomes.iter_mut().zip(pids) {
        if *outcome == ProbeOutcome::NotRunning(ExitStatus::Signal(15))
            && pid.is_some_and(|pid| killed.contains(&pid))
        {
            *outcome = ProbeOutcome::TimedOut;
        }
    }
}

/// The one timeout of `checks` when vmhad times them out itself, else `None` (a timer in the
/// guest per distinct timeout): when the last probe's guest showed a process's children in
/// `/proc` (`kids`, which the [`killer`] needs) and every valid check has the same timeout
/// (the usual case; the killer cannot tell groups apart). A probe timed by vmhad starts no
/// process in the guest beyond its checks; in-guest timers cost a TCG guest about a quarter of
/// the CPU of a probe of three checks.
fn host_timeout(kids: bool, checks: &[ProbeCheck]) -> Option<Duration> {
    if !kids {
        return None;
    }
    let mut timeouts = checks
        .iter()
        .filter(|c| valid_argv(&c.argv))
        .map(|c| c.timeout.max(MIN_TIMEOUT));
    let first = timeouts.next()?;
    timeouts.all(|t| t == first).then_some(first)
}

/// The outcome a check's exit status (shell convention) means.
pub(crate) fn classify(status: u32) -> ProbeOutcome {
    match status {
        0 => ProbeOutcome::Running,
        124 => ProbeOutcome::TimedOut,
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
    for mut words in marked(nonce, stdout) {
        let (Some(index), status, None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if index == "none" && status.is_none() {
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(ProbeOutcome::Unreadable(Unreadable::NoSleepCommand));
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

/// Added to the checks' timeout when vmhad times them ([`host_timeout`]): its clock starts at
/// the agent's reply to the exec, the checks a little later, once the shell has started (a
/// timer in the guest starts after them).
const HOST_TIMER_MARGIN: Duration = Duration::from_millis(50);

/// Bounds of a probe's first status poll, µs.
const FIRST_POLL_US: std::ops::RangeInclusive<u64> = 2_000..=500_000;

/// Added to the probe's duration in the guest for the next first status poll: the uptime's
/// 10 ms resolution, the shell's start-up after the agent's reply, the agent seeing the exit.
const GUEST_MARGIN_US: u64 = 15_000;

/// When the next probe's first status poll comes (µs after its exec), when the guest told how
/// long this probe ran (`guest_us`, [`parse_took`]) and the one before (`previous_us`, 0 if it
/// did not): the longer of the two plus [`GUEST_MARGIN_US`], within [`FIRST_POLL_US`]. Checks
/// that got slower are followed at once, faster ones by the next probe but one (two samples
/// cover the usual spread), so most probes are read with ONE status poll (each poll costs the
/// guest an agent round trip, and vmhad a wake-up) and not much later than they end. An agent
/// held up outside the shell (a stall) does not move it.
fn first_poll_from_guest(guest_us: u64, previous_us: u64) -> u64 {
    guest_us
        .max(previous_us)
        .saturating_add(GUEST_MARGIN_US)
        .clamp(*FIRST_POLL_US.start(), *FIRST_POLL_US.end())
}

/// When the next probe's first status poll comes (µs after its exec) for a guest that does not
/// tell how long its probes run (no `/proc/uptime`), after a probe whose first poll came
/// `first_us` after its exec (0: none was timed yet), that took `took_us` and needed `polls`
/// status polls. It tracks the probe's duration from above, so that most probes are read with
/// one poll:
/// - not known yet: three quarters of this probe's duration;
/// - the probe had ended at its first poll: 3 % sooner;
/// - it had not: 25 % later.
///
/// It settles where about one probe in nine needs a second poll (0.25 p = 0.03 (1 − p) at
/// p ≈ 11 %); one probe held up (a stalled agent, a busy host) moves it by 25 % only, where
/// following each probe's duration made the next ones wait (a 5 s stall, ten probes waiting
/// 500, 400, 300… ms before their first poll). Within [`FIRST_POLL_US`].
fn next_first_poll(first_us: u64, took_us: u64, polls: u32) -> u64 {
    let next = if first_us == 0 {
        took_us / 4 * 3
    } else if polls <= 1 {
        first_us - first_us * 3 / 100
    } else {
        first_us.saturating_add(first_us / 4)
    };
    next.clamp(*FIRST_POLL_US.start(), *FIRST_POLL_US.end())
}

/// Probes are timed apart by their number of checks, up to this many (a larger probe counts as
/// this many): on a guest with few CPUs a probe's checks share them, so one check alone (an app
/// its watcher saw die, an app just started) ends well before the VM's usual batch, and its
/// first status poll must not wait for the batch's time.
pub(crate) const PROBE_SIZES: usize = 4;

/// The timing slot of a probe of `checks` checks.
fn size_slot(checks: usize) -> usize {
    checks.clamp(1, PROBE_SIZES) - 1
}

/// The first status poll (µs after the exec, 0 = not known) of a probe in slot `size`, from
/// the slots' times `known`: its own, else the nearest smaller size's (a smaller probe ends
/// sooner: an early first poll costs one more poll, a late one costs detection time), else
/// none (polls from `poll_initial`, doubling).
fn first_poll_for(known: &[u64; PROBE_SIZES], size: usize) -> u64 {
    known
        .get(..=size)
        .unwrap_or(known)
        .iter()
        .rev()
        .copied()
        .find(|&us| us > 0)
        .unwrap_or(0)
}

impl QgaClient {
    /// Runs every check in ONE `guest-exec` and returns one outcome per check, with its app,
    /// in order. The whole probe is bounded by the longest check timeout plus `slack` (channel
    /// round trips); a channel failure fails the probe, a per-check problem only that check's
    /// outcome. Checks that outlast their timeout get `TERM` with their descendants, from a
    /// timer in the guest or, once the guest showed what that needs, from vmhad
    /// ([`host_timeout`]: then the probe starts no process beyond its checks).
    pub async fn probe(
        &self,
        checks: &[ProbeCheck],
        slack: Duration,
    ) -> Result<Vec<(Name, ProbeOutcome)>, ProbeError> {
        let host = host_timeout(self.proc_children.load(Ordering::Relaxed), checks);
        let nonce = crate::qga::random_id();
        let mut request = match host {
            Some(_) => exec_request(checks, slack, build_host_timed_program(checks, nonce), 128),
            None => exec_request(checks, slack, build_program(checks, nonce), 64),
        };
        let size = size_slot(checks.len());
        let known = self
            .first_poll_us
            .each_ref()
            .map(|a| a.load(Ordering::Relaxed));
        let first_us = first_poll_for(&known, size);
        request.first_poll = (first_us > 0).then(|| Duration::from_micros(first_us));
        let started = std::time::Instant::now();
        let alarm = host.map(|timeout| {
            (timeout + HOST_TIMER_MARGIN, move |pid| {
                self.kill_checks(nonce, pid, checks.len(), slack)
            })
        });
        let (output, polls, killed) = self.exec_polled(&request, alarm).await?;
        let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let guest_us = parse_took(nonce, &output.stdout)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let previous_us = self.probe_guest_us[size].swap(guest_us.unwrap_or(0), Ordering::Relaxed);
        let next = match guest_us {
            Some(guest_us) => first_poll_from_guest(guest_us, previous_us),
            None => next_first_poll(first_us, took_us, polls),
        };
        self.first_poll_us[size].store(next, Ordering::Relaxed);
        self.proc_children
            .store(parse_kids(nonce, &output.stdout), Ordering::Relaxed);
        let mut outcomes = parse_output(checks, nonce, &output.stdout);
        if let Some(killed) = killed {
            let pids = parse_pids(nonce, checks.len(), &output.stdout);
            timed_out_by_killer(&mut outcomes, &pids, &killed);
        }
        Ok(outcomes)
    }

    /// Runs the [`killer`] of the probe `pid` (a probe timed by vmhad whose checks outlast
    /// their timeout) within `deadline`; returns the pids it sent `TERM` to.
    async fn kill_checks(
        &self,
        nonce: u64,
        pid: i64,
        checks: usize,
        deadline: Duration,
    ) -> Result<Vec<u32>, QgaError> {
        let mut request = ExecRequest::new([
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            killer(),
            "vmha-kill".to_owned(),
            nonce.to_string(),
            pid.to_string(),
        ]);
        request.deadline = deadline;
        request.output_cap = 64 + checks * 64;
        request.max_reply_line = PROBE_REPLY_LINE;
        let output = self.exec(&request).await?;
        Ok(parse_killed(nonce, &output.stdout))
    }
}

/// The one `guest-exec` that runs every check, timed by timers in the guest (see
/// [`build_program`]), and the nonce its status lines carry (for [`parse_output`]): bounded by
/// the longest check timeout plus `slack`, with output and reply line capped to what the
/// status lines need. The probe of drivers that carry agent commands themselves (libvirt).
pub fn probe_request(checks: &[ProbeCheck], slack: Duration) -> (ExecRequest, u64) {
    let nonce = crate::qga::random_id();
    let request = exec_request(checks, slack, build_program(checks, nonce), 64);
    (request, nonce)
}

/// The `guest-exec` of a probe `program`: bounded by the longest check timeout plus `slack`,
/// its output capped to 128 bytes plus `per_check` a check (what its lines need).
fn exec_request(
    checks: &[ProbeCheck],
    slack: Duration,
    program: String,
    per_check: usize,
) -> ExecRequest {
    let longest = checks
        .iter()
        .map(|c| c.timeout.max(MIN_TIMEOUT))
        .max()
        .unwrap_or_default();
    let mut request = ExecRequest::new(["/bin/sh".to_owned(), "-c".to_owned(), program]);
    request.deadline = longest + slack;
    request.output_cap = 128 + checks.len() * per_check;
    // Its output is a few short status lines: a bigger reply can only come from a hostile
    // guest, and is refused before it costs memory.
    request.max_reply_line = PROBE_REPLY_LINE;
    request
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
    fn the_guest_tells_how_long_the_probe_ran() {
        let out = b"vmha-probe 5 0 0\nvmha-probe 5 took 100.25 100.31\n";
        assert_eq!(parse_took(5, out), Some(Duration::from_millis(60)));
        assert_eq!(parse_took(6, out), None);
        for bad in [
            "vmha-probe 5 took 100.31 100.25",
            "vmha-probe 5 took 1.5e3 1.6e3",
            "vmha-probe 5 took -1.00 2.00",
            "vmha-probe 5 took 1.00 2.00 3.00",
            "vmha-probe 5 took 1.00",
            "vmha-probe 5 took 1.00 9999.00",
            "vmha-probe 5 took 99999999999999.00 99999999999999.01",
            "vmha-probe 5 took . .",
            "vmha-probe 5 took 1.001 1.002",
        ] {
            assert_eq!(parse_took(5, bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(
            parse_took(5, b"vmha-probe 5 took 7.5 8.0"),
            Some(Duration::from_millis(500))
        );
        // A real shell writes it, and it does not disturb the status lines.
        let checks = vec![check("t", &["true"])];
        for (shell, got) in run_under_shells(&checks) {
            assert_eq!(got, vec![ProbeOutcome::Running], "{shell}");
        }
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(build_program(&checks, 42))
            .output()
            .unwrap();
        assert!(parse_took(42, &out.stdout).is_some_and(|d| d < Duration::from_secs(5)));
    }

    #[test]
    fn each_probe_size_has_its_own_first_poll() {
        assert_eq!(size_slot(0), 0);
        assert_eq!(size_slot(1), 0);
        assert_eq!(size_slot(3), 2);
        assert_eq!(size_slot(50), PROBE_SIZES - 1);
        let known = [40_000, 0, 90_000, 0];
        assert_eq!(first_poll_for(&known, 2), 90_000);
        assert_eq!(first_poll_for(&known, 0), 40_000);
        // Not timed yet: the nearest smaller size's time, never a larger one's.
        assert_eq!(first_poll_for(&known, 1), 40_000);
        assert_eq!(first_poll_for(&known, 3), 90_000);
        assert_eq!(first_poll_for(&[0, 0, 90_000, 0], 0), 0);
    }

    #[test]
    fn the_guest_duration_times_the_next_first_poll() {
        // The longer of the last two, plus the margin.
        assert_eq!(first_poll_from_guest(60_000, 0), 75_000);
        assert_eq!(first_poll_from_guest(40_000, 60_000), 75_000);
        assert_eq!(first_poll_from_guest(90_000, 60_000), 105_000);
        // Within bounds, whatever the guest says.
        assert_eq!(first_poll_from_guest(u64::MAX, 0), 500_000);
        assert_eq!(first_poll_from_guest(0, 0), 15_000);
    }

    #[test]
    fn the_first_poll_starts_from_the_first_probe_and_stays_within_bounds() {
        assert_eq!(next_first_poll(0, 200_000, 3), 150_000);
        assert_eq!(next_first_poll(0, 1_000, 1), 2_000);
        assert_eq!(next_first_poll(0, u64::MAX, 9), 500_000);
        assert_eq!(next_first_poll(2_000, 2_100, 1), 2_000);
        assert_eq!(next_first_poll(500_000, 600_000, 2), 500_000);
    }

    #[test]
    fn one_slow_probe_moves_the_first_poll_by_a_quarter_only() {
        // A 5 s stall (many polls): 25 % later, and probes read at once bring it back down.
        assert_eq!(next_first_poll(40_000, 5_000_000, 30), 50_000);
        let mut t = 50_000;
        for _ in 0..8 {
            t = next_first_poll(t, 45_000, 1);
        }
        assert!(t < 40_000, "{t}");
    }

    #[test]
    fn the_first_poll_settles_where_about_one_probe_in_nine_needs_a_second() {
        // Probe durations spread evenly over 40..=80 ms: the tracker settles near the 89th
        // percentile (about 76 ms), each probe read with 1.1 polls on average.
        let mut t = 0;
        let mut state = 7u64;
        let (mut probes, mut second_polls) = (0u32, 0u32);
        for i in 0..4_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let duration = 40_000 + (state >> 33) % 40_001;
            let polls = if t == 0 || duration > t { 2 } else { 1 };
            if i >= 1_000 {
                probes += 1;
                second_polls += u32::from(polls > 1);
            }
            t = next_first_poll(t, duration + 1_000, polls);
        }
        assert!((70_000..=80_000).contains(&t), "{t}");
        let share = f64::from(second_polls) / f64::from(probes);
        assert!((0.05..=0.2).contains(&share), "{share}");
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
    fn no_sleep_command_marks_all_unknown() {
        let checks = vec![check("a", &["true"])];
        let got = parse_output(&checks, 1, b"vmha-probe 1 none\n");
        assert_eq!(
            got[0].1,
            ProbeOutcome::Unreadable(Unreadable::NoSleepCommand)
        );
    }

    #[test]
    fn program_runs_each_valid_check_once_in_background() {
        let checks = vec![check("a", &["true"]), check("b", &[]), check("c", &["a b"])];
        let p = build_program(&checks, 3);
        assert_eq!(p.matches(" & p").count(), 2);
        assert!(
            p.contains("\n'a b' </dev/null >/dev/null 2>&1 & p2=$!\n"),
            "{p}"
        );
        assert_eq!(p.matches(" & k").count(), 1, "one timer per timeout:\n{p}");
        assert!(p.contains("echo \"vmha-probe 3 2 $s2\"\n"), "{p}");
        assert!(p.contains("echo \"vmha-probe 3 took $vt0 $vt1\"\n"), "{p}");
        assert!(p.ends_with("echo \"vmha-probe 3 kids\"\n"), "{p}");
    }

    #[test]
    fn one_timer_per_distinct_timeout() {
        let checks = vec![
            check("a", &["true"]),
            ProbeCheck {
                timeout: Duration::from_millis(300),
                ..check("b", &["true"])
            },
            check("c", &["true"]),
        ];
        let p = build_program(&checks, 3);
        assert_eq!(p.matches(" & k").count(), 2, "{p}");
        assert!(p.contains("exit 143; vk $$ $p0 $p2; exit 0)"), "{p}");
        assert!(p.contains("sleep 0.300 & w=$!;"), "{p}");
        assert!(p.contains("then sleep 1 & w=$!;"), "{p}");
    }

    /// The host's sh (dash) and busybox's ash with its own applets, as in the test guest
    /// (busybox-static is a test dependency): each shell and the `PATH` it runs with. The
    /// directory holds busybox's applets.
    fn shells() -> (
        tempfile::TempDir,
        Vec<(std::path::PathBuf, Option<std::path::PathBuf>)>,
    ) {
        let busybox = tempfile::tempdir().unwrap();
        for applet in ["sh", "true", "false", "sleep", "kill"] {
            std::os::unix::fs::symlink("/bin/busybox", busybox.path().join(applet)).unwrap();
        }
        let shells = vec![
            (Path::new("/bin/sh").to_path_buf(), None),
            (
                busybox.path().join("sh"),
                Some(busybox.path().to_path_buf()),
            ),
        ];
        (busybox, shells)
    }

    /// `shell -c program args...`, with `path` as its `PATH` if given.
    fn sh(
        shell: &Path,
        path: Option<&Path>,
        program: &str,
        args: &[&str],
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(shell);
        cmd.arg("-c").arg(program).args(args);
        if let Some(dir) = path {
            cmd.env("PATH", dir);
        }
        cmd
    }

    /// Runs `checks` under [`shells`]; returns the outcomes per shell.
    fn run_under_shells(checks: &[ProbeCheck]) -> Vec<(String, Vec<ProbeOutcome>)> {
        let (_dir, shells) = shells();
        shells
            .into_iter()
            .map(|(shell, path)| {
                let out = sh(&shell, path.as_deref(), &build_program(checks, 42), &[])
                    .output()
                    .unwrap();
                let got = outcomes(checks, 42, &out.stdout);
                (shell.display().to_string(), got)
            })
            .collect()
    }

    /// Whether `pid` runs (exists and is no zombie: the sandbox's init may reap late).
    fn running(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    }

    /// How many children of `pid` run (zombies not counted).
    fn running_children(pid: &str) -> usize {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter(|child| running(child))
            .count()
    }

    /// The pids `pids()` lists that still run after a grace period: a process killed by a
    /// signal dies only once it is scheduled, which takes a while on a loaded machine (the
    /// probe itself does not wait for its checks' descendants).
    fn still_running(pids: impl Fn() -> Vec<String>) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<String> = pids().into_iter().filter(|p| running(p)).collect();
            if left.is_empty() || std::time::Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_timed_out_check_leaves_no_descendants() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let script = format!(
            "sleep 30 & echo $! >>{0}; sh -c 'sleep 30 & echo $! >>{0}; wait' & wait",
            pids.display()
        );
        let checks = vec![
            ProbeCheck {
                timeout: Duration::from_millis(300),
                ..check("h", &["sh", "-c", &script])
            },
            check("t", &["true"]),
        ];
        for (shell, got) in run_under_shells(&checks) {
            assert_eq!(
                got,
                vec![ProbeOutcome::TimedOut, ProbeOutcome::Running],
                "under {shell}"
            );
        }
        // Two shells, each check started two sleeps.
        let started = std::fs::read_to_string(&pids).unwrap();
        assert_eq!(started.lines().count(), 4, "{started}");
        let left = still_running(|| started.lines().map(str::to_owned).collect());
        assert!(left.is_empty(), "left running: {left:?}");
    }

    #[test]
    fn a_probe_that_ends_in_time_leaves_no_timer_behind() {
        let checks = vec![ProbeCheck {
            timeout: Duration::from_millis(7_321),
            ..check("t", &["true"])
        }];
        for (shell, got) in run_under_shells(&checks) {
            assert_eq!(got, vec![ProbeOutcome::Running], "under {shell}");
        }
        let timers = still_running(|| {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| {
                    let pid = e.ok()?.file_name().into_string().ok()?;
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                    cmdline.ends_with(b"sleep\x007.321\x00").then_some(pid)
                })
                .collect()
        });
        assert!(timers.is_empty(), "timers left sleeping: {timers:?}");
    }

    /// The timer of a probe whose checks end while it starts up is cancelled at once, wherever
    /// the cancel lands: its body (no `vk`: it must not fire) run as a shell of its own gets
    /// `TERM` at random points of its first milliseconds, under dash and busybox's ash. Before
    /// the trap killed the `sleep`, about one cancel in a thousand landed between the test of
    /// `x` and `wait`, and the timer (the probe with it) waited out its whole timeout.
    #[test]
    fn a_timer_cancelled_while_it_starts_ends_at_once() {
        let checks = vec![ProbeCheck {
            timeout: Duration::from_secs(30),
            ..check("t", &["true"])
        }];
        let program = build_program(&checks, 1);
        let start = program.find("(x=").unwrap() + 1;
        let end = start + program[start..].find(") </dev/null").unwrap();
        let body = program[start..end].replace("vk $$ $p0;", "");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for shell in [&["/bin/sh"][..], &["busybox", "sh"][..]] {
            for _ in 0..2_000 {
                let mut timer = std::process::Command::new(shell[0])
                    .args(&shell[1..])
                    .arg("-c")
                    .arg(&body)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let delay = Duration::from_micros((state >> 33) % 2_000);
                let spin = std::time::Instant::now();
                while spin.elapsed() < delay {
                    std::hint::spin_loop();
                }
                let pid = nix::unistd::Pid::from_raw(i32::try_from(timer.id()).unwrap());
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
                let cancelled = std::time::Instant::now();
                timer.wait().unwrap();
                assert!(
                    cancelled.elapsed() < Duration::from_secs(10),
                    "{shell:?}: the timer waited out its sleep after a TERM {delay:?} into it"
                );
            }
        }
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
            // Dying of TERM by itself is a signal death, not a timeout.
            check("e", &["sh", "-c", "kill -TERM $$"]),
        ];
        for (shell, got) in run_under_shells(&checks) {
            assert_eq!(
                got,
                vec![
                    ProbeOutcome::Running,
                    ProbeOutcome::NotRunning(ExitStatus::Code(1)),
                    ProbeOutcome::NotRunning(ExitStatus::Code(3)),
                    ProbeOutcome::NotRunning(ExitStatus::Signal(9)),
                    ProbeOutcome::TimedOut,
                    ProbeOutcome::NotRunning(ExitStatus::Signal(15)),
                ],
                "under {shell}"
            );
        }
    }

    #[test]
    fn vmhad_times_the_checks_when_the_guest_shows_children_and_they_share_a_timeout() {
        let short = ProbeCheck {
            timeout: Duration::from_millis(300),
            ..check("s", &["true"])
        };
        let same = vec![
            check("a", &["true"]),
            check("b", &["false"]),
            check("x", &[]),
        ];
        assert_eq!(host_timeout(true, &same), Some(Duration::from_secs(1)));
        assert_eq!(host_timeout(false, &same), None);
        let mixed = vec![check("a", &["true"]), short.clone()];
        assert_eq!(host_timeout(true, &mixed), None);
        // A check without a valid argv runs nothing and is no group.
        let tiny = ProbeCheck {
            timeout: Duration::ZERO,
            ..check("x", &[])
        };
        assert_eq!(
            host_timeout(true, &[short, tiny]),
            Some(Duration::from_millis(300))
        );
        assert_eq!(host_timeout(true, &[check("x", &[])]), None);
        assert_eq!(host_timeout(true, &[]), None);
    }

    #[test]
    fn a_probe_timed_by_vmhad_starts_no_timer_and_prints_each_checks_pid() {
        let checks = vec![
            check("a", &["true"]),
            check("b", &[]),
            check("c", &["false"]),
        ];
        let p = build_host_timed_program(&checks, 3);
        assert_eq!(p.matches(" & p").count(), 2, "{p}");
        assert!(!p.contains("sleep") && !p.contains(" & k"), "{p}");
        assert!(p.contains("echo \"vmha-probe 3 pid 2 $p2\"\n"), "{p}");
        let (_dir, shells) = shells();
        for (shell, path) in shells {
            let out = sh(&shell, path.as_deref(), &p, &[]).output().unwrap();
            assert_eq!(
                outcomes(&checks, 3, &out.stdout),
                vec![
                    ProbeOutcome::Running,
                    ProbeOutcome::Unreadable(Unreadable::InvalidArgv),
                    ProbeOutcome::NotRunning(ExitStatus::Code(1)),
                ],
                "{shell:?}"
            );
            let pids = parse_pids(3, checks.len(), &out.stdout);
            assert!(
                pids[0].is_some() && pids[1].is_none() && pids[2].is_some(),
                "{pids:?}"
            );
            assert!(parse_kids(3, &out.stdout), "{shell:?}");
            assert!(parse_took(3, &out.stdout).is_some(), "{shell:?}");
        }
    }

    /// A probe timed by vmhad with a hung check, run by the shell `shell`: the killer, run
    /// beside it as the agent would (a child of the same parent), ends the hung check and its
    /// descendants; that check timed out, the others keep their outcome, and one that died of
    /// its own `TERM` did not time out. Returns the pids the hung check started.
    fn kill_a_hung_check(shell: &Path, path: Option<&Path>, pids: &Path) -> Vec<String> {
        let script = format!(
            "sleep 30 & echo $! >>{0}; sh -c 'sleep 30 & echo $! >>{0}; wait' & wait",
            pids.display()
        );
        let checks = vec![
            check("h", &["sh", "-c", &script]),
            check("t", &["true"]),
            check("e", &["sh", "-c", "kill -TERM $$"]),
        ];
        let before = std::fs::read_to_string(pids)
            .unwrap_or_default()
            .lines()
            .count();
        let probe = sh(shell, path, &build_host_timed_program(&checks, 9), &[])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(pids)
            .unwrap_or_default()
            .lines()
            .count()
            < before + 2
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the hung check did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let probe_pid = probe.id().to_string();
        // The quick checks end on their own before the timeout (a killer running while one of
        // them still ran would rightly end it too).
        while running_children(&probe_pid) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the quick checks did not end"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let killer_out = sh(shell, path, &killer(), &["vmha-kill", "9", &probe_pid])
            .output()
            .unwrap();
        let killed = parse_killed(9, &killer_out.stdout);
        assert_eq!(
            killed.len(),
            1,
            "only the hung check still ran: {killer_out:?}"
        );
        let out = probe.wait_with_output().unwrap();
        let mut got = parse_output(&checks, 9, &out.stdout);
        timed_out_by_killer(&mut got, &parse_pids(9, checks.len(), &out.stdout), &killed);
        let got: Vec<ProbeOutcome> = got.into_iter().map(|(_, o)| o).collect();
        assert_eq!(
            got,
            vec![
                ProbeOutcome::TimedOut,
                ProbeOutcome::Running,
                ProbeOutcome::NotRunning(ExitStatus::Signal(15)),
            ],
            "{shell:?}"
        );
        std::fs::read_to_string(pids)
            .unwrap()
            .lines()
            .skip(before)
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_killer_ends_the_hung_checks_of_a_probe_with_their_descendants() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let (_bin, shells) = shells();
        for (shell, path) in shells {
            let started = kill_a_hung_check(&shell, path.as_deref(), &pids);
            assert_eq!(started.len(), 2, "{started:?}");
            let left = still_running(|| started.clone());
            assert!(left.is_empty(), "{shell:?} left running: {left:?}");
        }
    }

    #[test]
    fn the_killer_names_and_ends_only_the_checks_that_still_run() {
        // A "probe" (`sleep`, which never reaps) with an ended check (a zombie) and a hung
        // one, and the killer beside it as a child of the same parent; the program prints
        // `ended PID` and `hung PID` once it sees both.
        let (_dir, shells) = shells();
        for (shell, path) in shells {
            let program = format!(
                "sh -c 'true & sleep 30 & exec sleep 30' & p=$!\n\
                 i=0; while [ $i -lt 500 ]; do c=; read -r c </proc/$p/task/$p/children\n\
                 e=; h=; for k in $c; do read -r l </proc/$k/stat; s=${{l##*) }}\n\
                 if [ \"${{s%% *}}\" = Z ]; then e=$k; else h=$k; fi; done\n\
                 [ -n \"$e\" ] && [ -n \"$h\" ] && break; sleep 0.01; i=$((i+1)); done\n\
                 echo \"ended $e\"; echo \"hung $h\"; sh -c {} vmha-kill 6 $p; kill $p",
                shell_quote(&killer())
            );
            let out = sh(&shell, path.as_deref(), &program, &[]).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let pid = |what: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(what)?.strip_prefix(' ')?.parse::<u32>().ok())
            };
            let (Some(_), Some(hung)) = (pid("ended"), pid("hung")) else {
                panic!("{shell:?}: no ended and hung check: {stdout}");
            };
            assert_eq!(
                parse_killed(6, &out.stdout),
                vec![hung],
                "{shell:?} named the ended check or missed the hung one: {stdout}"
            );
            assert!(
                still_running(|| vec![hung.to_string()]).is_empty(),
                "{shell:?}"
            );
        }
    }

    #[test]
    fn the_killer_leaves_a_process_that_is_not_its_parents_child_alone() {
        // A grandchild of this test (its parent is a shell), and init.
        let mut parent = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(parent.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild = line.trim().to_owned();
        let (_dir, shells) = shells();
        for (shell, path) in shells {
            for pid in [grandchild.as_str(), "1", "0", "99999999"] {
                let out = sh(&shell, path.as_deref(), &killer(), &["vmha-kill", "5", pid])
                    .output()
                    .unwrap();
                assert_eq!(
                    parse_killed(5, &out.stdout),
                    Vec::<u32>::new(),
                    "{shell:?} {pid}"
                );
            }
            assert!(running(&grandchild), "{shell:?} killed a stranger's child");
        }
        let _ = parent.kill();
        let _ = std::process::Command::new("kill").arg(&grandchild).status();
        let _ = parent.wait();
    }

    #[test]
    fn pid_and_killed_lines_are_read_strictly() {
        let out = b"vmha-probe 4 pid 0 17\nvmha-probe 4 pid 0 18\nvmha-probe 4 pid 1 +5\n\
                    vmha-probe 4 pid 2 0\nvmha-probe 4 pid 3 2147483648\nvmha-probe 5 pid 4 9\n\
                    vmha-probe 4 pid 9 9\nvmha-probe 4 pid 4 12 x\nvmha-probe 4 pid 4 12\n\xff\n";
        assert_eq!(
            parse_pids(4, 5, out),
            vec![Some(17), None, None, None, Some(12)]
        );
        let killer_out = b"vmha-probe 4 killed 17\nvmha-probe 4 killed -1\nvmha-probe 3 killed 8\n\
                           vmha-probe 4 killed 9 9\nvmha-probe 4 killed 2147483647\n";
        assert_eq!(parse_killed(4, killer_out), vec![17, 2147483647]);
        assert!(parse_kids(4, b"x\nvmha-probe 4 kids\n"));
        assert!(!parse_kids(4, b"vmha-probe 4 kids x\nvmha-probe 5 kids\n"));
        // Only a check that died of TERM and whose pid the killer ended timed out.
        let name = |n: &str| Name::new(n).unwrap();
        let term = ProbeOutcome::NotRunning(ExitStatus::Signal(15));
        let mut got = vec![
            (name("a"), term),
            (name("b"), term),
            (name("c"), ProbeOutcome::Running),
            (name("d"), term),
        ];
        timed_out_by_killer(&mut got, &[Some(17), Some(18), Some(19), None], &[17, 19]);
        let got: Vec<ProbeOutcome> = got.into_iter().map(|(_, o)| o).collect();
        assert_eq!(
            got,
            vec![ProbeOutcome::TimedOut, term, ProbeOutcome::Running, term]
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes, and lines that look almost right, never make the readers of a
        /// probe timed by vmhad panic: one pid slot per check, at most one killed pid a line.
        #[test]
        fn the_readers_of_pids_and_kills_are_total(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            lines in proptest::collection::vec(
                "vmha-probe 4 (pid|killed|kids)( [0-9+-]{0,12}){0,3}", 0..16),
            count in 0usize..8,
        ) {
            let mut out = raw;
            for line in &lines {
                out.push(b'\n');
                out.extend_from_slice(line.as_bytes());
            }
            let pids = parse_pids(4, count, &out);
            proptest::prop_assert_eq!(pids.len(), count);
            proptest::prop_assert!(pids.iter().flatten().all(|p| (1..=i32::MAX as u32).contains(p)));
            let killed = parse_killed(4, &out);
            proptest::prop_assert!(killed.len() <= out.split(|&b| b == b'\n').count());
            let _ = parse_kids(4, &out);
        }
    }
}
