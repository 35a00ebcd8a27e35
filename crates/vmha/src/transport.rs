//! Where vmhad's API is and how bytes get there: its local Unix socket, or a remote vmhad's
//! TCP listener over `http://` or `https://` (rustls; the server's certificate checked against
//! `--ca-cert` or the system's CA bundle). The bearer token of a remote vmhad is kept in a
//! [`Token`] that never prints.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// The system's CA bundle (Debian's `ca-certificates`), used for `https://` without
/// `--ca-cert`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token; `None` when `text` is empty.
    pub fn new(text: &str) -> Option<Token> {
        (!text.is_empty()).then(|| Token(text.to_string()))
    }

    /// The `Authorization` header line that carries it.
    pub fn header(&self) -> String {
        format!("Authorization: Bearer {}\r\n", self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(…)")
    }
}

/// A remote vmhad's address: `http[s]://HOST[:PORT][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    /// TLS or not.
    pub https: bool,
    /// The host name or IP address (IPv6 without brackets).
    pub host: String,
    /// The port (80 or 443 when not given).
    pub port: u16,
    /// A path prefix before `/v1/…` (empty, or starting with `/`, no trailing `/`).
    pub prefix: String,
    text: String,
}

impl RemoteUrl {
    /// Parses `text`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<RemoteUrl, String> {
        let (https, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "`{text}`: the URL must start with http:// or https://"
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(format!("`{text}`: no query or fragment allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "`{text}`: no user name in the URL; pass the token with --token or $VMHA_TOKEN"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("`{text}`: unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("`{text}`: no host"));
        }
        let port = match port {
            None => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("`{text}`: bad port `{p}`"))?,
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("`{text}`: bad path"));
        }
        Ok(RemoteUrl {
            https,
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
            text: text.trim_end_matches('/').to_string(),
        })
    }

    /// The `Host` header's value.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{host}:{}", self.port)
    }
}

impl fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which vmhad: the path of its local socket, or a remote URL. Displays as the path or URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// vmhad's local API socket.
    Socket(PathBuf),
    /// A remote vmhad.
    Url(RemoteUrl),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Socket(p) => write!(f, "{}", p.display()),
            Target::Url(u) => write!(f, "{u}"),
        }
    }
}

/// Why an `https://` client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The CA file could not be read or holds no certificate.
    #[error("reading the CA certificates {}: {detail}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("setting up TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS client configuration trusting the PEM certificates in `ca_file`.
pub fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let bad = |detail: String| TlsSetupError::CaFile {
        path: ca_file.to_path_buf(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        // The system bundle may hold certificates rustls cannot use: skip those.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(bad("no usable certificate in it".to_string()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The server name a certificate must carry for `url`.
pub fn server_name(url: &RemoteUrl) -> Result<ServerName<'static>, String> {
    ServerName::try_from(url.host.clone()).map_err(|e| format!("`{}`: {e}", url.host))
}

/// An open connection to vmhad.
pub enum Transport {
    /// The local socket.
    Unix(UnixStream),
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Transport {
    /// Bounds the next reads and writes (`None`: wait forever).
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Transport::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Transport::Tls(s) => {
                s.sock.set_read_timeout(timeout)?;
                s.sock.set_write_timeout(timeout)
            }
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.read(buf),
            Transport::Tcp(s) => s.read(buf),
            // A server that closes without close_notify ends the body like a plain close
            // would: the body's own parse tells a cut answer.
            Transport::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.write(buf),
            Transport::Tcp(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Unix(s) => s.flush(),
            Transport::Tcp(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_prefixes() {
        let u = RemoteUrl::parse("https://kvm1.example:9443/").unwrap();
        assert!(u.https);
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("kvm1.example", 9443, "")
        );
        assert_eq!(u.to_string(), "https://kvm1.example:9443");
        let u = RemoteUrl::parse("http://10.0.0.1/vmha").unwrap();
        assert_eq!((u.port, u.prefix.as_str()), (80, "/vmha"));
        assert_eq!(u.authority(), "10.0.0.1:80");
        let u = RemoteUrl::parse("https://[::1]").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 443));
        assert_eq!(u.authority(), "[::1]:443");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, why) in [
            ("kvm1:9443", "must start with http:// or https://"),
            ("ftp://kvm1", "must start with http:// or https://"),
            ("http://", "no host"),
            ("http://kvm1:0", "bad port `0`"),
            ("http://kvm1:http", "bad port `http`"),
            ("http://admin:secret@kvm1", "no user name in the URL"),
            ("http://kvm1/?x=1", "no query"),
            ("http://[::1", "unclosed ["),
        ] {
            let err = RemoteUrl::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn tokens_never_print() {
        let t = Token::new("s3cret").unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        assert_eq!(t.header(), "Authorization: Bearer s3cret\r\n");
        assert!(Token::new("").is_none());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = tls_config(&path).unwrap_err().to_string();
        assert!(err.contains("no usable certificate"), "{err}");
        let err = tls_config(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("reading the CA certificates "), "{err}");
    }
}
