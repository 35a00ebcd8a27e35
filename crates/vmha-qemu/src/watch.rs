//! The watcher: one long-running `guest-exec` per VM that exits the moment a watched app's
//! process is gone, so vmhad only asks about one pid (no process started in the guest per
//! question), is rung when it ends, and checks the app it names at once.
//!
//! The program is POSIX `sh` with no agent installed in the guest. Targets come as arguments
//! (never spliced into the program text): `kind value …`, `f PATH` for a pid file, `p NAME`
//! for a process name (`pidof -s`). At start it resolves each pid once and keeps the process's
//! start time (field 22 of `/proc/PID/stat`), so a reused pid is not taken for the app; a target
//! it cannot find is reported (`none INDEX`) and the watcher ends at once (the app may have
//! died since its check, or its `pid_file`/`process` is wrong: the engine tells them apart).
//!
//! It then waits, the cheapest way the guest offers:
//! - util-linux `waitpid --count 1` (≥ 2.38, no CPU while waiting) when present;
//! - else procps `pidwait` (≥ 3.3.17: Debian 12, Ubuntu 22.04, RHEL 9; no CPU while waiting),
//!   one per process in a background job that writes a line to a private fifo when its
//!   `pidwait` ends, while the watcher blocks reading the fifo. For the first two seconds
//!   ([`FULL_CHECK`] twice) it ticks as the loop below does, where the shell has `read -t`: a
//!   `pidwait` takes a moment to start (its libraries load; about half a second on the TCG
//!   test guest). The jobs and their `pidwait`s are killed when the watcher ends (and, for a
//!   watcher killed with `SIGKILL`, whose exit trap did not run, by the next watcher, from the
//!   list of jobs it left beside its fifo). A `pidwait` that ends with every process still
//!   there (a kernel without `pidfd_open`) leaves the watcher to the loop;
//! - else a loop of shell builtins — `read -t TICK` on a private fifo held open read-write (no
//!   fork; busybox ash, bash) or `sleep TICK` (a fork per tick, e.g. dash) — that per tick
//!   tests that each process's `/proc/PID/exe` still resolves (one `stat` each: it does not
//!   once the process is gone or a zombie, so either is seen within a tick, even where init
//!   reaps orphans a second late, as busybox's does), or, for a process whose `exe` could not
//!   be resolved at start (another user's, under an agent that is not root), sends it signal 0
//!   (a zombie is then seen within a second); and once per second ([`FULL_CHECK`]) reads each
//!   `/proc/PID/stat` to compare the start time too (a reused pid). On the TCG test guest a
//!   tick that read each app's `stat` cost about 3.7 ms of guest CPU with three apps (`read`
//!   takes a byte per system call); the `exe` tests with the fifo kept open cost about a
//!   third of that.
//!
//! When a process is gone (no stat, a zombie, another start time) it runs that app's `check`
//! at once (a background job, with the probe's in-guest timer: `TERM` to the check and its
//! descendants once its timeout has passed, whole seconds where `sleep` takes no fractions),
//! prints `gone INDEX STATUS` (124: timed out; `gone INDEX` alone for a target without a valid
//! check or a guest without `sleep`) and exits 0: the app's detection then waits for no probe.
//! `$VMHA_WATCH_WAIT=loop` skips `waitpid` and `pidwait` (tests of the loop on hosts that have
//! them). One watcher per VM: a new one kills the previous one (its pid kept in
//! `/run/vmha-watch.pid` — `$VMHA_WATCH_DIR` instead of `/run` if set, `/tmp` if that is not
//! writable — and checked to be a watcher before the kill).
//!
//! Where the VM has the watch doorbell (a virtio-serial port named
//! [`crate::doorbell::PORT_NAME`], found at `/dev/virtio-ports/` or through
//! `/sys/class/virtio-ports/*/name`; `$VMHA_WATCH_BELL` instead if set), the watcher also rings
//! it: `a` once armed, `g` when it ends with news (gone, not found), each written by a
//! background job with no tie to the agent's pipes, so a write that blocks (vmhad not
//! connected) never holds the watcher's exit; a job that cannot open the port (the guest lets
//! one writer at a time, e.g. the `a` job still at work) tries once more 100 ms later. The
//! `g` job first waits, where the watcher has its fifo, until the watcher has exited (a few
//! 2 ms `read -t`s on the fifo, 100 ms at most), and the watcher leaves the removal of its
//! files to a job of its own: vmhad asks for its status the moment it is rung, instead of at
//! its next poll (see [`crate::doorbell`]), and finds it ended.
//!
//! Its answer is untrusted: only well-formed lines with this watcher's nonce and a valid index
//! count, the first `gone` wins (its status counts only if a shell can give it: 0–255, read as
//! a probe's), and anything else (killed, other exit, no line) is [`WatchEnd::Ended`]: no news
//! about the apps. Targets come as five arguments each: `kind value timeout whole-seconds
//! check`, the check quoted for the shell by vmhad as the probe's are.

use std::sync::LazyLock;
use std::time::Duration;

use vmha_model::{ExitStatus, Name, ProbeOutcome, ProcessRef, WatchEnd, WatchReport, WatchTarget};

use crate::qga::{ExecOutput, ExecRequest};

const MARK: &str = "vmha-watch";
/// Bytes of the watcher's stdout kept: a few short lines.
pub const WATCH_OUTPUT_CAP: usize = 1024;
/// Longest `guest-exec-status` reply line accepted while watching.
pub const WATCH_REPLY_LINE: usize = 16 << 10;

/// The watcher program; its arguments come from [`watch_request`]. It starts with the probe's
/// functions that end a timed-out check with its descendants (only a child of the watcher:
/// never a reused pid).
pub static PROGRAM: LazyLock<String> =
    LazyLock::new(|| format!("{}{}{BODY}", crate::probe::VT_FN, crate::probe::VK_FN));

/// The watcher program after the probe's functions.
const BODY: &str = r#"M="vmha-watch $1"; tick=$2; every=$3; shift 3
d=${VMHA_WATCH_DIR:-/run}; [ -w "$d" ] || d=/tmp; pf=$d/vmha-watch.pid
ours() {
	cl=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") && case "$cl" in *vmha-watch*) ;; *) false ;; esac
}
if read -r old 2>/dev/null <"$pf"; then
	case "$old" in '' | *[!0-9]*) ;; *)
		if [ "$old" = $$ ]; then :
		elif ours "$old"; then kill "$old" 2>/dev/null
		elif read -r jobs 2>/dev/null <"$d/vmha-watch.$old.fifo.jobs"; then
			# It died without its exit trap (SIGKILL): end its pidwait jobs, remove its files.
			for j in $jobs; do ! ours "$j" || kill "$j" 2>/dev/null; done
			rm -f "$d/vmha-watch.$old.fifo" "$d/vmha-watch.$old.fifo".*
		fi ;;
	esac
fi
echo $$ >"$pf" 2>/dev/null
fifo=${pf%.pid}.$$.fifo
waiters=
cleanup() { rm -f "$fifo" "$fifo".*; [ -z "$waiters" ] || kill $waiters 2>/dev/null; }
trap cleanup EXIT
trap 'exit 143' TERM INT HUP
bell=${VMHA_WATCH_BELL:-/dev/virtio-ports/org.vmha.watch.0}
if ! [ -e "$bell" ]; then
	bell=
	for f in /sys/class/virtio-ports/*/name; do
		if read -r bn 2>/dev/null <"$f" && [ "$bn" = org.vmha.watch.0 ]; then
			f=${f%/name}; bell=/dev/${f##*/}; break
		fi
	done
	[ -c "$bell" ] || bell=
fi
# ring BYTE [after]: with `after` (and the fifo, for `read -t`), the job first waits until
# the watcher is gone (at most 50 short waits), so that vmhad's status poll, sent the moment
# the ring comes, finds it ended.
ring() {
	[ -z "$bell" ] || {
		(if [ -n "$2" ] && [ -n "$fd3" ]; then
			k=0
			while [ -e "/proc/$$/exe" ] && [ $k -lt 50 ]; do read -t 0.002 _x <&3; k=$((k + 1)); done
		fi
		echo "$1" >>"$bell" || { sleep 0.1; echo "$1" >>"$bell"; }) </dev/null >/dev/null 2>&1 &
	}
}
# With news: its jobs end, the ring waits for its exit, and its files are removed by a job of
# their own (nothing left on the way to its exit but forks).
end() {
	trap - EXIT
	[ -z "$waiters" ] || kill $waiters 2>/dev/null
	ring g after
	if [ -e "$fifo" ]; then rm -f "$fifo" "$fifo".* </dev/null >/dev/null 2>&1 & fi
	exit 0
}
st() {
	l=; read -r l 2>/dev/null <"/proc/$1/stat" || return 1
	l=${l##*) }; set -- $l
	case "$1" in Z | X | x | '') return 1 ;; esac
	s=${20}
}
n=0; pids=; missing=
while [ $# -ge 5 ]; do
	p=
	case "$1" in
	f) read -r p 2>/dev/null <"$2" ;;
	p) p=$(pidof -s "$2" 2>/dev/null) ;;
	esac
	case "$p" in '' | *[!0-9]*) p= ;; esac
	if [ -n "$p" ] && st "$p"; then
		eval "p$n=$p; s$n=$s"; pids="$pids $p"
	else
		eval "p$n="; echo "$M none $n"; missing=1
	fi
	# The app's check (quoted by vmhad) and its timeout, in seconds and in whole seconds.
	eval "c$n=\$5; t$n=\$3; u$n=\$4"
	n=$((n + 1)); shift 5
done
[ -z "$missing" ] || end
# verdict I: the process of target I is gone. Its check runs at once, stopped (with its
# descendants) by a timer once its timeout has passed; its exit status is the answer (124:
# timed out). A `sleep` without fractions fails at once: whole seconds then.
verdict() {
	eval "cc=\$c$1; ct=\$t$1; cu=\$u$1"
	if [ -z "$cc" ] || ! command -v sleep >/dev/null; then echo "$M gone $1"; return; fi
	eval "$cc" </dev/null >/dev/null 2>&1 & cp=$!
	# The timer is forked with TERM at its default: a TERM that comes before the child has
	# reset the watcher's trap would be lost (dash), and the timer would then fire.
	trap - TERM
	(sleep "$ct" || sleep "$cu"; trap '' TERM; vk $$ $cp; exit 0) </dev/null >/dev/null 2>&1 &
	ck=$!
	trap 'exit 143' TERM
	wait $cp; cs=$?
	kill $ck 2>/dev/null; wait $ck && cs=124
	echo "$M gone $1 $cs"
}
check() {
	# First the processes whose exe is gone (one stat each: a dead one is found at once),
	# then every process's stat (a zombie, a reused pid).
	i=0
	while [ $i -lt $n ]; do
		eval "p=\$p$i; w=\$s$i"
		case " $exes " in *" $p "*)
			if ! [ -e "/proc/$p/exe" ] && { ! st "$p" || [ "$s" != "$w" ]; }; then
				verdict $i; end
			fi ;;
		esac
		i=$((i + 1))
	done
	i=0
	while [ $i -lt $n ]; do
		eval "p=\$p$i; w=\$s$i"
		if [ -n "$p" ] && { ! st "$p" || [ "$s" != "$w" ]; }; then
			verdict $i; end
		fi
		i=$((i + 1))
	done
}
# Sorted before the first check: a process that dies after it is seen by the tick's exe test.
exes=; others=
for q in $pids; do
	if [ -e "/proc/$q/exe" ]; then exes="$exes $q"; else others="$others $q"; fi
done
check
echo "$M armed"
ring a
waits=${VMHA_WATCH_WAIT:-any}
if [ "$waits" = any ] && command -v waitpid >/dev/null 2>&1 && waitpid --help 2>&1 | grep -q -- --count; then
	waitpid --count 1 $pids >/dev/null 2>&1
	check
fi
exec 2>/dev/null
quick() {
	for q in $exes; do [ -e "/proc/$q/exe" ] || { check; return; }; done
	[ -z "$others" ] || kill -0 $others || check
}
t=0
tock() {
	t=$((t + 1))
	if [ "$t" -ge "$every" ]; then t=0; check; else quick; fi
}
# A private fifo held open read-write (fd 3), and whether the shell can wait on it for a
# while (`read -t`: busybox ash, bash; dash says it has no such option, status 2).
fd3=; rt=
if mkfifo "$fifo" && exec 3<>"$fifo"; then
	fd3=1; _w=; { read -t 0.01 _w <&3; [ $? -ne 2 ]; } && rt=1
fi
if [ "$waits" = any ] && [ -n "$fd3" ] && command -v pidwait >/dev/null 2>&1; then
	i=0
	for q in $pids; do
		echo "$q" >"$fifo.$i"
		(w=; trap '[ -z "$w" ] || kill $w 2>/dev/null; exit 0' TERM
			pidwait -F "$fifo.$i" >/dev/null 2>&1 &
			w=$!; wait $w; echo w >&3) </dev/null >/dev/null 2>&1 &
		waiters="$waiters $!"; i=$((i + 1))
	done
	echo "$waiters" >"$fifo.jobs"
	check
	# A pidwait takes a moment to start (its libraries load: half a second under TCG): ticks
	# cover that time, where the shell has `read -t`.
	warm=$((2 * every)); _w=
	if [ -n "$rt" ]; then
		while [ "$warm" -gt 0 ] && [ -z "$_w" ]; do
			tock; read -t "$tick" _w <&3 || _w=; warm=$((warm - 1))
		done
	fi
	[ -n "$_w" ] || read -r _w <&3
	check
	kill $waiters 2>/dev/null; waiters=
fi
if [ -n "$rt" ]; then
	while :; do tock; read -t "$tick" _w <&3; done
fi
rm -f "$fifo"
while :; do tock; sleep "$tick"; done
"#;

/// A fresh random nonce for a watcher's answer lines.
pub fn nonce() -> u64 {
    crate::qga::random_id()
}

/// How often the loop compares every process's start time (a reused pid); between, each tick
/// only matches the state in its `stat` (gone, zombie).
const FULL_CHECK: Duration = Duration::from_secs(1);

/// Ticks between two full checks ([`FULL_CHECK`]), at least 1.
fn full_check_every(tick: Duration) -> u128 {
    (FULL_CHECK.as_millis() / tick.as_millis().max(1)).max(1)
}

/// Seconds for the guest's `read -t`/`sleep`, with millisecond precision.
fn seconds(d: Duration) -> String {
    let ms = d.as_millis().max(10);
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// The `guest-exec` of a watcher for `targets` checking every `tick` in the guest; its
/// output is capped at [`WATCH_OUTPUT_CAP`] bytes and its status replies at
/// [`WATCH_REPLY_LINE`]; `deadline` bounds each call.
pub fn watch_request(
    targets: &[WatchTarget],
    nonce: u64,
    tick: Duration,
    deadline: Duration,
) -> ExecRequest {
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        PROGRAM.clone(),
        MARK.to_string(),
        nonce.to_string(),
        seconds(tick),
        full_check_every(tick).to_string(),
    ];
    for t in targets {
        let (kind, value) = match &t.process {
            ProcessRef::PidFile(path) => ("f", path),
            ProcessRef::Name(name) => ("p", name),
        };
        argv.push(kind.to_string());
        argv.push(value.clone());
        argv.push(crate::probe::seconds(t.timeout));
        argv.push(crate::probe::whole_seconds(t.timeout).to_string());
        argv.push(crate::probe::command_line(&t.check).unwrap_or_default());
    }
    let mut request = ExecRequest::new(argv);
    request.deadline = deadline;
    request.output_cap = WATCH_OUTPUT_CAP;
    request.max_reply_line = WATCH_REPLY_LINE;
    request
}

/// What a finished watcher's answer means. Total over arbitrary output.
pub fn parse_watch(targets: &[WatchTarget], nonce: u64, output: &ExecOutput) -> WatchReport {
    let nonce = nonce.to_string();
    let mut not_found: Vec<Name> = Vec::new();
    let mut gone: Option<(Name, Option<ProbeOutcome>)> = None;
    for line in output.stdout.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let mut words = line.split(' ');
        if words.next() != Some(MARK) || words.next() != Some(nonce.as_str()) {
            continue;
        }
        let (Some(what), Some(index), status, None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(target) = index.parse::<usize>().ok().and_then(|i| targets.get(i)) else {
            continue;
        };
        match (what, status) {
            ("none", None) if !not_found.contains(&target.app) => {
                not_found.push(target.app.clone());
            }
            ("gone", status) if gone.is_none() => {
                // Only a status a shell can give (0-255) is an outcome; else the app is probed.
                let checked = status
                    .and_then(|s| s.parse::<u8>().ok())
                    .map(|s| crate::probe::classify(u32::from(s)));
                gone = Some((target.app.clone(), checked));
            }
            _ => {}
        }
    }
    let checked = gone.as_ref().and_then(|(_, c)| *c);
    let end = match (gone, output.status) {
        (Some((app, _)), _) => WatchEnd::Gone(app),
        (None, ExitStatus::Code(0)) if !not_found.is_empty() => WatchEnd::NotFound,
        (None, ExitStatus::Signal(sig)) => {
            WatchEnd::Ended(format!("watcher killed by signal {sig}"))
        }
        (None, ExitStatus::Code(code)) => WatchEnd::Ended(format!("watcher exited {code}")),
    };
    WatchReport {
        end,
        not_found,
        checked,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// A target whose check fails with status 3 (its timeout 5 s).
    fn target(app: &str, process: ProcessRef) -> WatchTarget {
        WatchTarget {
            app: Name::new(app).unwrap(),
            process,
            check: vec!["sh".into(), "-c".into(), "exit 3".into()],
            timeout: Duration::from_secs(5),
        }
    }

    fn output(status: ExitStatus, stdout: &[u8]) -> ExecOutput {
        ExecOutput {
            status,
            stdout: stdout.to_vec(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    #[test]
    fn parses_only_well_formed_lines_of_this_nonce() {
        let t = vec![
            target("a", ProcessRef::PidFile("/run/a.pid".into())),
            target("b", ProcessRef::Name("b".into())),
        ];
        let out = output(
            ExitStatus::Code(0),
            b"vmha-watch 8 gone 0\nvmha-watch 7 gone 9\nvmha-watch 7 none 0 x\n\xff\n\
              vmha-watch 7 none 0\nvmha-watch 7 gone 1\nvmha-watch 7 gone 0\n",
        );
        let r = parse_watch(&t, 7, &out);
        assert_eq!(r.end, WatchEnd::Gone(Name::new("b").unwrap()));
        assert_eq!(r.not_found, vec![Name::new("a").unwrap()]);
        assert_eq!(r.checked, None, "no status: the app is probed");
        // The status of the check the watcher ran, when it is one a shell can give.
        for (status, checked) in [
            ("0", Some(ProbeOutcome::Running)),
            ("3", Some(ProbeOutcome::NotRunning(ExitStatus::Code(3)))),
            ("124", Some(ProbeOutcome::TimedOut)),
            ("137", Some(ProbeOutcome::NotRunning(ExitStatus::Signal(9)))),
            ("256", None),
            ("-1", None),
            ("x", None),
        ] {
            let line = format!("vmha-watch 7 gone 1 {status}\nvmha-watch 7 gone 0 0\n");
            let r = parse_watch(&t, 7, &output(ExitStatus::Code(0), line.as_bytes()));
            assert_eq!(r.end, WatchEnd::Gone(Name::new("b").unwrap()), "{status}");
            assert_eq!(r.checked, checked, "{status}");
        }
        // Killed, or no line at all: no news about the apps.
        let r = parse_watch(&t, 7, &output(ExitStatus::Signal(9), b""));
        assert_eq!(r.end, WatchEnd::Ended("watcher killed by signal 9".into()));
        let r = parse_watch(&t, 7, &output(ExitStatus::Code(0), b"vmha-watch 7 armed\n"));
        assert_eq!(r.end, WatchEnd::Ended("watcher exited 0".into()));
        let r = parse_watch(
            &t,
            7,
            &output(ExitStatus::Code(0), b"vmha-watch 7 none 1\n"),
        );
        assert_eq!(r.end, WatchEnd::NotFound);
        assert_eq!(r.not_found, vec![Name::new("b").unwrap()]);
    }

    #[test]
    fn arguments_carry_the_targets_never_the_program() {
        let t = vec![target("a", ProcessRef::PidFile("/x/$(reboot)'".into()))];
        let r = watch_request(&t, 3, Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(r.argv[2], *PROGRAM);
        assert_eq!(
            &r.argv[3..],
            [
                "vmha-watch",
                "3",
                "0.100",
                "10",
                "f",
                "/x/$(reboot)'",
                "5",
                "5",
                "'sh' '-c' 'exit 3'"
            ]
        );
        assert_eq!(r.output_cap, WATCH_OUTPUT_CAP);
    }

    /// Runs the watcher under a host shell, its pid file in `dir`.
    fn spawn_watcher(
        shell: &str,
        dir: &std::path::Path,
        targets: &[WatchTarget],
        nonce: u64,
    ) -> Child {
        watcher_command(shell, dir, targets, nonce, None, "any")
            .spawn()
            .unwrap()
    }

    /// The command of a watcher like [`spawn_watcher`]'s, not started yet, with `every` ticks
    /// between full checks (`None`: a second's worth) and `$VMHA_WATCH_WAIT` = `wait`
    /// (`loop`: the tick loop even where `pidwait` exists).
    fn watcher_command(
        shell: &str,
        dir: &std::path::Path,
        targets: &[WatchTarget],
        nonce: u64,
        every: Option<u32>,
        wait: &str,
    ) -> Command {
        let mut r = watch_request(targets, nonce, Duration::from_millis(20), Duration::ZERO);
        if let Some(every) = every {
            r.argv[6] = every.to_string();
        }
        let mut cmd = Command::new(shell);
        if shell.ends_with("busybox") {
            cmd.arg("sh");
        }
        // The doorbell: a plain file here, fresh for each watcher.
        std::fs::write(dir.join("bell"), b"").unwrap();
        cmd.args(&r.argv[1..])
            .env("VMHA_WATCH_DIR", dir)
            .env("VMHA_WATCH_BELL", dir.join("bell"))
            .env("VMHA_WATCH_WAIT", wait)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        cmd
    }

    /// Reads the watcher's stdout up to its `armed` line; returns the lines read so far.
    fn until_armed(child: &mut Child) -> Vec<u8> {
        use std::io::Read;
        let stdout = child.stdout.as_mut().unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b" armed\n") {
            match stdout.read(&mut byte).unwrap() {
                0 => break,
                _ => seen.push(byte[0]),
            }
        }
        seen
    }

    /// Waits until `deadline` for the watcher to end (kills it and fails with `what` if it does
    /// not) and reads its answer (`head` = its stdout read before, `nonce` its nonce).
    fn answer(
        mut watcher: Child,
        head: Vec<u8>,
        targets: &[WatchTarget],
        nonce: u64,
        deadline: std::time::Instant,
        what: &str,
    ) -> WatchReport {
        while watcher.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                watcher.kill().unwrap();
                panic!("{what}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (code, stdout) = finish(watcher, head);
        let report = parse_watch(
            targets,
            nonce,
            &output(ExitStatus::Code(code.unwrap()), &stdout),
        );
        // Shown with a failing assertion on the report.
        eprintln!("the watcher's answer: {}", String::from_utf8_lossy(&stdout));
        report
    }

    /// Waits for the watcher and returns all its stdout (`head` = what was read before).
    fn finish(child: Child, mut head: Vec<u8>) -> (Option<i32>, Vec<u8>) {
        let out = child.wait_with_output().unwrap();
        head.extend_from_slice(&out.stdout);
        (out.status.code(), head)
    }

    /// A sleeping process standing for app `name`, and its watch target (a pid file in `dir`).
    fn sleeping_app(dir: &std::path::Path, name: &str) -> (Child, WatchTarget) {
        let app = Command::new("sleep").arg("30").spawn().unwrap();
        let pid_file = dir.join(format!("{name}.pid"));
        std::fs::write(&pid_file, format!("{}\n", app.id())).unwrap();
        let t = target(name, ProcessRef::PidFile(pid_file.display().to_string()));
        (app, t)
    }

    /// Waits until the watcher's doorbell (a file in `dir`) holds `want`: the rings are
    /// written by background jobs, which may lag the watcher's exit.
    fn wait_rings(dir: &std::path::Path, want: &str, shell: &str) {
        let bell = dir.join("bell");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let rings = std::fs::read_to_string(&bell).unwrap();
            if rings == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{shell}: rings {rings:?}, not {want:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (5 s at most) until no watcher's file is left in `dir` but the pid file (an
    /// ended watcher's files are removed by a job of their own).
    fn wait_files_removed(dir: &std::path::Path, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|f| f.starts_with("vmha-watch.") && f != "vmha-watch.pid")
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: left {left:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn shells() -> Vec<&'static str> {
        ["/bin/sh", "/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .filter(|s| std::path::Path::new(s).exists())
            .collect()
    }

    /// Pids of the `pidwait`s of the watchers whose files are in `dir`.
    fn pidwaits(dir: &std::path::Path) -> Vec<u32> {
        pidwaits_of(dir, "")
    }

    /// Pids of the `pidwait`s of the watchers whose files are in `dir` and whose file names
    /// go on with `watcher` (`""`: any).
    fn pidwaits_of(dir: &std::path::Path, watcher: &str) -> Vec<u32> {
        let needle = format!("pidwait\0-F\0{}/vmha-watch.{watcher}", dir.display());
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .collect()
    }

    /// Waits (5 s at most) until `dir`'s watchers have `want` `pidwait`s running or not.
    fn wait_pidwaits(dir: &std::path::Path, want: bool, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pidwaits(dir).is_empty() == want {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: pidwaits {:?}",
                pidwaits(dir)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The ways to wait to test: the tick loop, and `pidwait` where the host has it.
    fn waits() -> Vec<&'static str> {
        let pidwait = Command::new("pidwait")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if pidwait {
            vec!["loop", "any"]
        } else {
            vec!["loop"]
        }
    }

    /// A watcher of `app` and `other` (sleeping processes) under each shell and way to wait:
    /// armed while they live, it ends once `app` is killed — `reaped` or left a zombie
    /// (`/proc/PID` still there) — seen by a tick (not only by the full check) or by
    /// `pidwait`, and its answer names `app`; `other`'s `pidwait` does not outlive it.
    fn ends_when_the_app_dies(reaped: bool) {
        let dir = tempfile::tempdir().unwrap();
        for (shell, wait) in shells()
            .into_iter()
            .flat_map(|sh| waits().into_iter().map(move |w| (sh, w)))
        {
            let shell_wait = format!("{shell} ({wait})");
            let shell = shell_wait.as_str();
            let (mut app, app_target) = sleeping_app(dir.path(), "app");
            let (mut other, other_target) = sleeping_app(dir.path(), "other");
            let targets = vec![other_target, app_target];
            let sh = shell.split(' ').next().unwrap();
            // The loop: no full check for a long while, the tick alone must see the app gone.
            // pidwait: a full check per tick, so the ticks that cover pidwait's start are over
            // after two (40 ms).
            let every = if wait == "loop" { 1_000_000 } else { 1 };
            let mut watcher = watcher_command(sh, dir.path(), &targets, 11, Some(every), wait)
                .spawn()
                .unwrap();
            let head = until_armed(&mut watcher);
            assert!(head.ends_with(b"vmha-watch 11 armed\n"), "{shell}");
            if wait == "any" {
                wait_pidwaits(dir.path(), true, shell);
                std::thread::sleep(Duration::from_millis(300));
            }
            app.kill().unwrap();
            if reaped {
                app.wait().unwrap();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let what = format!("{shell}: the watcher did not see the app gone (reaped: {reaped})");
            let report = answer(watcher, head, &targets, 11, deadline, &what);
            assert_eq!(
                report.end,
                WatchEnd::Gone(Name::new("app").unwrap()),
                "{shell}"
            );
            // It ran the app's check at once.
            let failed = ProbeOutcome::NotRunning(ExitStatus::Code(3));
            assert_eq!(report.checked, Some(failed), "{shell}");
            assert!(report.not_found.is_empty());
            wait_rings(dir.path(), "a\ng\n", shell);
            wait_pidwaits(dir.path(), false, shell);
            wait_files_removed(dir.path(), shell);
            app.wait().unwrap();
            other.kill().unwrap();
            other.wait().unwrap();
        }
    }

    /// While its `pidwait`s start (a slow guest loads their libraries), the watcher ticks: a
    /// `pidwait` that never gets going (here one that only sleeps) does not hide a death in
    /// that time, under the shells with `read -t`.
    #[test]
    fn ticks_cover_the_time_pidwait_takes_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("pidwait");
        let started = dir.path().join("started");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho >>{}\nexec sleep 60\n", started.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        for shell in shells().into_iter().filter(|s| s.ends_with("busybox")) {
            let (mut app, app_target) = sleeping_app(dir.path(), "app");
            let targets = vec![app_target];
            let mut watcher = watcher_command(shell, dir.path(), &targets, 4, None, "any")
                .env("PATH", &path)
                .spawn()
                .unwrap();
            let head = until_armed(&mut watcher);
            // The death comes once the fake pidwait runs, so only a tick can see it.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !started.exists() {
                assert!(std::time::Instant::now() < deadline, "{shell}: no pidwait");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::fs::remove_file(&started).unwrap();
            app.kill().unwrap();
            app.wait().unwrap();
            let what = format!("{shell}: no tick saw the app gone while pidwait started");
            let report = answer(watcher, head, &targets, 4, deadline, &what);
            assert_eq!(
                report.end,
                WatchEnd::Gone(Name::new("app").unwrap()),
                "{shell}"
            );
        }
    }

    /// The check the watcher runs when the process is gone is stopped at its timeout, with its
    /// descendants, and counts as timed out; a target without a check is left to a probe.
    #[test]
    fn the_watchers_check_is_timed_out_and_a_target_without_one_is_probed() {
        let dir = tempfile::tempdir().unwrap();
        // The check's child: a `sleep` of a length nothing else uses.
        let child = "sleep 59.4317";
        for shell in shells() {
            for hang in [true, false] {
                let (mut app, mut app_target) = sleeping_app(dir.path(), "app");
                app_target.timeout = Duration::from_millis(300);
                app_target.check = if hang {
                    // The check's child must go with it.
                    vec!["sh".into(), "-c".into(), format!("{child} & wait")]
                } else {
                    Vec::new()
                };
                let targets = vec![app_target];
                let mut watcher = spawn_watcher(shell, dir.path(), &targets, 6);
                let head = until_armed(&mut watcher);
                app.kill().unwrap();
                app.wait().unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let what = format!("{shell}: the watcher did not end (hang: {hang})");
                let report = answer(watcher, head, &targets, 6, deadline, &what);
                assert_eq!(report.end, WatchEnd::Gone(Name::new("app").unwrap()));
                let want = hang.then_some(ProbeOutcome::TimedOut);
                assert_eq!(report.checked, want, "{shell} (hang: {hang})");
                let needle = child.replace(' ', "\0");
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::fs::read_dir("/proc").unwrap().any(|e| {
                    let pid = e.unwrap().file_name();
                    std::fs::read(format!("/proc/{}/cmdline", pid.to_string_lossy()))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                }) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{shell}: the timed-out check's child outlived it"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    #[test]
    fn watcher_exits_when_the_process_dies_and_names_it() {
        ends_when_the_app_dies(true);
    }

    #[test]
    fn a_zombie_is_gone_too() {
        ends_when_the_app_dies(false);
    }

    #[test]
    fn the_program_looks_for_the_doorbell_by_its_port_name() {
        let port = crate::doorbell::PORT_NAME;
        assert!(PROGRAM.contains(&format!("/dev/virtio-ports/{port}}}")));
        assert!(PROGRAM.contains(&format!("[ \"$bn\" = {port} ]")));
    }

    #[test]
    fn full_checks_come_once_a_second() {
        assert_eq!(full_check_every(Duration::from_millis(100)), 10);
        assert_eq!(full_check_every(Duration::from_millis(20)), 50);
        assert_eq!(full_check_every(Duration::from_secs(5)), 1);
    }

    #[test]
    fn a_target_not_found_ends_the_watcher_at_once() {
        let dir = tempfile::tempdir().unwrap();
        for shell in shells() {
            let (mut sleeper, me) = sleeping_app(dir.path(), "me");
            let targets = vec![me, target("x", ProcessRef::Name("no-such-proc-xy".into()))];
            let out = spawn_watcher(shell, dir.path(), &targets, 5)
                .wait_with_output()
                .unwrap();
            let report = parse_watch(
                &targets,
                5,
                &output(ExitStatus::Code(out.status.code().unwrap()), &out.stdout),
            );
            assert_eq!(report.end, WatchEnd::NotFound, "{shell}");
            assert_eq!(report.not_found, vec![Name::new("x").unwrap()]);
            // Not armed, but ended with news: rung once.
            wait_rings(dir.path(), "g\n", shell);
            sleeper.kill().unwrap();
            sleeper.wait().unwrap();
        }
    }

    /// A watcher killed with `SIGKILL` runs no exit trap: its `pidwait`s outlive it. The next
    /// watcher ends them and removes the dead one's files.
    #[test]
    fn the_next_watcher_cleans_up_after_one_killed_with_sigkill() {
        if !waits().contains(&"any") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (mut app, app_target) = sleeping_app(dir.path(), "app");
        let targets = vec![app_target];
        // The files and `pidwait`s of the watcher whose file names go on with `id`.
        let left = |id: &str| -> (Vec<u32>, Vec<String>) {
            let files = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|f| f.starts_with(&format!("vmha-watch.{id}")))
                .collect();
            (pidwaits_of(dir.path(), id), files)
        };
        for shell in shells() {
            let mut first = spawn_watcher(shell, dir.path(), &targets, 1);
            let first_id = format!("{}.", first.id());
            let head = until_armed(&mut first);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            // Its job list written, its pidwait running.
            while left(&first_id).0.is_empty() || left(&first_id).1.len() < 3 {
                assert!(std::time::Instant::now() < deadline, "{shell}: no pidwait");
                std::thread::sleep(Duration::from_millis(10));
            }
            first.kill().unwrap();
            let _ = finish(first, head);
            std::thread::sleep(Duration::from_millis(100));
            assert!(!left(&first_id).0.is_empty(), "{shell}: the premise");

            let mut second = spawn_watcher(shell, dir.path(), &targets, 2);
            let second_id = format!("{}.", second.id());
            let head = until_armed(&mut second);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while left(&first_id) != (vec![], vec![]) {
                let now = std::time::Instant::now();
                assert!(now < deadline, "{shell}: left behind {:?}", left(&first_id));
                std::thread::sleep(Duration::from_millis(10));
            }
            // The second ends normally (its exit trap cleans up after it).
            Command::new("kill")
                .arg(second.id().to_string())
                .status()
                .unwrap();
            let _ = finish(second, head);
            wait_pidwaits(dir.path(), false, shell);
            assert_eq!(left(&second_id).1, Vec::<String>::new(), "{shell}");
        }
        app.kill().unwrap();
        app.wait().unwrap();
    }

    #[test]
    fn a_new_watcher_replaces_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut app, app_target) = sleeping_app(dir.path(), "app");
        let targets = vec![app_target];
        let mut first = spawn_watcher("/bin/sh", dir.path(), &targets, 1);
        let head = until_armed(&mut first);
        let mut second = spawn_watcher("/bin/sh", dir.path(), &targets, 2);
        let (first_id, second_id) = (format!("{}.", first.id()), format!("{}.", second.id()));
        let (code, stdout) = finish(first, head);
        let report = parse_watch(
            &targets,
            1,
            &output(ExitStatus::Code(code.unwrap_or(143)), &stdout),
        );
        assert!(matches!(report.end, WatchEnd::Ended(_)), "{report:?}");
        let head = until_armed(&mut second);
        let pidwait = waits().contains(&"any");
        if pidwait {
            // The first watcher's pidwait went with it: only the second's waits.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let first = pidwaits_of(dir.path(), &first_id);
                let second = pidwaits_of(dir.path(), &second_id);
                if first.is_empty() && second.len() == 1 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "first {first:?}, second {second:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        app.kill().unwrap();
        app.wait().unwrap();
        let (_, stdout) = finish(second, head);
        let report = parse_watch(&targets, 2, &output(ExitStatus::Code(0), &stdout));
        assert_eq!(report.end, WatchEnd::Gone(Name::new("app").unwrap()));
        wait_pidwaits(dir.path(), false, "after the second watcher");
    }
}
