//! `vmha config validate|show|apply` on paths that are not configuration files: a directory, a
//! FIFO (whose open used to hang the command), a character device, a file that is not UTF-8,
//! one too large, one with a megabyte line. Each returns promptly with exit 2, a clear message
//! on stderr, nothing on stdout and nothing sent to vmhad.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a command may run before the test calls it hung (a guard against a regression
/// hanging the suite, not a speed check: the commands take milliseconds).
const HUNG: Duration = Duration::from_secs(60);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `vmha ARGS` with a socket nobody serves; kills it and fails if it hangs.
fn vmha(args: &[&str], socket: &Path) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmha"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + HUNG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmha {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Every subcommand that reads a file refuses `path` with exit 2 and `expect` on stderr.
fn refused(path: &Path, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let p = path.to_str().unwrap();
    for args in [
        vec!["config", "validate", p],
        vec!["config", "show", p],
        vec!["config", "apply", p],
    ] {
        let run = vmha(&args, &socket);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(expect),
            "{args:?}: stderr lacks {expect:?}:\n{}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{args:?} printed {:?}", run.stdout);
        // `apply` stopped before contacting vmhad: an attempt would have said so.
        assert!(!run.stderr.contains("nobody.sock"), "{}", run.stderr);
    }
}

#[test]
fn fifo_directory_and_device_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("vmha.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let p = fifo.to_str().unwrap().to_string();
    refused(
        &fifo,
        &format!("{p}: is a named pipe (FIFO), not a configuration file"),
    );
    // Refused, not consumed: it is still a FIFO.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    refused(dir.path(), "is a directory, not a configuration file");
    refused(Path::new("/dev/null"), "/dev/null: is a character device");
}

#[test]
fn non_utf8_file_is_located_by_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.toml");
    std::fs::write(&path, b"[cluster]\nname = \"lab\"\n# caf\xe9\n").unwrap();
    let p = path.to_str().unwrap().to_string();
    refused(&path, &format!("{p}:3:6: not UTF-8 text: byte 0xE9"));
}

#[test]
fn huge_files_and_lines_give_short_messages() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "#".repeat(5 * 1024 * 1024)).unwrap();
    refused(&big, "more than a configuration file may have");

    let long = dir.path().join("long.toml");
    let value = "y".repeat(1024 * 1024);
    std::fs::write(
        &long,
        format!("[cluster]\nname = \"lab\"\n\n[[host]]\nname = \"h\"\naddress = {value}\n"),
    )
    .unwrap();
    let p = long.to_str().unwrap().to_string();
    refused(&long, &format!("{p}:6:11: invalid TOML in `address`"));
    let socket = dir.path().join("nobody.sock");
    let run = vmha(&["config", "validate", &p], &socket);
    assert!(
        run.stderr.len() < 4096,
        "{} bytes on stderr",
        run.stderr.len()
    );
    assert!(run.stderr.contains("more bytes)"), "{}", run.stderr);
    assert!(
        run.stderr.contains("hint: put text in double quotes"),
        "{}",
        run.stderr
    );
}
