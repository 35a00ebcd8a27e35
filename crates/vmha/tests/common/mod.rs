//! What the CLI tests share: the built `vmha` run with a clean environment and a guard against
//! hangs, its output as text, and one HTTP request read the way a stand-in for vmhad reads it.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Longer than any run of `vmha` in the tests may take: reaching it means vmha hung.
pub const GUARD: Duration = Duration::from_secs(60);

/// The variables through which the environment reaches vmha; none of the test's own is passed on.
const VMHA_VARS: [&str; 5] = [
    "VMHA_SOCKET",
    "VMHA_TIMEOUT",
    "VMHA_URL",
    "VMHA_TOKEN",
    "VMHA_CA_CERT",
];

/// `vmha args…` with none of the test's `VMHA_*` variables, plus `env`; stdin closed, stdout
/// and stderr captured.
pub fn vmha_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmha"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in VMHA_VARS {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `vmha args…` (as [`vmha_command`] sets it up), killing it and failing the test if it
/// has not ended by [`GUARD`].
pub fn vmha(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = vmha_command(args, env).spawn().unwrap();
    let deadline = Instant::now() + GUARD;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("vmha {args:?} hung; stderr: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// What a run wrote on stdout, as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a run wrote on stderr, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Reads one HTTP request from `stream`: its head (request line and headers, without the blank
/// line that ends them) and its body (`Content-Length` bytes), so that closing the connection
/// afterwards resets nothing.
pub fn read_request(stream: impl Read) -> (String, Vec<u8>) {
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = n.trim().parse().unwrap();
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (head, body)
}
