//! Accept loops: one per listener, each spawning a task per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::auth::DenyReason;
use crate::intercept::Interceptor;
use crate::session::{self, Services, Target};

/// How a listener's connections find their upstream.
#[derive(Clone)]
pub enum Resolver {
    /// A static `[[forward]]`.
    Fixed(Target),
    /// A transparent listener: the original destination decides.
    Intercept(Arc<Interceptor>),
}

impl Resolver {
    fn resolve(&self, client: &TcpStream) -> Result<Target, (DenyReason, String)> {
        match self {
            Self::Fixed(target) => Ok(target.clone()),
            Self::Intercept(interceptor) => {
                let destination = client.local_addr().map_err(|e| {
                    (
                        DenyReason::InternalError,
                        format!("cannot read the original destination: {e}"),
                    )
                })?;
                let destination =
                    SocketAddr::new(destination.ip().to_canonical(), destination.port());
                let entry = interceptor.lookup(destination).ok_or_else(|| {
                    (
                        DenyReason::NotIntercepted,
                        format!("{destination} is not in the intercepted set"),
                    )
                })?;
                Ok(Target {
                    destination,
                    upstream: entry.upstream.resolve(destination),
                })
            }
        }
    }
}

pub async fn accept_loop(
    listener: TcpListener,
    resolver: Resolver,
    services: Arc<Services>,
    mut stop: watch::Receiver<bool>,
    tasks: TaskTracker,
) {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    let services = Arc::clone(&services);
                    match resolver.resolve(&client) {
                        Ok(target) => {
                            tasks.spawn(session::handle(services, client, peer, target));
                        }
                        Err((reason, detail)) => {
                            let unknown = Target { destination: client.local_addr().unwrap_or(peer), upstream: peer };
                            session::deny(&services, &client, peer, &unknown, reason, detail);
                        }
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listen = %local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}
