//! The API on TCP (`[api] listen`): binds the listeners, loads the bearer tokens
//! ([`crate::api_auth`]) and, when `tls_cert` and `tls_key` are set, the TLS certificate
//! (rustls with the ring provider; TLS 1.2 and 1.3, HTTP/1.1). Everything is prepared before
//! vmhad serves anything: a listen address in use, an unreadable secret or a bad certificate
//! stops vmhad at start with the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use vmha_model::ApiConfig;

use crate::api_auth::{TokenError, Tokens};

/// Why the TCP API could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TcpApiError {
    /// A listen address could not be bound.
    #[error("listening on {addr} for the API: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What failed.
        source: std::io::Error,
    },
    /// A token's secret could not be loaded.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The certificate or key file cannot be read or holds no usable PEM.
    #[error("reading the API's TLS {what} {}: {reason}", path.display())]
    Pem {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificate and key (e.g. the key does not match).
    #[error("the API's TLS certificate and key cannot be used: {0}")]
    Tls(#[from] rustls::Error),
}

/// The prepared TCP side of the API: bound listeners, tokens, TLS.
pub struct TcpApi {
    /// The bound listeners, with the addresses they were configured as.
    pub listeners: Vec<(String, std::net::TcpListener)>,
    /// The bearer tokens.
    pub tokens: Arc<Tokens>,
    /// The TLS acceptor, when a certificate is configured.
    pub tls: Option<TlsAcceptor>,
}

impl TcpApi {
    /// Prepares the TCP API of `api`, or `None` when it has no listen address.
    pub fn prepare(api: &ApiConfig) -> Result<Option<TcpApi>, TcpApiError> {
        if api.listen.is_empty() {
            return Ok(None);
        }
        let tokens = Arc::new(Tokens::load(&api.tokens)?);
        if tokens.is_empty() {
            tracing::warn!(
                "[api] listen is set but no [[api.token]]: every TCP request but the web page \
                 will be refused with 401"
            );
        }
        let tls = match (&api.tls_cert, &api.tls_key) {
            (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
            _ => None,
        };
        let mut listeners = Vec::new();
        for addr in &api.listen {
            let bind = |source| TcpApiError::Bind {
                addr: addr.clone(),
                source,
            };
            let l = std::net::TcpListener::bind(addr.as_str()).map_err(bind)?;
            l.set_nonblocking(true).map_err(bind)?;
            listeners.push((addr.clone(), l));
        }
        Ok(Some(TcpApi {
            listeners,
            tokens,
            tls,
        }))
    }
}

/// A TLS acceptor serving the certificate chain in `cert` with the key in `key` (PEM).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TcpApiError> {
    let pem = |what, path: &Path, reason: String| TcpApiError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem("certificate", cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem("certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("certificate", cert, "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem("key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
