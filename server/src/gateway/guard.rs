//! What stands between the network and an API handler (`/ingest`, `/metric`,
//! `/analyze`, `/devices`, `/window`), in one middleware, in this order:
//!
//! 1. the caller, from its `authorization` header and client certificate (`401`
//!    without valid credentials, before any of the body is read);
//! 2. the body, read whole under the intake rules (`MAX_INCOMPLETE_BYTES`,
//!    `MIN_UPLOAD_RATE`), `MAX_BODY_BYTES` (`413`) and `REQUEST_TIMEOUT` (`408`),
//!    before the request takes a concurrency slot, so a slow upload holds none;
//! 3. a slot of `HTTP_CONCURRENCY_LIMIT`, or `503` with `Retry-After` at once (no
//!    queueing), counted as shed;
//! 4. the handler, within `REQUEST_TIMEOUT` from there (`504` past it), holding the
//!    slot until its response is built.
//!
//! These are the rules of tower's `LoadShed`, `GlobalConcurrencyLimit` and `Timeout`
//! that the gRPC server stacks (`overload`), written out for one reason: a route
//! layer is cloned for every request, so each layer of a stack costs a clone and a
//! boxed call per request, and the principal and the body would each travel to the
//! handler on their own. Here the handler gets both in one [`Admitted`], which it
//! takes out of the request's extensions rather than copies.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{FromRequestParts, Request, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{linger, read_body};
use crate::{
    config::nonzero,
    error::{ApiError, ErrorKind},
    intake::{IntakeBody, Mode},
    overload,
    security::{policy::Principal, tls::PeerInfo},
    service::AppState,
    telemetry::Transport,
};

/// The state of [`guard`]: the service and the slots of `HTTP_CONCURRENCY_LIMIT`
/// (`None`: no limit).
#[derive(Debug)]
pub(super) struct Guard {
    /// The service.
    pub(super) state: Arc<AppState>,
    /// One permit per request being handled.
    pub(super) slots: Option<Arc<Semaphore>>,
}

impl Guard {
    /// The guard of `state`'s API routes.
    pub(super) fn new(state: Arc<AppState>) -> Arc<Self> {
        let slots = overload::semaphore(state.config.http_concurrency_limit);
        Arc::new(Self { state, slots })
    }
}

/// An API request past [`guard`]: its caller, and its body read whole (empty for a
/// request without one). A handler takes it as an extractor, once.
#[derive(Debug, Clone)]
pub(super) struct Admitted {
    /// Who is asking.
    pub(super) principal: Arc<Principal>,
    /// The request's body.
    pub(super) body: Bytes,
}

impl<S: Send + Sync> FromRequestParts<S> for Admitted {
    type Rejection = ApiError;

    /// Takes the [`Admitted`] that [`guard`] left in the extensions; a route outside
    /// the guard has none, which is a routing mistake (`500`).
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts.extensions.remove::<Self>().ok_or_else(|| {
            tracing::error!("an API handler was reached without the gateway's guard");
            ApiError::new(ErrorKind::Internal, "internal error")
        })
    }
}

/// The caller of `request`, from its `authorization` header and its connection's
/// client certificate.
pub(super) fn caller(state: &AppState, request: &Request) -> Result<Arc<Principal>, ApiError> {
    let identity = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Arc<PeerInfo>>>()
        .and_then(|info| info.0.identity.as_deref());
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    state.security.principal(authorization, identity)
}

/// The `401` of a request without valid credentials. What the client is still
/// uploading is read and discarded, as for a `413`: answering an upload early
/// otherwise ends in a reset stream instead of the answer.
pub(super) fn unauthenticated(request: Request, error: ApiError) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let (parts, body) = request.into_parts();
    linger(&parts.headers, body, declared);
    error.into_response()
}

/// The API routes' middleware (see the module documentation).
pub(super) async fn guard(
    State(guard): State<Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    let state = &guard.state;
    let principal = match caller(state, &request) {
        Ok(principal) => principal,
        Err(e) => return unauthenticated(request, e),
    };
    let timeout = nonzero(state.config.request_timeout);
    let (mut parts, body) = request.into_parts();
    let body = Body::new(IntakeBody::new(
        body,
        Arc::clone(&state.intake),
        Mode::Whole {
            deadline: timeout.map(|t| tokio::time::Instant::now() + t),
            setting: "REQUEST_TIMEOUT",
        },
    ));
    let body = match read_body(&parts.headers, body, state.config.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => {
            if e.kind == ErrorKind::Overloaded {
                state.metrics.record_shed(Transport::Http);
            }
            let mut response = e.into_response();
            if response.status() == StatusCode::REQUEST_TIMEOUT {
                // The rest of a slow upload is not worth waiting for.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
    };
    // Taken only now that the request is in, and held until the handler's response
    // is built (dropped at the end of this function).
    let _slot = match &guard.slots {
        Some(slots) => match Arc::clone(slots).try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                return overload::overloaded(state, Transport::Http).into_response();
            }
        },
        None => None,
    };
    parts.extensions.insert(Admitted { principal, body });
    let handled = next.run(Request::from_parts(parts, Body::empty()));
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, handled)
            .await
            .unwrap_or_else(|_| overload::timed_out().into_response()),
        None => handled.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handler_takes_what_the_guard_left_once() {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.extensions.insert(Admitted {
            principal: Arc::new(Principal::anonymous()),
            body: Bytes::from_static(b"{}"),
        });
        let admitted = Admitted::from_request_parts(&mut parts, &())
            .await
            .expect("left by the guard");
        assert_eq!(&admitted.principal.name[..], "anonymous");
        assert_eq!(&admitted.body[..], b"{}");
        // Taken, not copied: a second extractor finds nothing, and nothing panics.
        let again = Admitted::from_request_parts(&mut parts, &())
            .await
            .expect_err("taken already");
        assert_eq!(again.kind, ErrorKind::Internal);
    }
}
