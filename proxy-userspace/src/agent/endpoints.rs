//! The HTTP listeners: the runner-facing grant API and the operator
//! endpoints.

use std::sync::Arc;

use tokio::sync::watch;

use crate::api::{self, ApiState, Listener, ServeOptions, Server, TlsFiles};
use crate::config::Config;

use super::StartupError;
use super::takeover::{ListenerRole, ListenerSet};

/// The listeners inherited from a predecessor, and those offered to a
/// successor.
pub struct Sockets<'a> {
    pub inherited: &'a mut ListenerSet,
    pub offered: &'a mut ListenerSet,
}

impl Sockets<'_> {
    /// The inherited listener at `addr`, else a new one; offered onwards.
    pub async fn tcp(
        &mut self,
        role: ListenerRole,
        addr: std::net::SocketAddr,
    ) -> Result<tokio::net::TcpListener, api::ApiError> {
        let listener = match self.inherited.take(role, addr) {
            Some(inherited) => inherited
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(inherited))
                .map_err(|source| api::ApiError::Listen { addr, source })?,
            None => api::bind(addr).await?,
        };
        self.offered.record(role, addr, &listener);
        Ok(listener)
    }
}

/// Binds the configured listeners. The grant API stops with `stop_api`
/// (no new grants once shutdown starts); the operator endpoints keep
/// answering until `stop_admin`, so a draining agent can still be watched.
/// Returns the API's certificate, which SIGHUP reloads.
pub async fn start(
    config: &Config,
    state: &Arc<ApiState>,
    stop_api: &watch::Receiver<bool>,
    stop_admin: &watch::Receiver<bool>,
    sockets: &mut Sockets<'_>,
) -> Result<Option<Arc<TlsFiles>>, StartupError> {
    let mut tls_files = None;
    if let Some(section) = &config.api {
        if let (Some(cert), Some(key)) = (&section.tls_cert, &section.tls_key) {
            tls_files = Some(Arc::new(TlsFiles::load(cert, key)?));
        } else {
            tracing::warn!(
                "grant API over plain HTTP (insecure_http = true): bearer tokens cross the network in clear text; development only"
            );
        }
        let options = ServeOptions {
            server: Server::Api,
            limits: section.limits.clone(),
            tls: tls_files.clone(),
            metrics: Arc::clone(&state.metrics),
        };
        let router = api::runner_router(Arc::clone(state), section.limits.max_body);
        for &addr in &section.listen {
            let listener = Listener::Tcp(sockets.tcp(ListenerRole::Api, addr).await?);
            tracing::info!(listen = %addr, tls = tls_files.is_some(), "grant API");
            tokio::spawn(api::serve(
                listener,
                router.clone(),
                options.clone(),
                stop_api.clone(),
            ));
        }
    }
    if let Some(admin) = &config.admin {
        let options = ServeOptions {
            server: Server::Admin,
            limits: admin.limits.clone(),
            tls: None,
            metrics: Arc::clone(&state.metrics),
        };
        if let Some(path) = admin.socket_path() {
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let group = match &config.agent.operator_group {
                Some(name) => crate::config::resolve_group(name)
                    .ok()
                    .map(|gid| (name.as_str(), gid)),
                None => None,
            };
            let listener = api::bind_unix(&path, group)?;
            tracing::info!(socket = %path.display(), group = group.map(|g| g.0), "operator endpoints (/healthz, /readyz, /metrics, /v1/grants, /v1/sessions)");
            tokio::spawn(api::serve(
                listener,
                api::admin_router(Arc::clone(state), None),
                options.clone(),
                stop_admin.clone(),
            ));
        }
        if let (Some(addr), Some(token_file)) = (admin.listen, &admin.token_file) {
            let token = Arc::new(api::AdminToken::read(token_file)?);
            let listener = Listener::Tcp(sockets.tcp(ListenerRole::Admin, addr).await?);
            tracing::info!(listen = %addr, "operator endpoints on TCP (bearer token; /healthz and /readyz open)");
            tokio::spawn(api::serve(
                listener,
                api::admin_router(Arc::clone(state), Some(token)),
                options,
                stop_admin.clone(),
            ));
        }
    }
    Ok(tls_files)
}
