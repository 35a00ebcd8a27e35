//! The API on TCP for tests: [`enable`] adds an `[api]` section (a free port on 127.0.0.1, an
//! admin and a read-only token, optionally TLS with the fixed test certificate in
//! `tests/data`) to a test vmhad's configuration, and [`Tcp`] sends raw HTTP/1.1 requests to
//! it, over TLS when enabled, trusting only that certificate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

use super::Vmhad;

/// The admin token's secret.
pub const ADMIN: &str = "admin-secret-for-tests-0123456789";
/// The read-only token's secret.
pub const READER: &str = "read-only-secret-for-tests-0123456789";

/// The test certificate and key (CN `vmhad test`, for `localhost` and `127.0.0.1`).
pub fn test_cert() -> (PathBuf, PathBuf) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    (data.join("tls-cert.pem"), data.join("tls-key.pem"))
}

/// A TCP port nobody listens on now (bound and released: another process may take it first,
/// which would fail vmhad's start loudly, never silently).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local_addr").port()
}

/// Adds the `[api]` section to `h`'s configuration (before it starts); returns the client.
pub fn enable(h: &Vmhad, tls: bool) -> Tcp {
    let dir = h.config.parent().expect("config dir").to_path_buf();
    std::fs::write(dir.join("admin.token"), format!("{ADMIN}\n")).expect("admin token");
    std::fs::write(dir.join("reader.token"), format!("{READER}\n")).expect("reader token");
    let port = free_port();
    let (cert, key) = test_cert();
    let tls_keys = if tls {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        )
    } else {
        String::new()
    };
    let section = format!(
        "\n[api]\nlisten = [\"127.0.0.1:{port}\"]\n{tls_keys}token = [\n  \
         {{ name = \"ops\", role = \"admin\", secret_file = \"{admin}\" }},\n  \
         {{ name = \"viewer\", role = \"read-only\", secret_file = \"{reader}\" }},\n]\n",
        admin = dir.join("admin.token").display(),
        reader = dir.join("reader.token").display(),
    );
    let mut config = std::fs::read_to_string(&h.config).expect("config");
    config.push_str(&section);
    std::fs::write(&h.config, config).expect("writing config");
    Tcp {
        addr: format!("127.0.0.1:{port}"),
        tls: tls.then(|| client_config(&cert)),
    }
}

fn client_config(cert: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert).expect("test cert"))
        .expect("adding the test cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A connection to the TCP API, plain or TLS.
pub type Stream = Box<dyn ReadWrite>;

/// Read + Write.
pub trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// A response: status, lower-cased headers, body text.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Response {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{} body is not JSON ({e}): {:?}", self.status, self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The client of a test vmhad's TCP API.
#[derive(Clone)]
pub struct Tcp {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Tcp {
    /// The page's URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/", self.addr)
    }

    /// A new connection (TLS handshake included when enabled).
    pub fn connect(&self) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(&self.addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        let Some(config) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = ServerName::try_from("localhost").expect("server name");
        let conn = rustls::ClientConnection::new(Arc::clone(config), name)
            .map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // Complete the handshake now, so that a refused one fails here.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Box::new(tls))
    }

    /// Sends `raw` on a new connection and reads one response.
    pub fn raw(&self, raw: &[u8]) -> Response {
        let mut s = self.connect().expect("connecting to the TCP API");
        s.write_all(raw).expect("sending");
        read_response(&mut s)
    }

    /// A request with an optional bearer `token` and JSON `body`.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        self.raw(&request(method, path, token, body))
    }
}

/// A raw HTTP/1.1 request (one per connection).
pub fn request(method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: vmhad\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or_default());
    head.into_bytes()
}

/// Reads one response (with `content-length`, or up to the end of the connection).
pub fn read_response(s: &mut Stream) -> Response {
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header");
        let Some((k, v)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body).expect("body");
        }
        None => {
            let _ = reader.read_to_end(&mut body);
        }
    }
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}
