//! Which vmhad the daemon commands talk to, and how long to wait for it: the global
//! `--socket` / `--state-dir` (the local vmhad), `--url` / `--token` / `--ca-cert` (a remote
//! vmhad) and `--timeout` options, and the `VMHA_SOCKET` / `VMHA_URL` / `VMHA_TOKEN` /
//! `VMHA_CA_CERT` / `VMHA_TIMEOUT` environment variables (an option wins over a variable; a
//! local option wins over `$VMHA_URL`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use vmha_api::ExecRequest;
use vmha_model::duration::millis;

use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::report::UsageError;
use crate::transport::{RemoteUrl, SYSTEM_CA_BUNDLE, Token, tls_config};

/// Environment variable naming vmhad's API socket when neither `--socket` nor `--state-dir`
/// is given.
pub const SOCKET_ENV: &str = "VMHA_SOCKET";
/// Environment variable giving the timeout of calls to vmhad when `--timeout` is not given.
pub const TIMEOUT_ENV: &str = "VMHA_TIMEOUT";
/// Environment variable naming a remote vmhad's URL when no `--url`, `--socket` or
/// `--state-dir` is given.
pub const URL_ENV: &str = "VMHA_URL";
/// Environment variable holding the API token for a remote vmhad when `--token` is not given.
pub const TOKEN_ENV: &str = "VMHA_TOKEN";
/// Environment variable naming the CA certificates (PEM) of an `https://` vmhad when
/// `--ca-cert` is not given.
pub const CA_CERT_ENV: &str = "VMHA_CA_CERT";

/// Which vmhad to talk to; global options of `vmha`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// vmhad's API socket [default: $VMHA_SOCKET, else /var/lib/vmha/vmhad.sock].
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "state_dir")]
    socket: Option<PathBuf>,
    /// vmhad's state directory; its API socket is DIR/vmhad.sock.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A remote vmhad's API: http://HOST:PORT or https://HOST:PORT (its `[api] listen`)
    /// [default: $VMHA_URL, else the local socket].
    #[arg(long, global = true, value_name = "URL", value_parser = RemoteUrl::parse,
          conflicts_with_all = ["socket", "state_dir"])]
    url: Option<RemoteUrl>,
    /// The API token sent to a remote vmhad (`Authorization: Bearer`), read-only or admin
    /// [default: $VMHA_TOKEN]. Other users may see a command line: prefer $VMHA_TOKEN.
    #[arg(long, global = true, value_name = "TOKEN", value_parser = parse_token,
)]
    token: Option<Token>,
    /// CA certificates (PEM) that signed an https:// vmhad's certificate [default:
    /// $VMHA_CA_CERT, else the system's CAs].
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
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
        let timeout = self.timeout()?;
        let Some(url) = self.remote()? else {
            if self.token.is_some() || self.ca_cert.is_some() {
                return Err(UsageError(
                    "--token and --ca-cert are for a remote vmhad: give its --url (or $VMHA_URL)"
                        .to_string(),
                ));
            }
            return Ok(Client::new(self.socket()).with_timeout(timeout));
        };
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => std::env::var(TOKEN_ENV).ok().and_then(|t| Token::new(&t)),
        };
        let tls = if url.https {
            let ca = self
                .ca_cert
                .clone()
                .or_else(|| env_path(CA_CERT_ENV))
                .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
            Some(tls_config(&ca).map_err(|e| UsageError(e.to_string()))?)
        } else if self.ca_cert.is_some() {
            return Err(UsageError(format!(
                "--ca-cert is for an https:// vmhad, not {url}"
            )));
        } else {
            None
        };
        if token.is_some() && !url.https && !is_loopback(&url.host) {
            eprintln!(
                "vmha: warning: the token crosses the network in clear to {url}; use https://"
            );
        }
        Ok(Client::remote(url, token, tls).with_timeout(timeout))
    }

    /// The remote vmhad to talk to: `--url`, else `$VMHA_URL` unless `--socket` or
    /// `--state-dir` names a local one; `None`: the local socket.
    fn remote(&self) -> Result<Option<RemoteUrl>, UsageError> {
        if let Some(url) = &self.url {
            return Ok(Some(url.clone()));
        }
        if self.socket.is_some() || self.state_dir.is_some() {
            return Ok(None);
        }
        url_from_env(std::env::var_os(URL_ENV))
    }
}

/// Whether `host` is this machine (a token sent there over plain HTTP stays on it).
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A token given on the command line (not empty).
fn parse_token(s: &str) -> Result<Token, String> {
    Token::new(s).ok_or_else(|| "the token is empty".to_string())
}

/// The path in environment variable `name`, when set and not empty.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The text of environment variable `var`, whose value is `value`: `None` when unset or empty,
/// an error naming the variable when it is not UTF-8.
fn env_text(var: &str, value: Option<std::ffi::OsString>) -> Result<Option<String>, UsageError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    value
        .into_string()
        .map(Some)
        .map_err(|_| UsageError(format!("${var}: not UTF-8")))
}

/// The URL `$VMHA_URL` (`value`) gives, if any.
fn url_from_env(value: Option<std::ffi::OsString>) -> Result<Option<RemoteUrl>, UsageError> {
    let Some(text) = env_text(URL_ENV, value)? else {
        return Ok(None);
    };
    RemoteUrl::parse(&text)
        .map(Some)
        .map_err(|why| UsageError(format!("${URL_ENV}: {why}")))
}

/// The timeout `$VMHA_TIMEOUT` (`value`) gives.
fn timeout_from_env(value: Option<std::ffi::OsString>) -> Result<Duration, UsageError> {
    let Some(text) = env_text(TIMEOUT_ENV, value)? else {
        return Ok(DEFAULT_TIMEOUT);
    };
    parse_timeout(&text).map_err(|e| UsageError(format!("${TIMEOUT_ENV}: `{text}`: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// No option given.
    fn unset() -> ApiArgs {
        ApiArgs {
            socket: None,
            state_dir: None,
            timeout: None,
            url: None,
            token: None,
            ca_cert: None,
        }
    }

    #[test]
    fn socket_comes_from_socket_then_state_dir() {
        let explicit = ApiArgs {
            socket: Some("/run/x.sock".into()),
            ..unset()
        };
        assert_eq!(explicit.socket(), PathBuf::from("/run/x.sock"));
        let dir = ApiArgs {
            state_dir: Some("/srv/vmha".into()),
            ..unset()
        };
        assert_eq!(dir.socket(), PathBuf::from("/srv/vmha/vmhad.sock"));
    }

    #[test]
    fn timeout_comes_from_the_option_then_the_environment_then_the_default() {
        let flag = ApiArgs {
            timeout: Some(Duration::from_secs(3)),
            ..unset()
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

    #[test]
    fn a_variable_that_is_not_utf8_is_named_in_the_error() {
        use std::os::unix::ffi::OsStringExt;
        let bytes = || Some(std::ffi::OsString::from_vec(vec![b'1', 0xff]));
        assert_eq!(
            timeout_from_env(bytes()).unwrap_err().0,
            "$VMHA_TIMEOUT: not UTF-8"
        );
        assert_eq!(url_from_env(bytes()).unwrap_err().0, "$VMHA_URL: not UTF-8");
    }

    #[test]
    fn the_url_comes_from_the_environment_unless_a_local_vmhad_is_named() {
        assert_eq!(url_from_env(None).unwrap(), None);
        assert_eq!(url_from_env(Some("".into())).unwrap(), None);
        let url = url_from_env(Some("https://kvm1:9443".into()))
            .unwrap()
            .unwrap();
        assert_eq!((url.host.as_str(), url.port), ("kvm1", 9443));
        let err = url_from_env(Some("kvm1:9443".into())).unwrap_err();
        assert!(err.0.starts_with("$VMHA_URL: `kvm1:9443`: "), "{}", err.0);
        let local = ApiArgs {
            socket: Some("/run/x.sock".into()),
            ..unset()
        };
        // A named socket wins over $VMHA_URL (whatever the test's environment holds).
        assert_eq!(local.remote().unwrap(), None);
    }

    #[test]
    fn a_token_or_ca_without_a_remote_vmhad_is_a_usage_error() {
        let args = ApiArgs {
            socket: Some("/run/x.sock".into()),
            token: Token::new("t"),
            ..unset()
        };
        let err = args.client().unwrap_err();
        assert!(err.0.contains("are for a remote vmhad"), "{}", err.0);
        let http = ApiArgs {
            url: Some(RemoteUrl::parse("http://kvm1:8080").unwrap()),
            ca_cert: Some("/etc/ca.pem".into()),
            ..unset()
        };
        let err = http.client().unwrap_err();
        assert!(
            err.0.contains("--ca-cert is for an https:// vmhad"),
            "{}",
            err.0
        );
        assert!(parse_token("").is_err());
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("localhost"));
        assert!(!is_loopback("kvm1") && !is_loopback("10.0.0.1"));
    }
}
