//! What vmhad serves besides the JSON API, all embedded in the binary (no build step, no files
//! to install): the web page at `/` with its script and style sheet (`crates/vmhad/web/`), and
//! the OpenAPI document of every `/v1` route at `/v1/openapi.json` (`docs/openapi.json`). None
//! of it holds data — the page fetches everything through the API with the operator's token —
//! so on TCP it is served without a token.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// The page.
const INDEX_HTML: &str = include_str!("../web/index.html");
/// Its script.
const APP_JS: &str = include_str!("../web/app.js");
/// Its style sheet.
const STYLE_CSS: &str = include_str!("../web/style.css");
/// The OpenAPI 3 document of the API, as kept in the repository.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// A static answer of `content_type`, never cached across vmhad versions.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The routes of the page, its files and the OpenAPI document (any router state).
pub fn routes<T: Clone + Send + Sync + 'static>() -> Router<T> {
    Router::new()
        .route(
            "/",
            get(|| async {
                let page = asset("text/html; charset=utf-8", INDEX_HTML).into_response();
                let mut page = page;
                page.headers_mut().insert(
                    header::CONTENT_SECURITY_POLICY,
                    header::HeaderValue::from_static(
                        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                    ),
                );
                page
            }),
        )
        .route(
            "/web/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/web/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/v1/openapi.json",
            get(|| async { asset("application/json", OPENAPI_JSON) }),
        )
}
