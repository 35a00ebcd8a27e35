//! Runs the built `vmha` binary against vmhad's API: usage errors are caught before anything is
//! sent (exit 2), an absent daemon is reported (exit 3), a refusal prints vmhad's message and,
//! when the command may be retried, a hint (against a one-shot stand-in), and against a real
//! `vmhad` (one host, no VMs, embedded store in a temp dir) status, events, refusals and host
//! maintenance work end to end — also remotely, over its TCP API with tokens, plain and TLS
//! (401/403 → exit 4).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{read_request, stderr, stdout};

/// Runs `vmha args…` with none of the test's `VMHA_*` variables (guarded against hangs).
fn vmha(args: &[&str]) -> Output {
    common::vmha(args, &[])
}

/// The lines `child` writes on its stdout (piped), as a background thread reads them.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let lines = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(lines) {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn usage_errors_exit_2_and_send_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let socket = socket.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["app", "offline", "shop"], "expected VM/APP"),
        (&["app", "start", "shop/-web"], "bad app name"),
        (&["app", "online", "sh op/web"], "bad VM name"),
        (&["set", "priority", "shop/web", "0"], "0"),
        (
            &[
                "set",
                "app-budget",
                "shop/db",
                "--limit",
                "3",
                "--window",
                "10x",
            ],
            "unknown unit `x`",
        ),
        (
            &[
                "set",
                "vm-budget",
                "shop",
                "--limit",
                "2",
                "--window",
                "ten",
            ],
            "expected a number",
        ),
        (
            &["set", "vm-budget", "shop", "--limit", "2", "--window", "0s"],
            "`vm_restart_window` = \"0s\" is out of range (allowed: 1s to 7d)",
        ),
        // Run-time values have the ranges of the configuration file.
        (
            &["set", "priority", "shop/web", "4000000000"],
            "`priority` = 4000000000 is out of range (allowed: 1 to 1000000)",
        ),
        (
            &[
                "set",
                "app-budget",
                "shop/db",
                "--limit",
                "1001",
                "--window",
                "1m",
            ],
            "`restart_limit` = 1001 is out of range (allowed: 0 to 1000)",
        ),
        (
            &[
                "set",
                "app-budget",
                "shop/db",
                "--limit",
                "3",
                "--window",
                "8d",
            ],
            "`restart_window` = \"8d\" is out of range (allowed: 1s to 7d)",
        ),
        (
            &[
                "set",
                "vm-budget",
                "shop",
                "--limit",
                "4294967295",
                "--window",
                "1h",
            ],
            "`vm_restart_limit` = 4294967295 is out of range (allowed: 0 to 100)",
        ),
        (&["set", "policy", "shop", "fastest"], "highest-priority"),
        (
            &["set", "policy", "shop", "weighted", "--tie", "coin"],
            "no-action",
        ),
        (&["host", "maintenance", "kvm1", "maybe"], "maybe"),
        (&["vm", "move", "shop", "kvm/2"], "not a valid name"),
        (
            &["guest", "exec", "shop", "--timeout", "1h", "--", "true"],
            "between 1ms and 10m",
        ),
        (&["guest", "exec", "shop"], "ARGV"),
        (&["explain", "../etc"], "not a valid name"),
    ];
    for (args, needle) in cases {
        let mut argv = vec!["--socket", socket];
        argv.extend_from_slice(args);
        let out = vmha(&argv);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
        match listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("{args:?} connected to vmhad: {other:?}"),
        }
    }
}

/// A one-shot stand-in for vmhad: answers the first request on `socket` with `status` and the
/// JSON `body`, and hands back the request it read.
fn answer_once(socket: &Path, status: &str, body: &str) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    let answer = format!(
        "HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let (head, body) = read_request(&stream);
        stream.write_all(answer.as_bytes()).unwrap();
        head + "\r\n" + &String::from_utf8(body).unwrap()
    })
}

#[test]
fn retryable_refusals_exit_1_with_vmhads_message_and_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let server = answer_once(
        &socket,
        "503 Service Unavailable",
        r#"{"error": "the cluster store cannot commit changes now (etcd: deadline exceeded); nothing was changed",
            "command_error": {"error": "store-unavailable", "detail": "etcd: deadline exceeded"}}"#,
    );
    let out = vmha(&["--socket", socket.to_str().unwrap(), "freeze", "shop"]);
    let request = server.join().unwrap();
    assert!(request.starts_with("POST /v1/commands "), "{request}");
    assert!(request.contains(r#""command":"freeze""#), "{request}");
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.first(),
        Some(
            &"vmha: the cluster store cannot commit changes now (etcd: deadline exceeded); \
              nothing was changed"
        ),
        "{err}"
    );
    assert!(
        lines.get(1).is_some_and(
            |l| l.starts_with("vmha: hint: the command changed nothing and may be retried")
        ),
        "{err}"
    );

    // A refusal that retrying would not cure: vmhad's message alone.
    std::fs::remove_file(&socket).unwrap();
    let server = answer_once(
        &socket,
        "409 Conflict",
        r#"{"error": "VM `shop` is frozen; unfreeze it first",
            "command_error": {"error": "frozen", "detail": "shop"}}"#,
    );
    let out = vmha(&["--socket", socket.to_str().unwrap(), "vm", "stop", "shop"]);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "vmha: VM `shop` is frozen; unfreeze it first\n"
    );
}

#[test]
fn unreachable_daemon_exits_3_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let out = vmha(&["--socket", missing.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.contains("vmhad is not running (no socket at "), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    // --state-dir names DIR/vmhad.sock; $VMHA_SOCKET is the default.
    let out = vmha(&[
        "freeze",
        "shop",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let expected = dir.path().join("vmhad.sock");
    assert!(
        stderr(&out).contains(expected.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vmha"))
        .args(["events", "--limit", "5"])
        .env("VMHA_SOCKET", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains(missing.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
}

/// A real vmhad in a temp dir, killed when dropped.
struct Vmhad {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Vmhad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmhad {
    /// The vmhad binary built next to this vmha (`cargo build -p vmhad`), if there is one.
    fn binary() -> Option<PathBuf> {
        let path = Path::new(env!("CARGO_BIN_EXE_vmha")).with_file_name("vmhad");
        path.is_file().then_some(path)
    }

    /// Starts vmhad with one host, no VMs and an embedded store; waits until its API answers
    /// and it has become the cluster controller.
    fn start(binary: &Path) -> Vmhad {
        Self::start_with(binary, |_| String::new())
    }

    /// [`Vmhad::start`] with more configuration: `extra(dir)` is appended (`dir`: the temp
    /// dir, for files the configuration names).
    fn start_with(binary: &Path, extra: impl FnOnce(&Path) -> String) -> Vmhad {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("vmha.toml");
        let more = extra(dir.path());
        std::fs::write(
            &config,
            format!(
                "[cluster]\nname = \"lab\"\nstore = \"embedded\"\n\n[[host]]\nname = \"kvm1\"\n{more}"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("vmhad.log")).unwrap();
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let vmhad = Vmhad { child, dir };
        vmhad.wait_for("vmhad to become the cluster controller", |v| {
            v.json(&["status"])
                .is_some_and(|s| s["controller"] == Value::Bool(true))
        });
        vmhad
    }

    fn state_dir(&self) -> String {
        self.dir.path().join("state").to_str().unwrap().to_string()
    }

    /// `vmha --state-dir D args…`.
    fn vmha(&self, args: &[&str]) -> Output {
        let state_dir = self.state_dir();
        let mut argv = vec!["--state-dir", state_dir.as_str()];
        argv.extend_from_slice(args);
        vmha(&argv)
    }

    /// Puts host kvm1 in maintenance and takes it out again (two new events); both succeed.
    fn maintenance_on_off(&self) {
        for state in ["on", "off"] {
            let out = self.vmha(&["host", "maintenance", "kvm1", state]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
    }

    /// `vmha … args… --json` parsed, if it succeeded.
    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut argv = args.to_vec();
        argv.push("--json");
        let out = self.vmha(&argv);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vmhad.log")).unwrap_or_default()
    }

    /// Waits (bounded, generously: this is readiness, not a timing assertion) until `ready`.
    fn wait_for(&self, what: &str, ready: impl Fn(&Vmhad) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; vmhad log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn host_state(status: &Value, host: &str) -> Option<String> {
    status["cluster_view"]["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == host)?["state"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn against_a_real_vmhad() {
    let Some(binary) = Vmhad::binary() else {
        panic!(
            "against_a_real_vmhad needs vmhad next to {}: run `cargo build -p vmhad` first (the workspace test run builds it)",
            env!("CARGO_BIN_EXE_vmha")
        );
    };
    let vmhad = Vmhad::start(&binary);

    // status: the host, as controller, with the cluster's hosts.
    let out = vmhad.vmha(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("host kvm1 in cluster lab: runs the cluster controller\n"),
        "{text}"
    );
    assert!(
        text.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("cluster store: ok (")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("kvm1  up ")), "{text}");
    assert!(text.contains("no VM groups may run on kvm1"), "{text}");

    // An admin command about an unknown VM: vmhad refuses, naming it.
    let out = vmhad.vmha(&["vm", "restart", "ghost"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("ghost"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let out = vmhad.vmha(&["explain", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no VM named `ghost`"),
        "{}",
        stderr(&out)
    );

    // Maintenance on, seen in status; then off.
    let out = vmhad.vmha(&["host", "maintenance", "kvm1", "on"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "host kvm1 in maintenance: its VM groups are moved or stopped\n"
    );
    let status = vmhad.json(&["status"]).unwrap();
    assert_eq!(host_state(&status, "kvm1").as_deref(), Some("maintenance"));
    let out = vmhad.vmha(&["host", "maintenance", "kvm1", "off", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ok"], Value::Bool(true));
    let status = vmhad.json(&["status"]).unwrap();
    assert_eq!(host_state(&status, "kvm1").as_deref(), Some("up"));

    // events --json: NDJSON, one event per line, with the maintenance round trip once the
    // store writer has it.
    vmhad.wait_for("the maintenance events in the log", |v| {
        stdout(&v.vmha(&["events"])).contains("maintenance → up")
    });
    let out = vmhad.vmha(&["events", "--json", "--limit", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 3, "{lines:?}");
    for line in &lines {
        for field in [
            "host", "seq", "text", "time", "origin", "object", "from", "to", "reason",
        ] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|l| l["to"] == "maintenance" && l["object"]["host"] == "kvm1"),
        "{lines:?}"
    );

    // events as text: local time of day, origin (with the host a controller runs on), object,
    // transition and reason.
    let out = vmhad.vmha(&["events", "--limit", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    let last = text.lines().last().unwrap();
    let (clock, rest) = last.split_once(' ').unwrap();
    assert!(is_clock(clock), "{last}");
    assert!(
        rest.starts_with("controller@kvm1 host:kvm1 maintenance → up: "),
        "{last}"
    );
}

#[test]
fn events_follow_streams_live_until_vmhad_goes_away() {
    let Some(binary) = Vmhad::binary() else {
        panic!("this test needs vmhad: run `cargo build -p vmhad` first");
    };
    let mut vmhad = Vmhad::start(&binary);
    let state_dir = vmhad.state_dir();
    let mut follower = Command::new(env!("CARGO_BIN_EXE_vmha"))
        .args([
            "--state-dir",
            &state_dir,
            "events",
            "--follow",
            "--limit",
            "0",
        ])
        .env_remove("VMHA_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stdout_lines(&mut follower);

    // An event that happens after the follower connected reaches it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("host:kvm1 up → maintenance"))
    {
        // Repeated until the follower has subscribed: each on/off pair is two new events.
        vmhad.maintenance_on_off();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            seen.push(line);
        }
        assert!(Instant::now() < deadline, "nothing followed: {seen:?}");
    }
    assert!(
        seen.iter().all(|l| l.get(..12).is_some_and(is_clock)),
        "{seen:?}"
    );

    // vmhad going away ends the stream: exit 1, said on stderr.
    vmhad.child.kill().unwrap();
    vmhad.child.wait().unwrap();
    let out = follower.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("vmhad closed the event stream"),
        "{}",
        stderr(&out)
    );
}

/// `HH:MM:SS.mmm`.
fn is_clock(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, c)| match i {
            2 | 5 => *c == b':',
            8 => *c == b'.',
            _ => c.is_ascii_digit(),
        })
}

const ADMIN: &str = "admin-token-for-the-cli-tests-0123";
const READER: &str = "reader-token-for-the-cli-tests-0123";

/// The `[api]` section of a vmhad on 127.0.0.1:`port` with an admin and a read-only token
/// (secret files written in `dir`), TLS with vmhad's test certificate when `tls`.
fn api_section(dir: &Path, port: u16, tls: bool) -> String {
    std::fs::write(dir.join("admin.token"), format!("{ADMIN}\n")).unwrap();
    std::fs::write(dir.join("reader.token"), format!("{READER}\n")).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmhad/tests/data");
    let tls = if tls {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            data.join("tls-cert.pem").display(),
            data.join("tls-key.pem").display()
        )
    } else {
        String::new()
    };
    format!(
        "\n[api]\nlisten = [\"127.0.0.1:{port}\"]\n{tls}token = [\n  \
         {{ name = \"ops\", role = \"admin\", secret_file = \"{}\" }},\n  \
         {{ name = \"viewer\", role = \"read-only\", secret_file = \"{}\" }},\n]\n",
        dir.join("admin.token").display(),
        dir.join("reader.token").display(),
    )
}

/// Runs `vmha --url URL [--ca-cert CERT] args…` with `$VMHA_TOKEN` = `token` (if any).
fn remote(url: &str, ca: Option<&Path>, token: Option<&str>, args: &[&str]) -> Output {
    let env: Vec<(&str, &str)> = token.map(|t| ("VMHA_TOKEN", t)).into_iter().collect();
    let mut cmd = common::vmha_command(&[], &env);
    cmd.arg("--url").arg(url);
    if let Some(ca) = ca {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.args(args).output().unwrap()
}

#[test]
fn remote_commands_with_tokens_over_http_and_https() {
    let Some(binary) = Vmhad::binary() else {
        panic!("this test needs vmhad: run `cargo build -p vmhad` first");
    };
    let cert = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmhad/tests/data/tls-cert.pem");
    for tls in [false, true] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let vmhad = Vmhad::start_with(&binary, |dir| api_section(dir, port, tls));
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}");
        let ca = tls.then_some(cert.as_path());
        let run = |token: Option<&str>, args: &[&str]| remote(&url, ca, token, args);

        // The read-only token reads: the same status as over the socket.
        let out = run(Some(READER), &["status", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{url}: {}", stderr(&out));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["host"], "kvm1");
        assert_eq!(host_state(&status, "kvm1").as_deref(), Some("up"));

        // No token: 401 → exit 4 saying how to pass one. A wrong one: the same.
        for token in [None, Some("not-a-token-vmhad-knows-0123")] {
            let out = run(token, &["status"]);
            assert_eq!(out.status.code(), Some(4), "{url}: {}", stderr(&out));
            assert!(
                stderr(&out).contains(&format!("{url} refused the request: no valid token")),
                "{}",
                stderr(&out)
            );
            assert!(stdout(&out).is_empty());
        }

        // The read-only token on an admin command: 403 → exit 4, nothing changed.
        let out = run(Some(READER), &["host", "maintenance", "kvm1", "on"]);
        assert_eq!(out.status.code(), Some(4), "{url}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("admin commands need an admin token"),
            "{}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains(READER), "{}", stderr(&out));
        let status = vmhad.json(&["status"]).unwrap();
        assert_eq!(host_state(&status, "kvm1").as_deref(), Some("up"));

        // The admin token: maintenance on and off, seen over the socket.
        let out = run(Some(ADMIN), &["host", "maintenance", "kvm1", "on"]);
        assert_eq!(out.status.code(), Some(0), "{url}: {}", stderr(&out));
        let status = vmhad.json(&["status"]).unwrap();
        assert_eq!(host_state(&status, "kvm1").as_deref(), Some("maintenance"));
        let out = run(
            Some(ADMIN),
            &["host", "maintenance", "kvm1", "off", "--json"],
        );
        assert_eq!(out.status.code(), Some(0), "{url}: {}", stderr(&out));
        assert_eq!(
            serde_json::from_slice::<Value>(&out.stdout).unwrap()["ok"],
            Value::Bool(true)
        );
        // vmhad refusing the command itself (an unknown VM) is still exit 1.
        let out = run(Some(ADMIN), &["vm", "restart", "ghost"]);
        assert_eq!(out.status.code(), Some(1), "{url}: {}", stderr(&out));
        assert!(stderr(&out).contains("ghost"), "{}", stderr(&out));
        // events over TCP.
        let out = run(Some(READER), &["events", "--limit", "2", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{url}: {}", stderr(&out));
        assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));

        // events --follow over TCP: an event after the follower connected reaches it.
        let mut follower = Command::new(env!("CARGO_BIN_EXE_vmha"))
            .args([
                "--url", &url, "events", "--follow", "--limit", "0", "--json",
            ])
            .args(
                ca.map(|c| vec!["--ca-cert".as_ref(), c.as_os_str()])
                    .unwrap_or_default(),
            )
            .env_remove("VMHA_SOCKET")
            .env_remove("VMHA_URL")
            .env("VMHA_TOKEN", READER)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = stdout_lines(&mut follower);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen: Vec<Value> = Vec::new();
        while !seen.iter().any(|e| e["to"] == "maintenance") {
            // Repeated until the follower has subscribed: each on/off pair is two new events.
            vmhad.maintenance_on_off();
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
                seen.push(serde_json::from_str(&line).unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "{url}: nothing followed: {seen:?}"
            );
        }
        follower.kill().unwrap();
        follower.wait().unwrap();

        if tls {
            // https:// with only the system's CAs: vmhad's test certificate is not trusted.
            let out = remote(&url, None, Some(READER), &["status"]);
            assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
            assert!(
                stderr(&out).starts_with(&format!("vmha: TLS with {url} failed: ")),
                "{}",
                stderr(&out)
            );
            // http:// to the TLS listener: not vmhad's answer.
            let plain = format!("http://127.0.0.1:{port}");
            let out = remote(&plain, None, Some(READER), &["status"]);
            assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        }
    }
}
