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
use crate::auth::{CreateError, GrantId};
use crate::gate::GrantRefused;

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

/// The grant endpoints of an agent without `[auth]`.
pub(super) fn auth_disabled() -> Response {
    error(&ApiError::new(
        404,
        "auth_disabled",
        "this agent does not authenticate connections",
    ))
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
        return auth_disabled();
    };
    let result = async {
        let token = bearer(&headers)?;
        let request: GrantRequest = if body.iter().all(u8::is_ascii_whitespace) {
            GrantRequest::default()
        } else {
            serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
        };
        let request = request.parse()?;
        let token = gate.validate(token).await.map_err(|e| ApiError::from_token_error(&e))?;
        let now = SystemTime::now();
        if gate.refuses(&token, now) {
            return Err(ApiError::new(403, "revoked", "access denied (revoked)"));
        }
        let decision = gate
            .policy()
            .decide_grant(&token, request.destinations, request.lifetime, now)
            .map_err(|d| ApiError::from_denial(&d))?;
        if decision.expires_at <= now {
            return Err(ApiError::new(401, "token_expired", "the token expires within the configured leeway"));
        }
        let grant = gate
            .create_source_grant(&token, &decision, peer.ip(), now)
            .map_err(|e| create_refused(&state, e))?;
        // In a fleet, the grant exists once etcd holds it: a grant only this
        // bastion knew could not be revoked from the others.
        if let Some(cluster) = &state.cluster
            && let Err(e) = cluster.publish_grant(&grant).await
        {
            gate.end_grant(grant.id);
            tracing::warn!(grant = %grant.id, error = %crate::error_chain(&e), "grant withdrawn: etcd did not store it");
            return Err(fleet_unreachable("no grant was issued"));
        }
        tracing::info!(grant = %grant.id, subject = %grant.subject, source = %peer.ip(), rule = %grant.rule, "grant created");
        GrantResponse::from_grant(&grant).ok_or_else(|| ApiError::new(500, "internal_error", "grant has no source"))
    }
    .await;
    match result {
        Ok(response) => (StatusCode::CREATED, Json(response)).into_response(),
        Err(e) => {
            let detail = crate::audit::truncate(e.message.clone(), crate::audit::MAX_DETAIL);
            tracing::info!(client = %peer, reason = %e.error, detail = %detail, "grant refused");
            error(&generic(e))
        }
    }
}

/// Token and policy refusals tell the client the reason code only: the
/// message would name the expected audience or issuer, or a rule. Errors
/// about the request itself (400) and limits (429) keep their message.
fn generic(e: ApiError) -> ApiError {
    match e.status {
        401 | 403 => {
            let message = format!("access denied ({})", e.error);
            ApiError::new(e.status, &e.error, message)
        }
        _ => e,
    }
}

/// 503 while the fleet's store cannot be reached; `what` says what that
/// meant for this request.
pub(super) fn fleet_unreachable(what: &str) -> ApiError {
    ApiError::new(
        503,
        "cluster_unavailable",
        format!("the fleet's grant store (etcd) cannot be reached; {what}; retry later"),
    )
}

/// A grant the gate would not create: revoked, a cap reached, or the
/// pinned map full.
fn create_refused(state: &ApiState, e: GrantRefused) -> ApiError {
    match e {
        GrantRefused::Store(CreateError::Revoked) => {
            ApiError::new(403, "revoked", "access denied (revoked)")
        }
        GrantRefused::MapFull(_) => {
            state.metrics.limit_hit("grants_map");
            ApiError::new(
                503,
                "grant_limit",
                "the agent holds as many grants as it can; retry later",
            )
        }
        GrantRefused::Store(CreateError::Limit(limit)) => {
            state.metrics.limit_hit(limit.as_str());
            ApiError::new(
                429,
                "grant_limit",
                format!("too many live grants ({} reached)", limit.as_str()),
            )
        }
    }
}

/// `DELETE /v1/grants/{id}` by the grant's own issuer and subject (same bearer token
/// subject): a job ending early gives its access back.
async fn delete_own_grant(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(gate) = &state.gate else {
        return auth_disabled();
    };
    let result = async {
        let token = bearer(&headers)?;
        let token = gate
            .validate(token)
            .await
            .map_err(|e| ApiError::from_token_error(&e))?;
        let id: GrantId = id
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{id:?} is not a grant id")))?;
        // GitLab shares `sub` per project and ref across issuers' tokens:
        // only the same issuer and subject may give a grant back.
        let own = gate
            .grant(id)
            .is_some_and(|g| g.issuer == token.issuer && g.subject == token.subject);
        if own
            && let Some(cluster) = &state.cluster
            && cluster.withdraw_grant(id).await.is_err()
        {
            return Err(fleet_unreachable("the grant was kept"));
        }
        // In a fleet, this bastion's own watch may have ended the grant
        // already (the record's deletion came back): still given back.
        if gate.give_back(id, &token) || own && state.cluster.is_some() {
            Ok(())
        } else {
            Err(ApiError::new(
                404,
                "no_such_grant",
                format!("no grant {id} for this subject"),
            ))
        }
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}
