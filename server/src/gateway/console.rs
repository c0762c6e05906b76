//! `/console/`: the web console, three static files compiled into the binary
//! (`server/console/`). It reads only the gateway's own endpoints (`/anomalies`,
//! `/devices`, `/window`), and its Content-Security-Policy holds it to them: no CDN, no
//! other origin.

use axum::{
    extract::Path,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};

use super::schema_names::ErrorBody;
use crate::error::{ApiError, ErrorKind};

/// The page.
const INDEX_HTML: &str = include_str!("../../console/index.html");

/// The assets under `/console/`: (file name, content type, content).
const ASSETS: [(&str, &str, &str); 2] = [
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../../console/console.css"),
    ),
];

/// Same-origin only: scripts, styles and connections (the SSE feed, the JSON reads).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// A static file with the console's headers.
fn file(content_type: &'static str, content: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        content,
    )
        .into_response()
}

/// `GET /console/`: the console page.
#[utoipa::path(
    get,
    path = "/console/",
    tag = "console",
    responses((status = 200, description = "The console page", content_type = "text/html",
               body = String))
)]
pub(crate) async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /console`: to `/console/`, so that the page's relative links resolve.
#[utoipa::path(
    get,
    path = "/console",
    tag = "console",
    responses((status = 308, description = "Redirect to /console/"))
)]
pub(crate) async fn redirect() -> Response {
    Redirect::permanent("/console/").into_response()
}

/// `GET /console/{file}`: the console's script and style sheet.
#[utoipa::path(
    get,
    path = "/console/{file}",
    tag = "console",
    params(("file" = String, Path, description = "An asset of the console",
            example = "console.js")),
    responses(
        (status = 200, description = "The asset", content(
            (String = "text/javascript"),
            (String = "text/css"),
        )),
        (status = 404, description = "No such asset", body = ErrorBody),
    )
)]
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, content)) => file(content_type, content),
        None => ApiError::new(
            ErrorKind::NotFound,
            format!("the console has no file {name:?}"),
        )
        .into_response(),
    }
}
