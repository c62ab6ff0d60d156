//! Authentication at startup: load the keys, compile the policy, start the
//! grant store and the tasks that keep them current.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::auth::{GrantEvent, GrantStore, Policy, TokenValidator};
use crate::config::Config;
use crate::datapath::EndReason;
use crate::gate::{Gate, GrantMirror};
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum AuthStartError {
    #[error("cannot load token keys")]
    Keys(#[source] crate::auth::token::LoadError),
    #[error("invalid policy: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Policy(Vec<crate::config::FieldError>),
}

/// Builds the gate when `[auth]` is configured, and spawns its tasks: key
/// refresh, grant expiry, and ending sessions when their grant ends.
pub async fn start(
    config: &Config,
    registry: &Arc<Registry>,
    mirror: Option<GrantMirror>,
    stop: &watch::Receiver<bool>,
) -> Result<Option<Arc<Gate>>, AuthStartError> {
    let Some(auth) = &config.auth else {
        tracing::warn!(
            "auth = \"none\": every connection is admitted without a token (development only)"
        );
        return Ok(None);
    };
    let validator = TokenValidator::load(auth)
        .await
        .map_err(AuthStartError::Keys)?;
    let policy = Policy::from_config(&config.policy, auth).map_err(AuthStartError::Policy)?;
    let store = GrantStore::with_limits(auth.audit_claims.clone(), auth.limits.clone());
    let gate = Arc::new(Gate::new(
        validator.clone(),
        policy,
        store.clone(),
        auth.preamble_timeout(),
        auth.limits.clone(),
        mirror,
    ));
    tokio::spawn(validator.run_refresh(stopped(stop.clone())));
    tokio::spawn(store.clone().run_expiry(stopped(stop.clone())));
    tokio::spawn(end_sessions_with_their_grant(
        store.subscribe(),
        Arc::clone(&gate),
        Arc::clone(registry),
        stop.clone(),
    ));
    if gate.mirrors_grants() {
        tokio::spawn(apply_outside_revocations(Arc::clone(&gate), stop.clone()));
    }
    tracing::info!(
        issuers = auth.issuers.len(),
        rules = config.policy.len(),
        "token authentication on"
    );
    Ok(Some(gate))
}

/// How often the pinned `grants` map is checked for revocations an
/// operator made there while the API was not answering.
const OUTSIDE_REVOCATION_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// `tcpgate revoke` falls back to flagging the grant in the pinned map when
/// the API does not answer; this applies the flag once the agent runs.
async fn apply_outside_revocations(gate: Arc<Gate>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(OUTSIDE_REVOCATION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                gate.apply_outside_revocations();
            }
            _ = stop.changed() => return,
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.changed().await;
}

/// Expired and revoked grants take their sessions with them. Sessions also
/// carry their own deadline, so expiry holds even if this task lags.
async fn end_sessions_with_their_grant(
    mut events: broadcast::Receiver<GrantEvent>,
    gate: Arc<Gate>,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.changed() => return,
        };
        match event {
            Ok(GrantEvent::Expired(id)) => {
                gate.forget(id);
                let ended = registry.stop_where(EndReason::GrantExpired, |m| m.grant_id == id.0);
                tracing::info!(grant = %id, sessions = ended, "grant expired");
            }
            Ok(GrantEvent::Revoked(id)) => {
                gate.forget(id);
                let ended = registry.stop_where(EndReason::Revoked, |m| m.grant_id == id.0);
                tracing::info!(grant = %id, sessions = ended, "grant revoked");
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Re-check every session's grant instead.
                let now = std::time::SystemTime::now();
                let ended = registry.stop_where(EndReason::GrantExpired, |m| {
                    m.grant_id != 0
                        && gate
                            .grant(crate::auth::GrantId(m.grant_id))
                            .is_none_or(|g| g.expires_at <= now)
                });
                tracing::warn!(
                    missed,
                    sessions = ended,
                    "grant events lagged; rechecked every session"
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
