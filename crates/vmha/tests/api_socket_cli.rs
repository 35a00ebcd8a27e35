//! Runs the built `vmha` binary against what may be found at vmhad's socket path instead of a
//! healthy vmhad: nothing, a stale socket file, a plain file, a socket that never answers (or
//! stops half-way, or has a full listen queue), one that answers something else than vmhad's
//! HTTP + JSON, and one planted by another user. Each ends with exit 3 (vmhad unreachable) and
//! a message naming the socket — never a hang (every run is guarded: a regression fails instead
//! of hanging). Also: `--timeout` wins over `$VMHA_TIMEOUT`, a followed event stream is not cut
//! by the timeout, and `guest exec` waits for its guest command's timeout plus a margin.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use common::{stderr, stdout, vmha};

/// Asserts exit 3 (vmhad unreachable) with exactly `message` on stderr (after `vmha: `) and
/// nothing on stdout.
fn fails_with(out: &Output, message: &str) {
    assert_eq!(out.status.code(), Some(3), "{}", stderr(out));
    assert_eq!(stderr(out), format!("vmha: {message}\n"));
    assert!(stdout(out).is_empty(), "{}", stdout(out));
}

/// A stand-in on `socket` that accepts connections and passes each (with the request head it
/// read, if `read_request`) to `serve`, until `connections` were served.
fn stand_in(
    socket: &Path,
    connections: usize,
    read_request: bool,
    serve: impl Fn(UnixStream, String) + Send + 'static,
) -> JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for _ in 0..connections {
            let (stream, _) = listener.accept().unwrap();
            let head = if read_request {
                common::read_request(&stream).0
            } else {
                String::new()
            };
            serve(stream, head);
        }
    })
}

/// Holds `stream` open without a word until vmha closes its end.
fn hold(mut stream: UnixStream) {
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

#[test]
fn nothing_at_the_path_or_a_stale_socket_means_vmhad_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("vmhad.sock");
    let p = missing.display();
    fails_with(
        &vmha(&["--socket", missing.to_str().unwrap(), "status"], &[]),
        &format!(
            "vmhad is not running (no socket at {p}); start it (`systemctl start vmhad`), or \
             point --socket, --state-dir or $VMHA_SOCKET at its socket"
        ),
    );

    // A socket file left by a vmhad that died: bound, then the listener dropped.
    drop(UnixListener::bind(&missing).unwrap());
    assert!(missing.exists());
    fails_with(
        &vmha(
            &["--socket", missing.to_str().unwrap(), "freeze", "shop"],
            &[],
        ),
        &format!("vmhad is not running (stale socket {p}: nothing listens on it); start vmhad"),
    );

    // A plain file is no socket at all.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "hello").unwrap();
    fails_with(
        &vmha(&["--socket", file.to_str().unwrap(), "status"], &[]),
        &format!(
            "{} is not vmhad's API socket (it is not a socket)",
            file.display()
        ),
    );
}

#[test]
fn a_socket_that_never_answers_times_out_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let s = socket.to_str().unwrap();
    let timed_out = |t: &str| {
        format!(
            "no answer from {s} within {t} (vmhad busy or not vmhad?); wait longer with \
             --timeout DUR or $VMHA_TIMEOUT"
        )
    };

    // Accepts, never answers.
    let server = stand_in(&socket, 2, false, |stream, _| hold(stream));
    fails_with(
        &vmha(&["--socket", s, "--timeout", "1s", "status"], &[]),
        &timed_out("1s"),
    );
    // The timeout covers the whole request: also a command's.
    fails_with(
        &vmha(
            &["--socket", s, "--timeout", "1s", "vm", "stop", "shop"],
            &[],
        ),
        &timed_out("1s"),
    );
    server.join().unwrap();

    // Answers the head, then stalls in the body: the whole answer is bounded.
    std::fs::remove_file(&socket).unwrap();
    let server = stand_in(&socket, 2, true, |mut stream, _| {
        stream
            .write_all(b"HTTP/1.0 200 OK\r\n\r\n{\"agent\":")
            .unwrap();
        hold(stream);
    });
    fails_with(
        &vmha(&["--socket", s, "--timeout", "1s", "status"], &[]),
        &timed_out("1s"),
    );
    fails_with(
        &vmha(&["--socket", s, "--timeout", "1s", "events"], &[]),
        &timed_out("1s"),
    );
    server.join().unwrap();
}

#[test]
fn a_full_listen_queue_times_out_the_connect() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let addr = UnixAddr::new(&socket).unwrap();
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let listener = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap();
    socket::bind(listener.as_raw_fd(), &addr).unwrap();
    socket::listen(&listener, Backlog::new(1).unwrap()).unwrap();
    // Fill the queue (never accepted) until a connect would block.
    let mut queued = Vec::new();
    loop {
        let fd = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap();
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => queued.push(fd),
            Err(Errno::EAGAIN) => break,
            Err(e) => panic!("filling the listen queue: {e}"),
        }
        assert!(queued.len() < 100, "the listen queue never filled");
    }
    let s = socket.to_str().unwrap();
    fails_with(
        &vmha(&["--socket", s, "status"], &[("VMHA_TIMEOUT", "1s")]),
        &format!(
            "no answer from {s} within 1s (vmhad busy or not vmhad?); wait longer with \
             --timeout DUR or $VMHA_TIMEOUT"
        ),
    );
}

#[test]
fn an_answer_that_is_not_vmhads_is_named_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let s = socket.to_str().unwrap();
    let not_vmhad = |detail: &str| format!("{s} is not vmhad's API socket ({detail})");
    let answers: &[(&[u8], &str)] = &[
        (
            b"SSH-2.0-OpenSSH_9.6\r\n\x1b[2J",
            "it answered `SSH-2.0-OpenSSH_9.6`",
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hello</html>",
            "it answered HTTP 200 with `<html>hello</html>`, not JSON",
        ),
        (
            b"HTTP/1.1 404 Not Found\r\n\r\nno such page",
            "it answered HTTP 404 with `no such page`, not JSON",
        ),
        (b"", "it closed the connection without an answer"),
    ];
    for (answer, detail) in answers {
        let answer = answer.to_vec();
        let server = stand_in(&socket, 1, true, move |mut stream, _| {
            stream.write_all(&answer).unwrap();
        });
        fails_with(
            &vmha(&["--socket", s, "--timeout", "10s", "status"], &[]),
            &not_vmhad(detail),
        );
        server.join().unwrap();
        std::fs::remove_file(&socket).unwrap();
    }

    // An endless header line is cut, not read forever.
    let server = stand_in(&socket, 1, true, |mut stream, _| {
        let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nX-Junk: ");
        let junk = vec![b'x'; 64 * 1024];
        while stream.write_all(&junk).is_ok() {}
    });
    fails_with(
        &vmha(&["--socket", s, "status"], &[]),
        &not_vmhad("its answer's head is longer than 64 KiB"),
    );
    server.join().unwrap();
}

#[test]
fn the_timeout_option_wins_over_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let s = socket.to_str().unwrap();
    let server = stand_in(&socket, 3, false, |stream, _| hold(stream));
    let within = |t: &str| {
        format!(
            "no answer from {s} within {t} (vmhad busy or not vmhad?); wait longer with \
             --timeout DUR or $VMHA_TIMEOUT"
        )
    };
    fails_with(
        &vmha(&["--socket", s, "status"], &[("VMHA_TIMEOUT", "700ms")]),
        &within("700ms"),
    );
    fails_with(
        &vmha(
            &["status", "--socket", s, "--timeout", "1200ms"],
            &[("VMHA_TIMEOUT", "700ms")],
        ),
        &within("1s200ms"),
    );
    // The option wins even over a variable that would not parse.
    fails_with(
        &vmha(
            &["--timeout", "800ms", "--socket", s, "status"],
            &[("VMHA_TIMEOUT", "soon")],
        ),
        &within("800ms"),
    );
    server.join().unwrap();

    // A bad value is a usage error: nothing is sent.
    let out = vmha(&["--socket", s, "status"], &[("VMHA_TIMEOUT", "soon")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("vmha: $VMHA_TIMEOUT: `soon`: "),
        "{}",
        stderr(&out)
    );
    let out = vmha(&["--socket", s, "--timeout", "1h", "status"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the timeout must be between 1ms and 10m"),
        "{}",
        stderr(&out)
    );
}

const EVENT: &str = r#"{"host":"kvm1","seq":7,"text":"shop online → restarting: test"}"#;

#[test]
fn a_followed_event_stream_outlives_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let s = socket.to_str().unwrap();
    let server = stand_in(&socket, 1, true, move |mut stream, head| {
        assert!(
            head.starts_with("GET /v1/events?limit=50&follow=true "),
            "{head}"
        );
        stream.write_all(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        // The input: quiet for three times the client's timeout, then one event, then vmhad
        // "stops".
        std::thread::sleep(Duration::from_secs(3));
        stream.write_all(format!("{EVENT}\n").as_bytes()).unwrap();
    });
    let out = vmha(
        &[
            "--socket",
            s,
            "--timeout",
            "1s",
            "events",
            "--follow",
            "--json",
        ],
        &[],
    );
    server.join().unwrap();
    assert_eq!(stdout(&out), format!("{EVENT}\n"));
    assert_eq!(stderr(&out), "vmha: vmhad closed the event stream\n");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn guest_exec_waits_for_its_guest_timeout_plus_a_margin() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmhad.sock");
    let s = socket.to_str().unwrap();
    let answer = r#"{"exit":0,"signal":null,"stdout":"done\n","stderr":"","truncated":false}"#;
    // vmhad answers after 2s: longer than the 1s guest timeout, within it plus the margin.
    let server = stand_in(&socket, 1, true, move |mut stream, head| {
        assert!(head.starts_with("POST /v1/vms/shop/exec "), "{head}");
        std::thread::sleep(Duration::from_secs(2));
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        stream.write_all(reply.as_bytes()).unwrap();
    });
    let out = vmha(
        &[
            "--socket",
            s,
            "guest",
            "exec",
            "shop",
            "--timeout",
            "1s",
            "--",
            "sleep",
            "0.9",
        ],
        &[("VMHA_TIMEOUT", "1s")],
    );
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "done\n");
}

/// The uid the planted socket is served by.
const STRANGER: u32 = 65534;

#[test]
fn a_socket_served_by_another_user_gets_no_request() {
    if !nix::unistd::geteuid().is_root() {
        // Serving as another user needs root; as a user, root's socket is trusted anyway.
        eprintln!("skipped: needs root to serve a socket as uid {STRANGER}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("vmhad.sock");
    // The peer's credentials are those of whoever called listen(): serve as the stranger.
    nix::unistd::seteuid(nix::unistd::Uid::from_raw(STRANGER)).unwrap();
    let bound = UnixListener::bind(&socket);
    nix::unistd::seteuid(nix::unistd::Uid::from_raw(0)).unwrap();
    let listener = bound.unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        received
    });
    let s = socket.to_str().unwrap();
    fails_with(
        &vmha(&["--socket", s, "freeze", "shop"], &[]),
        &format!("{s} is served by uid {STRANGER}, not root — refusing to send commands to it"),
    );
    assert!(
        server.join().unwrap().is_empty(),
        "the planted socket received a request"
    );
}
