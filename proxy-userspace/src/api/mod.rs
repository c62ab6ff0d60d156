//! The agent's HTTP endpoints:
//! - the runner-facing grant API (`[api] listen`): `POST /v1/grants`, and
//!   `DELETE /v1/grants/{id}` for the grant's own subject;
//! - the operator endpoints (`[admin] listen`, meant for loopback):
//!   `/healthz`, `/readyz`, `/metrics`, grants listing and revocation,
//!   live sessions.

mod admin;
mod runner;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::gate::Gate;
use crate::registry::Registry;

pub use admin::{SessionView, admin_router};
pub use runner::runner_router;

/// Shared by every handler.
pub struct ApiState {
    pub gate: Option<Arc<Gate>>,
    pub registry: Arc<Registry>,
    pub datapath: crate::datapath::Datapath,
    /// Set once the data path and interception are live.
    pub ready: AtomicBool,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The peer of the HTTP connection, for source-bound grants.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read TLS certificate or key {path}")]
    Pem {
        path: std::path::PathBuf,
        #[source]
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("invalid TLS certificate/key pair")]
    Tls(#[source] tokio_rustls::rustls::Error),
}

/// Loads a TLS server config from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ApiError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| ApiError::Pem {
            path: cert.to_owned(),
            source,
        })?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| ApiError::Pem {
        path: key.to_owned(),
        source,
    })?;
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(ApiError::Tls)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds `addr`; the accept loop runs until `stop` fires.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ApiError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Listen { addr, source })
}

/// Serves `router` on `listener`, one task per connection (TLS when
/// `tls` is set), until `stop` changes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let app = router.clone().layer(axum::Extension(ClientAddr(peer)));
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            builder
                                .serve_connection(TokioIo::new(tls_stream), service)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(client = %peer, error = %e, "API connection ended with an error");
            }
        });
    }
}
