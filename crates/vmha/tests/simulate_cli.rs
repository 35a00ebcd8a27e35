//! `vmha simulate`: on the shipped example configuration, the host-loss what-if prints the same
//! event log as the engine's scenario 75 (the same config and script, played by the scenario
//! tests); bad scripts are refused before anything runs (exit 2, naming the line); a snapshot
//! read from vmhad (a one-shot stand-in here; the real vmhad is in vmhad's `simulate` test)
//! in which a VM runs on two hosts fires a safety check (exit 3); the what-if sessions shown in
//! README.md and docs/simulate.md are run and print what they show.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use serde_json::{Value, json};
use vmha_engine::sim::Sim;
use vmha_model::Config;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const EXAMPLE: &str = "examples/three-hosts-etcd.toml";
const SCRIPT: &str = "examples/what-if-kvm1-down.txt";
const SCENARIO: &str = "crates/vmha-engine/tests/scenarios/75-what-if-example-kvm1-down";

fn vmha(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmha"))
        .current_dir(root())
        .args(args)
        .env_remove("VMHA_SOCKET")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

#[test]
fn the_example_what_if_prints_the_scenarios_event_log() {
    // The scenario plays exactly the shipped files.
    assert_eq!(read(&format!("{SCENARIO}/config.toml")), read(EXAMPLE));
    assert_eq!(read(&format!("{SCENARIO}/input.txt")), read(SCRIPT));
    let golden = read(&format!("{SCENARIO}/expected.log"));

    let out = vmha(&["simulate", "--config", EXAMPLE, SCRIPT, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut log: String = outcome["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("{}\n", l.as_str().unwrap()))
        .collect();
    for v in outcome["violations"].as_array().unwrap() {
        log.push_str(&format!("VIOLATION {}\n", v.as_str().unwrap()));
    }
    assert_eq!(log, golden);
    assert_eq!(
        outcome["source"],
        json!({"kind": "config", "file": EXAMPLE})
    );
    let db01 = &outcome["vms"][0];
    assert_eq!(db01["vm"], "db01");
    assert_eq!(db01["owner"], "kvm2");
    assert_eq!(db01["running_on"], json!(["kvm2"]));
    assert_eq!(outcome["hosts"][0]["running"], false);

    // The same script on stdin (`-`) gives the same outcome, apart from where it came from.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmha"))
        .current_dir(root())
        .args(["simulate", "--config", EXAMPLE, "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(read(SCRIPT).as_bytes())
        .unwrap();
    let piped = child.wait_with_output().unwrap();
    assert_eq!(piped.status.code(), Some(0));
    let piped: Value = serde_json::from_slice(&piped.stdout).unwrap();
    assert_eq!(piped, outcome);

    // The text form prints the same log, then the tables.
    let out = vmha(&["simulate", "--config", EXAMPLE, SCRIPT]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let (log, tables) = stdout.split_once("\n\n").unwrap();
    let log: String = log
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(log, golden);
    assert!(
        tables.contains("\ndb01    online  kvm2   run      kvm2\n"),
        "{tables}"
    );
    assert!(tables.contains("\nkvm1  down   crashed\n"), "{tables}");
    assert!(
        tables.ends_with("safety checks: no violation\n"),
        "{tables}"
    );
}

/// The fenced blocks of `doc` that are shell sessions running `vmha simulate`.
fn simulate_sessions(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    for line in doc.lines() {
        if line.starts_with("```") {
            match block.take() {
                Some(b) => blocks.push(b),
                None => block = Some(String::new()),
            }
        } else if let Some(b) = block.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
        .into_iter()
        .filter(|b| b.lines().any(|l| l.starts_with("$ vmha simulate")))
        .collect()
}

/// The commands of a session (`$ ` lines, continued after a trailing `\`), each with the
/// output shown after it.
fn session_steps(block: &str) -> Vec<(String, String)> {
    let mut steps: Vec<(String, String)> = Vec::new();
    let mut continued = false;
    for line in block.lines() {
        if let Some(command) = line.strip_prefix("$ ") {
            steps.push((format!("{command}\n"), String::new()));
        } else if continued {
            steps.last_mut().unwrap().0.push_str(&format!("{line}\n"));
        } else {
            steps.last_mut().unwrap().1.push_str(&format!("{line}\n"));
        }
        continued = line.ends_with('\\');
    }
    steps
}

/// Runs a session shown in a doc, from a directory that looks like a clone (its `examples`),
/// with this build's `vmha` first in `PATH`: every command prints exactly what the doc shows
/// after it; `cat FILE` of a file not there writes the lines shown into it (the doc's script).
fn run_session(doc: &str, block: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root().join("examples"), dir.path().join("examples")).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_vmha")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    for (command, shown) in session_steps(block) {
        if let Some(file) = command.trim().strip_prefix("cat ")
            && !file.contains(' ')
            && !dir.path().join(file).exists()
        {
            std::fs::write(dir.path().join(file), &shown).unwrap();
            continue;
        }
        let out = Command::new("sh")
            .args(["-c", &command])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("VMHA_SOCKET")
            .output()
            .unwrap();
        assert_eq!(
            text(&out.stdout),
            shown,
            "{doc}: `{}` printed otherwise than shown (stderr: {})",
            command.trim(),
            text(&out.stderr)
        );
    }
}

#[test]
fn the_what_if_sessions_in_the_docs_print_what_they_show() {
    for (doc, sessions) in [("README.md", 1), ("docs/simulate.md", 2)] {
        let blocks = simulate_sessions(&read(doc));
        assert_eq!(blocks.len(), sessions, "{doc}: {blocks:?}");
        for block in blocks {
            run_session(doc, &block);
        }
    }
}

#[test]
fn bad_scripts_and_arguments_exit_2_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("+1s host-crash kvm9\n", "line 1: unknown host `kvm9`"),
        ("# ok\n+1s tick\nsoon tick\n", "line 3: expected `+DELAY`"),
        (
            "+1s app-fail db01 mysql\n",
            "line 1: unknown app `db01/mysql`",
        ),
        ("+1s explode kvm1\n", "line 1: unknown command `explode`"),
        ("+1x tick\n", "line 1: bad duration"),
        ("+1d tick\n+25h tick\n", "line 2: a delay is at most 1d"),
    ];
    for (i, (script, want)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("s{i}.txt"));
        std::fs::write(&file, script).unwrap();
        let out = vmha(&["simulate", "--config", EXAMPLE, file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{script}");
        assert!(
            text(&out.stderr).contains(want),
            "{script}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{script}");
    }
    let missing = vmha(&["simulate", "--config", EXAMPLE, "/nonexistent/what-if.txt"]);
    assert_eq!(missing.status.code(), Some(2));
    let both = vmha(&["simulate", "--config", EXAMPLE, "--from-cluster", SCRIPT]);
    assert_eq!(both.status.code(), Some(2));
    let neither = vmha(&["simulate", SCRIPT]);
    assert_eq!(neither.status.code(), Some(2));
    let bad_config = vmha(&["simulate", "--config", SCRIPT, SCRIPT]);
    assert_eq!(bad_config.status.code(), Some(2));
}

/// A one-shot stand-in for vmhad: answers the first request on `socket` with the JSON `body`
/// and hands back the request line it read.
fn answer_once(socket: &Path, body: String) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    let answer = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut first = String::new();
        std::io::BufRead::read_line(&mut reader, &mut first).unwrap();
        loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        std::io::Write::write_all(reader.get_mut(), answer.as_bytes()).unwrap();
        first
    })
}

#[test]
fn a_cluster_state_with_a_vm_on_two_hosts_fires_a_safety_check() {
    let config_text = read(EXAMPLE);
    let config = Arc::new(Config::from_toml_str(&config_text, EXAMPLE).unwrap());
    let mut sim = Sim::new(config).unwrap();
    sim.run_script("+5s tick\n").unwrap();
    let mut snapshot = serde_json::to_value(sim.snapshot()).unwrap();
    // kvm2 also claims to run db01, which runs on kvm1.
    let kvm2 = snapshot["records"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["kind"] == "agent" && r["host"] == "kvm2")
        .unwrap();
    kvm2["state"]["agent"]["vms"]["db01"] = json!({ "running": true });
    let view = json!({
        "host": "kvm1",
        "cluster": "prod",
        "config": config_text,
        "snapshot": snapshot,
    });

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let server = answer_once(&socket, view.to_string());
    let out = vmha(&[
        "--socket",
        socket.to_str().unwrap(),
        "simulate",
        "--from-cluster",
        SCRIPT,
    ]);
    assert_eq!(server.join().unwrap(), "GET /v1/snapshot HTTP/1.0\r\n");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("# simulation of cluster prod from its state as kvm1 sees it"),
        "{stdout}"
    );
    // Times count from the snapshot: the restore found it at once.
    assert!(
        stdout.contains("\nSAFETY VIOLATION: 0 db01 runs on kvm1 and kvm2\n"),
        "{stdout}"
    );
}
