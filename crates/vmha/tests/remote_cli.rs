//! Runs the built `vmha` binary against a stand-in for a remote vmhad on TCP (`--url`): the
//! request carries the token as `Authorization: Bearer` and the URL's prefix; 401 and 403 end
//! with exit 4 and a message saying what to do, without the token; a server that is not there
//! or does not speak TLS to `https://` ends with exit 3; a bad URL or CA file with exit 2
//! before anything is sent. (The same against a real vmhad: `daemon_cli.rs`.)
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread::JoinHandle;

use common::{read_request, stderr, stdout, vmha};

const TOKEN: &str = "s3cret-token-value";

/// A one-request stand-in on 127.0.0.1: answers `status` with the JSON `body`; returns its URL
/// and the request it read.
fn answer_once(status: &str, body: &str) -> (String, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let (head, body) = read_request(&stream);
        let request = head + &String::from_utf8_lossy(&body);
        stream.write_all(answer.as_bytes()).unwrap();
        request
    });
    (url, server)
}

#[test]
fn the_token_goes_in_the_authorization_header_and_the_prefix_in_the_path() {
    let (url, server) = answer_once("200 OK", r#"{"ok": true}"#);
    let out = vmha(
        &["--url", &format!("{url}/vmha/"), "freeze", "shop", "--json"],
        &[("VMHA_TOKEN", TOKEN)],
    );
    let request = server.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        request.starts_with("POST /vmha/v1/commands HTTP/1.0\r\n"),
        "{request}"
    );
    assert!(
        request.contains(&format!("\r\nAuthorization: Bearer {TOKEN}\r\n")),
        "{request}"
    );
    let host = url.strip_prefix("http://").unwrap();
    assert!(
        request.contains(&format!("\r\nHost: {host}\r\n")),
        "{request}"
    );
    assert!(
        request.ends_with(r#"{"command":"freeze","vm":"shop"}"#),
        "{request}"
    );
    assert_eq!(stdout(&out).trim(), "{\n  \"ok\": true\n}");

    // --token wins over $VMHA_TOKEN; $VMHA_URL names the vmhad.
    let (url, server) = answer_once("200 OK", r#"{"ok": true}"#);
    let out = vmha(
        &["--token", "from-the-option", "unfreeze", "shop"],
        &[("VMHA_TOKEN", TOKEN), ("VMHA_URL", &url)],
    );
    let request = server.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        request.contains("\r\nAuthorization: Bearer from-the-option\r\n"),
        "{request}"
    );
}

#[test]
fn no_token_and_a_read_only_token_exit_4_saying_what_to_do() {
    let (url, server) = answer_once("401 Unauthorized", r#"{"error": "missing bearer token"}"#);
    let out = vmha(&["--url", &url, "status"], &[]);
    let request = server.join().unwrap();
    assert!(!request.contains("Authorization"), "{request}");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "vmha: {url} refused the request: no valid token (missing bearer token); pass an \
             API token with --token or $VMHA_TOKEN\n"
        )
    );
    assert!(stdout(&out).is_empty());

    let (url, server) = answer_once("403 Forbidden", r#"{"error": "read-only token"}"#);
    let out = vmha(
        &["--url", &url, "--token", TOKEN, "vm", "restart", "shop"],
        &[],
    );
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "this token may not do that (read-only token); admin commands need an admin token"
        ),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "the token was printed: {err}");
}

#[test]
fn an_absent_or_non_tls_server_exits_3() {
    // Nothing listens: bind a port, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = vmha(
        &["--url", &format!("http://127.0.0.1:{port}"), "status"],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with(&format!(
            "vmha: cannot connect to http://127.0.0.1:{port}: "
        )),
        "{}",
        stderr(&out)
    );

    // https:// to a server answering in plain HTTP: the handshake fails, said so.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nnot TLS\r\n");
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    let out = vmha(
        &[
            "--url",
            &format!("https://{addr}"),
            "--token",
            TOKEN,
            "status",
        ],
        &[],
    );
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("vmha: TLS with https://{addr} failed: ")),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "{err}");
}

#[test]
fn bad_urls_and_ca_files_are_usage_errors_and_send_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "no certificate here\n").unwrap();
    let ca = ca.to_str().unwrap();
    for (args, env, message) in [
        (
            vec!["--url", "kvm1:9443", "status"],
            vec![],
            "invalid value 'kvm1:9443' for '--url <URL>'",
        ),
        (
            vec!["status"],
            vec![("VMHA_URL", "ftp://kvm1")],
            "$VMHA_URL: `ftp://kvm1`: the URL must start with http:// or https://",
        ),
        (
            vec!["--url", "https://127.0.0.1:1", "--ca-cert", ca, "status"],
            vec![],
            "no usable certificate in it",
        ),
        (
            vec!["--url", "http://127.0.0.1:1", "--ca-cert", ca, "status"],
            vec![],
            "--ca-cert is for an https:// vmhad",
        ),
        (
            vec!["--socket", "/nonexistent.sock", "--token", TOKEN, "status"],
            vec![],
            "--token and --ca-cert are for a remote vmhad",
        ),
        (
            vec![
                "--url",
                "http://127.0.0.1:1",
                "--socket",
                "/x.sock",
                "status",
            ],
            vec![],
            "cannot be used with",
        ),
    ] {
        let out = vmha(&args, &env);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains(TOKEN), "{}", stderr(&out));
    }
}

#[test]
fn the_help_lists_the_exit_codes() {
    let out = vmha(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for line in [
        "  0  success",
        "  1  vmhad refused the command, or it failed",
        "  2  usage error or invalid configuration",
        "  3  vmhad unreachable",
        "  4  access denied",
    ] {
        assert!(help.contains(line), "missing `{line}` in:\n{help}");
    }
    for option in ["--url <URL>", "--token <TOKEN>", "--ca-cert <FILE>"] {
        assert!(help.contains(option), "missing {option} in:\n{help}");
    }
}
