//! The hostile-guest rules of the agent passthrough, the QEMU driver's ([`vmha_qemu::qga`]):
//!
//! - **Ids.** Every request carries a fresh id and only a reply with that id answers it
//!   (libvirt passes the agent's reply through as it is, id included).
//! - **Memory.** A reply longer than its command's cap is refused before it is parsed; a
//!   kept one is parsed straight into typed structs with `serde_json`'s nesting limit
//!   ([`vmha_qemu::qga::parse_typed`]), above 64 KiB on a blocking thread, not a runtime
//!   worker. Nothing a guest sends becomes a `serde_json::Value`.
//! - **Budget and rate.** A reply longer than its cap plus [`vmha_qemu::qga::SLACK`] (the
//!   QEMU driver's byte budget of one read) or a domain sending more than
//!   [`QgaConfig::byte_rate`] on average (the same token bucket) is
//!   [`QgaError::Hostile`], with the reason; the domain's agent is then not called before a
//!   backoff (from [`QgaConfig::hostile_backoff`], doubling up to 64 times that; a call that
//!   succeeds resets it).
//! - **Text.** Every guest string in an error is capped and free of control and format
//!   characters ([`vmha_qemu::guest_text`]).

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use vmha_qemu::qga::guard::Limits;
use vmha_qemu::qga::wire::Reply;
use vmha_qemu::qga::{SLACK, parse_typed};
use vmha_qemu::{QgaConfig, QgaError};

/// The guest channel of one domain, whatever carries its requests: ids, reply caps, typed
/// parsing, the byte rate and the hostile backoff.
pub(crate) struct Channel {
    /// The domain, for logs.
    domain: String,
    limits: Mutex<Limits>,
    next_id: AtomicU64,
}

impl Channel {
    /// The channel of `domain` with `config`'s rate and backoff.
    pub(crate) fn new(domain: &str, config: &QgaConfig) -> Channel {
        Channel {
            domain: domain.to_owned(),
            limits: Mutex::new(Limits::for_channel(config)),
            next_id: AtomicU64::new(1),
        }
    }

    /// Runs `command` through `send` (which carries the request text and returns the reply
    /// text, or the channel's failure): refused at once with [`QgaError::Hostile`] while
    /// backing off; the reply is capped at `cap` bytes, parsed as `T` and turned into the
    /// result by `convert` (an `Err` there is [`QgaError::Malformed`]).
    pub(crate) async fn call<T, R, F, S, Fut>(
        &self,
        command: &str,
        arguments: Option<Value>,
        cap: usize,
        convert: F,
        send: S,
    ) -> Result<R, QgaError>
    where
        T: DeserializeOwned + Send + 'static,
        R: Send + 'static,
        F: FnOnce(T) -> Result<R, String> + Send + 'static,
        S: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<String, QgaError>>,
    {
        if let Some((reason, left)) = self.lock().backoff.active() {
            return Err(QgaError::Hostile {
                reason: reason.to_owned(),
                retry_in: left,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({"execute": command, "id": id});
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let (bytes, result) = match send(request.to_string()).await {
            Ok(reply) => (reply.len(), checked(command, reply, id, cap, convert).await),
            Err(e) => (0, Err(e)),
        };
        self.finish(bytes as u64, result)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limits> {
        // The limits stay consistent whatever panicked while holding them.
        self.limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Charges a reply of `bytes` to the rate limit and applies the call's outcome: a guest
    /// over its rate or budget is backed off from, a success resets the backoff.
    fn finish<R>(&self, bytes: u64, mut result: Result<R, QgaError>) -> Result<R, QgaError> {
        if let Some((reason, retry_in)) = self.lock().settle(bytes, &mut result) {
            tracing::warn!(domain = %self.domain, %reason, ?retry_in, "guest agent marked hostile");
        }
        result
    }
}

/// The reply to request `id` of `command`, checked as the QEMU driver checks a reply line:
/// above `cap` plus [`SLACK`] bytes the guest is hostile, above `cap` the reply is too long;
/// else it is parsed as `T` and converted (a long reply on a blocking thread).
async fn checked<T, R, F>(
    command: &str,
    reply: String,
    id: u64,
    cap: usize,
    convert: F,
) -> Result<R, QgaError>
where
    T: DeserializeOwned + Send + 'static,
    R: Send + 'static,
    F: FnOnce(T) -> Result<R, String> + Send + 'static,
{
    let budget = (cap as u64).saturating_add(SLACK);
    if reply.len() as u64 > budget {
        return Err(QgaError::Hostile {
            reason: format!("sent more than {budget} bytes while vmha waited for {command}"),
            retry_in: Duration::ZERO,
        });
    }
    if reply.len() > cap {
        return Err(QgaError::LineTooLong { max: cap });
    }
    let parsed = parse_typed(reply.into_bytes(), id, convert).await;
    match parsed.map_err(|detail| QgaError::Malformed {
        command: command.to_owned(),
        detail,
    })? {
        Reply::Return(value) => Ok(value),
        Reply::Error(error) => Err(QgaError::Remote {
            command: command.to_owned(),
            error,
        }),
        Reply::NotOurs { got } => Err(QgaError::WrongId {
            command: command.to_owned(),
            expected: id,
            got,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use serde::de::IgnoredAny;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use vmha_qemu::guest_text::is_unsafe;
    use vmha_qemu::qga::{ExecOutput, ExecStarted, ExecStatus};

    /// A transport answering `reply` with `ID` replaced by the request's id.
    fn answer(reply: &str) -> impl FnOnce(String) -> std::future::Ready<Result<String, QgaError>> {
        let reply = reply.to_owned();
        move |request| {
            #[derive(serde::Deserialize)]
            struct Req {
                id: u64,
            }
            let id = serde_json::from_str::<Req>(&request).unwrap().id;
            std::future::ready(Ok(reply.replace("ID", &id.to_string())))
        }
    }

    fn channel() -> Channel {
        Channel::new("d1", &QgaConfig::default())
    }

    async fn ping(ch: &Channel, reply: &str) -> Result<(), QgaError> {
        ch.call(
            "guest-ping",
            None,
            4096,
            |_: IgnoredAny| Ok(()),
            answer(reply),
        )
        .await
    }

    async fn status(ch: &Channel, reply: &str, cap: usize) -> Result<Option<ExecOutput>, QgaError> {
        ch.call(
            "guest-exec-status",
            None,
            cap,
            |s: ExecStatus| s.into_output(64),
            answer(reply),
        )
        .await
    }

    async fn started(ch: &Channel, reply: &str) -> Result<i64, QgaError> {
        ch.call(
            "guest-exec",
            None,
            1 << 20,
            |s: ExecStarted| Ok(s.pid),
            answer(reply),
        )
        .await
    }

    /// Every text of `e` as it may reach an event, a log or the API.
    fn text(e: &QgaError) -> String {
        format!("{e} {e:?}")
    }

    #[tokio::test]
    async fn only_a_reply_with_the_request_id_answers() {
        let ch = channel();
        ping(&ch, r#"{"return": {}, "id": ID}"#).await.unwrap();
        for (reply, got) in [
            (r#"{"return": {}}"#, "none"),
            (r#"{"return": {}, "id": 999999}"#, "999999"),
        ] {
            match ping(&ch, reply).await {
                Err(QgaError::WrongId { got: g, .. }) => assert_eq!(g, got),
                other => panic!("{reply}: {other:?}"),
            }
        }
        match ping(
            &ch,
            r#"{"error": {"class": "GenericError", "desc": "no"}, "id": ID}"#,
        )
        .await
        {
            Err(QgaError::Remote { error, .. }) => assert_eq!(error.desc, "no"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn replies_over_the_cap_are_refused_and_over_the_budget_hostile() {
        let ch = channel();
        let long = format!(r#"{{"return": "{}", "id": ID}}"#, "A".repeat(5000));
        assert!(matches!(
            ping(&ch, &long).await,
            Err(QgaError::LineTooLong { max: 4096 })
        ));
        let huge = format!(r#"{{"return": "{}", "id": ID}}"#, "A".repeat(4096 + 70_000));
        match ping(&ch, &huge).await {
            Err(QgaError::Hostile { reason, retry_in }) => {
                assert!(
                    reason.contains("while vmha waited for guest-ping"),
                    "{reason}"
                );
                assert!(!retry_in.is_zero());
            }
            other => panic!("{other:?}"),
        }
        // Backing off: refused without calling the agent.
        let err = ch
            .call(
                "guest-ping",
                None,
                4096,
                |_: IgnoredAny| Ok(()),
                |_| async { panic!("called while backing off") },
            )
            .await;
        assert!(matches!(err, Err(QgaError::Hostile { .. })), "{err:?}");
    }

    fn vm_hwm_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// A 4 MiB `[0,0,…]` (2 M values: 64 MB and more as `serde_json::Value`s) costs a small
    /// multiple of its length, whatever it is given as.
    #[tokio::test]
    async fn an_amplifying_reply_costs_a_small_multiple_of_its_length() {
        let cap = 4 << 20;
        let zeros = {
            let mut z = "0,".repeat((cap - 200) / 2);
            z.pop();
            z
        };
        let as_return = format!(r#"{{"return": [{zeros}], "id": ID}}"#);
        let as_member = format!(r#"{{"return": {{"exited": false, "x": [{zeros}]}}, "id": ID}}"#);
        let as_desc = format!(r#"{{"error": {{"class": "A", "desc": [{zeros}]}}, "id": ID}}"#);
        drop(zeros);
        // Reset the peak to the current RSS where the kernel allows it.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = vm_hwm_kib();
        // One channel each: three such replies in a row are over the byte rate.
        assert!(matches!(
            status(&channel(), &as_return, cap).await,
            Err(QgaError::Malformed { .. })
        ));
        assert_eq!(status(&channel(), &as_member, cap).await.unwrap(), None);
        match status(&channel(), &as_desc, cap).await {
            Err(QgaError::Remote { error, .. }) => assert_eq!(error.desc, "(array)"),
            other => panic!("{other:?}"),
        }
        let grew = vm_hwm_kib().saturating_sub(before);
        assert!(grew < 24 << 10, "peak RSS grew by {grew} KiB");
    }

    /// A deep nesting where a typed value belongs is malformed (with a short error), however
    /// deep; an unterminated one too. (Nesting in members that are skipped costs one byte per
    /// level: `serde_json` skips them without recursing.)
    #[tokio::test]
    async fn deep_nesting_is_refused() {
        let ch = channel();
        let deep = |n: usize| format!("{}0{}", "[".repeat(n), "]".repeat(n));
        for reply in [
            format!(r#"{{"id": ID, "return": {}}}"#, deep(100_000)),
            format!(r#"{{"id": ID, "return": {{"pid": {}}}}}"#, deep(100_000)),
            format!(r#"{{"id": ID, "return": {}}}"#, "[".repeat(100_000)),
        ] {
            match started(&ch, &reply).await {
                Err(e @ QgaError::Malformed { .. }) => assert!(text(&e).len() < 1000, "{e}"),
                other => panic!("{other:?}"),
            }
        }
        let reply = format!(r#"{{"id": ID, "return": {{"exited": {}}}}}"#, deep(100_000));
        assert!(matches!(
            status(&ch, &reply, 1 << 20).await,
            Err(QgaError::Malformed { .. })
        ));
    }

    #[tokio::test]
    async fn format_characters_never_reach_an_error() {
        let ch = channel();
        let hostile = "a\\u202eb\\u2028c\\u2029d\\u200be\\u001b[2J";
        let replies = [
            format!(r#"{{"error": {{"class": "{hostile}", "desc": "{hostile}"}}, "id": ID}}"#),
            format!(r#"{{"return": {{"exited": "{hostile}"}}, "id": ID}}"#),
            format!(
                r#"{{"return": {{"exited": true, "exitcode": 0, "out-data": "{hostile}"}}, "id": ID}}"#
            ),
            format!(r#"{{"return": {{}}, "id": "{hostile}"}}"#),
            format!(r#"{{"{hostile}": 1}}"#),
            // The same characters raw (valid UTF-8 in a JSON string).
            "{\"return\": {\"exited\": \"a\u{202e}b\u{2028}c\u{2029}d\u{200b}e\"}, \"id\": ID}"
                .to_owned(),
            hostile.to_owned(),
        ];
        for reply in &replies {
            let e = status(&ch, reply, 4096).await.unwrap_err();
            let t = text(&e);
            assert!(!t.chars().any(is_unsafe), "{reply}: {t:?}");
            assert!(!t.contains(['\u{202e}', '\u{2028}', '\u{2029}', '\u{200b}']));
        }
    }

    #[tokio::test]
    async fn bad_pids_and_exit_statuses_are_malformed() {
        let ch = channel();
        assert_eq!(
            started(&ch, r#"{"return": {"pid": 42}, "id": ID}"#)
                .await
                .unwrap(),
            42
        );
        for pid in ["0", "-1", "2147483648", "1e3", "\"7\"", "null"] {
            let reply = format!(r#"{{"return": {{"pid": {pid}}}, "id": ID}}"#);
            assert!(
                matches!(started(&ch, &reply).await, Err(QgaError::Malformed { .. })),
                "{pid}"
            );
        }
        for bad in [
            r#""exitcode": -1"#,
            r#""exitcode": 256"#,
            r#""exitcode": 1099511627776"#,
            r#""signal": 0"#,
            r#""signal": 65"#,
            r#""signal": -9"#,
        ] {
            let reply = format!(r#"{{"return": {{"exited": true, {bad}}}, "id": ID}}"#);
            assert!(
                matches!(
                    status(&ch, &reply, 4096).await,
                    Err(QgaError::Malformed { .. })
                ),
                "{bad}"
            );
        }
    }

    /// A guest answering more than the byte rate allows is marked hostile, refused (without
    /// a call) while backing off, and called again once the backoff expired and its bucket
    /// refilled.
    #[tokio::test(start_paused = true)]
    async fn a_flood_over_the_rate_is_hostile_until_the_backoff_expires() {
        let config = QgaConfig {
            max_line: 64 << 10,
            byte_rate: 64 << 10,
            hostile_backoff: Duration::from_secs(1),
            ..QgaConfig::default()
        };
        let ch = Channel::new("d1", &config);
        let reply = format!(r#"{{"return": "{}", "id": ID}}"#, "A".repeat(60_000));
        let big = || {
            ch.call(
                "guest-info",
                None,
                64 << 10,
                |_: IgnoredAny| Ok(()),
                answer(&reply),
            )
        };
        // The burst (2 × 64 KiB + 1 MiB) allows about 19 such replies.
        let mut answered = 0;
        let retry_in = loop {
            match big().await {
                Ok(()) => answered += 1,
                Err(QgaError::Hostile { reason, retry_in }) => {
                    assert!(reason.contains("rate limit"), "{reason}");
                    break retry_in;
                }
                Err(e) => panic!("{e:?}"),
            }
            assert!(answered < 100, "never limited");
        };
        assert!(answered >= 15, "limited after {answered} replies");
        assert_eq!(retry_in, Duration::from_secs(1));
        let sent = Arc::new(AtomicUsize::new(0));
        let counted = |sent: Arc<AtomicUsize>| {
            move |request: String| {
                sent.fetch_add(1, Ordering::SeqCst);
                answer(r#"{"return": {}, "id": ID}"#)(request)
            }
        };
        let refused = ch
            .call(
                "guest-ping",
                None,
                4096,
                |_: IgnoredAny| Ok(()),
                counted(Arc::clone(&sent)),
            )
            .await;
        assert!(
            matches!(refused, Err(QgaError::Hostile { .. })),
            "{refused:?}"
        );
        assert_eq!(sent.load(Ordering::SeqCst), 0, "called while backing off");
        // After the backoff, once the bucket refilled, the guest is called and answers.
        tokio::time::advance(Duration::from_secs(30)).await;
        ch.call(
            "guest-ping",
            None,
            4096,
            |_: IgnoredAny| Ok(()),
            counted(Arc::clone(&sent)),
        )
        .await
        .unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), 1);
    }
}
