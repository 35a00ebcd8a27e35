//! A scriptable fake guest agent on a unix socket, for hostile-guest tests.
//!
//! It answers `guest-sync-delimited` as qemu-ga does (`0xFF`, then `{"return": id}`) and hands
//! every other request, numbered from 0 across all connections, to a script that says what to
//! send back. Requests of one connection are handled in order, as qemu-ga does.
#![allow(clippy::unwrap_used, dead_code, missing_docs)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// What the fake agent does with one request.
pub enum Answer {
    /// Sends these bytes now.
    Bytes(Arc<Vec<u8>>),
    /// Sends these bytes after a delay (the connection handles nothing else meanwhile).
    Late(Duration, Arc<Vec<u8>>),
    /// Sends these buffers one after the other (a big shared middle costs no copy).
    Chunks(Vec<Arc<Vec<u8>>>),
    /// Streams bytes without end (no newline) until the peer goes away.
    Endless,
    /// Sends nothing.
    Nothing,
}

/// The honest reply `{"return": value, "id": <the request's id>}`.
pub fn reply(req: &Value, value: Value) -> Answer {
    let mut line = json!({"return": value, "id": req["id"]})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    Answer::Bytes(Arc::new(line))
}

/// What an honest agent answers to `req` (ping, info, exec of pid 7 exiting 0 without output).
pub fn honest(req: &Value) -> Answer {
    match req["execute"].as_str() {
        Some("guest-info") => reply(
            req,
            json!({"version": "fresh", "supported_commands": [
                {"name": "guest-exec", "enabled": true},
                {"name": "guest-exec-status", "enabled": true}]}),
        ),
        Some("guest-exec") => reply(req, json!({"pid": 7})),
        Some("guest-exec-status") => reply(req, json!({"exited": true, "exitcode": 0})),
        _ => reply(req, json!({})),
    }
}

/// An honest agent that also answers vmha's probes as a guest whose checks all pass: a
/// `guest-exec` of the probe's shell program gets a fresh pid whose `guest-exec-status` prints
/// status 0 for every check the program reports on (the program's `echo "vmha-probe N I $sI"`
/// lines); everything else is [`honest`].
pub fn honest_prober() -> impl Fn(&Value) -> Answer + Send + Sync + 'static {
    let outputs: Mutex<HashMap<i64, Vec<u8>>> = Mutex::new(HashMap::new());
    let next_pid = AtomicI64::new(100);
    move |req| match req["execute"].as_str() {
        Some("guest-exec") => {
            let Some(program) = req["arguments"]["arg"][1].as_str() else {
                return honest(req);
            };
            let mut out = Vec::new();
            for l in program.lines() {
                let Some(rest) = l.strip_prefix("echo \"vmha-probe ") else {
                    continue;
                };
                let words: Vec<&str> = rest.split(' ').collect();
                if let [nonce, index, _] = words.as_slice() {
                    out.extend_from_slice(format!("vmha-probe {nonce} {index} 0\n").as_bytes());
                }
            }
            let pid = next_pid.fetch_add(1, Ordering::SeqCst);
            outputs.lock().unwrap().insert(pid, out);
            reply(req, json!({"pid": pid}))
        }
        Some("guest-exec-status") => {
            let pid = req["arguments"]["pid"].as_i64().unwrap_or_default();
            match outputs.lock().unwrap().remove(&pid) {
                Some(out) => {
                    use base64::Engine as _;
                    let data = base64::engine::general_purpose::STANDARD.encode(out);
                    reply(
                        req,
                        json!({"exited": true, "exitcode": 0, "out-data": data}),
                    )
                }
                None => honest(req),
            }
        }
        _ => honest(req),
    }
}

/// `bytes` followed by a newline, shared.
pub fn line(bytes: impl Into<Vec<u8>>) -> Arc<Vec<u8>> {
    let mut v = bytes.into();
    v.push(b'\n');
    Arc::new(v)
}

/// A `[0,0,0,…]` JSON line of about `len` bytes (with its newline): the cheapest bytes that
/// cost a `serde_json::Value` the most memory.
pub fn zeros(len: usize) -> Arc<Vec<u8>> {
    let mut v = Vec::with_capacity(len + 2);
    v.extend_from_slice(b"[0");
    while v.len() + 3 < len {
        v.extend_from_slice(b",0");
    }
    v.extend_from_slice(b"]");
    line(v)
}

/// The script: request number (0 = first non-sync request) and the request → answer.
pub type Script = dyn Fn(usize, &Value) -> Answer + Send + Sync;

/// Serves a fake agent at a fresh socket in `dir` (named `name`); returns its path.
pub fn serve(dir: &tempfile::TempDir, name: &str, script: Arc<Script>) -> PathBuf {
    let path = dir.path().join(name);
    let listener = UnixListener::bind(&path).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let script = script.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).split(b'\n');
                while let Ok(Some(raw)) = lines.next_segment().await {
                    let raw: Vec<u8> = raw.into_iter().filter(|b| *b != 0xFF).collect();
                    let Ok(req) = serde_json::from_slice::<Value>(&raw) else {
                        continue;
                    };
                    if req["execute"] == "guest-sync-delimited" {
                        let mut bytes = vec![0xFF];
                        bytes.extend_from_slice(
                            format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes(),
                        );
                        if write.write_all(&bytes).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let sent = match script(n, &req) {
                        Answer::Bytes(b) => write.write_all(&b).await,
                        Answer::Chunks(parts) => {
                            let mut sent = Ok(());
                            for part in parts {
                                sent = write.write_all(&part).await;
                                if sent.is_err() {
                                    break;
                                }
                            }
                            sent
                        }
                        Answer::Late(after, b) => {
                            tokio::time::sleep(after).await;
                            write.write_all(&b).await
                        }
                        Answer::Endless => {
                            let chunk = vec![b'0'; 64 << 10];
                            while write.write_all(&chunk).await.is_ok() {}
                            return;
                        }
                        Answer::Nothing => Ok(()),
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            });
        }
    });
    path
}

/// Resets this process's VmHWM to its current resident set (Linux ≥ 4.0), so that the next
/// [`vm_hwm`] is the peak since now.
pub fn reset_hwm() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// VmHWM (peak resident memory) of this process, in bytes.
pub fn vm_hwm() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}
