//! QEMU's run state as its observer QMP socket (`<runtime>/<vm>/observe.sock`, which vmhad
//! never uses) tells it: the double-run checker asks it only when a VM has live QEMUs on more
//! than one host, to tell a live migration's incoming or finished side from a second run.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long the checker waits for one observer socket.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(500);

/// Run states in which a QEMU holds a VM for a live migration without running it:
/// `inmigrate` (an incoming QEMU waiting for or loading the stream), `finish-migrate` and
/// `postmigrate` (a source that sent its last state and stopped its vCPUs for good).
pub const MIGRATION_STATES: [&str; 3] = ["inmigrate", "finish-migrate", "postmigrate"];

/// Runs one QMP `command` (with `arguments`) on the QMP socket `sock` and returns its
/// `return` value, or `None` when it cannot (no socket, no greeting, an error, no answer within
/// `timeout`: a stopped or hung QEMU). Also what tests use to inject faults through a VM's
/// observer socket (e.g. `migrate-set-parameters`).
pub fn qmp(
    sock: &Path,
    command: &str,
    arguments: Option<serde_json::Value>,
    timeout: Duration,
) -> Option<serde_json::Value> {
    let stream = UnixStream::connect(sock).ok()?;
    qmp_on(stream, command, arguments, timeout)
}

/// [`qmp`] on a connected `stream`.
fn qmp_on(
    stream: UnixStream,
    command: &str,
    arguments: Option<serde_json::Value>,
    timeout: Duration,
) -> Option<serde_json::Value> {
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut next = |reader: &mut BufReader<UnixStream>| -> Option<serde_json::Value> {
        // Events may come between a command and its answer: skip them (bounded).
        for _ in 0..64 {
            line.clear();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
            if v.get("event").is_none() {
                return Some(v);
            }
        }
        None
    };
    next(&mut reader)?.get("QMP")?;
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .ok()?;
    next(&mut reader)?.get("return")?;
    let mut request = serde_json::json!({ "execute": command });
    if let Some(args) = arguments {
        request["arguments"] = args;
    }
    let mut bytes = request.to_string().into_bytes();
    bytes.push(b'\n');
    writer.write_all(&bytes).ok()?;
    next(&mut reader)?.get("return").cloned()
}

/// What a QEMU's observer socket says when asked its run state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `query-status`'s `status`.
    State(String),
    /// Nothing listens there (no socket file, connection refused): a QEMU that has not yet
    /// created its monitor sockets (it starts no guest before), or one whose sockets closed.
    NotListening,
    /// Connected, but no usable answer within the timeout: a stopped or hung QEMU.
    NoAnswer,
}

/// Asks the QEMU behind the QMP socket `sock` its run state, waiting at most `timeout`.
pub fn ask(sock: &Path, timeout: Duration) -> Answer {
    let Ok(stream) = UnixStream::connect(sock) else {
        return Answer::NotListening;
    };
    qmp_on(stream, "query-status", None, timeout)
        .and_then(|r| r.get("status")?.as_str().map(str::to_owned))
        .map_or(Answer::NoAnswer, Answer::State)
}

/// Whether a run state is a live migration's (see [`MIGRATION_STATES`]).
pub fn is_migration_state(state: &str) -> bool {
    MIGRATION_STATES.contains(&state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn no_socket_is_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("observe.sock");
        assert_eq!(ask(&sock, QUERY_TIMEOUT), Answer::NotListening);
    }

    #[test]
    fn a_silent_server_gives_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("observe.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(ask(&sock, Duration::from_millis(200)), Answer::NoAnswer);
    }

    #[test]
    fn states_are_read_past_events() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("observe.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for status in ["inmigrate", "running", "paused"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut l = String::new();
                s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                    .unwrap();
                r.read_line(&mut l).unwrap();
                s.write_all(b"{\"return\": {}}\r\n").unwrap();
                r.read_line(&mut l).unwrap();
                s.write_all(b"{\"event\": \"RESUME\", \"data\": {}}\r\n")
                    .unwrap();
                let answer = format!(
                    "{{\"return\": {{\"status\": \"{status}\", \"singlestep\": false, \"running\": false}}}}\r\n"
                );
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        for status in ["inmigrate", "running", "paused"] {
            assert_eq!(ask(&sock, QUERY_TIMEOUT), Answer::State(status.into()));
        }
        assert!(is_migration_state("inmigrate"));
        // An admin pause still holds the disk: not a migration state.
        assert!(!is_migration_state("paused") && !is_migration_state("running"));
        server.join().unwrap();
    }
}
