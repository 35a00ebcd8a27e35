//! Which vmhad the daemon commands talk to, and how long to wait for it: the global
//! `--socket` / `--state-dir` / `--timeout` options and the `VMHA_SOCKET` / `VMHA_TIMEOUT`
//! environment variables (an option wins over the variable).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use vmha_api::ExecRequest;
use vmha_model::duration::millis;

use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::report::UsageError;

/// Environment variable naming vmhad's API socket when neither `--socket` nor `--state-dir`
/// is given.
pub const SOCKET_ENV: &str = "VMHA_SOCKET";
/// Environment variable giving the timeout of calls to vmhad when `--timeout` is not given.
pub const TIMEOUT_ENV: &str = "VMHA_TIMEOUT";

/// Which vmhad to talk to; global options of `vmha`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// vmhad's API socket [default: $VMHA_SOCKET, else /var/lib/vmha/vmhad.sock].
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "state_dir")]
    socket: Option<PathBuf>,
    /// vmhad's state directory; its API socket is DIR/vmhad.sock.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// How long to wait for vmhad: connecting and its whole answer (`events --follow`: until
    /// the stream starts) [default: $VMHA_TIMEOUT, else 10s; at most 10m]. For `guest exec`,
    /// how long the guest command may run; vmha then waits 5s longer.
    // Same id as `guest exec --timeout`: clap hands that subcommand the value wherever it is.
    #[arg(long, global = true, value_name = "DUR", value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

/// A timeout given on the command line or in `$VMHA_TIMEOUT`: a duration from 1ms to 10m (the
/// bounds of a guest command's timeout, as `guest exec` shares the option).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = vmha_model::duration::parse(s).map_err(|e| e.to_string())?;
    if !ExecRequest::timeout_allowed(millis(d)) {
        return Err("the timeout must be between 1ms and 10m".to_string());
    }
    Ok(d)
}

impl ApiArgs {
    /// The socket path: `--socket`, else `--state-dir`/vmhad.sock, else `$VMHA_SOCKET` (when
    /// set and not empty), else the default state dir's socket.
    pub fn socket(&self) -> PathBuf {
        if let Some(socket) = &self.socket {
            return socket.clone();
        }
        if let Some(dir) = &self.state_dir {
            return dir.join("vmhad.sock");
        }
        match std::env::var_os(SOCKET_ENV) {
            Some(s) if !s.is_empty() => PathBuf::from(s),
            _ => PathBuf::from(vmha_model::defaults::STATE_DIR).join("vmhad.sock"),
        }
    }

    /// The timeout of each call: `--timeout`, else `$VMHA_TIMEOUT` (when set and not empty),
    /// else [`DEFAULT_TIMEOUT`]. A bad `$VMHA_TIMEOUT` is a usage error.
    pub fn timeout(&self) -> Result<Duration, UsageError> {
        if let Some(t) = self.timeout {
            return Ok(t);
        }
        timeout_from_env(std::env::var_os(TIMEOUT_ENV))
    }

    /// A client of the vmhad at [`Self::socket`] with [`Self::timeout`].
    pub fn client(&self) -> Result<Client, UsageError> {
        Ok(Client::new(self.socket()).with_timeout(self.timeout()?))
    }
}

/// The timeout `$VMHA_TIMEOUT` (`value`) gives.
fn timeout_from_env(value: Option<std::ffi::OsString>) -> Result<Duration, UsageError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    let bad = |why: String| UsageError(format!("${TIMEOUT_ENV}: {why}"));
    let text = value
        .into_string()
        .map_err(|_| bad("not UTF-8".to_string()))?;
    parse_timeout(&text).map_err(|e| bad(format!("`{text}`: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn socket_comes_from_socket_then_state_dir() {
        let explicit = ApiArgs {
            socket: Some("/run/x.sock".into()),
            state_dir: None,
            timeout: None,
        };
        assert_eq!(explicit.socket(), PathBuf::from("/run/x.sock"));
        let dir = ApiArgs {
            socket: None,
            state_dir: Some("/srv/vmha".into()),
            timeout: None,
        };
        assert_eq!(dir.socket(), PathBuf::from("/srv/vmha/vmhad.sock"));
    }

    #[test]
    fn timeout_comes_from_the_option_then_the_environment_then_the_default() {
        let flag = ApiArgs {
            socket: None,
            state_dir: None,
            timeout: Some(Duration::from_secs(3)),
        };
        assert_eq!(flag.timeout().unwrap(), Duration::from_secs(3));
        assert_eq!(timeout_from_env(None).unwrap(), DEFAULT_TIMEOUT);
        assert_eq!(timeout_from_env(Some("".into())).unwrap(), DEFAULT_TIMEOUT);
        assert_eq!(
            timeout_from_env(Some("1500ms".into())).unwrap(),
            Duration::from_millis(1500)
        );
        let err = timeout_from_env(Some("soon".into())).unwrap_err();
        assert!(err.0.starts_with("$VMHA_TIMEOUT: `soon`: "), "{}", err.0);
        let err = timeout_from_env(Some("1h".into())).unwrap_err();
        assert!(err.0.contains("between 1ms and 10m"), "{}", err.0);
        assert!(parse_timeout("0s").is_err());
        assert_eq!(parse_timeout("10m"), Ok(Duration::from_secs(600)));
    }
}
