//! The HTTP listeners: the runner-facing grant API and the operator
//! endpoints.

use std::sync::Arc;

use tokio::sync::watch;

use crate::api::{self, ApiState};
use crate::config::Config;

use super::StartupError;

/// Binds the configured listeners. The grant API stops with `stop_api`
/// (no new grants once shutdown starts); the operator endpoints keep
/// answering until `stop_admin`, so a draining agent can still be watched.
pub async fn start(
    config: &Config,
    state: &Arc<ApiState>,
    stop_api: &watch::Receiver<bool>,
    stop_admin: &watch::Receiver<bool>,
) -> Result<(), StartupError> {
    if let Some(section) = &config.api {
        let tls = match (&section.tls_cert, &section.tls_key) {
            (Some(cert), Some(key)) => Some(api::tls_acceptor(cert, key)?),
            _ => {
                tracing::warn!(listen = %section.listen, "grant API without TLS: bearer tokens cross the network in clear text");
                None
            }
        };
        let listener = api::bind(section.listen).await?;
        tracing::info!(listen = %section.listen, tls = tls.is_some(), "grant API");
        tokio::spawn(api::serve(
            listener,
            api::runner_router(Arc::clone(state)),
            tls,
            stop_api.clone(),
        ));
    }
    if let Some(admin) = &config.admin {
        if !admin.listen.ip().is_loopback() {
            tracing::warn!(listen = %admin.listen, "operator endpoints (revocation!) listen on a non-loopback address");
        }
        let listener = api::bind(admin.listen).await?;
        tracing::info!(listen = %admin.listen, "operator endpoints (/healthz, /readyz, /metrics, /v1/grants, /v1/sessions)");
        tokio::spawn(api::serve(
            listener,
            api::admin_router(Arc::clone(state)),
            None,
            stop_admin.clone(),
        ));
    }
    Ok(())
}
