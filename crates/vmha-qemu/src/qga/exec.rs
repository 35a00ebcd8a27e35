//! `guest-exec` and `guest-exec-status`: running a program in the guest, with every number
//! and byte of the answer checked (pid, exit code and signal ranges, capped base64 output).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer};
use serde_json::json;
use tokio::time::Instant;

use vmha_model::ExitStatus;

use super::{QgaClient, QgaError, SMALL_LINE};

/// A guest command to run with [`QgaClient::exec`].
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is the path of the program.
    pub argv: Vec<String>,
    /// Extra environment, `KEY=value` entries.
    pub env: Vec<String>,
    /// Bytes fed to the program's stdin, if any.
    pub input: Option<Vec<u8>>,
    /// Overall time allowed for start, run and result.
    pub deadline: Duration,
    /// At most this many bytes of stdout and of stderr are kept.
    pub output_cap: usize,
    /// Longest accepted `guest-exec-status` reply line (also capped by
    /// [`super::QgaConfig::max_line`]): a caller that knows its output is small lowers it.
    pub max_reply_line: usize,
    /// When to send the first `guest-exec-status` (when the program can have finished);
    /// `None`: [`super::QgaConfig::poll_initial`]. Later polls back off from a quarter of it
    /// (at least `poll_initial`), doubling up to `poll_max`.
    pub first_poll: Option<Duration>,
}

impl ExecRequest {
    /// A request for `argv` with no env or input, a 10 s deadline and a 64 KiB output cap.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            input: None,
            deadline: Duration::from_secs(10),
            output_cap: 64 << 10,
            max_reply_line: usize::MAX,
            first_poll: None,
        }
    }
}

/// The result of a finished guest process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Its stdout, at most `output_cap` bytes.
    pub stdout: Vec<u8>,
    /// Its stderr, at most `output_cap` bytes.
    pub stderr: Vec<u8>,
    /// True if stdout was cut (by the cap or by the agent's own limit).
    pub stdout_truncated: bool,
    /// True if stderr was cut (by the cap or by the agent's own limit).
    pub stderr_truncated: bool,
}

/// The `return` of `guest-exec`, parsed by `serde`: the guest pid, checked to be in
/// `1..=i32::MAX` (anything else fails to parse). Public for drivers that carry agent commands
/// themselves (libvirt).
#[derive(Debug, Deserialize)]
pub struct ExecStarted {
    /// The guest pid.
    #[serde(deserialize_with = "pid")]
    pub pid: i64,
}

/// A guest pid: `1..=i32::MAX`, anything else is malformed.
fn pid<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let pid = i64::deserialize(d)?;
    if (1..=i64::from(i32::MAX)).contains(&pid) {
        Ok(pid)
    } else {
        Err(serde::de::Error::custom(format!("pid {pid} out of range")))
    }
}

/// The `return` of `guest-exec-status`, parsed by `serde` (unknown members skipped unread);
/// [`ExecStatus::into_output`] checks and caps it. Public for drivers that carry agent
/// commands themselves (libvirt).
#[derive(Debug, Deserialize)]
pub struct ExecStatus {
    exited: bool,
    exitcode: Option<i64>,
    signal: Option<i64>,
    #[serde(rename = "out-data")]
    out_data: Option<String>,
    #[serde(rename = "err-data")]
    err_data: Option<String>,
    #[serde(rename = "out-truncated", default)]
    out_truncated: bool,
    #[serde(rename = "err-truncated", default)]
    err_truncated: bool,
}

/// The alarm of a plain [`QgaClient::exec`]: none.
type NoAlarm = fn(i64) -> std::future::Ready<Result<(), QgaError>>;

impl QgaClient {
    /// Runs a program in the guest (`guest-exec` with captured output), then polls
    /// `guest-exec-status` until it exits or the deadline passes. The first exited reply reaps
    /// the process, so its result is the one returned. A pid outside `1..=i32::MAX`, an exit
    /// code outside `0..=255` or a signal outside `1..=64` is [`QgaError::Malformed`].
    pub async fn exec(&self, request: &ExecRequest) -> Result<ExecOutput, QgaError> {
        Ok(self
            .exec_polled(request, None::<(Duration, NoAlarm)>)
            .await?
            .0)
    }

    /// [`QgaClient::exec`], with the number of `guest-exec-status` polls it took (at least 1)
    /// and what `alarm` returned: if the program still runs `after` its start (the agent's
    /// reply), `alarm` runs once with its pid (a probe's checks timed out by vmhad) and the
    /// program is polled at once after it. An error of `alarm` ends the call.
    pub(crate) async fn exec_polled<T, A, F>(
        &self,
        request: &ExecRequest,
        alarm: Option<(Duration, A)>,
    ) -> Result<(ExecOutput, u32, Option<T>), QgaError>
    where
        A: FnOnce(i64) -> F,
        F: std::future::Future<Output = Result<T, QgaError>>,
    {
        let deadline = Instant::now() + request.deadline;
        let pid = self.spawn_until(request, deadline).await?;
        let mut alarm = alarm.map(|(after, run)| (Instant::now() + after, run));
        let mut rang = None;
        let mut interval = request.first_poll.unwrap_or(self.config.poll_initial);
        // With a first poll timed by the caller, later polls start from a quarter of it.
        let mut first = request.first_poll.is_some();
        let mut polls = 0u32;
        let mut timer = crate::timer::Timer::new();
        loop {
            let mut wake = (Instant::now() + interval).min(deadline);
            if let Some((at, _)) = &alarm {
                wake = wake.min(*at);
            }
            timer
                .sleep(wake.saturating_duration_since(Instant::now()))
                .await;
            if Instant::now() >= deadline {
                return Err(QgaError::ExecDeadline { pid });
            }
            if alarm.as_ref().is_some_and(|(at, _)| Instant::now() >= *at)
                && let Some((_, run)) = alarm.take()
            {
                rang = Some(run(pid).await?);
            }
            polls = polls.saturating_add(1);
            if let Some(output) = self.status_until(pid, request, deadline).await? {
                return Ok((output, polls, rang));
            }
            interval = if std::mem::take(&mut first) {
                (interval / 4).max(self.config.poll_initial)
            } else {
                interval * 2
            }
            .min(self.config.poll_max);
        }
    }

    /// Starts a program in the guest (`guest-exec` with captured output) and returns its pid
    /// at once, for a caller that polls it with [`QgaClient::exec_status`] at its own pace.
    /// `request.deadline` bounds this call only.
    pub async fn exec_spawn(&self, request: &ExecRequest) -> Result<i64, QgaError> {
        self.spawn_until(request, Instant::now() + request.deadline)
            .await
    }

    /// One `guest-exec-status` of `pid`: `None` while it runs, else its result (which reaps it
    /// in the agent), checked and capped as [`QgaClient::exec`] does with `request`'s
    /// `output_cap` and `max_reply_line`; `request.deadline` bounds this call.
    pub async fn exec_status(
        &self,
        pid: i64,
        request: &ExecRequest,
    ) -> Result<Option<ExecOutput>, QgaError> {
        self.status_until(pid, request, Instant::now() + request.deadline)
            .await
    }

    async fn spawn_until(&self, request: &ExecRequest, deadline: Instant) -> Result<i64, QgaError> {
        let Some((path, args)) = request.argv.split_first() else {
            return Err(QgaError::Malformed {
                command: "guest-exec".into(),
                detail: "empty argv".into(),
            });
        };
        let mut arguments = json!({"path": path, "arg": args, "capture-output": true});
        if !request.env.is_empty() {
            arguments["env"] = json!(request.env);
        }
        if let Some(input) = &request.input {
            arguments["input-data"] = json!(B64.encode(input));
        }
        self.call_typed(
            "guest-exec",
            Some(arguments),
            self.bounded(deadline),
            SMALL_LINE,
            |s: ExecStarted| Ok(s.pid),
        )
        .await
        .map_err(exec_blocked)
    }

    async fn status_until(
        &self,
        pid: i64,
        request: &ExecRequest,
        deadline: Instant,
    ) -> Result<Option<ExecOutput>, QgaError> {
        let cap = request.output_cap;
        self.call_typed(
            "guest-exec-status",
            Some(json!({"pid": pid})),
            self.bounded(deadline),
            request.max_reply_line,
            move |s: ExecStatus| s.into_output(cap),
        )
        .await
        .map_err(exec_blocked)
    }

    fn bounded(&self, deadline: Instant) -> Duration {
        self.config
            .call_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
    }
}

/// What an error of `guest-exec`/`guest-exec-status` means: a missing or disabled command is
/// [`QgaError::ExecBlocked`], anything else stays as it is.
pub fn exec_blocked(e: QgaError) -> QgaError {
    match e {
        QgaError::Remote { command, error }
            if error.class == "CommandNotFound" || error.desc.contains("disabled") =>
        {
            QgaError::ExecBlocked {
                detail: format!("{command}: {error}"),
            }
        }
        other => other,
    }
}

impl ExecStatus {
    /// The result as [`QgaClient::exec`] returns it: `Ok(None)` while the process runs, else
    /// its status and output (each at most `cap` bytes). An exit code outside `0..=255`, a
    /// signal outside `1..=64`, neither of them, or output that is not base64 is `Err`, with a
    /// safe description.
    pub fn into_output(self, cap: usize) -> Result<Option<ExecOutput>, String> {
        exec_output(self, cap)
    }
}

/// The result of a `guest-exec-status` reply: `None` while the process runs.
fn exec_output(status: ExecStatus, cap: usize) -> Result<Option<ExecOutput>, String> {
    if !status.exited {
        return Ok(None);
    }
    let kind = match (status.exitcode, status.signal) {
        (_, Some(sig)) if (1..=64).contains(&sig) => ExitStatus::Signal(sig as i32),
        (_, Some(sig)) => return Err(format!("signal {sig} out of range")),
        (Some(code), None) if (0..=255).contains(&code) => ExitStatus::Code(code as i32),
        (Some(code), None) => return Err(format!("exit code {code} out of range")),
        (None, None) => return Err("exited without exitcode or signal".into()),
    };
    let (stdout, out_cut) =
        decode_capped(status.out_data.as_deref(), cap).ok_or("out-data is not base64")?;
    let (stderr, err_cut) =
        decode_capped(status.err_data.as_deref(), cap).ok_or("err-data is not base64")?;
    Ok(Some(ExecOutput {
        status: kind,
        stdout,
        stderr,
        stdout_truncated: out_cut || status.out_truncated,
        stderr_truncated: err_cut || status.err_truncated,
    }))
}

/// Decodes at most `cap` bytes of a base64 field (absent = empty). `None` if it is not base64.
fn decode_capped(field: Option<&str>, cap: usize) -> Option<(Vec<u8>, bool)> {
    let Some(text) = field else {
        return Some((Vec::new(), false));
    };
    let text = text.as_bytes();
    // Decode only a prefix long enough for `cap` bytes (base64: 4 chars per 3 bytes).
    let prefix_len = cap.div_ceil(3).saturating_mul(4).min(text.len());
    let mut bytes = B64.decode(&text[..prefix_len]).ok()?;
    let cut = bytes.len() > cap || prefix_len < text.len();
    bytes.truncate(cap);
    Some((bytes, cut))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::Value;

    fn status(v: Value, cap: usize) -> Result<Option<ExecOutput>, String> {
        exec_output(serde_json::from_value(v).map_err(|e| e.to_string())?, cap)
    }

    #[test]
    fn exec_output_signal_and_code() {
        let out = status(
            json!({"exited": true, "signal": 9, "out-data": B64.encode("hi")}),
            100,
        )
        .unwrap()
        .unwrap();
        assert_eq!(out.status, ExitStatus::Signal(9));
        assert_eq!(out.stdout, b"hi");
        let out = status(json!({"exited": true, "exitcode": 3}), 100)
            .unwrap()
            .unwrap();
        assert_eq!(out.status, ExitStatus::Code(3));
        assert!(out.stdout.is_empty() && !out.stdout_truncated);
        assert!(status(json!({"exited": false}), 100).unwrap().is_none());
        assert!(status(json!({"exited": true}), 100).is_err());
        assert!(
            status(
                json!({"exited": true, "exitcode": 0, "out-data": "!!"}),
                100
            )
            .is_err()
        );
    }

    #[test]
    fn exit_status_out_of_range_is_malformed() {
        for bad in [
            json!({"exited": true, "exitcode": -1}),
            json!({"exited": true, "exitcode": 256}),
            json!({"exited": true, "exitcode": 1_i64 << 40}),
            json!({"exited": true, "signal": 0}),
            json!({"exited": true, "signal": 65}),
            json!({"exited": true, "signal": -9}),
        ] {
            assert!(status(bad.clone(), 10).is_err(), "{bad}");
        }
    }

    #[test]
    fn pid_out_of_range_is_malformed() {
        for bad in [
            json!({"pid": 0}),
            json!({"pid": -1}),
            json!({"pid": 1_i64 << 31}),
            json!({"pid": "7"}),
        ] {
            assert!(
                serde_json::from_value::<ExecStarted>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            serde_json::from_value::<ExecStarted>(json!({"pid": 42}))
                .unwrap()
                .pid,
            42
        );
    }

    #[test]
    fn output_is_capped_and_flagged() {
        let data = vec![b'x'; 1000];
        let out = status(
            json!({"exited": true, "exitcode": 0, "out-data": B64.encode(&data), "err-truncated": true}),
            10,
        )
        .unwrap()
        .unwrap();
        assert_eq!(out.stdout.len(), 10);
        assert!(out.stdout_truncated);
        assert!(out.stderr_truncated);
        let out = status(
            json!({"exited": true, "exitcode": 0, "out-data": B64.encode(&data[..9])}),
            9,
        )
        .unwrap()
        .unwrap();
        assert_eq!(out.stdout.len(), 9);
        assert!(!out.stdout_truncated);
    }
}
