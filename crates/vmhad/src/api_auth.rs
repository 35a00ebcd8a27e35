//! Who may do what on the API's TCP listeners: bearer tokens from the configuration
//! (`[[api.token]]`), each `read-only` or `admin`. A request without a token, or with one vmhad
//! does not know, is refused with 401 `unauthorized`; a read-only token on an admin endpoint
//! (any method but `GET`/`HEAD`: admin commands, configuration, guest exec) with 403
//! `forbidden`. The web page and its static files, and the OpenAPI document, hold no data and
//! are served without a token.
//!
//! Secrets are kept only as SHA-256 digests and compared in constant time against every token
//! (no early exit, so neither which token matched nor how much of a secret was right shows in
//! the timing); a secret is never logged, only a token's name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;
use vmha_api::ErrorCode;
use vmha_model::{ApiToken, Name, TokenRole};

use crate::api_error::ApiError;

/// The shortest secret vmhad accepts (bytes): shorter ones are guessable.
pub const MIN_SECRET_LEN: usize = 16;

/// The longest secret file vmhad reads.
const MAX_SECRET_FILE: u64 = 4096;

/// Paths served on TCP without a token (`GET` only): the page, its files, the API description.
pub const PUBLIC_PATHS: &[&str] = &["/", "/web/app.js", "/web/style.css", "/v1/openapi.json"];

/// Why the API tokens could not be loaded (vmhad does not start).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The secret file cannot be read.
    #[error("reading the secret of API token `{name}` from {}: {source}", path.display())]
    Read {
        /// The token.
        name: Name,
        /// Its secret file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The secret file is not a regular file of at most 4 KiB of UTF-8.
    #[error("the secret file {} of API token `{name}` is not a small text file", path.display())]
    NotASecret {
        /// The token.
        name: Name,
        /// Its secret file.
        path: PathBuf,
    },
    /// The secret (first line, trimmed) is too short.
    #[error(
        "the secret of API token `{name}` ({}) is shorter than {MIN_SECRET_LEN} characters",
        path.display()
    )]
    TooShort {
        /// The token.
        name: Name,
        /// Its secret file.
        path: PathBuf,
    },
    /// Two tokens have the same secret (then the role would depend on the order).
    #[error("API tokens `{0}` and `{1}` have the same secret")]
    Duplicate(Name, Name),
}

struct Entry {
    name: Name,
    role: TokenRole,
    digest: [u8; 32],
}

/// The API's bearer tokens, secrets kept as digests only.
pub struct Tokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The secret in `path`: its first line without surrounding whitespace.
fn read_secret(name: &Name, path: &Path) -> Result<String, TokenError> {
    let read = |source| TokenError::Read {
        name: name.clone(),
        path: path.to_path_buf(),
        source,
    };
    let not_a_secret = || TokenError::NotASecret {
        name: name.clone(),
        path: path.to_path_buf(),
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if !meta.is_file() || meta.len() > MAX_SECRET_FILE {
        return Err(not_a_secret());
    }
    let bytes = std::fs::read(path).map_err(read)?;
    let text = String::from_utf8(bytes).map_err(|_| not_a_secret())?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.len() < MIN_SECRET_LEN {
        return Err(TokenError::TooShort {
            name: name.clone(),
            path: path.to_path_buf(),
        });
    }
    Ok(secret)
}

impl Tokens {
    /// Reads every token's secret file (first line, trimmed, at least [`MIN_SECRET_LEN`]
    /// bytes).
    pub fn load(tokens: &[ApiToken]) -> Result<Tokens, TokenError> {
        let mut entries: Vec<Entry> = Vec::new();
        for t in tokens {
            let secret = read_secret(&t.name, &t.secret_file)?;
            let digest = sha256(secret.as_bytes());
            if let Some(other) = entries.iter().find(|e| e.digest == digest) {
                return Err(TokenError::Duplicate(other.name.clone(), t.name.clone()));
            }
            entries.push(Entry {
                name: t.name.clone(),
                role: t.role,
                digest,
            });
        }
        Ok(Tokens { entries })
    }

    /// Whether no token is configured (then every request on TCP is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The token whose secret is `presented`, if any: its name and role. Takes the same time
    /// whichever token (or none) matches.
    pub fn check(&self, presented: &[u8]) -> Option<(&Name, TokenRole)> {
        let presented = sha256(presented);
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&presented)) {
                found = Some(e);
            }
        }
        found.map(|e| (&e.name, e.role))
    }
}

/// Whether `method` only reads (a read-only token may use it).
fn reads(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// The bearer token of a request's `Authorization` header, if it has one.
fn bearer(req: &Request) -> Option<&[u8]> {
    let value = req.headers().get(header::AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value.get(7..))
        .flatten()
        .map(<[u8]>::trim_ascii)
}

/// The TCP listeners' middleware: lets through public paths and requests whose token allows
/// them; refuses the rest with 401 or 403 before any handler runs.
pub async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    if reads(req.method()) && PUBLIC_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let Some((name, role)) = bearer(&req).and_then(|b| tokens.check(b)) else {
        let mut refusal = ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this request needs a valid API token (`Authorization: Bearer TOKEN`); nothing was \
             changed",
        )
        .into_response();
        refusal.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"vmhad\""),
        );
        return refusal;
    };
    if role == TokenRole::ReadOnly && !reads(req.method()) {
        tracing::debug!(token = %name, "read-only API token refused on {}", req.uri().path());
        return ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "API token `{name}` is read-only; {} {} needs an admin token; nothing was changed",
                req.method(),
                req.uri().path()
            ),
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token(dir: &Path, name: &str, role: TokenRole, secret: &str) -> ApiToken {
        let path = dir.join(name);
        std::fs::write(&path, secret).unwrap();
        ApiToken {
            name: Name::new(name).unwrap(),
            role,
            secret_file: path,
        }
    }

    #[test]
    fn only_the_exact_secret_of_a_token_gives_its_role() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::load(&[
            token(
                dir.path(),
                "ops",
                TokenRole::Admin,
                "admin-secret-0123456789\n",
            ),
            token(
                dir.path(),
                "view",
                TokenRole::ReadOnly,
                "  read-secret-0123456789 \nx",
            ),
        ])
        .unwrap();
        let (name, role) = tokens.check(b"admin-secret-0123456789").unwrap();
        assert_eq!((name.as_str(), role), ("ops", TokenRole::Admin));
        let (name, role) = tokens.check(b"read-secret-0123456789").unwrap();
        assert_eq!((name.as_str(), role), ("view", TokenRole::ReadOnly));
        for wrong in [
            &b""[..],
            b"admin-secret-012345678",
            b"admin-secret-01234567890",
            b"read-secret-0123456789 \nx",
            b"x",
        ] {
            assert!(tokens.check(wrong).is_none(), "{wrong:?}");
        }
        // The secret never shows in the debug output.
        assert!(!format!("{tokens:?}").contains("secret"));
    }

    #[test]
    fn short_missing_and_duplicate_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let short = token(dir.path(), "a", TokenRole::Admin, "too-short\n");
        assert!(matches!(
            Tokens::load(&[short]),
            Err(TokenError::TooShort { .. })
        ));
        let mut missing = token(dir.path(), "b", TokenRole::Admin, "");
        missing.secret_file = dir.path().join("nope");
        assert!(matches!(
            Tokens::load(&[missing]),
            Err(TokenError::Read { .. })
        ));
        let mut a_dir = token(dir.path(), "c", TokenRole::Admin, "");
        a_dir.secret_file = dir.path().to_path_buf();
        assert!(matches!(
            Tokens::load(&[a_dir]),
            Err(TokenError::NotASecret { .. })
        ));
        let one = token(dir.path(), "d", TokenRole::Admin, "same-secret-0123456789");
        let two = token(
            dir.path(),
            "e",
            TokenRole::ReadOnly,
            "same-secret-0123456789",
        );
        assert!(matches!(
            Tokens::load(&[one, two]),
            Err(TokenError::Duplicate(..))
        ));
    }
}
