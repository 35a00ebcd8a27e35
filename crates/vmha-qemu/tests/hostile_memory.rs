//! What hostile guests cost this process in memory (VmHWM, the peak resident set), with the
//! client's default 4 MiB line cap. One test in its own binary, so that no other test's
//! allocations disturb the figure; the fake agents' payloads are allocated before the baseline
//! and shared, never copied.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_agent::{Answer, Script, honest, serve, vm_hwm, zeros};
use serde_json::Value;
use vmha_qemu::{ExecRequest, QgaClient, QgaConfig, QgaError};

const MIB: u64 = 1 << 20;
/// The peak a hostile VM may add: a small multiple of the 4 MiB line cap.
const PER_VM: u64 = 16 * MIB;

/// `{"return": {"exited": true, "exitcode": 0, <middle>}, "id": <id>}` without copying
/// `middle`.
fn status_around(req: &Value, middle: &Arc<Vec<u8>>) -> Answer {
    Answer::Chunks(vec![
        Arc::new(br#"{"return": {"exited": true, "exitcode": 0, "#.to_vec()),
        middle.clone(),
        Arc::new(format!("}}, \"id\": {}}}\n", req["id"]).into_bytes()),
    ])
}

fn hostile_exec(middle: Arc<Vec<u8>>, huge: Arc<Vec<u8>>) -> Arc<Script> {
    Arc::new(move |_, req: &Value| match req["execute"].as_str() {
        Some("guest-exec") => honest(req),
        Some("guest-exec-status") => status_around(req, &middle),
        // Pings and infos get the amplifying line itself.
        _ => Answer::Bytes(huge.clone()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_lines_cost_a_small_multiple_of_the_line_cap() {
    let dir = tempfile::tempdir().unwrap();
    // Payloads just under the 4 MiB cap: an ignored member of 2 M zeros, a 3 MiB base64
    // output, and (for pings) the amplifying line.
    let mut pad = br#""pad": "#.to_vec();
    pad.extend_from_slice(&zeros((4 << 20) - 200)[..(4 << 20) - 201]);
    let pad = Arc::new(pad);
    let mut out = br#""out-data": ""#.to_vec();
    out.resize((3 << 20) + 13, b'A');
    out.push(b'"');
    let out = Arc::new(out);
    let huge = zeros(4 << 20);
    let honest_sock = serve(&dir, "honest.sock", Arc::new(|_, req: &Value| honest(req)));
    let honest_vm = QgaClient::new(&honest_sock, QgaConfig::default());
    honest_vm.ping().await.unwrap();
    let socks: Vec<_> = (0..4)
        .map(|i| {
            let middle = if i % 2 == 0 { pad.clone() } else { out.clone() };
            serve(
                &dir,
                &format!("hostile{i}.sock"),
                hostile_exec(middle, huge.clone()),
            )
        })
        .collect();
    // Warm up the runtime's and allocator's own structures with one honest exec.
    honest_vm
        .exec(&ExecRequest::new(["/bin/true"]))
        .await
        .unwrap();
    let base = vm_hwm();

    let one = QgaClient::new(&socks[0], QgaConfig::default());
    assert!(matches!(
        one.ping_within(Duration::from_millis(800)).await,
        Err(QgaError::LineTooLong { .. })
    ));
    let pinged = vm_hwm();
    assert!(
        pinged - base < MIB,
        "a refused 4 MiB line cost {} kB",
        (pinged - base) / 1024
    );

    // Four hostile VMs at once, each reply kept (under the cap) and parsed.
    let calls: Vec<_> = socks
        .iter()
        .map(|s| {
            let client = QgaClient::new(s, QgaConfig::default());
            tokio::spawn(async move {
                let mut request = ExecRequest::new(["/bin/true"]);
                request.output_cap = 100;
                client.exec(&request).await
            })
        })
        .collect();
    for call in calls {
        let result = call.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
    honest_vm.ping().await.unwrap();
    let peak = vm_hwm() - base;
    println!("peak growth with 4 hostile VMs: {} kB", peak / 1024);
    assert!(peak < 4 * PER_VM, "4 hostile VMs cost {} kB", peak / 1024);
}
