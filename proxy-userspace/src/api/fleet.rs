//! The operator endpoints' side of a fleet: revocations made here are
//! published for every bastion, and the fleet's grants can be listed.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::runner::error;
use crate::auth::Grant;
use crate::auth::api_types::ApiError;
use crate::cluster::record::RevocationRecord;

/// 503 for a revocation applied here that etcd did not take.
fn told_nobody(e: &crate::cluster::ClusterError) -> Response {
    tracing::error!(error = %crate::error_chain(e), "revocation applied on this bastion only: etcd did not take it");
    error(&ApiError::new(
        503,
        "cluster_unavailable",
        "revoked on this bastion only: the fleet's store (etcd) cannot be reached, so the \
         other bastions were not told; retry",
    ))
}

/// Publishes the revocation of single grants (their tokens are denied
/// until their `exp`); `None` when there is no fleet or it took them.
pub(super) async fn publish_grants_revoked(
    state: &ApiState,
    revoked: &[Grant],
) -> Option<Response> {
    let cluster = state.cluster.as_ref()?;
    for grant in revoked {
        let record = RevocationRecord::token(grant, cluster.name());
        if let Err(e) = cluster
            .publish_revocation(record.as_ref(), &[grant.id])
            .await
        {
            return Some(told_nobody(&e));
        }
    }
    None
}

/// Publishes the revocation of `subject`, with the holds in force here.
pub(super) async fn publish_subject_revoked(
    state: &ApiState,
    subject: &str,
    revoked: &[Grant],
) -> Option<Response> {
    let (cluster, gate) = (state.cluster.as_ref()?, state.gate.as_ref()?);
    let holds = gate.subject_holds(subject);
    let record = RevocationRecord::subject(subject, &holds, SystemTime::now(), cluster.name());
    let ids: Vec<_> = revoked
        .iter()
        .filter(|g| g.source().is_some())
        .map(|g| g.id)
        .collect();
    let result = cluster.publish_revocation(Some(&record), &ids).await;
    result.err().map(|e| told_nobody(&e))
}

/// `GET /v1/fleet/grants`: every grant the fleet holds, read from etcd.
pub(super) async fn fleet_grants(State(state): State<Arc<ApiState>>) -> Response {
    let Some(cluster) = &state.cluster else {
        return error(&ApiError::new(
            404,
            "no_cluster",
            "this bastion is not part of a fleet (no [cluster] section)",
        ));
    };
    match cluster.fleet_grants().await {
        Ok(grants) => Json(grants).into_response(),
        Err(e) => error(&ApiError::new(
            503,
            "cluster_unavailable",
            format!(
                "cannot read the fleet's grants from etcd: {}",
                crate::error_chain(&e)
            ),
        )),
    }
}
