//! `vmha-fake-qemu`: a stand-in for `qemu-system-x86_64`, for benchmarks and tests only. It takes
//! QEMU's command line as vmhad's driver writes it (`-qmp unix:…`, `-chardev socket,path=…`,
//! `-pidfile …`), answers QMP on the VM's QMP socket (greeting, `qmp_capabilities`,
//! `query-status` → running, `query-chardev` → the `-chardev` ids of its command line, which it
//! does not serve but the agent's; `chardev-add` and `device_add` refused; `system_powerdown`
//! and `quit` end it with a `SHUTDOWN` event), and
//! runs a real `qemu-ga` on the host in unix-listen mode on the VM's guest-agent socket (its pid in `qga.pid` beside it), so the
//! guest channel and the app checks are real. Every RPC but ping, sync, info and exec is blocked
//! in that agent (a `guest-shutdown` must never reach the host). The agent ends with the fake
//! QEMU, however that ends (SIGKILL included: the kernel's parent-death signal).
//!
//! Set `emulator = "/path/to/vmha-fake-qemu"` in a VM's `[vm.qemu]` to use it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The agent RPCs the benchmarks need; every other one is blocked.
const ALLOWED_RPCS: [&str; 6] = [
    "guest-ping",
    "guest-sync",
    "guest-sync-delimited",
    "guest-info",
    "guest-exec",
    "guest-exec-status",
];

/// The paths a QEMU command line names.
#[derive(Debug, Default, PartialEq)]
struct Paths {
    qmp: Option<PathBuf>,
    qga: Option<PathBuf>,
    pidfile: Option<PathBuf>,
    /// The ids of every `-chardev`, for `query-chardev`.
    chardevs: Vec<String>,
}

/// The value of `key` in a QEMU `a=b,c=d` option (`,,` is an escaped comma).
fn option_value(opt: &str, key: &str) -> Option<String> {
    let unescaped = opt.replace(",,", "\u{0}");
    unescaped
        .split(',')
        .find_map(|part| part.strip_prefix(&format!("{key}=")))
        .map(|v| v.replace('\u{0}', ","))
}

/// Reads the paths out of QEMU's arguments.
fn parse_args(args: &[OsString]) -> Paths {
    let mut paths = Paths::default();
    let text: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    for pair in text.windows(2) {
        match pair[0].as_str() {
            // The first `-qmp` is vmhad's monitor; a later one (the observers' socket) is not
            // served by this fake.
            "-qmp" if paths.qmp.is_none() => {
                let spec = pair[1].strip_prefix("unix:").unwrap_or(&pair[1]);
                let path = spec.replace(",,", "\u{0}");
                let path = path.split(',').next().unwrap_or_default();
                paths.qmp = Some(PathBuf::from(path.replace('\u{0}', ",")));
            }
            "-chardev" => {
                let id = option_value(&pair[1], "id").unwrap_or_default();
                if id == "qga0" {
                    paths.qga = option_value(&pair[1], "path").map(PathBuf::from);
                }
                paths.chardevs.push(id);
            }
            "-pidfile" => paths.pidfile = Some(PathBuf::from(&pair[1])),
            _ => {}
        }
    }
    paths
}

/// The RPCs to block: all that `qemu-ga -b help` lists except [`ALLOWED_RPCS`].
fn blocked_rpcs() -> anyhow::Result<String> {
    let out = Command::new("qemu-ga")
        .args(["-b", "help"])
        .output()
        .context("running qemu-ga -b help")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let blocked: Vec<&str> = text
        .split_whitespace()
        .filter(|rpc| rpc.starts_with("guest-") && !ALLOWED_RPCS.contains(rpc))
        .collect();
    if !blocked.contains(&"guest-shutdown") {
        bail!("qemu-ga -b help did not list guest-shutdown: refusing to run an unguarded agent");
    }
    Ok(blocked.join(","))
}

/// Starts `qemu-ga` listening on `socket`, its pidfile and state in `dir`. It is killed when
/// this process dies, however it dies (util-linux `setpriv --pdeathsig`, which then execs
/// qemu-ga under the same pid): a fake QEMU killed by vmhad or a test leaves no agent behind.
fn start_agent(socket: &Path, dir: &Path) -> anyhow::Result<Child> {
    let _ = std::fs::remove_file(socket);
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", "qemu-ga"])
        .arg("-m")
        .arg("unix-listen")
        .arg("-p")
        .arg(socket)
        .arg("-f")
        .arg(dir.join("qga-own.pid"))
        .arg("-t")
        .arg(dir)
        .arg("-b")
        .arg(blocked_rpcs()?)
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-ga (through util-linux setpriv)")
}

/// The answer to one QMP command line of a fake QEMU with `chardevs`; `true` when QEMU should
/// end after it.
fn answer(line: &str, chardevs: &[String]) -> (Value, bool) {
    let Ok(request) = serde_json::from_str::<Value>(line) else {
        return (
            json!({"error": {"class": "GenericError", "desc": "bad JSON"}}),
            false,
        );
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let command = request["execute"].as_str().unwrap_or_default();
    let (ret, end) = match command {
        "query-status" => (
            json!({"status": "running", "running": true, "singlestep": false}),
            false,
        ),
        "query-chardev" => (
            chardevs
                .iter()
                .map(|id| json!({"label": id, "filename": "fake", "frontend-open": false}))
                .collect(),
            false,
        ),
        "chardev-add" | "device_add" => {
            let desc = format!("{command} is not supported by vmha-fake-qemu");
            let error = json!({"error": {"class": "GenericError", "desc": desc}, "id": id});
            return (error, false);
        }
        "system_powerdown" | "quit" => (json!({}), true),
        _ => (json!({}), false),
    };
    (json!({"return": ret, "id": id}), end)
}

/// Serves one QMP client until it leaves; `true` when it asked QEMU to end.
fn serve(stream: UnixStream, chardevs: &[String]) -> bool {
    let Ok(reader) = stream.try_clone() else {
        return false;
    };
    let mut writer = stream;
    let greeting = json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9},
        "package": "vmha-fake-qemu"}, "capabilities": []}});
    if writeln!(writer, "{greeting}").is_err() {
        return false;
    }
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { return false };
        let (reply, end) = answer(&line, chardevs);
        if writeln!(writer, "{reply}").is_err() {
            return false;
        }
        if end {
            let event = json!({"event": "SHUTDOWN", "data": {"guest": false,
                "reason": "host-qmp-quit"}, "timestamp": {"seconds": 0, "microseconds": 0}});
            let _ = writeln!(writer, "{event}");
            return true;
        }
    }
    false
}

fn run() -> anyhow::Result<()> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let paths = parse_args(&args);
    let qmp = paths.qmp.context("no -qmp unix:PATH argument")?;
    let qga = paths
        .qga
        .context("no -chardev socket,path=…,id=qga0 argument")?;
    let dir = qmp.parent().context("QMP socket path has no directory")?;
    let agent = start_agent(&qga, dir)?;
    // qemu-ga writes its pidfile only when it daemonizes: the benchmark finds it here.
    std::fs::write(dir.join("qga.pid"), format!("{}\n", agent.id()))?;
    let agent = Arc::new(Mutex::new(agent));
    let chardevs = Arc::new(paths.chardevs);
    if let Some(pidfile) = &paths.pidfile {
        std::fs::write(pidfile, format!("{}\n", std::process::id()))?;
    }
    let _ = std::fs::remove_file(&qmp);
    let listener =
        UnixListener::bind(&qmp).with_context(|| format!("binding {}", qmp.display()))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let agent = Arc::clone(&agent);
        let chardevs = Arc::clone(&chardevs);
        std::thread::spawn(move || {
            if serve(stream, &chardevs) {
                if let Ok(mut child) = agent.lock() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                std::process::exit(0);
            }
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha-fake-qemu: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn answers_status_and_ends_on_quit_only() {
        let answer = |line| answer(line, &[]);
        let (r, end) = answer(r#"{"execute":"query-status","id":3}"#);
        assert_eq!(r["return"]["running"], true);
        assert_eq!(r["id"], 3);
        assert!(!end);
        assert!(answer(r#"{"execute":"quit","id":4}"#).1);
        assert!(answer(r#"{"execute":"system_powerdown"}"#).1);
        assert!(!answer(r#"{"execute":"cont"}"#).1);
        assert!(answer("{nope").0.get("error").is_some());
    }

    #[test]
    fn lists_its_command_line_chardevs_and_refuses_hot_plug() {
        let args: Vec<OsString> = [
            "-chardev",
            "socket,path=/r/vm/qga.sock,server=on,wait=off,id=qga0",
            "-chardev",
            "socket,path=/r/vm/bell.sock,server=on,wait=off,id=vmhabell0",
        ]
        .map(OsString::from)
        .to_vec();
        let paths = parse_args(&args);
        assert_eq!(paths.qga, Some(PathBuf::from("/r/vm/qga.sock")));
        let (r, _) = answer(r#"{"execute":"query-chardev","id":1}"#, &paths.chardevs);
        let labels: Vec<&str> = r["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["label"].as_str().unwrap())
            .collect();
        assert_eq!(labels, ["qga0", "vmhabell0"]);
        let (r, end) = answer(r#"{"execute":"device_add","id":2}"#, &paths.chardevs);
        assert_eq!(r["error"]["class"], "GenericError");
        assert_eq!(r["id"], 2);
        assert!(!end);
    }
}
