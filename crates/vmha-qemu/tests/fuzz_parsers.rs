//! Property tests standing in for a fuzz target (cargo-fuzz needs nightly): arbitrary bytes fed
//! to the framer, the reply parser, the event typer and the probe output parser never panic, and
//! the framer never holds more than its cap.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use proptest::prelude::*;
use vmha_qemu::framing::{Frame, Framer};
use vmha_qemu::probe::{parse_output, parse_took};
use vmha_qemu::reply::{Message, parse_line};
use vmha_qemu::{ProbeCheck, QmpEvent};

const CAP: usize = 256;

/// Bytes biased towards the interesting ones: newlines, 0xFF, braces, quotes, digits.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        any::<u8>(),
        Just(b'\n'),
        Just(0xFF),
        Just(b'{'),
        Just(b'}'),
        Just(b'"'),
        Just(b'\r'),
    ];
    prop::collection::vec(byte, 0..4096)
}

fn json_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(br#"{"return": {}, "id": 1}"#.to_vec()),
        Just(br#"{"error": {"class": 1, "desc": [2]}}"#.to_vec()),
        Just(br#"{"event": "SHUTDOWN", "data": {"guest": "x"}}"#.to_vec()),
        Just(br#"{"QMP": null}"#.to_vec()),
        "[ -~]{0,64}".prop_map(|s| s.into_bytes()),
    ]
}

proptest! {
    #[test]
    fn framer_is_total_and_bounded(data in hostile_bytes(), chunk in 1usize..64, ff in any::<bool>()) {
        let mut framer = Framer::new(CAP, ff);
        for piece in data.chunks(chunk) {
            let mut rest = piece;
            while !rest.is_empty() {
                let (used, frame) = framer.feed(rest);
                prop_assert!(used >= 1 && used <= rest.len());
                rest = &rest[used..];
                if let Some(Frame::Line(line)) = frame {
                    prop_assert!(line.len() <= CAP);
                    prop_assert!(!line.contains(&b'\n'));
                    if ff {
                        prop_assert!(!line.contains(&0xFF));
                    }
                    // Whatever the line, parsing it is total.
                    let _ = parse_line(&line);
                }
            }
        }
    }

    #[test]
    fn parser_and_event_typer_are_total(line in prop_oneof![hostile_bytes(), json_like()]) {
        if let Ok(Message::Event { name, data }) = parse_line(&line) {
            let _ = QmpEvent::from_parts(name, data);
        }
    }

    #[test]
    fn probe_output_parser_is_total(out in hostile_bytes(), n in 0usize..8, nonce in any::<u64>()) {
        let checks: Vec<ProbeCheck> = (0..n)
            .map(|i| ProbeCheck { app: vmha_model::Name::new(&format!("a{i}")).unwrap(), argv: vec!["true".into()], timeout: Duration::from_secs(1) })
            .collect();
        let outcomes = parse_output(&checks, nonce, &out);
        prop_assert_eq!(outcomes.len(), n);
        // The guest's own account of the probe's duration: total, and never over a minute.
        let mut took = out.clone();
        took.extend_from_slice(format!("\nvmha-probe {nonce} took ").as_bytes());
        took.extend_from_slice(&out);
        for stdout in [&out, &took] {
            prop_assert!(parse_took(nonce, stdout).is_none_or(|d| d <= Duration::from_secs(60)));
        }
    }
}
