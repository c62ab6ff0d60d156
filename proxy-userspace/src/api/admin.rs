//! Operator endpoints, served on the operator socket (its file mode is the
//! access control) and, when configured, on TCP behind a bearer token.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Serialize;

use super::runner::{auth_disabled, bearer, error};
use super::{ApiError as ServeError, ApiState};
use crate::auth::api_types::ApiError;
use crate::auth::{Grant, GrantId};
use crate::datapath::{EndReason, SessionMeta};
use crate::registry::Stopped;

/// The bearer token TCP operator clients must send.
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Shortest token accepted: 32 bytes, as for HS256 secrets.
    pub const MIN_LEN: usize = 32;

    /// Reads the token (trimmed) from `path`.
    pub fn read(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServeError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim();
        if token.len() < Self::MIN_LEN {
            return Err(ServeError::ShortToken {
                path: path.to_owned(),
                min: Self::MIN_LEN,
            });
        }
        Ok(Self(token.to_owned()))
    }

    /// Compares in time independent of where the first difference is.
    fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The operator routes. With `token`, everything but the health probes
/// needs `Authorization: Bearer <token>`: probes say nothing about grants
/// or subjects, and load balancers and systemd checks call them bare.
pub fn admin_router(state: Arc<ApiState>, token: Option<Arc<AdminToken>>) -> Router {
    let mut protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/grants", get(list_grants).delete(revoke_subject))
        .route("/v1/grants/{id}", delete(revoke_grant))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/fleet/grants", get(super::fleet::fleet_grants));
    if let Some(token) = token {
        protected = protected.layer(axum::middleware::from_fn_with_state(token, require_token));
    }
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state)
}

async fn require_token(
    State(token): State<Arc<AdminToken>>,
    request: Request,
    next: Next,
) -> Response {
    match bearer(request.headers()) {
        Ok(given) if token.matches(given) => next.run(request).await,
        _ => error(&ApiError::new(
            401,
            "unauthorized",
            "the operator endpoints need Authorization: Bearer <[admin] token_file>",
        )),
    }
}

/// Ready once serving; in a fleet, the body also states the cluster's
/// health (a bastion cut off from etcd keeps serving the grants it holds).
async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    let cluster = state
        .cluster
        .as_ref()
        .map(|c| c.health().summary(c.name()))
        .unwrap_or_default();
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, format!("ready\n{cluster}")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("starting\n{cluster}"),
        )
            .into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let sessions = state.registry.snapshot();
    let snapshot = crate::metrics::Snapshot {
        live_sessions: state.registry.len(),
        live_grants: state.gate.as_ref().map_or(0, |g| g.live_grants()),
        live_counters: sessions
            .iter()
            .filter_map(|m| state.datapath.live_counters(m.id))
            .collect(),
        token_cache: state.gate.as_ref().map(|g| g.token_cache_stats()),
    };
    if let Some(cluster) = &state.cluster {
        cluster.health().refresh();
    }
    let body = state.metrics.render(&snapshot);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        body,
    )
        .into_response()
}

/// A grant as operators see it.
#[derive(Debug, Serialize)]
pub struct GrantView {
    pub grant_id: String,
    pub kind: &'static str,
    pub subject: String,
    pub rule: String,
    #[serde(with = "humantime_serde")]
    pub expires_at: std::time::SystemTime,
    pub sessions: usize,
    /// Where a source grant applies from.
    pub source: Option<std::net::IpAddr>,
    pub destinations: Vec<crate::dest::Destination>,
}

fn view(grant: &Grant, sessions: usize) -> GrantView {
    GrantView {
        grant_id: grant.id.to_string(),
        kind: if grant.source().is_some() {
            "source"
        } else {
            "preamble"
        },
        subject: grant.subject.clone(),
        rule: grant.rule.clone(),
        expires_at: grant.expires_at,
        sessions,
        source: grant.source(),
        destinations: grant.destinations.clone(),
    }
}

fn sessions_per_grant(state: &ApiState) -> HashMap<u64, usize> {
    let mut counts = HashMap::new();
    for meta in state.registry.snapshot() {
        *counts.entry(meta.grant_id).or_default() += 1;
    }
    counts
}

async fn list_grants(State(state): State<Arc<ApiState>>) -> Response {
    let Some(gate) = &state.gate else {
        return Json(Vec::<GrantView>::new()).into_response();
    };
    let counts = sessions_per_grant(&state);
    let mut grants: Vec<GrantView> = gate
        .grants()
        .iter()
        .map(|g| view(g, counts.get(&g.id.0).copied().unwrap_or(0)))
        .collect();
    grants.sort_by_key(|g| g.expires_at);
    Json(grants).into_response()
}

/// `DELETE /v1/grants/{id}`: revoke one grant and end its sessions now.
async fn revoke_grant(
    State(state): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let Some(gate) = &state.gate else {
        return auth_disabled();
    };
    let Ok(id) = id.parse::<GrantId>() else {
        return error(&ApiError::bad_request(format!("{id:?} is not a grant id")));
    };
    let known: Vec<Grant> = gate
        .grant(id)
        .into_iter()
        .map(std::sync::Arc::unwrap_or_clone)
        .collect();
    let views = revoke_counting(&state, &known, || gate.revoke(id).into_iter().collect()).await;
    if !views.is_empty()
        && let Some(refused) = super::fleet::publish_grants_revoked(&state, &known).await
    {
        return refused;
    }
    match views.into_iter().next() {
        Some(view) => {
            tracing::info!(grant = %id, subject = %view.subject, sessions = view.sessions, "grant revoked by operator");
            Json(view).into_response()
        }
        None => error(&ApiError::new(
            404,
            "no_such_grant",
            format!("no live grant {id}"),
        )),
    }
}

#[derive(serde::Deserialize)]
struct SubjectQuery {
    subject: Option<String>,
}

/// `DELETE /v1/grants?subject=...`: revoke every grant of a token subject.
async fn revoke_subject(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<SubjectQuery>,
) -> Response {
    let Some(gate) = &state.gate else {
        return auth_disabled();
    };
    let Some(subject) = query.subject.filter(|s| !s.is_empty()) else {
        return error(&ApiError::bad_request(
            "give ?subject=<token subject>, or DELETE /v1/grants/<id>",
        ));
    };
    let known: Vec<Grant> = gate
        .grants()
        .into_iter()
        .filter(|g| g.subject == subject)
        .collect();
    let mut revoked = Vec::new();
    let views = revoke_counting(&state, &known, || {
        revoked = gate.revoke_subject(&subject);
        revoked.clone()
    })
    .await;
    if let Some(refused) = super::fleet::publish_subject_revoked(&state, &subject, &revoked).await {
        return refused;
    }
    tracing::info!(%subject, grants = views.len(), sessions = views.iter().map(|v| v.sessions).sum::<usize>(), "subject revoked by operator");
    Json(views).into_response()
}

/// How long a revocation waits for its sessions' teardown before answering.
const REVOKE_TEARDOWN_WAIT: Duration = Duration::from_secs(5);

/// Runs `revoke` (which removes grants from the store) and ends their
/// sessions; each view counts the sessions that were torn down.
///
/// The store's revocation event ends sessions too, on another task, and a
/// session it tears down first is gone before this handler could count it.
/// So the sessions of `known` (the grants about to go) are stopped and
/// listed first; after `revoke`, sessions of the revoked grants that
/// registered meanwhile are stopped too; the answer waits (bounded) until
/// all of them have been torn down. A known preamble grant can be released
/// by its own session's end before `revoke` runs: it was still ended by
/// this revocation, and is reported with the rest.
async fn revoke_counting(
    state: &ApiState,
    known: &[Grant],
    revoke: impl FnOnce() -> Vec<Grant>,
) -> Vec<GrantView> {
    let registry = &state.registry;
    let of = |grants: HashSet<u64>| move |m: &SessionMeta| grants.contains(&m.grant_id);
    let mut stopped: HashSet<Stopped> = registry
        .stop_listed(
            EndReason::Revoked,
            of(known.iter().map(|g| g.id.0).collect()),
        )
        .into_iter()
        .collect();
    let revoked = revoke();
    stopped.extend(registry.stop_listed(
        EndReason::Revoked,
        of(revoked.iter().map(|g| g.id.0).collect()),
    ));
    let ids: Vec<u64> = stopped.iter().map(|s| s.session).collect();
    let left: HashSet<u64> = registry
        .wait_ended(&ids, REVOKE_TEARDOWN_WAIT)
        .await
        .into_iter()
        .collect();
    if !left.is_empty() {
        tracing::warn!(sessions = left.len(), wait = ?REVOKE_TEARDOWN_WAIT, "revoked sessions still ending; not counted");
    }
    let mut ended: HashMap<u64, usize> = HashMap::new();
    for s in stopped.iter().filter(|s| !left.contains(&s.session)) {
        *ended.entry(s.grant).or_default() += 1;
    }
    let revoked_ids: HashSet<u64> = revoked.iter().map(|g| g.id.0).collect();
    let released_meanwhile = known
        .iter()
        .filter(|g| !revoked_ids.contains(&g.id.0) && ended.contains_key(&g.id.0));
    revoked
        .iter()
        .chain(released_meanwhile)
        .map(|g| view(g, ended.get(&g.id.0).copied().unwrap_or(0)))
        .collect()
}

/// A live session as operators see it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub session_id: String,
    pub grant_id: Option<String>,
    pub subject: String,
    pub client: String,
    pub destination: String,
    pub upstream: String,
    #[serde(with = "humantime_serde")]
    pub started_at: std::time::SystemTime,
    #[serde(with = "humantime_serde")]
    pub expires_at: Option<std::time::SystemTime>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// `none`, `preamble` or `source_grant`.
    pub auth: &'static str,
}

async fn list_sessions(State(state): State<Arc<ApiState>>) -> Response {
    let mut sessions: Vec<SessionView> = state
        .registry
        .snapshot()
        .into_iter()
        .map(|m| {
            let (up, down) = state.datapath.live_counters(m.id).unwrap_or_default();
            SessionView {
                session_id: format!("{:016x}", m.id),
                grant_id: (m.grant_id != 0).then(|| GrantId(m.grant_id).to_string()),
                subject: m.subject.to_string(),
                client: m.client.to_string(),
                destination: m.destination.to_string(),
                upstream: m.upstream.to_string(),
                started_at: m.started,
                expires_at: m.expires,
                // A live record's user-space bytes are 0 on the kernel
                // path; on the user-space path they are all there is.
                bytes_up: up.live_bytes() + up.userspace_bytes,
                bytes_down: down.live_bytes() + down.userspace_bytes,
                auth: crate::datapath::auth_name(m.auth_method),
            }
        })
        .collect();
    sessions.sort_by_key(|s| s.started_at);
    Json(sessions).into_response()
}
