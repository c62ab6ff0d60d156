//! The agent's HTTP endpoints:
//! - the runner-facing grant API (`[api] listen`, HTTPS): `POST /v1/grants`,
//!   and `DELETE /v1/grants/{id}` for the grant's own subject;
//! - the operator endpoints (`[admin]`, a Unix socket by default, or TCP
//!   with a bearer token): `/healthz`, `/readyz`, `/metrics`, grants
//!   listing and revocation, live sessions.

mod admin;
mod fleet;
mod runner;
mod serve;
mod tls;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::net::{TcpListener, UnixListener};

use crate::gate::Gate;
use crate::registry::Registry;

pub use admin::{AdminToken, SessionView, admin_router};
pub use runner::runner_router;
pub use serve::{Listener, ServeOptions, Server, SocketFile, serve};
pub use tls::TlsFiles;

/// Shared by every handler.
pub struct ApiState {
    pub gate: Option<Arc<Gate>>,
    pub registry: Arc<Registry>,
    pub datapath: crate::datapath::Datapath,
    /// Set once the data path and interception are live.
    pub ready: AtomicBool,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The fleet's store, with `[cluster]`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The peer of the HTTP connection, for source-bound grants.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the operator socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot give the operator socket {path} to group {group}")]
    SocketGroup {
        path: PathBuf,
        group: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read TLS certificate or key {path}")]
    Pem {
        path: PathBuf,
        #[source]
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("invalid TLS certificate/key pair")]
    Tls(#[source] tokio_rustls::rustls::Error),
    #[error("cannot read the admin token file {path}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin token in {path} is shorter than {min} bytes")]
    ShortToken { path: PathBuf, min: usize },
}

/// Binds a TCP listener on `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ApiError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Listen { addr, source })
}

/// Creates the operator socket at `path`: mode 0660, group `group` when
/// given. A stale socket from a previous run is replaced; any other file
/// is not.
pub fn bind_unix(
    path: &Path,
    group: Option<(&str, nix::unistd::Gid)>,
) -> Result<Listener, ApiError> {
    let socket_err = |source| ApiError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(socket_err)?;
        }
        Ok(_) => {
            return Err(ApiError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    // connect(2) needs write permission on the socket file: until the
    // chmod below, the umask's mode (not group- or other-writable under
    // the unit's UMask=0027, nor under 022) keeps everyone else out.
    let listener = UnixListener::bind(path).map_err(socket_err)?;
    let file = serve::SocketFile::bound(path);
    if let Some((name, gid)) = group {
        nix::unistd::chown(path, None, Some(gid)).map_err(|source| ApiError::SocketGroup {
            path: path.to_owned(),
            group: name.to_owned(),
            source,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(socket_err)?;
    Ok(Listener::Unix(listener, file))
}
