//! The runner-facing grant API.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};

use super::{ApiState, ClientAddr};
use crate::auth::api_types::{ApiError, GrantRequest, GrantResponse};
use crate::auth::{GrantId, GrantKind};

/// The grant API's routes; bodies over `max_body` bytes get 413 unread.
pub fn runner_router(state: Arc<ApiState>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/grants", post(create_grant))
        .route("/v1/grants/{id}", delete(delete_own_grant))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

pub(super) fn error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(e)).into_response()
}

pub(super) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(ApiError::missing_token)
}

/// `POST /v1/grants`: a token in, a grant bound to the caller's address out.
async fn create_grant(
    State(state): State<Arc<ApiState>>,
    Extension(ClientAddr(peer)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(gate) = &state.gate else {
        return error(&ApiError::new(
            404,
            "auth_disabled",
            "this agent does not authenticate connections",
        ));
    };
    let result = async {
        let token = bearer(&headers)?;
        let request: GrantRequest = if body.iter().all(u8::is_ascii_whitespace) {
            GrantRequest::default()
        } else {
            serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
        };
        let request = request.parse()?;
        let token = gate.validator.validate(token).await.map_err(|e| ApiError::from_token_error(&e))?;
        let now = SystemTime::now();
        let decision = gate
            .policy()
            .decide_grant(&token, request.destinations, request.lifetime, now)
            .map_err(|d| ApiError::from_denial(&d))?;
        if decision.expires_at <= now {
            return Err(ApiError::new(401, "token_expired", "the token expires within the configured leeway"));
        }
        let grant = gate.record(gate.store.create(GrantKind::Source { source: peer.ip() }, &token, &decision, now));
        tracing::info!(grant = %grant.id, subject = %grant.subject, source = %peer.ip(), rule = %grant.rule, "grant created");
        GrantResponse::from_grant(&grant).ok_or_else(|| ApiError::new(500, "internal_error", "grant has no source"))
    }
    .await;
    match result {
        Ok(response) => (StatusCode::CREATED, Json(response)).into_response(),
        Err(e) => {
            tracing::info!(client = %peer, reason = %e.error, message = %e.message, "grant refused");
            error(&e)
        }
    }
}

/// `DELETE /v1/grants/{id}` by the grant's own subject (same bearer token
/// subject): a job ending early gives its access back.
async fn delete_own_grant(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(gate) = &state.gate else {
        return error(&ApiError::new(
            404,
            "auth_disabled",
            "this agent does not authenticate connections",
        ));
    };
    let result = async {
        let token = bearer(&headers)?;
        let token = gate
            .validator
            .validate(token)
            .await
            .map_err(|e| ApiError::from_token_error(&e))?;
        let id: GrantId = id
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{id:?} is not a grant id")))?;
        match gate.store.get(id) {
            Some(grant) if grant.subject == token.subject => {
                gate.store.revoke(id);
                Ok(())
            }
            _ => Err(ApiError::new(
                404,
                "no_such_grant",
                format!("no grant {id} for this subject"),
            )),
        }
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}
