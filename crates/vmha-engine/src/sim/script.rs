//! The script language of simulations: one command per line, `+DELAY command` (see
//! [`parse_script`]), shared by the scenario tests and operators' what-if runs.

use vmha_model::{Config, Name, PauseReason, Policy, Tie};

use crate::command::AdminCommand;
use crate::time::millis;

use super::SimError;

/// How a VM dies in [`SimCommand::VmCrash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// `GUEST_PANICKED`.
    Panic,
    /// The guest powered off by itself.
    Shutdown,
    /// The QEMU process vanished.
    Gone,
}

impl SimCommand {
    /// An admin command given to the first live host.
    pub fn admin(command: AdminCommand) -> SimCommand {
        SimCommand::Admin { via: None, command }
    }
}

/// What an app's start command does in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartBehaviour {
    /// Starts the app.
    Ok,
    /// Exits non-zero.
    Fails,
    /// Exits 0 but the app does not come up.
    Noop,
}

/// One thing that happens in the simulated world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimCommand {
    /// Nothing (time passes).
    Tick,
    /// From now on, log (or stop logging) every probe sent, with the apps it checks.
    LogProbes(bool),
    /// The watchers of the VM are killed in the guest (no news about its apps).
    WatchKill {
        /// VM.
        vm: Name,
    },
    /// The app stops running; its check exits `exit`.
    AppFail {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Exit code of its check.
        exit: i32,
    },
    /// The app runs again by itself.
    AppRecover {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
    },
    /// The app's check hangs (times out) or stops hanging.
    AppHang {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Hanging.
        on: bool,
    },
    /// The guest's answer to the app's check is garbled (no status line for it), or no longer.
    AppGarble {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Garbled.
        on: bool,
    },
    /// What the app's start command does from now on.
    AppStart {
        /// VM.
        vm: Name,
        /// App.
        app: Name,
        /// Behaviour.
        behaviour: StartBehaviour,
    },
    /// The VM dies on whichever host runs it.
    VmCrash {
        /// VM.
        vm: Name,
        /// How.
        kind: CrashKind,
    },
    /// The guest reboots by itself.
    VmReset {
        /// VM.
        vm: Name,
    },
    /// The VM's vCPUs stop (`STOP`, run state by `reason`) on whichever host runs it.
    VmPause {
        /// VM.
        vm: Name,
        /// Why (QEMU's run state).
        reason: PauseReason,
    },
    /// The paused VM's vCPUs run again (`RESUME`).
    VmResume {
        /// VM.
        vm: Name,
    },
    /// The guest channel hangs (`on`) or comes back.
    GuestHang {
        /// VM.
        vm: Name,
        /// Hanging.
        on: bool,
    },
    /// The VM's QEMU stops answering (stopped by a signal, or stuck on its storage): its QMP
    /// socket never greets and its guest agent is silent until it is killed or resumed
    /// ([`SimCommand::QemuResume`]); a daemon restarted meanwhile cannot adopt it and observes
    /// it `Unresponsive`.
    QemuHang {
        /// VM.
        vm: Name,
    },
    /// The VM's hung QEMU answers again (resumed by `SIGCONT`, its storage back): the
    /// daemon's next safety poll adopts it and observes it running; its guest agent answers.
    QemuResume {
        /// VM.
        vm: Name,
    },
    /// The guest agent floods its channel, so the driver disconnects it as hostile (`on`), or
    /// behaves again.
    GuestHostile {
        /// VM.
        vm: Name,
        /// Hostile.
        on: bool,
    },
    /// From now on, booting the VM never brings its guest channel up (`on`), or does again.
    BootHang {
        /// VM.
        vm: Name,
        /// Hanging.
        on: bool,
    },
    /// The host dies (its VMs with it); its lease expires `ttl` later.
    HostCrash(Name),
    /// The host loses the cluster store: it self-fences at `ttl - fence_margin`, its lease
    /// expires at `ttl`.
    HostIsolate(Name),
    /// The host is back (restarted with its persisted state, or reconnected).
    HostRecover(Name),
    /// The host's daemon restarts with its persisted state while its VMs keep running.
    DaemonRestart(Name),
    /// The guest agent of the VM starts (`on`) or stops refusing `guest-exec`: probes, app
    /// starts and stops are answered [`crate::ActionError::ExecBlocked`], and so are pings
    /// that ask whether it is allowed.
    ExecBlocked {
        /// VM.
        vm: Name,
        /// Blocked.
        on: bool,
    },
    /// The host reports its memory for VMs.
    HostMemory(Name, u64),
    /// The cluster store refuses every commit (`on`: a full disk, a lost quorum) or works again.
    StoreFail {
        /// Failing.
        on: bool,
    },
    /// An admin command, given to a host's API (the first live host when `via` is `None`)
    /// and routed as the daemon routes it.
    Admin {
        /// The host whose API receives it.
        via: Option<Name>,
        /// The command.
        command: AdminCommand,
    },
}

/// The script form of an admin command (`freeze shop`, `priority shop/db 5`), for logs.
pub fn admin_text(cmd: &AdminCommand) -> String {
    use AdminCommand as C;
    match cmd {
        C::AppOffline {
            vm,
            app,
            auto_clear,
        } => format!(
            "app-offline {vm}/{app}{}",
            if *auto_clear { "" } else { " sticky" }
        ),
        C::AppOnline { vm, app } => format!("app-online {vm}/{app}"),
        C::AppStart { vm, app } => format!("app-start {vm}/{app}"),
        C::AppStop { vm, app } => format!("app-stop {vm}/{app}"),
        C::VmStart { vm } => format!("vm-start {vm}"),
        C::VmStop { vm } => format!("vm-stop {vm}"),
        C::VmRestart { vm } => format!("vm-restart {vm}"),
        C::VmMove { vm, to, restart } => {
            format!("move {vm} {to}{}", if *restart { " --restart" } else { "" })
        }
        C::HostMaintenance { host, on } => {
            format!("maintenance {host} {}", if *on { "on" } else { "off" })
        }
        C::Freeze { vm } => format!("freeze {vm}"),
        C::Unfreeze { vm } => format!("unfreeze {vm}"),
        C::Clear { vm } => format!("clear {vm}"),
        C::SetPriority { vm, app, priority } => format!("priority {vm}/{app} {priority}"),
        C::SetAppBudget {
            vm,
            app,
            restart_limit,
            restart_window_ms,
        } => format!("app-budget {vm}/{app} {restart_limit} {restart_window_ms}ms"),
        C::SetVmBudget {
            vm,
            vm_restart_limit,
            vm_restart_window_ms,
        } => format!("vm-budget {vm} {vm_restart_limit} {vm_restart_window_ms}ms"),
        C::SetPolicy { vm, policy, tie } => format!(
            "policy {vm} {}{}",
            crate::decision_agent::policy_name(*policy),
            match tie {
                Some(Tie::Restart) => " restart",
                Some(Tie::NoAction) => " no-action",
                None => "",
            }
        ),
    }
}

fn ms_of(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    vmha_model::duration::parse(s)
        .map(millis)
        .map_err(|e| format!("bad duration `{s}`: {e}"))
}

/// A pause reason by its serialized name (`admin`, `io-error`, …).
fn pause_reason(s: &str) -> Result<PauseReason, String> {
    use serde::Deserialize as _;
    use serde::de::IntoDeserializer;
    let text: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        s.into_deserializer();
    PauseReason::deserialize(text).map_err(|_| format!("unknown pause reason `{s}`"))
}

fn name(s: &str) -> Result<Name, String> {
    Name::new(s).map_err(|e| e.to_string())
}

fn vm_app(s: &str) -> Result<(Name, Name), String> {
    let (vm, app) = s
        .split_once('/')
        .ok_or_else(|| format!("expected VM/APP, got `{s}`"))?;
    Ok((name(vm)?, name(app)?))
}

/// Parses a script (see [`Sim::run_script`]) into delays and commands.
///
/// One command per line, `+DELAY command …`: DELAY is milliseconds (`+500`) or a duration
/// (`+3s`, `+1m30s`) to let pass before the command; `#` starts a comment. The commands are
/// those of [`SimCommand`] (`host-crash kvm1`, `app-fail shop db exit:2`, `admin freeze shop`,
/// `tick`, …); docs/simulate.md lists them all.
pub fn parse_script(script: &str) -> Result<Vec<(u64, SimCommand)>, SimError> {
    Ok(parse_lines(script)?
        .into_iter()
        .map(|(_, delay, cmd)| (delay, cmd))
        .collect())
}

/// The longest delay of one line in [`parse_script_for`]: one `advance` over a longer span can
/// take more steps than the simulator's livelock guard allows.
pub const MAX_DELAY_MS: u64 = 24 * 3600 * 1000;

/// [`parse_script`] for a cluster of `config`: a host, VM or app it does not configure is an
/// error too (the simulator would ignore the line), and so is a delay over [`MAX_DELAY_MS`].
/// Admin commands are left to the engine, which refuses unknown names as the daemon does and
/// logs why.
pub fn parse_script_for(script: &str, config: &Config) -> Result<Vec<(u64, SimCommand)>, SimError> {
    let mut out = Vec::new();
    for (line, delay, cmd) in parse_lines(script)? {
        if let Some(msg) = unknown_name(config, &cmd) {
            return Err(SimError::Script { line, msg });
        }
        if delay > MAX_DELAY_MS {
            let msg = "a delay is at most 1d: spread longer waits over several lines".to_string();
            return Err(SimError::Script { line, msg });
        }
        out.push((delay, cmd));
    }
    Ok(out)
}

/// What `cmd` names that `config` does not configure, if anything.
fn unknown_name(config: &Config, cmd: &SimCommand) -> Option<String> {
    use SimCommand as S;
    let host = |h: &Name| {
        config
            .host(h.as_str())
            .is_none()
            .then(|| format!("unknown host `{h}`"))
    };
    let vm = |v: &Name| {
        config
            .vm(v.as_str())
            .is_none()
            .then(|| format!("unknown VM `{v}`"))
    };
    let app = |v: &Name, a: &Name| {
        vm(v).or_else(|| {
            config
                .vm(v.as_str())
                .and_then(|x| x.app(a.as_str()))
                .is_none()
                .then(|| format!("unknown app `{v}/{a}`"))
        })
    };
    match cmd {
        S::Tick | S::LogProbes(_) | S::StoreFail { .. } => None,
        S::AppFail { vm: v, app: a, .. }
        | S::AppRecover { vm: v, app: a }
        | S::AppHang { vm: v, app: a, .. }
        | S::AppGarble { vm: v, app: a, .. }
        | S::AppStart { vm: v, app: a, .. } => app(v, a),
        S::VmCrash { vm: v, .. }
        | S::VmReset { vm: v }
        | S::VmPause { vm: v, .. }
        | S::VmResume { vm: v }
        | S::GuestHang { vm: v, .. }
        | S::QemuHang { vm: v }
        | S::QemuResume { vm: v }
        | S::GuestHostile { vm: v, .. }
        | S::BootHang { vm: v, .. }
        | S::ExecBlocked { vm: v, .. }
        | S::WatchKill { vm: v } => vm(v),
        S::HostCrash(h)
        | S::HostIsolate(h)
        | S::HostRecover(h)
        | S::DaemonRestart(h)
        | S::HostMemory(h, _) => host(h),
        S::Admin { via, .. } => via.as_ref().and_then(host),
    }
}

/// Parses every line: its number, its delay and its command.
fn parse_lines(script: &str) -> Result<Vec<(usize, u64, SimCommand)>, SimError> {
    let mut out = Vec::new();
    for (n, raw) in script.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |msg: String| SimError::Script { line: n + 1, msg };
        let mut words = line.split_whitespace();
        let delay = words.next().unwrap_or("");
        let Some(delay) = delay.strip_prefix('+') else {
            return Err(err(format!("expected `+DELAY`, got `{delay}`")));
        };
        let delay = ms_of(delay).map_err(err)?;
        let words: Vec<&str> = words.collect();
        let cmd = parse_command(&words).map_err(err)?;
        out.push((n + 1, delay, cmd));
    }
    Ok(out)
}

fn parse_command(w: &[&str]) -> Result<SimCommand, String> {
    let arg = |i: usize| -> Result<&str, String> {
        w.get(i)
            .copied()
            .ok_or_else(|| format!("`{}` needs more arguments", w.join(" ")))
    };
    let vm = |i: usize| arg(i).and_then(name);
    let va = |i: usize| -> Result<(Name, Name), String> { Ok((vm(i)?, vm(i + 1)?)) };
    let cmd = match arg(0)? {
        "tick" => SimCommand::Tick,
        "watch-kill" => SimCommand::WatchKill { vm: vm(1)? },
        "log-probes" => SimCommand::LogProbes(match arg(1)? {
            "on" => true,
            "off" => false,
            other => return Err(format!("log-probes takes on or off, not `{other}`")),
        }),
        "app-fail" => {
            let (vm, app) = va(1)?;
            let exit = match w.get(3) {
                Some(x) => x
                    .strip_prefix("exit:")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("expected exit:N, got `{x}`"))?,
                None => 3,
            };
            SimCommand::AppFail { vm, app, exit }
        }
        "app-recover" => {
            let (vm, app) = va(1)?;
            SimCommand::AppRecover { vm, app }
        }
        "app-hang" | "app-unhang" | "app-garble" | "app-ungarble" => {
            let (vm, app) = va(1)?;
            let on = !w[0].starts_with("app-un");
            if w[0].ends_with("hang") {
                SimCommand::AppHang { vm, app, on }
            } else {
                SimCommand::AppGarble { vm, app, on }
            }
        }
        "app-start-fails" | "app-start-noop" | "app-start-ok" => {
            let (vm, app) = va(1)?;
            let behaviour = match w[0] {
                "app-start-fails" => StartBehaviour::Fails,
                "app-start-noop" => StartBehaviour::Noop,
                _ => StartBehaviour::Ok,
            };
            SimCommand::AppStart { vm, app, behaviour }
        }
        "vm-crash" => SimCommand::VmCrash {
            vm: vm(1)?,
            kind: match w.get(2).copied().unwrap_or("gone") {
                "panic" => CrashKind::Panic,
                "shutdown" => CrashKind::Shutdown,
                "gone" => CrashKind::Gone,
                x => return Err(format!("unknown crash kind `{x}`")),
            },
        },
        "vm-reset" => SimCommand::VmReset { vm: vm(1)? },
        "vm-pause" => SimCommand::VmPause {
            vm: vm(1)?,
            reason: pause_reason(w.get(2).copied().unwrap_or("admin"))?,
        },
        "vm-resume" => SimCommand::VmResume { vm: vm(1)? },
        "guest-hang" => SimCommand::GuestHang {
            vm: vm(1)?,
            on: true,
        },
        "guest-recover" => SimCommand::GuestHang {
            vm: vm(1)?,
            on: false,
        },
        "qemu-hang" => SimCommand::QemuHang { vm: vm(1)? },
        "qemu-resume" => SimCommand::QemuResume { vm: vm(1)? },
        "guest-hostile" => SimCommand::GuestHostile {
            vm: vm(1)?,
            on: true,
        },
        "guest-honest" => SimCommand::GuestHostile {
            vm: vm(1)?,
            on: false,
        },
        "boot-hang" => SimCommand::BootHang {
            vm: vm(1)?,
            on: true,
        },
        "boot-ok" => SimCommand::BootHang {
            vm: vm(1)?,
            on: false,
        },
        "host-crash" => SimCommand::HostCrash(vm(1)?),
        "host-isolate" => SimCommand::HostIsolate(vm(1)?),
        "host-recover" => SimCommand::HostRecover(vm(1)?),
        "daemon-restart" => SimCommand::DaemonRestart(vm(1)?),
        "exec-blocked" => SimCommand::ExecBlocked {
            vm: vm(1)?,
            on: true,
        },
        "exec-allowed" => SimCommand::ExecBlocked {
            vm: vm(1)?,
            on: false,
        },
        "host-memory" => SimCommand::HostMemory(
            vm(1)?,
            arg(2)?
                .parse()
                .map_err(|_| "memory must be an integer".to_string())?,
        ),
        "admin" => SimCommand::Admin {
            via: None,
            command: parse_admin(&w[1..])?,
        },
        "store-fail" => SimCommand::StoreFail { on: true },
        "store-ok" => SimCommand::StoreFail { on: false },
        other if other.starts_with("admin@") => SimCommand::Admin {
            via: Some(name(&other["admin@".len()..])?),
            command: parse_admin(&w[1..])?,
        },
        other => return Err(format!("unknown command `{other}`")),
    };
    Ok(cmd)
}

fn parse_admin(w: &[&str]) -> Result<AdminCommand, String> {
    use AdminCommand as C;
    let arg = |i: usize| -> Result<&str, String> {
        w.get(i)
            .copied()
            .ok_or_else(|| format!("`admin {}` needs more arguments", w.join(" ")))
    };
    let num = |i: usize| -> Result<u32, String> {
        arg(i)?
            .parse()
            .map_err(|_| format!("`{}` is not a number", w[i]))
    };
    Ok(match arg(0)? {
        "app-offline" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppOffline {
                vm,
                app,
                auto_clear: w.get(2) != Some(&"sticky"),
            }
        }
        "app-online" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppOnline { vm, app }
        }
        "app-start" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppStart { vm, app }
        }
        "app-stop" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::AppStop { vm, app }
        }
        "vm-start" => C::VmStart { vm: name(arg(1)?)? },
        "vm-stop" => C::VmStop { vm: name(arg(1)?)? },
        "vm-restart" => C::VmRestart { vm: name(arg(1)?)? },
        "move" => C::VmMove {
            vm: name(arg(1)?)?,
            to: name(arg(2)?)?,
            restart: match w.get(3).copied() {
                None => false,
                Some("--restart") => true,
                Some(x) => return Err(format!("expected --restart or nothing, got `{x}`")),
            },
        },
        "maintenance" => C::HostMaintenance {
            host: name(arg(1)?)?,
            on: match arg(2)? {
                "on" => true,
                "off" => false,
                x => return Err(format!("expected on|off, got `{x}`")),
            },
        },
        "freeze" => C::Freeze { vm: name(arg(1)?)? },
        "unfreeze" => C::Unfreeze { vm: name(arg(1)?)? },
        "clear" => C::Clear { vm: name(arg(1)?)? },
        "priority" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::SetPriority {
                vm,
                app,
                priority: num(2)?,
            }
        }
        "app-budget" => {
            let (vm, app) = vm_app(arg(1)?)?;
            C::SetAppBudget {
                vm,
                app,
                restart_limit: num(2)?,
                restart_window_ms: ms_of(arg(3)?)?,
            }
        }
        "vm-budget" => C::SetVmBudget {
            vm: name(arg(1)?)?,
            vm_restart_limit: num(2)?,
            vm_restart_window_ms: ms_of(arg(3)?)?,
        },
        "policy" => C::SetPolicy {
            vm: name(arg(1)?)?,
            policy: match arg(2)? {
                "highest-priority" => Policy::HighestPriority,
                "weighted" => Policy::Weighted,
                "weighted-with-offline" => Policy::WeightedWithOffline,
                "critical" => Policy::Critical,
                x => return Err(format!("unknown policy `{x}`")),
            },
            tie: match w.get(3).copied() {
                None => None,
                Some("restart") => Some(Tie::Restart),
                Some("no-action") => Some(Tie::NoAction),
                Some(x) => return Err(format!("unknown tie `{x}`")),
            },
        },
        other => return Err(format!("unknown admin command `{other}`")),
    })
}
